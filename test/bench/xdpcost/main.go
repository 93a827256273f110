// Command xdpcost measures what tether's XDP program costs per packet and
// what its maps cost in kernel memory, on this machine, in one run:
//
//   - ns per packet with BPF_PROG_TEST_RUN for a trivial MAC-swap XDP_TX
//     program (the floor), tether's connection-table hit and tether's
//     new-flow path, as medians of interleaved rounds, with ratios to the
//     floor;
//   - the kernel's memlock accounting of every map with the default table
//     sizes, with no service and with 1,000 services;
//   - Maglev table build time.
//
// It needs root. `make bench` runs it.
package main

import (
	"flag"
	"fmt"
	"io"
	"net/netip"
	"sort"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tetherlb/tether/loader"
	"github.com/tetherlb/tether/maglev"
	"github.com/tetherlb/tether/maps"
	"github.com/tetherlb/tether/test/bench/benchrun"
	"github.com/tetherlb/tether/test/bench/progcost"
)

// fail ends the run with msg, after the cleanups registered with benchrun.
var fail = benchrun.Fail

func main() {
	benchrun.Name = "xdpcost"
	defer benchrun.Cleanup()
	repeat := flag.Int("repeat", 10_000_000, "packets per measurement")
	rounds := flag.Int("rounds", 5, "interleaved rounds; the median is reported")
	out := flag.String("out", "", "also write the report to this `file`")
	flag.Parse()

	w := benchrun.Report(*out)
	fmt.Fprintf(w, "# tether XDP cost (%s, %s)\n\n", time.Now().UTC().Format("2006-01-02"), benchrun.Kernel())
	packetCost(w, *repeat, *rounds)
	mapMemory(w)
	maglevBuild(w)
}

func packetCost(w io.Writer, repeat, rounds int) {
	results, err := progcost.Measure(repeat, rounds)
	if err != nil {
		fail(err.Error())
	}
	floor := results[0].Median()
	fmt.Fprintf(w, "## Cost per packet (BPF_PROG_TEST_RUN, %d packets x %d interleaved rounds, median)\n\n", repeat, rounds)
	fmt.Fprintln(w, "| path | ns/packet | min–max | x floor |")
	fmt.Fprintln(w, "|---|---:|---:|---:|")
	for _, r := range results {
		fmt.Fprintf(w, "| %s | %.0f | %.0f–%.0f | %.2f |\n", r.Name, r.Median(), r.Min(), r.Max(), r.Median()/floor)
	}
	fmt.Fprintln(w, "\nTargets: connection-table hit within 2.5x of the floor, new flow within 3.5x.")
	fmt.Fprintln(w, "A new flow's first non-SYN packet also inserts into the connection (and affinity) table, once per connection.")
	fmt.Fprintln(w)
}

// mapMemory loads the program with the default table sizes and reports the
// kernel's memlock accounting per map, then again with 1,000 services.
func mapMemory(w io.Writer) {
	objs, err := loader.Load(loader.Options{})
	if err != nil {
		fail(err.Error())
	}
	defer objs.Close()
	before := memlock(objs)
	ring := make([]uint32, objs.Maps.RingSize())
	for i := range ring {
		ring[i] = uint32(i%3) + 1
	}
	for id := uint32(0); id < 1000; id++ {
		vip := netip.AddrFrom4([4]byte{203, 0, 113, byte(id % 250)})
		if err := objs.Maps.PublishRing(id, ring); err != nil {
			fail(err.Error())
		}
		if err := objs.Maps.PutService(vip, uint16(1000+id), 6, mapsService(id)); err != nil {
			fail(err.Error())
		}
	}
	after := memlock(objs)
	rings := ringMemlock(objs, 1000)

	fmt.Fprintln(w, "## Map memory (kernel memlock accounting, default table sizes)")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| map | entries | memlock |")
	fmt.Fprintln(w, "|---|---:|---:|")
	names := make([]string, 0, len(before))
	for n := range before {
		names = append(names, n)
	}
	sort.Strings(names)
	var total uint64
	for _, n := range names {
		fmt.Fprintf(w, "| %s | %d | %s |\n", n, before[n].entries, mib(before[n].bytes))
		total += before[n].bytes
	}
	var totalAfter uint64
	for _, n := range names {
		totalAfter += after[n].bytes
	}
	fmt.Fprintf(w, "| **total, no service** | | **%s** |\n", mib(total))
	fmt.Fprintf(w, "| **total, 1,000 services** (maps above + %d rings of %d slots: %s) | | **%s** |\n\n",
		1000, objs.Maps.RingSize(), mib(rings), mib(totalAfter+rings))
}

type mapMem struct {
	entries uint32
	bytes   uint64
}

func memlock(objs *loader.Objects) map[string]mapMem {
	out := map[string]mapMem{}
	for name, m := range loader.MapsByName(&objs.TetherMaps) {
		info, err := m.Info()
		if err != nil {
			fail(err.Error())
		}
		b, ok := info.Memlock()
		if !ok {
			fail("kernel does not report memlock of " + name)
		}
		out[name] = mapMem{entries: m.MaxEntries(), bytes: b}
	}
	return out
}

// ringMemlock sums the memlock of the inner ring maps of services 0..n-1.
func ringMemlock(objs *loader.Objects, n uint32) uint64 {
	var total uint64
	for id := uint32(0); id < n; id++ {
		var inner *ebpf.Map
		if err := objs.Rings.Lookup(id, &inner); err != nil {
			fail(err.Error())
		}
		info, err := inner.Info()
		if err != nil {
			fail(err.Error())
		}
		b, _ := info.Memlock()
		total += b
		inner.Close()
	}
	return total
}

func mib(b uint64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

func maglevBuild(w io.Writer) {
	fmt.Fprintln(w, "## Maglev table build (Go, median of 21)")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| slots | backends | build time |")
	fmt.Fprintln(w, "|---:|---:|---:|")
	for _, n := range []int{10, 100, 1000} {
		bs := make([]maglev.Backend, n)
		for i := range bs {
			bs[i] = maglev.Backend{ID: uint32(i + 1), Key: fmt.Sprintf("192.0.2.%d:%d", i%250, 8000+i), Weight: 1}
		}
		var ds []float64
		for range 21 {
			start := time.Now()
			if _, err := maglev.Build(bs, maglev.DefaultSize, maglev.DefaultSeed); err != nil {
				fail(err.Error())
			}
			ds = append(ds, float64(time.Since(start).Microseconds()))
		}
		fmt.Fprintf(w, "| %d | %d | %.2f ms |\n", maglev.DefaultSize, n, benchrun.Median(ds)/1000)
	}
	fmt.Fprintln(w)
}

func mapsService(id uint32) maps.Service {
	return maps.Service{ID: id, SourceAffinity: true, AffinityTimeout: time.Hour}
}
