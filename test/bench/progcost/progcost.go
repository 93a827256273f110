// Package progcost measures what tether's XDP program costs per packet
// with BPF_PROG_TEST_RUN, against a trivial MAC-swap XDP_TX program as the
// floor, in interleaved rounds. The xdpcost and peers benchmarks report
// it.
package progcost

import (
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/internal/bpftest"
	"github.com/tetherlb/tether/loader"
	"github.com/tetherlb/tether/maglev"
	"github.com/tetherlb/tether/test/bench/benchrun"
)

// Path names of the measured paths, as reports print them.
const (
	Floor   = "trivial MAC-swap XDP_TX (floor)"
	Hit4    = "tether: connection-table hit, IPv4"
	Hit6    = "tether: connection-table hit, IPv6"
	NewFlow = "tether: new flow (SYN), ring, IPv4"
	NewAff  = "tether: new flow (SYN), affinity hit, IPv4"
	NotVIP  = "tether: not for a VIP (XDP_PASS)"
	Guarded = "tether: new flow (ACK) past the insertion guard, ring, IPv4"
	// A trace running for another client: each packet pays its filter.
	TraceOther = "tether: connection-table hit, IPv4, a trace of another client running"
	// A trace taking each packet: the event and its frame to the ring.
	Traced = "tether: connection-table hit, IPv4, traced"
)

// tracedRepeat caps the runs of the Traced path: their events must fit in
// the trace's ring (4,369 of them), which is read out before each
// measurement, so that no run finds it full.
const tracedRepeat = 4000

// guardedRepeat caps the runs of the Guarded path: they must fit in the
// one-second window the measurement fills (about 0.1 s).
const guardedRepeat = 1_000_000

// Result is one path's samples, in ns per packet, one per round.
type Result struct {
	Name    string
	Samples []float64
}

// Median is the median of the samples.
func (r Result) Median() float64 { return benchrun.Median(r.Samples) }

// Min and Max bound the samples.
func (r Result) Min() float64 { return slices.Min(r.Samples) }
func (r Result) Max() float64 { return slices.Max(r.Samples) }

var (
	vip4 = netip.MustParseAddrPort("203.0.113.10:8765")
	vip6 = netip.MustParseAddrPort("[2001:db8:f::10]:8765")
	cli4 = netip.MustParseAddrPort("198.51.100.7:40000")
	cli6 = netip.MustParseAddrPort("[2001:db8:c::7]:40000")
)

// fatal carries a fixture failure out of bpftest's testing.TB calls.
type fatal struct{ msg string }

// tb lets bpftest fixtures run outside `go test`: a failure panics with
// fatal, which Measure recovers into its error.
type tb struct{ cleanups []func() }

func (*tb) Helper()                           {}
func (*tb) Fatal(args ...any)                 { panic(fatal{fmt.Sprint(args...)}) }
func (*tb) Fatalf(format string, args ...any) { panic(fatal{fmt.Sprintf(format, args...)}) }
func (*tb) Skip(args ...any)                  { panic(fatal{fmt.Sprint(args...)}) }
func (t *tb) Cleanup(f func())                { t.cleanups = append(t.cleanups, f) }

func (t *tb) close() {
	for i := len(t.cleanups) - 1; i >= 0; i-- {
		t.cleanups[i]()
	}
	t.cleanups = nil
}

// Measure runs every path repeat times per round for rounds interleaved
// rounds. The first result is the floor. It needs root.
func Measure(repeat, rounds int) (results []Result, err error) {
	t := &tb{}
	defer t.close()
	defer func() {
		if r := recover(); r != nil {
			f, ok := r.(fatal)
			if !ok {
				panic(r)
			}
			err = fmt.Errorf("progcost: %s", f.msg)
		}
	}()
	trivial, err := bpftest.TrivialTX()
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { trivial.Close() })

	f := bpftest.NewFixture(t, loader.Options{RingSize: maglev.DefaultSize})
	f.AddService(bpftest.Service{ID: 1, VIP: vip4, Proto: bpftest.TCP, Source: true, Backends: []uint32{1, 2, 3}})
	f.AddService(bpftest.Service{ID: 2, VIP: vip6, Proto: bpftest.TCP, Source: true, Backends: []uint32{4, 5, 6}})
	f.AddService(bpftest.Service{ID: 3, VIP: netip.AddrPortFrom(vip4.Addr(), 9000), Proto: bpftest.TCP, Backends: []uint32{7, 8, 9}})
	hit4 := bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.TCP}.Bytes()
	hit6 := bpftest.Frame{Src: cli6, Dst: vip6, Proto: bpftest.TCP}.Bytes()
	f.Run(hit4) // record both flows
	f.Run(hit6)
	syn := bpftest.Frame{Src: cli4, Dst: netip.AddrPortFrom(vip4.Addr(), 9000), Proto: bpftest.TCP, Flags: bpftest.SYN}.Bytes()
	synAff := bpftest.Frame{Src: netip.AddrPortFrom(cli4.Addr(), 40001), Dst: vip4, Proto: bpftest.TCP, Flags: bpftest.SYN}.Bytes()
	notVIP := bpftest.Frame{Src: cli4, Dst: netip.MustParseAddrPort("203.0.113.99:80"), Proto: bpftest.TCP}.Bytes()

	// A program whose insertion guard is spent: a new flow's ACK is
	// forwarded by the ring and not recorded, as in a flood of spoofed
	// ACKs past tables.insert_rate.
	g := bpftest.NewFixture(t, loader.Options{RingSize: maglev.DefaultSize, InsertRate: 1})
	g.AddService(bpftest.Service{ID: 3, VIP: netip.AddrPortFrom(vip4.Addr(), 9000), Proto: bpftest.TCP, Backends: []uint32{7, 8, 9}})
	ack := bpftest.Frame{Src: cli4, Dst: netip.AddrPortFrom(vip4.Addr(), 9000), Proto: bpftest.TCP}.Bytes()

	// Programs with a trace running: one for another client, one for
	// this one.
	other := bpftest.NewFixture(t, loader.Options{RingSize: maglev.DefaultSize})
	traced := bpftest.NewFixture(t, loader.Options{RingSize: maglev.DefaultSize})
	var readers []datapath.TraceReader
	for fx, client := range map[*bpftest.Fixture]netip.Addr{other: netip.MustParseAddr("198.51.100.250"), traced: cli4.Addr()} {
		fx.AddService(bpftest.Service{ID: 1, VIP: vip4, Proto: bpftest.TCP, Source: true, Backends: []uint32{1, 2, 3}})
		fx.Run(hit4)
		r, err := fx.Objs.Trace(datapath.TraceFilter{Client: client})
		if err != nil {
			return nil, err
		}
		t.Cleanup(func() { r.Close() })
		readers = append(readers, r)
	}
	drain := func() error {
		// The ring holds what the last measurement reported: read it out.
		for _, r := range readers {
			for {
				r.SetDeadline(time.Now().Add(10 * time.Millisecond))
				if _, err := r.Read(); err != nil {
					break
				}
			}
		}
		return nil
	}

	paths := []struct {
		name  string
		prog  *ebpf.Program
		frame []byte
		// before runs before each measurement; after checks it.
		before, after func() error
	}{
		{Floor, trivial, hit4, nil, nil},
		{Hit4, f.Objs.TetherXdp, hit4, nil, nil},
		{Hit6, f.Objs.TetherXdp, hit6, nil, nil},
		{NewFlow, f.Objs.TetherXdp, syn, nil, nil},
		{NewAff, f.Objs.TetherXdp, synAff, nil, nil},
		{NotVIP, f.Objs.TetherXdp, notVIP, nil, nil},
		{Guarded, g.Objs.TetherXdp, ack, func() error { return spendGuard(g.Objs.InsertGuard) }, func() error {
			// The window ran out within the measurement if the flow
			// was recorded: the sample mixes in connection-table hits.
			if _, ok, err := g.Maps.LookupFlow(cli4, netip.AddrPortFrom(vip4.Addr(), 9000), bpftest.TCP); err != nil || ok {
				return fmt.Errorf("the flow was recorded during the measurement (%v): the insertion window ran out", err)
			}
			return nil
		}},
		{TraceOther, other.Objs.TetherXdp, hit4, nil, nil},
		{Traced, traced.Objs.TetherXdp, hit4, drain, func() error {
			for _, r := range readers {
				if n := r.Lost(); n > 0 {
					return fmt.Errorf("the trace's ring was full: %d events lost", n)
				}
			}
			return nil
		}},
	}
	results = make([]Result, len(paths))
	for i, p := range paths {
		results[i].Name = p.name
	}
	for range rounds {
		for i, p := range paths {
			n := repeat
			if p.before != nil {
				n = min(repeat, guardedRepeat)
				if p.name == Traced {
					n = min(repeat, tracedRepeat)
				}
				if err := p.before(); err != nil {
					return nil, fmt.Errorf("progcost: %s: %w", p.name, err)
				}
			}
			_, d, err := p.prog.Benchmark(p.frame, n, nil)
			if err == nil && p.after != nil {
				err = p.after()
			}
			if err != nil {
				return nil, fmt.Errorf("progcost: %s: %w", p.name, err)
			}
			results[i].Samples = append(results[i].Samples, float64(d.Nanoseconds()))
		}
	}
	return results, nil
}

// spendGuard fills the insertion guard's window of every CPU as of now:
// each has recorded its insert_rate (1) new flows in the second that
// starts now (bpf_ktime_get_coarse_ns is CLOCK_MONOTONIC_COARSE).
func spendGuard(m *ebpf.Map) error {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC_COARSE, &ts); err != nil {
		return err
	}
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	type window struct{ StartNs, Entered uint64 } // struct insert_window
	w := make([]window, cpus)
	for i := range w {
		w[i] = window{StartNs: uint64(ts.Nano()), Entered: 1}
	}
	return m.Put(uint32(0), w)
}

// Find returns the result named name.
func Find(results []Result, name string) Result {
	for _, r := range results {
		if r.Name == name {
			return r
		}
	}
	return Result{Name: name, Samples: []float64{0}}
}
