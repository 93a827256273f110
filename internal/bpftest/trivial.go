package bpftest

import (
	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// TrivialTX loads the floor tether's cost is measured against: an XDP
// program that swaps the Ethernet addresses and returns XDP_TX, which is
// the least any forwarding program does.
func TrivialTX() (*ebpf.Program, error) {
	insns := asm.Instructions{
		asm.LoadMem(asm.R2, asm.R1, 0, asm.Word), // data
		asm.LoadMem(asm.R3, asm.R1, 4, asm.Word), // data_end
		asm.Mov.Reg(asm.R4, asm.R2),
		asm.Add.Imm(asm.R4, 14),
		asm.JGT.Reg(asm.R4, asm.R3, "drop"),
		// swap bytes 0-3 with 6-9, then 4-5 with 10-11
		asm.LoadMem(asm.R5, asm.R2, 0, asm.Word),
		asm.LoadMem(asm.R6, asm.R2, 6, asm.Word),
		asm.StoreMem(asm.R2, 0, asm.R6, asm.Word),
		asm.StoreMem(asm.R2, 6, asm.R5, asm.Word),
		asm.LoadMem(asm.R5, asm.R2, 4, asm.Half),
		asm.LoadMem(asm.R6, asm.R2, 10, asm.Half),
		asm.StoreMem(asm.R2, 4, asm.R6, asm.Half),
		asm.StoreMem(asm.R2, 10, asm.R5, asm.Half),
		asm.Mov.Imm(asm.R0, XDPTx),
		asm.Return(),
		asm.Mov.Imm(asm.R0, XDPDrop).WithSymbol("drop"),
		asm.Return(),
	}
	return ebpf.NewProgram(&ebpf.ProgramSpec{Name: "trivial_tx", Type: ebpf.XDP, Instructions: insns, License: "GPL"})
}
