package test

import (
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

	// A new daemon that cannot serve what it took gives it back.
	time.Sleep(settle)
	bad := filepath.Join(t.TempDir(), "xdp.yaml")
	if err := os.WriteFile(bad, []byte(chatConfig(l, l.Backends)), 0o600); err != nil {
		t.Fatal(err)
	}
	args := slices.Clone(d.args)
	args[slices.Index(args, "--config")+1] = bad
	out, code := runIn(t, l.Balancer, append(args, "--takeover")...)
	if code != 1 || !strings.Contains(out, "datapath is xdp") {
		t.Errorf("a takeover with an xdp configuration: exit %d, want 1 naming the datapath:\n%s", code, out)
	}
	d.waitLog("handover to a new daemon failed; serving on", 5*time.Second)

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
