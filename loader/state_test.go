package loader

import (
	"strings"
	"testing"

	"github.com/cilium/ebpf/btf"

	"github.com/tetherlb/tether/bpf"
	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/maps"
)

// TestStatesFollowC checks the backend states three ways: every state of
// the control plane maps to the program's state of the same name, and the
// program's enum backend_state (in its BTF) has exactly the states the Go
// side names, with the same values.
func TestStatesFollowC(t *testing.T) {
	for _, tc := range []struct {
		st    datapath.State
		reset bool
		want  string
	}{
		{datapath.Active, false, "BE_ACTIVE"},
		{datapath.Draining, false, "BE_DRAINING"},
		{datapath.Down, false, "BE_DOWN"},
		{datapath.Down, true, "BE_DOWN_RESET"},
		{datapath.Active, true, "BE_ACTIVE"},
		{datapath.Draining, true, "BE_DRAINING"},
	} {
		got, err := mapState(tc.st, tc.reset)
		if err != nil {
			t.Fatal(err)
		}
		if name := cName(t, got); name != tc.want {
			t.Errorf("state %s (on_down reset %v) is %s in the program, want %s", tc.st, tc.reset, name, tc.want)
		}
		if !strings.EqualFold("BE_"+tc.st.String(), tc.want) && !tc.reset {
			t.Errorf("state %s is named %s in C", tc.st, tc.want)
		}
	}
	if _, err := mapState(datapath.State(0), false); err == nil {
		t.Error("state 0 mapped to a program state")
	}
	goNames := map[string]uint8{
		"BE_UNUSED": maps.StateUnused, "BE_ACTIVE": maps.StateActive, "BE_DRAINING": maps.StateDraining,
		"BE_DOWN": maps.StateDown, "BE_DOWN_RESET": maps.StateDownReset,
	}
	enum := backendStates(t)
	if len(enum.Values) != len(goNames) {
		t.Errorf("C has %d backend states, Go names %d", len(enum.Values), len(goNames))
	}
	for _, v := range enum.Values {
		if g, ok := goNames[v.Name]; !ok || uint64(g) != v.Value {
			t.Errorf("C state %s = %d; Go has %d (named: %v)", v.Name, v.Value, g, ok)
		}
	}
}

func backendStates(t *testing.T) *btf.Enum {
	t.Helper()
	spec, err := bpf.LoadTether()
	if err != nil {
		t.Fatal(err)
	}
	var enum *btf.Enum
	if err := spec.Types.TypeByName("backend_state", &enum); err != nil {
		t.Fatalf("enum backend_state in the program's BTF: %v", err)
	}
	return enum
}

// cName is the C name of program state v.
func cName(t *testing.T, v uint8) string {
	for _, e := range backendStates(t).Values {
		if e.Value == uint64(v) {
			return e.Name
		}
	}
	return "none"
}
