package test

import (
	"context"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tetherlb/tether/config"
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

// TestECMPScaleOut: tether hosts announce the VIP to a BIRD router, which
// spreads flows over them by ECMP (hashing ports too), while 300 WebSocket
// connections from 150 addresses echo every 100 ms through everything:
//   - both hosts carry connections, and every client's connections reach
//     one backend whichever host they cross;
//   - host 2 drained and undrained: withdrawn and announced again;
//   - host 3 starts: it announces, the router moves a share of the
//     existing flows to it (it has no entry for them: its ring gives the
//     backend) and sends it a share of new connections;
//   - host 1 dies as a machine does: its link goes down first (no word to
//     the router), then its daemon is killed (SIGKILL) and its XDP program
//     detached. The router's session times out within the hold time (3 s
//     here) and the flows host 1 carried reach hosts 2 and 3, whose rings
//     give the backends they had.
//
// No connection closes, no echo is lost or comes from another backend,
// and every client still reaches the one backend it had.
func TestECMPScaleOut(t *testing.T) {
	const hold = 3 * time.Second
	l, router, bird, lbs := bgpLab(t, lab.Options{Backends: 3}, 3, int(hold/time.Second))
	for _, be := range l.Backends {
		serveEchoOn(t, be, l.VIP4, l.VIP6, be.Addr4, be.Addr6)
	}
	base := healthConfig(l, l.Backends, "{type: websocket, path: /health, interval: 200ms, timeout: 150ms, rise: 1, fall: 2}")
	pinDirs := []string{labPinDir(l), filepath.Join(l.BPFFS, "tether-lb2"), filepath.Join(l.BPFFS, "tether-lb3")}
	start := func(i int) (*daemon, *control.Client) {
		d := startDaemonOn(t, lbs[i], pinDirs[i], base+bgpBlock(lbs[i], router, time.Second))
		return d, control.NewClient(d.socket)
	}
	d1, api1 := start(0)
	d2, api2 := start(1)
	vip := netip.AddrPortFrom(l.VIP4, chatPort)
	hops := func(hosts ...*lab.Host) []netip.Addr {
		var out []netip.Addr
		for _, h := range hosts {
			out = append(out, h.Addr4)
		}
		return out
	}

	awaitRoute(t, bird, l.VIP4, hops(lbs[0], lbs[1])...)
	routeThrough(t, l, router, lbs[0], lbs[1])
	conns := dialAllAt(t, l, l.ClientAddrs4, vip, 2)
	backendsByClient(t, conns)
	on1, on2 := newConns(t, api1, vip), newConns(t, api2, vip)
	t.Logf("%d connections from %d addresses: host 1 took %d, host 2 %d", len(conns), len(l.ClientAddrs4), on1, on2)
	if on1 == 0 || on2 == 0 {
		t.Fatalf("the router sent every connection to one host (%d, %d): no ECMP spread", on1, on2)
	}

	var fresh []*conn
	var api3 *control.Client
	total, worst := echoWaiting(t, conns, 20*time.Second, func() {
		for _, step := range []struct {
			cmd  string
			hops []netip.Addr
		}{{"drain", hops(lbs[0])}, {"undrain", hops(lbs[0], lbs[1])}} {
			d2.mustCLI("host", step.cmd)
			took := awaitRoute(t, bird, l.VIP4, step.hops...)
			t.Logf("host 2 %sed: the router followed in %v", step.cmd, took.Round(time.Millisecond))
			time.Sleep(time.Second)
		}

		// Host 3 joins.
		_, api3 = start(2)
		took := awaitRoute(t, bird, l.VIP4, hops(lbs...)...)
		routeThrough(t, l, router, lbs...)
		time.Sleep(time.Second)
		moved := newConns(t, api3, vip)
		fresh = dialAllAt(t, l, l.ClientAddrs4, vip, 1)
		took3 := newConns(t, api3, vip) - moved
		t.Logf("host 3 announced %v after it started; it carries %d existing flows and took %d of %d new connections", took.Round(time.Millisecond), moved, took3, len(fresh))
		if moved == 0 || took3 == 0 {
			t.Errorf("host 3 took %d existing flows and %d new connections: want a share of both", moved, took3)
		}

		// Host 1 dies.
		hostDies(t, l, d1, pinDirs[0])
		took = awaitRoute(t, bird, l.VIP4, hops(lbs[1], lbs[2])...)
		if took > hold+time.Second {
			t.Errorf("the router withdrew host 1 %v after it died: want within the hold time (%v)", took, hold)
		}
		t.Logf("host 1 died (link down, daemon killed, XDP detached): the router withdrew it %v later (hold time %v)", took.Round(time.Millisecond), hold)
		// Long enough for every flow held up on the dead host to
		// retransmit (TCP backs off 0.2, 0.4, ... 3.2 s) and echo again.
		time.Sleep(10 * time.Second)
	})
	t.Logf("%d connections echoed %d messages through drain, a third host and host 1's death: none lost, none moved; the longest exchange took %v",
		len(conns), total, worst.Round(time.Millisecond))
	all := append(conns, fresh...)
	if lost := echoOnBackends(t, all, "after host 1 died"); lost > 0 {
		t.Errorf("%d of %d connections lost or moved", lost, len(all))
	}
	backendsByClient(t, all)
	t.Logf("flows entered by host since it started: host 2 %d, host 3 %d", newConns(t, api2, vip), newConns(t, api3, vip))
}

// TestECMPFullNAT: the same two hosts behind the router with forwarding
// fullnat, backends that nobody reconfigured: each host translates the
// flows the router gives it to its own address, so the backends' replies
// come back to that host. 300 connections from 150 addresses spread over
// both hosts, and every client's connections reach one backend. When host
// 1 dies, the connections it translated end with it (host 2 has no
// translation for them; sharing that state is the next issue's): the test
// counts them, checks that no connection through host 2 is lost, and that
// each broken connection's client reconnects to the backend it had.
func TestECMPFullNAT(t *testing.T) {
	const hold = 3
	l, router, bird, lbs := bgpLab(t, lab.Options{Backends: 3, Plain: true}, 2, hold)
	for _, lb := range lbs {
		for _, k := range []string{"net/ipv4/conf/all/forwarding", "net/ipv6/conf/all/forwarding"} {
			if err := lb.Sysctl(k, "1"); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, be := range l.Backends {
		natBackend(t, l, config.ForwardingFullNAT, be)
	}
	cfg := natConfig(l, config.ForwardingFullNAT, l.Backends)
	pinDirs := []string{labPinDir(l), filepath.Join(l.BPFFS, "tether-lb2")}
	var ds []*daemon
	var apis []*control.Client
	for i, lb := range lbs {
		d := startDaemonOn(t, lb, pinDirs[i], cfg+bgpBlock(lb, router, time.Second))
		ds, apis = append(ds, d), append(apis, control.NewClient(d.socket))
	}
	vip := netip.AddrPortFrom(l.VIP4, natServicePort)
	awaitRoute(t, bird, l.VIP4, lbs[0].Addr4, lbs[1].Addr4)
	routeThrough(t, l, router, lbs...)

	conns := dialAllAt(t, l, l.ClientAddrs4, vip, connsPerC)
	owner := backendsByClient(t, conns)
	on1, on2 := newConns(t, apis[0], vip), newConns(t, apis[1], vip)
	t.Logf("%d fullnat connections from %d addresses: host 1 translated %d, host 2 %d", len(conns), len(l.ClientAddrs4), on1, on2)
	if on1 == 0 || on2 == 0 {
		t.Fatalf("the router sent every connection to one host (%d, %d): no ECMP spread", on1, on2)
	}

	hostDies(t, l, ds[0], pinDirs[0])
	took := awaitRoute(t, bird, l.VIP4, lbs[1].Addr4)
	t.Logf("host 1 died: the router withdrew it %v later", took.Round(time.Millisecond))

	// Every connection tries one echo: those host 1 translated break,
	// the others echo on their backend.
	var broken []*conn
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for _, c := range conns {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			b, err := c.ws.Echo(ctx, "after host 1 died")
			if err == nil && b != c.backend {
				t.Errorf("connection from %s moved from %s to %s", c.src, c.backend, b)
			}
			if err != nil {
				mu.Lock()
				broken = append(broken, c)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	t.Logf("%d connections broke with host 1 (it had translated %d), %d echo on through host 2", len(broken), on1, len(conns)-len(broken))
	if uint64(len(broken)) != on1 {
		t.Errorf("%d connections broke, want exactly the %d host 1 translated", len(broken), on1)
	}
	// Their clients reconnect, through host 2, to the backends they had.
	for _, c := range broken {
		c.ws.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		again, err := dial(ctx, l, c.src, "ws://"+vip.String()+"/chat")
		cancel()
		if err != nil {
			t.Fatalf("client %s could not reconnect: %v", c.src, err)
		}
		if again.backend != owner[c.src] {
			t.Errorf("client %s reconnected to %s, it was on %s", c.src, again.backend, owner[c.src])
		}
		again.ws.Close()
	}
}

// hostDies kills the host of daemon d as a machine dies: its link goes
// down first (no word to the router), then the daemon gets SIGKILL and
// the XDP program it pinned in pinDir is detached.
func hostDies(t *testing.T, l *lab.Lab, d *daemon, pinDir string) {
	t.Helper()
	if err := l.SetLink(d.host, false); err != nil {
		t.Fatal(err)
	}
	if err := d.proc.Kill(); err != nil {
		t.Fatal(err)
	}
	if out, code := runIn(t, d.host, "detach", "--pin-dir", pinDir); code != 0 || !strings.Contains(out, "detached the XDP program from eth0") {
		t.Fatalf("tether detach on %s: exit %d\n%s", d.host.Name, code, out)
	}
}
