package control

import (
	"reflect"
	"strings"
	"testing"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
)

// pinned returns services as a new daemon reads them back from pinned
// maps: without names or weights, which the maps do not hold.
func pinned(ss []datapath.Service) []datapath.Service {
	out := make([]datapath.Service, 0, len(ss))
	for _, s := range ss {
		s.Name = ""
		bs := make([]datapath.Backend, len(s.Backends))
		for i, b := range s.Backends {
			b.Weight = 0
			bs[i] = b
		}
		s.Backends = bs
		out = append(out, s)
	}
	return out
}

// A controller that adopts what an earlier one left in the datapath gives
// the same configuration the same ids and rings, deletes adopted services
// that are no longer configured, and allocates new ids around the adopted
// ones.
func TestAdoptKeepsIDs(t *testing.T) {
	// Ids that a fresh controller would not hand out in this order: a
	// service and backends come and go first.
	first := parse(t, conf(8, 32, svc("gone", "203.0.113.99", 80, "192.0.2.99", "192.0.2.98"), web4))
	cfg := parse(t, conf(8, 32, dns6, web4Plus))
	dpA := newFakeDP()
	a := newController(dpA, cfg)
	mustApply(t, a, first)
	mustApply(t, a, cfg)
	before := services(a)

	dpB := newFakeDP()
	for _, s := range pinned(before) {
		dpB.installed[s.ID] = s
	}
	b := newController(dpB, cfg)
	if err := b.Adopt(pinned(before)); err != nil {
		t.Fatal(err)
	}
	if fresh := newController(newFakeDP(), cfg); true {
		mustApply(t, fresh, cfg)
		if reflect.DeepEqual(services(fresh), before) {
			t.Fatal("test setup: a fresh controller assigns the same ids, the test proves nothing")
		}
	}
	mustApply(t, b, cfg)
	calls := wantCalls(t, dpB.take(), "upsert web4", "upsert dns6")
	for _, s := range before {
		if got := calls[s.Name].svc; !reflect.DeepEqual(got, s) {
			t.Errorf("%s after adoption:\n got %+v\nwant %+v", s.Name, got, s)
		}
	}
	if got := services(b); !reflect.DeepEqual(got, before) {
		t.Errorf("Services() after adoption = %+v, want %+v", got, before)
	}

	// dns6 leaves, a new service comes: the adopted one is deleted whole,
	// the new one takes ids no adopted service or backend holds.
	mustApply(t, b, parse(t, conf(8, 32, web4Plus, svc("new", "203.0.113.20", 443, "192.0.2.21", "192.0.2.22"))))
	got := wantCalls(t, dpB.take(), "delete dns6", "upsert new")
	var dns6 datapath.Service
	for _, s := range before {
		if s.Name == "dns6" {
			dns6 = s
		}
	}
	if d := got["dns6"].svc; !reflect.DeepEqual(d, dns6) {
		t.Errorf("deleted %+v, want dns6 as applied %+v", d, dns6)
	}
	dpB.checkConflicts(t)

	// A daemon whose configuration lost a service while it was stopped
	// deletes the adopted service, with the backends the maps hold.
	dpC := newFakeDP()
	for _, s := range pinned(before) {
		dpC.installed[s.ID] = s
	}
	c := newController(dpC, cfg)
	if err := c.Adopt(pinned(before)); err != nil {
		t.Fatal(err)
	}
	mustApply(t, c, parse(t, conf(8, 32, web4Plus)))
	const key = "[2001:db8::10]:53/udp" // the name of an adopted service
	del := wantCalls(t, dpC.take(), "upsert web4", "delete "+key)[key].svc
	want := pinned([]datapath.Service{dns6})[0]
	want.Name = key
	if !reflect.DeepEqual(del, want) {
		t.Errorf("deleted %+v, want the adopted %+v", del, want)
	}
	dpC.checkConflicts(t)
}

func TestAdoptRefusals(t *testing.T) {
	cfg := parse(t, conf(8, 32, web4, dns6))
	a := newController(newFakeDP(), cfg)
	mustApply(t, a, cfg)
	ss := pinned(services(a))

	if err := a.Adopt(ss); err == nil {
		t.Error("Adopt after Apply was accepted")
	}
	dup := append(pinned(services(a)), ss[0])
	dup[len(dup)-1].Port++
	if err := newController(newFakeDP(), cfg).Adopt(dup); err == nil || !strings.Contains(err.Error(), "used twice") {
		t.Errorf("two services with one id: %v, want a refusal", err)
	}
	big := pinned(services(a))
	big[0].ID = 8 // max_services 8: ids 0..7
	if err := newController(newFakeDP(), cfg).Adopt(big); err == nil || !strings.Contains(err.Error(), "outside") {
		t.Errorf("service id beyond the table: %v, want a refusal", err)
	}
}

// A service adopted with the signature of its ring keeps the ring when the
// configuration would build it alike: a restart builds no ring. Without a
// signature, or with another hash seed, the ring is built (and kept only if
// it comes out the same).
func TestAdoptSignedRings(t *testing.T) {
	cfg := parse(t, conf(8, 32, dns6, web4Plus))
	a := newController(newFakeDP(), cfg)
	mustApply(t, a, cfg)
	before := services(a)
	for _, s := range before {
		if s.RingSignature == 0 {
			t.Fatalf("%s applied without a ring signature", s.Name)
		}
	}
	restart := func(cfg *config.Config, adopted []datapath.Service) map[string]call {
		t.Helper()
		dp := newFakeDP()
		for _, s := range before {
			dp.installed[s.ID] = s
		}
		b := newController(dp, cfg)
		if err := b.Adopt(adopted); err != nil {
			t.Fatal(err)
		}
		mustApply(t, b, cfg)
		return wantCalls(t, dp.take(), "upsert web4", "upsert dns6")
	}
	for name, c := range restart(cfg, pinned(before)) {
		if !c.keptRing {
			t.Errorf("%s: ring sent again although its signature is the adopted one", name)
		}
	}
	unsigned := pinned(before)
	for i := range unsigned {
		unsigned[i].RingSignature = 0
	}
	for name, c := range restart(cfg, unsigned) {
		if !c.keptRing {
			t.Errorf("%s, adopted without a signature: the ring built alike was sent again", name)
		}
	}
	reseeded := parse(t, conf(8, 32, dns6, web4Plus))
	reseeded.HashSeed++
	for name, c := range restart(reseeded, pinned(before)) {
		if c.keptRing || c.svc.RingSignature == before[0].RingSignature || c.svc.RingSignature == before[1].RingSignature {
			t.Errorf("%s: another hash seed kept the ring or its signature", name)
		}
	}
}
