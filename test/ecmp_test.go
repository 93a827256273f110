package test

import (
	"context"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/lab"
)

// newConns is how many new connections the daemon behind api has sent to
// the service on vip.
func newConns(t *testing.T, api *control.Client, vip netip.AddrPort) uint64 {
	t.Helper()
	st, err := api.Stats(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range st.Services {
		if s.VIP == vip.String() {
			return s.NewConns
		}
	}
	return 0
}

// TestECMPHostFails: two tether hosts announce the VIP to a BIRD router,
// which spreads the clients' connections over both (ECMP, hashing ports
// too). Host 2 drained and undrained: every connection echoes on its
// backend whichever host it crosses. Host 1 dies (its link goes down, as
// when a machine dies: no word to the router): once the router's session
// with it times out, every flow it carried reaches host 2, which has no
// connection entry for it and takes its backend from the ring, the same
// as host 1's: every connection goes on echoing, on the backend it had.
func TestECMPHostFails(t *testing.T) {
	l, router, bird, lbs := bgpLab(t, lab.Options{Backends: 3, Clients: 16}, 2)
	lb2 := lbs[1]
	for _, be := range l.Backends {
		serveEchoOn(t, be, l.VIP4, l.VIP6, be.Addr4, be.Addr6)
	}
	base := healthConfig(l, l.Backends, "{type: websocket, path: /health, interval: 200ms, timeout: 150ms, rise: 1, fall: 2}")
	d1 := startDaemon(t, l, base+bgpBlock(l.Balancer, router, time.Second))
	d2 := startDaemonOn(t, lb2, filepath.Join(l.BPFFS, "tether-lb2"), base+bgpBlock(lb2, router, time.Second))
	api1, api2 := control.NewClient(d1.socket), control.NewClient(d2.socket)
	vip := netip.AddrPortFrom(l.VIP4, chatPort)

	awaitRoute(t, bird, l.VIP4, l.Balancer.Addr4, lb2.Addr4)
	routeThrough(t, l, router, l.Balancer, lb2)

	conns := dialAllAt(t, l, l.ClientAddrs4, vip, 4)
	on1, on2 := newConns(t, api1, vip), newConns(t, api2, vip)
	t.Logf("%d connections: host 1 took %d, host 2 %d", len(conns), on1, on2)
	if on1 == 0 || on2 == 0 {
		t.Fatalf("the router sent every connection to one host (%d, %d): no ECMP spread", on1, on2)
	}

	// Host 2 drained: the router sends everything to host 1, whose ring
	// gives the flows that crossed host 2 the backends they had; undrained,
	// the flows spread again, and those that come back to host 2 find
	// their entries or the same ring.
	for _, step := range []struct {
		cmd  string
		hops []netip.Addr
	}{{"drain", []netip.Addr{l.Balancer.Addr4}}, {"undrain", []netip.Addr{l.Balancer.Addr4, lb2.Addr4}}} {
		d2.mustCLI("host", step.cmd)
		took := awaitRoute(t, bird, l.VIP4, step.hops...)
		if lost := echoOnBackends(t, conns, step.cmd); lost > 0 {
			t.Errorf("after host 2's %s: %d connections lost or moved", step.cmd, lost)
		}
		t.Logf("host 2 %sed: the router followed in %v; every connection echoes on its backend", step.cmd, took.Round(time.Millisecond))
	}

	// Host 1 dies.
	died := time.Now()
	if err := l.Balancer.Run("ip", "link", "set", "dev", "eth0", "down"); err != nil {
		t.Fatal(err)
	}
	took := awaitRoute(t, bird, l.VIP4, lb2.Addr4)
	t.Logf("the router moved the VIP to host 2 alone %v after host 1 died (hold time 9s)", took.Round(time.Millisecond))

	// Every connection echoes again, on its backend.
	lost := echoOnBackends(t, conns, "host 1 died")
	t.Logf("%d of %d connections echo on their backend %v after host 1 died: %d lost; host 2 chose the backend of %d flows by its ring since the start",
		len(conns)-lost, len(conns), time.Since(died).Round(time.Millisecond), lost, newConns(t, api2, vip)-on2)
	for _, c := range conns {
		c.ws.Close()
	}
}
