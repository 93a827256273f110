package test

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/lab"
)

// bgpBlock is the bgp block of a tether host that peers with router.
func bgpBlock(h, router *lab.Host, delay time.Duration) string {
	return fmt.Sprintf("bgp:\n  asn: %d\n  router_id: %s\n  reannounce_delay: %s\n  peers:\n    - {address: %s, asn: %d}\n    - {address: %s, asn: %d}\n",
		lab.BalancerAS, h.Addr4, delay, router.Addr4, lab.RouterAS, router.Addr6, lab.RouterAS)
}

// announced returns the next hops BIRD has for vip's host route.
func announced(t *testing.T, b *lab.Bird, vip netip.Addr) []netip.Addr {
	t.Helper()
	hops, err := b.NextHops(vip)
	if err != nil {
		t.Fatal(err)
	}
	return hops
}

// awaitRoute waits until BIRD's route to vip has exactly the next hops
// want (none: no route).
func awaitRoute(t *testing.T, b *lab.Bird, vip netip.Addr, want ...netip.Addr) time.Duration {
	t.Helper()
	return waitFor(t, fmt.Sprintf("the router's route to %s via %v", vip, want), 15*time.Second, func() bool {
		slices.SortFunc(want, netip.Addr.Compare)
		return slices.Equal(announced(t, b, vip), want)
	})
}

// bgpLab builds a lab of opts with more balancers (n in all) and a router
// running BIRD that peers with each and spreads flows over them by a
// layer-4 hash (ECMP), with hold time hold (seconds). It returns the
// balancers, the lab's first.
func bgpLab(t *testing.T, opts lab.Options, n, hold int) (l *lab.Lab, router *lab.Host, bird *lab.Bird, lbs []*lab.Host) {
	t.Helper()
	if err := lab.BirdAvailable(); err != nil {
		t.Fatal(err)
	}
	l = lab.NewT(t, opts)
	lbs = []*lab.Host{l.Balancer}
	for len(lbs) < n {
		lb, err := l.AddBalancer()
		if err != nil {
			t.Fatal(err)
		}
		lbs = append(lbs, lb)
	}
	router, bird, err := l.StartECMPRouter(t.TempDir(), hold, lbs...)
	if err != nil {
		t.Fatal(err)
	}
	return l, router, bird, lbs
}

// routeThrough routes the client's traffic to the IPv4 VIP through the
// router, and waits until the router's kernel has the route BIRD learned,
// through each of the balancers lbs.
func routeThrough(t *testing.T, l *lab.Lab, router *lab.Host, lbs ...*lab.Host) {
	t.Helper()
	if err := l.Client.Run("ip", "route", "replace", l.VIP4.String()+"/32", "via", router.Addr4.String()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the router's kernel route to the VIP", 10*time.Second, func() bool {
		out, _ := router.Command("ip", "route", "show", l.VIP4.String()+"/32").Output()
		for _, lb := range lbs {
			if !strings.Contains(string(out), "via "+lb.Addr4.String()) {
				return false
			}
		}
		return true
	})
}

// TestBGPAnnounces: with a bgp block, tether opens sessions to a real
// router (BIRD) over IPv4 and IPv6 and announces each VIP as a host route
// with itself as next hop while one of its services has min_healthy
// usable backends; a VIP whose services lose them is withdrawn at once and
// announced again only after the reannounce delay; `tether host drain`
// withdraws every VIP while connections keep flowing, `undrain` announces
// them again at once; status shows the sessions and what is announced.
// With clients routed through the router, two daemon restarts lose no
// connection and no echo, and the router's route never leaves (graceful
// restart); a drain outlasts a restart; drained and stopped, the host is
// announced no more.
func TestBGPAnnounces(t *testing.T) {
	l, router, bird, _ := bgpLab(t, lab.Options{Backends: 2, Clients: 8}, 1, 9)
	servers := map[string][]*lab.EchoServer{}
	for _, be := range l.Backends {
		servers[be.Name] = serveEchoOn(t, be, l.VIP4, l.VIP6, be.Addr4, be.Addr6)
	}
	const delay = 2 * time.Second
	// chat (IPv4) needs both backends, chat6 one.
	cfg := healthConfig(l, l.Backends, "{type: websocket, path: /health, interval: 100ms, timeout: 80ms, rise: 1, fall: 1}")
	cfg = strings.Replace(cfg, "  - name: chat\n", "  - name: chat\n    min_healthy: 2\n", 1)
	d := startDaemon(t, l, cfg+bgpBlock(l.Balancer, router, delay), "--metrics", "127.0.0.1:0")
	api := control.NewClient(d.socket)
	maddr := metricsAddr(t, d)

	t0 := time.Now()
	awaitRoute(t, bird, l.VIP4, l.Balancer.Addr4)
	awaitRoute(t, bird, l.VIP6, l.Balancer.Addr6)
	t.Logf("both VIPs announced %v after start", time.Since(t0).Round(time.Millisecond))
	st, err := api.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if st.BGP == nil || len(st.BGP.Peers) != 2 || st.BGP.Peers[0].State != "established" || st.BGP.Peers[1].State != "established" ||
		!slices.Equal(st.BGP.Announced, []string{l.VIP4.String() + "/32", l.VIP6.String() + "/128"}) {
		t.Fatalf("status: %+v, want two established sessions and both VIPs announced", st.BGP)
	}

	// Backend 1 dies: chat has one usable backend of the two it needs,
	// its VIP is withdrawn; chat6 still has one and stays announced.
	for _, s := range servers[l.Backends[0].Name] {
		s.Close()
	}
	took := awaitRoute(t, bird, l.VIP4)
	t.Logf("VIP withdrawn %v after its backend died", took.Round(time.Millisecond))
	if got := announced(t, bird, l.VIP6); !slices.Equal(got, []netip.Addr{l.Balancer.Addr6}) {
		t.Errorf("the IPv6 VIP: next hops %v, want it still announced", got)
	}
	// Backend 2 dies too: every backend of chat6 fails its checks, and
	// the IPv6 VIP is withdrawn as well.
	for _, s := range servers[l.Backends[1].Name] {
		s.Close()
	}
	took = awaitRoute(t, bird, l.VIP6)
	t.Logf("IPv6 VIP withdrawn %v after its last backend died", took.Round(time.Millisecond))
	// They come back: both VIPs are announced again, not before the delay.
	for _, be := range l.Backends {
		servers[be.Name] = serveEchoOn(t, be, l.VIP4, l.VIP6, be.Addr4, be.Addr6)
	}
	upAt := time.Now()
	waitFor(t, "both backends up", 10*time.Second, func() bool {
		s := service(t, api, netip.AddrPortFrom(l.VIP4, chatPort).String())
		return backendOf(t, s, l.Backends[0]).State == "active" && backendOf(t, s, l.Backends[1]).State == "active"
	})
	awaitRoute(t, bird, l.VIP4, l.Balancer.Addr4)
	awaitRoute(t, bird, l.VIP6, l.Balancer.Addr6)
	if again := time.Since(upAt); again < delay-200*time.Millisecond {
		t.Errorf("announced again %v after the backends came back, before the reannounce delay (%v)", again, delay)
	} else {
		t.Logf("announced again %v after the backends came back (reannounce_delay %v)", again.Round(time.Millisecond), delay)
	}

	// Drain: both withdrawn, and the host still forwards what reaches it
	// (a connection made straight to it, not through the router, keeps
	// echoing); undrain: both back at once.
	c := dialAllAt(t, l, l.ClientAddrs4[:1], netip.AddrPortFrom(l.VIP4, chatPort), 1)[0]
	if out := d.mustCLI("host", "drain"); !strings.Contains(out, "host drained") {
		t.Fatalf("host drain: %s", out)
	}
	awaitRoute(t, bird, l.VIP4)
	awaitRoute(t, bird, l.VIP6)
	if _, err := c.ws.Echo(context.Background(), "still here"); err != nil {
		t.Errorf("a connection stopped echoing when the host was drained: %v", err)
	}
	if st, _ := api.Status(context.Background()); st.BGP == nil || !st.BGP.Drained || len(st.BGP.Announced) != 0 {
		t.Errorf("status after drain: %+v", st.BGP)
	}
	fams := scrapeMetrics(t, l.Balancer, maddr)
	checkMetricNames(t, fams)
	for _, m := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"tether_bgp_drained", nil, 1},
		{"tether_bgp_session_up", map[string]string{"peer": router.Addr4.String()}, 1},
		{"tether_bgp_session_up", map[string]string{"peer": router.Addr6.String()}, 1},
		{"tether_bgp_vip_announced", map[string]string{"vip": l.VIP4.String()}, 0},
	} {
		if got := sample(t, fams, m.name, m.labels); got != m.want {
			t.Errorf("%s%v = %v, want %v", m.name, m.labels, got, m.want)
		}
	}
	if out := d.mustCLI("status"); !strings.Contains(out, "DRAINED") || !strings.Contains(out, "established") {
		t.Errorf("tether status after drain:\n%s", out)
	}
	undrained := time.Now()
	d.mustCLI("host", "undrain")
	awaitRoute(t, bird, l.VIP4, l.Balancer.Addr4)
	awaitRoute(t, bird, l.VIP6, l.Balancer.Addr6)
	if took := time.Since(undrained); took > delay {
		t.Errorf("undrain announced after %v: want at once, not after the reannounce delay", took)
	}

	c.ws.Close()

	// The clients reach the VIP through the router now, by the route BIRD
	// learned from tether and put in the router's kernel. Two restarts of
	// the daemon: with graceful restart the router keeps the route (stale)
	// while no daemon runs, the XDP program forwards on, and no connection
	// or echo is lost.
	routeThrough(t, l, router, l.Balancer)
	conns := dialAllAt(t, l, l.ClientAddrs4, netip.AddrPortFrom(l.VIP4, chatPort), 4)
	stop := make(chan struct{})
	missing := make(chan int, 1)
	go func() { // polls the router's route through the restarts
		n := 0
		defer func() { missing <- n }()
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			// Not announced(): no t.Fatal outside the test's goroutine.
			if routes, err := bird.Routes(); err != nil || len(routes[netip.PrefixFrom(l.VIP4, 32)]) == 0 {
				n++
			}
		}
	}()
	total := echoWhile(t, conns, func() {
		for i := range 2 {
			gap, _ := d.restart(l, tetherBin)
			t.Logf("restart %d: %v without a daemon", i+1, gap.Round(time.Millisecond))
			took := waitFor(t, "sessions established again", 15*time.Second, func() bool {
				st, err := api.Status(context.Background())
				return err == nil && st.BGP != nil && len(st.BGP.Peers) == 2 &&
					st.BGP.Peers[0].State == "established" && st.BGP.Peers[1].State == "established"
			})
			t.Logf("sessions established again %v after the restart", took.Round(time.Millisecond))
		}
	})
	close(stop)
	if n := <-missing; n > 0 {
		t.Errorf("the router had no route to the VIP at %d of its polls during the restarts", n)
	}
	t.Logf("%d connections through the router echoed %d messages through two restarts: none lost, the route never left", len(conns), total)
	if !strings.Contains(d.proc.Output(), "bgp: started") {
		t.Error("the restarted daemon started no speaker")
	}
	for _, c := range conns {
		c.ws.Close()
	}

	// A drain outlasts a restart: the daemon starts drained and announces
	// nothing until undrained.
	d.mustCLI("host", "drain")
	awaitRoute(t, bird, l.VIP4)
	d.restart(l, tetherBin)
	if !strings.Contains(d.proc.Output(), "host drained before this start") {
		t.Errorf("the restarted daemon does not say it starts drained:\n%s", d.proc.Output())
	}
	waitFor(t, "sessions established after the drained restart", 15*time.Second, func() bool {
		st, err := api.Status(context.Background())
		return err == nil && st.BGP != nil && len(st.BGP.Peers) == 2 && st.BGP.Peers[0].State == "established"
	})
	time.Sleep(delay + time.Second) // past the reannounce delay: it would have announced by now
	if st, _ := api.Status(context.Background()); st.BGP == nil || !st.BGP.Drained || len(st.BGP.Announced) != 0 {
		t.Errorf("status after a drained restart: %+v, want drained with nothing announced", st.BGP)
	}
	if got := announced(t, bird, l.VIP4); len(got) != 0 {
		t.Errorf("after a drained restart, the router routes the VIP to %v", got)
	}
	d.mustCLI("host", "undrain")
	awaitRoute(t, bird, l.VIP4, l.Balancer.Addr4)

	// To leave for good: drain, then stop. The routes are gone and stay
	// gone.
	d.mustCLI("host", "drain")
	awaitRoute(t, bird, l.VIP4)
	d.proc.Stop()
	time.Sleep(time.Second)
	if got := announced(t, bird, l.VIP4); len(got) != 0 {
		t.Errorf("after drain and stop, the router routes the VIP to %v", got)
	}
}
