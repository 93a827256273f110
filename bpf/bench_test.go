package bpf_test

import (
	"strconv"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/tetherlb/tether/bpf"
	"github.com/tetherlb/tether/internal/bpftest"
)

// These benchmarks give quick per-packet figures with `go test -bench`;
// `make bench` runs the fuller comparison in test/bench/xdpcost.

func benchProg(b *testing.B, p *ebpf.Program, frame []byte, want uint32) {
	ret, d, err := p.Benchmark(frame, b.N, nil)
	if err != nil {
		b.Fatal(err)
	}
	if ret != want {
		b.Fatalf("verdict %d, want %d", ret, want)
	}
	b.ReportMetric(float64(d.Nanoseconds()), "ns/packet")
}

func BenchmarkTrivialTX(b *testing.B) {
	bpftest.RequireBPF(b)
	p, err := bpftest.TrivialTX()
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	benchProg(b, p, bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.TCP}.Bytes(), bpftest.XDPTx)
}

func BenchmarkConnHit(b *testing.B) {
	f := bpftest.NewFixture(b, loaderOpts())
	f.AddService(bpftest.Service{ID: 1, VIP: vip4, Proto: bpftest.TCP, Source: true, Backends: []uint32{1, 2, 3}})
	frame := bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.TCP}.Bytes()
	f.Run(frame) // records the flow
	benchProg(b, f.Objs.TetherXdp, frame, bpftest.XDPTx)
}

func BenchmarkNewFlow(b *testing.B) {
	f := bpftest.NewFixture(b, loaderOpts())
	f.AddService(bpftest.Service{ID: 1, VIP: vip4, Proto: bpftest.TCP, Backends: []uint32{1, 2, 3}})
	// A SYN takes the whole new-flow path but records nothing, so every
	// repetition is a new flow.
	frame := bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.TCP, Flags: bpftest.SYN}.Bytes()
	benchProg(b, f.Objs.TetherXdp, frame, bpftest.XDPTx)
}

// BenchmarkFlows times the daemon's listing of the connection tables
// (tether status, top, flows, the renewal of connected clients' affinity
// entries) with 65,536 and 1,048,576 IPv4 entries.
func BenchmarkFlows(b *testing.B) {
	for _, n := range []int{1 << 16, 1 << 20} {
		b.Run(strconv.Itoa(n), func(b *testing.B) {
			f := bpftest.NewFixture(b, loaderOptsSized(2*uint32(n), 1<<10))
			keys := make([]bpf.TetherFlowKey4, n)
			vals := make([]bpf.TetherConn, n)
			for i := range keys {
				keys[i] = bpf.TetherFlowKey4{Src: uint32(i), Dst: 1, Sport: uint16(i >> 16), Dport: 80, Proto: 6}
				vals[i] = bpf.TetherConn{Backend: 1, Service: 1}
			}
			if _, err := f.Maps.Raw().Conns4.BatchUpdate(keys, vals, nil); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for range b.N {
				flows, err := f.Maps.Flows()
				if err != nil {
					b.Fatal(err)
				}
				if len(flows) != n {
					b.Fatalf("listed %d flows of %d", len(flows), n)
				}
			}
		})
	}
}
