// Command splicebench measures tether's splice datapath against HAProxy
// (mode tcp, option splice-auto) on the same lab, in the same run:
//
//   - throughput with 1 and 8 streams: the client sends a fixed number of
//     bytes per stream to a backend that discards them and acknowledges the
//     end (MiB/s = bytes / elapsed, median of the runs);
//   - new connections per second: workers connect, write one byte, read its
//     echo and close, a fixed number of times (median of the runs), with a
//     few workers (the rate is bound by each connection's latency through
//     the balancer) and with many (the CPUs are busy: the rate is bound by
//     the work per connection);
//
// through tether (`tether run` with `datapath: splice`), through HAProxy,
// and directly from the client to the backends, the reference. Runs are
// interleaved: each round measures direct, then tether and HAProxy,
// alternating which of the two goes first, starting and stopping each
// balancer, so that drift of the machine falls on all three alike. It also
// reports the CPU time each balancer process used per GiB and per
// connection, and for the connection rate where the machine's CPU went:
// the balancer, this program (the clients and the backends), the rest, and
// how long the CPUs sat idle; and the context switches per connection, of
// the balancer's threads (waits and preemptions) and of the machine. With
// -wrk (the default) it also measures the connection rate with C programs
// around the balancers: wrk on the client, a new connection per request,
// and nginx on the backends.
//
// It needs root, `ip`, haproxy, and for -wrk wrk and nginx. `make bench`
// installs them and runs it.
package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/test/bench/benchrun"
	"github.com/tetherlb/tether/test/bench/syscount"
)

const (
	port     = 9000
	httpPort = 9001 // nginx on the backends, for wrk
	modeSink = 'S'  // 8-byte big-endian length follows; discard, then ack one byte
	modeEcho = 'E'  // echo one byte, then wait for the peer to close
	opLimit  = 2 * time.Minute
)

// The shared exit path of the benchmark commands.
var (
	atExit  = benchrun.AtExit
	fail    = benchrun.Fail
	logf    = benchrun.Logf
	cleanup = benchrun.Cleanup
)

type options struct {
	mib      int
	conns    int
	workers  []int
	runs     int
	backends int
	clients  int
	hapThr   int
	wrkConns []int  // wrk's concurrent connections, one measurement each
	compare  string // another tether binary, measured as one more balancer
	wrkSecs  int
	sysConns int // connections of the system call count (0: none)
}

type balancer struct {
	name  string
	start func(round int) (stop func(), pid int) // nil for direct
}

type sample struct {
	one, eight       float64
	cps              []float64 // by o.workers
	cpuOne, cpuEight float64   // balancer CPU seconds
	cpuConns         []float64 // by o.workers
	// During each connection-rate measurement: CPU seconds of this
	// program (the clients and the backends), of the whole machine, and
	// the machine's idle share.
	genConns, busyConns, idleConns []float64
	// ... and the context switches: of the balancer's threads, when they
	// waited (voluntary) and when they were preempted (involuntary), and
	// of the whole machine.
	waitConns, preemptConns, switchConns []float64
	http                                 []float64 // by o.wrkConns: wrk's requests (connections) per second
	// The balancer's system calls per connection, by name, over
	// o.sysConns connections by o.workers[0] workers.
	syscalls map[string]float64
}

func main() {
	benchrun.Name = "splicebench"
	var o options
	flag.IntVar(&o.mib, "mib", 512, "MiB sent per throughput measurement (split over the streams)")
	flag.IntVar(&o.conns, "conns", 10000, "connections per connection-rate measurement")
	workers := flag.String("workers", "4,16", "concurrent workers of the connection-rate measurements, a comma-separated `list`: one measurement each")
	flag.IntVar(&o.runs, "runs", 3, "interleaved rounds; the median is reported")
	flag.IntVar(&o.backends, "backends", 3, "backends in the lab (1-3)")
	flag.IntVar(&o.clients, "clients", 16, "client source addresses")
	flag.IntVar(&o.hapThr, "haproxy-threads", 0, "HAProxy nbthread (0: HAProxy's default, one per CPU)")
	wrkConns := flag.String("wrk", "4,16", "concurrent connections of the HTTP connection-rate measurements by wrk against nginx backends, a comma-separated `list` (empty: none)")
	flag.IntVar(&o.wrkSecs, "wrk-secs", 3, "seconds per wrk measurement")
	flag.IntVar(&o.sysConns, "syscall-conns", 2000, "connections (by the first -workers count) over which the balancer's system calls are counted, in a pass of their own after the timed ones (0: none)")
	out := flag.String("out", "", "also write the report to this `file`")
	flag.StringVar(&o.compare, "compare", "", "also measure this tether `binary` (another build), as one more balancer in every round: the drift between runs is larger than most changes, the drift within a run falls on all alike")
	flag.Parse()
	for _, c := range []struct {
		bad  bool
		want string
	}{
		{o.backends < 1 || o.backends > 3, "-backends is 1, 2 or 3"},
		{o.runs < 1, "-runs is at least 1"},
		{o.mib < 8, "-mib is at least 8 (1 MiB per stream of 8)"},
		{o.conns < 1, "-conns is at least 1"},
		{o.clients < 1, "-clients is at least 1"},
		{o.wrkSecs < 1, "-wrk-secs is at least 1"},
		{o.hapThr < 0, "-haproxy-threads is 0 (HAProxy's default) or more"},
	} {
		if c.bad {
			fail("bad flags: " + c.want)
		}
	}

	if o.compare != "" {
		if st, err := os.Stat(o.compare); err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
			fail(fmt.Sprintf("bad flags: -compare %q is not an executable file", o.compare))
		}
		abs, err := filepath.Abs(o.compare)
		if err != nil {
			fail(err.Error())
		}
		o.compare = abs
	}
	o.workers = counts("-workers", *workers, o.conns)
	if *wrkConns != "" {
		o.wrkConns = counts("-wrk", *wrkConns, 10000)
	}

	benchrun.FailOnSignal()
	defer cleanup()

	hapVersion := haproxyVersion()
	if len(o.wrkConns) > 0 {
		for _, prog := range []string{"wrk", "nginx"} {
			if _, err := exec.LookPath(prog); err != nil {
				fail(prog + " is missing (make bench installs it; or apt-get install " + prog + "), or run with -wrk ''")
			}
		}
	}
	tmp, err := os.MkdirTemp("", "splicebench-*")
	if err != nil {
		fail(err.Error())
	}
	atExit(func() { os.RemoveAll(tmp) })
	tetherBin := filepath.Join(tmp, "tether")
	logf("building tether")
	if b, err := exec.Command("go", "build", "-o", tetherBin, "./cmd/tether").CombinedOutput(); err != nil {
		fail(fmt.Sprintf("go build ./cmd/tether: %v\n%s", err, b))
	}

	l, err := lab.New(lab.Options{Backends: o.backends, Clients: o.clients})
	if err != nil {
		fail("lab: " + err.Error())
	}
	atExit(func() {
		if err := l.Close(); err != nil {
			logf("closing the lab: %v", err)
		}
	})
	logf("lab %s: %d backends, %d client addresses", l.ID, len(l.Backends), o.clients)
	// Neither balancer here uses XDP: give the balancer an ordinary port,
	// with the segmentation offload a real NIC has (see lab.SetPortXDP).
	if err := l.SetPortXDP(l.Balancer, false); err != nil {
		fail(err.Error())
	}
	for _, h := range []*lab.Host{l.Client, l.Balancer} {
		// Many short connections in a row: a wide port range and reuse
		// of TIME_WAIT ports for the active closer (per namespace, gone
		// with the lab).
		sysctl(h, "net.ipv4.ip_local_port_range=1024 65000")
		sysctl(h, "net.ipv4.tcp_tw_reuse=1")
	}
	var backendAddrs []netip.AddrPort
	for _, be := range l.Backends {
		a := netip.AddrPortFrom(be.Addr4, port)
		ln, err := be.Listen("tcp", a.String())
		if err != nil {
			fail(err.Error())
		}
		atExit(func() { ln.Close() })
		go serve(ln)
		backendAddrs = append(backendAddrs, a)
		if len(o.wrkConns) > 0 {
			startNginx(be, tmp)
		}
	}
	ports := []uint16{port}
	if len(o.wrkConns) > 0 {
		ports = append(ports, httpPort)
	}
	vip := netip.AddrPortFrom(l.VIP4, port)

	bals := []balancer{
		{name: "direct (no balancer)"},
		{name: "tether (splice)", start: func(round int) (func(), int) {
			return startTether(l, tetherBin, filepath.Join(tmp, fmt.Sprintf("tether-%d", round)), vip, backendAddrs, ports)
		}},
		{name: "haproxy " + hapVersion + " (splice-auto)", start: func(round int) (func(), int) {
			return startHAProxy(l, tmp, round, vip, backendAddrs, ports, o.hapThr)
		}},
	}
	if o.compare != "" {
		bals = append(bals, balancer{name: "-compare " + filepath.Base(o.compare) + " (splice)", start: func(round int) (func(), int) {
			return startTether(l, o.compare, filepath.Join(tmp, fmt.Sprintf("compare-%d", round)), vip, backendAddrs, ports)
		}})
	}
	samples := make([][]sample, len(bals))
	for r := 0; r < o.runs; r++ {
		// Direct first, then the balancers in an order that rotates by
		// one each round (with two, they take turns to go first): each
		// inherits what the one before left (TIME_WAIT sockets, caches),
		// and none should always follow the same one.
		order := []int{0}
		for k := range len(bals) - 1 {
			order = append(order, 1+(r+k)%(len(bals)-1))
		}
		for _, i := range order {
			b := bals[i]
			target := func(k int) netip.AddrPort { return vip }
			stop, pid := func() {}, 0
			if b.start == nil {
				target = func(k int) netip.AddrPort { return backendAddrs[k%len(backendAddrs)] }
			} else {
				stop, pid = b.start(r)
			}
			var s sample
			c0 := cpuSeconds(pid)
			s.one = throughput(l, target, 1, o.mib)
			c1 := cpuSeconds(pid)
			s.eight = throughput(l, target, 8, o.mib)
			c2 := cpuSeconds(pid)
			s.cpuOne, s.cpuEight = c1-c0, c2-c1
			for _, n := range o.workers {
				g0, m0 := cpuSeconds(os.Getpid()), machineTimes()
				w0, p0 := switches(pid)
				s.cps = append(s.cps, connRate(l, target, o.conns, n))
				g1, m1, c3 := cpuSeconds(os.Getpid()), machineTimes(), cpuSeconds(pid)
				w1, p1 := switches(pid)
				s.waitConns = append(s.waitConns, w1-w0)
				s.preemptConns = append(s.preemptConns, p1-p0)
				s.switchConns = append(s.switchConns, m1.switches-m0.switches)
				s.cpuConns = append(s.cpuConns, c3-c2)
				s.genConns = append(s.genConns, g1-g0)
				s.busyConns = append(s.busyConns, m1.busy-m0.busy)
				s.idleConns = append(s.idleConns, (m1.idle-m0.idle)/(m1.busy-m0.busy+m1.idle-m0.idle))
				c2 = c3
			}
			if pid != 0 && o.sysConns > 0 {
				s.syscalls = syscallsPerConn(pid, o.sysConns, func() { connRate(l, target, o.sysConns, o.workers[0]) })
			}
			for _, n := range o.wrkConns {
				to := netip.AddrPortFrom(target(0).Addr(), httpPort)
				s.http = append(s.http, wrkRate(l, to, n, o.wrkSecs))
			}
			stop()
			logf("round %d %s: 1 stream %.0f MiB/s, 8 streams %.0f MiB/s, conns/s %.0f", r+1, b.name, s.one, s.eight, s.cps)
			samples[i] = append(samples[i], s)
		}
	}
	report(out, o, l, bals, samples, hapVersion)
}

// median is the median of f over the rounds' samples.
func median(ss []sample, f func(sample) float64) float64 {
	var xs []float64
	for _, s := range ss {
		xs = append(xs, f(s))
	}
	return benchrun.Median(xs)
}

func report(out *string, o options, l *lab.Lab, bals []balancer, samples [][]sample, hapVersion string) {
	w := benchrun.Report(*out)
	med := median
	rng := func(ss []sample, f func(sample) float64) string {
		var xs []float64
		for _, s := range ss {
			xs = append(xs, f(s))
		}
		return fmt.Sprintf("%.0f–%.0f", slices.Min(xs), slices.Max(xs))
	}
	one := func(s sample) float64 { return s.one }
	eight := func(s sample) float64 { return s.eight }
	cps := func(k int) func(sample) float64 { return func(s sample) float64 { return s.cps[k] } }
	// ratio is the median of balancer a over b's (tether over HAProxy,
	// or -compare over tether), and the spread of the ratio round by
	// round (the rounds interleave the balancers).
	ratios := func(a, b int, f func(sample) float64) string {
		t, h := samples[a], samples[b]
		var rs []float64
		for r := range t {
			rs = append(rs, f(t[r])/f(h[r]))
		}
		return fmt.Sprintf("**%.2f** (%.2f–%.2f)", med(t, f)/med(h, f), slices.Min(rs), slices.Max(rs))
	}
	type ratioRow struct {
		name string
		a, b int // indices in bals
	}
	ratioRows := []ratioRow{{"tether / haproxy", 1, 2}}
	if o.compare != "" {
		ratioRows = append(ratioRows, ratioRow{"-compare / tether", 3, 1})
	}

	fmt.Fprintf(w, "# tether splice datapath against HAProxy (%s, %s, %d CPUs)\n\n", time.Now().UTC().Format("2006-01-02"), benchrun.Kernel(), cpus())
	fmt.Fprintf(w, "One lab (client, balancer, %d backends on one bridge), one run, %d interleaved rounds (direct, then the balancers in an order that rotates by one each round); medians, min–max in parentheses.\n", len(l.Backends), o.runs)
	fmt.Fprintf(w, "Throughput: the client sends %d MiB in all (1 stream, or 8 streams of %d MiB from 8 source addresses), the backend discards it and acknowledges the end; MiB/s = bytes / elapsed.\n", o.mib, o.mib/8)
	fmt.Fprintf(w, "Connection rate: %d connections, each connect, write 1 byte, read its echo, close, by N concurrent workers: with few, each connection's latency through the balancer bounds the rate; with many, the CPUs are busy and the work per connection does.\n", o.conns)
	if o.compare != "" {
		fmt.Fprintln(w, "The last rows are tether's median over HAProxy's and -compare's over tether's, and in parentheses the lowest and highest ratio of a single round.")
	} else {
		fmt.Fprintln(w, "The last row is tether's median over HAProxy's, and in parentheses the lowest and highest ratio of a single round.")
	}
	fmt.Fprintln(w)
	header(w, []string{"balancer", "1 stream MiB/s", "8 streams MiB/s"}, "conns/s, %d workers", o.workers)
	for i, b := range bals {
		fmt.Fprintf(w, "| %s | %.0f (%s) | %.0f (%s) |", b.name,
			med(samples[i], one), rng(samples[i], one),
			med(samples[i], eight), rng(samples[i], eight))
		for k := range o.workers {
			fmt.Fprintf(w, " %.0f (%s) |", med(samples[i], cps(k)), rng(samples[i], cps(k)))
		}
		fmt.Fprintln(w)
	}
	for _, rr := range ratioRows {
		fmt.Fprintf(w, "| **%s** | %s | %s |", rr.name, ratios(rr.a, rr.b, one), ratios(rr.a, rr.b, eight))
		for k := range o.workers {
			fmt.Fprintf(w, " %s |", ratios(rr.a, rr.b, cps(k)))
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintln(w)

	fmt.Fprintln(w, "CPU time of the balancer process (user + system, from /proc/PID/stat; medians):")
	fmt.Fprintln(w)
	header(w, []string{"balancer", "CPU ms per GiB, 1 stream", "CPU ms per GiB, 8 streams"}, "CPU µs per connection, %d workers", o.workers)
	gib := float64(o.mib) / 1024
	for i, b := range bals[1:] {
		ss := samples[i+1]
		fmt.Fprintf(w, "| %s | %.0f | %.0f |", b.name,
			med(ss, func(s sample) float64 { return s.cpuOne })*1000/gib,
			med(ss, func(s sample) float64 { return s.cpuEight })*1000/gib)
		for k := range o.workers {
			fmt.Fprintf(w, " %.0f |", med(ss, func(s sample) float64 { return s.cpuConns[k] })*1e6/float64(o.conns))
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintln(w)

	fmt.Fprintf(w, "Where the machine's CPU time went during the connection rates (µs per connection, medians of the rounds). \"rest\" is the kernel's work in other contexts, such as softirq threads, and other processes; /proc counts in ticks of 10 ms, so each figure is within about %.0f µs. With few workers the rate is bound by latency: the CPUs sit idle while every connection waits for a wake-up somewhere.\n", 2*10e3/float64(o.conns))
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| balancer | workers | balancer process | clients and backends (this program) | rest | whole machine | CPUs idle |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|---:|")
	for i, b := range bals {
		for k, n := range o.workers {
			// Medians of per-round figures, in µs per connection.
			us := func(f func(sample) float64) float64 { return med(samples[i], f) * 1e6 / float64(o.conns) }
			bal := func(s sample) float64 { return s.cpuConns[k] }
			gen := func(s sample) float64 { return s.genConns[k] }
			all := func(s sample) float64 { return s.busyConns[k] }
			rest := func(s sample) float64 { return all(s) - bal(s) - gen(s) }
			idle := med(samples[i], func(s sample) float64 { return s.idleConns[k] })
			// rest is a difference of tick counts: -0.4 is 0.
			fmt.Fprintf(w, "| %s | %d | %.0f | %.0f | %.0f | %.0f | %.0f%% |\n", b.name, n, us(bal), us(gen), math.Round(us(rest))+0, us(all), 100*idle)
		}
	}
	fmt.Fprintln(w)

	fmt.Fprintln(w, "Context switches per connection during the connection rates (medians of the rounds): of the balancer's threads, those where a thread went to sleep to wait for events (voluntary) and those where it was runnable and the scheduler gave its CPU to another thread (preempted); and of the whole machine (/proc/PID/task/*/status, /proc/stat). Every switch delays what the thread had left to do, and the machine's switches cost CPU in the kernel.")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| balancer | workers | balancer waited | balancer preempted | whole machine |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|")
	for i, b := range bals {
		for k, n := range o.workers {
			per := func(f func(sample) float64) float64 { return med(samples[i], f) / float64(o.conns) }
			fmt.Fprintf(w, "| %s | %d | %.2f | %.2f | %.2f |\n", b.name, n,
				per(func(s sample) float64 { return s.waitConns[k] }),
				per(func(s sample) float64 { return s.preemptConns[k] }),
				per(func(s sample) float64 { return s.switchConns[k] }))
		}
	}
	fmt.Fprintln(w)

	if o.sysConns > 0 {
		syscallTable(w, o, bals[1:], samples[1:])
	}
	if len(o.wrkConns) > 0 {
		fmt.Fprintf(w, "HTTP connection rate with C programs around the balancers: wrk on the client, %d s per measurement, every request on a new connection (`Connection: close`), against nginx on each backend (port %d), which answers a 1-byte body and closes. Connections per second (= requests per second):\n\n", o.wrkSecs, httpPort)
		header(w, []string{"balancer"}, "%d connections", o.wrkConns)
		for i, b := range bals {
			fmt.Fprintf(w, "| %s |", b.name)
			for k := range o.wrkConns {
				f := func(s sample) float64 { return s.http[k] }
				fmt.Fprintf(w, " %.0f (%s) |", med(samples[i], f), rng(samples[i], f))
			}
			fmt.Fprintln(w)
		}
		for _, rr := range ratioRows {
			fmt.Fprintf(w, "| **%s** |", rr.name)
			for k := range o.wrkConns {
				fmt.Fprintf(w, " %s |", ratios(rr.a, rr.b, func(s sample) float64 { return s.http[k] }))
			}
			fmt.Fprintln(w)
		}
		fmt.Fprintln(w)
	}
	threads := "not set (HAProxy's default: one thread per CPU)"
	if o.hapThr > 0 {
		threads = strconv.Itoa(o.hapThr)
	}
	fmt.Fprintf(w, "HAProxy %s: `mode tcp`, `option splice-auto`, `balance source`, `maxconn 4000`, timeouts client/server/tunnel 1h, nbthread %s. ", hapVersion, threads)
	fmt.Fprintln(w, "tether: `datapath: splice`, `affinity: source`, `health: {type: none}`. Both connect to the backends' own addresses (198.51.100.1x:9000, and :9001 for nginx).")
	fmt.Fprintln(w)
	fmt.Fprintf(w, "All hosts (client, balancer, backends, and this program, which runs the client and the backends) share the same %d CPUs: ", cpus())
	fmt.Fprintln(w, "the balancer competes with the load it measures, so the figures are compressed toward the direct reference, and the ratios understate differences.")
}

// serve runs the backend: sink or echo, by the first byte.
func serve(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			c.SetDeadline(time.Now().Add(opLimit))
			var m [1]byte
			if _, err := io.ReadFull(c, m[:]); err != nil {
				return
			}
			switch m[0] {
			case modeEcho:
				if _, err := c.Write(m[:]); err != nil {
					return
				}
				io.Copy(io.Discard, c) // until the client closes
			case modeSink:
				var n [8]byte
				if _, err := io.ReadFull(c, n[:]); err != nil {
					return
				}
				buf := make([]byte, 256<<10)
				left := int64(binary.BigEndian.Uint64(n[:]))
				for left > 0 {
					k := int64(len(buf))
					if left < k {
						k = left
					}
					r, err := c.Read(buf[:k])
					left -= int64(r)
					if err != nil {
						return
					}
				}
				c.Write([]byte{'A'})
			}
		}()
	}
}

// dial connects from the client namespace; call it inside Client.Do.
func dial(src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}, Timeout: 10 * time.Second}
	c, err := d.Dial("tcp4", dst.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// throughput sends mib MiB over streams streams and returns MiB/s.
func throughput(l *lab.Lab, target func(int) netip.AddrPort, streams, mib int) float64 {
	per := int64(mib) << 20 / int64(streams)
	conns := make([]*net.TCPConn, streams)
	err := l.Client.Do(func() error {
		for k := range conns {
			c, err := dial(l.ClientAddrs4[k%len(l.ClientAddrs4)], target(k))
			if err != nil {
				for _, c := range conns[:k] {
					c.Close()
				}
				return err
			}
			conns[k] = c
		}
		return nil
	})
	if err != nil {
		fail("throughput: " + err.Error())
	}
	buf := bytes.Repeat([]byte("tether"), (1<<20)/6+1)[:1<<20]
	errs := make([]error, streams)
	var wg sync.WaitGroup
	start := time.Now()
	for k, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			c.SetDeadline(time.Now().Add(opLimit))
			hdr := make([]byte, 9)
			hdr[0] = modeSink
			binary.BigEndian.PutUint64(hdr[1:], uint64(per))
			if _, err := c.Write(hdr); err != nil {
				errs[k] = err
				return
			}
			for left := per; left > 0; {
				n := int64(len(buf))
				if left < n {
					n = left
				}
				w, err := c.Write(buf[:n])
				left -= int64(w)
				if err != nil {
					errs[k] = err
					return
				}
			}
			var ack [1]byte
			if _, err := io.ReadFull(c, ack[:]); err != nil {
				errs[k] = fmt.Errorf("reading the ack: %w", err)
			}
		}()
	}
	wg.Wait()
	el := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		fail(fmt.Sprintf("throughput, %d streams: %v", streams, err))
	}
	return float64(per*int64(streams)) / (1 << 20) / el.Seconds()
}

// connRate opens and closes n short connections over workers workers and
// returns connections per second.
func connRate(l *lab.Lab, target func(int) netip.AddrPort, n, workers int) float64 {
	errs := make([]error, workers)
	var wg sync.WaitGroup
	start := time.Now()
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// The sockets are made on a thread in the client namespace.
			errs[w] = l.Client.Do(func() error {
				deadline := time.Now().Add(opLimit)
				for k := w; k < n; k += workers {
					c, err := dial(l.ClientAddrs4[k%len(l.ClientAddrs4)], target(k))
					if err != nil {
						return err
					}
					c.SetDeadline(deadline)
					var b = [1]byte{modeEcho}
					_, err = c.Write(b[:])
					if err == nil {
						_, err = io.ReadFull(c, b[:])
					}
					c.Close()
					if err != nil {
						return fmt.Errorf("connection %d: %w", k, err)
					}
				}
				return nil
			})
		}()
	}
	wg.Wait()
	el := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		fail("connection rate: " + err.Error())
	}
	return float64(n) / el.Seconds()
}

// waitServing waits until an echo through vip succeeds or the balancer
// process ends.
func waitServing(l *lab.Lab, p *lab.Proc, vip netip.AddrPort, what string) {
	waitReady(p, what+" serving "+vip.String(), func() error {
		return l.Client.Do(func() error {
			c, err := dial(l.ClientAddrs4[0], vip)
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(2 * time.Second))
			b := [1]byte{modeEcho}
			if _, err := c.Write(b[:]); err != nil {
				return err
			}
			_, err = io.ReadFull(c, b[:])
			return err
		})
	})
}

// waitReady polls ready until it succeeds, and fails the run if p exits
// first or 15 s pass; what names the wait in the failure.
func waitReady(p *lab.Proc, what string, ready func() error) {
	deadline := time.Now().Add(15 * time.Second)
	for {
		err := ready()
		if err == nil {
			return
		}
		select {
		case <-p.Done():
			fail(fmt.Sprintf("%s: the process exited (%v):\n%s", what, p.Err(), p.Output()))
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			fail(fmt.Sprintf("%s: not ready after 15s (%v):\n%s", what, err, p.Output()))
		}
	}
}

// startTether runs bin as `tether run` on the balancer, with its
// configuration, socket and pins in dir.
func startTether(l *lab.Lab, bin, dir string, vip netip.AddrPort, backends []netip.AddrPort, ports []uint16) (func(), int) {
	if err := os.MkdirAll(filepath.Join(dir, "pins"), 0o700); err != nil {
		fail(err.Error())
	}
	var b strings.Builder
	b.WriteString("datapath: splice\ntables:\n  connections: 65536\n  affinity: 65536\nservices:\n")
	for _, pt := range ports {
		fmt.Fprintf(&b, "  - name: bench-%d\n    vip: %s\n    port: %d\n    affinity: source\n    affinity_timeout: 1h\n    health: {type: none}\n    backends:\n", pt, vip.Addr(), pt)
		for _, a := range backends {
			fmt.Fprintf(&b, "      - address: %s\n", a.Addr())
		}
	}
	cfg := filepath.Join(dir, "tether.yaml")
	if err := os.WriteFile(cfg, []byte(b.String()), 0o600); err != nil {
		fail(err.Error())
	}
	p, err := l.Balancer.Start(bin, "run", "--config", cfg, "--socket", filepath.Join(dir, "tether.sock"),
		"--pin-dir", filepath.Join(dir, "pins"), "--log-level", "warn")
	if err != nil {
		fail("tether run: " + err.Error())
	}
	stop := func() {
		p.Stop()
		if hasLocalRoute(l, vip.Addr()) {
			logf("tether left the local route of %s: removing it", vip.Addr())
			l.Balancer.Run("ip", "route", "del", "local", vip.Addr().String()+"/32", "dev", "lo", "table", "local")
		}
	}
	atExit(stop)
	waitServing(l, p, vip, "tether")
	return stop, p.Cmd.Process.Pid
}

func startHAProxy(l *lab.Lab, tmp string, round int, vip netip.AddrPort, backends []netip.AddrPort, ports []uint16, threads int) (func(), int) {
	var b strings.Builder
	b.WriteString("global\n    maxconn 4000\n")
	if threads > 0 {
		fmt.Fprintf(&b, "    nbthread %d\n", threads)
	}
	b.WriteString("defaults\n    mode tcp\n    option splice-auto\n    maxconn 4000\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n    timeout tunnel 1h\n")
	for _, pt := range ports {
		fmt.Fprintf(&b, "frontend bench-%d\n    bind %s\n    default_backend backends-%d\n", pt, netip.AddrPortFrom(vip.Addr(), pt), pt)
		fmt.Fprintf(&b, "backend backends-%d\n    balance source\n", pt)
		for i, a := range backends {
			fmt.Fprintf(&b, "    server be%d %s\n", i+1, netip.AddrPortFrom(a.Addr(), pt))
		}
	}
	cfg := filepath.Join(tmp, fmt.Sprintf("haproxy-%d.cfg", round))
	if err := os.WriteFile(cfg, []byte(b.String()), 0o600); err != nil {
		fail(err.Error())
	}
	route := []string{"route", "add", "local", vip.Addr().String() + "/32", "dev", "lo", "table", "local"}
	if err := l.Balancer.Run("ip", route...); err != nil {
		fail(err.Error())
	}
	var once sync.Once
	delRoute := func() {
		once.Do(func() {
			route[1] = "del"
			if err := l.Balancer.Run("ip", route...); err != nil {
				logf("%v", err)
			}
		})
	}
	atExit(delRoute)
	p, err := l.Balancer.Start("haproxy", "-db", "-f", cfg)
	if err != nil {
		fail("haproxy: " + err.Error())
	}
	stop := func() {
		p.Stop() // by its PID (ip netns exec execs haproxy)
		delRoute()
	}
	atExit(stop)
	waitServing(l, p, vip, "haproxy")
	return stop, p.Cmd.Process.Pid
}

func hasLocalRoute(l *lab.Lab, a netip.Addr) bool {
	out, err := l.Balancer.Command("ip", "route", "show", "table", "local", a.String()).Output()
	return err == nil && strings.Contains(string(out), "local")
}

func sysctl(h *lab.Host, kv string) {
	if err := h.Run("sysctl", "-qw", kv); err != nil {
		fail(err.Error())
	}
}

// cpuSeconds is the user + system CPU time of pid (0 for pid 0).
func cpuSeconds(pid int) float64 {
	if pid == 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	// Fields after the command: state is f[0]; utime, stime are fields 14, 15 of stat.
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ
}

// switches sums the context switches of pid's threads: those where a
// thread gave up the CPU to wait, and those where it was preempted. The
// counts of threads that have exited are lost, but neither balancer
// normally ends threads while it serves.
func switches(pid int) (wait, preempt float64) {
	if pid == 0 {
		return 0, 0
	}
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return 0, 0
	}
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/status", pid, t.Name()))
		if err != nil {
			continue // the thread has just exited
		}
		for _, line := range strings.Split(string(b), "\n") {
			k, v, ok := strings.Cut(line, ":")
			if !ok {
				continue
			}
			n, _ := strconv.ParseFloat(strings.TrimSpace(v), 64)
			switch k {
			case "voluntary_ctxt_switches":
				wait += n
			case "nonvoluntary_ctxt_switches":
				preempt += n
			}
		}
	}
	return wait, preempt
}

func haproxyVersion() string {
	out, err := exec.Command("haproxy", "-v").Output()
	if err != nil {
		fail("haproxy -v: " + err.Error() + " (apt-get install haproxy)")
	}
	f := strings.Fields(string(out))
	if len(f) < 3 {
		return "?"
	}
	return f[2]
}

func cpus() int { return runtime.NumCPU() }

// machineTimes is the CPU time the machine spent busy and idle since boot,
// over all CPUs, in seconds (the first line of /proc/stat), and its count
// of context switches (the ctxt line).
func machineTimes() (t struct{ busy, idle, switches float64 }) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		fail(err.Error())
	}
	line, rest, _ := strings.Cut(string(b), "\n")
	// cpu user nice system idle iowait irq softirq steal (guest time is
	// counted in user and nice already).
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		fail(fmt.Sprintf("/proc/stat: unexpected first line %q", line))
	}
	for k, x := range f[1:9] {
		v, err := strconv.ParseFloat(x, 64)
		if err != nil {
			fail(fmt.Sprintf("/proc/stat: %q: %v", line, err))
		}
		if k == 3 || k == 4 {
			t.idle += v / 100 // USER_HZ
		} else {
			t.busy += v / 100
		}
	}
	for _, line := range strings.Split(rest, "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "ctxt" {
			v, err := strconv.ParseFloat(f[1], 64)
			if err != nil {
				fail(fmt.Sprintf("/proc/stat: %q: %v", line, err))
			}
			t.switches = v
			return t
		}
	}
	fail("/proc/stat has no ctxt line")
	return t
}

// header writes the head of a Markdown table: the fixed columns (the
// first left-aligned, the others right-aligned), then a column per count,
// named by col with the count.
func header(w io.Writer, fixed []string, col string, counts []int) {
	head, rule := "|", "|"
	for i, c := range fixed {
		head += " " + c + " |"
		if i == 0 {
			rule += "---|"
		} else {
			rule += "---:|"
		}
	}
	for _, n := range counts {
		head += " " + fmt.Sprintf(col, n) + " |"
		rule += "---:|"
	}
	fmt.Fprintln(w, head)
	fmt.Fprintln(w, rule)
}

// counts parses a comma-separated list of counts from 1 to most.
func counts(flagName, list string, most int) []int {
	var out []int
	for _, f := range strings.Split(list, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n > most {
			fail(fmt.Sprintf("bad %s %q: want counts from 1 to %d, separated by commas", flagName, list, most))
		}
		out = append(out, n)
	}
	return out
}

// startNginx runs nginx on be as an HTTP backend on httpPort that answers
// every request with a 1-byte body and closes the connection.
func startNginx(be *lab.Host, tmp string) {
	dir := filepath.Join(tmp, "nginx-"+be.Name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		fail(err.Error())
	}
	conf := fmt.Sprintf(`worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %[1]s/body;
  proxy_temp_path %[1]s/proxy;
  fastcgi_temp_path %[1]s/fastcgi;
  uwsgi_temp_path %[1]s/uwsgi;
  scgi_temp_path %[1]s/scgi;
  server {
    listen %[2]s;
    keepalive_timeout 0;
    location / { return 200 "x"; }
  }
}
`, dir, netip.AddrPortFrom(be.Addr4, httpPort))
	cfg := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		fail(err.Error())
	}
	p, err := be.Start("nginx", "-c", cfg, "-p", dir)
	if err != nil {
		fail("nginx: " + err.Error())
	}
	atExit(func() { p.Stop() })
	// Serving once a connection is accepted.
	addr := netip.AddrPortFrom(be.Addr4, httpPort)
	waitReady(p, "nginx on "+be.Name+" accepting on "+addr.String(), func() error {
		c, err := be.Dial(context.Background(), "tcp", netip.Addr{}, addr.String())
		if err == nil {
			c.Close()
		}
		return err
	})
}

// wrkRate runs wrk from the client host against to for secs seconds with
// conns concurrent connections, each request on a new connection
// (`Connection: close`), and returns the requests per second, which are
// the connections per second. Any error, timeout or non-2xx answer fails
// the run.
func wrkRate(l *lab.Lab, to netip.AddrPort, conns, secs int) float64 {
	out, err := l.Client.Command("wrk", "-t", strconv.Itoa(min(conns, 2)), "-c", strconv.Itoa(conns),
		"-d", fmt.Sprintf("%ds", secs), "-H", "Connection: close", "http://"+to.String()+"/").CombinedOutput()
	if err != nil {
		fail(fmt.Sprintf("wrk: %v\n%s", err, out))
	}
	text := string(out)
	if strings.Contains(text, "Socket errors") || strings.Contains(text, "Non-2xx") {
		fail(fmt.Sprintf("wrk through %s saw errors:\n%s", to, text))
	}
	for _, line := range strings.Split(text, "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "Requests/sec:" {
			if v, err := strconv.ParseFloat(f[1], 64); err == nil && v > 0 {
				return v
			}
		}
	}
	fail("wrk printed no request rate:\n" + text)
	return 0
}

// syscallsPerConn counts the system calls of the process pid while run
// makes n connections through it, per connection and by name.
func syscallsPerConn(pid, n int, run func()) map[string]float64 {
	c, err := syscount.New(pid)
	if err != nil {
		fail("count system calls: " + err.Error())
	}
	defer c.Close()
	before, err := c.Read()
	if err != nil {
		fail(err.Error())
	}
	run()
	after, err := c.Read()
	if err != nil {
		fail(err.Error())
	}
	per := map[string]float64{}
	for name, k := range after.Sub(before).ByName() {
		per[name] = float64(k) / float64(n)
	}
	return per
}

// syscallTable writes the balancers' system calls per connection: a
// column for each call that makes at least 0.1 per connection in one of
// them, the others summed.
func syscallTable(w io.Writer, o options, bals []balancer, samples [][]sample) {
	med := func(ss []sample, name string) float64 {
		return median(ss, func(s sample) float64 { return s.syscalls[name] })
	}
	// Each call's highest median over the balancers.
	seen := map[string]float64{}
	for i := range bals {
		for _, s := range samples[i] {
			for name := range s.syscalls {
				seen[name] = 0
			}
		}
	}
	for name := range seen {
		for i := range bals {
			seen[name] = max(seen[name], med(samples[i], name))
		}
	}
	var cols []string
	for name, v := range seen {
		if v >= 0.1 {
			cols = append(cols, name)
		}
	}
	slices.SortFunc(cols, func(a, b string) int {
		if seen[a] != seen[b] {
			return cmp.Compare(seen[b], seen[a])
		}
		return strings.Compare(a, b)
	})
	fmt.Fprintf(w, "System calls of the balancer process per connection, counted in the kernel by a BPF program on the sys_enter tracepoint (package syscount), in a pass of %d connections by %d workers after the timed ones (medians of the rounds). Unlike rates and CPU times, these counts barely move from round to round.\n\n", o.sysConns, o.workers[0])
	fmt.Fprintf(w, "| balancer | all |")
	for _, c := range cols {
		fmt.Fprintf(w, " %s |", c)
	}
	fmt.Fprintln(w, " other |")
	fmt.Fprint(w, "|---|---:|")
	fmt.Fprint(w, strings.Repeat("---:|", len(cols)+1))
	fmt.Fprintln(w)
	for i, b := range bals {
		all := median(samples[i], func(s sample) float64 {
			var t float64
			for _, v := range s.syscalls {
				t += v
			}
			return t
		})
		fmt.Fprintf(w, "| %s | %.1f |", b.name, all)
		rest := all
		for _, c := range cols {
			v := med(samples[i], c)
			rest -= v
			fmt.Fprintf(w, " %.2f |", v)
		}
		fmt.Fprintf(w, " %.2f |\n", max(rest, 0))
	}
	fmt.Fprintln(w)
}
