package userspace

import (
	"fmt"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tetherlb/tether/datapath"
)

// traceQueue is how many events a trace holds for its reader; past it
// they are counted lost.
const traceQueue = 4096

// spliceTrace is the trace that runs on a proxy (Trace).
type spliceTrace struct {
	p      *Proxy
	f      datapath.TraceFilter
	ch     chan datapath.TraceEvent
	lost   atomic.Uint64
	done   chan struct{}
	once   sync.Once
	mu     sync.Mutex
	dlTime time.Time
}

// Trace implements datapath.Tracer: each connection the proxy takes is
// reported once its backend is chosen ("proxy", by affinity or ring) or
// it is refused ("reset", with the reason), and each it resets later
// (on_down: reset, a paced drain).
func (p *Proxy) Trace(f datapath.TraceFilter) (datapath.TraceReader, error) {
	t := &spliceTrace{p: p, f: f, ch: make(chan datapath.TraceEvent, traceQueue), done: make(chan struct{})}
	if !p.trace.CompareAndSwap(nil, t) {
		return nil, datapath.ErrTraceBusy
	}
	return t, nil
}

// traced reports a decision about the connection of client to vip, if a
// trace runs and takes it.
func (p *Proxy) traced(svc uint32, client, vip netip.AddrPort, backend uint32, verdict, reason, by string) {
	t := p.trace.Load()
	if t == nil || (t.f.VIP.IsValid() && t.f.Service != svc) || (t.f.Client.IsValid() && t.f.Client != client.Addr().Unmap()) {
		return
	}
	ev := datapath.TraceEvent{Time: time.Now(), Src: client, Dst: vip, Proto: 6, Service: svc, Backend: backend,
		Verdict: verdict, Reason: reason, By: by}
	select {
	case t.ch <- ev:
	default:
		t.lost.Add(1)
	}
}

// byOf names what chose a connection's backend.
func byOf(affinityHit bool) string {
	if affinityHit {
		return "affinity"
	}
	return "ring"
}

func (t *spliceTrace) Read() (datapath.TraceEvent, error) {
	t.mu.Lock()
	dl := t.dlTime
	t.mu.Unlock()
	var expired <-chan time.Time
	if !dl.IsZero() {
		tm := time.NewTimer(time.Until(dl))
		defer tm.Stop()
		expired = tm.C
	}
	select {
	case ev := <-t.ch:
		return ev, nil
	case <-t.done:
		return datapath.TraceEvent{}, fmt.Errorf("trace: %w", os.ErrClosed)
	case <-expired:
		return datapath.TraceEvent{}, os.ErrDeadlineExceeded
	}
}

func (t *spliceTrace) SetDeadline(d time.Time) {
	t.mu.Lock()
	t.dlTime = d
	t.mu.Unlock()
}

func (t *spliceTrace) Lost() uint64 { return t.lost.Load() }

func (t *spliceTrace) Close() error {
	t.once.Do(func() {
		t.p.trace.CompareAndSwap(t, nil)
		close(t.done)
	})
	return nil
}

var _ datapath.Tracer = (*Proxy)(nil)
