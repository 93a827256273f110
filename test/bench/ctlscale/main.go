// Command ctlscale measures what tether's control plane costs with many
// services: the real `tether run` with the XDP datapath on a lab's
// balancer, serving N services (VIP:PORT pairs) of B backends each, and
// for each N:
//
//   - the time from the start to "ready", and the daemon's resident memory
//     then (VmRSS), and the same for a restart that adopts the pinned state
//     the first daemon left;
//   - a reload of the unchanged file, and of the file with one backend's
//     weight changed, through the API (median of several);
//   - adding one service through the API;
//   - the resident memory after a tenth of 100 reloads and after all of
//     them, unchanged and changed in turn: what the reloads leave behind
//     shows as the second reading above the first.
//
// The backends are addresses with static neighbour entries on the
// balancer (the XDP datapath resolves them like any backend); no traffic
// flows. It needs root. `make bench` runs it.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/test/bench/benchrun"
)

var (
	fail = benchrun.Fail
	logf = benchrun.Logf
)

type result struct {
	services, backends int
	ready              time.Duration
	phases             string // where the start went, from the daemon's log
	restart            time.Duration
	restartPhases      string
	rssReady           float64 // MiB
	reload, reloadOne  time.Duration
	add, addNext       time.Duration // the first vip add after a reload, the next ones
	rssTenth, rssAfter float64       // after a tenth of the reloads, and all
	reloads            int
}

func main() {
	benchrun.Name = "ctlscale"
	defer benchrun.Cleanup()
	sizes := flag.String("services", "1000,10000", "the service counts to measure, a comma-separated `list`")
	backends := flag.Int("backends", 10, "backends per service (at most 65535 over all services: fewer where the count needs it)")
	reloads := flag.Int("reloads", 100, "reloads before the second memory reading")
	out := flag.String("out", "", "also write the report to this `file`")
	flag.Parse()
	benchrun.FailOnSignal()

	tmp, err := os.MkdirTemp("", "ctlscale-*")
	if err != nil {
		fail(err.Error())
	}
	benchrun.AtExit(func() { os.RemoveAll(tmp) })
	bin := filepath.Join(tmp, "tether")
	logf("building tether")
	if b, err := exec.Command("go", "build", "-o", bin, "./cmd/tether").CombinedOutput(); err != nil {
		fail(fmt.Sprintf("go build: %v\n%s", err, b))
	}
	l, err := lab.New(lab.Options{Backends: 1, Clients: 1})
	if err != nil {
		fail("lab: " + err.Error())
	}
	benchrun.AtExit(func() { l.Close() })

	var results []result
	for _, f := range strings.Split(*sizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n > 65535 {
			fail(fmt.Sprintf("bad -services %q", *sizes))
		}
		b := min(*backends, 65535/n)
		results = append(results, measure(l, bin, tmp, n, b, *reloads))
	}
	report(benchrun.Report(*out), results)
}

// vips is the number of VIPs and the size of the backend address pool,
// 198.51.100.20 to .253 (clear of the lab's hosts), with static neighbour
// entries.
const vips = 234

// backendAddr is the i-th address of the pool (i mod vips).
func backendAddr(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{198, 51, 100, byte(20 + i%vips)})
}

// configFor is n services of b backends: vips VIPs x as many ports as
// needed. No two services have the same backends (services of one port
// take theirs from the pool at different offsets), so no two rings are
// alike: each is built on its own.
func configFor(n, b int) *config.Config {
	cfg := config.Default()
	cfg.Interfaces = []string{"eth0"}
	cfg.Datapath = config.DatapathXDP
	cfg.Tables.Connections, cfg.Tables.Affinity = 65536, 65536
	cfg.Tables.MaxServices = uint32(n + 8) // room for the services vip add adds
	cfg.Tables.MaxBackends = uint32((n + 1) * b)
	for k := range n {
		s := config.DefaultService()
		s.VIP = netip.AddrFrom4([4]byte{203, 0, 113, byte(1 + k%vips)})
		s.Port = uint16(10000 + k/vips)
		s.Name = fmt.Sprintf("svc-%d", k)
		s.Health = config.DefaultHealthFor(config.ProtocolUDP) // none: no probe traffic
		for i := range b {
			s.Backends = append(s.Backends, config.Backend{Address: backendAddr(k%vips + 23*i), Port: s.Port, Weight: 1, State: config.StateActive})
		}
		cfg.Services = append(cfg.Services, s)
	}
	return cfg
}

func measure(l *lab.Lab, bin, tmp string, n, b, reloads int) result {
	r := result{services: n, backends: b, reloads: reloads}
	logf("%d services of %d backends", n, b)
	for i := range vips {
		if err := l.Balancer.Run("ip", "neigh", "replace", backendAddr(i).String(), "lladdr",
			fmt.Sprintf("02:00:00:00:01:%02x", i), "dev", "eth0", "nud", "permanent"); err != nil {
			fail(err.Error())
		}
	}
	dir := filepath.Join(tmp, fmt.Sprint(n))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		fail(err.Error())
	}
	cfg := configFor(n, b)
	data, err := cfg.Marshal()
	if err != nil {
		fail(err.Error())
	}
	path := filepath.Join(dir, "tether.yaml")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		fail(err.Error())
	}
	sock := filepath.Join(dir, "tether.sock")
	pinDir := filepath.Join(l.BPFFS, "tether")
	// detach removes the state a daemon left pinned (a --clean start would
	// also remove it when it stops, and there would be nothing to adopt).
	detach := func() {
		if err := l.Balancer.Run(bin, "detach", "--pin-dir", pinDir); err != nil {
			fail("detach: " + err.Error())
		}
	}
	detach()
	// run starts tether and waits until its API answers.
	run := func() (*lab.Proc, time.Duration) {
		args := []string{"run", "--config", path, "--socket", sock, "--pin-dir", pinDir, "--log-level", "info"}
		start := time.Now()
		p, err := l.Balancer.Start(bin, args...)
		if err != nil {
			fail(err.Error())
		}
		benchrun.AtExit(func() { p.Stop() })
		cl := control.NewClientTimeout(sock, 5*time.Minute)
		for {
			if _, err := cl.Status(context.Background()); err == nil {
				break
			}
			select {
			case <-p.Done():
				fail(fmt.Sprintf("tether exited: %v\n%s", p.Err(), p.Output()))
			case <-time.After(10 * time.Millisecond):
			}
			if time.Since(start) > 10*time.Minute {
				fail(fmt.Sprintf("not ready after 10 minutes:\n%s", tail(p.Output(), 40)))
			}
		}
		return p, time.Since(start)
	}
	p, ready := run()
	r.ready = ready
	r.phases = phases(p.Output())
	pid := p.Cmd.Process.Pid
	r.rssReady = rss(pid)
	logf("  ready in %v (%s), %.0f MiB", r.ready.Round(time.Millisecond), r.phases, r.rssReady)
	cl := control.NewClientTimeout(sock, 5*time.Minute)
	ctx := context.Background()

	timeReload := func() time.Duration {
		t0 := time.Now()
		if _, err := cl.Reload(ctx); err != nil {
			fail("reload: " + err.Error())
		}
		return time.Since(t0)
	}
	weight := func(w uint32) {
		cfg.Services[n/2].Backends[0].Weight = w
		data, err := cfg.Marshal()
		if err != nil {
			fail(err.Error())
		}
		if err := os.WriteFile(path, data, 0o600); err != nil {
			fail(err.Error())
		}
	}
	var same, one []time.Duration
	for i := range 9 {
		same = append(same, timeReload())
		weight(uint32(2 + i%2))
		one = append(one, timeReload())
	}
	r.reload, r.reloadOne = median(same), median(one)
	logf("  reload unchanged %v, one weight changed %v", r.reload, r.reloadOne)

	// The first change through the API after a reload writes every
	// service; the next ones copy those they leave as they were.
	add := func(vip string) time.Duration {
		t0 := time.Now()
		if _, err := cl.AddService(ctx, control.ServiceSpec{VIP: vip}); err != nil {
			fail("add a service: " + err.Error())
		}
		return time.Since(t0)
	}
	r.add = add("203.0.113.251:80")
	var next []time.Duration
	for i := range 5 {
		next = append(next, add(fmt.Sprintf("203.0.113.252:%d", 80+i)))
	}
	r.addNext = median(next)
	for _, vip := range []string{"203.0.113.251:80", "203.0.113.252:80", "203.0.113.252:81", "203.0.113.252:82", "203.0.113.252:83", "203.0.113.252:84"} {
		if _, err := cl.RemoveService(ctx, vip); err != nil {
			fail(err.Error())
		}
	}
	// The API rewrote the file; reload from what cfg says again.
	weight(1)
	for i := range reloads {
		if i%2 == 1 {
			weight(uint32(1 + i%3))
		}
		timeReload()
		if i+1 == reloads/10 {
			r.rssTenth = rss(pid)
		}
	}
	r.rssAfter = rss(pid)
	logf("  vip add %v, then %v; after %d reloads %.0f MiB, after %d %.0f MiB", r.add, r.addNext, reloads/10, r.rssTenth, reloads, r.rssAfter)
	// A restart: the new daemon adopts the state the stopped one left
	// pinned, with the rings' signatures.
	if err := p.Stop(); err != nil {
		logf("stop: %v", err)
	}
	p, r.restart = run()
	r.restartPhases = phases(p.Output())
	logf("  restart: ready in %v (%s)", r.restart.Round(time.Millisecond), r.restartPhases)
	if err := p.Stop(); err != nil {
		logf("stop: %v", err)
	}
	detach()
	return r
}

// phases reads from the daemon's log how long it took to read the
// configuration, open the datapath and apply the configuration.
func phases(log string) string {
	var out []string
	for _, step := range []struct{ msg, name string }{
		{"configuration read", "read"}, {"datapath open", "open"}, {"configuration applied", "apply"},
	} {
		for _, line := range strings.Split(log, "\n") {
			if !strings.Contains(line, "msg=\""+step.msg+"\"") {
				continue
			}
			if _, took, ok := strings.Cut(line, " took="); ok {
				out = append(out, step.name+" "+strings.Fields(took)[0])
			}
		}
	}
	return strings.Join(out, ", ")
}

// tail is the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

func median(ds []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ds...)
	for i := range s {
		for j := i + 1; j < len(s); j++ {
			if s[j] < s[i] {
				s[i], s[j] = s[j], s[i]
			}
		}
	}
	return s[len(s)/2]
}

// rss is the resident memory of pid in MiB.
func rss(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		fail(err.Error())
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseFloat(f[1], 64)
			return kb / 1024
		}
	}
	fail("no VmRSS")
	return 0
}

func report(w interface {
	Write([]byte) (int, error)
}, rs []result) {
	fmt.Fprintf(w, "# tether's control plane with many services (%s, %s)\n\n", time.Now().UTC().Format("2006-01-02"), benchrun.Kernel())
	fmt.Fprintln(w, "`tether run` with the XDP datapath on a lab's balancer (`go run ./test/bench/ctlscale`), services of B backends with static neighbour entries, health checks off, no traffic. Reloads go through the API; a changed reload changes one backend's weight in the file. Resident memory is VmRSS.")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| services x backends | start to ready (read the file, open the datapath, apply) | restart to ready, adopting the pinned state | resident at ready | reload, unchanged | reload, one service changed | vip add, first after a reload / next | resident after 1/10 of the reloads, after all |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|---:|---:|")
	for _, r := range rs {
		fmt.Fprintf(w, "| %d x %d | %.2f s (%s) | %.2f s (%s) | %.0f MiB | %s | %s | %s / %s | %.0f MiB, %.0f MiB (%d reloads) |\n", r.services, r.backends,
			r.ready.Seconds(), r.phases, r.restart.Seconds(), r.restartPhases, r.rssReady, r.reload.Round(100*time.Microsecond), r.reloadOne.Round(100*time.Microsecond),
			r.add.Round(100*time.Microsecond), r.addNext.Round(100*time.Microsecond), r.rssTenth, r.rssAfter, r.reloads)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Targets (issue 14): resident at most 100 MB at 1,000 services, no growth across 100 reloads, an unchanged reload under 50 ms, one changed service in time proportional to it, start under 5 s at 10,000 services.")
}
