package health

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// The timings most tests use: fast enough for a short test, slow enough for
// the race detector on a loaded machine.
const (
	testInterval = 50 * time.Millisecond
	testTimeout  = 40 * time.Millisecond
	// slack is what a bound allows beyond the ideal, for scheduling delays.
	slack = 250 * time.Millisecond
)

// fast returns a check of the given type with the test timings.
func fast(typ string, rise, fall int) Check {
	return Check{Type: typ, Interval: testInterval, Timeout: testTimeout, Rise: rise, Fall: fall}.Defaults()
}

// event is one call of a Monitor's onChange.
type event struct {
	target Target
	status Status
	at     time.Time
}

// events sorts a Monitor's transitions by target.
type events struct {
	mu sync.Mutex
	by map[Target]chan event
}

// of returns the channel of target's transitions.
func (e *events) of(target Target) chan event {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.by[target] == nil {
		e.by[target] = make(chan event, 256)
	}
	return e.by[target]
}

// newMonitor returns a Monitor that logs to t and records its transitions;
// it is closed when the test ends. Register the servers a test probes
// before calling it, so that they close after it.
func newMonitor(t *testing.T) (*Monitor, *events) {
	t.Helper()
	ev := &events{by: make(map[Target]chan event)}
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	m := New(log, func(target Target, st Status) {
		select {
		case ev.of(target) <- event{target: target, status: st, at: time.Now()}:
		default: // the test stopped listening
		}
	})
	t.Cleanup(m.Close)
	return m, ev
}

// testWriter sends log lines to the test's log.
type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// set calls m.Set and fails the test on error.
func set(t testing.TB, m *Monitor, targets ...Target) {
	t.Helper()
	if err := m.Set(targets); err != nil {
		t.Fatalf("Set: %v", err)
	}
}

// waitEvent returns the next transition of target to up (or down); it
// fails the test after within.
func waitEvent(t testing.TB, events *events, target Target, up bool, within time.Duration) event {
	t.Helper()
	timeout := time.After(within)
	for {
		select {
		case ev := <-events.of(target):
			if ev.status.Up == up {
				return ev
			}
		case <-timeout:
			t.Fatalf("%s: no transition to up=%v within %v", target, up, within)
		}
	}
}

// waitStatus polls the status of target until cond holds and returns it;
// it fails the test after within.
func waitStatus(t testing.TB, m *Monitor, target Target, within time.Duration, what string, cond func(Status) bool) Status {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		st, ok := m.Status(target)
		if ok && cond(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not %s within %v; last status %+v (probed: %v)", target, what, within, st, ok)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// addrOf returns the address a listener is bound to.
func addrOf(t testing.TB, ln net.Listener) netip.AddrPort {
	t.Helper()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// serveTCP listens on addr and accepts and closes connections until the
// listener is closed, by the caller or when the test ends.
func serveTCP(t testing.TB, addr string) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	return acceptLoop(t, ln, func(c net.Conn) { c.Close() })
}

// serveSilent listens on loopback and accepts connections but never reads
// or writes them; they are closed when the test ends.
func serveSilent(t testing.TB) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return acceptLoop(t, ln, func(c net.Conn) {
		mu.Lock()
		defer mu.Unlock()
		conns = append(conns, c)
	})
}

// acceptLoop hands every connection accepted on ln to handle until ln is
// closed; the test's end closes ln and waits for the loop.
func acceptLoop(t testing.TB, ln net.Listener, handle func(net.Conn)) net.Listener {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			handle(c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	return ln
}

// serveHTTP starts an HTTP server on loopback, closed when the test ends.
func serveHTTP(t testing.TB, h http.HandlerFunc) netip.AddrPort {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return addrOf(t, srv.Listener)
}

// serveEcho starts a WebSocket server on loopback that sends every message
// back, or "something else" while mismatch is set.
func serveEcho(t testing.TB, mismatch *atomic.Bool) netip.AddrPort {
	t.Helper()
	return serveHTTP(t, func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		for {
			typ, msg, err := c.Read(r.Context())
			if err != nil {
				return
			}
			if mismatch != nil && mismatch.Load() {
				msg = []byte("something else")
			}
			if err := c.Write(r.Context(), typ, msg); err != nil {
				return
			}
		}
	})
}

// TestTCP takes a TCP backend down by closing its listener and brings it
// back by listening again, and measures how long each takes.
func TestTCP(t *testing.T) {
	t.Parallel()
	ln := serveTCP(t, "127.0.0.1:0")
	check := fast(TypeTCP, 2, 3)
	target := Target{Addr: addrOf(t, ln), Check: check}
	m, events := newMonitor(t)
	set(t, m, target)

	before := waitStatus(t, m, target, time.Second, "up after two probes", func(s Status) bool {
		return s.Up && s.Probes >= 2
	})
	if before.Failures != 0 || before.Transitions != 0 || before.Result.Reason != "ok" {
		t.Fatalf("healthy backend: status %+v", before)
	}

	closed := time.Now()
	ln.Close()
	down := waitEvent(t, events, target, false, 2*time.Second)
	took := down.at.Sub(closed)
	bound := time.Duration(check.Fall)*check.Interval + check.Timeout
	t.Logf("down %v after the listener closed (fall %d × interval %v + timeout %v = %v)",
		took, check.Fall, check.Interval, check.Timeout, bound)
	if r := down.status.Result.Reason; !strings.Contains(r, "refused") {
		t.Errorf("down: reason %q, want connection refused", r)
	}
	if n := down.status.Failures - before.Failures; n != uint64(check.Fall) {
		t.Errorf("down after %d failures, want fall = %d", n, check.Fall)
	}
	if took > bound+slack {
		t.Errorf("down after %v, want at most %v", took, bound+slack)
	}
	if down.status.Transitions != 1 || down.status.Since.Before(closed) {
		t.Errorf("down: status %+v", down.status)
	}

	var reopened time.Time
	for i := 0; ; i++ { // the port is free, unless another test grabbed it meanwhile
		ln2, err := net.Listen("tcp", target.Addr.String())
		if err == nil {
			acceptLoop(t, ln2, func(c net.Conn) { c.Close() })
			reopened = time.Now()
			break
		}
		if i == 20 {
			t.Fatalf("listen again on %s: %v", target.Addr, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	up := waitEvent(t, events, target, true, 2*time.Second)
	took = up.at.Sub(reopened)
	bound = time.Duration(check.Rise) * check.Interval
	t.Logf("up %v after listening again (rise %d × interval %v = %v)", took, check.Rise, check.Interval, bound)
	successes := (up.status.Probes - up.status.Failures) - (down.status.Probes - down.status.Failures)
	if successes != uint64(check.Rise) {
		t.Errorf("up after %d successes, want rise = %d", successes, check.Rise)
	}
	if took > bound+slack {
		t.Errorf("up after %v, want at most %v", took, bound+slack)
	}
	if up.status.Transitions != 2 || up.status.Result.Reason != "ok" {
		t.Errorf("up: status %+v", up.status)
	}
}

// TestTCPIPv6 probes a backend on [::1].
func TestTCPIPv6(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	acceptLoop(t, ln, func(c net.Conn) { c.Close() })
	addr := addrOf(t, ln)
	m, _ := newMonitor(t)
	tcp := Target{Addr: addr, Check: fast(TypeTCP, 1, 1)}
	closedPort := Target{Addr: netip.AddrPortFrom(addr.Addr(), closedPort(t, "[::1]:0")), Check: fast(TypeTCP, 1, 1)}
	set(t, m, tcp, closedPort)
	waitStatus(t, m, tcp, time.Second, "probed ok", func(s Status) bool { return s.Probes >= 1 && s.Result.OK })
	waitStatus(t, m, closedPort, time.Second, "down", func(s Status) bool {
		return !s.Up && strings.Contains(s.Result.Reason, "refused")
	})
}

// closedPort returns a port on which nothing listens: one that was just
// bound and released.
func closedPort(t testing.TB, addr string) uint16 {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	port := addrOf(t, ln).Port()
	ln.Close()
	return port
}

// TestHTTP judges statuses, with the default range and a custom one, and
// checks what the probe sends.
func TestHTTP(t *testing.T) {
	t.Parallel()
	var status atomic.Int32
	status.Store(http.StatusOK)
	type request struct{ host, uri, agent string }
	requests := make(chan request, 1024)
	addr := serveHTTP(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case requests <- request{r.Host, r.RequestURI, r.UserAgent()}:
		default:
		}
		if r.URL.Path == "/elsewhere" {
			t.Errorf("the probe followed a redirect")
		}
		code := int(status.Load())
		if code == http.StatusFound {
			w.Header().Set("Location", "/elsewhere")
		}
		w.WriteHeader(code)
		fmt.Fprintln(w, "a body the probe drains")
	})

	check := fast(TypeHTTP, 1, 2)
	check.Path = "/healthz?from=tether"
	check.Host = "app.example"
	dflt := Target{Addr: addr, Check: check}
	check.ExpectStatus = [2]int{500, 503}
	custom := Target{Addr: addr, Check: check}
	m, events := newMonitor(t)
	set(t, m, dflt, custom)

	st := waitStatus(t, m, dflt, time.Second, "probed", func(s Status) bool { return s.Probes >= 1 })
	if !st.Up || !st.Result.OK || st.Result.Reason != "ok" || st.Result.Latency <= 0 || st.Result.At.IsZero() {
		t.Errorf("200: status %+v", st)
	}
	req := <-requests
	if req != (request{"app.example", "/healthz?from=tether", userAgent}) {
		t.Errorf("request %+v", req)
	}
	// 200 is outside 500..503: the custom target goes down.
	if ev := waitEvent(t, events, custom, false, time.Second); ev.status.Result.Reason != "status 200" {
		t.Errorf("200 against 500..503: reason %q, want status 200", ev.status.Result.Reason)
	}

	status.Store(http.StatusServiceUnavailable)
	if ev := waitEvent(t, events, dflt, false, time.Second); ev.status.Result.Reason != "status 503" {
		t.Errorf("503: reason %q, want status 503", ev.status.Result.Reason)
	}
	if ev := waitEvent(t, events, custom, true, time.Second); ev.status.Result.Reason != "ok" {
		t.Errorf("503 against 500..503: reason %q, want ok", ev.status.Result.Reason)
	}

	// A redirect is a success by default, and is not followed.
	status.Store(http.StatusFound)
	waitEvent(t, events, dflt, true, time.Second)
	if ev := waitEvent(t, events, custom, false, time.Second); ev.status.Result.Reason != "status 302" {
		t.Errorf("302 against 500..503: reason %q, want status 302", ev.status.Result.Reason)
	}
}

// TestWebSocketHandshake probes a server that answers the Upgrade with 200:
// the websocket check fails, a tcp check of the same port does not.
func TestWebSocketHandshake(t *testing.T) {
	t.Parallel()
	addr := serveHTTP(t, func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "not a websocket")
	})
	ws := Target{Addr: addr, Check: fast(TypeWebSocket, 1, 1)}
	tcp := Target{Addr: addr, Check: fast(TypeTCP, 1, 1)}
	m, events := newMonitor(t)
	set(t, m, ws, tcp)

	ev := waitEvent(t, events, ws, false, time.Second)
	if r := ev.status.Result.Reason; r != "handshake: status 200, want 101" {
		t.Errorf("reason %q, want handshake: status 200, want 101", r)
	}
	waitStatus(t, m, tcp, time.Second, "up after three probes", func(s Status) bool { return s.Probes >= 3 })
	if st, _ := m.Status(tcp); !st.Up || st.Failures != 0 {
		t.Errorf("tcp check of the same port: status %+v", st)
	}
}

// TestWebSocketEcho probes a WebSocket echo server with and without a
// message, then makes it answer something else.
func TestWebSocketEcho(t *testing.T) {
	t.Parallel()
	var mismatch atomic.Bool
	addr := serveEcho(t, &mismatch)
	plain := Target{Addr: addr, Check: fast(TypeWebSocket, 1, 1)}
	check := fast(TypeWebSocket, 1, 1)
	check.Path = "/ws"
	check.Send = "tether-ping"
	echo := Target{Addr: addr, Check: check}
	m, events := newMonitor(t)
	set(t, m, plain, echo)

	for _, target := range []Target{plain, echo} {
		st := waitStatus(t, m, target, time.Second, "probed twice", func(s Status) bool { return s.Probes >= 2 })
		if !st.Up || st.Failures != 0 || st.Result.Reason != "ok" {
			t.Errorf("echo server: status %+v", st)
		}
		t.Logf("%s: latency %v", target, st.Result.Latency)
	}

	mismatch.Store(true)
	ev := waitEvent(t, events, echo, false, time.Second)
	if r := ev.status.Result.Reason; r != "echo mismatch" {
		t.Errorf("reason %q, want echo mismatch", r)
	}
	before, _ := m.Status(plain)
	waitStatus(t, m, plain, time.Second, "probed twice more", func(s Status) bool { return s.Probes >= before.Probes+2 })
	if st, _ := m.Status(plain); !st.Up || st.Failures != 0 {
		t.Errorf("websocket check without a message: status %+v", st)
	}

	mismatch.Store(false)
	waitEvent(t, events, echo, true, time.Second)
}

// TestTimeout probes a server that accepts connections and never answers:
// http and websocket probes fail with "timeout" after the timeout, a tcp
// probe succeeds.
func TestTimeout(t *testing.T) {
	t.Parallel()
	addr := addrOf(t, serveSilent(t))
	slow := func(typ string) Target {
		c := Check{Type: typ, Interval: 300 * time.Millisecond, Timeout: 100 * time.Millisecond, Rise: 1, Fall: 1}
		return Target{Addr: addr, Check: c.Defaults()}
	}
	httpT, wsT, tcpT := slow(TypeHTTP), slow(TypeWebSocket), slow(TypeTCP)
	m, events := newMonitor(t)
	start := time.Now()
	set(t, m, httpT, wsT, tcpT)

	for _, target := range []Target{httpT, wsT} {
		ev := waitEvent(t, events, target, false, 2*time.Second)
		res := ev.status.Result
		t.Logf("%s: down %v after Set, probe latency %v", target, ev.at.Sub(start), res.Latency)
		if res.Reason != "timeout" {
			t.Errorf("%s: reason %q, want timeout", target, res.Reason)
		}
		if res.Latency < target.Check.Timeout || res.Latency > target.Check.Timeout+slack {
			t.Errorf("%s: latency %v, want about the timeout %v", target, res.Latency, target.Check.Timeout)
		}
	}
	if st := waitStatus(t, m, tcpT, time.Second, "probed", func(s Status) bool { return s.Probes >= 1 }); !st.Result.OK {
		t.Errorf("tcp: status %+v", st)
	}
}

// TestSharing sets the same target twice, as two services probing one
// backend would: one prober runs, and the backend sees one probe per
// interval.
func TestSharing(t *testing.T) {
	t.Parallel()
	var hits, other atomic.Int64
	addr := serveHTTP(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/other" {
			other.Add(1)
		} else {
			hits.Add(1)
		}
	})
	// One service spells out the defaults, the other leaves them out.
	a := Target{Addr: addr, Check: fast(TypeHTTP, 2, 3)}
	b := Target{Addr: addr, Check: Check{Type: TypeHTTP, Interval: testInterval, Timeout: testTimeout}}
	c := Target{Addr: addr, Check: fast(TypeHTTP, 2, 3)}
	c.Check.Path = "/other"
	m, _ := newMonitor(t)
	set(t, m, a, b, c)

	if n := len(m.All()); n != 2 {
		t.Fatalf("%d probers, want 2: %v", n, m.All())
	}
	if sa, _ := m.Status(a); sa != must(m.Status(b)) {
		t.Errorf("equal targets with different statuses")
	}

	const intervals = 10
	waitStatus(t, m, a, time.Second, "probed twice", func(s Status) bool { return s.Probes >= 2 })
	h0, o0 := hits.Load(), other.Load()
	time.Sleep(intervals * testInterval)
	h, o := hits.Load()-h0, other.Load()-o0
	t.Logf("%d probes of the shared target and %d of the other in %d intervals", h, o, intervals)
	if h < intervals/2 || h > intervals+3 {
		t.Errorf("%d probes of the shared target in %d intervals, want about %d", h, intervals, intervals)
	}
	if o < intervals/2 || o > intervals+3 {
		t.Errorf("%d probes of the other target in %d intervals, want about %d", o, intervals, intervals)
	}
}

// must returns the status when the target is probed.
func must(st Status, ok bool) Status {
	if !ok {
		panic("target not probed")
	}
	return st
}

// TestSetReplaces replaces one target by another: the removed one stops,
// the kept one keeps its state through repeated Sets.
func TestSetReplaces(t *testing.T) {
	t.Parallel()
	var hitsA, hitsB atomic.Int64
	addrA := serveHTTP(t, func(http.ResponseWriter, *http.Request) { hitsA.Add(1) })
	addrB := serveHTTP(t, func(http.ResponseWriter, *http.Request) { hitsB.Add(1) })
	a := Target{Addr: addrA, Check: fast(TypeHTTP, 2, 3)}
	b := Target{Addr: addrB, Check: fast(TypeHTTP, 2, 3)}
	m, _ := newMonitor(t)

	set(t, m, a)
	waitStatus(t, m, a, time.Second, "probed", func(s Status) bool { return s.Probes >= 1 })
	set(t, m, b)
	stopped := hitsA.Load()
	if _, ok := m.Status(a); ok {
		t.Errorf("removed target still has a status")
	}
	first := waitStatus(t, m, b, time.Second, "probed", func(s Status) bool { return s.Probes >= 1 })
	for range 3 {
		set(t, m, b, b)
	}
	time.Sleep(4 * testInterval)
	if n := hitsA.Load(); n != stopped {
		t.Errorf("the removed prober probed %d more times", n-stopped)
	}
	st := must(m.Status(b))
	if st.Probes <= first.Probes || !st.Since.Equal(first.Since) || int64(st.Probes) > hitsB.Load() {
		t.Errorf("kept target lost its state: was %+v, now %+v (%d requests)", first, st, hitsB.Load())
	}

	// An invalid target is refused and changes nothing.
	bad := Target{Addr: addrA, Check: Check{Type: "icmp"}}
	if err := m.Set([]Target{a, bad}); err == nil || !strings.Contains(err.Error(), "health.type") {
		t.Errorf("Set with an invalid target: error %v", err)
	}
	if all := m.All(); len(all) != 1 {
		t.Errorf("after a refused Set: %v", all)
	}
	if err := m.Set([]Target{{Check: fast(TypeTCP, 1, 1)}}); err == nil {
		t.Errorf("Set with no address: no error")
	}

	m.Close()
	m.Close()
	if err := m.Set([]Target{b}); !errors.Is(err, ErrClosed) {
		t.Errorf("Set after Close: error %v, want ErrClosed", err)
	}
}

// TestCloseLeavesNoGoroutines runs every kind of probe, some of them stuck
// in a timeout, and closes the Monitor: every goroutine it started ends.
// It does not run in parallel, to count goroutines.
func TestCloseLeavesNoGoroutines(t *testing.T) {
	tcpAddr := addrOf(t, serveTCP(t, "127.0.0.1:0"))
	httpAddr := serveHTTP(t, func(http.ResponseWriter, *http.Request) {})
	wsAddr := serveEcho(t, nil)
	silent := addrOf(t, serveSilent(t))
	refused := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), closedPort(t, "127.0.0.1:0"))

	echo := fast(TypeWebSocket, 2, 3)
	echo.Send = "ping"
	targets := []Target{
		{Addr: tcpAddr, Check: fast(TypeTCP, 2, 3)},
		{Addr: httpAddr, Check: fast(TypeHTTP, 2, 3)},
		{Addr: wsAddr, Check: fast(TypeWebSocket, 2, 3)},
		{Addr: wsAddr, Check: echo},
		{Addr: refused, Check: fast(TypeTCP, 2, 3)},
		{Addr: refused, Check: fast(TypeHTTP, 2, 3)},
		{Addr: silent, Check: fast(TypeHTTP, 2, 3)},
		{Addr: silent, Check: fast(TypeWebSocket, 2, 3)},
	}
	time.Sleep(10 * time.Millisecond) // let the servers' goroutines settle
	baseline := runtime.NumGoroutine()

	m := New(nil, nil)
	if err := m.Set(targets); err != nil {
		t.Fatal(err)
	}
	for _, target := range targets {
		waitStatus(t, m, target, time.Second, "probed", func(s Status) bool { return s.Probes >= 1 })
	}
	if n := runtime.NumGoroutine(); n < baseline+len(targets) {
		t.Errorf("%d goroutines with %d probers, baseline %d", n, len(targets), baseline)
	}
	start := time.Now()
	m.Close()
	t.Logf("Close took %v", time.Since(start))
	if took := time.Since(start); took > testTimeout+slack {
		t.Errorf("Close took %v", took)
	}

	deadline := time.Now().Add(2 * time.Second)
	for runtime.NumGoroutine() > baseline {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines after Close, baseline %d:\n%s",
				runtime.NumGoroutine(), baseline, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestStateMachine feeds sequences of results to the state of a target.
func TestStateMachine(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name        string
		rise, fall  int
		results     string // o: success, x: failure
		up          bool
		transitions uint64
	}{
		{"starts up", 2, 3, "", true, 0},
		{"fewer failures than fall stay up", 2, 3, "xx", true, 0},
		{"a success resets the failures", 2, 3, "xxoxx", true, 0},
		{"fall failures take it down", 2, 3, "xxx", false, 1},
		{"fall 1", 1, 1, "ox", false, 1},
		{"fewer successes than rise stay down", 2, 3, "xxxo", false, 1},
		{"a failure resets the successes", 3, 3, "xxxooxoo", false, 1},
		{"rise successes bring it up", 2, 3, "xxxoo", true, 2},
		{"flapping", 1, 1, "xoxo", true, 4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := Check{Rise: tt.rise, Fall: tt.fall}
			s := state{status: Status{Up: true}}
			var failures uint64
			for _, r := range tt.results {
				s.record(Result{OK: r == 'o'}, c, time.Now())
				if r == 'x' {
					failures++
				}
			}
			st := s.status
			if st.Up != tt.up || st.Transitions != tt.transitions ||
				st.Probes != uint64(len(tt.results)) || st.Failures != failures {
				t.Errorf("after %q: %+v, want up=%v transitions=%d", tt.results, st, tt.up, tt.transitions)
			}
		})
	}
}

// TestDefaults checks the defaults of each type.
func TestDefaults(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in, want Check
	}{
		{Check{}, Check{Type: TypeTCP, Interval: 2 * time.Second, Timeout: time.Second, Rise: 2, Fall: 3}},
		{Check{Type: TypeHTTP}, Check{Type: TypeHTTP, Path: "/", ExpectStatus: [2]int{200, 399},
			Interval: 2 * time.Second, Timeout: time.Second, Rise: 2, Fall: 3}},
		{Check{Type: TypeWebSocket, Path: "/ws"}, Check{Type: TypeWebSocket, Path: "/ws",
			Interval: 2 * time.Second, Timeout: time.Second, Rise: 2, Fall: 3}},
		// A short interval shortens the default timeout.
		{Check{Interval: 500 * time.Millisecond, Rise: 1}, Check{Type: TypeTCP,
			Interval: 500 * time.Millisecond, Timeout: 250 * time.Millisecond, Rise: 1, Fall: 3}},
	}
	for _, tt := range tests {
		got := tt.in.Defaults()
		if got != tt.want {
			t.Errorf("%+v.Defaults() = %+v, want %+v", tt.in, got, tt.want)
		}
		if err := got.Validate(); err != nil {
			t.Errorf("%+v.Validate(): %v", got, err)
		}
	}
}

// TestValidate checks that every problem names its field.
func TestValidate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		check Check
		want  string // the start of the error, the field's name
	}{
		{"unknown type", Check{Type: "icmp"}, `health.type: must be "tcp", "http", "websocket" or "udp", not "icmp"`},
		{"no interval", Check{Interval: -1}, "health.interval: must be > 0"},
		{"short interval", Check{Interval: time.Millisecond, Timeout: time.Microsecond}, "health.interval: must be at least 10ms"},
		{"no timeout", Check{Timeout: -time.Second}, "health.timeout: must be > 0"},
		{"timeout as long as the interval", Check{Interval: time.Second, Timeout: time.Second}, "health.timeout: must be less than the interval (1s)"},
		{"rise", Check{Rise: -1}, "health.rise: must be >= 1"},
		{"fall", Check{Fall: -2}, "health.fall: must be >= 1"},
		{"relative path", Check{Type: TypeHTTP, Path: "healthz"}, "health.path: must start with /"},
		{"path with a space", Check{Type: TypeHTTP, Path: "/a b"}, "health.path: must be a request path"},
		{"path of tcp", Check{Path: "/"}, "health.path: only for http and websocket checks"},
		{"host with a space", Check{Type: TypeWebSocket, Host: "a b"}, "health.host: must be a host name"},
		{"host of tcp", Check{Host: "app.example"}, "health.host: only for http and websocket checks"},
		{"status range reversed", Check{Type: TypeHTTP, ExpectStatus: [2]int{399, 200}}, "health.expect_status: must be a range"},
		{"status out of range", Check{Type: TypeHTTP, ExpectStatus: [2]int{200, 600}}, "health.expect_status: must be a range"},
		{"status range of websocket", Check{Type: TypeWebSocket, ExpectStatus: [2]int{101, 101}}, "health.expect_status: only for http checks"},
		{"send of http", Check{Type: TypeHTTP, Send: "ping"}, "health.send: only for websocket and udp checks"},
		{"path of udp", Check{Type: TypeUDP, Path: "/"}, "health.path: only for http and websocket checks"},
		{"long send", Check{Type: TypeWebSocket, Send: strings.Repeat("x", maxSend+1)}, "health.send: must be at most 4096 bytes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.check.Defaults().Validate()
			if err == nil || !strings.HasPrefix(err.Error(), tt.want) {
				t.Fatalf("Validate() = %v, want %q...", err, tt.want)
			}
			var fe *FieldError
			if !errors.As(err, &fe) || !strings.HasPrefix(tt.want, "health."+fe.Field+":") {
				t.Errorf("error %v: FieldError %+v does not name the field", err, fe)
			}
		})
	}

	// Every problem is reported, each as a FieldError.
	err := Check{Type: TypeTCP, Interval: -1, Timeout: -1, Rise: 0, Fall: 0}.Validate()
	joined, ok := err.(interface{ Unwrap() []error })
	if !ok || len(joined.Unwrap()) != 4 {
		t.Errorf("four problems: %v", err)
	}
}

// TestConnectionClosed probes a server that closes every connection as soon
// as it accepts it: the tcp probe succeeds, the others fail with a reason
// that says the connection went away.
func TestConnectionClosed(t *testing.T) {
	t.Parallel()
	addr := addrOf(t, serveTCP(t, "127.0.0.1:0"))
	httpT := Target{Addr: addr, Check: fast(TypeHTTP, 1, 1)}
	wsT := Target{Addr: addr, Check: fast(TypeWebSocket, 1, 1)}
	tcpT := Target{Addr: addr, Check: fast(TypeTCP, 1, 1)}
	m, events := newMonitor(t)
	set(t, m, httpT, wsT, tcpT)
	for _, target := range []Target{httpT, wsT} {
		ev := waitEvent(t, events, target, false, time.Second)
		if r := ev.status.Result.Reason; r != "connection closed" && r != "connection reset" {
			t.Errorf("%s: reason %q, want connection closed or reset", target, r)
		}
	}
	if st := waitStatus(t, m, tcpT, time.Second, "probed", func(s Status) bool { return s.Probes >= 2 }); !st.Up || st.Failures != 0 {
		t.Errorf("tcp: status %+v", st)
	}
}

// TestUDP probes UDP backends directly (no Monitor): a server that answers
// passes; a closed port fails with "port unreachable" (the ICMP error the
// kernel reports on the connected socket); a server that stays silent
// passes without Send and fails with it.
func TestUDP(t *testing.T) {
	t.Parallel()
	serve := func(answer bool) netip.AddrPort {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close() })
		go func() {
			buf := make([]byte, 2048)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				if answer {
					pc.WriteTo(append([]byte("re: "), buf[:n]...), from)
				}
			}
		}()
		return pc.LocalAddr().(*net.UDPAddr).AddrPort()
	}
	echo, silent := serve(true), serve(false)
	// A port that was bound and closed: nothing listens there.
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := pc.LocalAddr().(*net.UDPAddr).AddrPort()
	pc.Close()

	check := Check{Type: TypeUDP, Interval: time.Second, Timeout: 200 * time.Millisecond, Rise: 1, Fall: 1}
	withSend := check
	withSend.Send = "ping"
	for _, tc := range []struct {
		desc   string
		addr   netip.AddrPort
		check  Check
		ok     bool
		reason string
	}{
		{"an answering server, nothing sent", echo, check, true, "ok"},
		{"an answering server, ping sent", echo, withSend, true, "ok"},
		{"a closed port", closed, check, false, "port unreachable"},
		{"a closed port, ping sent", closed, withSend, false, "port unreachable"},
		{"a silent server, nothing sent", silent, check, true, "ok"},
		{"a silent server, ping sent", silent, withSend, false, "no reply"},
	} {
		if err := tc.check.Validate(); err != nil {
			t.Fatal(err)
		}
		r := probe(context.Background(), plain(Target{Addr: tc.addr, Check: tc.check}))
		if r.OK != tc.ok || r.Reason != tc.reason {
			t.Errorf("%s: probe ok %v reason %q, want %v %q", tc.desc, r.OK, r.Reason, tc.ok, tc.reason)
		}
	}
}

// TestEditIsSet edits a monitor's targets hundreds of times as changes of
// a few backends do (Edit: the targets of the changed backends before
// and after, one of them listed twice, as backends that several services
// share are) and wants the probers Set would have: the same targets, with
// those that stayed listed never restarted. Targets are closed ports on
// loopback.
func TestEditIsSet(t *testing.T) {
	port := closedPort(t, "127.0.0.1:0")
	target := func(i int) Target {
		return Target{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, byte(1 + i%5)}), port), Check: Check{Type: TypeTCP, Interval: time.Hour, Timeout: testTimeout}}
	}
	m := New(nil, nil)
	defer m.Close()
	r := rand.New(rand.NewPCG(9, 10))
	var listed []Target // what the configuration lists, repeats included
	for round := range 300 {
		before := m.All()
		var remove, add []Target
		for range r.IntN(3) {
			if len(listed) > 0 {
				k := r.IntN(len(listed))
				remove = append(remove, listed[k])
				listed = slices.Delete(listed, k, k+1)
			}
		}
		for range r.IntN(3) {
			t := target(r.IntN(8))
			add = append(add, t)
			listed = append(listed, t)
		}
		if err := m.Edit(remove, add); err != nil {
			t.Fatal(err)
		}
		want := map[Target]bool{}
		for _, t := range listed {
			want[t.withDefaults()] = true
		}
		got := m.All()
		if len(got) != len(want) {
			t.Fatalf("round %d: %d probers, want %d", round, len(got), len(want))
		}
		for tg, st := range got {
			if !want[tg] {
				t.Fatalf("round %d: %s probed, not listed", round, tg)
			}
			if old, ok := before[tg]; ok && old.Since != st.Since {
				t.Fatalf("round %d: %s was started again", round, tg)
			}
		}
	}
	// Set agrees, and Edit goes on from it.
	set(t, m, listed...)
	if err := m.Edit(listed, nil); err != nil {
		t.Fatal(err)
	}
	if n := len(m.All()); n != 0 {
		t.Errorf("%d probers after every listed target was removed", n)
	}
}

// TestVIPPath: a target with a VIP is probed at the VIP, from the source
// its PathFunc gives; when that fails, the reason says whether the backend
// answers on its own address. A zero Path probes the backend's address, an
// error fails the probe with it, and a Monitor without a PathFunc probes
// the backend's address.
func TestVIPPath(t *testing.T) {
	backend := addrOf(t, serveTCP(t, "127.0.0.1:0"))
	// The "VIP" listens on 127.0.0.2 only; a probe from 127.0.0.3 shows the
	// source address is the path's.
	froms := make(chan netip.Addr, 16)
	vipLn, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	vip := addrOf(t, acceptLoop(t, vipLn, func(c net.Conn) {
		froms <- c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr()
		c.Close()
	}))
	dead := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), closedPort(t, "127.0.0.2:0"))
	deadBackend := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), closedPort(t, "127.0.0.1:0"))
	src := netip.MustParseAddr("127.0.0.3")
	via := fast(TypeTCP, 1, 1)
	via.Via = ViaVIP
	for _, tc := range []struct {
		desc       string
		target     Target
		path       Path
		err        error
		ok         bool
		wantReason string
	}{
		{"VIP answers", Target{Addr: deadBackend, Check: via, VIP: vip, Protocol: "tcp"}, Path{Source: src}, nil, true, "ok"},
		{"VIP silent, backend answers", Target{Addr: backend, Check: via, VIP: dead, Protocol: "tcp"}, Path{Source: src}, nil, false,
			"connection refused on the VIP path; the backend answers on its own address"},
		{"VIP silent, first failure", Target{Addr: backend, Check: via, VIP: dead, Protocol: "tcp"}, Path{Source: src}, nil, false,
			"connection refused on the VIP path"},
		{"neither answers", Target{Addr: deadBackend, Check: via, VIP: dead, Protocol: "tcp"}, Path{Source: src}, nil, false,
			"connection refused on the VIP path; connection refused on its own address too"},
		{"zero path: the backend's address", Target{Addr: backend, Check: via, VIP: dead, Protocol: "tcp"}, Path{}, nil, true, "ok"},
		{"no path", Target{Addr: backend, Check: via, VIP: vip, Protocol: "tcp"}, Path{}, errors.New("backend 127.0.0.1 is not resolved"), false,
			"VIP path: backend 127.0.0.1 is not resolved"},
	} {
		m := New(nil, nil)
		m.SetPath(func(got Target) (Path, error) {
			if got != tc.target {
				t.Errorf("%s: PathFunc called with %v, want %v", tc.desc, got, tc.target)
			}
			return tc.path, tc.err
		})
		r := m.probe(context.Background(), tc.target, tc.desc != "VIP silent, first failure")
		if r.OK != tc.ok || r.Reason != tc.wantReason {
			t.Errorf("%s: ok %v reason %q, want %v %q", tc.desc, r.OK, r.Reason, tc.ok, tc.wantReason)
		}
		if tc.desc == "VIP answers" {
			select {
			case from := <-froms:
				if from != src {
					t.Errorf("%s: the VIP saw the probe from %s, want %s", tc.desc, from, src)
				}
			case <-time.After(time.Second):
				t.Errorf("%s: the VIP saw no probe", tc.desc)
			}
		}
		m.Close()
	}
	// Without a PathFunc, the backend's own address.
	m := New(nil, nil)
	defer m.Close()
	if r := m.probe(context.Background(), Target{Addr: backend, Check: via, VIP: dead, Protocol: "tcp"}, false); !r.OK {
		t.Errorf("no PathFunc: %q, want the backend's address probed", r.Reason)
	}
	// A udp check via the VIP must send something the service answers.
	silent := fast(TypeUDP, 1, 1)
	silent.Via = ViaVIP
	if err := silent.Validate(); err == nil || !strings.Contains(err.Error(), "needs send") {
		t.Errorf("a udp check via the VIP without send: %v, want it refused", err)
	}
	// A VIP goes with via vip only.
	if err := m.Set([]Target{{Addr: backend, Check: fast(TypeTCP, 1, 1), VIP: vip}}); err == nil {
		t.Error("Set took a VIP with a check via the backend")
	}
	if err := m.Set([]Target{{Addr: backend, Check: via}}); err == nil {
		t.Error("Set took a check via vip without a VIP")
	}
}
