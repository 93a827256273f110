package userspace

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/maglev"
)

// testLog writes the proxy's log into the test's, at debug level with -v.
func testLog(t testing.TB) *slog.Logger {
	if !testing.Verbose() {
		return slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}

// newProxy returns a proxy closed when the test ends.
func newProxy(t testing.TB, opts Options) *Proxy {
	t.Helper()
	p := New(testLog(t), maglev.DefaultSeed, opts)
	t.Cleanup(func() { p.Close() })
	return p
}

// proxyOneEcho starts a proxy with opts and one service on a loopback
// VIP whose only backend is an echo server named be1.
func proxyOneEcho(t testing.TB, opts Options) (*Proxy, netip.AddrPort) {
	t.Helper()
	be := listenServe(t, "127.0.0.1:0", namedEcho("be1"))
	p := newProxy(t, opts)
	vip := loopVIPPort(t)
	if err := p.UpsertService(loopService(t, 1, vip, false, be)); err != nil {
		t.Fatal(err)
	}
	return p, vip
}

// freePort returns a TCP port free on addr right now.
func freePort(t testing.TB, addr string) uint16 {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(addr, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

// server is a test backend: handle runs for every accepted connection,
// which is closed after it returns.
type server struct {
	ln    net.Listener
	addr  netip.AddrPort
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[net.Conn]bool
}

// serve starts a server on ln; it is closed when the test ends.
func serve(t testing.TB, ln net.Listener, handle func(net.Conn)) *server {
	t.Helper()
	s := &server{ln: ln, addr: ln.Addr().(*net.TCPAddr).AddrPort(), conns: map[net.Conn]bool{}}
	s.addr = netip.AddrPortFrom(s.addr.Addr().Unmap(), s.addr.Port())
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns[c] = true
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer func() {
					s.mu.Lock()
					delete(s.conns, c)
					s.mu.Unlock()
					c.Close()
				}()
				handle(c)
			}()
		}
	}()
	t.Cleanup(s.close)
	return s
}

// close stops the server and its connections and waits for the handlers.
func (s *server) close() {
	s.ln.Close()
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// listenServe is serve on a new listener on addr ("127.0.0.1:0").
func listenServe(t testing.TB, addr string, handle func(net.Conn)) *server {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return serve(t, ln, handle)
}

// namedEcho writes name and a newline, then echoes until EOF. It copies
// through a buffer: io.Copy from a TCPConn to itself would splice, holding
// one of the runtime's pipes for as long as the connection lives.
func namedEcho(name string) func(net.Conn) {
	return func(c net.Conn) {
		if _, err := io.WriteString(c, name+"\n"); err != nil {
			return
		}
		io.CopyBuffer(struct{ io.Writer }{c}, struct{ io.Reader }{c}, make([]byte, 512))
	}
}

// service is a TCP service on vip with connection affinity (unless
// source) whose backends are the servers, IDs 1, 2... in order, all
// active.
func loopService(t testing.TB, id uint32, vip netip.AddrPort, source bool, servers ...*server) datapath.Service {
	t.Helper()
	s := datapath.Service{ID: id, Name: fmt.Sprintf("svc%d", id), VIP: vip.Addr(), Port: vip.Port(), Proto: 6, SourceAffinity: source, AffinityTimeout: time.Hour}
	for i, sv := range servers {
		s.Backends = append(s.Backends, datapath.Backend{ID: uint32(i + 1), Addr: sv.addr.Addr(), Port: sv.addr.Port(), Weight: 1, State: datapath.Active})
	}
	return rebuild(t, s)
}

// rebuild gives s the ring of its active backends.
func rebuild(t testing.TB, s datapath.Service) datapath.Service {
	t.Helper()
	var bs []maglev.Backend
	for _, b := range s.Backends {
		if b.State == datapath.Active {
			bs = append(bs, maglev.Backend{ID: b.ID, Key: netip.AddrPortFrom(b.Addr, b.Port).String(), Weight: b.Weight})
		}
	}
	r, err := maglev.Build(bs, ringSize, maglev.DefaultSeed)
	if err != nil {
		t.Fatal(err)
	}
	s.Ring = r
	return s
}

// setState returns s with backend id in state st and the ring rebuilt.
func setState(t testing.TB, s datapath.Service, id uint32, st datapath.State) datapath.Service {
	t.Helper()
	s.Backends = append([]datapath.Backend(nil), s.Backends...)
	for i := range s.Backends {
		if s.Backends[i].ID == id {
			s.Backends[i].State = st
		}
	}
	return rebuild(t, s)
}

// dial connects to addr from src (zero: any), failing the test on error.
func dial(t testing.TB, src netip.Addr, addr netip.AddrPort) *net.TCPConn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if src.IsValid() {
		d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
	}
	c, err := d.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// echoClient is a connection to a namedEcho backend through the proxy.
type echoClient struct {
	*net.TCPConn
	r       *bufio.Reader
	backend string
}

// dialEcho connects and reads the backend's name.
func dialEcho(t testing.TB, src netip.Addr, addr netip.AddrPort) *echoClient {
	t.Helper()
	c := dial(t, src, addr)
	e := &echoClient{TCPConn: c, r: bufio.NewReader(c)}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	name, err := e.r.ReadString('\n')
	if err != nil {
		t.Fatalf("read backend name through %s: %v", addr, err)
	}
	c.SetReadDeadline(time.Time{})
	e.backend = strings.TrimSuffix(name, "\n")
	return e
}

// echo sends a line and reads it back.
func (e *echoClient) echo(msg string) error {
	e.SetDeadline(time.Now().Add(5 * time.Second))
	defer e.SetDeadline(time.Time{})
	if _, err := io.WriteString(e, msg+"\n"); err != nil {
		return err
	}
	got, err := e.r.ReadString('\n')
	if err != nil {
		return err
	}
	if got != msg+"\n" {
		return fmt.Errorf("echo %q, got %q", msg, got)
	}
	return nil
}

// eventually polls cond every 10ms until it holds or d passes.
func eventually(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// openFDs counts this process's open file descriptors.
func openFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// leakCheck records the goroutines and file descriptors now, and returns
// a function that fails the test unless both are back there within 5s.
func leakCheck(t testing.TB) func() {
	t.Helper()
	// The first network use creates the poller's descriptors: do it now.
	if ln, err := net.Listen("tcp", "127.0.0.1:0"); err == nil {
		ln.Close()
	}
	g0, fd0 := runtime.NumGoroutine(), openFDs(t)
	return func() {
		t.Helper()
		var g, fd int
		ok := eventually(5*time.Second, func() bool {
			g, fd = runtime.NumGoroutine(), openFDs(t)
			return g <= g0 && fd <= fd0
		})
		if !ok {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Fatalf("leak: %d goroutines (were %d), %d file descriptors (were %d)\n%s", g, g0, fd, fd0, buf)
		}
		t.Logf("no leak: %d goroutines, %d file descriptors, as before", g, fd)
	}
}

// readProxyHeader reads a PROXY protocol v2 header as a backend would
// (HAProxy's proxy-protocol.txt, section 2.2), for PROXY commands over TCP.
func readProxyHeader(r io.Reader) (src, dst netip.AddrPort, err error) {
	var hdr [16]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return src, dst, err
	}
	if string(hdr[:12]) != proxySignature {
		return src, dst, errors.New("no PROXY v2 signature")
	}
	if hdr[12] != 0x21 {
		return src, dst, fmt.Errorf("version/command %#x, want 0x21", hdr[12])
	}
	body := make([]byte, binary.BigEndian.Uint16(hdr[14:]))
	if _, err := io.ReadFull(r, body); err != nil {
		return src, dst, err
	}
	var alen int
	switch hdr[13] {
	case 0x11:
		alen = 4
	case 0x21:
		alen = 16
	default:
		return src, dst, fmt.Errorf("family/protocol %#x", hdr[13])
	}
	if len(body) < 2*alen+4 {
		return src, dst, fmt.Errorf("address block of %d bytes", len(body))
	}
	sa, _ := netip.AddrFromSlice(body[:alen])
	da, _ := netip.AddrFromSlice(body[alen : 2*alen])
	src = netip.AddrPortFrom(sa, binary.BigEndian.Uint16(body[2*alen:]))
	dst = netip.AddrPortFrom(da, binary.BigEndian.Uint16(body[2*alen+2:]))
	return src, dst, nil
}

// withTimeout is a context for a bounded part of a test.
func withTimeout(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
