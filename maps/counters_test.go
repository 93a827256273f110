package maps

import (
	"strings"
	"testing"

	"github.com/cilium/ebpf/btf"

	"github.com/tetherlb/tether/bpf"
)

// TestReasonNamesFollowC checks every enumerator of enum reason in the
// program's BTF against the name the counters give it: R_X is "x", and no
// reason goes unnamed.
func TestReasonNamesFollowC(t *testing.T) {
	spec, err := bpf.LoadTether()
	if err != nil {
		t.Fatal(err)
	}
	var enum *btf.Enum
	if err := spec.Types.TypeByName("reason", &enum); err != nil {
		t.Fatalf("enum reason in the program's BTF: %v", err)
	}
	seen := 0
	for _, v := range enum.Values {
		name := strings.ToLower(strings.TrimPrefix(v.Name, "R_"))
		switch v.Name {
		case "R_PARSED":
			name = ""
		case "R_MAX":
			if v.Value != uint64(bpf.TetherReasonR_MAX) || int(v.Value) != len(reasonNames) {
				t.Errorf("R_MAX is %d in C, the Go side names %d reasons", v.Value, len(reasonNames))
			}
			continue
		}
		if got := ReasonName(bpf.TetherReason(v.Value)); got != name {
			t.Errorf("%s = %d is named %q, want %q", v.Name, v.Value, got, name)
		}
		seen++
	}
	if seen != ReasonCount+1 {
		t.Errorf("C has %d reasons, Go counts %d", seen-1, ReasonCount)
	}
}
