package test

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tetherlb/tether/internal/lab"
)

// unitCaps reads the CapabilityBoundingSet of packaging/tether.service, as
// setpriv spells it ("-all,+bpf,...").
func unitCaps(t *testing.T, unit string) string {
	t.Helper()
	m := regexp.MustCompile(`(?m)^CapabilityBoundingSet=(.*)$`).FindStringSubmatch(unit)
	if m == nil {
		t.Fatal("the unit has no CapabilityBoundingSet")
	}
	set := "-all"
	for _, c := range strings.Fields(m[1]) {
		set += ",+" + strings.ToLower(strings.TrimPrefix(c, "CAP_"))
	}
	return set
}

// TestSystemdUnit checks packaging/tether.service with systemd-analyze
// verify, and runs the daemon with each datapath under the unit's
// capability bounding set (setpriv) and with NOTIFY_SOCKET set, as
// Type=notify runs it (not the rest of what systemd would set up: this
// machine's systemd is not running). The daemon serves WebSocket clients through
// the VIP, tells READY=1 once it serves, RELOADING=1 then READY=1 around a
// SIGHUP reload, and STOPPING=1 when SIGTERM stops it, exiting 0.
func TestSystemdUnit(t *testing.T) {
	data, err := os.ReadFile("../packaging/tether.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := string(data)
	dir := t.TempDir()
	path := filepath.Join(dir, "tether.service")
	if err := os.WriteFile(path, []byte(strings.ReplaceAll(unit, "/usr/bin/tether", tetherBin)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("systemd-analyze", "verify", path).CombinedOutput()
	if err != nil || strings.Contains(string(out), "tether.service") {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
	caps := unitCaps(t, unit)
	for _, dp := range []string{"xdp", "splice"} {
		t.Run(dp, func(t *testing.T) { testUnitDaemon(t, dp, caps) })
	}
}

func testUnitDaemon(t *testing.T, dp, caps string) {
	l := lab.NewT(t, lab.Options{Backends: 2, Clients: 4})
	for _, be := range l.Backends {
		serveEcho(t, l, be)
	}
	dir := t.TempDir()
	notifyPath := filepath.Join(dir, "notify")
	ns, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	said := make(chan string, 16)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := ns.Read(buf)
			if err != nil {
				close(said)
				return
			}
			said <- string(buf[:n])
		}
	}()
	expect := func(state string) {
		t.Helper()
		select {
		case s, ok := <-said:
			if !ok || !strings.HasPrefix(s, state) {
				t.Fatalf("the daemon told the service manager %q, want %s first", s, state)
			}
			t.Logf("told: %q", s)
		case <-time.After(15 * time.Second):
			t.Fatalf("the daemon did not tell %s", state)
		}
	}

	cfg := filepath.Join(dir, "tether.yaml")
	if err := os.WriteFile(cfg, []byte(withDatapath(chatConfig(l, l.Backends), dp)), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := l.Balancer.Start("env", "NOTIFY_SOCKET="+notifyPath, "setpriv", "--bounding-set", caps, "--inh-caps", "-all",
		tetherBin, "run", "--config", cfg, "--socket", filepath.Join(dir, "tether.sock"), "--pin-dir", labPinDir(l), "--clean")
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		p.Stop()
		if t.Failed() {
			t.Logf("tether output:\n%s", p.Output())
		}
	}()
	expect("READY=1")
	status, err := os.ReadFile("/proc/" + strconv.Itoa(p.Cmd.Process.Pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	bnd := regexp.MustCompile(`(?m)^CapBnd:\s*(\S+)$`).FindStringSubmatch(string(status))
	t.Logf("the daemon runs with the bounding set %s (%s)", bnd[1], caps)
	if bnd[1] == "000001ffffffffff" || bnd[1] == "000001fffeffffff" {
		t.Errorf("the daemon's bounding set is %s: setpriv did not bound it", bnd[1])
	}
	conns := dialAll(t, l, l.ClientAddrs4, l.VIP4, 2)
	echoAll(t, conns, "under the unit's capabilities")

	if err := p.Cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	expect("RELOADING=1\nMONOTONIC_USEC=")
	expect("READY=1\nSTATUS=reloaded")
	echoAll(t, conns, "after the reload")
	closeAll(conns) // while the daemon still forwards their goodbyes
	if err := p.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	expect("STOPPING=1")
	select {
	case <-p.Done():
	case <-time.After(15 * time.Second):
		t.Fatal("the daemon did not exit after SIGTERM")
	}
	if err := p.Err(); err != nil {
		t.Errorf("the daemon exited with %v", err)
	}
}
