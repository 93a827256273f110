package main

import (
	"cmp"
	"fmt"
	"math"
	"slices"
	"strings"

	"github.com/tetherlb/tether/test/bench/benchrun"
)

func proxyOK(s sample) bool { return s.hasProxy }

// proxyStat is the median and range of a proxy figure over the rounds.
func (pr peerResult) proxyStat(f func(proxySample) float64) stat {
	return statOf(pr.samples, proxyOK, func(s sample) float64 { return f(s.proxy) })
}

// proxyPeers are the peers that took the proxy rows, in table order.
func (r results) proxyPeers() []peerResult {
	var out []peerResult
	for _, pr := range r.all {
		if pr.Rows&RowProxy != 0 {
			out = append(out, pr)
		}
	}
	return out
}

// ratioPair is a ratio row: a's figure over b's.
type ratioPair struct{ a, b peerResult }

// proxyRatios are the ratio rows of the proxy tables: tether's splice
// datapath over every other proxy that took the rows, and a -compare
// build over tether's.
func (r results) proxyRatios() []ratioPair {
	var out []ratioPair
	if r.splice != nil && r.splice.Rows&RowProxy != 0 {
		for _, pr := range r.proxyPeers() {
			if !pr.Tether && !pr.Direct {
				out = append(out, ratioPair{*r.splice, pr})
			}
		}
		for _, pr := range r.proxyPeers() {
			if pr.Role == RoleCompare {
				out = append(out, ratioPair{pr, *r.splice})
			}
		}
	}
	return out
}

// ratioCell is a's median over b's, bold, with the lowest and highest
// ratio of a single round (the rounds interleave the peers).
func ratioCell(a, b peerResult, f func(proxySample) float64) string {
	var rs []float64
	for i := range min(len(a.samples), len(b.samples)) {
		if a.samples[i].hasProxy && b.samples[i].hasProxy && f(b.samples[i].proxy) > 0 {
			rs = append(rs, f(a.samples[i].proxy)/f(b.samples[i].proxy))
		}
	}
	den := b.proxyStat(f).med
	if len(rs) == 0 || den == 0 {
		return "–"
	}
	return fmt.Sprintf("**%.2f** (%.2f–%.2f)", a.proxyStat(f).med/den, slices.Min(rs), slices.Max(rs))
}

// countsHeader writes the head of a table: the fixed columns (the first
// left-aligned), then a column per count, named by col with the count.
func countsHeader(p printf, fixed []string, col string, counts []int) {
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
	p("%s\n%s\n", head, rule)
}

func proxyRows(p printf, r results, o options) {
	prs := r.proxyPeers()
	if len(prs) == 0 {
		return
	}
	ratios := r.proxyRatios()
	one := func(s proxySample) float64 { return s.one }
	eight := func(s proxySample) float64 { return s.eight }
	cps := func(k int) func(proxySample) float64 { return func(s proxySample) float64 { return s.cps[k] } }
	http := func(k int) func(proxySample) float64 { return func(s proxySample) float64 { return s.http[k] } }

	p("## 6. What a proxy costs\n\n")
	p("Raw TCP, so that no WebSocket client caps the figures, to a server on every backend (the direct reference spreads its connections over the backends). ")
	p("Throughput: the client sends %d MiB in all (1 stream, or 8 streams of %d MiB from 8 source addresses), the backend discards it and acknowledges the end; MiB/s = bytes / elapsed. ", o.mib, o.mib/8)
	p("Connection rate: %d connections, each a connect, 1 byte written and echoed, and the close, by N concurrent workers: with few, each connection's latency through the balancer bounds the rate; with many, the CPUs are busy and the work per connection does. ", o.conns)
	p("Ratio rows: the first peer's median over the second's, and in parentheses the lowest and highest ratio of a single round.\n\n")
	countsHeader(p, []string{"balancer", "1 stream MiB/s", "8 streams MiB/s"}, "conns/s, %d workers", o.workers)
	for _, pr := range prs {
		p("| %s | %s | %s |", pr.Name, pr.proxyStat(one).fmt(0), pr.proxyStat(eight).fmt(0))
		for k := range o.workers {
			p(" %s |", pr.proxyStat(cps(k)).fmt(0))
		}
		p("\n")
	}
	for _, rp := range ratios {
		p("| **%s / %s** | %s | %s |", rp.a.Name, rp.b.Name, ratioCell(rp.a, rp.b, one), ratioCell(rp.a, rp.b, eight))
		for k := range o.workers {
			p(" %s |", ratioCell(rp.a, rp.b, cps(k)))
		}
		p("\n")
	}
	p("\n")

	if len(o.wrkConns) > 0 {
		p("The connection rate with C programs around the balancers: wrk on the client, %d s per measurement, every request on a new connection (`Connection: close`), against nginx on each backend (port %d), which answers a 1-byte body and closes. Connections per second (= requests per second):\n\n", o.wrkSecs, portHTTP)
		countsHeader(p, []string{"balancer"}, "wrk, %d connections", o.wrkConns)
		for _, pr := range prs {
			p("| %s |", pr.Name)
			for k := range o.wrkConns {
				p(" %s |", pr.proxyStat(http(k)).fmt(0))
			}
			p("\n")
		}
		for _, rp := range ratios {
			p("| **%s / %s** |", rp.a.Name, rp.b.Name)
			for k := range o.wrkConns {
				p(" %s |", ratioCell(rp.a, rp.b, http(k)))
			}
			p("\n")
		}
		p("\n")
	}

	p("CPU time of the balancer's processes (user + system, /proc/PID/stat of the process and its children; medians):\n\n")
	countsHeader(p, []string{"balancer", "CPU ms per GiB, 1 stream", "CPU ms per GiB, 8 streams"}, "CPU µs per connection, %d workers", o.workers)
	gib := float64(o.mib) / 1024
	for _, pr := range prs {
		if pr.Direct {
			continue
		}
		p("| %s | %.0f | %.0f |", pr.Name,
			pr.proxyStat(func(s proxySample) float64 { return s.cpuOne }).med*1000/gib,
			pr.proxyStat(func(s proxySample) float64 { return s.cpuEight }).med*1000/gib)
		for k := range o.workers {
			p(" %.0f |", pr.proxyStat(func(s proxySample) float64 { return s.cpuConns[k] }).med*1e6/float64(o.conns))
		}
		p("\n")
	}
	p("\n")

	p("Where the machine's CPU time went during the connection rates (µs per connection, medians of the rounds). \"rest\" is the kernel's work in other contexts, such as softirq threads, and other processes; /proc counts in ticks of 10 ms, so each figure is within about %.0f µs. With few workers the rate is bound by latency: the CPUs sit idle while every connection waits for a wake-up somewhere.\n\n", 2*10e3/float64(o.conns))
	p("| balancer | workers | balancer process | clients and backends (this program) | rest | whole machine | CPUs idle |\n|---|---:|---:|---:|---:|---:|---:|\n")
	for _, pr := range prs {
		for k, n := range o.workers {
			us := func(f func(proxySample) float64) float64 { return pr.proxyStat(f).med * 1e6 / float64(o.conns) }
			bal := func(s proxySample) float64 { return s.cpuConns[k] }
			gen := func(s proxySample) float64 { return s.genConns[k] }
			all := func(s proxySample) float64 { return s.busyConns[k] }
			rest := func(s proxySample) float64 { return all(s) - bal(s) - gen(s) }
			idle := pr.proxyStat(func(s proxySample) float64 { return s.idleConns[k] }).med
			// rest is a difference of tick counts: -0.4 is 0.
			p("| %s | %d | %.0f | %.0f | %.0f | %.0f | %.0f%% |\n", pr.Name, n, us(bal), us(gen), math.Round(us(rest))+0, us(all), 100*idle)
		}
	}
	p("\n")

	p("Context switches per connection during the connection rates (medians of the rounds): of the balancer's threads, those where a thread went to sleep to wait for events (voluntary) and those where it was runnable and the scheduler gave its CPU to another thread (preempted); and of the whole machine (/proc/PID/task/*/status, /proc/stat).\n\n")
	p("| balancer | workers | balancer waited | balancer preempted | whole machine |\n|---|---:|---:|---:|---:|\n")
	for _, pr := range prs {
		for k, n := range o.workers {
			per := func(f func(proxySample) float64) float64 { return pr.proxyStat(f).med / float64(o.conns) }
			p("| %s | %d | %.2f | %.2f | %.2f |\n", pr.Name, n,
				per(func(s proxySample) float64 { return s.waitConns[k] }),
				per(func(s proxySample) float64 { return s.preemptConns[k] }),
				per(func(s proxySample) float64 { return s.switchConns[k] }))
		}
	}
	p("\n")
	if o.sysConns > 0 {
		syscallTable(p, prs, o)
	}
}

// syscallTable writes the balancers' system calls per connection: a
// column for each call that makes at least 0.1 per connection in one of
// them, the others summed.
func syscallTable(p printf, prs []peerResult, o options) {
	med := func(pr peerResult, name string) float64 {
		return statOf(pr.samples, proxyOK, func(s sample) float64 { return s.proxy.syscalls[name] }).med
	}
	seen := map[string]float64{}
	for _, pr := range prs {
		for _, s := range pr.samples {
			for name := range s.proxy.syscalls {
				seen[name] = max(seen[name], med(pr, name))
			}
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
	p("System calls of the balancer's processes per connection, counted in the kernel by a BPF program on the sys_enter tracepoint (package syscount), in a pass of %d connections by %d workers after the timed ones (medians of the rounds). Unlike rates and CPU times, these counts barely move from round to round.\n\n", o.sysConns, o.workers[0])
	p("| balancer | all |")
	for _, c := range cols {
		p(" %s |", c)
	}
	p(" other |\n|---|---:|%s\n", strings.Repeat("---:|", len(cols)+1))
	for _, pr := range prs {
		if pr.Direct {
			continue
		}
		var all []float64
		for _, s := range pr.samples {
			if s.hasProxy {
				var t float64
				for _, v := range s.proxy.syscalls {
					t += v
				}
				all = append(all, t)
			}
		}
		total := benchrun.Median(all)
		p("| %s | %.1f |", pr.Name, total)
		rest := total
		for _, c := range cols {
			v := med(pr, c)
			rest -= v
			p(" %.2f |", v)
		}
		p(" %.2f |\n", max(rest, 0))
	}
	p("\n")
}
