// Package percpu holds the counters of the benchmarks' hand-written BPF
// programs (pktgen's frame counter, syscount's system call counter): an
// array of 64-bit counters with a slot per CPU, which a program increments
// without atomic instructions, since no other CPU writes its slot, and
// which Go sums over the CPUs when it reads them.
package percpu

import (
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// New makes an array of n per-CPU counters, indexed from 0. The caller
// closes it.
func New(name string, n uint32) (*ebpf.Map, error) {
	m, err := ebpf.NewMap(&ebpf.MapSpec{
		Name:       name,
		Type:       ebpf.PerCPUArray,
		KeySize:    4,
		ValueSize:  8,
		MaxEntries: n,
	})
	if err != nil {
		return nil, fmt.Errorf("create counter map %s: %w", name, err)
	}
	return m, nil
}

// Increment is BPF that adds one to this CPU's slot of the counter whose
// index the program has stored as a 32-bit word at R10-4 (its stack), then
// goes on with the next instruction; if the index is out of range it jumps
// to skip instead. It uses R0 to R5.
func Increment(counters *ebpf.Map, skip string) asm.Instructions {
	return asm.Instructions{
		asm.LoadMapPtr(asm.R1, counters.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -4),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, skip),
		asm.LoadMem(asm.R1, asm.R0, 0, asm.DWord),
		asm.Add.Imm(asm.R1, 1),
		asm.StoreMem(asm.R0, 0, asm.R1, asm.DWord),
	}
}

// Sum adds up the CPUs' slots of one counter, as the map returns them.
func Sum(perCPU []uint64) uint64 {
	var n uint64
	for _, v := range perCPU {
		n += v
	}
	return n
}
