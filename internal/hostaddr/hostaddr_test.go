package hostaddr

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestProblem(t *testing.T) {
	h := &Host{addrs: []ifaceAddr{
		{netip.MustParsePrefix("198.51.100.2/24"), "eth0"},
		{netip.MustParsePrefix("192.0.2.1/31"), "p2p"},
		{netip.MustParsePrefix("2001:db8:100::2/64"), "eth0"},
		{netip.MustParsePrefix("127.0.0.1/8"), "lo"},
	}}
	for _, tc := range []struct {
		addr  string
		local bool
		want  string // in the problem; "" for none
	}{
		{"198.51.100.11", false, ""},
		{"198.51.100.255", false, "broadcast address of 198.51.100.0/24"},
		{"198.51.100.0", false, "network address of 198.51.100.0/24"},
		{"198.51.100.2", false, "an address of this host (on eth0)"},
		{"198.51.100.2", true, ""},
		{"2001:db8:100::2", false, "an address of this host"},
		{"2001:db8:100::", false, ""}, // IPv6 has no broadcast; the subnet-router anycast address answers
		{"192.0.2.0", false, ""},      // a /31 has no network or broadcast address
		{"127.0.0.1", false, "an address of this host (on lo)"},
		{"127.255.255.255", false, "broadcast address of 127.0.0.0/8"},
		{"203.0.113.10", false, ""},
	} {
		got := h.Problem(netip.MustParseAddr(tc.addr), tc.local)
		if tc.want == "" && got != "" || tc.want != "" && !strings.Contains(got, tc.want) {
			t.Errorf("Problem(%s, local %v) = %q, want %q", tc.addr, tc.local, got, tc.want)
		}
	}
}

func TestOwn(t *testing.T) {
	reads := 0
	v := Vetter{TTL: time.Hour, Read: func() (*Host, error) {
		reads++
		return &Host{addrs: []ifaceAddr{
			{netip.MustParsePrefix("198.51.100.2/24"), "eth0"},
			{netip.MustParsePrefix("2001:db8:100::2/64"), "eth0"},
		}}, nil
	}}
	for a, want := range map[string]bool{"198.51.100.2": true, "2001:db8:100::2": true, "198.51.100.3": false, "198.51.100.0": false} {
		got, err := v.Own(netip.MustParseAddr(a))
		if err != nil || got != want {
			t.Errorf("Own(%s) = %v, %v; want %v", a, got, err, want)
		}
	}
	if reads != 1 {
		t.Errorf("%d snapshots for 4 questions within the TTL, want 1", reads)
	}
}
