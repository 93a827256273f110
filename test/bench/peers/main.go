// Command peers measures tether against the balancers people use for the
// same job, on one lab of network namespaces and in one run:
//
//  1. the XDP program's own cost per packet with BPF_PROG_TEST_RUN
//     (package progcost), and under lab traffic from the kernel's BPF
//     run-time statistics;
//  2. small-UDP packet rate from the client host through the balancer
//     host, counted at the backends (frames made by an XDP program run
//     with BPF_PROG_TEST_RUN live frames, package pktgen);
//  3. WebSocket connection rate, and echo round-trip p50/p99 with many
//     connections held open;
//  4. iperf3 bulk throughput, one stream and four;
//  5. the affinity check: client addresses that reached more than one
//     backend across reconnects, and the spread over the backends;
//  6. what a proxy costs (proxy.go): raw TCP throughput and connection
//     rate with Go clients, the connection rate of wrk against nginx
//     backends, and the balancer process's CPU time, context switches and
//     system calls per connection;
//
// through every registered peer (peer_*.go: direct, tether XDP and
// splice, HAProxy, nginx, nftables stand-ins for IPVS, kernel forwarding,
// a trivial XDP forwarder). Rounds are interleaved, each peer in turn, so
// that drift of the machine falls on all alike; the report gives medians
// and the spread, and ratios to the references measured in the same run.
//
// It needs root, and haproxy, nginx (with the stream module), nftables,
// iperf3 and wrk (`make bench` installs them). Everything it sets up is removed at
// the end, also on failure or interrupt.
package main

import (
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/test/bench/benchrun"
	"github.com/tetherlb/tether/test/bench/pktgen"
	"github.com/tetherlb/tether/test/bench/progcost"
)

// opLimit bounds every load phase in time.
const opLimit = 2 * time.Minute

// The shared exit path of the benchmark commands.
var (
	atExit  = benchrun.AtExit
	fail    = benchrun.Fail
	logf    = benchrun.Logf
	cleanup = benchrun.Cleanup
)

type options struct {
	genMethod string // how the packet generator sent (pktgen.Generator.Method), for the report

	runs        int
	clients     int
	wsConns     int
	wsWorkers   int
	heavyConc   int // the heavy profile: connections at a time (0: none)
	heavyHeld   int // and connections held open meanwhile
	hold        int
	holdSecs    int
	iperfSecs   int
	packets     uint
	statPackets uint
	costRepeat  int
	only        string
	out, chart  string

	// The proxy rows.
	mib      int   // MiB per throughput measurement
	conns    int   // connections per connection-rate measurement
	workers  []int // concurrent workers, one measurement each
	wrkConns []int // wrk's concurrent connections, one measurement each
	wrkSecs  int
	sysConns int    // connections over which system calls are counted (0: none)
	compare  string // another tether build, measured as one more peer
}

// sample is one round's measurements of one peer.
type sample struct {
	wire                wireResult
	connRate            float64
	connFailed          int
	heavyRate           float64 // the heavy profile's connection rate
	heavyFailed         int     // its failed connections, held ones included
	heavyCost           heavyCost
	p50, p99            time.Duration
	echoes, echoFailed  int
	bulk1, bulk4        float64 // Gbit/s
	proxy               proxySample
	hasWire, hasStreams bool
	hasProxy            bool
}

type peerResult struct {
	Peer
	samples []sample
	aff     *affinity
}

func main() {
	benchrun.Name = "peers"
	var o options
	flag.IntVar(&o.runs, "runs", 3, "interleaved rounds; medians are reported")
	flag.IntVar(&o.clients, "clients", 200, "client source addresses (at most 240)")
	flag.IntVar(&o.wsConns, "ws-conns", 2000, "WebSocket connections per connection-rate measurement")
	flag.IntVar(&o.wsWorkers, "ws-workers", 8, "concurrent workers of the connection-rate measurement")
	flag.IntVar(&o.heavyConc, "heavy-workers", 64, "the heavy WebSocket profile: concurrent workers of a second connection-rate measurement, made while -heavy-held connections are held open (0: no heavy profile)")
	flag.IntVar(&o.heavyHeld, "heavy-held", 2000, "the heavy WebSocket profile: connections held open during it")
	flag.IntVar(&o.hold, "hold", 1000, "WebSocket connections held open for the echo latency")
	flag.IntVar(&o.holdSecs, "hold-secs", 10, "seconds the held connections echo (one message a second each)")
	flag.IntVar(&o.iperfSecs, "iperf-secs", 3, "seconds per iperf3 run")
	flag.UintVar(&o.packets, "packets", 4_000_000, "UDP frames per packet-rate measurement")
	flag.UintVar(&o.statPackets, "stat-packets", 1_000_000, "UDP frames sent with BPF run-time statistics on")
	flag.IntVar(&o.costRepeat, "cost-repeat", 5_000_000, "packets per BPF_PROG_TEST_RUN cost measurement")
	flag.StringVar(&o.only, "peers", "", "comma-separated substrings: measure only the peers whose names contain one")
	flag.IntVar(&o.mib, "mib", 512, "proxy rows: MiB sent per raw TCP throughput measurement (split over the streams)")
	flag.IntVar(&o.conns, "conns", 10000, "proxy rows: connections per raw connection-rate measurement")
	workers := flag.String("workers", "4,16", "proxy rows: concurrent workers of the raw connection rates, a comma-separated `list`, one measurement each")
	wrkConns := flag.String("wrk", "4,16", "proxy rows: concurrent connections of wrk against nginx backends, a comma-separated `list`, one measurement each (empty: none)")
	flag.IntVar(&o.wrkSecs, "wrk-secs", 3, "proxy rows: seconds per wrk measurement")
	flag.IntVar(&o.sysConns, "syscall-conns", 2000, "proxy rows: connections over which the balancer's system calls are counted, after the timed ones (0: none)")
	haproxyThreads := flag.Int("haproxy-threads", 0, "HAProxy's nbthread (0: its default, one per CPU)")
	flag.StringVar(&o.compare, "compare", "", "also measure this tether `binary` (another build) in the proxy rows, as one more peer in every round")
	flag.StringVar(&o.out, "out", "", "write the report (Markdown) to this `file`")
	flag.StringVar(&o.chart, "chart", "", "write the chart (PNG) to this `file`")
	flag.Parse()
	if o.runs < 1 || o.clients < 1 || o.clients > lab.MaxClients || o.wsConns < 1 || o.wsWorkers < 1 ||
		o.hold < 1 || o.holdSecs < 1 || o.iperfSecs < 1 || o.packets < 1 || o.packets > 1<<31 || o.statPackets > 1<<31 {
		fail("bad flags (see -h)")
	}
	if o.heavyConc < 0 || o.heavyHeld < 0 || o.heavyHeld > 8000 {
		fail("bad flags: -heavy-workers and -heavy-held are at least 0, -heavy-held at most 8000")
	}
	if o.mib < 8 || o.conns < 1 || o.wrkSecs < 1 || o.sysConns < 0 || *haproxyThreads < 0 {
		fail("bad flags: -mib is at least 8, -conns and -wrk-secs at least 1, -syscall-conns and -haproxy-threads at least 0")
	}
	o.workers = counts("-workers", *workers, o.conns)
	if *wrkConns != "" {
		o.wrkConns = counts("-wrk", *wrkConns, 10000)
	}
	if o.compare != "" {
		abs, err := filepath.Abs(o.compare)
		if st, serr := os.Stat(abs); err != nil || serr != nil || st.IsDir() || st.Mode()&0o111 == 0 {
			fail(fmt.Sprintf("bad flags: -compare %q is not an executable file", o.compare))
		}
		registerCompare(abs)
	}
	benchrun.FailOnSignal()
	defer cleanup()

	var selected []peerResult
	for _, p := range peers {
		if o.only == "" || containsAny(p.Name, strings.Split(o.only, ",")) {
			selected = append(selected, peerResult{Peer: p, aff: newAffinity()})
		}
	}
	if len(selected) == 0 {
		fail("no peer matches -peers " + o.only)
	}
	tools := versions(selected, o)

	logf("BPF_PROG_TEST_RUN cost, %d packets x %d rounds", o.costRepeat, o.runs)
	cost, err := progcost.Measure(o.costRepeat, o.runs)
	if err != nil {
		fail(err.Error())
	}

	e := setup(o, selected)
	e.HAProxyThreads = *haproxyThreads
	gen, err := pktgen.NewGenerator(genSources, genPorts)
	if err != nil {
		fail("packet generator: " + err.Error())
	}
	atExit(func() { gen.Close() })

	start := time.Now()
	for r := range o.runs {
		e.round = r
		// The balancers go in an order that rotates by one each round:
		// each inherits what the one before it left on the hosts (the
		// clients' TIME_WAIT sockets, caches), and none should always
		// follow the same one.
		for k := range selected {
			pr := &selected[(k+r)%len(selected)]
			pr.samples = append(pr.samples, measure(e, pr, gen, o))
		}
	}
	logf("measured in %s", time.Since(start).Round(time.Second))
	o.genMethod = gen.Method()
	report(o, e, cost, selected, tools)
}

func containsAny(s string, subs []string) bool {
	for _, sub := range subs {
		if sub = strings.TrimSpace(sub); sub != "" && strings.Contains(strings.ToLower(s), strings.ToLower(sub)) {
			return true
		}
	}
	return false
}

// measure starts p, takes its rows and stops it.
func measure(e *Env, pr *peerResult, gen *pktgen.Generator, o options) sample {
	p := pr.Peer
	var s sample
	if err := e.Lab.SetPortXDP(e.Lab.Balancer, p.XDP); err != nil {
		fail(err.Error())
	}
	run, err := p.Start(e)
	if err != nil {
		fail(fmt.Sprintf("starting %s: %v", p.Name, err))
	}
	var once sync.Once
	stopOnce := func() {
		once.Do(func() {
			if err := run.Stop(); err != nil {
				fail(fmt.Sprintf("stopping %s: %v", p.Name, err))
			}
		})
	}
	atExit(stopOnce)
	if p.Rows&RowPackets != 0 {
		s.hasWire = true
		stat := uint32(o.statPackets)
		if s.wire, err = wire(e, p, gen, uint32(o.packets), stat); err != nil {
			fail(fmt.Sprintf("%s, packet rate: %v", p.Name, err))
		}
		logf("round %d %s: %.2f Mpps (%d of %d frames), program %.0f ns/run", e.round+1, p.Name,
			s.wire.mpps(), s.wire.received, s.wire.sent, s.wire.progNs)
	}
	if p.Rows&RowStreams != 0 {
		s.hasStreams = true
		s.connRate, s.connFailed = connRate(e, p, pr.aff, o.wsConns, o.wsWorkers)
		if o.heavyConc > 0 {
			s.heavyRate, s.heavyFailed, s.heavyCost = heavyConnRate(e, p, run.PID, pr.aff, o.wsConns, o.heavyConc, o.heavyHeld)
			logf("round %d %s: %.0f conns/s %d at a time with %d held (%d failed); balancer process %.2f s CPU, %d segments retransmitted, %d packets into the balancer's IP stack",
				e.round+1, p.Name, s.heavyRate, o.heavyConc, o.heavyHeld, s.heavyFailed, s.heavyCost.cpu, s.heavyCost.retrans, s.heavyCost.ipIn)
		}
		rtts, bad := holdEcho(e, p, pr.aff, o.hold, o.holdSecs)
		s.echoes, s.echoFailed = len(rtts), bad
		s.p50, s.p99 = percentile(rtts, 0.50), percentile(rtts, 0.99)
		if s.bulk1, err = iperf3(e, p, 1, o.iperfSecs); err != nil {
			fail(err.Error())
		}
		if s.bulk4, err = iperf3(e, p, 4, o.iperfSecs); err != nil {
			fail(err.Error())
		}
		logf("round %d %s: %.0f conns/s (%d failed), echo p50 %s p99 %s (%d echoes, %d failed), iperf3 %.2f / %.2f Gbit/s",
			e.round+1, p.Name, s.connRate, s.connFailed, s.p50, s.p99, s.echoes, s.echoFailed, s.bulk1, s.bulk4)
	}
	if p.Rows&RowProxy != 0 {
		s.hasProxy = true
		if s.proxy, err = measureProxy(e, p, run.PID, o); err != nil {
			fail(fmt.Sprintf("%s, proxy rows: %v", p.Name, err))
		}
		logf("round %d %s: raw TCP 1 stream %.0f MiB/s, 8 streams %.0f MiB/s, conns/s %.0f, wrk %.0f",
			e.round+1, p.Name, s.proxy.one, s.proxy.eight, s.proxy.cps, s.proxy.http)
	}
	stopOnce()
	return s
}

// setup builds the tether binary and the lab, and starts the backends'
// servers: a WebSocket echo server, an iperf3 server and the raw TCP
// server on each, and nginx for wrk when a selected peer takes the proxy
// rows.
func setup(o options, selected []peerResult) *Env {
	tmp, err := os.MkdirTemp("", "tether-peers-*")
	if err != nil {
		fail(err.Error())
	}
	atExit(func() { os.RemoveAll(tmp) })
	e := &Env{Tmp: tmp, Tether: filepath.Join(tmp, "tether")}
	logf("building tether")
	if b, err := exec.Command("go", "build", "-o", e.Tether, "./cmd/tether").CombinedOutput(); err != nil {
		fail(fmt.Sprintf("go build ./cmd/tether: %v\n%s", err, b))
	}
	l, err := lab.New(lab.Options{Backends: 3, Clients: o.clients})
	if err != nil {
		fail("lab: " + err.Error())
	}
	atExit(func() {
		if err := l.Close(); err != nil {
			logf("closing the lab: %v", err)
		}
	})
	e.Lab, e.VIP, e.Pins = l, l.VIP4, filepath.Join(l.BPFFS, "tether")
	logf("lab %s: client, balancer, %d backends, %d client addresses", l.ID, len(l.Backends), o.clients)
	for _, h := range []*lab.Host{l.Client, l.Balancer} {
		// Many short connections in a row.
		for _, kv := range [][2]string{{"net.ipv4.ip_local_port_range", "1024 65000"}, {"net.ipv4.tcp_tw_reuse", "1"}} {
			if _, err := e.Sysctl(h, kv[0], kv[1]); err != nil {
				fail(err.Error())
			}
		}
	}
	for _, be := range l.Backends {
		e.BackendAddrs = append(e.BackendAddrs, be.Addr4)
		ln, err := be.Listen("tcp", fmt.Sprintf("0.0.0.0:%d", portWS))
		if err != nil {
			fail(err.Error())
		}
		srv := lab.ServeEcho(ln, be.Name)
		atExit(func() { srv.Close() })
		p, err := be.Start("iperf3", "-s", "-p", fmt.Sprint(portBulk))
		if err != nil {
			fail(err.Error())
		}
		atExit(func() { p.Stop() })
		raw, err := be.Listen("tcp", netip.AddrPortFrom(be.Addr4, portRaw).String())
		if err != nil {
			fail(err.Error())
		}
		atExit(func() { raw.Close() })
		go serveRaw(raw)
		if len(o.wrkConns) > 0 && slices.ContainsFunc(selected, func(pr peerResult) bool { return pr.Rows&RowProxy != 0 }) {
			stop, err := startHTTPBackend(e, be)
			if err != nil {
				fail(err.Error())
			}
			atExit(func() { stop() })
		}
	}
	return e
}

// versions returns the version lines of the peers' programs, and fails
// with the way out when one is missing.
func versions(prs []peerResult, o options) map[string]string {
	need := map[string][]string{"iperf3": {"iperf3", "--version"}}
	for _, pr := range prs {
		if len(pr.Version) > 0 {
			need[pr.Version[0]] = pr.Version
		}
		if pr.Rows&RowProxy != 0 && o.wrkConns != nil {
			need["wrk"] = []string{"wrk", "--version"}
			need["nginx"] = []string{"nginx", "-v"}
		}
	}
	out := map[string]string{}
	for name, cmd := range need {
		b, err := exec.Command(cmd[0], cmd[1:]...).CombinedOutput()
		// wrk prints its version, then its usage, and exits with 1.
		if err != nil && !(name == "wrk" && strings.HasPrefix(string(b), "wrk ")) {
			fail(fmt.Sprintf("%s: %v (make bench installs it; or apt-get install %s)", name, err, name))
		}
		out[name] = strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0])
	}
	if _, ok := need["nginx"]; ok {
		if _, err := os.Stat(nginxModule); err != nil {
			fail("nginx's stream module is missing: apt-get install libnginx-mod-stream")
		}
	}
	return out
}
