// Command flood measures what a flood of spoofed SYNs at the packet
// generator's highest rate costs WebSocket connections held through the
// balancer: their echo round trips before and while the flood runs, and
// whether any breaks. It measures tether's XDP datapath and the trivial XDP
// forwarder (a stateless program that rewrites the MACs of every frame to
// the VIP and sends it to one backend: the floor of an XDP balancer) in
// alternating rounds on one lab, so that the flood's cost to the lab itself
// (two CPUs carry the generator, every veth hop, the clients and the
// backends' SYN handling) shows in both.
//
//	sudo go run ./test/bench/flood -out docs/bench/flood.md
package main

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/tetherlb/tether/internal/bpftest"
	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/internal/lab/scenario"
	"github.com/tetherlb/tether/test/bench/benchrun"
	"github.com/tetherlb/tether/test/bench/pktgen"
)

type options struct {
	out   string
	conns int
	syns  uint
	runs  int
}

// Spoofed sources: 192.0.2.200 and up, 50 addresses of 4,000 ports each,
// which no client of the lab uses.
const (
	floodSources = 50
	floodPorts   = 4000
)

type env struct {
	l    *lab.Lab
	dir  string
	bin  string
	gen  *pktgen.Generator
	conf string
}

// balancer is one way of balancing the lab's VIP: start puts it in place,
// and the function it returns takes it away.
type balancer struct {
	name  string
	start func(e *env) func()
}

// result is one balancer's figures in one round.
type result struct {
	base, flooded []time.Duration // echo round trips
	broken        int             // connections that broke or moved
	synRate       float64         // SYNs the generator sent a second
	// TCP segments the clients retransmitted before the flood (in the
	// three rounds) and during it; and the backends, their SYN-ACKs left
	// out.
	retransBase, retransFlood     uint64
	beRetransBase, beRetransFlood uint64
	// Shares of the machine's CPU time during the flood: idle, and
	// softirq (the packets' path through every hop).
	idle, softirq float64
	// Packets the CPUs' input queues (the backlog every veth hop passes
	// through) dropped during the flood.
	backlogDrops uint64
}

func main() {
	benchrun.Name = "flood"
	defer benchrun.Cleanup()
	benchrun.FailOnSignal()
	var o options
	flag.StringVar(&o.out, "out", "", "also write the report to `FILE`")
	flag.IntVar(&o.conns, "conns", 1000, "WebSocket connections held")
	flag.UintVar(&o.syns, "syns", 2_000_000, "spoofed SYNs per flood")
	flag.IntVar(&o.runs, "runs", 3, "rounds, each measuring every balancer once")
	flag.Parse()
	if os.Geteuid() != 0 {
		benchrun.Fail("needs root (network namespaces, XDP)")
	}
	e := setup()
	balancers := []balancer{
		{"trivial XDP forwarder", trivial},
		{"tether (xdp)", tether},
	}
	results := make([][]result, len(balancers))
	for run := range o.runs {
		for i, b := range balancers {
			benchrun.Logf("round %d of %d: %s", run+1, o.runs, b.name)
			stop := b.start(e)
			results[i] = append(results[i], measure(e, o))
			stop()
		}
	}

	w := benchrun.Report(o.out)
	p := func(format string, args ...any) { fmt.Fprintf(w, format, args...) }
	p("# A SYN flood under held WebSockets\n\n")
	p("`sudo go run ./test/bench/flood -out docs/bench/flood.md` (`make soak`), %s, %s, %d CPUs.\n\n",
		time.Now().UTC().Format("2006-01-02"), benchrun.Kernel(), runtime.NumCPU())
	p("%d WebSocket connections from %d client addresses to the lab's VIP, echoing a message each in rounds (16 at a time). "+
		"Each balancer in turn: three rounds without a flood, then rounds for as long as the packet generator (%s) sends %d spoofed SYNs "+
		"from %d 5-tuples at its highest rate to the VIP's port from the client's interface. "+
		"tether runs the lab's configuration (source affinity, three backends, `tables.insert_rate` at its default); "+
		"the trivial XDP forwarder sends every frame to the VIP to one backend. Every host of the lab shares this machine's CPUs.\n\n",
		o.conns, len(e.l.ClientAddrs4), e.gen.Method(), o.syns, floodSources*floodPorts)
	p("| balancer | round | SYNs a second | echo p50 / p99 before | echo p50 / p99 during the flood | p99 during ÷ before | TCP retransmits before / during: clients, backends | CPU idle / softirq during | backlog drops during | broke or moved |\n|---|---|---|---|---|---|---|---|---|---|\n")
	for i, b := range balancers {
		for run, r := range results[i] {
			p("| %s | %d | %.0f | %s / %s | %s / %s | %.1f | %d / %d, %d / %d | %.0f%% / %.0f%% | %d | %d |\n", b.name, run+1, r.synRate,
				quantile(r.base, 0.5), quantile(r.base, 0.99), quantile(r.flooded, 0.5), quantile(r.flooded, 0.99),
				ratio(r.flooded, r.base), r.retransBase, r.retransFlood, r.beRetransBase, r.beRetransFlood, 100*r.idle, 100*r.softirq, r.backlogDrops, r.broken)
		}
	}
	p("\nTCP retransmits are the segments of the held connections sent again after a loss: RetransSegs (/proc/net/snmp) of the client's namespace, and of the backends' less their SYN and SYN-ACK retransmits (TCPSynRetrans in /proc/net/netstat: the SYN-ACKs to the spoofed sources). CPU idle and softirq are shares of all CPUs' time while the flood ran (/proc/stat). Backlog drops are packets the CPUs' input queues refused (/proc/net/softnet_stat, netdev_max_backlog): every veth hop of the lab passes through them, the flood's packets and the held connections' alike; a machine's NIC queues are its own.\n")
	p("\nMedians over the rounds: ")
	for i, b := range balancers {
		var ratios []float64
		for _, r := range results[i] {
			ratios = append(ratios, ratio(r.flooded, r.base))
		}
		p("%s, p99 during the flood %.1f times the p99 before; ", b.name, benchrun.Median(ratios))
	}
	p("the issue's target is at most 2.\n")
	for i, b := range balancers {
		for _, r := range results[i] {
			if r.broken > 0 {
				benchrun.Fail(fmt.Sprintf("%s: %d connections broke or moved", b.name, r.broken))
			}
		}
	}
}

func setup() *env {
	e := &env{}
	e.dir, e.bin, e.l = benchrun.Setup("tether-flood-", lab.Options{Backends: 3, Clients: 100})
	l := e.l
	for _, be := range l.Backends {
		p, err := scenario.StartEcho(context.Background(), e.bin, be, l.VIP4, be.Addr4)
		if p != nil {
			benchrun.AtExit(func() { p.Stop() })
		}
		if err != nil {
			benchrun.Fail(err.Error())
		}
	}
	// The generator sends with XDP_TX from the client's veth.
	if err := l.SetPortXDP(l.Client, true); err != nil {
		benchrun.Fail(err.Error())
	}
	var err error
	if e.gen, err = pktgen.NewGenerator(floodSources, floodPorts); err != nil {
		benchrun.Fail(err.Error())
	}
	benchrun.AtExit(func() { e.gen.Close() })
	data, err := scenario.HostConfig(l, l.Balancer, l.Backends, "xdp", nil).Marshal()
	if err != nil {
		benchrun.Fail(err.Error())
	}
	e.conf = filepath.Join(e.dir, "tether.yaml")
	if err := os.WriteFile(e.conf, data, 0o600); err != nil {
		benchrun.Fail(err.Error())
	}
	return e
}

// trivial attaches the trivial XDP forwarder to the balancer.
func trivial(e *env) func() { return benchrun.TrivialForwarder(e.l) }

// tether runs the daemon until the returned function stops it and detaches
// its program.
func tether(e *env) func() { return benchrun.TetherDaemon(e.l, e.bin, e.conf, e.dir, "tether-flood") }

// conn is a held connection and the backend that answered its first echo.
type conn struct {
	ws      *lab.WSClient
	backend string
}

// measure opens the connections, times three echo rounds, then echo rounds
// while a SYN flood runs, and closes the connections.
func measure(e *env, o options) result {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	url := fmt.Sprintf("ws://%s/chat", netip.AddrPortFrom(e.l.VIP4, scenario.Port))
	conns := make([]*conn, o.conns)
	parallel(len(conns), func(i int) {
		src := e.l.ClientAddrs4[i%len(e.l.ClientAddrs4)]
		ws, err := lab.DialWS(ctx, e.l.Client, src, url)
		if err != nil {
			benchrun.Fail(err.Error())
		}
		b, err := ws.Echo(ctx, "hello")
		if err != nil {
			benchrun.Fail(err.Error())
		}
		conns[i] = &conn{ws, b}
	})
	defer func() {
		for _, c := range conns {
			c.ws.Close()
		}
	}()
	var r result
	r0, b0 := retransmits(e)
	for range 3 {
		rtts, broken := echoRound(ctx, conns)
		r.base, r.broken = append(r.base, rtts...), r.broken+broken
	}
	r1, b1 := retransmits(e)
	r.retransBase, r.beRetransBase = r1-r0, b1-b0
	frame := pktgen.TCPFrame(e.l.Client.MAC, e.l.Balancer.MAC, netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, 200}), 1024),
		netip.AddrPortFrom(e.l.VIP4, scenario.Port), bpftest.SYN)
	cpu0, drops0 := cpuTimes(), backlogDrops()
	done := make(chan struct{})
	var elapsed time.Duration
	go func() {
		defer close(done)
		if err := e.l.Client.Do(func() error {
			var err error
			elapsed, err = e.gen.Send(e.l.Client.Ifindex, frame, uint32(o.syns))
			return err
		}); err != nil {
			benchrun.Fail(err.Error())
		}
	}()
	for flooding := true; flooding; {
		rtts, broken := echoRound(ctx, conns)
		r.flooded, r.broken = append(r.flooded, rtts...), r.broken+broken
		select {
		case <-done:
			flooding = false
		default:
		}
	}
	r.synRate = float64(o.syns) / elapsed.Seconds()
	cpu1 := cpuTimes()
	r.backlogDrops = backlogDrops() - drops0
	var total uint64
	for i := range cpu1 {
		total += cpu1[i] - cpu0[i]
	}
	// /proc/stat's cpu line: user nice system idle iowait irq softirq ...
	r.idle = float64(cpu1[3]-cpu0[3]) / float64(total)
	r.softirq = float64(cpu1[6]-cpu0[6]) / float64(total)
	r2, b2 := retransmits(e)
	r.retransFlood, r.beRetransFlood = r2-r1, b2-b1
	_, broken := echoRound(ctx, conns) // all still there after it
	r.broken += broken
	return r
}

// cpuTimes are the fields of /proc/stat's first line (all CPUs), in
// clock ticks.
func cpuTimes() []uint64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		benchrun.Fail(err.Error())
	}
	line, _, _ := strings.Cut(string(b), "\n")
	var out []uint64
	for _, f := range strings.Fields(line)[1:] {
		v, err := strconv.ParseUint(f, 10, 64)
		if err != nil {
			benchrun.Fail(fmt.Sprintf("/proc/stat: %q: %v", line, err))
		}
		out = append(out, v)
	}
	return out
}

// backlogDrops sums the packets the CPUs' input queues dropped: the
// second column of /proc/net/softnet_stat, in hexadecimal, one line a CPU.
func backlogDrops() uint64 {
	b, err := os.ReadFile("/proc/net/softnet_stat")
	if err != nil {
		benchrun.Fail(err.Error())
	}
	var n uint64
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			benchrun.Fail(fmt.Sprintf("/proc/net/softnet_stat: %q", line))
		}
		v, err := strconv.ParseUint(f[1], 16, 64)
		if err != nil {
			benchrun.Fail(fmt.Sprintf("/proc/net/softnet_stat: %q: %v", line, err))
		}
		n += v
	}
	return n
}

// retransmits are the TCP segments retransmitted in the client's network
// namespace and in the backends', their SYN and SYN-ACK retransmits left
// out of both.
func retransmits(e *env) (client, backends uint64) {
	for i, h := range append([]*lab.Host{e.l.Client}, e.l.Backends...) {
		var n uint64
		if err := h.Do(func() error {
			snmp, err := os.ReadFile("/proc/thread-self/net/snmp")
			if err != nil {
				return err
			}
			netstat, err := os.ReadFile("/proc/thread-self/net/netstat")
			if err != nil {
				return err
			}
			all, err := benchrun.SNMPField(string(snmp), "Tcp:", "RetransSegs")
			if err != nil {
				return err
			}
			syn, err := benchrun.SNMPField(string(netstat), "TcpExt:", "TCPSynRetrans")
			n = all - syn
			return err
		}); err != nil {
			benchrun.Fail(err.Error())
		}
		if i == 0 {
			client = n
		} else {
			backends += n
		}
	}
	return client, backends
}

// echoRound echoes once on every connection, 16 at a time, and returns
// the round trips of those that answered from their backend and how many
// did not.
func echoRound(ctx context.Context, conns []*conn) ([]time.Duration, int) {
	var mu sync.Mutex
	var rtts []time.Duration
	broken := 0
	parallel(len(conns), func(i int) {
		start := time.Now()
		b, err := conns[i].ws.Echo(ctx, fmt.Sprint("echo ", i))
		d := time.Since(start)
		mu.Lock()
		defer mu.Unlock()
		if err != nil || b != conns[i].backend {
			broken++
			return
		}
		rtts = append(rtts, d)
	})
	return rtts, broken
}

// parallel runs f(0) to f(n-1), 16 at a time.
func parallel(n int, f func(i int)) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			f(i)
		}()
	}
	wg.Wait()
}

func quantile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[int(q*float64(len(s)-1))].Round(10 * time.Microsecond)
}

func ratio(during, before []time.Duration) float64 {
	b := quantile(before, 0.99)
	if b == 0 {
		return 0
	}
	return float64(quantile(during, 0.99)) / float64(b)
}
