package lab

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
)

const echoPort = 8765

// startEcho serves an EchoServer named after h on addr:echoPort in h's
// namespace, closed at the end of the test.
func startEcho(tb testing.TB, h *Host, addr netip.Addr) *EchoServer {
	tb.Helper()
	ln, err := h.Listen("tcp", netip.AddrPortFrom(addr, echoPort).String())
	if err != nil {
		tb.Fatalf("listen on %s in %s: %v", addr, h.Name, err)
	}
	s := ServeEcho(ln, h.Name)
	tb.Cleanup(func() {
		if err := s.Close(); err != nil {
			tb.Errorf("close echo %s: %v", h.Name, err)
		}
	})
	return s
}

func wsURL(a netip.Addr) string {
	return "ws://" + netip.AddrPortFrom(a, echoPort).String() + "/echo"
}

// echoOnce dials url from src on h, checks one echo and the handshake
// header both name want, and closes.
func echoOnce(ctx context.Context, h *Host, src netip.Addr, url, want string) error {
	c, err := DialWS(ctx, h, src, url)
	if err != nil {
		return err
	}
	defer c.Close()
	if got := c.Backend(); got != want {
		return fmt.Errorf("%s from %s: handshake backend %q, want %q", url, src, got, want)
	}
	if la := c.LocalAddr().(*net.TCPAddr).AddrPort().Addr().Unmap(); la != src {
		return fmt.Errorf("%s: local address %s, want %s", url, la, src)
	}
	msg := "hello from " + src.String()
	got, err := c.Echo(ctx, msg)
	if err != nil {
		return fmt.Errorf("%s from %s: %w", url, src, err)
	}
	if got != want {
		return fmt.Errorf("%s from %s: echoed by %q, want %q", url, src, got, want)
	}
	return nil
}

// runBounded runs fn(i) for i < n with at most par at a time and returns
// the errors.
func runBounded(n, par int, fn func(i int) error) []error {
	var (
		mu   sync.Mutex
		errs []error
		wg   sync.WaitGroup
		sem  = make(chan struct{}, par)
	)
	for i := range n {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if err := fn(i); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return errs
}

func TestDirectEchoFromEveryClientAddress(t *testing.T) {
	l := NewT(t, Options{Backends: 3, Clients: 150})
	if len(l.Backends) != 3 || len(l.ClientAddrs4) != 150 || len(l.ClientAddrs6) != 150 {
		t.Fatalf("got %d backends, %d/%d client addresses", len(l.Backends), len(l.ClientAddrs4), len(l.ClientAddrs6))
	}
	if got, want := l.ClientAddrs6[0], netip.MustParseAddr("2001:db8:c::a"); got != want {
		t.Errorf("first client v6 address %s, want %s", got, want)
	}
	if got, want := l.ClientAddrs4[149], netip.MustParseAddr("192.0.2.159"); got != want {
		t.Errorf("last client v4 address %s, want %s", got, want)
	}
	srv4 := make([]*EchoServer, len(l.Backends))
	srv6 := make([]*EchoServer, len(l.Backends))
	for i, be := range l.Backends {
		if want := netip.AddrFrom4([4]byte{198, 51, 100, byte(11 + i)}); be.Addr4 != want {
			t.Errorf("%s address %s, want %s", be.Name, be.Addr4, want)
		}
		srv4[i] = startEcho(t, be, be.Addr4)
		srv6[i] = startEcho(t, be, be.Addr6)
	}

	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	nb := len(l.Backends)
	const n6 = 20
	// Source k talks to backend k mod nb.
	errs := runBounded(len(l.ClientAddrs4), 16, func(k int) error {
		be := l.Backends[k%nb]
		return echoOnce(ctx, l.Client, l.ClientAddrs4[k], wsURL(be.Addr4), be.Name)
	})
	errs = append(errs, runBounded(n6, 16, func(k int) error {
		be := l.Backends[k%nb]
		return echoOnce(ctx, l.Client, l.ClientAddrs6[k], wsURL(be.Addr6), be.Name)
	})...)
	for _, err := range errs {
		t.Error(err)
	}

	check := func(s *EchoServer, be *Host, srcs []netip.Addr) {
		t.Helper()
		want := map[string]int{}
		for k, a := range srcs {
			if k%nb == slices.Index(l.Backends, be) {
				want[a.String()]++
			}
		}
		st := s.Stats()
		if !mapsEqual(st.Clients, want) {
			t.Errorf("%s saw clients %v, want %v", be.Name, st.Clients, want)
		}
		if st.Accepted != len(want) || st.Messages != len(want) {
			t.Errorf("%s: accepted %d, messages %d, want %d each", be.Name, st.Accepted, st.Messages, len(want))
		}
	}
	for i, be := range l.Backends {
		check(srv4[i], be, l.ClientAddrs4)
		check(srv6[i], be, l.ClientAddrs6[:n6])
	}

	// A plain GET answers with the name.
	c, err := l.Client.Dial(ctx, "tcp", l.ClientAddrs4[0], netip.AddrPortFrom(l.Backends[0].Addr4, echoPort).String())
	if err != nil {
		t.Fatal(err)
	}
	hc := &http.Client{Transport: &http.Transport{DialContext: func(context.Context, string, string) (net.Conn, error) { return c, nil }}}
	resp, err := hc.Get("http://" + netip.AddrPortFrom(l.Backends[0].Addr4, echoPort).String() + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	hc.CloseIdleConnections()
	if resp.StatusCode != http.StatusOK || resp.Header.Get(BackendHeader) != "be1" {
		t.Errorf("GET: status %d, %s %q", resp.StatusCode, BackendHeader, resp.Header.Get(BackendHeader))
	}
}

func mapsEqual(a, b map[string]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func TestBalancerResolvesBackends(t *testing.T) {
	l := NewT(t, Options{Backends: 2, Clients: 2})
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	for _, be := range l.Backends {
		startEcho(t, be, be.Addr4)
		startEcho(t, be, be.Addr6)
		// No static entries on the balancer: this needs ARP and ND.
		for _, a := range []netip.Addr{be.Addr4, be.Addr6} {
			src := l.Balancer.Addr4
			if a.Is6() {
				src = l.Balancer.Addr6
			}
			if err := echoOnce(ctx, l.Balancer, src, wsURL(a), be.Name); err != nil {
				t.Error(err)
			}
		}
	}
	nh, err := l.Balancer.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	neighs, err := nh.NeighList(l.Balancer.Ifindex, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range neighs {
		if n.State&netlink.NUD_PERMANENT != 0 {
			t.Errorf("balancer has a static neighbour entry %s", n.IP)
		}
	}
}

func TestAddBackend(t *testing.T) {
	l := NewT(t, Options{Backends: 1, Clients: 3})
	be, err := l.AddBackend()
	if err != nil {
		t.Fatal(err)
	}
	if be.Name != "be2" || len(l.Backends) != 2 || l.Backends[1] != be {
		t.Fatalf("AddBackend gave %s, backends %d", be.Name, len(l.Backends))
	}
	if want := netip.MustParseAddr("2001:db8:100::c"); be.Addr6 != want {
		t.Errorf("be2 address %s, want %s", be.Addr6, want)
	}
	s4, s6 := startEcho(t, be, be.Addr4), startEcho(t, be, be.Addr6)
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	for k := range l.ClientAddrs4 {
		if err := echoOnce(ctx, l.Client, l.ClientAddrs4[k], wsURL(be.Addr4), "be2"); err != nil {
			t.Error(err)
		}
		if err := echoOnce(ctx, l.Client, l.ClientAddrs6[k], wsURL(be.Addr6), "be2"); err != nil {
			t.Error(err)
		}
	}
	if a, b := s4.Stats().Accepted, s6.Stats().Accepted; a != 3 || b != 3 {
		t.Errorf("be2 accepted %d v4 and %d v6 connections, want 3 each", a, b)
	}
}

func TestCloseRemovesEverything(t *testing.T) {
	RequirePrivileged(t)
	l, err := New(Options{Backends: 2, Clients: 2})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() }) // in case of an early failure

	stopped, err := l.Client.Start("sleep", "60")
	if err != nil {
		t.Fatal(err)
	}
	left, err := l.Backends[1].Start("sleep", "60")
	if err != nil {
		t.Fatal(err)
	}
	probe, err := l.Backends[0].Start("ip", "-br", "addr", "show", "dev", "lo")
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-probe.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("ip addr did not exit in 5s")
	}
	if err := probe.Err(); err != nil || !strings.Contains(probe.Output(), "203.0.113.10/32") {
		t.Errorf("ip addr in be1: %v, output %q", err, probe.Output())
	}
	if err := stopped.Stop(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-stopped.Done():
	default:
		t.Error("Stop returned before the process was reaped")
	}
	if err := stopped.Stop(); err != nil {
		t.Errorf("second Stop: %v", err)
	}

	// The lab's bpffs: hosts' processes see it, Close releases its pins.
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Pin(filepath.Join(l.BPFFS, "probe")); err != nil {
		t.Fatal(err)
	}
	info, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	mapID, _ := info.ID()
	m.Close()
	fs, err := l.Balancer.Start("stat", "-f", "-c", "%T", l.BPFFS)
	if err != nil {
		t.Fatal(err)
	}
	<-fs.Done()
	if got := strings.TrimSpace(fs.Output()); got != "bpf_fs" {
		t.Errorf("the lab's bpffs seen from the balancer: %q, want bpf_fs", got)
	}

	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if left := labLeftovers(t, l.ID); len(left) > 0 {
		t.Errorf("Close left %v", left)
	}
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		m, err := ebpf.NewMapFromID(mapID)
		if err != nil {
			break
		}
		m.Close()
		if time.Now().After(deadline) {
			t.Error("a map pinned in the lab's bpffs outlives Close")
			break
		}
	}
	select {
	case <-left.Done():
	default:
		t.Error("Close left a started process running")
	}
	if err := l.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v: %s", err, out)
	}
	if prefix := "tether-" + l.ID + "-"; strings.Contains(string(out), prefix) {
		t.Errorf("namespaces left after Close:\n%s", out)
	}
	if _, err := l.Client.Start("true"); err == nil {
		t.Error("Start after Close succeeded")
	}
	if _, err := l.AddBackend(); err == nil {
		t.Error("AddBackend after Close succeeded")
	}
}

func TestNewFailureCleansUp(t *testing.T) {
	RequirePrivileged(t)
	addHostHook = func(role string) error {
		if role == "be2" {
			return errors.New("injected failure")
		}
		return nil
	}
	defer func() { addHostHook = nil }()
	l, err := New(Options{Backends: 3, Clients: 2})
	if err == nil {
		l.Close()
		t.Fatal("New succeeded despite the injected failure")
	}
	if !strings.Contains(err.Error(), "injected failure") {
		t.Errorf("New error %v does not carry the cause", err)
	}
	id, _, _ := strings.Cut(strings.TrimPrefix(err.Error(), "lab "), ":")
	if left := labLeftovers(t, id); len(left) > 0 {
		t.Errorf("a failed New left %v", left)
	}
}

func TestAddBackendFailureCleansUp(t *testing.T) {
	RequirePrivileged(t)
	l, err := New(Options{Backends: 1, Clients: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	// Take the name AddBackend would use for be2's namespace.
	f, err := os.Create(netnsDir + "/" + nsName(l.ID, "be2"))
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := l.AddBackend(); err == nil {
		t.Error("AddBackend succeeded over an existing namespace name")
	}
	os.Remove(netnsDir + "/" + nsName(l.ID, "be2"))
	if len(l.Backends) != 1 {
		t.Errorf("failed AddBackend left %d backends", len(l.Backends))
	}
	// The lab still works afterwards.
	be, err := l.AddBackend()
	if err != nil {
		t.Fatalf("AddBackend after a failed one: %v", err)
	}
	startEcho(t, be, be.Addr4)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := echoOnce(ctx, l.Client, l.ClientAddrs4[0], wsURL(be.Addr4), "be2"); err != nil {
		t.Error(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if left := labLeftovers(t, l.ID); len(left) > 0 {
		t.Errorf("Close after a failed AddBackend left %v", left)
	}
}

// labLeftovers lists the namespaces and bpffs directories of lab id
// present now. (Other labs, of tests running in parallel, do not count.)
func labLeftovers(tb testing.TB, id string) []string {
	tb.Helper()
	if !strings.HasPrefix(id, "t") || len(id) != 6 {
		tb.Fatalf("%q is not a lab id", id)
	}
	ents, err := os.ReadDir(netnsDir)
	if err != nil && !os.IsNotExist(err) {
		tb.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "tether-"+id+"-") {
			names = append(names, e.Name())
		}
	}
	dirs, err := filepath.Glob(filepath.Join(os.TempDir(), "tether-"+id+"-bpffs-*"))
	if err != nil {
		tb.Fatal(err)
	}
	return append(names, dirs...)
}

func TestXDPPassOnBalancerPort(t *testing.T) {
	l := NewT(t, Options{Backends: 1, Clients: 1})
	nh, err := l.Wire.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	port, err := nh.LinkByName("lb")
	if err != nil {
		t.Fatal(err)
	}
	xdp := port.Attrs().Xdp
	if xdp == nil || !xdp.Attached {
		t.Fatalf("no XDP program on wire port lb: %+v", xdp)
	}
	if xdp.AttachMode != 1 { // XDP_ATTACHED_DRV
		t.Errorf("XDP attach mode %d, want 1 (driver)", xdp.AttachMode)
	}
	for _, name := range []string{"client", "be1"} {
		p, err := nh.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		if x := p.Attrs().Xdp; x != nil && x.Attached {
			t.Errorf("wire port %s has an XDP program", name)
		}
	}
	// The balancer forwards nothing by itself.
	for _, key := range []string{"net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"} {
		var v []byte
		if err := l.Balancer.Do(func() error {
			var err error
			v, err = os.ReadFile("/proc/sys/" + key)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		if strings.TrimSpace(string(v)) != "0" {
			t.Errorf("balancer %s = %s", key, v)
		}
	}
}

// dsrProgram rewrites frames to the VIPs towards backend dst and sends them
// back out with XDP_TX: the smallest balancer.
func dsrProgram(tb testing.TB, src, dst net.HardwareAddr, vip4, vip6 netip.Addr) *ebpf.Program {
	tb.Helper()
	le := func(b []byte) int32 { return int32(binary.LittleEndian.Uint32(b)) }
	v4, v6 := vip4.As4(), vip6.As16()
	insns := asm.Instructions{
		asm.LoadMem(asm.R2, asm.R1, 0, asm.Word), // data
		asm.LoadMem(asm.R3, asm.R1, 4, asm.Word), // data_end
		asm.Mov.Reg(asm.R4, asm.R2),
		asm.Add.Imm(asm.R4, 14),
		asm.JGT.Reg(asm.R4, asm.R3, "pass"),
		asm.LoadMem(asm.R5, asm.R2, 12, asm.Half),
		asm.JEq.Imm(asm.R5, 0x0008, "v4"), // ETH_P_IP, network order
		asm.JEq.Imm(asm.R5, 0xdd86, "v6"), // ETH_P_IPV6
		asm.Ja.Label("pass"),

		asm.Mov.Reg(asm.R4, asm.R2).WithSymbol("v4"),
		asm.Add.Imm(asm.R4, 34),
		asm.JGT.Reg(asm.R4, asm.R3, "pass"),
		asm.LoadMem(asm.R5, asm.R2, 30, asm.Word),
		asm.JNE.Imm32(asm.R5, le(v4[:]), "pass"),
		asm.Ja.Label("rewrite"),

		asm.Mov.Reg(asm.R4, asm.R2).WithSymbol("v6"),
		asm.Add.Imm(asm.R4, 54),
		asm.JGT.Reg(asm.R4, asm.R3, "pass"),
	}
	for w := range 4 {
		insns = append(insns,
			asm.LoadMem(asm.R5, asm.R2, int16(38+4*w), asm.Word),
			asm.JNE.Imm32(asm.R5, le(v6[4*w:]), "pass"))
	}
	rewrite := asm.Instructions{}
	for i := range 6 {
		rewrite = append(rewrite,
			asm.StoreImm(asm.R2, int16(i), int64(dst[i]), asm.Byte),
			asm.StoreImm(asm.R2, int16(6+i), int64(src[i]), asm.Byte))
	}
	rewrite[0] = rewrite[0].WithSymbol("rewrite")
	insns = append(insns, rewrite...)
	insns = append(insns,
		asm.Mov.Imm(asm.R0, 3), // XDP_TX
		asm.Return(),
		asm.Mov.Imm(asm.R0, 2).WithSymbol("pass"), // XDP_PASS
		asm.Return(),
	)
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Name: "lab_dsr", Type: ebpf.XDP, License: "GPL", Instructions: insns})
	if err != nil {
		tb.Fatalf("load dsr program: %v", err)
	}
	tb.Cleanup(func() { prog.Close() })
	return prog
}

// TestDirectServerReturn checks the lab does what it is for: a client
// connects to the VIP, an XDP program on the balancer bounces the frames
// to a backend with XDP_TX, and the backend answers the client directly.
func TestDirectServerReturn(t *testing.T) {
	l := NewT(t, Options{Backends: 2, Clients: 8})
	be := l.Backends[1]
	startEcho(t, be, l.VIP4)
	startEcho(t, be, l.VIP6)
	prog := dsrProgram(t, l.Balancer.MAC, be.MAC, l.VIP4, l.VIP6)
	if err := l.Balancer.Do(func() error {
		lk, err := link.AttachXDP(link.XDPOptions{Program: prog, Interface: l.Balancer.Ifindex, Flags: link.XDPDriverMode})
		if err != nil {
			return err
		}
		t.Cleanup(func() { lk.Close() })
		return nil
	}); err != nil {
		t.Fatalf("attach dsr program to balancer eth0: %v", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	for k := range l.ClientAddrs4 {
		if err := echoOnce(ctx, l.Client, l.ClientAddrs4[k], wsURL(l.VIP4), be.Name); err != nil {
			t.Error(err)
		}
		if err := echoOnce(ctx, l.Client, l.ClientAddrs6[k], wsURL(l.VIP6), be.Name); err != nil {
			t.Error(err)
		}
	}
}

func TestDoKeepsCallerNamespace(t *testing.T) {
	l := NewT(t, Options{Backends: 1, Clients: 1})
	self := func() string {
		s, err := os.Readlink("/proc/thread-self/ns/net")
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	outside := self()
	var inside string
	if err := l.Client.Do(func() error {
		var err error
		inside, err = os.Readlink("/proc/thread-self/ns/net")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if inside == outside {
		t.Errorf("Do ran in the caller's namespace %s", inside)
	}
	if after := self(); after != outside {
		t.Errorf("caller moved from %s to %s", outside, after)
	}
	func() {
		defer func() {
			if r := recover(); r != "boom" {
				t.Errorf("recovered %v, want boom", r)
			}
		}()
		l.Client.Do(func() error { panic("boom") })
	}()
}

// TestCommandRunsInHost: Command and Run run a program in the host's
// namespace, and Run's error names the command, the host and its output.
func TestCommandRunsInHost(t *testing.T) {
	l := NewT(t, Options{Backends: 1, Clients: 1})
	out, err := l.Backends[0].Command("ip", "-o", "addr", "show", "dev", "eth0").Output()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), " "+l.Backends[0].Addr4.String()+"/") {
		t.Errorf("ip addr in be1 does not list %s:\n%s", l.Backends[0].Addr4, out)
	}
	if strings.Contains(string(out), " "+l.Client.Addr4.String()+"/") {
		t.Errorf("ip addr in be1 lists the client's %s:\n%s", l.Client.Addr4, out)
	}
	if err := l.Client.Run("ip", "link", "set", "lo", "up"); err != nil {
		t.Errorf("Run: %v", err)
	}
	err = l.Client.Run("ip", "link", "show", "nosuch0")
	if err == nil {
		t.Fatal("Run of a failing command returned nil")
	}
	for _, want := range []string{"ip link show nosuch0 in client", "exit status", "nosuch0"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Run error %q does not say %q", err, want)
		}
	}
}

func TestOptionsValidation(t *testing.T) {
	for _, o := range []Options{{Clients: MaxClients + 1}, {Clients: -1}, {Backends: -1}, {Backends: MaxBackends + 1}} {
		if l, err := New(o); err == nil {
			l.Close()
			t.Errorf("New(%+v) succeeded", o)
		}
	}
}
