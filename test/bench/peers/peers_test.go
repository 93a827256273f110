package main

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tetherlb/tether/internal/lab"
)

func TestPeersRegistered(t *testing.T) {
	seen := map[string]bool{}
	last := -1
	for _, p := range peers {
		if p.Order < last {
			t.Errorf("%s out of order", p.Name)
		}
		last = p.Order
		seen[p.Name] = true
	}
	for _, want := range []string{"direct (no balancer)", "tether (XDP)", "tether (splice)", "trivial XDP forwarder (lab limit)",
		"HAProxy (balance source)", "nginx (stream, hash $remote_addr)", "nftables DNAT (IPVS-NAT stand-in)",
		"nftables fwd (IPVS-DR stand-in)", "kernel IP forwarding"} {
		if !seen[want] {
			t.Errorf("peer %q is not registered", want)
		}
	}
}

func TestHelpers(t *testing.T) {
	if got := hashMap([]string{"a", "b"}); got != "map { 0 : a, 1 : b }" {
		t.Errorf("hashMap = %q", got)
	}
	var ds []time.Duration
	for i := 1; i <= 100; i++ {
		ds = append(ds, time.Duration(i))
	}
	if p := percentile(ds, 0.5); p != 50 {
		t.Errorf("p50 = %d", p)
	}
	if p := percentile(ds, 0.99); p != 99 {
		t.Errorf("p99 = %d", p)
	}
	if percentile(nil, 0.5) != 0 {
		t.Error("percentile of nothing")
	}
	a := newAffinity()
	c1, c2 := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("192.0.2.11")
	a.add(c1, "be1")
	a.add(c1, "be1")
	a.add(c2, "be2")
	if clients, moved := a.split(); clients != 2 || moved != 0 {
		t.Errorf("split = %d, %d", clients, moved)
	}
	a.add(c2, "be3")
	if _, moved := a.split(); moved != 1 {
		t.Errorf("moved = %d, want 1", moved)
	}
	if s := a.spread(); s["be1"] != 2 || s["be2"] != 1 || s["be3"] != 1 {
		t.Errorf("spread = %v", s)
	}
	if !containsAny("tether (XDP)", []string{" xdp "}) || containsAny("nginx", []string{"", "tether"}) {
		t.Error("containsAny")
	}
}

// TestBenchRuns runs the command end to end with small loads on the
// peers whose programs this machine has (tether's own and the references
// need nothing but iperf3), and checks the report: every row measured,
// frames delivered, no failed connection, no client on two backends.
func TestBenchRuns(t *testing.T) {
	lab.RequirePrivileged(t)
	if testing.Short() {
		t.Skip("runs a lab for about a minute")
	}
	if _, err := exec.LookPath("iperf3"); err != nil {
		t.Skip("iperf3 is not installed (make bench installs it)")
	}
	selected := []string{"direct", "trivial", "stateless", "tether"}
	for tool, peer := range map[string]string{"nft": "nftables", "haproxy": "haproxy", "nginx": "nginx"} {
		if _, err := exec.LookPath(tool); err == nil {
			selected = append(selected, peer)
		}
	}
	if _, err := os.Stat(nginxModule); err != nil {
		selected = slicesDelete(selected, "nginx")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "peers")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	report, png := filepath.Join(dir, "RESULTS.md"), filepath.Join(dir, "results.png")
	wrk := ""
	if _, err := exec.LookPath("wrk"); err == nil && slices.Contains(selected, "nginx") {
		wrk = "4"
	}
	cmd := exec.Command(bin, "-runs", "1", "-clients", "20", "-ws-conns", "100", "-ws-workers", "4", "-heavy-workers", "8", "-heavy-held", "60", "-hold", "50",
		"-hold-secs", "2", "-iperf-secs", "1", "-packets", "20000", "-stat-packets", "5000", "-cost-repeat", "10000",
		"-mib", "16", "-conns", "200", "-workers", "4", "-wrk", wrk, "-wrk-secs", "1", "-syscall-conns", "100",
		"-peers", strings.Join(selected, ","), "-out", report, "-chart", png)
	cmd.Dir = "../../.." // the repository, for go build ./cmd/tether
	done := make(chan struct{})
	var out []byte
	var err error
	go func() { out, err = cmd.CombinedOutput(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Minute):
		cmd.Process.Signal(os.Interrupt) // it cleans up on SIGINT
		<-done
		t.Fatalf("the bench ran over 5 minutes:\n%s", out)
	}
	if err != nil {
		t.Fatalf("bench: %v\n%s", err, out)
	}
	b, err := os.ReadFile(report)
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	if st, err := os.Stat(png); err != nil || st.Size() < 1000 {
		t.Errorf("chart: %v", err)
	}
	// Each selected peer has its rows, with figures.
	rows := regexp.MustCompile(`(?m)^\| ([^|]+) \| (\d+) \| (\d+) \| ([^|]+) \|$`) // affinity table
	affinity := 0
	_, section, _ := strings.Cut(text, "## 5. Affinity")
	section, _, _ = strings.Cut(section, "\n## ")
	for _, m := range rows.FindAllStringSubmatch(section, -1) {
		affinity++
		if m[3] != "0" {
			t.Errorf("%s: %s client addresses reached more than one backend", m[1], m[3])
		}
		if n, _ := strconv.Atoi(m[2]); n != 20 {
			t.Errorf("%s: %d client addresses seen, want 20", m[1], n)
		}
	}
	if affinity < 4 {
		t.Errorf("affinity rows for %d peers, want at least 4:\n%s", affinity, text)
	}
	// The packet-rate rows: frames reached the backends, and no more than
	// were sent (more would be double counting). How many of a burst get
	// through is the host's business, not the program's: the generator
	// outruns the veth rings of the lab, the more so on a slow or busy
	// host, and the trivial forwarder, which sends everything to be1,
	// overflows its ring first (46% delivered on one CI host, 98% here).
	// The report prints the share; the tests assert only that frames pass.
	for _, name := range []string{"tether (XDP)", "trivial XDP forwarder (lab limit)", "stateless XDP forwarder (3 backends)"} {
		re := regexp.MustCompile(`(?m)^\| ` + regexp.QuoteMeta(name) + ` \| (\d+\.\d+) \(.*\| (\d+)% \|`)
		m := re.FindStringSubmatch(text)
		if m == nil {
			t.Errorf("no packet rate for %s", name)
			continue
		}
		if mpps, _ := strconv.ParseFloat(m[1], 64); mpps <= 0 {
			t.Errorf("%s: %s Mpps", name, m[1])
		}
		if pct, _ := strconv.Atoi(m[2]); pct < 1 || pct > 100 {
			t.Errorf("%s: %d%% of the frames reached the backends, want 1..100%%", name, pct)
		}
	}
	// The targets that compare peers by their roles are there.
	targets := []string{"| WebSocket connection rate within 5% of direct (XDP) |", "| wire packet rate at least 95% of the trivial XDP program's |",
		"| WebSocket connection rate (8 at a time, 60 held) at least 0.97x the trivial forwarder's (XDP) |"}
	if !strings.Contains(text, "- **The trivial forwarder loads one backend; tether and the stateless forwarder spread") {
		t.Error("no reading against the stateless forwarder")
	}
	if slices.Contains(selected, "haproxy") {
		targets = append(targets, "| splice connection rate at least HAProxy (balance source)'s |")
	}
	for _, want := range targets {
		if !strings.Contains(text, want) {
			t.Errorf("no target row %q", want)
		}
	}
	// The proxy rows: tether's splice datapath and the direct reference
	// have raw TCP figures, and the splice datapath its system calls.
	for _, name := range []string{"direct (no balancer)", "tether (splice)"} {
		re := regexp.MustCompile(`(?m)^\| ` + regexp.QuoteMeta(name) + ` \| (\d+) \(\d+–\d+\) \| (\d+) \(\d+–\d+\) \| (\d+) \(\d+–\d+\) \|$`)
		m := re.FindStringSubmatch(text)
		if m == nil {
			t.Errorf("no raw TCP row for %s", name)
			continue
		}
		for _, v := range m[1:] {
			if n, _ := strconv.Atoi(v); n <= 0 {
				t.Errorf("%s: raw TCP figures %v", name, m[1:])
			}
		}
	}
	_, calls, _ := strings.Cut(text, "System calls of the balancer's processes")
	calls, _, _ = strings.Cut(calls, "\n## ")
	if !regexp.MustCompile(`(?m)^\| tether \(splice\) \| [1-9]\d*\.\d \|`).MatchString(calls) {
		t.Error("no system call count for tether (splice)")
	}
	failed := regexp.MustCompile(`\| (\d+) / (\d+) \|`)
	for _, m := range failed.FindAllStringSubmatch(text, -1) {
		if m[1] != "0" || m[2] != "0" {
			t.Errorf("failed connections / echoes: %s", m[0])
		}
	}
	t.Logf("peers %v:\n%s", selected, text)
}

func slicesDelete(s []string, v string) []string {
	var out []string
	for _, x := range s {
		if x != v {
			out = append(out, x)
		}
	}
	return out
}
