package test

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tetherlb/tether/internal/lab"
)

// takeover starts bin with the daemon's arguments and --takeover, waits
// until it is ready and the daemon it replaces has exited cleanly after
// handing over, and returns how long the connections waited: from the old
// daemon's freeze to the new one serving them.
func (d *daemon) takeover(bin string) time.Duration {
	d.t.Helper()
	old := d.proc
	p, err := d.host.Start(bin, append(slices.Clone(d.args), "--takeover")...)
	if err != nil {
		d.t.Fatal(err)
	}
	d.proc = p
	d.t.Cleanup(func() {
		if d.t.Failed() {
			d.t.Logf("output of a tether replaced by a takeover:\n%s", old.Output())
		}
	})
	d.waitLog("msg=ready", 15*time.Second)
	select {
	case <-old.Done():
	case <-time.After(10 * time.Second):
		d.t.Fatalf("the daemon that handed over is still running:\n%s", old.Output())
	}
	if err := old.Err(); err != nil || !strings.Contains(old.Output(), `msg="handed over to the new daemon"`) {
		d.t.Fatalf("the old daemon did not hand over and exit cleanly (%v):\n%s", err, old.Output())
	}
	// The last freeze: an earlier one may have failed.
	const froze = `msg="handing over to a new daemon"`
	out := old.Output()
	last := out[strings.LastIndex(out[:strings.LastIndex(out, froze)], "\n")+1:]
	return logTime(d.t, p.Output(), `msg="serving the connections handed over`).Sub(logTime(d.t, last, froze))
}

// TestSpliceTakeover holds 200 WebSocket connections from 100 client
// addresses (and 20 over IPv6) through a splice daemon, each echoing two
// numbered messages every 100 ms, while the daemon is replaced with
// `tether run --takeover` twice and then by a newly built binary: no
// connection closes, no echo is lost or out of order, every client keeps
// its backend and returning clients find it again, the API answers from
// the new daemon. A takeover whose configuration the new daemon cannot
// serve fails, and the old daemon serves on.
func TestSpliceTakeover(t *testing.T) {
	const (
		clients  = 100
		interval = 100 * time.Millisecond
		settle   = time.Second
	)
	v2 := buildVersion(t, "takeover-test-v2")
	l := lab.NewT(t, lab.Options{Backends: 3, Clients: clients})
	for _, be := range l.Backends {
		serveEcho(t, l, be)
	}
	cfg := withDatapath(chatConfig(l, l.Backends), "splice")
	d := startDaemon(t, l, cfg)

	conns := dialAll(t, l, l.ClientAddrs4, l.VIP4, connsPerC)
	owner := backendsByClient(t, conns)
	conns6 := dialAll(t, l, l.ClientAddrs6[:20], l.VIP6, 1)
	all := append(append([]*conn{}, conns...), conns6...)
	echoers, stopEchoes := echoAlong(all, interval)
	defer stopEchoes()
	began := time.Now()

	// A new daemon that cannot serve what it took gives it back: one that
	// refuses at once (datapath xdp), and one that fails while it applies
	// its configuration (a udp service, which the splice proxy refuses),
	// after it has claimed the listening sockets and the VIPs' routes.
	time.Sleep(settle)
	routes := localRoutes(t, l)
	// The udp service sorts after chat, which changes: chat is applied
	// (claiming everything) before dns fails.
	udp := strings.Replace(strings.Replace(cfg, "datapath: splice\n", "datapath: auto\n", 1), "affinity_timeout: 1h", "affinity_timeout: 2h", 1) +
		fmt.Sprintf("  - name: dns\n    vip: %s\n    port: 9053\n    protocol: udp\n    backends:\n      - address: %s\n", l.VIP4, l.Backends[0].Addr4)
	for _, bad := range []struct{ name, cfg, says string }{
		{"xdp", chatConfig(l, l.Backends), "datapath is xdp"},
		{"udp", udp, "udp services need the xdp datapath"},
	} {
		path := filepath.Join(t.TempDir(), bad.name+".yaml")
		if err := os.WriteFile(path, []byte(bad.cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		args := slices.Clone(d.args)
		args[slices.Index(args, "--config")+1] = path
		failed := strings.Count(d.proc.Output(), "handover to a new daemon failed; serving on")
		out, code := runIn(t, l.Balancer, append(args, "--takeover")...)
		if code != 1 || !strings.Contains(out, bad.says) {
			t.Errorf("a takeover with the %s configuration: exit %d, want 1 saying %q:\n%s", bad.name, code, bad.says, out)
		}
		waitFor(t, "the old daemon to serve on", 5*time.Second, func() bool {
			return strings.Count(d.proc.Output(), "handover to a new daemon failed; serving on") > failed
		})
		if got := localRoutes(t, l); !slices.Equal(got, routes) {
			t.Errorf("after the failed %s takeover the VIPs' local routes are %v, were %v", bad.name, got, routes)
		}
	}

	for i, bin := range []string{tetherBin, tetherBin, v2} {
		time.Sleep(settle)
		stall := d.takeover(bin)
		out := d.proc.Output()
		if bin == v2 && !strings.Contains(out, "version=takeover-test-v2") {
			t.Errorf("takeover %d: the new daemon does not report version takeover-test-v2", i+1)
		}
		if !strings.Contains(out, "connections="+strconv.Itoa(len(all))) {
			t.Errorf("takeover %d: the new daemon did not take %d connections:\n%s", i+1, len(all), firstLines(out, 20))
		}
		t.Logf("takeover %d (%s): connections waited %v", i+1, filepath.Base(bin), stall.Round(time.Millisecond))
	}
	time.Sleep(settle)
	stopEchoes()
	elapsed := time.Since(began)

	checkEchoes(t, echoers, elapsed, interval)
	if t.Failed() {
		t.FailNow()
	}

	// The new daemon answers the API, counts the connections it took and
	// sends returning clients to their backends.
	if _, _, code := d.cli("status"); code != 0 {
		t.Errorf("tether status exits %d after the takeovers", code)
	}
	flows, _, code := d.cli("flows")
	if code != 0 || strings.Count(flows, "\n") < len(all) {
		t.Errorf("tether flows after the takeovers (exit %d) lists fewer than %d connections:\n%s", code, len(all), firstLines(flows, 10))
	}
	again := dialAll(t, l, l.ClientAddrs4, l.VIP4, 1)
	for _, c := range again {
		if owner[c.src] != c.backend {
			t.Errorf("client %s reconnected to %s, it was on %s", c.src, c.backend, owner[c.src])
		}
	}
	echoAll(t, all, "after the takeovers")
}
