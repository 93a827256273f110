package control

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/tetherlb/tether/datapath"
)

// resolvingDP is a fakeDP that resolves backends (datapath.Resolver): the
// addresses of fail do not answer, or are refused.
type resolvingDP struct {
	*fakeDP
	fail     map[netip.Addr]error
	answered func(netip.Addr)
}

var _ datapath.Resolver = (*resolvingDP)(nil)

func (r *resolvingDP) Resolve(addrs []netip.Addr) map[netip.Addr]error {
	out := map[netip.Addr]error{}
	for _, a := range addrs {
		if err, ok := r.fail[a]; ok {
			out[a] = err
		}
	}
	return out
}

func (r *resolvingDP) OnResolved(fn func(netip.Addr)) { r.answered = fn }

// A backend the datapath cannot reach is planned down, out of the ring,
// until the datapath says it answers; one the datapath refuses refuses the
// whole configuration, with nothing applied.
func TestUnreachableBackends(t *testing.T) {
	absent := netip.MustParseAddr("192.0.2.12")
	dp := &resolvingDP{fakeDP: newFakeDP(), fail: map[netip.Addr]error{absent: errors.New("backend 192.0.2.12 does not answer ARP/ND on eth0")}}
	cfg := parse(t, conf(8, 32, web4, dns6))
	c := newController(dp, cfg)
	mustApply(t, c, cfg)
	state := func(s datapath.Service, a netip.Addr) datapath.State {
		for _, b := range s.Backends {
			if b.Addr == a {
				return b.State
			}
		}
		t.Fatalf("%s has no backend %s", s.Name, a)
		return 0
	}
	calls := wantCalls(t, dp.take(), "upsert dns6", "upsert web4")
	web := calls["web4"].svc
	if st := state(web, absent); st != datapath.Down {
		t.Errorf("unreachable backend applied %v, want down", st)
	}
	if got := ringSummaryIDs(web.Ring); len(got) != 2 || slices.Contains(got, backendID(t, web, absent)) {
		t.Errorf("ring of web4 has backends %v, want the two others", got)
	}
	if why := c.Unreachable()[absent]; !strings.Contains(why, "does not answer") {
		t.Errorf("Unreachable(%s) = %q", absent, why)
	}

	// The host comes up: only the services with it are applied again.
	delete(dp.fail, absent)
	if err := c.Reachable(absent); err != nil {
		t.Fatal(err)
	}
	web = wantCalls(t, dp.take(), "upsert web4")["web4"].svc
	if st := state(web, absent); st != datapath.Active {
		t.Errorf("backend that answers applied %v, want active", st)
	}
	if why := c.Unreachable()[absent]; why != "" {
		t.Errorf("Unreachable(%s) = %q after it answered", absent, why)
	}

	// A refused address refuses the change before anything is applied.
	dp.fail[netip.MustParseAddr("192.0.2.14")] = datapath.Refuse(errors.New("backend 192.0.2.14 is reached through gateway 192.0.2.1"))
	err := c.Apply(parse(t, conf(8, 32, web4Plus, dns6)))
	var refused *datapath.RefusedError
	if !errors.As(err, &refused) {
		t.Fatalf("Apply with a refused backend: %v, want a refusal", err)
	}
	wantCalls(t, dp.take())
}

// ringSummaryIDs is the distinct backend ids of ring, sorted.
func ringSummaryIDs(ring []uint32) []uint32 {
	ids := slices.Clone(ring)
	slices.Sort(ids)
	return slices.Compact(ids)
}

// backendID is the id of the backend at a in s.
func backendID(t *testing.T, s datapath.Service, a netip.Addr) uint32 {
	t.Helper()
	for _, b := range s.Backends {
		if b.Addr == a {
			return b.ID
		}
	}
	t.Fatalf("%s has no backend %s", s.Name, a)
	return 0
}
