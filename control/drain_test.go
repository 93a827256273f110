package control

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
)

// TestPacedDrain drains a backend with 40 connections, a deadline 1 s
// away and 20 closes a second, over the fake datapath: nothing closes
// before the deadline, then no faster than the rate, and all are closed
// within 40/20 s of it; the file keeps the deadline, the status counts
// down and then counts what was closed, and an undrain cancels it.
func TestPacedDrain(t *testing.T) {
	e := newAPIEnv(t, conf(8, 32, web4))
	ctx := context.Background()
	const (
		svc   = "203.0.113.10:80"
		conns = 40
		rate  = 20
	)
	s := serviceNamed(t, e, svc)
	var drained, other uint32
	for _, b := range s.Backends {
		switch b.Address {
		case "192.0.2.12:80":
			drained = b.ID
		case "192.0.2.11:80":
			other = b.ID
		}
	}
	vip := netip.MustParseAddrPort(svc)
	e.dp.mu.Lock()
	for i := range conns {
		e.dp.flows = append(e.dp.flows,
			datapath.Flow{Client: netip.AddrPortFrom(netip.MustParseAddr("198.51.100.1"), uint16(10000+i)), VIP: vip, Proto: 6, Service: s.ID, Backend: drained},
			datapath.Flow{Client: netip.AddrPortFrom(netip.MustParseAddr("198.51.100.2"), uint16(10000+i)), VIP: vip, Proto: 6, Service: s.ID, Backend: other})
	}
	e.dp.mu.Unlock()
	e.d.startPacer()
	defer e.d.stopPacer()

	for _, bad := range []BackendStateSpec{
		{Service: svc, Backend: "192.0.2.12", State: config.StateActive, CloseIn: "1s"},
		{Service: svc, Backend: "192.0.2.12", State: config.StateDraining, CloseRate: 5},
		{Service: svc, Backend: "192.0.2.12", State: config.StateDraining, CloseIn: "-1s"},
		{Service: svc, Backend: "192.0.2.12", State: config.StateDraining, CloseIn: "soon"},
	} {
		if _, err := e.cl.SetBackendState(ctx, bad); err == nil {
			t.Errorf("%+v was taken", bad)
		}
	}
	began := time.Now()
	r, err := e.cl.SetBackendState(ctx, BackendStateSpec{Service: svc, Backend: "192.0.2.12", State: config.StateDraining, CloseIn: "1s", CloseRate: rate})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(r.Message, "20 a second") {
		t.Errorf("drain said %q", r.Message)
	}
	b := e.onDisk(t).Services[0].Backends[1]
	if b.State != config.StateDraining || b.CloseRate != rate || b.CloseAt.Sub(began) < 900*time.Millisecond || b.CloseAt.Sub(began) > 1100*time.Millisecond {
		t.Fatalf("the file holds %+v, want draining, closing at %d a second from 1 s after %v", b, rate, began)
	}
	at := b.CloseAt
	dr := backendNamed(t, e, svc, "192.0.2.12:80").Drain
	if dr == nil || !dr.CloseAt.Equal(at) || dr.Rate != rate || dr.Closed != 0 {
		t.Fatalf("before the deadline the status shows the drain as %+v", dr)
	}

	want := at.Add(time.Duration(conns) * time.Second / rate)
	deadline := time.Now().Add(10 * time.Second)
	for {
		e.dp.mu.Lock()
		n := len(e.dp.closedAt)
		e.dp.mu.Unlock()
		if n >= conns || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	e.dp.mu.Lock()
	times := append([]time.Time(nil), e.dp.closedAt...)
	for _, f := range e.dp.flows {
		if f.Backend == other && f.Closing {
			t.Errorf("flow %s of the other backend was closed", f.Client)
		}
	}
	e.dp.mu.Unlock()
	if len(times) != conns {
		t.Fatalf("%d of %d connections closed", len(times), conns)
	}
	var lines []string
	for i, c := range times {
		lines = append(lines, fmt.Sprintf("%d:%v", i, c.Sub(at).Round(time.Millisecond)))
		if c.Before(at) {
			t.Errorf("connection %d closed %v before the deadline", i, at.Sub(c))
		}
		// The first closes at the deadline, each next one at most 1/rate
		// later; the pacer may have slept up to one extra close ahead.
		if early := at.Add(time.Duration(i-1) * time.Second / rate); c.Before(early) {
			t.Errorf("connection %d closed at %v after the deadline, faster than %d a second", i, c.Sub(at), rate)
		}
	}
	if last := times[len(times)-1]; last.After(want.Add(500 * time.Millisecond)) {
		t.Errorf("the last connection closed %v after the deadline, want about %v", last.Sub(at), want.Sub(at))
	}
	t.Logf("closed after the deadline: %s", strings.Join(lines, " "))
	if b := backendNamed(t, e, svc, "192.0.2.12:80"); b.Drain == nil || b.Drain.Closed != conns || b.ActiveConnections != 0 {
		t.Errorf("after the drain the status shows %d connections and the drain %+v, want 0 and %d closed", b.ActiveConnections, b.Drain, conns)
	}

	if _, err := e.cl.SetBackendState(ctx, BackendStateSpec{Service: svc, Backend: "192.0.2.12", State: config.StateActive}); err != nil {
		t.Fatal(err)
	}
	if b := e.onDisk(t).Services[0].Backends[1]; !b.CloseAt.IsZero() || b.CloseRate != 0 || b.State != config.StateActive {
		t.Errorf("after undrain the file holds %+v", b)
	}
	if dr := backendNamed(t, e, svc, "192.0.2.12:80").Drain; dr != nil {
		t.Errorf("after undrain the status shows a drain %+v", dr)
	}
}

func serviceNamed(t *testing.T, e *apiEnv, ref string) ServiceStatus {
	t.Helper()
	svcs, err := e.d.Services(ref)
	if err != nil || len(svcs) != 1 {
		t.Fatalf("services %s: %v, %v", ref, svcs, err)
	}
	return svcs[0]
}

func backendNamed(t *testing.T, e *apiEnv, ref, addr string) BackendStatus {
	t.Helper()
	for _, b := range serviceNamed(t, e, ref).Backends {
		if b.Address == addr {
			return b
		}
	}
	t.Fatalf("no backend %s in %s", addr, ref)
	return BackendStatus{}
}

// TestCountFlows checks the honest counts: a flow quiet for idle_after is
// idle, on a down backend lost; so is a down backend's flow whose client
// has since sent to another backend, and with source affinity an active
// backend's quiet flow whose client has (not a draining backend's);
// closing flows and other hosts' flows are not counted.
func TestCountFlows(t *testing.T) {
	cfg, err := config.Parse([]byte(conf(8, 32, strings.Replace(web4, "    backends:", "    idle_after: 10s\n    backends:", 1))))
	if err != nil {
		t.Fatal(err)
	}
	vip := netip.MustParseAddrPort("203.0.113.10:80")
	applied := []datapath.Service{{ID: 1, VIP: vip.Addr(), Port: vip.Port(), Proto: 6, Backends: []datapath.Backend{
		{ID: 11, State: datapath.Active}, {ID: 12, State: datapath.Down}, {ID: 13, State: datapath.Draining},
	}}}
	flow := func(client string, port uint16, be uint32, idle time.Duration) datapath.Flow {
		return datapath.Flow{Client: netip.AddrPortFrom(netip.MustParseAddr(client), port), VIP: vip, Proto: 6, Service: 1, Backend: be, Idle: idle}
	}
	closing := flow("198.51.100.9", 1, 11, 0)
	closing.Closing = true
	learned := flow("198.51.100.9", 2, 12, 0)
	learned.Learned = true
	flows := []datapath.Flow{
		flow("198.51.100.1", 1, 11, 0),              // active
		flow("198.51.100.2", 1, 11, 9*time.Second),  // active, nearly idle
		flow("198.51.100.3", 1, 11, 10*time.Second), // idle
		flow("198.51.100.4", 1, 13, time.Hour),      // idle on a draining backend
		flow("198.51.100.4", 2, 13, 0),              // active on a draining backend
		flow("198.51.100.5", 1, 12, 3*time.Second),  // down: its client moved to 11
		flow("198.51.100.5", 2, 11, time.Second),    //   (active there)
		flow("198.51.100.6", 1, 12, 0),              // down, still sending, client elsewhere but older
		flow("198.51.100.6", 2, 11, 5*time.Second),  //   (active there)
		flow("198.51.100.7", 1, 12, 10*time.Second), // down and quiet: lost
		flow("198.51.100.8", 1, 12, 2*time.Second),  // down, client nowhere else: active
		closing, learned,
	}
	// An active backend's quiet flow whose client moved since (a
	// backend that died and came back), and one whose client's newer
	// flow is as old: lost, active.
	flows = append(flows,
		flow("198.51.100.10", 1, 11, 3*time.Second), flow("198.51.100.10", 2, 13, 0),
		flow("198.51.100.11", 1, 11, time.Second), flow("198.51.100.11", 2, 13, 0),
		// A draining backend's quiet flow whose client moved: kept.
		flow("198.51.100.12", 1, 13, 5*time.Second), flow("198.51.100.12", 2, 11, 0))
	got := countFlows(flows, cfg, applied)
	want := map[idPair]flowCounts{
		{1, 11}: {active: 6, idle: 1, lost: 1},
		{1, 12}: {active: 2, lost: 2},
		{1, 13}: {active: 4, idle: 1},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("counts %v, want %v", got, want)
	}
}

// TestPacedDrainAfterRestart starts a daemon whose file holds a close_at
// that has passed, as a daemon restarted during a paced drain finds it:
// it closes the backend's connections at once, at the file's rate.
func TestPacedDrainAfterRestart(t *testing.T) {
	const rate = 50
	at := time.Now().Add(-time.Minute).UTC().Format(time.RFC3339)
	e := newAPIEnv(t, conf(8, 32, strings.Replace(web4, "      - address: 192.0.2.12\n",
		fmt.Sprintf("      - address: 192.0.2.12\n        state: draining\n        close_at: %s\n        close_rate: %d\n", at, rate), 1)))
	s := serviceNamed(t, e, "203.0.113.10:80")
	var drained uint32
	for _, b := range s.Backends {
		if b.Address == "192.0.2.12:80" {
			drained = b.ID
		}
	}
	e.dp.mu.Lock()
	for i := range 20 {
		e.dp.flows = append(e.dp.flows, datapath.Flow{Client: netip.AddrPortFrom(netip.MustParseAddr("198.51.100.1"), uint16(10000+i)),
			VIP: netip.MustParseAddrPort("203.0.113.10:80"), Proto: 6, Service: s.ID, Backend: drained})
	}
	e.dp.mu.Unlock()
	began := time.Now()
	e.d.startPacer()
	defer e.d.stopPacer()
	deadline := time.Now().Add(5 * time.Second)
	for {
		e.dp.mu.Lock()
		n := len(e.dp.closedAt)
		var last time.Time
		if n > 0 {
			last = e.dp.closedAt[n-1]
		}
		e.dp.mu.Unlock()
		if n == 20 {
			// 20 at 50 a second, the first at once: 0.38 s.
			if took := last.Sub(began); took < 370*time.Millisecond || took > time.Second {
				t.Errorf("20 connections closed in %v at %d a second, want about 380ms", took, rate)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of 20 connections closed after a restart past close_at", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
