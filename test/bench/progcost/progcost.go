// Package progcost measures what tether's XDP program costs per packet
// with BPF_PROG_TEST_RUN, against a trivial MAC-swap XDP_TX program as the
// floor, in interleaved rounds. The xdpcost and peers benchmarks report
// it.
package progcost

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"

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
)

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

	paths := []struct {
		name  string
		prog  *ebpf.Program
		frame []byte
	}{
		{Floor, trivial, hit4},
		{Hit4, f.Objs.TetherXdp, hit4},
		{Hit6, f.Objs.TetherXdp, hit6},
		{NewFlow, f.Objs.TetherXdp, syn},
		{NewAff, f.Objs.TetherXdp, synAff},
		{NotVIP, f.Objs.TetherXdp, notVIP},
	}
	results = make([]Result, len(paths))
	for i, p := range paths {
		results[i].Name = p.name
	}
	for range rounds {
		for i, p := range paths {
			_, d, err := p.prog.Benchmark(p.frame, repeat, nil)
			if err != nil {
				return nil, fmt.Errorf("progcost: %s: %w", p.name, err)
			}
			results[i].Samples = append(results[i].Samples, float64(d.Nanoseconds()))
		}
	}
	return results, nil
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
