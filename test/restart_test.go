package test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/maps"
)

// labPinDir is where the daemons of a lab pin their state: in the lab's
// own bpffs, which the lab unmounts when it closes.
func labPinDir(l *lab.Lab) string { return filepath.Join(l.BPFFS, "tether") }

// restart stops the daemon with SIGTERM, starts bin with the same
// arguments and waits until it is ready. It returns how long the balancer
// ran without a daemon, from the old one's last log line to the new one's
// "ready", and how long the whole restart took.
func (d *daemon) restart(l *lab.Lab, bin string) (gap, total time.Duration) {
	d.t.Helper()
	start := time.Now()
	old := d.proc
	if err := old.Stop(); err != nil {
		d.t.Fatal(err)
	}
	if err := old.Err(); err != nil || !strings.Contains(old.Output(), "XDP program left attached and forwarding") || !strings.Contains(old.Output(), "msg=stopped") {
		d.t.Fatalf("tether did not stop cleanly (%v):\n%s", err, old.Output())
	}
	d.t.Cleanup(func() {
		if d.t.Failed() {
			d.t.Logf("output of a tether stopped by restart:\n%s", old.Output())
		}
	})
	p, err := d.host.Start(bin, d.args...)
	if err != nil {
		d.t.Fatal(err)
	}
	d.proc = p
	d.waitLog("msg=ready", 15*time.Second)
	total = time.Since(start)
	return logTime(d.t, p.Output(), "msg=ready").Sub(logTime(d.t, old.Output(), "msg=stopped")), total
}

// logTime returns the time of the first line of a text log that holds s.
func logTime(t testing.TB, log, s string) time.Time {
	t.Helper()
	for _, line := range strings.Split(log, "\n") {
		if !strings.Contains(line, s) {
			continue
		}
		stamp, _, _ := strings.Cut(strings.TrimPrefix(line, "time="), " ")
		at, err := time.Parse(time.RFC3339Nano, stamp)
		if err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		return at
	}
	t.Fatalf("no log line holds %q:\n%s", s, log)
	return time.Time{}
}

// echoer sends numbered messages on one connection every interval, two at
// a time, and checks that each comes back, in order, from the connection's
// backend.
type echoer struct {
	c      *conn
	wait   time.Duration // how long one exchange may take (0: 5 s)
	echoes int           // replies received in order
	err    error         // the first failure
	worst  float64       // longest round trip, in milliseconds
}

func (e *echoer) run(stop <-chan struct{}, interval time.Duration) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for seq := 0; ; seq += 2 {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		wait := e.wait
		if wait == 0 {
			wait = 5 * time.Second
		}
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		start := time.Now()
		err := e.exchange(ctx, seq)
		cancel()
		if err != nil {
			e.err = fmt.Errorf("connection from %s (backend %s), after %d echoes: %w", e.c.src, e.c.backend, e.echoes, err)
			return
		}
		if ms := float64(time.Since(start).Microseconds()) / 1000; ms > e.worst {
			e.worst = ms
		}
	}
}

// exchange sends messages seq and seq+1 and reads both replies.
func (e *echoer) exchange(ctx context.Context, seq int) error {
	for _, s := range []int{seq, seq + 1} {
		if err := e.c.ws.Send(ctx, fmt.Sprintf("seq %d", s)); err != nil {
			return err
		}
	}
	for _, s := range []int{seq, seq + 1} {
		backend, msg, err := e.c.ws.Receive(ctx)
		if err != nil {
			return err
		}
		if want := fmt.Sprintf("seq %d", s); msg != want {
			return fmt.Errorf("got %q, want %q: an echo was lost or reordered", msg, want)
		}
		if backend != e.c.backend {
			return fmt.Errorf("echo %d came from %s, the connection started on %s", s, backend, e.c.backend)
		}
		e.echoes++
	}
	return nil
}

// echoAlong starts an echoer on every connection; stop ends them and
// waits for them (once, however often it is called).
func echoAlong(conns []*conn, interval time.Duration) (echoers []*echoer, stop func()) {
	echoers = make([]*echoer, len(conns))
	done := make(chan struct{})
	var wg sync.WaitGroup
	for i, c := range conns {
		echoers[i] = &echoer{c: c}
		wg.Go(func() { echoers[i].run(done, interval) })
	}
	return echoers, sync.OnceFunc(func() { close(done); wg.Wait() })
}

// checkEchoes fails the test for every echoer that failed and unless each
// echoed at least once per tick of interval over elapsed (two echoes a
// tick: half of them, as a ticker drops the ticks of a slow exchange),
// and logs what they did.
func checkEchoes(t *testing.T, echoers []*echoer, elapsed, interval time.Duration) {
	t.Helper()
	total, least, worst := 0, -1, 0.0
	for _, e := range echoers {
		if e.err != nil {
			t.Error(e.err)
			continue
		}
		total += e.echoes
		if least < 0 || e.echoes < least {
			least = e.echoes
		}
		worst = max(worst, e.worst)
	}
	if want := int(elapsed / interval); least < want {
		t.Errorf("a connection echoed %d times in %v, want at least %d", least, elapsed.Round(time.Millisecond), want)
	}
	t.Logf("%d echoes in order over %v (every connection at least %d), longest round trip %.1f ms", total, elapsed.Round(time.Millisecond), least, worst)
}

// tables counts the connection and affinity entries the balancer holds.
func tables(t *testing.T, l *lab.Lab) (conns, affinities int) {
	t.Helper()
	conns, affinities, err := daemonMaps(t, l, testRing).Entries()
	if err != nil {
		t.Fatal(err)
	}
	return conns, affinities
}

// buildVersion builds tether with another version string: the "new
// release" of an upgrade.
func buildVersion(t *testing.T, version string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "tether-"+version)
	build := exec.Command("go", "build", "-ldflags", "-X main.version="+version, "-o", bin, "github.com/tetherlb/tether/cmd/tether")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v\n%s", version, err, out)
	}
	out, err := exec.Command(bin, "version").CombinedOutput()
	if err != nil || !strings.Contains(string(out), version) {
		t.Fatalf("%s version: %v %s", bin, err, out)
	}
	return bin
}

// TestRestartKeepsConnections holds 200 WebSocket connections from 100
// client addresses (and 20 over IPv6), each echoing two numbered messages
// every 100 ms, while tether is stopped with SIGTERM and started again
// twice and then replaced by a newly built binary: no connection closes, no echo is lost or out of
// order, every client keeps its backend, the tables are not emptied and
// the same configuration gets the same ids and rings. With no daemon the
// balancer still forwards; pinned state of other table sizes is refused;
// `tether detach` removes the program and the pins; `tether run --clean`
// starts afresh and leaves nothing.
//
// XDP only, unlike the datapath, control-plane and health scenarios, which
// run over both datapaths (forEachDatapath): a splice daemon holds its
// proxied connections in its own sockets, so a restart of it ends them by
// nature; pinned maps and `tether detach` are XDP's too.
func TestRestartKeepsConnections(t *testing.T) {
	const (
		clients  = 100
		interval = 100 * time.Millisecond
		settle   = time.Second // echoing between restarts
	)
	v2 := buildVersion(t, "restart-test-v2")
	l := lab.NewT(t, lab.Options{Backends: 3, Clients: clients})
	for _, be := range l.Backends {
		serveEcho(t, l, be)
	}
	cfg := chatConfig(l, l.Backends)
	d := startDaemon(t, l, cfg)
	pinDir := labPinDir(l)

	conns := dialAll(t, l, l.ClientAddrs4, l.VIP4, connsPerC)
	owner := backendsByClient(t, conns)
	conns6 := dialAll(t, l, l.ClientAddrs6[:20], l.VIP6, 1)
	m := daemonMaps(t, l, testRing)
	ids := backendIDs(t, m)
	chat := serviceID(t, m, l.VIP4)
	ring, err := m.Ring(chat)
	if err != nil {
		t.Fatal(err)
	}
	affinity := affinityByClient(t, m, chat, l.ClientAddrs4)
	conns0, aff0 := tables(t, l)
	all := append(append([]*conn{}, conns...), conns6...)
	if conns0 < len(all) || aff0 < clients+len(conns6) {
		t.Fatalf("before the restarts the tables hold %d flows and %d affinity entries, want at least %d and %d", conns0, aff0, len(all), clients+len(conns6))
	}
	t.Logf("%d IPv4 connections from %d clients and %d IPv6 ones; tables: %d flows, %d affinity entries", len(conns), clients, len(conns6), conns0, aff0)

	// Echo on every connection through three restarts.
	echoers, stopEchoes := echoAlong(all, interval)
	defer stopEchoes()
	progs := []uint32{balancerXDP(t, l)}
	// The balancer does not forward: an IPv4 packet for a VIP that XDP did
	// not take would reach its stack and be dropped there, received but
	// not delivered. (The balancer's own traffic, such as the answers to
	// its health probes, is delivered.)
	missed := func() uint64 {
		n := snmpCounters(t, l.Balancer, "Ip", "InReceives", "InDelivers")
		return n[0] - n[1]
	}
	stack0 := missed()
	began := time.Now()
	for i, bin := range []string{tetherBin, tetherBin, v2} {
		time.Sleep(settle)
		gap, total := d.restart(l, bin)
		progs = append(progs, balancerXDP(t, l))
		out := d.proc.Output()
		for _, want := range []string{"msg=\"adopted pinned state\"", "replaced the program of the pinned link in place"} {
			if !strings.Contains(out, want) {
				t.Errorf("restart %d: the new daemon did not log %s", i+1, want)
			}
		}
		if bin == v2 && !strings.Contains(out, "version=restart-test-v2") {
			t.Errorf("restart %d: the new daemon does not report version restart-test-v2", i+1)
		}
		t.Logf("restart %d (%s): %v without a daemon, %v from SIGTERM to ready", i+1, filepath.Base(bin), gap.Round(time.Millisecond), total.Round(time.Millisecond))
	}
	time.Sleep(settle)
	stopEchoes()
	elapsed := time.Since(began)
	if n := missed() - stack0; n != 0 {
		t.Errorf("%d IPv4 packets reached the balancer's stack during the restarts: XDP missed them", n)
	}

	checkEchoes(t, echoers, elapsed, interval)
	if t.Failed() {
		t.FailNow()
	}
	for i := 1; i < len(progs); i++ {
		if progs[i] == 0 || progs[i] == progs[i-1] {
			t.Errorf("XDP programs on eth0 across the restarts: %v, want a new one after each", progs)
		}
	}

	// The same ids, rings and affinity; tables not emptied.
	m = daemonMaps(t, l, testRing)
	if got := backendIDs(t, m); !reflect.DeepEqual(got, ids) {
		t.Errorf("backend ids after the restarts: %v, before %v", got, ids)
	}
	if got := serviceID(t, m, l.VIP4); got != chat {
		t.Errorf("service id after the restarts: %d, before %d", got, chat)
	}
	if got, err := m.Ring(chat); err != nil || !reflect.DeepEqual(got, ring) {
		t.Errorf("the ring changed across the restarts (%v)", err)
	}
	if got := affinityByClient(t, m, chat, l.ClientAddrs4); !reflect.DeepEqual(got, affinity) {
		t.Errorf("affinity entries changed across the restarts")
	}
	conns1, aff1 := tables(t, l)
	t.Logf("tables after the restarts: %d flows, %d affinity entries", conns1, aff1)
	if conns1 < conns0 || aff1 < aff0 {
		t.Errorf("tables shrank across the restarts: %d → %d flows, %d → %d affinity entries", conns0, conns1, aff0, aff1)
	}
	again := dialAll(t, l, l.ClientAddrs4, l.VIP4, 1)
	for _, c := range again {
		if owner[c.src] != c.backend {
			t.Errorf("client %s reconnected to %s, it was on %s", c.src, c.backend, owner[c.src])
		}
	}

	// No daemon: the balancer keeps forwarding with its last state.
	if err := d.proc.Stop(); err != nil {
		t.Fatal(err)
	}
	echoAll(t, all, "with no daemon")

	// Other table sizes: refused, nothing touched.
	prog := balancerXDP(t, l)
	other := filepath.Join(t.TempDir(), "other.yaml")
	if err := os.WriteFile(other, []byte(strings.Replace(cfg, "connections: 65536", "connections: 32768", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "tether.sock")
	out, code := runTether(t, l, "run", "-c", other, "--pin-dir", pinDir, "--socket", sock)
	if code != 1 || !strings.Contains(out, "tables.connections is 65536 there, 32768 here") || !strings.Contains(out, "tether detach --pin-dir "+pinDir) {
		t.Errorf("run with other table sizes: exit %d, output:\n%s\nwant exit 1 naming tables.connections and tether detach", code, out)
	}
	if got := balancerXDP(t, l); got != prog {
		t.Errorf("after a refused run eth0 runs XDP program %d, want %d", got, prog)
	}
	echoAll(t, all, "after a refused run")
	closeAll(append(all, again...))

	// tether detach removes the program and the pins.
	out, code = runTether(t, l, "detach", "--pin-dir", pinDir)
	if code != 0 || !strings.Contains(out, "detached the XDP program from eth0") {
		t.Errorf("tether detach: exit %d, output:\n%s", code, out)
	}
	if id := balancerXDP(t, l); id != 0 {
		t.Errorf("XDP program %d still on eth0 after tether detach", id)
	}
	if _, err := os.Stat(pinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin directory after tether detach: %v", err)
	}

	// tether run --clean starts afresh (with the other sizes) and leaves
	// nothing when it stops.
	clean := &daemon{t: t, args: []string{"run", "-c", other, "--pin-dir", pinDir, "--socket", sock, "--clean"}}
	if clean.proc, err = l.Balancer.Start(tetherBin, clean.args...); err != nil {
		t.Fatal(err)
	}
	clean.waitLog("msg=ready", 15*time.Second)
	if c, a := tables(t, l); c != 0 || a != 0 {
		t.Errorf("a clean start holds %d flows and %d affinity entries", c, a)
	}
	if err := clean.proc.Stop(); err != nil {
		t.Fatal(err)
	}
	if id := balancerXDP(t, l); id != 0 || !strings.Contains(clean.proc.Output(), "detached and pinned state removed") {
		t.Errorf("after tether run --clean stopped, eth0 runs XDP program %d:\n%s", id, clean.proc.Output())
	}
	if _, err := os.Stat(pinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin directory after tether run --clean: %v", err)
	}
}

// serviceID returns the id of the TCP service on vip:chatPort.
func serviceID(t *testing.T, m *maps.Maps, vip netip.Addr) uint32 {
	t.Helper()
	ss, err := m.Services()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range ss {
		if s.VIP == vip && s.Port == chatPort {
			return s.ID
		}
	}
	t.Fatalf("no service %s:%d in %+v", vip, chatPort, ss)
	return 0
}

// affinityByClient maps client addresses to the backend ids of their
// affinity entries for service.
func affinityByClient(t *testing.T, m *maps.Maps, service uint32, clients []netip.Addr) map[netip.Addr]uint32 {
	t.Helper()
	out := map[netip.Addr]uint32{}
	for _, c := range clients {
		a, ok, err := m.LookupAffinity(service, c)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			t.Fatalf("no affinity entry for %s", c)
		}
		out[c] = a.Backend
	}
	return out
}

// closeAll closes connections, in parallel, while the balancer forwards.
func closeAll(conns []*conn) {
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Go(func() { c.ws.Close() })
	}
	wg.Wait()
}

// snmpCounter reads a counter of /proc/net/snmp in h's namespace, such as
// "Ip" "InReceives".
func snmpCounter(t *testing.T, h *lab.Host, group, name string) uint64 {
	t.Helper()
	return snmpCounters(t, h, group, name)[0]
}

// snmpCounters reads counters of one group of /proc/net/snmp in h's
// namespace, from one read of the file.
func snmpCounters(t *testing.T, h *lab.Host, group string, names ...string) []uint64 {
	t.Helper()
	out := make([]uint64, len(names))
	err := h.Do(func() error {
		data, err := os.ReadFile("/proc/thread-self/net/snmp")
		if err != nil {
			return err
		}
		lines := strings.Split(string(data), "\n")
		for i := 0; i+1 < len(lines); i++ {
			fields, vals := strings.Fields(lines[i]), strings.Fields(lines[i+1])
			if len(fields) == 0 || fields[0] != group+":" || len(vals) != len(fields) {
				continue
			}
			for k, name := range names {
				j := slices.Index(fields, name)
				if j < 0 {
					return fmt.Errorf("no %s %s in snmp", group, name)
				}
				if _, err := fmt.Sscan(vals[j], &out[k]); err != nil {
					return err
				}
			}
			return nil
		}
		return fmt.Errorf("no %s counters in snmp", group)
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// echoWhile keeps every connection of open echoing every 100 ms while
// changes runs, waits a second before and after, and fails the test for
// any connection that lost an echo or closed. It returns the echoes.
func echoWhile(t *testing.T, open []*conn, changes func()) int {
	t.Helper()
	total, _ := echoWaiting(t, open, 5*time.Second, changes)
	return total
}

// echoWaiting is echoWhile with wait for each exchange of two echoes,
// for changes that hold packets up (a route that times out). It also
// returns the longest exchange.
func echoWaiting(t *testing.T, open []*conn, wait time.Duration, changes func()) (total int, worst time.Duration) {
	t.Helper()
	echoers := make([]*echoer, len(open))
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i, c := range open {
		echoers[i] = &echoer{c: c, wait: wait}
		wg.Go(func() { echoers[i].run(stop, 100*time.Millisecond) })
	}
	stopped := false
	stopEchoers := func() {
		if !stopped {
			stopped = true
			close(stop)
			wg.Wait()
		}
	}
	defer stopEchoers()
	time.Sleep(time.Second)
	changes()
	time.Sleep(time.Second)
	stopEchoers()
	for _, e := range echoers {
		if e.err != nil {
			t.Error(e.err)
		}
		total += e.echoes
		worst = max(worst, time.Duration(e.worst*float64(time.Millisecond)))
	}
	if t.Failed() {
		t.FailNow()
	}
	return total, worst
}
