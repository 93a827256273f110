// Command flowcost measures what tether's XDP program costs a packet under
// lab traffic as the number of live flows grows: 1k, 16k, 256k and 1M
// UDP flows, each first entered in the connection table, then every flow
// sent again in turn while the kernel's BPF run-time statistics count the
// balancer's program, then sent as fast as the generator can while the
// backends count what arrives. Three floors are measured on the same
// traffic, in alternating rounds on one lab: the trivial XDP forwarder
// (rewrites the MACs and sends every frame to one backend: the floor of an
// XDP balancer), the same after one lookup of the frame's 5-tuple in an
// LRU hash table of tether's size (the floor of a balancer that remembers
// its flows in the kernel's hash table), and after a read of one slot of
// an array of that size (one random memory access); -who chunked adds the
// slot in arrays small enough for the kernel's linear map, -who percpu
// the lookup in an LRU hash whose lists are per CPU. Each is measured
// with tables of several sizes, since the size costs even when few flows
// live, and with IPv4 and IPv6 flows. tether is also timed on new flows
// from clients its affinity table knows (a reconnecting client's path)
// and on flows to addresses that are no VIP's. With perf installed,
// tether is also profiled (cpu-clock samples) during one more pass of
// the flows, and the report splits its time between its program and the
// hash table's lookup.
//
//	sudo go run ./test/bench/flowcost -out docs/bench/flowcost.md
package main

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/maps"
	"github.com/tetherlb/tether/test/bench/benchrun"
	"github.com/tetherlb/tether/test/bench/pktgen"
)

const (
	svcPort = 9000
	ports   = 4096 // per spoofed source; sources from 192.0.2.0
	burst   = 1024 // frames a burst, a millisecond apart: the veth queues keep up

	wireFrames = 1 << 20 // at least, for the wire rate

	newProfile = 1 << 18 // new flows for a profile of the new-flow path, from as many live flows

	affinityFlows = 1 << 16 // at most, new flows from known clients at each flow count
	primePort     = 60000   // and up, one a flow count: the flows that enter the clients in the affinity table
)

type env struct {
	l   *lab.Lab
	dir string
	bin string

	counters []*pktgen.Counter // on the backends: count the frames to svcPort, drop them
	method   string            // how the generator sends
}

func main() {
	benchrun.Name = "flowcost"
	defer benchrun.Cleanup()
	benchrun.FailOnSignal()
	out := flag.String("out", "", "also write the report to `FILE`")
	rounds := flag.Int("rounds", 3, "rounds, each measuring every program of -who at every table size and flow count")
	passes := flag.Int("passes", 4, "times every flow is sent while the statistics count")
	sizes := flag.String("connections", "2097152,65536", "entries of the connection tables (tether's and the floors'), a comma-separated `list` of powers of two, each measured in every round; flow counts above a size are left out of it")
	v6 := flag.Bool("ipv6", true, "also measure IPv6 flows, with the first table size")
	prof := flag.Bool("profile", true, "also profile tether with perf (cpu-clock samples) during one more pass of the flows, and report where its time goes")
	who := flag.String("who", "trivial,table,array,tether", "the programs measured, a comma-separated `list` of "+strings.Join(programs, ", "))
	flag.Parse()
	if os.Geteuid() != 0 {
		benchrun.Fail("needs root (network namespaces, XDP)")
	}
	var tables []uint32
	for f := range strings.SplitSeq(*sizes, ",") {
		n, err := strconv.ParseUint(strings.TrimSpace(f), 10, 32)
		if err != nil || n < 1024 || n > 1<<26 || n&(n-1) != 0 {
			benchrun.Fail(fmt.Sprintf("-connections: %q is not a power of two from 1024 to 67108864", f))
		}
		tables = append(tables, uint32(n))
	}
	var contenders []string
	for w := range strings.SplitSeq(*who, ",") {
		w = strings.TrimSpace(w)
		if !slices.Contains(programs, w) {
			benchrun.Fail(fmt.Sprintf("-who: no program %q: say one of %s", w, strings.Join(programs, ", ")))
		}
		contenders = append(contenders, w)
	}
	e := setup()
	// The measurements: every table size with IPv4, the first with IPv6
	// too.
	type set struct {
		table uint32
		vip   netip.Addr
	}
	var sets []set
	for i, size := range tables {
		sets = append(sets, set{size, e.l.VIP4})
		if i == 0 && *v6 {
			sets = append(sets, set{size, e.l.VIP6})
		}
	}
	type key struct {
		set
		who   string
		flows int
	}
	// Each family's addresses that are no VIP's, for tether's passes.
	nonVIPs := map[netip.Addr][]netip.Addr{e.l.VIP4: e.nonVIPs(e.l.VIP4), e.l.VIP6: e.nonVIPs(e.l.VIP6)}
	samples := map[key][]result{}
	for r := range *rounds {
		for _, st := range sets {
			conf := e.config(st.table, false)
			for _, who := range contenders {
				var stop func()
				switch who {
				case "tether":
					stop = benchrun.TetherDaemon(e.l, e.bin, conf, e.dir, "tether-flowcost")
				case "table", "percpu", "array", "chunked":
					stop = benchrun.TableForwarder(e.l, st.vip, st.table, who)
				default:
					stop = benchrun.VIPForwarder(e.l, st.vip)
				}
				for i, n := range flowCounts(st.table) {
					var t tetherPasses
					if who == "tether" {
						t = tetherPasses{profile: *prof, others: nonVIPs[st.vip], affinity: func(on bool) { e.reload(st.table, on) }}
					}
					res := measure(e, st.vip, n, 1024+i*ports, *passes, t)
					samples[key{st, who, n}] = append(samples[key{st, who, n}], res)
					fmt.Fprintf(os.Stderr, "round %d, table %d, %v: %s, %d flows: %.0f ns a packet (%.0f entering them); %.2f Mpps on the wire (%.0f%% delivered)\n", r+1, st.table, st.vip, who, n, res.ns, res.newNS, res.mpps, 100*res.delivered)
				}
				stop()
			}
		}
	}

	w := benchrun.Report(*out)
	fmt.Fprintf(w, "# tether XDP cost by live flows (%s, %s)\n\n", time.Now().UTC().Format("2006-01-02"), benchrun.Kernel())
	fmt.Fprintf(w, "`sudo go run ./test/bench/flowcost -who %s`: UDP flows from spoofed sources (%d ports each), every flow entered first, then sent %d times over in bursts of %d frames a millisecond apart; ns a run of the balancer's XDP program from the kernel's run-time statistics (which slow every program down a little), median of %d rounds alternating the programs:\n\n", strings.Join(contenders, ","), ports, *passes, burst, *rounds)
	for _, who := range contenders {
		fmt.Fprintf(w, "- %s: %s\n", names[who], about[who])
	}
	fmt.Fprintln(w, "\nIPv4 flows come from 192.0.2.0/24 (16-byte keys), IPv6 flows from 2001:db8:ff::/64 (40-byte keys).")
	median := func(k key, f func(result) float64) float64 { return benchrun.Median(field(samples[k], f)) }
	ns := func(r result) float64 { return r.ns }
	mpps := func(r result) float64 { return r.mpps }
	delivered := func(r result) float64 { return 100 * r.delivered }
	has := func(who string) bool { return slices.Contains(contenders, who) }
	var floors []string // the programs other than tether, in the report's order
	for _, who := range []string{"table", "percpu", "array", "chunked", "trivial"} {
		if has(who) {
			floors = append(floors, who)
		}
	}
	row := func(cells ...string) { fmt.Fprintf(w, "| %s |\n", strings.Join(cells, " | ")) }
	rule := func(n int) { row(slices.Repeat([]string{"---:"}, n)...) }
	for _, st := range sets {
		size := st.table
		family := "IPv4"
		if st.vip.Is6() {
			family = "IPv6"
		}
		fmt.Fprintf(w, "\n## %s, connection tables of %d entries\n\n", family, size)
		head := []string{"live flows"}
		if has("tether") {
			head = append(head, "tether ns/packet", "min–max")
		}
		for _, f := range floors {
			head = append(head, names[f])
		}
		ratios := []string{}
		for _, f := range []string{"trivial", "table"} {
			if has("tether") && has(f) {
				ratios = append(ratios, f)
				head = append(head, "tether / "+names[f])
			}
		}
		row(head...)
		rule(len(head))
		for _, n := range flowCounts(size) {
			cells := []string{strconv.Itoa(n)}
			tm := median(key{st, "tether", n}, ns)
			if has("tether") {
				t := field(samples[key{st, "tether", n}], ns)
				cells = append(cells, fmt.Sprintf("%.0f", tm), fmt.Sprintf("%.0f–%.0f", slices.Min(t), slices.Max(t)))
			}
			for _, f := range floors {
				cells = append(cells, fmt.Sprintf("%.0f", median(key{st, f, n}, ns)))
			}
			for _, f := range ratios {
				cells = append(cells, fmt.Sprintf("%.2f", tm/median(key{st, f, n}, ns)))
			}
			row(cells...)
		}
		fmt.Fprintln(w, "\nThe pass that enters the flows, each packet a new flow (for tether: a miss, the service, its ring, the insertion): ns a packet, medians.")
		fmt.Fprintln(w)
		head = []string{"live flows"}
		for _, who := range append([]string{"tether"}, floors...) {
			if has(who) {
				head = append(head, names[who])
			}
		}
		row(head...)
		rule(len(head))
		newNS := func(r result) float64 { return r.newNS }
		for _, n := range flowCounts(size) {
			cells := []string{strconv.Itoa(n)}
			for _, who := range append([]string{"tether"}, floors...) {
				if has(who) {
					cells = append(cells, fmt.Sprintf("%.0f", median(key{st, who, n}, newNS)))
				}
			}
			row(cells...)
		}
		if has("tether") {
			fmt.Fprintf(w, "\nNew flows from clients tether knows: the same number of flows (at most %d) from the same clients, to a service with `affinity: source` on %v, whose affinity table holds each client (a flow from each entered it first). Each packet misses the connection table, finds its client's backend in the affinity table and is inserted: the path of a client that reconnects. ns a packet, medians.\n\n", affinityFlows, affinityVIP(st.vip))
			row("live flows", "tether, a hit", "new flow, by the ring", "new flow, affinity hit", "flows", "clients", "affinity hits counted")
			rule(7)
			for _, n := range flowCounts(size) {
				k := key{st, "tether", n}
				rs := samples[k]
				row(strconv.Itoa(n), fmt.Sprintf("%.0f", median(k, ns)), fmt.Sprintf("%.0f", median(k, func(r result) float64 { return r.newNS })),
					fmt.Sprintf("%.0f", median(k, func(r result) float64 { return r.affNS })), strconv.Itoa(min(n, affinityFlows)), strconv.Itoa(rs[0].clients),
					fmt.Sprintf("%.0f", median(k, func(r result) float64 { return float64(r.affHits) })))
			}
			others := nonVIPs[st.vip]
			fmt.Fprintf(w, "\nThe same flows sent to addresses that are no VIP's, which tether passes to the kernel (a host's own traffic, or the replies of translated flows on their way to be translated back): ns a packet, medians. %v's bit of vip_filter is set by no VIP: its packets skip the connection and service tables' lookups. %v shares the VIP's bit: its packets look them up and miss, as every packet did before the filter.\n\n", others[0], others[1])
			row("live flows", "tether, a hit", "not a VIP, filtered out", "not a VIP, looked up")
			rule(4)
			for _, n := range flowCounts(size) {
				k := key{st, "tether", n}
				other := func(i int) float64 {
					return median(k, func(r result) float64 { return r.otherNS[i] })
				}
				row(strconv.Itoa(n), fmt.Sprintf("%.0f", median(k, ns)), fmt.Sprintf("%.0f", other(0)), fmt.Sprintf("%.0f", other(1)))
			}
		}
		fmt.Fprintf(w, "\nOn the wire, the statistics off: the same flows in turn, at least %d frames as fast as the generator sends them (%s), counted by an XDP program on each backend; Mpps received (the share of the frames sent that arrived), medians.\n\n", wireFrames, e.method)
		head = []string{"live flows"}
		for _, who := range append([]string{"tether"}, floors...) {
			if has(who) {
				head = append(head, names[who]+" Mpps")
			}
		}
		if has("tether") && has("trivial") {
			head = append(head, "tether / trivial")
		}
		row(head...)
		rule(len(head))
		for _, n := range flowCounts(size) {
			cells := []string{strconv.Itoa(n)}
			for _, who := range append([]string{"tether"}, floors...) {
				if has(who) {
					k := key{st, who, n}
					cells = append(cells, fmt.Sprintf("%.2f (%.0f%%)", median(k, mpps), median(k, delivered)))
				}
			}
			if has("tether") && has("trivial") {
				cells = append(cells, fmt.Sprintf("%.2f", median(key{st, "tether", n}, mpps)/median(key{st, "trivial", n}, mpps)))
			}
			row(cells...)
		}
		if !has("tether") || !*prof || !profiling {
			continue
		}
		fmt.Fprintf(w, "\nWhere tether's time goes: perf's cpu-clock samples on every CPU (perf running, after the statistics' passes) in tether's JIT'd program and in the kernel functions it calls, summed over the rounds, and each part's share of them: while the live flows are sent again in turn (at least %d frames), and while %d new flows are entered (from %d live flows). The hash tables' walk reads a bucket, then an element: where the packet waits for memory. A new flow looks up its connection, its service (both hash tables) and its ring, and inserts its connection.\n\n", wireFrames, newProfile, newProfile)
		head = []string{"live flows", "path", "samples"}
		for _, p := range parts {
			head = append(head, p.name)
		}
		row(head...)
		rule(len(head))
		for _, n := range flowCounts(size) {
			for _, path := range []string{"hit", "new flow"} {
				sum := make([]int, len(parts))
				for _, r := range samples[key{st, "tether", n}] {
					counts := r.parts
					if path == "new flow" {
						counts = r.newParts
					}
					for i, c := range counts {
						sum[i] += c
					}
				}
				total := 0
				for _, c := range sum {
					total += c
				}
				if total == 0 {
					continue
				}
				cells := []string{strconv.Itoa(n), path, strconv.Itoa(total)}
				for _, c := range sum {
					cells = append(cells, fmt.Sprintf("%.0f%%", 100*float64(c)/float64(total)))
				}
				row(cells...)
			}
		}
	}
}

// names are the programs' names in the report, about what each is.
var (
	programs = []string{"trivial", "table", "percpu", "array", "chunked", "tether"}
	names    = map[string]string{
		"tether":  "tether",
		"table":   "one hash lookup",
		"percpu":  "one lookup, per-CPU LRU",
		"array":   "one array slot",
		"chunked": "one slot, linear map",
		"trivial": "trivial forwarder",
	}
	about = map[string]string{
		"tether":  "dsr, three backends, insertion guard off.",
		"table":   "the trivial forwarder after a lookup of the frame's 5-tuple in an LRU hash of the size of tether's connection table, entering it when missing: the floor of a balancer that keeps its flows in the kernel's hash table.",
		"percpu":  "the one-lookup forwarder with the LRU's lists kept per CPU (BPF_F_NO_COMMON_LRU) rather than shared by all CPUs under their locks; each CPU holds only its share of the entries.",
		"array":   "the trivial forwarder after a read of one 16-byte slot of an array of that size indexed by a hash of the flow: one random memory access.",
		"chunked": "the same slot in arrays of 1,024 slots found through an array of maps (two dependent reads): arrays small enough that the kernel allocates them from its linear map, which it maps with huge pages, where a big map is vmalloc'ed in 4 KiB pages.",
		"trivial": "MAC rewrite to one backend, XDP_TX.",
	}
)

// flowCounts are the flow counts measured with tables of size entries.
func flowCounts(size uint32) []int {
	var counts []int
	for _, n := range []int{1024, 16384, 262144, 1 << 20} {
		if n <= int(size) {
			counts = append(counts, n)
		}
	}
	return counts
}

// field is f of every result.
func field(rs []result, f func(result) float64) []float64 {
	v := make([]float64, len(rs))
	for i, r := range rs {
		v[i] = f(r)
	}
	return v
}

func setup() *env {
	e := &env{}
	e.dir, e.bin, e.l = benchrun.Setup("tether-flowcost-", lab.Options{Backends: 3, Clients: 1})
	l := e.l
	// The generator sends with XDP_TX from the client's veth.
	if err := l.SetPortXDP(l.Client, true); err != nil {
		benchrun.Fail(err.Error())
	}
	for _, be := range l.Backends {
		if err := be.Do(func() error {
			c, err := pktgen.AttachCounter(be.Ifindex, svcPort)
			if err == nil {
				e.counters = append(e.counters, c)
				benchrun.AtExit(func() { c.Close() })
			}
			return err
		}); err != nil {
			benchrun.Fail(fmt.Sprintf("counter on %s: %v", be.Name, err))
		}
	}
	return e
}

// config writes tether's configuration with connection tables of entries,
// and with source the source-affinity services, and returns its path.
func (e *env) config(entries uint32, source bool) string {
	var b strings.Builder
	fmt.Fprintf(&b, "interfaces: [eth0]\ndatapath: xdp\ntables: {connections: %d, affinity: 65536, insert_rate: 0}\nservices:\n", entries)
	for _, v6 := range []bool{false, true} {
		for _, src := range []bool{false, true} {
			if src && !source {
				continue
			}
			vip, name, affinity := e.l.VIP4, "udp", "connection"
			if v6 {
				vip, name = e.l.VIP6, "udp6"
			}
			if src {
				vip, name, affinity = affinityVIP(vip), name+"-source", "source"
			}
			fmt.Fprintf(&b, "  - {name: %s, vip: \"%s\", port: %d, protocol: udp, affinity: %s, health: {type: none}, backends: [", name, vip, svcPort, affinity)
			for i, be := range e.l.Backends {
				if i > 0 {
					b.WriteString(", ")
				}
				a := be.Addr4
				if v6 {
					a = be.Addr6
				}
				fmt.Fprintf(&b, "{address: \"%s\"}", a)
			}
			b.WriteString("]}\n")
		}
	}
	conf := filepath.Join(e.dir, fmt.Sprintf("tether-%d.yaml", entries))
	if err := os.WriteFile(conf, []byte(b.String()), 0o600); err != nil {
		benchrun.Fail(err.Error())
	}
	return conf
}

// result is one measurement of one program at one flow count.
type result struct {
	ns        float64   // a run of the balancer's program, under the statistics
	newNS     float64   // the same in the pass that enters the flows
	mpps      float64   // frames the backends received a second, sent as fast as the generator could
	delivered float64   // the share of those frames that reached the backends
	parts     []int     // perf's samples in each of parts during a pass of the flows (tether, -profile)
	newParts  []int     // the same while as many new flows are entered
	otherNS   []float64 // ns a run for the flows sent to each of measure's others (tether)
	affNS     float64   // ns a run for new flows from clients with an affinity entry (tether)
	clients   int       // how many clients those flows came from
	affHits   uint64    // the affinity hits tether counted for them
}

// tetherPasses are the passes measure makes for tether only.
type tetherPasses struct {
	profile  bool         // profile a pass of the flows, and new flows, with perf
	others   []netip.Addr // send the flows to these addresses too (no VIP's)
	affinity func(bool)   // when set, time new flows from known clients of source-affinity services, which affinity(true) adds and affinity(false) removes
}

// affinityVIP is the VIP of the source-affinity service beside vip's:
// the next address.
func affinityVIP(vip netip.Addr) netip.Addr { return vip.Next() }

// parts are where a packet's time goes in tether's XDP work, by the
// kernel symbols perf's samples fall in: the JIT'd program itself, then
// the kernel hash table's lookup (called by the verifier's inlined
// lookup), split into its walk of the bucket's chain (reading the bucket,
// then the element: where the packet waits for memory), its hash of the key
// (jhash) and its key comparison (memcmp, which other kernel code calls
// too), and the LRU's own functions for insertions and evictions (its
// locks are spinlocks that the rest of the kernel takes too: a flat
// profile cannot tell them apart).
var parts = []struct {
	name string
	syms func(string) bool
}{
	{"program", func(s string) bool { return strings.HasPrefix(s, "bpf_prog_") && strings.HasSuffix(s, "_tether_xdp") }},
	{"hash tables' walk", func(s string) bool {
		return s == "lookup_nulls_elem_raw" || s == "__htab_map_lookup_elem" || s == "htab_lru_map_lookup_elem"
	}},
	{"jhash", func(s string) bool { return s == "htab_map_hash" }},
	{"memcmp", func(s string) bool { return s == "memcmp" }},
	{"LRU inserts", func(s string) bool {
		return strings.HasPrefix(s, "bpf_lru_") || strings.HasPrefix(s, "__bpf_lru_") ||
			s == "htab_lru_map_update_elem" || s == "prealloc_lru_pop" || s == "htab_lru_map_delete_node"
	}},
}

// profiling is false once perf failed: the rest of the run goes without
// profiles rather than stopping.
var profiling = true

// profile runs send while perf samples every CPU, and returns the
// samples in each of parts, or nil when perf fails (said once). (At 4,000
// samples a second per CPU, a million packets make about a thousand
// samples here.)
func profile(send func()) []int {
	if !profiling {
		send()
		return nil
	}
	stop, err := benchrun.Profile()
	if err != nil {
		profiling = false
		fmt.Fprintf(os.Stderr, "flowcost: no profile: %v\n", err)
		send()
		return nil
	}
	send()
	time.Sleep(200 * time.Millisecond)
	samples, err := stop()
	if err != nil {
		profiling = false
		fmt.Fprintf(os.Stderr, "flowcost: no profile: %v\n", err)
		return nil
	}
	counts := make([]int, len(parts))
	for sym, c := range samples {
		for i, p := range parts {
			if p.syms(sym) {
				counts[i] += c
			}
		}
	}
	return counts
}

// measure enters n flows (source ports from base: no two flow counts
// share flows) and sends every one passes times more, with the run-time
// statistics on, reading ns a run of the balancer's program in each part;
// then sends them again without as fast as the generator can (at least
// wireFrames frames) and counts what reaches the backends.
func measure(e *env, vip netip.Addr, n, base, passes int, t tetherPasses) (r result) {
	sources := max(1, n/ports)
	p := min(n, ports)
	gen, err := pktgen.NewGenerator(sources, p)
	if err != nil {
		benchrun.Fail(err.Error())
	}
	defer gen.Close()
	defer func() { e.method = gen.Method() }()
	// sendTo sends total frames of the flows to dst from ports base and
	// up: bursts of the generator's flows in order, burst k starting at
	// flow k*burst (its source and port in the template).
	sendTo := func(dst netip.Addr, base, total int) {
		for k := 0; k*burst < total; k++ {
			f := (k * burst) % n
			e.send(gen, e.frame(dst, f/p, base+f%p), uint32(min(burst, n-f, total-k*burst)))
			time.Sleep(time.Millisecond)
		}
	}
	var id ebpf.ProgramID
	if err := e.l.Balancer.Do(func() error {
		var err error
		id, err = pktgen.XDPProgramID(e.l.Balancer.Ifindex)
		return err
	}); err != nil {
		benchrun.Fail(err.Error())
	}
	stats, err := pktgen.EnableRunStats()
	if err != nil {
		benchrun.Fail(err.Error())
	}
	defer stats.Close()
	// Every flow is new to the balancer in the first pass: its cost is
	// the new-flow path's (for tether: a miss, the service, the ring, the
	// insertion).
	r.newNS, _ = timed(id, func() { sendTo(vip, base, n) })
	var runs uint64
	r.ns, runs = timed(id, func() { sendTo(vip, base, n*passes) })
	if runs < uint64(n*passes)*9/10 {
		fmt.Fprintf(os.Stderr, "warning: %d runs for %d frames sent\n", runs, n*passes)
	}
	// The same flows to addresses that are no VIP's, which the balancer
	// passes to the kernel.
	for _, dst := range t.others {
		ns, _ := timed(id, func() { sendTo(dst, base, n) })
		r.otherNS = append(r.otherNS, ns)
	}
	if t.affinity != nil {
		// New flows to the source-affinity service from clients it
		// knows: a flow from each enters the client, then the flows
		// (other ports) each miss the connection table, find their
		// client's entry and are inserted. The service is there only
		// for this pass: with one, the daemon lists the connection table
		// once a minute to renew the entries of connected clients, which
		// would fall into the other passes. Its flows stay in the table:
		// in one no larger than the flow count they evict live flows
		// before the wire rate's pass.
		t.affinity(true)
		time.Sleep(time.Second) // the daemon's work after the reload
		m := min(n, affinityFlows)
		aff := affinityVIP(vip)
		r.clients = (m + p - 1) / p
		for k := range r.clients {
			e.send(gen, e.frame(aff, k, primePort+base/ports), 1)
		}
		time.Sleep(100 * time.Millisecond)
		hits := e.affinityHits(aff)
		r.affNS, _ = timed(id, func() { sendTo(aff, base, m) })
		r.affHits = e.affinityHits(aff) - hits
		t.affinity(false)
		time.Sleep(time.Second)
	}
	stats.Close() // they slow every program: off for the wire rate
	if t.profile {
		r.parts = profile(func() { sendTo(vip, base, n*max(passes, wireFrames/n)) })
	}

	// The wire rate: the flows in turn, as fast as the generator sends,
	// counted where the backends receive them.
	before := e.received()
	frames := uint32(max(n*passes, wireFrames))
	el := e.send(gen, e.frame(vip, 0, base), frames)
	time.Sleep(200 * time.Millisecond) // let the queues drain
	got := float64(e.received() - before)
	r.mpps = got / el.Seconds() / 1e6
	r.delivered = got / float64(frames)
	if t.profile && n >= newProfile {
		// New flows, from ports no flow count uses. Every flow count's
		// flows stay in the table (tether's holds 2,000,933 entries
		// after the 1M count, with the new flows from known clients and
		// this profile's, the one-lookup forwarder's 1,328,128): with
		// the 2M tables none is evicted.
		r.newParts = profile(func() { sendTo(vip, base+len(flowCounts(1<<20))*ports, newProfile) })
	}
	return r
}

// timed runs send with the run-time statistics on, and returns ns a run
// of program id while it ran (and a moment after, for the queues) and the
// runs.
func timed(id ebpf.ProgramID, send func()) (ns float64, runs uint64) {
	ns, runs, err := pktgen.TimeRuns(id, func() error {
		send()
		time.Sleep(200 * time.Millisecond)
		return nil
	})
	switch {
	case err != nil:
		benchrun.Fail(err.Error())
	case runs == 0:
		benchrun.Fail("the balancer's program did not run")
	}
	return ns, runs
}

// nonVIPs are two addresses that are no VIP's and no lab host's, of
// vip's family (on the lab's link, 198.51.100.100 and up, or in the VIP
// network, 2001:db8:f::1:0 and up): the first with a bit of tether's
// vip_filter that no VIP sets, so that its packets skip the connection
// table; the second with the bit of vip, so that they look it up (and
// miss) as every packet did before the filter.
func (e *env) nonVIPs(vip netip.Addr) []netip.Addr {
	var vipBits []uint32
	for _, v := range []netip.Addr{e.l.VIP4, e.l.VIP6, affinityVIP(e.l.VIP4), affinityVIP(e.l.VIP6)} {
		vipBits = append(vipBits, maps.VIPFilterBit(v))
	}
	var clear, same netip.Addr
	a, n := netip.MustParseAddr("198.51.100.100"), 155
	if vip.Is6() {
		a, n = netip.MustParseAddr("2001:db8:f::1:0"), 1<<16
	}
	for i := 0; i < n && (!clear.IsValid() || !same.IsValid()); i, a = i+1, a.Next() {
		switch b := maps.VIPFilterBit(a); {
		case b == maps.VIPFilterBit(vip) && !same.IsValid():
			same = a
		case !slices.Contains(vipBits, b) && !clear.IsValid():
			clear = a
		}
	}
	if !clear.IsValid() || !same.IsValid() {
		benchrun.Fail(fmt.Sprintf("no address near %v with a filter bit other than the VIPs' and with %v's", a, vip))
	}
	return []netip.Addr{clear, same}
}

// frame is the generator's template for flows to vip from source
// address k (192.0.2.k, or 2001:db8:ff::k with IPv6) and port.
func (e *env) frame(vip netip.Addr, k, port int) []byte {
	if vip.Is6() {
		a := [16]byte{0x20, 0x01, 0x0d, 0xb8, 0x00, 0xff, 14: byte(k >> 8), 15: byte(k)}
		src := netip.AddrPortFrom(netip.AddrFrom16(a), uint16(port))
		return pktgen.UDPFrame6(e.l.Client.MAC, e.l.Balancer.MAC, src, netip.AddrPortFrom(vip, svcPort), 64)
	}
	src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(k)}), uint16(port))
	return pktgen.UDPFrame(e.l.Client.MAC, e.l.Balancer.MAC, src, netip.AddrPortFrom(vip, svcPort), 64)
}

// reload rewrites tether's configuration, with or without the
// source-affinity services, and has the daemon apply it.
func (e *env) reload(entries uint32, source bool) {
	e.config(entries, source)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := control.NewClient(filepath.Join(e.dir, "tether.sock")).Reload(ctx); err != nil {
		benchrun.Fail(fmt.Sprintf("tether reload: %v", err))
	}
}

// affinityHits is what tether's service on vip has counted of new flows
// that its affinity table sent.
func (e *env) affinityHits(vip netip.Addr) uint64 {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := control.NewClient(filepath.Join(e.dir, "tether.sock")).Stats(ctx)
	if err != nil {
		benchrun.Fail(fmt.Sprintf("tether's counters: %v", err))
	}
	for _, s := range st.Services {
		if s.VIP == netip.AddrPortFrom(vip, svcPort).String() {
			return s.AffinityHits
		}
	}
	benchrun.Fail(fmt.Sprintf("tether has no service on %v", netip.AddrPortFrom(vip, svcPort)))
	return 0
}

// send has gen send count frames from template fr out of the client
// host, and returns how long it took.
func (e *env) send(gen *pktgen.Generator, fr []byte, count uint32) (el time.Duration) {
	if err := e.l.Client.Do(func() error {
		var err error
		el, err = gen.Send(e.l.Client.Ifindex, fr, count)
		return err
	}); err != nil {
		benchrun.Fail(err.Error())
	}
	return el
}

// received is what the backends' counters have counted.
func (e *env) received() uint64 {
	var n uint64
	for _, c := range e.counters {
		k, err := c.Count()
		if err != nil {
			benchrun.Fail(err.Error())
		}
		n += k
	}
	return n
}
