package bpf_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/tetherlb/tether/bpf/bpftest"
)

// trivialTX is the floor tether is measured against: a program that swaps
// the Ethernet addresses and returns XDP_TX.
func trivialTX(tb testing.TB) *ebpf.Program {
	tb.Helper()
	insns := asm.Instructions{
		asm.LoadMem(asm.R2, asm.R1, 0, asm.Word), // data
		asm.LoadMem(asm.R3, asm.R1, 4, asm.Word), // data_end
		asm.Mov.Reg(asm.R4, asm.R2),
		asm.Add.Imm(asm.R4, 14),
		asm.JGT.Reg(asm.R4, asm.R3, "drop"),
		// swap dst[0:4]/src[6:10] and dst[4:6]/src[10:12]
		asm.LoadMem(asm.R5, asm.R2, 0, asm.Word),
		asm.LoadMem(asm.R6, asm.R2, 6, asm.Word),
		asm.StoreMem(asm.R2, 0, asm.R6, asm.Word),
		asm.StoreMem(asm.R2, 6, asm.R5, asm.Word),
		asm.LoadMem(asm.R5, asm.R2, 4, asm.Half),
		asm.LoadMem(asm.R6, asm.R2, 10, asm.Half),
		asm.StoreMem(asm.R2, 4, asm.R6, asm.Half),
		asm.StoreMem(asm.R2, 10, asm.R5, asm.Half),
		asm.Mov.Imm(asm.R0, bpftest.XDPTx),
		asm.Return(),
		asm.Mov.Imm(asm.R0, bpftest.XDPDrop).WithSymbol("drop"),
		asm.Return(),
	}
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.XDP, Instructions: insns, License: "GPL"})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { p.Close() })
	return p
}

func benchProg(b *testing.B, p *ebpf.Program, frame []byte, want uint32) {
	ret, d, err := p.Benchmark(frame, b.N, nil)
	if err != nil {
		b.Fatal(err)
	}
	if ret != want {
		b.Fatalf("verdict %d, want %d", ret, want)
	}
	b.ReportMetric(float64(d.Nanoseconds()), "ns/packet")
	_ = time.Nanosecond
}

func BenchmarkTrivialTX(b *testing.B) {
	p := trivialTX(b)
	benchProg(b, p, bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.TCP}.Bytes(), bpftest.XDPTx)
}

func BenchmarkConnHit(b *testing.B) {
	f := bpftest.NewFixture(b, loaderOpts())
	s := bpftest.Service{ID: 1, VIP: vip4, Proto: bpftest.TCP, Source: true, Backends: []uint32{1, 2, 3}}
	f.AddService(s)
	frame := bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.TCP}.Bytes()
	f.Run(frame) // records the flow
	benchProg(b, f.Objs.TetherXdp, frame, bpftest.XDPTx)
}

func BenchmarkNewFlow(b *testing.B) {
	f := bpftest.NewFixture(b, loaderOpts())
	s := bpftest.Service{ID: 1, VIP: vip4, Proto: bpftest.TCP, Source: false, Backends: []uint32{1, 2, 3}}
	f.AddService(s)
	// A SYN takes the whole new-flow path (service, ring) but records nothing,
	// so every repetition is a new flow.
	frame := bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.TCP, Flags: bpftest.SYN}.Bytes()
	benchProg(b, f.Objs.TetherXdp, frame, bpftest.XDPTx)
	_ = netip.Addr{}
}
