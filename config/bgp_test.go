package config

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"
)

const withBGP = minimal + `bgp:
  asn: 65001
  router_id: 198.51.100.2
  next_hops: [198.51.100.2, 2001:db8:100::2]
  communities: ["65001:100", no-export]
  peers:
    - {address: 198.51.100.1, asn: 65000}
    - {address: 2001:db8:100::1, asn: 65000, port: 1179, password: s3cret, hold_time: 30s}
`

func TestParseBGP(t *testing.T) {
	c := mustParse(t, withBGP)
	want := &BGP{
		ASN: 65001, RouterID: netip.MustParseAddr("198.51.100.2"),
		NextHops:        []netip.Addr{netip.MustParseAddr("198.51.100.2"), netip.MustParseAddr("2001:db8:100::2")},
		Communities:     []string{"65001:100", "no-export"},
		ReannounceDelay: DefaultReannounceDelay,
		GracefulRestart: DefaultGracefulRestart,
		Peers: []BGPPeer{
			{Address: netip.MustParseAddr("198.51.100.1"), ASN: 65000, Port: 179, HoldTime: 9 * time.Second},
			{Address: netip.MustParseAddr("2001:db8:100::1"), ASN: 65000, Port: 1179, Password: "s3cret", HoldTime: 30 * time.Second},
		},
	}
	if !reflect.DeepEqual(c.BGP, want) {
		t.Errorf("BGP = %+v\nwant %+v", c.BGP, want)
	}
	if c.Services[0].MinHealthy != 1 {
		t.Errorf("min_healthy = %d, want the default 1", c.Services[0].MinHealthy)
	}
	// It survives a round trip through the file, and a clone is its own.
	out, err := c.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	again := mustParse(t, string(out))
	if !reflect.DeepEqual(again.BGP, c.BGP) {
		t.Errorf("after a round trip: %+v, want %+v\n%s", again.BGP, c.BGP, out)
	}
	cl := c.Clone()
	cl.BGP.Peers[0].ASN = 1
	if c.BGP.Peers[0].ASN != 65000 {
		t.Error("Clone shares the peers")
	}
	if v, err := ParseCommunity("65001:100"); err != nil || v != 65001<<16|100 {
		t.Errorf("ParseCommunity(65001:100) = %#x, %v", v, err)
	}
}

func TestParseBGPBad(t *testing.T) {
	for _, tc := range []struct{ desc, edit, field, msg string }{
		{"no asn", "  asn: 65001\n", "bgp.asn", "required"},
		{"no router id", "  router_id: 198.51.100.2\n", "bgp.router_id", "required"},
		{"no peers", "  peers:\n    - {address: 198.51.100.1, asn: 65000}\n    - {address: 2001:db8:100::1, asn: 65000, port: 1179, password: s3cret, hold_time: 30s}\n", "bgp.peers", "at least one peer"},
		{"a bad community", `"65001:100"`, "bgp.communities[0]", "is not a community"},
		{"two IPv4 next hops", "2001:db8:100::2]", "bgp.next_hops[1]", "a second next hop of the same family"},
		{"a short hold time", "hold_time: 30s", "bgp.peers[1].hold_time", "want whole seconds within 3s..18h12m15s"},
		{"a peer twice", "2001:db8:100::1, asn: 65000, port", "bgp.peers[1].address", "already bgp.peers[0]"},
		{"an unknown field", "  asn: 65001\n", "bgp.as", "unknown field"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			var data string
			switch tc.desc {
			case "a bad community":
				data = strings.Replace(withBGP, tc.edit, `"65001:70000"`, 1)
			case "two IPv4 next hops":
				data = strings.Replace(withBGP, tc.edit, "198.51.100.3]", 1)
			case "a short hold time":
				data = strings.Replace(withBGP, tc.edit, "hold_time: 1s", 1)
			case "a peer twice":
				data = strings.Replace(withBGP, tc.edit, "198.51.100.1, asn: 65000, port", 1)
			case "an unknown field":
				data = strings.Replace(withBGP, tc.edit, "  as: 65001\n", 1)
			default:
				data = strings.Replace(withBGP, tc.edit, "", 1)
			}
			_, err := Parse([]byte(data))
			if err == nil || !strings.Contains(err.Error(), tc.field+": ") || !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("error %v, want %s: ...%s", err, tc.field, tc.msg)
			}
		})
	}
	bad := strings.Replace(minimal, "port: 8765", "port: 8765\n    min_healthy: -1", 1)
	if _, err := Parse([]byte(bad)); err == nil || !strings.Contains(err.Error(), "min_healthy") {
		t.Errorf("min_healthy -1: %v", err)
	}
}
