package main

import (
	"fmt"
	"os"
	"runtime"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/tetherlb/tether/test/bench/benchrun"
	"github.com/tetherlb/tether/test/bench/chart"
	"github.com/tetherlb/tether/test/bench/progcost"
)

// stat is the median and range of one figure over the rounds.
type stat struct{ med, lo, hi float64 }

func statOf(ss []sample, ok func(sample) bool, f func(sample) float64) stat {
	var xs []float64
	for _, s := range ss {
		if ok(s) {
			xs = append(xs, f(s))
		}
	}
	if len(xs) == 0 {
		return stat{}
	}
	return stat{benchrun.Median(xs), slices.Min(xs), slices.Max(xs)}
}

func wireOK(s sample) bool    { return s.hasWire }
func streamsOK(s sample) bool { return s.hasStreams }

// Figures of a peer, by row.
func (pr peerResult) mpps() stat {
	return statOf(pr.samples, wireOK, func(s sample) float64 { return s.wire.mpps() })
}
func (pr peerResult) delivered() stat {
	return statOf(pr.samples, wireOK, func(s sample) float64 { return float64(s.wire.received) / float64(s.wire.sent) })
}
func (pr peerResult) progNs() stat {
	return statOf(pr.samples, wireOK, func(s sample) float64 { return s.wire.progNs })
}
func (pr peerResult) connRate() stat {
	return statOf(pr.samples, streamsOK, func(s sample) float64 { return s.connRate })
}
func (pr peerResult) heavyRate() stat {
	return statOf(pr.samples, streamsOK, func(s sample) float64 { return s.heavyRate })
}
func (pr peerResult) p50() stat {
	return statOf(pr.samples, streamsOK, func(s sample) float64 { return us(s.p50) })
}
func (pr peerResult) p99() stat {
	return statOf(pr.samples, streamsOK, func(s sample) float64 { return us(s.p99) })
}
func (pr peerResult) bulk1() stat {
	return statOf(pr.samples, streamsOK, func(s sample) float64 { return s.bulk1 })
}
func (pr peerResult) bulk4() stat {
	return statOf(pr.samples, streamsOK, func(s sample) float64 { return s.bulk4 })
}
func (pr peerResult) failures() (conns, echoes int) {
	for _, s := range pr.samples {
		conns += s.connFailed + s.heavyFailed
		echoes += s.echoFailed
	}
	return conns, echoes
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1000 }

// f formats v with precision prec, or "–" when there is no value.
func f(v float64, prec int) string {
	if v == 0 {
		return "–"
	}
	return fmt.Sprintf("%.*f", prec, v)
}

func (s stat) fmt(prec int) string {
	if s.med == 0 {
		return "–"
	}
	return fmt.Sprintf("%s (%s–%s)", f(s.med, prec), f(s.lo, prec), f(s.hi, prec))
}

func ratio(a, b float64) string {
	if a == 0 || b == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f", a/b)
}

// results indexes the measured peers by the roles the targets name.
type results struct {
	all                 []peerResult
	direct, xdp, splice *peerResult
	nat, fullnat        *peerResult   // tether's XDP datapath in its translating modes
	encap               []*peerResult // and in its encapsulating ones
	trivial             *peerResult
	stateless           *peerResult   // the stateless forwarder over every backend
	proxies             []*peerResult // HAProxy, nginx: what the splice datapath must match
	kernel              []*peerResult // the kernel stand-ins and forwarding
}

func index(prs []peerResult) results {
	r := results{all: prs}
	for i := range prs {
		pr := &prs[i]
		if pr.Direct {
			r.direct = pr
		}
		switch pr.Role {
		case RoleTetherXDP:
			r.xdp = pr
		case RoleTetherSplice:
			r.splice = pr
		case RoleTetherNAT:
			r.nat = pr
		case RoleTetherFullNAT:
			r.fullnat = pr
		case RoleTetherEncap:
			r.encap = append(r.encap, pr)
		case RoleTrivial:
			r.trivial = pr
		case RoleStateless:
			r.stateless = pr
		case RoleHAProxy, RoleNginx:
			r.proxies = append(r.proxies, pr)
		case RoleKernel:
			r.kernel = append(r.kernel, pr)
		}
	}
	return r
}

func report(o options, e *Env, cost []progcost.Result, prs []peerResult, tools map[string]string) {
	w := benchrun.Report(o.out)
	r := index(prs)
	p := func(format string, args ...any) { fmt.Fprintf(w, format, args...) }

	p("# tether against its peers (%s, %s, %d CPUs)\n\n", time.Now().UTC().Format("2006-01-02"), benchrun.Kernel(), runtime.NumCPU())
	p("Produced by `%s`, one run: one lab of network namespaces (a client host with %d source addresses, a balancer host, three backends, all on one software bridge, documentation addresses only), ", command(), o.clients)
	p("%d interleaved rounds in which each balancer in turn is set up on the balancer host, measured and removed, in an order that rotates by one each round. Figures are medians with the range over the rounds in parentheses.\n\n", o.runs)
	p("Every host, the load generator and the servers share this machine's %d CPUs: whole-path figures are compressed toward the no-balancer reference, so they are given as ratios to the reference measured in the same round set, and the balancer's own cost per packet is given apart (rows 1 and 2). ", runtime.NumCPU())
	p("The kernel here is built without IPVS: nftables stands in for its NAT and direct-routing modes.\n\n")

	costRow(p, cost, r, o)
	wireRow(p, r, o)
	wsRow(p, r, o)
	bulkRow(p, r, o)
	affinityRow(p, r)
	proxyRows(p, r, o)
	targets(p, cost, r, o)
	reading(p, r, o)
	setups(p, r, tools)

	if o.chart != "" {
		png, err := chart.Render(fmt.Sprintf("tether against its peers — %s, %d CPUs, medians of %d rounds (sudo make bench)", time.Now().UTC().Format("2006-01-02"), runtime.NumCPU(), o.runs), panels(r), 1200)
		if err != nil {
			fail("chart: " + err.Error())
		}
		if err := os.WriteFile(o.chart, png, 0o644); err != nil {
			fail(err.Error())
		}
	}
}

type printf func(format string, args ...any)

func costRow(p printf, cost []progcost.Result, r results, o options) {
	floor := cost[0].Median()
	p("## 1. The XDP program's own cost per packet\n\n")
	p("BPF_PROG_TEST_RUN, %d packets per measurement, one measurement per round:\n\n", o.costRepeat)
	p("| path | ns/packet | x floor |\n|---|---:|---:|\n")
	for _, c := range cost {
		p("| %s | %.0f (%.0f–%.0f) | %.2f |\n", c.Name, c.Median(), c.Min(), c.Max(), c.Median()/floor)
	}
	p("\nUnder the lab's traffic (the packet-rate load of row 2, %d frames with `BPF_ENABLE_STATS`, run_time_ns / run_cnt of the program attached to the balancer's eth0):\n\n", o.statPackets)
	p("| program | ns/run | x trivial |\n|---|---:|---:|\n")
	var base float64
	if r.trivial != nil {
		base = r.trivial.progNs().med
	}
	for _, pr := range r.all {
		if pr.XDP && pr.Rows&RowPackets != 0 {
			s := pr.progNs()
			p("| %s | %s | %s |\n", pr.Name, s.fmt(0), ratio(s.med, base))
		}
	}
	p("\n")
}

func wireRow(p printf, r results, o options) {
	p("## 2. Packet rate on the wire\n\n")
	p("%d UDP frames of %d bytes per measurement from the client host (sent with %s, %d source addresses x %d source ports), through the balancer host, counted and dropped by an XDP program on each backend's eth0. Mpps = frames counted at the backends / time the generator ran.\n\n",
		o.packets, frameSize, o.genMethod, genSources, genPorts)
	p("| balancer | Mpps | delivered | x trivial XDP |\n|---|---:|---:|---:|\n")
	var base float64
	if r.trivial != nil {
		base = r.trivial.mpps().med
	}
	for _, pr := range r.all {
		if pr.Rows&RowPackets == 0 {
			continue
		}
		s := pr.mpps()
		p("| %s | %s | %.0f%% | %s |\n", pr.Name, s.fmt(2), 100*pr.delivered().med, ratio(s.med, base))
	}
	p("\n")
}

func wsRow(p printf, r results, o options) {
	p("## 3. WebSocket\n\n")
	p("Connection rate: %d connections per round over %d workers, each a TCP connect, the WebSocket handshake, one echo and the close. Latency: %d connections held open, each echoing one message a second for %d s (%d round trips per round).\n\n",
		o.wsConns, o.wsWorkers, o.hold, o.holdSecs, o.hold*o.holdSecs)
	heavy := o.heavyConc > 0
	if heavy {
		p("Heavy profile: the same connections over %d workers while %d more are held open (idle), opened first and closed after.\n\n", o.heavyConc, o.heavyHeld)
		p("| balancer | conns/s | x direct | heavy conns/s | x direct | echo p50 µs | echo p99 µs | p99 x direct | failed conns / echoes |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	} else {
		p("| balancer | conns/s | x direct | echo p50 µs | echo p99 µs | p99 x direct | failed conns / echoes |\n|---|---:|---:|---:|---:|---:|---:|\n")
	}
	var rate, heavyRate, p99 float64
	if r.direct != nil {
		rate, heavyRate, p99 = r.direct.connRate().med, r.direct.heavyRate().med, r.direct.p99().med
	}
	for _, pr := range r.all {
		if pr.Rows&RowStreams == 0 {
			continue
		}
		c, e := pr.failures()
		h := ""
		if heavy {
			h = fmt.Sprintf(" %s | %s |", pr.heavyRate().fmt(0), ratio(pr.heavyRate().med, heavyRate))
		}
		p("| %s | %s | %s |%s %s | %s | %s | %d / %d |\n", pr.Name, pr.connRate().fmt(0), ratio(pr.connRate().med, rate), h,
			pr.p50().fmt(0), pr.p99().fmt(0), ratio(pr.p99().med, p99), c, e)
	}
	if heavy {
		n := float64(o.wsConns+o.heavyHeld) / 1000
		p("\nWhat the heavy profile cost besides the clients and servers, per 1,000 of its connections (held and measured), medians: the balancer's process CPU (the daemon; none for a program or the kernel), the TCP segments the clients and backends retransmitted, and the packets that reached the balancer host's IP stack (passed by a program to the kernel, or forwarded by it).\n\n")
		p("| balancer | process CPU ms | retransmitted segments | packets into the balancer's IP stack |\n|---|---:|---:|---:|\n")
		for _, pr := range r.all {
			if pr.Rows&RowStreams == 0 {
				continue
			}
			cost := func(f func(heavyCost) float64) string {
				return fmt.Sprintf("%.1f", statOf(pr.samples, streamsOK, func(s sample) float64 { return f(s.heavyCost) }).med/n)
			}
			p("| %s | %s | %s | %s |\n", pr.Name, cost(func(c heavyCost) float64 { return 1000 * c.cpu }),
				cost(func(c heavyCost) float64 { return float64(c.retrans) }), cost(func(c heavyCost) float64 { return float64(c.ipIn) }))
		}
	}
	p("\n")
}

func bulkRow(p printf, r results, o options) {
	p("## 4. Bulk throughput\n\n")
	p("iperf3, %d s per run, client to backend, from one client address.\n\n", o.iperfSecs)
	p("| balancer | 1 stream Gbit/s | x direct | 4 streams Gbit/s | x direct |\n|---|---:|---:|---:|---:|\n")
	var one, four float64
	if r.direct != nil {
		one, four = r.direct.bulk1().med, r.direct.bulk4().med
	}
	for _, pr := range r.all {
		if pr.Rows&RowStreams == 0 {
			continue
		}
		p("| %s | %s | %s | %s | %s |\n", pr.Name, pr.bulk1().fmt(2), ratio(pr.bulk1().med, one), pr.bulk4().fmt(2), ratio(pr.bulk4().med, four))
	}
	p("\n")
}

func affinityRow(p printf, r results) {
	p("## 5. Affinity\n\n")
	p("Every WebSocket connection of rows 3, all rounds: how many client addresses reached more than one backend across their reconnects (0 is required of every source-affinity setup), and how the connections spread over the backends.\n\n")
	p("| balancer | client addresses | reached >1 backend | connections per backend |\n|---|---:|---:|---|\n")
	for _, pr := range r.all {
		if pr.Rows&RowStreams == 0 {
			continue
		}
		clients, moved := pr.aff.split()
		spread := pr.aff.spread()
		names := make([]string, 0, len(spread))
		for n := range spread {
			names = append(names, n)
		}
		sort.Strings(names)
		var parts []string
		for _, n := range names {
			parts = append(parts, fmt.Sprintf("%s %d", n, spread[n]))
		}
		p("| %s | %d | %d | %s |\n", pr.Name, clients, moved, strings.Join(parts, ", "))
	}
	p("\n")
}

// targets checks tether's targets against what this run measured.
func targets(p printf, cost []progcost.Result, r results, o options) {
	p("## Targets\n\n")
	p("| target | measured | met |\n|---|---|:---:|\n")
	line := func(target, measured string, ok bool) {
		mark := "no"
		if ok {
			mark = "yes"
		}
		p("| %s | %s | %s |\n", target, measured, mark)
	}
	floor := cost[0].Median()
	hit := progcost.Find(cost, progcost.Hit4).Median() / floor
	nf := progcost.Find(cost, progcost.NewFlow).Median() / floor
	line("connection-table hit within 2.5x of the trivial program (BPF_PROG_TEST_RUN)", fmt.Sprintf("%.2fx", hit), hit <= 2.5)
	line("new flow within 3.5x of the trivial program (BPF_PROG_TEST_RUN)", fmt.Sprintf("%.2fx", nf), nf <= 3.5)
	if r.xdp != nil && r.trivial != nil {
		x := r.xdp.mpps().med / r.trivial.mpps().med
		line("wire packet rate at least 95% of the trivial XDP program's", fmt.Sprintf("%.0f%%", 100*x), x >= 0.95)
		for _, k := range r.kernel {
			line("wire packet rate not below "+k.Name, fmt.Sprintf("%.2f vs %.2f Mpps", r.xdp.mpps().med, k.mpps().med), r.xdp.mpps().med >= k.mpps().med)
		}
	}
	wsTargets(line, r, o)
	if r.xdp != nil && r.direct != nil {
		c := r.xdp.connRate().med / r.direct.connRate().med
		line("WebSocket connection rate within 5% of direct (XDP)", fmt.Sprintf("%.2fx", c), c >= 0.95)
		l := r.xdp.p99().med / r.direct.p99().med
		line("echo p99 within 5% of direct (XDP)", fmt.Sprintf("%.2fx", l), l <= 1.05)
		for _, b := range []struct {
			name string
			v, d float64
		}{{"1 stream", r.xdp.bulk1().med, r.direct.bulk1().med}, {"4 streams", r.xdp.bulk4().med, r.direct.bulk4().med}} {
			line("bulk throughput at least 90% of direct, "+b.name+" (XDP)", fmt.Sprintf("%.0f%%", 100*b.v/b.d), b.v >= 0.9*b.d)
		}
	}
	if r.splice != nil {
		for _, peer := range r.proxies {
			for _, b := range []struct {
				name string
				v, d float64
			}{{"1 stream", r.splice.bulk1().med, peer.bulk1().med}, {"4 streams", r.splice.bulk4().med, peer.bulk4().med},
				{"connection rate", r.splice.connRate().med, peer.connRate().med}} {
				line(fmt.Sprintf("splice %s at least %s's", b.name, peer.Name), fmt.Sprintf("%.2fx", b.v/b.d), b.v >= b.d)
			}
			if r.splice.Rows&RowProxy == 0 || peer.Rows&RowProxy == 0 {
				continue
			}
			raw := []struct {
				name string
				f    func(proxySample) float64
			}{
				{"raw TCP throughput, 1 stream,", func(s proxySample) float64 { return s.one }},
				{"raw TCP throughput, 8 streams,", func(s proxySample) float64 { return s.eight }},
			}
			for k, n := range o.workers {
				raw = append(raw, struct {
					name string
					f    func(proxySample) float64
				}{fmt.Sprintf("raw TCP connection rate, %d workers,", n), func(s proxySample) float64 { return s.cps[k] }})
			}
			for _, b := range raw {
				v, d := r.splice.proxyStat(b.f).med, peer.proxyStat(b.f).med
				line(fmt.Sprintf("splice %s at least %s's", b.name, peer.Name), fmt.Sprintf("%.2fx", v/d), v >= d)
			}
		}
	}
	natTargets(line, r)
	for _, pr := range r.all {
		if pr.SourceAffinity && pr.Rows&RowStreams != 0 {
			_, moved := pr.aff.split()
			line("no client address on two backends: "+pr.Name, fmt.Sprint(moved), moved == 0)
		}
	}
	p("\n")
}

// wsTargets are issue 19's for tether's XDP datapath (dsr): a WebSocket
// connection rate at least 0.97x the trivial forwarder's and at least
// nftables fwd's (the IPVS-DR stand-in), in the light profile and the
// heavy one.
func wsTargets(line func(target, measured string, ok bool), r results, o options) {
	if r.xdp == nil {
		return
	}
	var fwd *peerResult
	for _, k := range r.kernel {
		if strings.HasPrefix(k.Name, "nftables fwd") {
			fwd = k
		}
	}
	type profile struct {
		name string
		rate func(peerResult) stat
	}
	profiles := []profile{{fmt.Sprintf("%d at a time", o.wsWorkers), peerResult.connRate}}
	if o.heavyConc > 0 {
		profiles = append(profiles, profile{fmt.Sprintf("%d at a time, %d held", o.heavyConc, o.heavyHeld), peerResult.heavyRate})
	}
	for _, pf := range profiles {
		v := pf.rate(*r.xdp).med
		if r.trivial != nil && r.trivial.Rows&RowStreams != 0 {
			d := pf.rate(*r.trivial).med
			line("WebSocket connection rate ("+pf.name+") at least 0.97x the trivial forwarder's (XDP)", fmt.Sprintf("%.2fx", v/d), v >= 0.97*d)
		}
		if fwd != nil {
			d := pf.rate(*fwd).med
			line("WebSocket connection rate ("+pf.name+") at least "+fwd.Name+"'s (XDP)", fmt.Sprintf("%.2fx", v/d), v >= d)
		}
	}
}

// command is how this report was asked for: `sudo make bench` runs the
// bench with -runs 5 and the output files alone.
func command() string {
	c := "go run ./test/bench/peers"
	for _, a := range os.Args[1:] {
		if a == "" || strings.ContainsAny(a, " ,()$'\"") {
			a = "'" + a + "'"
		}
		c += " " + a
	}
	return c
}

// natTargets are the targets of the translating modes: nat at least
// nftables DNAT's connection rate (the IPVS-NAT stand-in) and 1.3x
// HAProxy's; fullnat 1.3x HAProxy's connection rate and 2x its bulk
// throughput.
func natTargets(line func(target, measured string, ok bool), r results) {
	var dnat, haproxy *peerResult
	for _, k := range r.kernel {
		if strings.HasPrefix(k.Name, "nftables DNAT") {
			dnat = k
		}
	}
	for _, pr := range r.proxies {
		if pr.Role == RoleHAProxy {
			haproxy = pr
		}
	}
	at := func(name string, v, d, want float64) {
		line(name, fmt.Sprintf("%.2fx", v/d), v >= want*d)
	}
	if r.nat != nil && dnat != nil {
		at("nat connection rate at least "+dnat.Name+"'s", r.nat.connRate().med, dnat.connRate().med, 1)
	}
	if haproxy == nil {
		return
	}
	if r.nat != nil {
		at("nat connection rate at least 1.3x HAProxy's", r.nat.connRate().med, haproxy.connRate().med, 1.3)
	}
	if r.fullnat != nil {
		at("fullnat connection rate at least 1.3x HAProxy's", r.fullnat.connRate().med, haproxy.connRate().med, 1.3)
		at("fullnat bulk throughput (1 stream) at least 2x HAProxy's", r.fullnat.bulk1().med, haproxy.bulk1().med, 2)
		at("fullnat bulk throughput (4 streams) at least 2x HAProxy's", r.fullnat.bulk4().med, haproxy.bulk4().med, 2)
	}
}

// reading explains what bounds the figures in this lab, with the ratios
// that separate tether's own cost from the lab's.
func reading(p printf, r results, o options) {
	p("## Reading these figures\n\n")
	p("- **XDP on a veth costs the stream rows, whatever the program.** A veth whose peer runs XDP loses its software segmentation offload, so TCP crosses the balancer host in MTU-sized frames instead of 64 KiB segments: the trivial XDP forwarder, which only rewrites two MAC addresses, pays the same. ")
	p("On a physical NIC the sender's segmentation happens in hardware and the balancer's XDP program sees wire frames in any case. tether's own cost is its distance from the trivial forwarder")
	if r.xdp != nil && r.trivial != nil && r.trivial.Rows&RowStreams != 0 {
		p(" (this run, tether / trivial: connections/s %s, echo p99 %s, bulk 1 stream %s, 4 streams %s)",
			ratio(r.xdp.connRate().med, r.trivial.connRate().med), ratio(r.xdp.p99().med, r.trivial.p99().med),
			ratio(r.xdp.bulk1().med, r.trivial.bulk1().med), ratio(r.xdp.bulk4().med, r.trivial.bulk4().med))
	}
	p("; the direct reference is what a balancer-free path gets with full offloads.\n")
	if r.trivial != nil && r.trivial.Rows&RowStreams != 0 {
		for _, pr := range r.encap {
			p("- **%s** against the trivial forwarder, this run: connections/s %s, bulk 1 stream %s, 4 streams %s; the backends' own XDP decapsulation is in that path too.\n",
				pr.Name, ratio(pr.connRate().med, r.trivial.connRate().med), ratio(pr.bulk1().med, r.trivial.bulk1().med), ratio(pr.bulk4().med, r.trivial.bulk4().med))
		}
	}
	if r.xdp != nil && r.trivial != nil && r.stateless != nil && r.stateless.Rows&RowStreams != 0 && r.trivial.Rows&RowStreams != 0 {
		p("- **The trivial forwarder loads one backend; tether and the stateless forwarder spread clients over three.** tether / stateless forwarder this run: connections/s %s (%d at a time)",
			ratio(r.xdp.connRate().med, r.stateless.connRate().med), o.wsWorkers)
		if o.heavyConc > 0 {
			p(", %s (%d at a time, %d held)", ratio(r.xdp.heavyRate().med, r.stateless.heavyRate().med), o.heavyConc, o.heavyHeld)
		}
		p("; stateless / trivial: %s", ratio(r.stateless.connRate().med, r.trivial.connRate().med))
		if o.heavyConc > 0 {
			p(", %s", ratio(r.stateless.heavyRate().med, r.trivial.heavyRate().med))
		}
		p(".\n")
	}
	p("- **The wire rate is the whole path's cost on one CPU.** The generator's frames are handled veth to bridge to veth in the sending CPU's softirq, balancer and backends included, so the rate is bounded by the sum of every hop; where the kernel's own stack is in the path its backlog overflows (\"delivered\" below 100%%). The balancer's share is row 1.\n")
	p("- **Per-packet cost under traffic** (row 1, second table) includes the first touch of each frame's cache lines, which the trivial program pays too, and the statistics' own clock reads; BPF_PROG_TEST_RUN (first table) runs on a hot frame.\n")
	p("- **Spread**: the direct reference and the trivial forwarder send everything to backend 1; the rest hash client addresses over three backends.\n\n")
}

func setups(p printf, r results, tools map[string]string) {
	p("## Setups\n\n")
	for _, pr := range r.all {
		p("- **%s**: %s.\n", pr.Name, pr.Note)
	}
	names := make([]string, 0, len(tools))
	for n := range tools {
		names = append(names, n)
	}
	sort.Strings(names)
	p("\nVersions:")
	for _, n := range names {
		p(" %s;", tools[n])
	}
	p(" %s.\n", benchrun.Kernel())
}

// panels is the chart: one panel per row that compares balancers.
func panels(r results) []chart.Panel {
	bar := func(pr peerResult, s stat, base float64) chart.Bar {
		b := chart.Bar{Label: pr.Name, Highlight: pr.Tether}
		if s.med == 0 || base == 0 {
			b.Note = "n/a"
			return b
		}
		b.Value, b.Err = s.med/base, [2]float64{s.lo / base, s.hi / base}
		return b
	}
	var out []chart.Panel
	if r.trivial != nil {
		pn := chart.Panel{Title: "Packet rate on the wire (x trivial XDP forwarder)", Unit: "x", Ref: 1, RefLabel: "trivial XDP"}
		for _, pr := range r.all {
			if pr.Rows&RowPackets != 0 {
				pn.Bars = append(pn.Bars, bar(pr, pr.mpps(), r.trivial.mpps().med))
			}
		}
		out = append(out, pn)
	}
	if r.direct != nil {
		for _, row := range []struct {
			title string
			get   func(peerResult) stat
		}{
			{"WebSocket connections/s (x direct)", peerResult.connRate},
			{"WebSocket echo p99 (x direct, lower is better)", peerResult.p99},
			{"iperf3, 4 streams (x direct)", peerResult.bulk4},
		} {
			pn := chart.Panel{Title: row.title, Unit: "x", Ref: 1, RefLabel: "direct"}
			for _, pr := range r.all {
				if pr.Rows&RowStreams != 0 {
					pn.Bars = append(pn.Bars, bar(pr, row.get(pr), row.get(*r.direct).med))
				}
			}
			out = append(out, pn)
		}
	}
	return out
}
