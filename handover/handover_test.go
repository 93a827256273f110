package handover

import (
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/userspace"
)

// fakeGiver hands over a State whose descriptors are the ends of pipes,
// and records what the conversation made it do.
type fakeGiver struct {
	t     *testing.T
	fds   []int
	mu    sync.Mutex
	calls []string
}

func newFakeGiver(t *testing.T, conns int) *fakeGiver {
	g := &fakeGiver{t: t}
	for range conns {
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		g.fds = append(g.fds, p[0], p[1])
	}
	t.Cleanup(func() {
		for _, fd := range g.fds {
			unix.Close(fd)
		}
	})
	return g
}

func (g *fakeGiver) note(s string) {
	g.mu.Lock()
	g.calls = append(g.calls, s)
	g.mu.Unlock()
}

func (g *fakeGiver) said() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return strings.Join(g.calls, ",")
}

func (g *fakeGiver) Freeze() (*Package, error) {
	g.note("freeze")
	st := &userspace.State{}
	for i := 0; i < len(g.fds); i += 2 {
		st.Conns = append(st.Conns, userspace.HandedConn{
			Client:   netip.MustParseAddrPort("192.0.2.1:40000"),
			VIP:      netip.MustParseAddrPort("203.0.113.10:80"),
			ClientFD: g.fds[i], BackendFD: g.fds[i+1],
			Dirs: [2]userspace.HandedDir{{PipeR: -1, PipeW: -1}, {PipeR: -1, PipeW: -1}},
		})
	}
	return &Package{Version: "giver", Proxy: st, Lock: -1}, nil
}

func (g *fakeGiver) Thaw()    { g.note("thaw") }
func (g *fakeGiver) Release() { g.note("release") }

func serveFake(t *testing.T, g Giver) (path string, done chan error) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "tether.sock.handover")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	done = make(chan error, 1)
	go func() { done <- Serve(ln, g, "giver", slog.New(slog.NewTextHandler(io.Discard, nil))) }()
	t.Cleanup(func() { ln.Close() })
	return path, done
}

func sameFile(t *testing.T, a, b int) bool {
	t.Helper()
	var sa, sb unix.Stat_t
	if err := unix.Fstat(a, &sa); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fstat(b, &sb); err != nil {
		t.Fatal(err)
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino
}

// TestHandover passes 300 connections' descriptors (600, more than one
// packet holds) and the state, then commits: every descriptor arrives as
// the same open file, in its place, and the giver releases once.
func TestHandover(t *testing.T) {
	g := newFakeGiver(t, 300)
	path, done := serveFake(t, g)
	tk, err := Take(path, "taker")
	if err != nil {
		t.Fatal(err)
	}
	if tk.Version != "giver" || len(tk.Package.Proxy.Conns) != 300 {
		t.Fatalf("took version %q with %d connections", tk.Version, len(tk.Package.Proxy.Conns))
	}
	for i, c := range tk.Package.Proxy.Conns {
		if c.ClientFD == g.fds[2*i] || !sameFile(t, c.ClientFD, g.fds[2*i]) || !sameFile(t, c.BackendFD, g.fds[2*i+1]) {
			t.Fatalf("connection %d: descriptors %d, %d are not the giver's %d, %d passed", i, c.ClientFD, c.BackendFD, g.fds[2*i], g.fds[2*i+1])
		}
		unix.Close(c.ClientFD)
		unix.Close(c.BackendFD)
	}
	if s := g.said(); s != "freeze" {
		t.Fatalf("before the commit the giver did %q, want freeze alone", s)
	}
	if err := tk.Commit(path); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve after a handover: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after the handover")
	}
	if s := g.said(); s != "freeze,release" {
		t.Errorf("the giver did %q, want freeze,release", s)
	}
}

// TestHandoverFails: a taker that aborts, one that goes away after it
// received everything, and one of another protocol version leave the
// giver serving (thawed, or never frozen), and the next taker succeeds.
func TestHandoverFails(t *testing.T) {
	g := newFakeGiver(t, 3)
	path, done := serveFake(t, g)
	closeAll := func(tk *Taken) {
		for _, c := range tk.Package.Proxy.Conns {
			unix.Close(c.ClientFD)
			unix.Close(c.BackendFD)
		}
	}
	tk, err := Take(path, "taker")
	if err != nil {
		t.Fatal(err)
	}
	closeAll(tk)
	tk.Abort("configuration refused")
	waitSaid(t, g, "freeze,thaw")

	tk, err = Take(path, "taker")
	if err != nil {
		t.Fatal(err)
	}
	closeAll(tk)
	tk.c.Close() // the taker died
	waitSaid(t, g, "freeze,thaw,freeze,thaw")

	// Another protocol version, spoken by hand.
	c, err := net.Dial("unixpacket", path)
	if err != nil {
		t.Fatal(err)
	}
	hi, _ := json.Marshal(hello{Protocol: Protocol + 1, Version: "future"})
	if err := write(c.(*net.UnixConn), kHello, hi, nil); err != nil {
		t.Fatal(err)
	}
	kind, body, _, err := read(c.(*net.UnixConn))
	c.Close()
	if err != nil || kind != kRefused || !strings.Contains(string(body), "protocol 1") || !strings.Contains(string(body), "tether future") {
		t.Fatalf("a taker of protocol %d got %q %q (%v), want a refusal naming both versions", Protocol+1, kind, body, err)
	}
	if s := g.said(); s != "freeze,thaw,freeze,thaw" {
		t.Errorf("a refused taker made the giver do %q", s)
	}
	select {
	case err := <-done:
		t.Fatalf("Serve returned (%v) after failed handovers", err)
	default:
	}

	tk, err = Take(path, "taker")
	if err != nil {
		t.Fatal(err)
	}
	closeAll(tk)
	if err := tk.Commit(path); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if s := g.said(); s != "freeze,thaw,freeze,thaw,freeze,release" {
		t.Errorf("the giver did %q", s)
	}
}

// TestTakeNoGiver: no daemon at the path is said so.
func TestTakeNoGiver(t *testing.T) {
	_, err := Take(filepath.Join(t.TempDir(), "none.handover"), "taker")
	if err == nil || !strings.Contains(err.Error(), "no tether daemon hands over there") {
		t.Fatalf("Take with no giver: %v", err)
	}
}

func waitSaid(t *testing.T, g *fakeGiver, want string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for g.said() != want {
		if time.Now().After(deadline) {
			t.Fatalf("the giver did %q, want %q", g.said(), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
