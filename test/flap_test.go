package test

import (
	"fmt"
	"maps"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/lab"
)

// openFDs counts a process's open descriptors.
func openFDs(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestBackendFlapping kills one of three backends and starts it again
// every 2 s for a minute (down 1 s, up 1 s), on each datapath, while 90
// WebSocket clients echo every 100 ms. No client of the two stable
// backends breaks or moves; the flapping backend is taken out and put
// back as its health checks say; afterwards the daemon holds what it held
// before (descriptors; with XDP, the same backends in its tables and the
// ring of the active ones; with splice, the VIPs' routes), and its log
// holds a bounded number of lines: a flapping backend's transitions are
// logged one by one at first, then now and then with the count of those
// not logged.
func TestBackendFlapping(t *testing.T) { forEachDatapath(t, testBackendFlapping) }

func testBackendFlapping(t *testing.T, dp string) {
	const (
		cycles = 30
		down   = time.Second
		up     = time.Second
	)
	l := lab.NewT(t, lab.Options{Backends: 3, Clients: 90})
	be1, be2, be3 := l.Backends[0], l.Backends[1], l.Backends[2]
	serveEcho(t, l, be1)
	serveEcho(t, l, be2)
	flapper := startEcho(t, l, be3)
	d := startDaemon(t, l, withDatapath(healthConfig(l, l.Backends, wsHealth), dp))
	api := control.NewClient(d.socket)
	vip := netip.AddrPortFrom(l.VIP4, chatPort).String()
	allUp := func() bool {
		for _, b := range service(t, api, vip).Backends {
			if b.State != "active" {
				return false
			}
		}
		return true
	}
	waitFor(t, "every backend up", 10*time.Second, allUp)
	f := startFleet(t, l, l.ClientAddrs4, l.VIP4)
	defer f.stopAll()
	stable := 0
	for _, st := range f.state() {
		if st.first != be3.Name {
			stable++
		}
	}
	time.Sleep(time.Second)
	pid := d.proc.Cmd.Process.Pid
	fds0 := openFDs(t, pid)
	routes0 := localRoutes(t, l)
	transitions0 := backendOf(t, service(t, api, vip), be3).Health.Transitions
	logged0 := len(d.proc.Output())
	var ids0 map[netip.Addr]uint32
	if dp == config.DatapathXDP {
		ids0 = backendIDs(t, daemonMaps(t, l, testRing))
	}

	began := time.Now()
	for range cycles {
		if err := flapper.Kill(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(down)
		flapper = startEcho(t, l, be3)
		time.Sleep(up)
	}
	flapped := time.Since(began)
	waitFor(t, "every backend up after the flapping", 10*time.Second, allUp)
	time.Sleep(time.Second)

	// The clients of the stable backends never noticed.
	moved := 0
	for _, st := range f.state() {
		if st.first == be3.Name {
			continue
		}
		if st.breaks > 0 || st.backend != st.first || len(st.errs) > 0 {
			moved++
			t.Errorf("client %s of %s: %d breaks, now on %s, errors %v", st.src, st.first, st.breaks, st.backend, st.errs)
		}
	}
	b3 := backendOf(t, service(t, api, vip), be3)
	t.Logf("%s flapped %d times in %v: %d health transitions; %d clients of the stable backends, %d broke or moved; clients now %v",
		be3.Name, cycles, flapped.Round(time.Millisecond), b3.Health.Transitions-transitions0, stable, moved, byBackend(f.state()))
	// Down 1 s and up 1 s: fall x interval (0.6 s) and rise x interval
	// (0.4 s) see each; a slow machine may blur one or two at the ends.
	if n := b3.Health.Transitions - transitions0; n < 2*cycles-4 {
		t.Errorf("%s made %d health transitions in %d cycles, want about %d: the checks missed deaths or returns", be3.Name, n, cycles, 2*cycles)
	}
	if !strings.Contains(d.proc.Output()[logged0:], "after flapping") {
		t.Errorf("the daemon never logged the state %s settled in after flapping", be3.Name)
	}

	// Nothing left behind.
	if fds := openFDs(t, pid); fds > fds0+8 {
		t.Errorf("the daemon holds %d descriptors after the flapping, %d before", fds, fds0)
	}
	if got := localRoutes(t, l); !slices.Equal(got, routes0) {
		t.Errorf("the VIPs' local routes are %v after the flapping, %v before", got, routes0)
	}
	var st control.Status
	d.cliJSON(&st, "status")
	for _, s := range st.Services {
		if len(s.Backends) != 3 {
			t.Errorf("service %s has %d backends after the flapping, want 3", s.Name, len(s.Backends))
		}
	}
	if dp == config.DatapathXDP {
		m := daemonMaps(t, l, testRing)
		if ids := backendIDs(t, m); !maps.Equal(ids, ids0) {
			t.Errorf("the XDP program's backend table holds %v after the flapping, %v before", ids, ids0)
		}
		for _, s := range st.Services {
			checkRingHoldsBackends(t, m, s, "after the flapping")
		}
	}

	// A bounded log: without damping, each cycle logs 8 lines (two
	// transitions of two targets, IPv4 and IPv6, each by the health
	// checks and by the control plane).
	out := d.proc.Output()[logged0:]
	lines := regexp.MustCompile(`(?m)^time=\S+ level=(INFO|WARN|ERROR) `).FindAllString(out, -1)
	flapping := strings.Count(out, "flapping: its transitions are logged now and then")
	t.Logf("%d log lines at info and above during the flapping (%d saying it flaps); without damping %d", len(lines), flapping, 8*cycles)
	if len(lines) > 80 || flapping == 0 {
		t.Errorf("the daemon logged %d lines at info and above in %d cycles, %d of them saying the backend flaps: want at most 80, some saying so", len(lines), cycles, flapping)
	}
}
