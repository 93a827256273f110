package control

import (
	"net/netip"
	"testing"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
)

// TestAnnounceVerdicts: a VIP is announced while one of its services has
// min_healthy usable backends (active, weight above 0), withdrawn at once
// when none has, and announced again only after the reannounce delay;
// a drained host announces nothing.
func TestAnnounceVerdicts(t *testing.T) {
	vip := netip.MustParseAddr("203.0.113.10")
	cfg := &config.Config{Services: []config.Service{
		{VIP: vip, Port: 80, Protocol: "tcp", MinHealthy: 2},
		{VIP: vip, Port: 443, Protocol: "tcp", MinHealthy: 3},
	}, BGP: &config.BGP{ReannounceDelay: 5 * time.Second}}
	applied := func(states80 ...datapath.State) []datapath.Service {
		s80 := datapath.Service{VIP: vip, Port: 80, Proto: 6}
		for _, st := range states80 {
			s80.Backends = append(s80.Backends, datapath.Backend{State: st, Weight: 1})
		}
		s443 := datapath.Service{VIP: vip, Port: 443, Proto: 6, Backends: []datapath.Backend{{State: datapath.Active, Weight: 1}}}
		return []datapath.Service{s80, s443}
	}
	a := announcer{cfg: cfg.BGP, withdrawn: map[netip.Addr]bool{}, servable: map[netip.Addr]time.Time{}}
	t0 := time.Now()
	check := func(when time.Duration, svcs []datapath.Service, want bool) {
		t.Helper()
		v := a.verdicts(cfg, svcs, t0.Add(when))
		if len(v) != 1 || v[0].Announced != want {
			t.Fatalf("at %v: %+v, want announced %v", when, v, want)
		}
	}
	up := datapath.Active
	check(0, applied(up, up), true)                               // 80 has 2 of 2: announced at once
	check(time.Second, applied(up, datapath.Down), false)         // 1 of 2, and 443 has 1 of 3: withdrawn
	check(2*time.Second, applied(up, up), false)                  // servable again: waits
	check(6*time.Second, applied(up, up), false)                  // 4s of the 5s
	check(7*time.Second+time.Millisecond, applied(up, up), true)  // 5s held
	check(8*time.Second, applied(up, datapath.Draining), false)   // a drained backend is not usable
	check(9*time.Second, applied(up, up), false)                  // the delay starts again
	check(10*time.Second, applied(up, datapath.Down), false)      // and a flap resets it
	check(11*time.Second, applied(up, up), false)                 //
	check(16*time.Second+time.Millisecond, applied(up, up), true) // 5s after the last flap
	a.drained = true
	check(17*time.Second, applied(up, up), false)
	// 0 announces whatever the backends.
	cfg.Services[0].MinHealthy = 0
	a.drained = false
	check(18*time.Second, applied(datapath.Down, datapath.Down), true)
}
