package bgp

import (
	"testing"

	"github.com/osrg/gobgp/v4/api"
	bgppkt "github.com/osrg/gobgp/v4/pkg/packet/bgp"
)

// TestStateNames: the API's session states and GoBGP's FSM states read
// alike.
func TestStateNames(t *testing.T) {
	for _, tc := range []struct {
		fsm  bgppkt.FSMState
		api  api.PeerState_SessionState
		name string
	}{
		{bgppkt.BGP_FSM_IDLE, api.PeerState_SESSION_STATE_IDLE, "idle"},
		{bgppkt.BGP_FSM_CONNECT, api.PeerState_SESSION_STATE_CONNECT, "connect"},
		{bgppkt.BGP_FSM_ACTIVE, api.PeerState_SESSION_STATE_ACTIVE, "active"},
		{bgppkt.BGP_FSM_OPENSENT, api.PeerState_SESSION_STATE_OPENSENT, "opensent"},
		{bgppkt.BGP_FSM_OPENCONFIRM, api.PeerState_SESSION_STATE_OPENCONFIRM, "openconfirm"},
		{bgppkt.BGP_FSM_ESTABLISHED, api.PeerState_SESSION_STATE_ESTABLISHED, "established"},
	} {
		if got := stateName(tc.fsm); got != tc.name {
			t.Errorf("stateName(%v) = %q, want %q", tc.fsm, got, tc.name)
		}
		if got := sessionName(tc.api); got != tc.name {
			t.Errorf("sessionName(%v) = %q, want %q", tc.api, got, tc.name)
		}
	}
	if got := sessionName(api.PeerState_SESSION_STATE_UNSPECIFIED); got != "idle" {
		t.Errorf("unspecified state: %q", got)
	}
}
