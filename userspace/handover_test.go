package userspace

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// slowReader reads at most 8 KiB a call and pauses after each, so that
// bytes pile up in the proxy's pipes on their way to it.
type slowReader struct{ r io.Reader }

func slow(r io.Reader) io.Reader { return slowReader{r} }

func (s slowReader) Read(b []byte) (int, error) {
	n, err := s.r.Read(b[:min(len(b), 8<<10)])
	time.Sleep(time.Millisecond)
	return n, err
}

// dupState gives st descriptors of its own, as the successor's process
// would hold after SCM_RIGHTS.
func dupState(t *testing.T, st *State) {
	t.Helper()
	for _, p := range st.FDs() {
		fd, err := unix.FcntlInt(uintptr(*p), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		*p = fd
	}
}

// TestHandoverKeepsConnections hands a proxy's connections to a second
// proxy while streams run through it both ways, slowly read at both ends
// so that bytes wait in its pipes: a first handover fails (Thaw) and the
// first proxy serves on, a second succeeds (Release, then Resume) and
// the first one is closed. Every byte arrives in order (SHA-256 at both
// ends), the echo clients keep their backend, and the successor has the
// affinity entries and the counters.
func TestHandoverKeepsConnections(t *testing.T) {
	const streams = 8
	check := leakCheck(t)
	var log streamLog
	handle := log.handler(slow)
	be1 := listenServe(t, "127.0.0.1:0", handle)
	be2 := listenServe(t, "127.0.0.1:0", handle)
	echo1 := listenServe(t, "127.0.0.1:0", namedEcho("e1"))
	echo2 := listenServe(t, "127.0.0.1:0", namedEcho("e2"))
	a := newProxy(t, Options{Loops: 2})
	vip, evip := loopVIPPort(t), loopVIPPort(t)
	svc := loopService(t, 1, vip, false, be1, be2)
	esvc := loopService(t, 2, evip, true, echo1, echo2)
	if err := a.UpsertService(svc); err != nil {
		t.Fatal(err)
	}
	if err := a.UpsertService(esvc); err != nil {
		t.Fatal(err)
	}

	var echoes []*echoClient
	for i := range 16 {
		echoes = append(echoes, dialEcho(t, netip.AddrFrom4([4]byte{127, 0, 1, byte(i + 1)}), evip))
	}
	echoAll := func(when string) {
		t.Helper()
		for i, e := range echoes {
			if err := e.echo(fmt.Sprintf("%s %d", when, i)); err != nil {
				t.Fatalf("%s: echo client %d (%s): %v", when, i, e.backend, err)
			}
		}
	}
	echoAll("before")

	atClient := make([]streamResult, streams)
	errs := make([]error, streams)
	var wg sync.WaitGroup
	for i := range streams {
		wg.Go(func() { atClient[i], errs[i] = runStream(vip, i, slow) })
	}
	time.Sleep(300 * time.Millisecond)

	// A handover that fails: the first proxy goes on.
	st, err := a.Freeze()
	if err != nil {
		t.Fatal(err)
	}
	if err := a.UpsertService(svc); !errors.Is(err, ErrHandedOver) {
		t.Errorf("a change while frozen: %v, want ErrHandedOver", err)
	}
	t.Logf("first freeze: %d connections, %d listening sockets", len(st.Conns), len(st.Listeners))
	time.Sleep(100 * time.Millisecond)
	a.Thaw()
	echoAll("after a failed handover")

	time.Sleep(200 * time.Millisecond)
	st, err = a.Freeze()
	if err != nil {
		t.Fatal(err)
	}
	inPipes := 0
	for _, c := range st.Conns {
		inPipes += c.Dirs[0].Bytes + c.Dirs[1].Bytes
	}
	t.Logf("handover: %d connections (%d bytes in pipes), %d listening sockets, %d affinity entries", len(st.Conns), inPipes, len(st.Listeners), len(st.Affinity))
	if len(st.Conns) != streams+len(echoes) || len(st.Listeners) != 4 || len(st.Affinity) != len(echoes) {
		t.Fatalf("handed %d connections, %d listening sockets, %d affinity entries; want %d, 4, %d", len(st.Conns), len(st.Listeners), len(st.Affinity), streams+len(echoes), len(echoes))
	}
	if inPipes == 0 {
		t.Error("no byte was waiting in a pipe at the handover: the test does not exercise pipes")
	}
	dupState(t, st)
	b := newProxy(t, Options{Loops: 3, Inherit: st})
	adopted := b.AdoptedServices()
	if len(adopted) != 2 || adopted[0].ID != 1 || adopted[1].ID != 2 {
		t.Fatalf("adopted services %+v, want ids 1 and 2", adopted)
	}
	// The control plane upserts what its configuration changed; here the
	// stream service, while the echo service is served as adopted.
	if err := b.UpsertService(svc); err != nil {
		t.Fatal(err)
	}
	a.Release()
	if err := b.Resume(); err != nil {
		t.Fatal(err)
	}
	a.Close()
	echoAll("after the handover")
	// A service new to the successor listens on a socket of its own.
	echo3 := listenServe(t, "127.0.0.1:0", namedEcho("e3"))
	vip3 := loopVIPPort(t)
	if err := b.UpsertService(loopService(t, 3, vip3, false, echo3)); err != nil {
		t.Fatal(err)
	}
	if e := dialEcho(t, netip.Addr{}, vip3); e.backend != "e3" {
		t.Errorf("a new service after the handover reached %s", e.backend)
	} else {
		e.Close()
	}
	for i, e := range echoes {
		again := dialEcho(t, e.LocalAddr().(*net.TCPAddr).AddrPort().Addr(), evip)
		if again.backend != e.backend {
			t.Errorf("echo client %d reconnected to %s, it was on %s", i, again.backend, e.backend)
		}
		again.Close()
	}
	wg.Wait()
	be1.close()
	be2.close()
	log.check(t, atClient, errs)
	cn, _ := b.Counters()
	if got := cn.Services[2].NewConns; got != uint64(2*len(echoes)) {
		t.Errorf("the successor counts %d new connections of the echo service, want %d (handed and new)", got, 2*len(echoes))
	}
	if got := cn.Services[1].NewConns; got != streams {
		t.Errorf("the successor counts %d new connections of the stream service, want %d", got, streams)
	}
	if !eventually(5*time.Second, func() bool { f, _ := b.Flows(); return len(f) == len(echoes) }) {
		f, _ := b.Flows()
		t.Errorf("the successor has %d flows after the streams ended, want the %d echo clients", len(f), len(echoes))
	}
	for _, e := range echoes {
		e.Close()
	}
	echo1.close()
	echo2.close()
	echo3.close()
	b.Close()
	check() // the first proxy closed its copies, the second its own
}
