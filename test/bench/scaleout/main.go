// Command scaleout measures tether on two balancer hosts behind a router
// that spreads flows over them by ECMP: the lab's BIRD 2 router peering
// by BGP with the real `tether run` on each host (XDP, dsr), three
// backends serving WebSocket echo.
//
//   - WebSocket connection rate (connect, handshake, one echo, close; W
//     workers over the lab's client addresses) with both hosts announcing
//     the VIP, against one host (host 2 drained) through the same router,
//     in interleaved rounds; and the share of new connections each host
//     took in the two-host rounds.
//   - A host's death: H connections echo every 100 ms while host 1 dies as
//     a machine does (link down, daemon SIGKILL, XDP detached). It reports
//     when the router withdrew host 1, how many connections stalled (they
//     crossed host 1) and when the last of them echoed again through host
//     2, the connections that broke and had to reconnect, and those that
//     answered from another backend.
//   - With sync on (a sync block on both hosts), the same connection rate,
//     the bytes and datagrams of sync traffic per new connection, and the
//     daemons' CPU per host, against sync off.
//
// It needs root and BIRD 2. `make bench` runs it.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/internal/lab/scenario"
	"github.com/tetherlb/tether/test/bench/benchrun"
)

var (
	fail = benchrun.Fail
	logf = benchrun.Logf
)

type options struct {
	out     string
	rounds  int
	conns   int
	workers int
	hold    int
}

// host is one balancer host with its daemon.
type host struct {
	h      *lab.Host
	pinDir string
	config string // its configuration file
	daemon *lab.Proc
	api    *control.Client
}

type env struct {
	l      *lab.Lab
	router *lab.Host
	bird   *lab.Bird
	hosts  []*host
	url    string
	vip    netip.AddrPort
	bin    string // the tether binary
}

func main() {
	benchrun.Name = "scaleout"
	defer benchrun.Cleanup()
	benchrun.FailOnSignal()
	var o options
	flag.StringVar(&o.out, "out", "", "also write the report to `FILE`")
	flag.IntVar(&o.rounds, "rounds", 3, "interleaved rounds of the connection-rate measurement")
	flag.IntVar(&o.conns, "conns", 2000, "WebSocket connections per connection-rate measurement")
	flag.IntVar(&o.workers, "workers", 8, "concurrent clients of the connection-rate measurement")
	flag.IntVar(&o.hold, "hold", 300, "WebSocket connections echoing every 100 ms while host 1 dies")
	flag.Parse()
	if os.Geteuid() != 0 {
		fail("needs root (network namespaces, XDP)")
	}
	if err := lab.BirdAvailable(); err != nil {
		fail(err.Error())
	}
	e := setup()
	w := benchrun.Report(o.out)

	// Connection rate: one host (host 2 drained), two, and two sharing
	// their entries (sync), interleaved.
	modes := []mode{{name: "1 (host 2 drained)", hosts: 1}, {name: "2", hosts: 2}, {name: "2, sharing entries (sync)", hosts: 2, share: true}}
	for r := range o.rounds {
		for i := range modes {
			m := &modes[i]
			setHosts(e, m.hosts)
			setSync(e, m.share)
			before, cpu0 := newConns(e), cpuTime(e)
			b0, g0 := syncCounters(e)
			start := time.Now()
			rate, failed := connRate(e, o.conns, o.workers)
			el := time.Since(start)
			after := newConns(e)
			b1, g1 := syncCounters(e)
			cpu := cpuTime(e) - cpu0
			d1, d2 := after[0]-before[0], after[1]-before[1]
			logf("round %d, %s: %.0f connections/s, %d failed; host 1 took %d, host 2 %d; sync %d bytes in %d datagrams; daemons' CPU %v in %v",
				r+1, m.name, rate, failed, d1, d2, b1-b0, g1-g0, cpu, el.Round(time.Millisecond))
			if failed > 0 {
				fail(fmt.Sprintf("%d connections failed", failed))
			}
			if m.hosts == 1 && d2 != 0 {
				fail(fmt.Sprintf("host 2 took %d connections while drained", d2))
			}
			m.rates = append(m.rates, rate)
			m.shares = append(m.shares, float64(d1)/float64(d1+d2))
			m.cpu = append(m.cpu, 100*cpu.Seconds()/el.Seconds()/2) // per host, % of a CPU
			if m.share {
				m.bytes = append(m.bytes, float64(b1-b0)/float64(d1+d2))
				m.dgrams = append(m.dgrams, float64(g1-g0)/float64(d1+d2))
			}
		}
	}
	one, two, shared := modes[0], modes[1], modes[2]

	// A host dies under held connections.
	setHosts(e, 2)
	setSync(e, false)
	d := hostDeath(e, o.hold)

	p := func(format string, args ...any) { fmt.Fprintf(w, format, args...) }
	p("# Two tether hosts behind an ECMP router\n\n")
	p("`sudo go run ./test/bench/scaleout -out docs/bench/scaleout.md` (part of `make bench`), %s.\n\n", time.Now().UTC().Format("2006-01-02"))
	p("%s, %d CPUs.\n\n", benchrun.Kernel(), runtime.NumCPU())
	p("The lab: a client namespace with 150 addresses, a router namespace running BIRD 2 (ECMP, the kernel hashing the 5-tuple), two balancer hosts each running `tether run` (XDP, dsr, source affinity) that announce the VIP to the router by BGP (hold time %d s), three backends serving WebSocket echo. Everything shares this machine's %d CPUs, so two hosts add no capacity here: the rate compares the paths, not the machines.\n\n", scenario.HoldTime, runtime.NumCPU())
	p("## Connection rate and the share per host\n\n")
	p("%d connections per measurement over %d workers, each a TCP connect, the WebSocket handshake, one echo and the close; %d interleaved rounds, medians.\n\n", o.conns, o.workers, o.rounds)
	p("| hosts announcing the VIP | connections/s (median) | rounds | x one host | host 1's share of new connections | daemon CPU per host |\n|---|---|---|---|---|---|\n")
	for _, m := range modes {
		p("| %s | %.0f | %s | %.2fx | %s (median %.0f%%) | %.1f%% of a CPU |\n", m.name, benchrun.Median(m.rates), list(m.rates),
			benchrun.Median(m.rates)/benchrun.Median(one.rates), percents(m.shares), 100*benchrun.Median(m.shares), benchrun.Median(m.cpu))
	}
	p("\n")
	if slices.Max(one.rates) >= slices.Min(two.rates) && slices.Max(two.rates) >= slices.Min(one.rates) {
		p("One host and two differ by less than the rounds of each vary: on one machine the second host costs the path nothing measurable, and adds no capacity either (its XDP program runs on the same CPUs).\n\n")
	} else {
		p("One host and two differ by more than their rounds vary.\n\n")
	}
	p("**Sync's cost.** With sync on, each new connection cost %.1f bytes and %.3f datagrams of sync traffic (medians over the rounds; each host sends its new flows to the other), and the connection rate was %.2fx that without sync (%.0f against %.0f connections/s). The daemons' CPU is the `tether run` processes' user and system time over the measurement, per host: %.1f%% of a CPU with sync, %.1f%% without. The XDP program's own cost of handing out a flow (one ring-buffer record per new connection) is in its run time, not in these figures.\n\n",
		benchrun.Median(shared.bytes), benchrun.Median(shared.dgrams), benchrun.Median(shared.rates)/benchrun.Median(two.rates),
		benchrun.Median(shared.rates), benchrun.Median(two.rates), benchrun.Median(shared.cpu), benchrun.Median(two.cpu))
	p("## A host dies\n\n")
	p("%d WebSocket connections from 150 addresses echo every 100 ms (an echo may take up to 20 s). Host 1 dies as a machine does: its link goes down (no word to the router), its daemon gets SIGKILL and its XDP program is detached.\n\n", o.hold)
	p("| measure | value |\n|---|---|\n")
	p("| connections crossing host 1 when it died (stalled: no echo for over 500 ms) | %d of %d |\n", d.stalled, o.hold)
	p("| router withdrew host 1 after | %v |\n", d.withdrawn.Round(10*time.Millisecond))
	p("| the last stalled connection echoed again, after | %v |\n", d.recovered.Round(10*time.Millisecond))
	p("| connections that broke and had to reconnect (time from death to the last reconnect) | %d (%v) |\n", d.broken, d.reconnected.Round(10*time.Millisecond))
	p("| connections answered by another backend than their own | %d |\n", d.moved)
	p("| echoes exchanged during the measurement | %d |\n\n", d.echoes)
	if d.broken == 0 && d.moved == 0 {
		p("No client needed to recover: the flows of host 1 waited for the router to give up on it (the hold time bounds that) and TCP's next retransmission reached host 2, whose ring gave them the backends they had. A shorter hold time, or BFD on the routers, shortens the stall.\n")
	} else {
		p("%d connections broke and %d echoes came from another backend: host 2 did not give every flow of host 1 the backend it had.\n", d.broken, d.moved)
	}
}

// setup builds the lab, the router, the backends and both hosts' daemons,
// and routes the client's traffic to the VIP through the router.
func setup() *env {
	bin := filepath.Join(os.TempDir(), fmt.Sprintf("tether-scaleout-%d", os.Getpid()))
	if b, err := exec.Command("go", "build", "-o", bin, "./cmd/tether").CombinedOutput(); err != nil {
		fail(fmt.Sprintf("build tether: %v\n%s", err, b))
	}
	benchrun.AtExit(func() { os.Remove(bin) })
	l, err := lab.New(lab.Options{Backends: 3})
	if err != nil {
		fail(err.Error())
	}
	benchrun.AtExit(func() { l.Close() })
	lb2, err := l.AddBalancer()
	if err != nil {
		fail(err.Error())
	}
	dir, err := os.MkdirTemp("", "tether-scaleout-")
	if err != nil {
		fail(err.Error())
	}
	benchrun.AtExit(func() { os.RemoveAll(dir) })
	router, bird, err := l.StartECMPRouter(dir, scenario.HoldTime, l.Balancer, lb2)
	if err != nil {
		fail(err.Error())
	}
	for _, be := range l.Backends {
		for _, a := range []netip.Addr{l.VIP4, be.Addr4} {
			ln, err := be.Listen("tcp", netip.AddrPortFrom(a, scenario.Port).String())
			if err != nil {
				fail(err.Error())
			}
			s := lab.ServeEcho(ln, be.Name)
			benchrun.AtExit(func() { s.Close() })
		}
	}
	e := &env{l: l, router: router, bird: bird, vip: netip.AddrPortFrom(l.VIP4, scenario.Port), bin: bin}
	e.url = "ws://" + e.vip.String() + "/chat"
	for i, h := range []*lab.Host{l.Balancer, lb2} {
		hs := &host{h: h, pinDir: filepath.Join(l.BPFFS, fmt.Sprintf("tether-%d", i+1)), config: filepath.Join(dir, h.Name+".yaml")}
		e.hosts = append(e.hosts, hs)
	}
	for _, hs := range e.hosts {
		h := hs.h
		writeConfig(e, hs, false)
		socket := filepath.Join(dir, h.Name+".sock")
		if hs.daemon, err = h.Start(bin, "run", "--config", hs.config, "--socket", socket, "--pin-dir", hs.pinDir, "--clean"); err != nil {
			fail(err.Error())
		}
		benchrun.AtExit(func() { hs.daemon.Stop() })
		hs.api = control.NewClient(socket)
		waitFor("the daemon on "+h.Name+" ready", 20*time.Second, func() bool {
			_, err := hs.api.Status(context.Background())
			return err == nil
		})
	}
	setHosts(e, 2)
	if err := l.Client.Run("ip", "route", "replace", l.VIP4.String()+"/32", "via", router.Addr4.String()); err != nil {
		fail(err.Error())
	}
	return e
}

// syncKey is the hosts' shared sync key.
const syncKey = "the scale-out bench's sync key, 32+ characters"

// writeConfig writes hs's configuration, with a sync block that peers
// with the other host when share is set.
func writeConfig(e *env, hs *host, share bool) {
	cfg := scenario.HostConfig(e.l, hs.h, e.l.Backends, "xdp", e.router)
	if share {
		cfg.Sync = &config.Sync{Listen: netip.AddrPortFrom(hs.h.Addr4, 7946), Key: syncKey, StartWait: config.DefaultSyncStartWait}
		for _, o := range e.hosts {
			if o != hs {
				cfg.Sync.Peers = append(cfg.Sync.Peers, netip.AddrPortFrom(o.h.Addr4, 7946))
			}
		}
	}
	data, err := cfg.Marshal()
	if err != nil {
		fail(err.Error())
	}
	if err := os.WriteFile(hs.config, data, 0o600); err != nil {
		fail(err.Error())
	}
}

// setSync turns sharing on or off on both hosts (a reload each), and
// waits until both are ready.
func setSync(e *env, on bool) {
	for _, hs := range e.hosts {
		writeConfig(e, hs, on)
		if _, err := hs.api.Reload(context.Background()); err != nil {
			fail(err.Error())
		}
	}
	waitFor("sync ready on both hosts", 20*time.Second, func() bool {
		for _, hs := range e.hosts {
			st, err := hs.api.Status(context.Background())
			if err != nil || (st.Sync != nil) != on || (on && !st.Sync.Ready) {
				return false
			}
		}
		return true
	})
}

// syncCounters sums both hosts' bytes and datagrams of sync sent.
func syncCounters(e *env) (bytes, dgrams uint64) {
	for _, hs := range e.hosts {
		st, err := hs.api.Status(context.Background())
		if err != nil {
			fail(err.Error())
		}
		if st.Sync != nil {
			bytes += st.Sync.SentBytes
			dgrams += st.Sync.SentDatagrams
		}
	}
	return bytes, dgrams
}

// cpuTime sums both daemons' CPU time (user and system) so far.
func cpuTime(e *env) time.Duration {
	var total time.Duration
	for _, hs := range e.hosts {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", hs.daemon.Cmd.Process.Pid))
		if err != nil {
			fail(err.Error())
		}
		// Fields 14 and 15 (utime, stime, clock ticks) follow the
		// command's closing parenthesis.
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		var ut, st uint64
		fmt.Sscan(f[11], &ut)
		fmt.Sscan(f[12], &st)
		total += time.Duration(ut+st) * time.Second / 100 // USER_HZ
	}
	return total
}

// setHosts has n hosts announce the VIP (host 2 drained for n = 1) and
// waits until the router's kernel routes it through exactly those.
func setHosts(e *env, n int) {
	if _, err := e.hosts[1].api.SetDrained(context.Background(), n < 2); err != nil {
		fail(err.Error())
	}
	want := []*lab.Host{e.hosts[0].h, e.hosts[1].h}[:n]
	waitFor(fmt.Sprintf("the router's route through %d host(s)", n), 20*time.Second, func() bool {
		return routesThrough(e, want...)
	})
	time.Sleep(500 * time.Millisecond)
}

// routesThrough says whether the router's kernel routes the VIP through
// exactly the hosts hs.
func routesThrough(e *env, hs ...*lab.Host) bool {
	out, err := e.router.Command("ip", "route", "show", e.l.VIP4.String()+"/32").Output()
	if err != nil {
		return false
	}
	n := 0
	for _, h := range e.hosts {
		if strings.Contains(string(out), "via "+h.h.Addr4.String()+" ") {
			n++
			if !slices.Contains(hs, h.h) {
				return false
			}
		}
	}
	return n == len(hs)
}

// newConns reads each host's count of flows entered for the service.
func newConns(e *env) []uint64 {
	out := make([]uint64, len(e.hosts))
	for i, h := range e.hosts {
		st, err := h.api.Stats(context.Background())
		if err != nil {
			fail(err.Error())
		}
		for _, s := range st.Services {
			if s.VIP == e.vip.String() {
				out[i] = s.NewConns
			}
		}
	}
	return out
}

// connRate makes n WebSocket connections over workers, each with one
// echo, and returns the rate of those that succeeded.
func connRate(e *env, n, workers int) (float64, int) {
	rate, failed, err := benchrun.WSConnRate(e.l.Client, e.l.ClientAddrs4, e.url, n, workers, 2*time.Minute, nil)
	if err != nil {
		logf("a connection failed: %v", err)
	}
	return rate, failed
}

// mode is one configuration the connection rate is measured in, with
// its rounds' figures.
type mode struct {
	name   string
	hosts  int
	share  bool
	rates  []float64
	shares []float64 // host 1's share of the new connections
	cpu    []float64 // the daemons' CPU, per host, % of a CPU
	bytes  []float64 // sync bytes per new connection
	dgrams []float64 // sync datagrams per new connection
}

// death is what hostDeath saw.
type death struct {
	stalled     int           // connections with no echo for over 500 ms after the death
	withdrawn   time.Duration // from the death to the router's route without host 1
	recovered   time.Duration // from the death to the last stalled connection's next echo
	broken      int           // connections that broke
	reconnected time.Duration // from the death to the last reconnection
	moved       int           // echoes from another backend than the connection's
	echoes      int
}

// holder is one held connection echoing every 100 ms.
type holder struct {
	src     netip.Addr
	ws      *lab.WSClient
	backend string
	mu      sync.Mutex
	last    time.Time // of the last echo
	gaps    []gap     // pauses over 500 ms: when the echo that ended them came
	broken  time.Time // when it broke, if it did
	again   time.Time // when it reconnected, if it broke
	moved   int
	echoes  int
}

type gap struct{ from, to time.Time }

// hostDeath holds n connections echoing every 100 ms, kills host 1 as a
// machine dies after 3 s, and keeps echoing until every connection has
// echoed again (or 60 s).
func hostDeath(e *env, n int) death {
	addrs := e.l.ClientAddrs4
	hs := make([]*holder, n)
	for i := range hs {
		src := addrs[i%len(addrs)]
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		ws, err := lab.DialWS(ctx, e.l.Client, src, e.url)
		cancel()
		if err != nil {
			fail(fmt.Sprintf("hold connection %d: %v", i, err))
		}
		hs[i] = &holder{src: src, ws: ws, backend: ws.Backend(), last: time.Now()}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, h := range hs {
		wg.Go(func() { h.run(e, stop) })
	}
	time.Sleep(3 * time.Second)

	died := time.Now()
	victim := e.hosts[0]
	if err := e.l.SetLink(victim.h, false); err != nil {
		fail(err.Error())
	}
	if err := victim.daemon.Kill(); err != nil {
		fail(err.Error())
	}
	if out, err := victim.h.Command(e.bin, "detach", "--pin-dir", victim.pinDir).CombinedOutput(); err != nil {
		fail(fmt.Sprintf("tether detach: %v: %s", err, out))
	}
	var d death
	waitFor("the router's route without host 1", 30*time.Second, func() bool { return routesThrough(e, e.hosts[1].h) })
	d.withdrawn = time.Since(died)
	// Every connection echoes again after the death, or 60 s pass.
	waitFor("every connection echoing again", 60*time.Second, func() bool {
		for _, h := range hs {
			h.mu.Lock()
			last := h.last
			h.mu.Unlock()
			if last.Before(died.Add(d.withdrawn)) {
				return false
			}
		}
		return true
	})
	time.Sleep(time.Second)
	close(stop)
	wg.Wait()
	for _, h := range hs {
		h.ws.Close()
		d.moved += h.moved
		d.echoes += h.echoes
		for _, g := range h.gaps {
			if g.to.After(died) && g.from.Before(died.Add(d.withdrawn)) {
				d.stalled++
				d.recovered = max(d.recovered, g.to.Sub(died))
				break
			}
		}
		if !h.broken.IsZero() {
			d.broken++
			d.reconnected = max(d.reconnected, h.again.Sub(died))
		}
	}
	return d
}

// run echoes every 100 ms until stop; a connection that breaks
// reconnects from the same address.
func (h *holder) run(e *env, stop <-chan struct{}) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		b, err := h.ws.Echo(ctx, "hi")
		cancel()
		now := time.Now()
		h.mu.Lock()
		if err != nil {
			if h.broken.IsZero() {
				h.broken = now
			}
			h.ws.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			ws, err := lab.DialWS(ctx, e.l.Client, h.src, e.url)
			cancel()
			if err == nil {
				h.ws, h.again = ws, time.Now()
				if ws.Backend() != h.backend {
					h.moved++
				}
			}
			h.mu.Unlock()
			continue
		}
		if b != h.backend {
			h.moved++
		}
		if now.Sub(h.last) > 500*time.Millisecond {
			h.gaps = append(h.gaps, gap{h.last, now})
		}
		h.last = now
		h.echoes++
		h.mu.Unlock()
	}
}

func waitFor(what string, timeout time.Duration, cond func() bool) {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			fail(what + ": not so after " + timeout.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func list(v []float64) string {
	out := ""
	for i, x := range v {
		if i > 0 {
			out += ", "
		}
		out += fmt.Sprintf("%.0f", x)
	}
	return out
}

func percents(v []float64) string {
	out := ""
	for i, x := range v {
		if i > 0 {
			out += ", "
		}
		out += fmt.Sprintf("%.0f%%", 100*x)
	}
	return out
}
