package bpf_test

import (
	"regexp"
	"strconv"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/tetherlb/tether/bpf"
	"github.com/tetherlb/tether/internal/bpftest"
)

// verifierLimit is the kernel's bound on the instructions the verifier
// processes for one program (BPF_COMPLEXITY_LIMIT_INSNS).
const verifierLimit = 1_000_000

// TestVerifierHeadroom loads the XDP program with the insertion guard on
// and reads how many instructions the verifier processed: every branch a
// change adds multiplies the paths it walks, and past a million the
// program no longer loads. The test fails at 95% of that, before a
// kernel whose verifier walks a little more refuses it outright; it logs
// the figure, which docs/testing.md quotes.
func TestVerifierHeadroom(t *testing.T) {
	bpftest.RequireBPF(t)
	spec, err := bpf.LoadTether()
	if err != nil {
		t.Fatal(err)
	}
	if err := spec.Variables[bpf.TetherVarInsertRate].Set(uint32(10000)); err != nil {
		t.Fatal(err)
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{Programs: ebpf.ProgramOptions{LogLevel: ebpf.LogLevelStats}})
	if err != nil {
		t.Fatal(err)
	}
	defer coll.Close()
	m := regexp.MustCompile(`processed (\d+) insns`).FindStringSubmatch(coll.Programs[bpf.TetherProgTetherXdp].VerifierLog)
	if m == nil {
		t.Fatalf("no instruction count in the verifier's log:\n%s", coll.Programs[bpf.TetherProgTetherXdp].VerifierLog)
	}
	n, _ := strconv.Atoi(m[1])
	t.Logf("the verifier processed %d instructions of tether_xdp, %.1f%% of its limit of %d", n, 100*float64(n)/verifierLimit, verifierLimit)
	if n >= verifierLimit*95/100 {
		t.Errorf("the verifier processed %d instructions, within 5%% of its limit of %d: cut the paths (a global function, a tail call) before adding more", n, verifierLimit)
	}
}
