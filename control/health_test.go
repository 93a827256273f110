package control

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/health"
)

// healthOverlay is a source of backend health for a Controller: the
// targets it holds are down, every other one up.
type healthOverlay struct {
	mu   sync.Mutex
	down map[health.Target]bool
}

func (h *healthOverlay) up(t health.Target) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return !h.down[t]
}

func (h *healthOverlay) set(t health.Target, up bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.down == nil {
		h.down = map[health.Target]bool{}
	}
	h.down[t] = !up
}

// target is the default tcp target of addr:port.
func target(addrPort string) health.Target {
	return health.Target{Addr: netip.MustParseAddrPort(addrPort), Check: config.DefaultHealth()}
}

// states returns the datapath state of each backend of s by address.
func states(s datapath.Service) map[string]datapath.State {
	out := map[string]datapath.State{}
	for _, b := range s.Backends {
		out[b.Addr.String()] = b.State
	}
	return out
}

// ringHolds reports whether backend id has a slot in s's ring.
func ringHolds(s datapath.Service, id uint32) bool {
	for _, r := range s.Ring {
		if r == id {
			return true
		}
	}
	return false
}

// A backend that its check takes down gets datapath.Down and leaves the
// ring; only the services probing it are upserted again; draining wins
// over down; every backend down leaves an empty ring; a service with
// health type none ignores health; and a backend that comes back returns.
func TestControllerHealth(t *testing.T) {
	dp := newFakeDP()
	// web4 and web4b share 192.0.2.11:80 with the same check; dns6 is
	// another backend set; unprobed has the same backend but no check.
	web4b := strings.NewReplacer("name: web4", "name: web4b", "203.0.113.10", "203.0.113.11",
		"address: 192.0.2.13\n", "{address: 192.0.2.13, state: draining}\n").Replace(web4) +
		"    on_down: reset\n"
	unprobed := strings.Replace(strings.Replace(web4, "name: web4", "name: unprobed", 1), "203.0.113.10", "203.0.113.12", 1) +
		"    health: {type: none}\n"
	cfg := parse(t, conf(8, 32, web4, web4b, dns6, unprobed))
	c := newController(dp, cfg)
	h := &healthOverlay{}
	c.SetHealth(h.up)
	mustApply(t, c, cfg)
	dp.take()
	if s := byName(t, c, "web4b"); !s.OnDownReset || byName(t, c, "web4").OnDownReset {
		t.Errorf("OnDownReset: web4b %v, web4 %v; want on_down reset on web4b only", s.OnDownReset, byName(t, c, "web4").OnDownReset)
	}

	// 192.0.2.11 goes down: web4 and web4b change, dns6 and unprobed do not.
	h.set(target("192.0.2.11:80"), false)
	if err := c.Refresh(target("192.0.2.11:80")); err != nil {
		t.Fatal(err)
	}
	calls := wantCalls(t, dp.take(), "upsert web4", "upsert web4b")
	for _, name := range []string{"web4", "web4b"} {
		s := calls[name].svc
		if st := states(s)["192.0.2.11"]; st != datapath.Down {
			t.Errorf("%s: 192.0.2.11 is %s, want down", name, st)
		}
		if ringHolds(s, s.Backends[0].ID) {
			t.Errorf("%s: the ring still holds the down backend", name)
		}
		checkRing(t, s, true)
	}
	if got := states(byName(t, c, "unprobed"))["192.0.2.11"]; got != datapath.Active {
		t.Errorf("unprobed (health type none): 192.0.2.11 is %s, want active", got)
	}

	// A refresh that changes nothing upserts nothing; nor does one of a
	// target nobody probes.
	if err := c.Refresh(target("192.0.2.11:80"), target("192.0.2.99:80")); err != nil {
		t.Fatal(err)
	}
	wantCalls(t, dp.take())

	// Draining wins over down: 192.0.2.13 of web4b stays draining.
	h.set(target("192.0.2.13:80"), false)
	if err := c.Refresh(target("192.0.2.13:80")); err != nil {
		t.Fatal(err)
	}
	calls = wantCalls(t, dp.take(), "upsert web4")
	if st := states(calls["web4"].svc)["192.0.2.13"]; st != datapath.Down {
		t.Errorf("web4: 192.0.2.13 is %s, want down", st)
	}
	if st := states(byName(t, c, "web4b"))["192.0.2.13"]; st != datapath.Draining {
		t.Errorf("web4b: the draining 192.0.2.13 is %s, want draining", st)
	}

	// Every backend of web4 down: its ring is empty.
	h.set(target("192.0.2.12:80"), false)
	if err := c.Refresh(target("192.0.2.12:80")); err != nil {
		t.Fatal(err)
	}
	calls = wantCalls(t, dp.take(), "upsert web4", "upsert web4b")
	s := calls["web4"].svc
	if Usable(s) {
		t.Errorf("web4 is usable with every backend down: %+v", s.Backends)
	}
	for i, id := range s.Ring {
		if id != 0 {
			t.Fatalf("web4: slot %d holds %d with every backend down", i, id)
		}
	}
	if Usable(calls["web4b"].svc) {
		t.Errorf("web4b is usable with its backends down or draining")
	}

	// Apply of the same configuration keeps the health.
	mustApply(t, c, clone(t, cfg))
	wantCalls(t, dp.take())

	// One comes back: it is in the ring again, alone.
	h.set(target("192.0.2.12:80"), true)
	if err := c.Refresh(target("192.0.2.12:80")); err != nil {
		t.Fatal(err)
	}
	calls = wantCalls(t, dp.take(), "upsert web4", "upsert web4b")
	s = calls["web4"].svc
	checkRing(t, s, true)
	if st := states(s); st["192.0.2.12"] != datapath.Active || st["192.0.2.11"] != datapath.Down {
		t.Errorf("web4 states %v", st)
	}
	dp.checkConflicts(t)
}

// listenAt listens on addr (a loopback address and a port, 0 for any).
func listenAt(t *testing.T, addr string) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return ln
}

// TestDaemonHealth runs a daemon's health checks against backends on
// loopback addresses: a backend whose listener closes goes down in status
// and out of the ring, with the reason, the latency and a transition
// counted, and comes back when it listens again; probes of a backend
// shared by two services with the same check run once; and the probed
// targets follow changes made through the API.
func TestDaemonHealth(t *testing.T) {
	ln2 := listenAt(t, "127.0.0.2:0")
	port := ln2.Addr().(*net.TCPAddr).Port
	ln3 := listenAt(t, fmt.Sprintf("127.0.0.3:%d", port))
	hc := "    health: {interval: 50ms, timeout: 40ms, rise: 2, fall: 2}\n"
	svc := func(name, vip string) string {
		return fmt.Sprintf("  - name: %s\n    vip: %s\n    port: %d\n%s    backends:\n      - address: 127.0.0.2\n      - address: 127.0.0.3\n",
			name, vip, port, hc)
	}
	// Loopback backends need the splice datapath's configuration (the fake
	// datapath serves any).
	e := newAPIEnv(t, strings.Replace(conf(8, 32, svc("a", "203.0.113.10"), svc("b", "203.0.113.11")), "datapath: xdp", "datapath: splice", 1))
	if err := e.d.StartHealth(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.d.Close)
	if err := e.d.StartHealth(); err == nil {
		t.Error("a second StartHealth succeeded")
	}
	ctx := context.Background()
	mon := e.d.mon.Load()
	if n := len(mon.All()); n != 2 {
		t.Errorf("the monitor probes %d targets, want 2 (two backends shared by two services)", n)
	}

	// waitState waits until backend addr of every service is in state.
	waitState := func(addr, state string) []ServiceStatus {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			svcs, err := e.cl.Services(ctx, "")
			if err != nil {
				t.Fatal(err)
			}
			ok := true
			for _, s := range svcs {
				for _, b := range s.Backends {
					if b.Address == addr && (b.State != state || b.Health.State != map[string]string{"active": HealthUp, "down": HealthDown}[state]) {
						ok = false
					}
				}
			}
			if ok {
				return svcs
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s is not %s after 5s: %+v", addr, state, svcs)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	be3 := fmt.Sprintf("127.0.0.3:%d", port)
	// Targets start up: wait for a first probe.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		all := mon.All()
		probed := len(all) == 2
		for _, s := range all {
			probed = probed && s.Probes > 0
		}
		if probed {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not every target probed after 5s: %v", all)
		}
	}
	svcs := waitState(be3, "active")
	if h := svcs[0].Backends[1].Health; h.Check != "tcp://"+be3 || h.LastResult != "ok" || h.Probes == 0 || h.LastLatency == "" {
		t.Errorf("health of a healthy backend: %+v", h)
	}
	if svcs[0].State != ServiceUp || svcs[0].Health.Type != "tcp" || svcs[0].Health.Interval != "50ms" || svcs[0].OnDown != "keep" {
		t.Errorf("service status: %+v", svcs[0])
	}

	// be3 stops listening: down, out of both rings, with the reason.
	ln3.Close()
	start := time.Now()
	svcs = waitState(be3, "down")
	t.Logf("127.0.0.3 down after %v", time.Since(start).Round(time.Millisecond))
	for _, s := range svcs {
		h := s.Backends[1].Health
		if h.LastResult != "connection refused" || h.Transitions != 1 || h.Failures < 2 {
			t.Errorf("%s: health of the down backend: %+v", s.Name, h)
		}
		if s.State != ServiceUp {
			t.Errorf("%s is %s with one backend up", s.Name, s.State)
		}
		as := byName(t, e.ctl, s.Name)
		if ringHolds(as, s.Backends[1].ID) || !ringHolds(as, s.Backends[0].ID) {
			t.Errorf("%s: the ring does not hold exactly the up backend", s.Name)
		}
	}
	st, err := e.cl.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if b := st.Services[0].Backends[1]; b.HealthTransitions != 1 || b.HealthFailures < 2 || b.HealthProbes < b.HealthFailures {
		t.Errorf("stats of the down backend: %+v", b)
	}

	// be2 too: both services are down, their rings empty.
	ln2.Close()
	svcs = waitState(fmt.Sprintf("127.0.0.2:%d", port), "down")
	for _, s := range svcs {
		if s.State != ServiceDown {
			t.Errorf("%s is %s with every backend down", s.Name, s.State)
		}
		for _, id := range byName(t, e.ctl, s.Name).Ring {
			if id != 0 {
				t.Fatalf("%s: the ring holds %d with every backend down", s.Name, id)
			}
		}
	}

	// be3 listens again: up after rise probes, and the services serve.
	listenAt(t, be3)
	svcs = waitState(be3, "active")
	for _, s := range svcs {
		if s.State != ServiceUp || s.Backends[1].Health.Transitions != 2 {
			t.Errorf("%s after 127.0.0.3 came back: %+v", s.Name, s)
		}
	}

	// Removing be3 from a: b still probes it, with its state; removing it
	// from b too forgets it.
	if _, err := e.cl.RemoveBackend(ctx, fmt.Sprintf("203.0.113.10:%d", port), "127.0.0.3"); err != nil {
		t.Fatal(err)
	}
	if n := len(mon.All()); n != 2 {
		t.Errorf("the monitor probes %d targets, want 2", n)
	}
	if _, err := e.cl.RemoveBackend(ctx, fmt.Sprintf("203.0.113.11:%d", port), "127.0.0.3"); err != nil {
		t.Fatal(err)
	}
	if all := mon.All(); len(all) != 1 {
		t.Errorf("the monitor probes %v, want 127.0.0.2 only", all)
	}
	// A check of another type is another target.
	if _, err := e.cl.AddService(ctx, ServiceSpec{VIP: fmt.Sprintf("203.0.113.12:%d", port), Name: "c"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.cl.AddBackend(ctx, BackendSpec{Service: fmt.Sprintf("203.0.113.12:%d", port), Backend: "127.0.0.2"}); err != nil {
		t.Fatal(err)
	}
	if all := mon.All(); len(all) != 2 {
		t.Errorf("the monitor probes %v, want 127.0.0.2 with two checks", all)
	}

	e.d.Close()
	e.d.Close()
}
