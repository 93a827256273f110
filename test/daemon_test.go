// Package test holds tether's end-to-end tests: the real tether binary run
// in a lab of network namespaces (see internal/lab/), with real WebSocket clients
// and backends. They need root; CI sets TETHER_REQUIRE_PRIVILEGED=1 so that
// they fail instead of skipping.
package test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tetherlb/tether/bpf"
	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/maps"
)

// tetherBin is the tether binary under test, built once by TestMain.
var tetherBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "tether-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	tetherBin = filepath.Join(dir, "tether")
	build := exec.Command("go", "build", "-o", tetherBin, "github.com/tetherlb/tether/cmd/tether")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build tether:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// daemon is a `tether run` process on a lab's balancer.
type daemon struct {
	host   *lab.Host // the balancer it runs in
	t      testing.TB
	proc   *lab.Proc
	config string
	socket string // its API socket, for the CLI (see cli)
	args   []string
}

// startDaemon writes cfg to a file and runs tether on the balancer, with
// the extra arguments of run, and waits until it reports ready.
func startDaemon(t testing.TB, l *lab.Lab, cfg string, extra ...string) *daemon {
	t.Helper()
	return startDaemonOn(t, l.Balancer, labPinDir(l), cfg, extra...)
}

// startDaemonOn is startDaemon on balancer host h, pinning in pinDir.
func startDaemonOn(t testing.TB, h *lab.Host, pinDir, cfg string, extra ...string) *daemon {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "tether.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(dir, "tether.sock")
	// The lab's own bpffs, which the lab unmounts: /sys/fs/bpf is shared
	// by every lab and hidden from `ip netns exec`.
	args := []string{"run", "--config", path, "--socket", socket, "--pin-dir", pinDir, "--log-level", "debug"}
	args = append(args, extra...)
	p, err := h.Start(tetherBin, args...)
	if err != nil {
		t.Fatal(err)
	}
	d := &daemon{t: t, host: h, proc: p, config: path, socket: socket, args: args}
	t.Cleanup(func() {
		d.proc.Stop() // the last one started (see restart)
		if t.Failed() {
			t.Logf("tether output:\n%s", d.proc.Output())
		}
	})
	d.waitLog("msg=ready", 15*time.Second)
	return d
}

// waitLog waits until the daemon's output holds s (counting from the
// start), failing if it exits first or the time runs out.
func (d *daemon) waitLog(s string, timeout time.Duration) {
	d.t.Helper()
	if err := d.proc.WaitOutput(context.Background(), "tether", s, timeout); err != nil {
		d.t.Fatal(err)
	}
}

// reload rewrites the configuration and sends SIGHUP, then waits for the
// daemon to report the reload.
func (d *daemon) reload(cfg string) {
	d.t.Helper()
	if err := os.WriteFile(d.config, []byte(cfg), 0o600); err != nil {
		d.t.Fatal(err)
	}
	n := strings.Count(d.proc.Output(), "msg=reloaded")
	if err := d.proc.Cmd.Process.Signal(syscall.SIGHUP); err != nil {
		d.t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for strings.Count(d.proc.Output(), "msg=reloaded") == n {
		if strings.Contains(d.proc.Output(), "reload refused") || strings.Contains(d.proc.Output(), "reload failed") || time.Now().After(deadline) {
			d.t.Fatalf("reload did not succeed:\n%s", d.proc.Output())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// balancerXDP returns the id of the XDP program on the balancer's eth0,
// 0 if none.
func balancerXDP(t testing.TB, l *lab.Lab) uint32 {
	t.Helper()
	h, err := l.Balancer.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	link, err := h.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	if x := link.Attrs().Xdp; x != nil && x.Attached {
		return x.ProgId
	}
	return 0
}

// daemonMaps opens the maps of the XDP program attached to the balancer's
// eth0, the ones the running daemon fills.
func daemonMaps(t testing.TB, l *lab.Lab, ringSize uint32) *maps.Maps {
	t.Helper()
	id := balancerXDP(t, l)
	if id == 0 {
		t.Fatal("no XDP program on the balancer's eth0")
	}
	prog, err := ebpf.NewProgramFromID(ebpf.ProgramID(id))
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	info, err := prog.Info()
	if err != nil {
		t.Fatal(err)
	}
	ids, _ := info.MapIDs()
	byName := map[string]*ebpf.Map{}
	for _, id := range ids {
		m, err := ebpf.NewMapFromID(id)
		if err != nil {
			t.Fatal(err)
		}
		mi, err := m.Info()
		if err != nil {
			t.Fatal(err)
		}
		byName[mi.Name] = m
		t.Cleanup(func() { m.Close() })
	}
	tm := &bpf.TetherMaps{
		Affinities: byName[bpf.TetherMapAffinities],
		Backends:   byName[bpf.TetherMapBackends],
		BeStats:    byName[bpf.TetherMapBeStats],
		Conns4:     byName[bpf.TetherMapConns4],
		Conns6:     byName[bpf.TetherMapConns6],
		Reasons:    byName[bpf.TetherMapReasons],
		Rings:      byName[bpf.TetherMapRings],
		Services4:  byName[bpf.TetherMapServices4],
		Services6:  byName[bpf.TetherMapServices6],
		SvcStats:   byName[bpf.TetherMapSvcStats],
		Nat4:       byName[bpf.TetherMapNat4],
		Nat6:       byName[bpf.TetherMapNat6],
		NatSyn4:    byName[bpf.TetherMapNatSyn4],
		NatSyn6:    byName[bpf.TetherMapNatSyn6],
		SnatAddrs:  byName[bpf.TetherMapSnatAddrs],
		Tunnels:    byName[bpf.TetherMapTunnels],
		Vips:       byName[bpf.TetherMapVips],
	}
	if tm.Conns4 == nil || tm.BeStats == nil || tm.Affinities == nil || tm.Backends == nil {
		t.Fatalf("maps of the attached program: %v", byName)
	}
	return maps.New(tm, ringSize)
}
