package test

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/lab"
)

// TestHonestCounts checks the connection counts against what the clients
// hold, on each datapath, with idle_after 3s: 30 clients echo every
// 100 ms and 10 hold a connection without a word. The silent ones are
// counted idle within idle_after, and the others active. Then backend 1's
// server is killed: its echoing clients get a reset from its kernel and
// reconnect elsewhere, so tether sees no FIN from them. Its count of
// active connections falls to 0 within down detection and idle_after (at
// once for those whose clients show up elsewhere), its connections are
// counted lost (XDP; splice closes them), and the active counts add up
// to the 30 echoing clients, as backend ls, status and metrics show.
func TestHonestCounts(t *testing.T) { forEachDatapath(t, testHonestCounts) }

func testHonestCounts(t *testing.T, dp string) {
	const (
		idleAfter = 3 * time.Second
		echoing   = 30
		silent    = 10
	)
	l := lab.NewT(t, lab.Options{Backends: 3, Clients: echoing + silent})
	echo := map[string]*lab.Proc{}
	for _, be := range l.Backends {
		echo[be.Name] = startEcho(t, l, be)
	}
	cfg := strings.ReplaceAll(healthConfig(l, l.Backends, wsHealth), "    affinity_timeout: 1h\n",
		fmt.Sprintf("    affinity_timeout: 1h\n    idle_after: %s\n", idleAfter))
	d := startDaemon(t, l, withDatapath(cfg, dp))
	api := control.NewClient(d.socket)
	vip := netip.AddrPortFrom(l.VIP4, chatPort).String()
	waitFor(t, "every backend up", 10*time.Second, func() bool {
		for _, b := range service(t, api, vip).Backends {
			if b.State != "active" {
				return false
			}
		}
		return true
	})
	f := startFleet(t, l, l.ClientAddrs4[:echoing], l.VIP4)
	quiet := dialAll(t, l, l.ClientAddrs4[echoing:], l.VIP4, 1)
	defer func() {
		for _, c := range quiet {
			c.ws.Close()
		}
	}()
	be1 := l.Backends[0]
	fleetOn1, quietOn1 := byBackend(f.state())[be1.Name], 0
	for _, c := range quiet {
		if c.backend == be1.Name {
			quietOn1++
		}
	}
	if fleetOn1 == 0 || quietOn1 == 0 {
		t.Fatalf("%s has %d echoing and %d silent clients; the lab's sources should spread", be1.Name, fleetOn1, quietOn1)
	}
	type sums struct{ active, idle, lost int }
	total := func() (s sums, per map[string]control.BackendStatus) {
		per = map[string]control.BackendStatus{}
		for _, be := range l.Backends {
			b := backendOf(t, service(t, api, vip), be)
			per[be.Name] = b
			s.active += b.ActiveConnections
			s.idle += b.IdleConnections
			s.lost += b.LostConnections
		}
		return s, per
	}
	took := waitFor(t, "the silent connections counted idle", idleAfter+5*time.Second, func() bool {
		s, _ := total()
		return s == sums{active: echoing, idle: silent}
	})
	t.Logf("%s: %d echoing clients, %d silent ones; counted %d active and %d idle %v after they were made",
		dp, echoing, silent, echoing, silent, took.Round(100*time.Millisecond))

	killed := time.Now()
	if err := echo[be1.Name].Kill(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, be1.Name+" down", 10*time.Second, func() bool {
		return backendOf(t, service(t, api, vip), be1).State == "down"
	})
	down := time.Since(killed)
	waitFor(t, "the echoing clients of "+be1.Name+" reconnected", 2*retryDelay+10*time.Second, func() bool {
		for _, st := range f.state() {
			if st.first == be1.Name && (len(st.tries) == 0 || st.backend == be1.Name) && len(st.errs) == 0 {
				return false
			}
		}
		return true
	})
	want := sums{active: echoing, idle: silent - quietOn1, lost: quietOn1 + fleetOn1}
	if dp == config.DatapathSplice {
		// The proxy holds both sockets: the backend's end closes them.
		want = sums{active: echoing, idle: silent - quietOn1}
	}
	var last sums
	var per map[string]control.BackendStatus
	waitFor(t, fmt.Sprintf("the counts %+v", want), down+idleAfter+5*time.Second, func() bool {
		last, per = total()
		return last == want
	})
	t.Logf("%s: %s killed, down after %v, counts %+v %v after the kill (%s: %d active, %d lost); clients now %v",
		dp, be1.Name, down.Round(100*time.Millisecond), last, time.Since(killed).Round(100*time.Millisecond),
		be1.Name, per[be1.Name].ActiveConnections, per[be1.Name].LostConnections, byBackend(f.state()))
	if bound := down + idleAfter + 2*time.Second; time.Since(killed) > bound {
		t.Errorf("the counts took %v after the kill to settle (down after %v), want within down detection, idle_after and 2 s: %v", time.Since(killed), down, bound)
	}
	for _, st := range f.state() {
		if len(st.errs) > 0 {
			t.Errorf("client %s (on %s): %v", st.src, st.first, st.errs)
		}
	}
	ls := d.mustCLI("backend", "ls", vip)
	t.Logf("tether backend ls %s\n%s", vip, ls)
	if !strings.Contains(ls, "IDLE  LOST") {
		t.Errorf("backend ls shows no IDLE and LOST columns:\n%s", ls)
	}
}
