package userspace

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"net"
	"net/netip"
	"reflect"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/datapath"
)

// Loopback tests: backends on 127.0.0.1, the VIP on another loopback
// address. They need no privilege.

var loopVIP = netip.MustParseAddr("127.0.0.10")

func loopVIPPort(t testing.TB) netip.AddrPort {
	return netip.AddrPortFrom(loopVIP, freePort(t, loopVIP.String()))
}

const (
	integrityConns = 64
	integrityBytes = 16 << 20
	chunk          = 1 << 20
)

// pattern is random data the streams of TestIntegrity are cut from, so
// that every stream differs from the others.
var pattern = sync.OnceValue(func() []byte {
	b := make([]byte, chunk+64<<10)
	rand.Read(b)
	return b
})

// writeStream writes stream id (its 8-byte id, then integrityBytes cut
// from the pattern) to w and returns its SHA-256.
func writeStream(w io.Writer, id uint64) ([]byte, error) {
	h := sha256.New()
	mw := io.MultiWriter(w, h)
	var hdr [8]byte
	binary.BigEndian.PutUint64(hdr[:], id)
	if _, err := mw.Write(hdr[:]); err != nil {
		return nil, err
	}
	pat := pattern()
	for j := range uint64(integrityBytes / chunk) {
		off := (id*4099 + j*257) % (64 << 10)
		if _, err := mw.Write(pat[off : off+chunk]); err != nil {
			return nil, err
		}
	}
	return h.Sum(nil), nil
}

// readStream reads r to EOF and returns its SHA-256 and length.
func readStream(r io.Reader, h hash.Hash) ([]byte, int64, error) {
	n, err := io.Copy(h, r)
	return h.Sum(nil), n, err
}

// streamResult is what one end of a stream sent and received: their
// SHA-256.
type streamResult struct{ sent, got []byte }

// streamLog is what the backends of streams saw.
type streamLog struct {
	mu    sync.Mutex
	atBE  map[uint64]streamResult // by stream id
	fails []error
}

// handler is a backend of streams: it reads a stream's id, then sends its
// own stream while it reads the client's to the end (through wrap, if
// set), notes both, and returns, which closes the connection.
func (l *streamLog) handler(wrap func(io.Reader) io.Reader) func(net.Conn) {
	return func(c net.Conn) {
		c.SetDeadline(time.Now().Add(60 * time.Second))
		var hdr [8]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			l.note(0, streamResult{}, err)
			return
		}
		id := binary.BigEndian.Uint64(hdr[:])
		var (
			sent []byte
			werr error
			done = make(chan struct{})
		)
		go func() {
			defer close(done)
			// No half-close: the client reads to the end of the
			// connection, which comes once this handler has read all of
			// the client's stream and returned.
			sent, werr = writeStream(c, id|1<<63)
		}()
		h := sha256.New()
		h.Write(hdr[:])
		var r io.Reader = c
		if wrap != nil {
			r = wrap(c)
		}
		got, _, rerr := readStream(r, h)
		<-done
		l.note(id, streamResult{sent: sent, got: got}, errors.Join(werr, rerr))
	}
}

func (l *streamLog) note(id uint64, r streamResult, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err != nil {
		l.fails = append(l.fails, fmt.Errorf("backend, stream %d: %w", id, err))
		return
	}
	if l.atBE == nil {
		l.atBE = make(map[uint64]streamResult)
	}
	l.atBE[id] = r
}

// runStream sends stream i to vip and half-closes while it reads the
// backend's stream to the end (through wrap, if set).
func runStream(vip netip.AddrPort, i int, wrap func(io.Reader) io.Reader) (streamResult, error) {
	c, err := net.DialTimeout("tcp", vip.String(), 5*time.Second)
	if err != nil {
		return streamResult{}, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	var (
		sent []byte
		werr error
		done = make(chan struct{})
	)
	go func() {
		defer close(done)
		if sent, werr = writeStream(c, uint64(i)); werr == nil {
			werr = c.(*net.TCPConn).CloseWrite()
		}
	}()
	var r io.Reader = c
	if wrap != nil {
		r = wrap(c)
	}
	got, n, rerr := readStream(r, sha256.New())
	<-done
	if err := errors.Join(werr, rerr); err != nil {
		return streamResult{}, err
	}
	if n != 8+integrityBytes {
		return streamResult{}, fmt.Errorf("got %d bytes from the backend, want %d", n, 8+integrityBytes)
	}
	return streamResult{sent: sent, got: got}, nil
}

// check compares what the clients of the streams sent and got with what
// their backends got and sent; the backends have finished.
func (l *streamLog) check(t *testing.T, atClient []streamResult, errs []error) {
	t.Helper()
	if err := errors.Join(append(errs, l.fails...)...); err != nil {
		t.Fatal(err)
	}
	for i, c := range atClient {
		b, ok := l.atBE[uint64(i)]
		switch {
		case !ok:
			t.Errorf("stream %d: no backend saw it", i)
		case !bytes.Equal(c.sent, b.got):
			t.Errorf("stream %d client → backend: sent sha256 %x, received %x", i, c.sent, b.got)
		case !bytes.Equal(b.sent, c.got):
			t.Errorf("stream %d backend → client: sent sha256 %x, received %x", i, b.sent, c.got)
		}
	}
}

// TestIntegrity moves 16 MiB each way through each of 64 concurrent
// connections: the client sends its stream and half-closes while the
// backend sends its own, the backend closes after it has read the client's
// to the end. Every byte must arrive, in order (SHA-256 at both ends), and
// afterwards no goroutine or file descriptor may be left.
func TestIntegrity(t *testing.T) {
	check := leakCheck(t)
	var log streamLog
	handle := log.handler(nil)
	be1 := listenServe(t, "127.0.0.1:0", handle)
	be2 := listenServe(t, "127.0.0.1:0", handle)
	p := newProxy(t, Options{})
	vip := loopVIPPort(t)
	if err := p.UpsertService(loopService(t, 1, vip, false, be1, be2)); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	atClient := make([]streamResult, integrityConns)
	errs := make([]error, integrityConns)
	var wg sync.WaitGroup
	for i := range integrityConns {
		wg.Go(func() { atClient[i], errs[i] = runStream(vip, i, nil) })
	}
	wg.Wait()
	elapsed := time.Since(start)
	be1.close() // waits for the handlers: their results are all in
	be2.close()
	log.check(t, atClient, errs)
	total := float64(2 * integrityConns * (8 + integrityBytes))
	cn, _ := p.Counters()
	var moved, calls uint64
	for _, b := range cn.Backends {
		moved += b.Bytes
		calls += b.Packets
	}
	t.Logf("%d connections, %d MiB each way each: %.0f MiB through the proxy in %v (%.0f MiB/s); %d splice reads, %.0f KiB each",
		integrityConns, integrityBytes>>20, total/(1<<20), elapsed.Round(time.Millisecond), total/(1<<20)/elapsed.Seconds(), calls, float64(moved)/float64(calls)/1024)
	if moved != uint64(total) {
		t.Errorf("backend counters say %d bytes moved, want %.0f", moved, total)
	}
	if !eventually(5*time.Second, func() bool { f, _ := p.Flows(); return len(f) == 0 }) {
		t.Error("flows left after every connection ended")
	}
	p.Close()
	check()
}

// TestHalfCloseFromBackend checks the other direction of a half-close: the
// backend sends and shuts down its side first, and the client, having read
// to EOF, can still send.
func TestHalfCloseFromBackend(t *testing.T) {
	got := make(chan string, 1)
	be := listenServe(t, "127.0.0.1:0", func(c net.Conn) {
		io.WriteString(c, "greeting")
		c.(*net.TCPConn).CloseWrite()
		b, _ := io.ReadAll(c)
		got <- string(b)
	})
	p := newProxy(t, Options{})
	vip := loopVIPPort(t)
	if err := p.UpsertService(loopService(t, 1, vip, false, be)); err != nil {
		t.Fatal(err)
	}
	c := dial(t, netip.Addr{}, vip)
	c.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "greeting" {
		t.Fatalf("client read %q, %v; want the greeting, then EOF", b, err)
	}
	if f, _ := p.Flows(); len(f) != 1 || !f[0].Closing {
		t.Fatalf("flows after the backend's FIN: %+v, want one, closing", f)
	}
	io.WriteString(c, "reply after EOF")
	c.CloseWrite()
	select {
	case s := <-got:
		if s != "reply after EOF" {
			t.Fatalf("backend got %q", s)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("backend never saw the client's bytes and FIN")
	}
	if !eventually(5*time.Second, func() bool { f, _ := p.Flows(); return len(f) == 0 }) {
		t.Fatal("connection still in the table after both sides ended")
	}
}

// TestIdleTimeout checks that a service's idle timeout closes a quiet
// connection, and only a quiet one.
func TestIdleTimeout(t *testing.T) {
	be := listenServe(t, "127.0.0.1:0", namedEcho("be1"))
	p := newProxy(t, Options{})
	vip := loopVIPPort(t)
	const idle = 300 * time.Millisecond
	s := loopService(t, 1, vip, false, be)
	s.IdleTimeout = idle
	if err := p.UpsertService(s); err != nil {
		t.Fatal(err)
	}
	start := time.Now() // before the quiet connection's last bytes
	quiet := dialEcho(t, netip.Addr{}, vip)
	busy := dialEcho(t, netip.Addr{}, vip)
	closed := make(chan time.Duration, 1)
	go func() {
		quiet.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := quiet.r.ReadByte()
		if err == io.EOF {
			closed <- time.Since(start)
		}
		close(closed)
	}()
	for time.Since(start) < 4*idle {
		if err := busy.echo("ping"); err != nil {
			t.Fatalf("busy connection broke at %v: %v", time.Since(start), err)
		}
		time.Sleep(idle / 4)
	}
	d, ok := <-closed
	if !ok {
		t.Fatal("quiet connection was not closed (EOF) by the idle timeout")
	}
	if d < idle || d > 3*idle {
		t.Fatalf("quiet connection closed after %v, want about %v", d, idle)
	}
	t.Logf("quiet connection closed after %v (idle timeout %v); busy one alive after %v", d.Round(time.Millisecond), idle, time.Since(start).Round(time.Millisecond))
}

// TestNoIdleTimeoutByDefault checks that a connection with nothing to say
// stays up: the default has no idle timeout.
func TestNoIdleTimeoutByDefault(t *testing.T) {
	_, vip := proxyOneEcho(t, Options{})
	c := dialEcho(t, netip.Addr{}, vip)
	time.Sleep(1500 * time.Millisecond)
	if err := c.echo("still there"); err != nil {
		t.Fatalf("quiet connection after 1.5s: %v", err)
	}
}

// TestDrainDownThroughConnections checks, through real connections, what
// backend states do to established connections and to new ones.
func TestDrainDownThroughConnections(t *testing.T) {
	be1 := listenServe(t, "127.0.0.1:0", namedEcho("be1"))
	be2 := listenServe(t, "127.0.0.1:0", namedEcho("be2"))
	p := newProxy(t, Options{})
	vip := loopVIPPort(t)
	s := loopService(t, 1, vip, false, be1, be2)
	if err := p.UpsertService(s); err != nil {
		t.Fatal(err)
	}
	var on1, on2 []*echoClient
	for len(on1) < 3 || len(on2) < 3 {
		if len(on1)+len(on2) > 100 {
			t.Fatalf("100 connections did not reach both backends")
		}
		c := dialEcho(t, netip.Addr{}, vip)
		if c.backend == "be1" {
			on1 = append(on1, c)
		} else {
			on2 = append(on2, c)
		}
	}
	all := func(desc string, cs []*echoClient) {
		t.Helper()
		for _, c := range cs {
			if err := c.echo(desc); err != nil {
				t.Fatalf("%s: connection to %s: %v", desc, c.backend, err)
			}
		}
	}
	newOnly := func(desc, want string) {
		t.Helper()
		for range 20 {
			c := dialEcho(t, netip.Addr{}, vip)
			if c.backend != want {
				t.Fatalf("%s: new connection went to %s", desc, c.backend)
			}
			c.Close()
		}
	}
	for _, tc := range []struct {
		desc  string
		state datapath.State
		reset bool
	}{
		{"be1 draining", datapath.Draining, false},
		{"be1 down", datapath.Down, false},
	} {
		s = setState(t, s, 1, tc.state)
		if err := p.UpsertService(s); err != nil {
			t.Fatal(err)
		}
		all(tc.desc, on1)
		all(tc.desc, on2)
		newOnly(tc.desc, "be2")
	}
	// on_down: reset. be1's connections are reset at once, be2's flow on.
	s.OnDownReset = true
	if err := p.UpsertService(s); err != nil {
		t.Fatal(err)
	}
	for _, c := range on1 {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := c.r.ReadByte()
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("connection to down backend with OnDownReset: read %v, want a reset", err)
		}
	}
	all("be1 down, reset", on2)
	if cn, _ := p.Counters(); cn.Reasons[ReasonBackendDown] != uint64(len(on1)) {
		t.Fatalf("%s = %d, want %d", ReasonBackendDown, cn.Reasons[ReasonBackendDown], len(on1))
	}
	// Back up: the ring has both again.
	s = setState(t, s, 1, datapath.Active)
	if err := p.UpsertService(s); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for range 40 {
		c := dialEcho(t, netip.Addr{}, vip)
		seen[c.backend] = true
		c.Close()
	}
	if !seen["be1"] || !seen["be2"] {
		t.Fatalf("after be1 came back 40 connections went to %v", seen)
	}
}

// TestCountersAndFlows checks the flow listing and that byte counters move
// while connections are open, not only when they end.
func TestCountersAndFlows(t *testing.T) {
	be1 := listenServe(t, "127.0.0.1:0", namedEcho("be1"))
	be2 := listenServe(t, "127.0.0.1:0", namedEcho("be2"))
	p := newProxy(t, Options{})
	vip := loopVIPPort(t)
	if err := p.UpsertService(loopService(t, 7, vip, true, be1, be2)); err != nil {
		t.Fatal(err)
	}
	ids := map[string]uint32{"be1": 1, "be2": 2}
	var cs []*echoClient
	for i := range 6 {
		cs = append(cs, dialEcho(t, netip.AddrFrom4([4]byte{127, 0, 1, byte(1 + i%3)}), vip))
	}
	flows, err := p.Flows()
	if err != nil || len(flows) != len(cs) {
		t.Fatalf("Flows = %d flows, %v; want %d", len(flows), err, len(cs))
	}
	byClient := map[netip.AddrPort]datapath.Flow{}
	for _, f := range flows {
		byClient[f.Client] = f
	}
	for _, c := range cs {
		local := c.LocalAddr().(*net.TCPAddr).AddrPort()
		f, ok := byClient[local]
		if !ok || f.VIP != vip || f.Proto != 6 || f.Service != 7 || f.Backend != ids[c.backend] || f.Closing {
			t.Fatalf("flow of %s (on %s): %+v", local, c.backend, f)
		}
	}
	// Three clients, two connections each: the second is an affinity hit.
	cn, _ := p.Counters()
	if sc := cn.Services[7]; sc.NewConns != 6 || sc.AffinityHits != 3 || sc.AffinityMisses != 3 {
		t.Fatalf("service counters %+v, want 6 new, 3 hits, 3 misses", sc)
	}
	// Counters move as soon as the bytes have been passed on, so a reader
	// may be a hair ahead of them: wait for them to settle.
	id := ids[cs[0].backend]
	bytesNow := func() uint64 { c, _ := p.Counters(); return c.Backends[id].Bytes }
	names := cn.Backends[id].NewConns * 4 // each connection's "beN\n"
	if !eventually(5*time.Second, func() bool { return bytesNow() == names }) {
		t.Fatalf("backend %d counted %d bytes, want %d (its name to each client)", id, bytesNow(), names)
	}
	if err := cs[0].echo("some bytes"); err != nil {
		t.Fatal(err)
	}
	if !eventually(5*time.Second, func() bool { return bytesNow() == names+22 }) {
		t.Fatalf("backend %d counted %d bytes after an echo of 11 bytes each way, want %d", id, bytesNow(), names+22)
	}
	cn, _ = p.Counters()
	if cn.Backends[id].Packets < 3 {
		t.Fatalf("backend %d counted %d splice reads, want at least 3", id, cn.Backends[id].Packets)
	}
	var newConns uint64
	for _, b := range cn.Backends {
		newConns += b.NewConns
	}
	if newConns != 6 {
		t.Fatalf("backends counted %d new connections, want 6", newConns)
	}
	cs[0].CloseWrite()
	ok := eventually(5*time.Second, func() bool {
		fl, _ := p.Flows()
		for _, f := range fl {
			if f.Client == cs[0].LocalAddr().(*net.TCPAddr).AddrPort() {
				return f.Closing
			}
		}
		return true
	})
	if !ok {
		t.Fatal("flow of a half-closed connection not marked closing")
	}
}

// TestDeleteServiceKeepsConnections checks that deleting a service stops
// new connections and lets established ones flow until they end.
func TestDeleteServiceKeepsConnections(t *testing.T) {
	be := listenServe(t, "127.0.0.1:0", namedEcho("be1"))
	p := newProxy(t, Options{})
	vip := loopVIPPort(t)
	s := loopService(t, 1, vip, true, be)
	if err := p.UpsertService(s); err != nil {
		t.Fatal(err)
	}
	c := dialEcho(t, netip.Addr{}, vip)
	if err := p.DeleteService(s); err != nil {
		t.Fatal(err)
	}
	if err := c.echo("after delete"); err != nil {
		t.Fatalf("established connection after DeleteService: %v", err)
	}
	if _, err := net.DialTimeout("tcp", vip.String(), time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("new connection to a deleted service: %v, want refused", err)
	}
	if n := p.affinity.len(); n != 0 {
		t.Fatalf("%d affinity entries left for the deleted service", n)
	}
	// Added again on the same address: served again.
	if err := p.UpsertService(s); err != nil {
		t.Fatal(err)
	}
	dialEcho(t, netip.Addr{}, vip)
}

// TestUpsertMovesListener checks a service whose port changes.
func TestUpsertMovesListener(t *testing.T) {
	be := listenServe(t, "127.0.0.1:0", namedEcho("be1"))
	p := newProxy(t, Options{})
	vip := loopVIPPort(t)
	s := loopService(t, 1, vip, false, be)
	if err := p.UpsertService(s); err != nil {
		t.Fatal(err)
	}
	c := dialEcho(t, netip.Addr{}, vip)
	vip2 := loopVIPPort(t)
	s.Port = vip2.Port()
	if err := p.UpsertService(s); err != nil {
		t.Fatal(err)
	}
	dialEcho(t, netip.Addr{}, vip2)
	if _, err := net.DialTimeout("tcp", vip.String(), time.Second); err == nil {
		t.Fatal("old address still accepts")
	}
	if err := c.echo("old connection"); err != nil {
		t.Fatal(err)
	}
	// A port taken by someone else: refused, and the service stays as it was.
	taken, err := net.Listen("tcp", loopVIP.String()+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	s3 := s
	s3.Port = uint16(taken.Addr().(*net.TCPAddr).Port)
	if err := p.UpsertService(s3); err == nil {
		t.Fatal("upsert onto a taken port succeeded")
	}
	dialEcho(t, netip.Addr{}, vip2)
}

// TestSecondProxyRefused checks that the listening sockets of the loops,
// which share their port with SO_REUSEPORT, do not share it with another
// process's: a second proxy on the same VIP and port fails as a single
// listening socket would, and the first keeps all its clients.
func TestSecondProxyRefused(t *testing.T) {
	be := listenServe(t, "127.0.0.1:0", namedEcho("be1"))
	vip := loopVIPPort(t)
	s := loopService(t, 1, vip, false, be)
	p1 := newProxy(t, Options{Loops: 3})
	if err := p1.UpsertService(s); err != nil {
		t.Fatal(err)
	}
	p2 := newProxy(t, Options{Loops: 3})
	err := p2.UpsertService(s)
	if !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("second proxy on %s: got %v, want EADDRINUSE", vip, err)
	}
	for range 20 {
		dialEcho(t, netip.Addr{}, vip)
	}
	c, err := p1.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if n := c.Services[1].NewConns; n != 20 {
		t.Fatalf("first proxy served %d of 20 connections", n)
	}
}

// TestNoBackendAndDialFailure checks that a client the proxy cannot serve
// is reset at once, and counted.
func TestNoBackendAndDialFailure(t *testing.T) {
	p := newProxy(t, Options{DialTimeout: time.Second})
	vip := loopVIPPort(t)
	s := datapath.Service{ID: 1, Name: "empty", VIP: vip.Addr(), Port: vip.Port(), Proto: 6, Ring: make([]uint32, ringSize)}
	if err := p.UpsertService(s); err != nil {
		t.Fatal(err)
	}
	expectReset := func(desc string) {
		t.Helper()
		if err := resetOnArrival(vip); !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("%s: %v, want a reset", desc, err)
		}
	}
	expectReset("no backend")
	// A backend where nothing listens.
	dead := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), freePort(t, "127.0.0.1"))
	s.Backends = []datapath.Backend{{ID: 1, Addr: dead.Addr(), Port: dead.Port(), Weight: 1, State: datapath.Active}}
	s = rebuild(t, s)
	if err := p.UpsertService(s); err != nil {
		t.Fatal(err)
	}
	expectReset("backend refuses")
	cn, _ := p.Counters()
	if cn.Reasons[ReasonNoBackend] != 1 || cn.Reasons[ReasonDialFailed] != 1 {
		t.Fatalf("reasons %v", cn.Reasons)
	}
}

// resetOnArrival connects to vip and reads: the error of the connect, or
// of the read. On loopback a reset can beat connect(2)'s return.
func resetOnArrival(vip netip.AddrPort) error {
	c, err := net.DialTimeout("tcp", vip.String(), 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = c.Read(make([]byte, 1))
	return err
}

func TestMaxConns(t *testing.T) {
	p, vip := proxyOneEcho(t, Options{MaxConns: 2})
	a := dialEcho(t, netip.Addr{}, vip)
	dialEcho(t, netip.Addr{}, vip)
	if err := resetOnArrival(vip); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("third connection with MaxConns 2: %v, want a reset", err)
	}
	// The table fill says so too, with the cap as the capacity; the
	// affinity table is not in use (connection affinity).
	tables, err := p.Tables()
	want := []datapath.Table{{Name: "connections", Entries: 2, Capacity: 2}, {Name: "affinity", Capacity: DefaultAffinityEntries}}
	if err != nil || !reflect.DeepEqual(tables, want) {
		t.Errorf("Tables() = %+v, %v; want %+v", tables, err, want)
	}
	a.Close()
	if !eventually(5*time.Second, func() bool { return p.active.Load() == 1 }) {
		t.Fatal("closed connection still counted")
	}
	dialEcho(t, netip.Addr{}, vip)
	if cn, _ := p.Counters(); cn.Reasons[ReasonConnLimit] != 1 {
		t.Fatalf("reasons %v", cn.Reasons)
	}
}

// TestLoopsHoldProcs checks the Ps of the event loops, which keep theirs
// while they wait in epoll_wait: one more P for the rest of the process
// than loops in all proxies, clients served with more loops than the
// process had Ps, and every P given back when the proxies close.
func TestLoopsHoldProcs(t *testing.T) {
	base := runtime.GOMAXPROCS(0)
	be := listenServe(t, "127.0.0.1:0", namedEcho("be1"))
	start := func(id uint32, loops int) (*Proxy, netip.AddrPort) {
		p := newProxy(t, Options{Loops: loops})
		vip := loopVIPPort(t)
		if err := p.UpsertService(loopService(t, id, vip, false, be)); err != nil {
			t.Fatal(err)
		}
		return p, vip
	}
	procs := func(want int, when string) {
		t.Helper()
		if got := runtime.GOMAXPROCS(0); got != want {
			t.Fatalf("%s: GOMAXPROCS %d, want %d (%d before)", when, got, want, base)
		}
	}
	// A proxy without a service never starts its loops.
	newProxy(t, Options{}).Close()
	procs(base, "a proxy without loops closed")
	p1, vip1 := start(1, base+1)
	procs(base+2, fmt.Sprintf("%d loops", base+1))
	p2, vip2 := start(2, 1)
	procs(base+3, fmt.Sprintf("%d + 1 loops", base+1))
	for i := range 20 {
		vip := vip1
		if i%2 == 1 {
			vip = vip2
		}
		c := dialEcho(t, netip.Addr{}, vip)
		if err := c.echo(fmt.Sprint("hello ", i)); err != nil {
			t.Fatalf("echo %d through %s: %v", i, vip, err)
		}
		c.Close()
	}
	p2.Close()
	procs(base+2, "second proxy closed")
	p1.Close()
	procs(base, "both closed")
}

func TestUDPRefused(t *testing.T) {
	p := newProxy(t, Options{})
	s := datapath.Service{ID: 1, Name: "dns", VIP: loopVIP, Port: 53, Proto: 17}
	err := p.UpsertService(s)
	if !errors.Is(err, ErrUDP) {
		t.Fatalf("UpsertService(UDP) = %v, want ErrUDP", err)
	}
	t.Logf("refused: %v", err)
}

// TestFreebind checks that a service listens on a VIP that is no address of
// this host, over IPv4 and IPv6, where a plain bind fails.
func TestFreebind(t *testing.T) {
	p := newProxy(t, Options{})
	for i, vip := range []netip.Addr{netip.MustParseAddr("192.0.2.77"), netip.MustParseAddr("2001:db8:77::1")} {
		port := freePort(t, "127.0.0.1")
		network := "tcp4"
		if vip.Is6() {
			network = "tcp6"
		}
		ap := netip.AddrPortFrom(vip, port)
		if ln, err := net.Listen(network, ap.String()); err == nil {
			ln.Close()
			t.Logf("%s: a plain bind succeeds here too (net.ipv4/ipv6 ip_nonlocal_bind set?)", ap)
		} else if !errors.Is(err, syscall.EADDRNOTAVAIL) {
			t.Fatalf("plain bind of %s: %v, want EADDRNOTAVAIL", ap, err)
		}
		s := datapath.Service{ID: uint32(i + 1), Name: ap.String(), VIP: vip, Port: port, Proto: 6, Ring: make([]uint32, ringSize)}
		if err := p.UpsertService(s); err != nil {
			t.Fatalf("listen on non-local VIP %s: %v", ap, err)
		}
	}
}

// TestKeepAliveSweepsInBatches holds more connections on one loop than a
// keepalive sweep sets up at a time: every backend socket still gets its
// keepalive, in the batches that follow.
func TestKeepAliveSweepsInBatches(t *testing.T) {
	p, vip := proxyOneEcho(t, Options{Loops: 1})
	const n = 2*sweepBatch + 10
	for range n {
		c := dialEcho(t, netip.Addr{}, vip)
		t.Cleanup(func() { c.Close() })
	}
	p.mu.Lock()
	var fds []int
	for _, c := range p.conns {
		fds = append(fds, c.sides[1].fd)
	}
	p.mu.Unlock()
	if len(fds) != n {
		t.Fatalf("%d connections in the table, want %d", len(fds), n)
	}
	without := func() int {
		k := 0
		for _, fd := range fds {
			if v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE); err != nil || v != 1 {
				k++
			}
		}
		return k
	}
	if !eventually(2*keepAliveAge+2*time.Second, func() bool { return without() == 0 }) {
		t.Fatalf("%d of %d backend sockets without keepalive", without(), n)
	}
}

// TestSocketOptions checks TCP keepalive toward both ends and the socket
// buffer cap on the proxy's two sockets of a connection. The client's
// socket has its keepalive from the start; the backend's gets it once the
// connection is a second old (loop.keepAliveLater), and not before.
func TestSocketOptions(t *testing.T) {
	ka := net.KeepAliveConfig{Enable: true, Idle: 45 * time.Second, Interval: 5 * time.Second, Count: 3}
	p, vip := proxyOneEcho(t, Options{KeepAlive: ka, SocketBuffer: 96 << 10})
	start := time.Now()
	dialEcho(t, netip.Addr{}, vip)
	p.mu.Lock()
	var c *conn
	for _, c = range p.conns {
	}
	p.mu.Unlock()
	if c == nil {
		t.Fatal("no connection in the table")
	}
	get := func(fd, level, opt int) int {
		v, err := unix.GetsockoptInt(fd, level, opt)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	keepAlive := func(fd int) [4]int {
		return [...]int{
			get(fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE), get(fd, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE),
			get(fd, unix.IPPROTO_TCP, unix.TCP_KEEPINTVL), get(fd, unix.IPPROTO_TCP, unix.TCP_KEEPCNT),
		}
	}
	want := [...]int{1, 45, 5, 3}
	cfd, bfd := c.sides[0].fd, c.sides[1].fd
	if got := keepAlive(cfd); got != want {
		t.Errorf("client socket: keepalive, idle, interval, count = %v, want %v", got, want)
	}
	if on := get(bfd, unix.SOL_SOCKET, unix.SO_KEEPALIVE); on != 0 && time.Since(start) < keepAliveAge {
		t.Errorf("backend socket has keepalive %v after connecting, want it only after %v", time.Since(start), keepAliveAge)
	}
	if !eventually(2*keepAliveAge+time.Second, func() bool { return keepAlive(bfd) == want }) {
		t.Errorf("backend socket: keepalive, idle, interval, count = %v after %v, want %v", keepAlive(bfd), time.Since(start), want)
	}
	for side, fd := range map[string]int{"client": cfd, "backend": bfd} {
		// The kernel doubles what it is given.
		if rcv, snd := get(fd, unix.SOL_SOCKET, unix.SO_RCVBUF), get(fd, unix.SOL_SOCKET, unix.SO_SNDBUF); rcv != 2*96<<10 || snd != 2*96<<10 {
			t.Errorf("%s socket: SO_RCVBUF %d, SO_SNDBUF %d, want %d", side, rcv, snd, 2*96<<10)
		}
	}
}
