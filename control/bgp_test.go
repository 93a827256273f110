package control

import (
	"net/netip"
	"testing"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/health"
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
	// The usable backends of each service, as Controller.Usable counts
	// them: port 80's from their states, 443's always 1 (of 3 needed).
	applied := func(states80 ...datapath.State) map[string]int {
		n := 0
		for _, st := range states80 {
			if st == datapath.Active {
				n++
			}
		}
		return map[string]int{"203.0.113.10:80/tcp": n, "203.0.113.10:443/tcp": 1}
	}
	a := announcer{cfg: cfg.BGP, withdrawn: map[netip.Addr]bool{}, servable: map[netip.Addr]time.Time{}}
	t0 := time.Now()
	check := func(when time.Duration, svcs map[string]int, want bool) {
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

// TestUsableCounts: Controller.Usable counts a service's active backends,
// not the drained ones, nor those of weight 0, nor those health takes down.
func TestUsableCounts(t *testing.T) {
	cfg := parse(t, `interfaces: [eth0]
tables: {ring_size: 4099}
services:
  - name: chat
    vip: 203.0.113.10
    port: 80
    backends:
      - {address: 198.51.100.11}
      - {address: 198.51.100.12, state: draining}
      - {address: 198.51.100.13, weight: 0}
      - {address: 198.51.100.14}
`)
	c := newController(newFakeDP(), cfg)
	down := netip.MustParseAddrPort("198.51.100.14:80")
	c.SetHealth(func(t health.Target) bool { return t.Addr != down })
	if err := c.Apply(cfg); err != nil {
		t.Fatal(err)
	}
	if got := c.Usable(); len(got) != 1 || got["203.0.113.10:80/tcp"] != 1 {
		t.Errorf("Usable() = %v, want 1 for 203.0.113.10:80/tcp", got)
	}
}
