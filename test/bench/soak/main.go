// Command soak holds many connections through tether while its daemon is
// replaced, and measures what idle connections cost the splice daemon:
//
//   - For each datapath (xdp, splice): N WebSocket connections (10,000 by
//     default) from the lab's client addresses, each echoing a numbered
//     message every few seconds, while the daemon is replaced three times:
//     restarted twice and upgraded once to a binary of another version
//     (XDP: SIGTERM and a new `tether run`, which adopts the pinned state;
//     splice: `tether run --takeover`). It counts the connections that
//     closed, the echoes lost, reordered or answered by another backend,
//     and reports the longest round trip.
//   - The splice daemon's resident memory and CPU with no connection and
//     with those connections idle.
//   - The XDP program under Go's fuzzer (bpf.FuzzProgram, the invariant
//     checked against a reference parser, with dsr, nat, fullnat, ipip and gue
//     services) for F inputs (1,000,000).
//
// A splice daemon holds two descriptors per connection: where the hard
// limit on open files (RLIMIT_NOFILE) is lower than that needs and the
// process may not raise it (no CAP_SYS_RESOURCE), the splice run holds as
// many connections as the limit allows, and the report says so.
//
// It needs root. `make soak` runs it and writes docs/bench/soak.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/internal/lab/scenario"
	"github.com/tetherlb/tether/test/bench/benchrun"
)

var (
	fail = benchrun.Fail
	logf = benchrun.Logf
)

type options struct {
	out    string
	conns  int
	every  time.Duration
	settle time.Duration
	fuzz   int
	limit  int // the hard limit on open files of this process and the daemons
}

type env struct {
	l    *lab.Lab
	dir  string
	bins []string // the binaries of the three replacements
	srcs []netip.Addr
}

// daemon is a running `tether run` and how it was started.
type daemon struct {
	e      *env
	proc   *lab.Proc
	args   []string
	socket string
}

func main() {
	benchrun.Name = "soak"
	defer benchrun.Cleanup()
	benchrun.FailOnSignal()
	var o options
	flag.StringVar(&o.out, "out", "", "also write the report to `FILE`")
	flag.IntVar(&o.conns, "conns", 10000, "WebSocket connections held through the replacements")
	flag.DurationVar(&o.every, "every", 2*time.Second, "how often each connection echoes")
	flag.DurationVar(&o.settle, "settle", 10*time.Second, "echoing before, between and after the replacements")
	flag.IntVar(&o.fuzz, "fuzz", 1_000_000, "inputs to fuzz the XDP program with (0: none)")
	flag.Parse()
	if os.Geteuid() != 0 {
		fail("needs root (network namespaces, XDP)")
	}
	// Each proxied connection takes two descriptors in the splice daemon.
	// Root may raise the hard limit only with CAP_SYS_RESOURCE.
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		fail(err.Error())
	}
	if want := uint64(4*o.conns + 1000); lim.Max < want {
		raised := syscall.Rlimit{Cur: want, Max: want}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised); err == nil {
			lim = raised
		} else {
			logf("cannot raise the limit on open files from %d to %d (%v): the splice run holds fewer connections", lim.Max, want, err)
		}
	}
	o.limit = int(lim.Max)
	e := setup()
	w := benchrun.Report(o.out)
	p := func(format string, args ...any) { fmt.Fprintf(w, format, args...) }

	var runs []soakRun
	for _, dp := range []string{"xdp", "splice"} {
		runs = append(runs, soak(e, dp, o))
	}
	fuzzed := fuzz(o.fuzz)

	p("# Soak: connections held through daemon replacements\n\n")
	p("`sudo go run ./test/bench/soak -out docs/bench/soak.md` (`make soak`), %s, %s, %d CPUs.\n\n",
		time.Now().UTC().Format("2006-01-02"), benchrun.Kernel(), numCPU())
	p("WebSocket connections from %d client addresses, each echoing a numbered message every %v, while the daemon is restarted twice and upgraded once (to a binary of another version): XDP by SIGTERM and a new `tether run`, which adopts the pinned state; splice by `tether run --takeover`. %v of echoing before, between and after.\n\n",
		len(e.srcs), o.every, o.settle)
	p("| datapath | connections closed | echoes | lost, reordered or from another backend | longest round trip | replacements |\n|---|---|---|---|---|---|\n")
	for _, r := range runs {
		p("| %s | %d of %d | %d | %d | %v | %s |\n", r.dp, r.closed, r.conns, r.echoes, r.wrong, r.worst.Round(time.Millisecond), strings.Join(r.steps, "; "))
	}
	if sp := runs[1]; sp.conns < o.conns {
		p("\nThe splice run holds %d connections, not %d: this machine's hard limit on open files is %d, which root may raise only with CAP_SYS_RESOURCE, which this machine does not give; a splice daemon needs two descriptors a connection (`LimitNOFILE=` in a systemd unit, `ulimit -Hn` elsewhere).\n", sp.conns, o.conns, o.limit)
	}
	sp := runs[1]
	p("\nThe splice daemon idle (resident memory from /proc/PID/status; CPU over %v, which includes its health checks: 3 WebSocket probes every 500 ms):\n\n", idleWindow)
	p("| daemon | connections | resident memory | CPU |\n|---|---|---|---|\n")
	for _, c := range []struct {
		what string
		f    idleFigure
	}{{"the first, started", sp.empty}, {"the same, the connections open", sp.held}, {"its third successor, after the echoes", sp.idle}} {
		p("| %s | %d | %.1f MiB | %.2f%% of a CPU |\n", c.what, c.f.conns, float64(c.f.rss)/(1<<20), c.f.cpu)
	}
	p("\nThe connections moved the resident memory by %+.1f MiB (the first two rows): less than resident memory resolves, as the Go runtime's reserve absorbs it; the kernel's socket memory is not in it. `userspace/TestMemoryPerIdleConnection` measures the proxy's own cost at 0.5 KiB of Go memory per idle connection, about 49 MiB for 100,000; those need 200,000 descriptors and are not measured here.\n",
		float64(sp.held.rss-sp.empty.rss)/(1<<20))
	if fuzzed != "" {
		p("\nThe XDP program under Go's fuzzer (`go test ./bpf -run '^$' -fuzz '^FuzzProgram$' -fuzztime %dx`: services forwarding with dsr, nat, fullnat, ipip or gue as the input's first byte says; every frame checked against a reference parser: never aborted, nothing malformed or not for a VIP forwarded, a translated packet sent to its backend's address and port with its payload untouched, an encapsulated one to its backend's address with the packet inside as it came, tables holding exactly the flows forwarded): %s.\n", o.fuzz, fuzzed)
	}
	for _, r := range runs {
		if r.closed > 0 || r.wrong > 0 {
			fail(fmt.Sprintf("%s: %d connections closed, %d echoes wrong", r.dp, r.closed, r.wrong))
		}
	}
}

// fuzz runs the XDP program's fuzz target for n inputs and returns its
// last progress line ("elapsed: ..., execs: ..."), or fails.
func fuzz(n int) string {
	if n <= 0 {
		return ""
	}
	logf("fuzzing the XDP program with %d inputs", n)
	out, err := exec.Command("go", "test", "./bpf", "-run", "^$", "-fuzz", "^FuzzProgram$", "-fuzztime", fmt.Sprintf("%dx", n)).CombinedOutput()
	if err != nil {
		fail(fmt.Sprintf("fuzzing failed: %v\n%s", err, out))
	}
	last := ""
	for _, line := range strings.Split(string(out), "\n") {
		if _, rest, ok := strings.Cut(line, "fuzz: "); ok && strings.Contains(rest, "execs:") {
			last = rest
		}
	}
	return strings.TrimSpace(last)
}

func numCPU() int {
	n, _ := strconv.Atoi(strings.TrimSpace(must(exec.Command("nproc").Output())))
	return n
}

func must(b []byte, err error) string {
	if err != nil {
		fail(err.Error())
	}
	return string(b)
}

func setup() *env {
	dir, err := os.MkdirTemp("", "tether-soak-")
	if err != nil {
		fail(err.Error())
	}
	benchrun.AtExit(func() { os.RemoveAll(dir) })
	e := &env{dir: dir}
	for i, version := range []string{"soak", "soak", "soak-v2"} {
		bin := filepath.Join(dir, fmt.Sprintf("tether-%d", i))
		if b, err := exec.Command("go", "build", "-ldflags", "-X main.version="+version, "-o", bin, "./cmd/tether").CombinedOutput(); err != nil {
			fail(fmt.Sprintf("build tether: %v\n%s", err, b))
		}
		e.bins = append(e.bins, bin)
	}
	l, err := lab.New(lab.Options{Backends: 3, Clients: 100})
	if err != nil {
		fail(err.Error())
	}
	benchrun.AtExit(func() { l.Close() })
	e.l, e.srcs = l, l.ClientAddrs4
	// The echo backends run as processes of their own: this process holds
	// the clients' ends, within its limit on open files.
	for _, be := range l.Backends {
		p, err := scenario.StartEcho(context.Background(), e.bins[0], be, l.VIP4, be.Addr4)
		if p != nil {
			benchrun.AtExit(func() { p.Stop() })
		}
		if err != nil {
			fail(err.Error())
		}
	}
	for _, h := range []*lab.Host{l.Balancer, l.Backends[0], l.Backends[1], l.Backends[2]} {
		if err := h.Sysctl("net/core/somaxconn", "65535"); err != nil {
			fail(err.Error())
		}
	}
	return e
}

// config writes the soak's configuration for datapath dp: the lab's
// WebSocket service.
func (e *env) config(dp string) string {
	cfg := scenario.HostConfig(e.l, e.l.Balancer, e.l.Backends, dp, nil)
	cfg.Tables.Connections = 1 << 18
	data, err := cfg.Marshal()
	if err != nil {
		fail(err.Error())
	}
	path := filepath.Join(e.dir, dp+".yaml")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		fail(err.Error())
	}
	return path
}

// start runs the first daemon of datapath dp.
func (e *env) start(dp string) *daemon {
	socket := filepath.Join(e.dir, dp+".sock")
	d := &daemon{e: e, socket: socket, args: []string{"run", "--config", e.config(dp), "--socket", socket,
		"--pin-dir", filepath.Join(e.l.BPFFS, "tether-"+dp)}}
	var err error
	if d.proc, err = e.l.Balancer.Start(e.bins[0], d.args...); err != nil {
		fail(err.Error())
	}
	benchrun.AtExit(func() { d.proc.Stop() })
	d.waitLog(d.proc, "msg=ready", 30*time.Second)
	return d
}

func (d *daemon) waitLog(p *lab.Proc, s string, limit time.Duration) {
	if err := p.WaitOutput(context.Background(), "tether", s, limit); err != nil {
		fail(err.Error())
	}
}

// replace replaces the daemon with bin as the datapath does it, and says
// what it took.
func (d *daemon) replace(dp, bin string) string {
	old := d.proc
	args := d.args
	if dp == "splice" {
		args = append(append([]string{}, d.args...), "--takeover")
	} else if err := old.Stop(); err != nil {
		fail(err.Error())
	}
	p, err := d.e.l.Balancer.Start(bin, args...)
	if err != nil {
		fail(err.Error())
	}
	d.proc = p
	benchrun.AtExit(func() { p.Stop() })
	d.waitLog(p, "msg=ready", 60*time.Second)
	select {
	case <-old.Done():
	case <-time.After(30 * time.Second):
		fail("the replaced daemon is still running:\n" + old.Output())
	}
	if dp == "splice" {
		if !strings.Contains(old.Output(), `msg="handed over to the new daemon"`) {
			fail("the old splice daemon did not hand over:\n" + old.Output())
		}
		return fmt.Sprintf("%s: connections waited %v", filepath.Base(bin), logTime(p.Output(), `msg="serving the connections handed over`).Sub(logTime(old.Output(), `msg="handing over to a new daemon"`)).Round(time.Millisecond))
	}
	return fmt.Sprintf("%s: %v without a daemon", filepath.Base(bin), logTime(p.Output(), "msg=ready").Sub(logTime(old.Output(), "msg=stopped")).Round(time.Millisecond))
}

// logTime is the time of the last log line that holds s.
func logTime(log, s string) time.Time {
	i := strings.LastIndex(log, s)
	if i < 0 {
		fail(fmt.Sprintf("no log line holds %q", s))
	}
	line := log[strings.LastIndex(log[:i], "\n")+1:]
	stamp, _, _ := strings.Cut(strings.TrimPrefix(line, "time="), " ")
	at, err := time.Parse(time.RFC3339Nano, stamp)
	if err != nil {
		fail(fmt.Sprintf("log line %q: %v", line, err))
	}
	return at
}

type soakRun struct {
	dp            string
	conns, closed int
	echoes, wrong int64
	worst         time.Duration
	steps         []string
	// The splice daemon idle: at its start, with the connections open,
	// and its third successor with them after the echoes.
	empty, held, idle idleFigure
}

// soak holds o.conns WebSocket connections echoing through three
// replacements of the daemon of datapath dp.
func soak(e *env, dp string, o options) soakRun {
	logf("%s: starting the daemon", dp)
	d := e.start(dp)
	var empty idleFigure
	if dp == "splice" {
		empty = measureIdle(d, 0)
		// Two descriptors a connection, and a few hundred for the rest
		// (listening sockets, pipes of the connections moving bytes,
		// health checks, the API).
		if most := (o.limit - 600) / 2; o.conns > most {
			o.conns = most
		}
	}
	url := "ws://" + netip.AddrPortFrom(e.l.VIP4, scenario.Port).String() + "/chat"
	conns := make([]*lab.WSClient, o.conns)
	backends := make([]string, o.conns)
	var next atomic.Int64
	var wg sync.WaitGroup
	var dialErr atomic.Pointer[error]
	for range 32 {
		wg.Go(func() {
			for {
				k := int(next.Add(1)) - 1
				if k >= o.conns {
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				c, err := lab.DialWS(ctx, e.l.Client, e.srcs[k%len(e.srcs)], url)
				if err == nil {
					backends[k], err = c.Echo(ctx, "hello")
				}
				cancel()
				if err != nil {
					dialErr.Store(&err)
					return
				}
				conns[k] = c
			}
		})
	}
	wg.Wait()
	if err := dialErr.Load(); err != nil {
		fail(fmt.Sprintf("%s: open the connections: %v", dp, *err))
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	logf("%s: %d connections open; echoing every %v", dp, o.conns, o.every)
	var held idleFigure
	if dp == "splice" {
		held = measureIdle(d, o.conns) // the same daemon, before any echo
	}

	r := soakRun{dp: dp, conns: o.conns, empty: empty, held: held}
	var echoes, wrong, closed atomic.Int64
	var worst atomic.Int64
	stop := make(chan struct{})
	var ew sync.WaitGroup
	for k, c := range conns {
		ew.Go(func() {
			// Spread the echoes over the period.
			t := time.NewTimer(time.Duration(rand.Int64N(int64(o.every))))
			defer t.Stop()
			for seq := 0; ; seq++ {
				select {
				case <-stop:
					return
				case <-t.C:
				}
				t.Reset(o.every)
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				begin := time.Now()
				be, err := c.Echo(ctx, fmt.Sprintf("seq %d", seq))
				cancel()
				if err != nil {
					if strings.Contains(err.Error(), "is not") {
						wrong.Add(1) // another message came back: lost or reordered
					}
					closed.Add(1)
					logf("%s: connection %d (%s) after %d echoes: %v", dp, k, backends[k], seq, err)
					return
				}
				if be != backends[k] {
					wrong.Add(1)
				}
				echoes.Add(1)
				for rt := int64(time.Since(begin)); ; {
					w := worst.Load()
					if rt <= w || worst.CompareAndSwap(w, rt) {
						break
					}
				}
			}
		})
	}
	time.Sleep(o.settle)
	for _, bin := range e.bins {
		step := d.replace(dp, bin)
		logf("%s: replaced by %s", dp, step)
		r.steps = append(r.steps, step)
		time.Sleep(o.settle)
	}
	close(stop)
	ew.Wait()
	r.echoes, r.wrong, r.closed = echoes.Load(), wrong.Load(), int(closed.Load())
	r.worst = time.Duration(worst.Load())
	logf("%s: %d echoes, %d connections closed, %d wrong, longest round trip %v", dp, r.echoes, r.closed, r.wrong, r.worst)
	if dp == "splice" {
		r.idle = measureIdle(d, o.conns)
	}
	if err := d.proc.Stop(); err != nil {
		fail(err.Error())
	}
	return r
}

type idleFigure struct {
	conns int
	rss   int64
	cpu   float64 // % of a CPU
}

// idleWindow is how long the idle daemon's CPU is measured.
const idleWindow = 30 * time.Second

// measureIdle reads the daemon's resident memory and its CPU over
// idleWindow.
func measureIdle(d *daemon, conns int) idleFigure {
	pid := d.proc.Cmd.Process.Pid
	t0 := cpuTicks(pid)
	time.Sleep(idleWindow)
	cpu := float64(cpuTicks(pid)-t0) / 100 / idleWindow.Seconds() * 100
	f := idleFigure{conns: conns, rss: rss(pid), cpu: cpu}
	logf("splice daemon with %d idle connections: %.0f MiB resident, %.2f%% of a CPU", conns, float64(f.rss)/(1<<20), cpu)
	return f
}

// rss is a process's resident memory in bytes.
func rss(pid int) int64 {
	for _, line := range strings.Split(must(os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.Fields(v)[0], 10, 64)
			return kb << 10
		}
	}
	fail("no VmRSS")
	return 0
}

// cpuTicks is a process's user and system time, in clock ticks (1/100 s).
func cpuTicks(pid int) int64 {
	stat := must(os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)))
	f := strings.Fields(stat[strings.LastIndex(stat, ")")+2:])
	u, _ := strconv.ParseInt(f[11], 10, 64)
	s, _ := strconv.ParseInt(f[12], 10, 64)
	return u + s
}
