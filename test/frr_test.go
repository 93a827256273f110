package test

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/lab"
)

// frrPaths returns the next hops of the paths FRR uses for vip's host
// route: valid, and the best or one of the multipath set that FRR would
// spread flows over (none: no route).
func frrPaths(t *testing.T, f *lab.FRR, vip netip.Addr) []netip.Addr {
	t.Helper()
	fam := "ipv4"
	if vip.Is6() {
		fam = "ipv6"
	}
	out, err := f.Cmd(fmt.Sprintf("show bgp %s unicast %s json", fam, netip.PrefixFrom(vip, vip.BitLen())))
	if err != nil {
		t.Fatal(err)
	}
	var r struct {
		Paths []struct {
			Valid     bool `json:"valid"`
			Multipath bool `json:"multipath"`
			Bestpath  struct {
				Overall bool `json:"overall"`
			} `json:"bestpath"`
			Nexthops []struct {
				IP string `json:"ip"`
			} `json:"nexthops"`
		} `json:"paths"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("vtysh's json: %v:\n%s", err, out)
	}
	var hops []netip.Addr
	for _, p := range r.Paths {
		if p.Valid && (p.Multipath || p.Bestpath.Overall) && len(p.Nexthops) > 0 {
			if a, err := netip.ParseAddr(p.Nexthops[0].IP); err == nil {
				hops = append(hops, a)
			}
		}
	}
	slices.SortFunc(hops, netip.Addr.Compare)
	return hops
}

// TestBGPWithFRR: two tether hosts peer with FRR's bgpd, the other router
// people run, over IPv4 and IPv6: each VIP reaches FRR from both hosts as
// two valid paths in its multipath set (ECMP), and a drained host's paths
// leave and come back when it is undrained.
func TestBGPWithFRR(t *testing.T) {
	if err := lab.FRRAvailable(); err != nil {
		t.Fatal(err)
	}
	l := lab.NewT(t, lab.Options{Backends: 2, Clients: 8})
	lb2, err := l.AddBalancer()
	if err != nil {
		t.Fatal(err)
	}
	lbs := []*lab.Host{l.Balancer, lb2}
	router, err := l.AddRouter()
	if err != nil {
		t.Fatal(err)
	}
	// FRR also sends the hosts routes of its own, which they refuse.
	offered := []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("2001:db8:c::/64")}
	frr, err := router.StartFRR(t.TempDir(), lab.FRRECMPConfig(router, 9, offered, lbs...))
	if err != nil {
		t.Fatal(err)
	}
	for _, be := range l.Backends {
		serveEchoOn(t, be, l.VIP4, l.VIP6, be.Addr4, be.Addr6)
	}
	base := healthConfig(l, l.Backends, "{type: websocket, path: /health, interval: 200ms, timeout: 150ms, rise: 1, fall: 2}")
	startDaemon(t, l, base+bgpBlock(lbs[0], router, time.Second))
	d2 := startDaemonOn(t, lb2, filepath.Join(l.BPFFS, "tether-lb2"), base+bgpBlock(lb2, router, time.Second))
	awaitFRR := func(vip netip.Addr, want ...netip.Addr) time.Duration {
		t.Helper()
		slices.SortFunc(want, netip.Addr.Compare)
		return waitFor(t, fmt.Sprintf("FRR's paths to %s via %v", vip, want), 20*time.Second, func() bool {
			return slices.Equal(frrPaths(t, frr, vip), want)
		})
	}
	took := awaitFRR(l.VIP4, lbs[0].Addr4, lb2.Addr4)
	awaitFRR(l.VIP6, lbs[0].Addr6, lb2.Addr6)
	t.Logf("FRR has both VIPs from both hosts %v after host 2 started", took.Round(time.Millisecond))
	d2.mustCLI("host", "drain")
	took = awaitFRR(l.VIP4, lbs[0].Addr4)
	awaitFRR(l.VIP6, lbs[0].Addr6)
	t.Logf("host 2 drained: FRR followed in %v", took.Round(time.Millisecond))
	d2.mustCLI("host", "undrain")
	awaitFRR(l.VIP4, lbs[0].Addr4, lb2.Addr4)
	awaitFRR(l.VIP6, lbs[0].Addr6, lb2.Addr6)

	// The routes FRR offered were received and none accepted.
	var st control.Status
	waitFor(t, "FRR's routes received on both of host 2's sessions", 15*time.Second, func() bool {
		d2.cliJSON(&st, "status")
		n := 0
		for _, p := range st.BGP.Peers {
			if p.Received == 1 {
				n++
			}
		}
		return n == 2
	})
	time.Sleep(500 * time.Millisecond) // time for a route let in to reach the table
	d2.cliJSON(&st, "status")
	for _, p := range st.BGP.Peers {
		if p.Received != 1 || p.Accepted != 0 {
			t.Errorf("peer %s: %d routes received, %d accepted; want FRR's one received and none accepted", p.Address, p.Received, p.Accepted)
		}
	}
}
