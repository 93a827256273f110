package loader

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/maps"
)

// Trace implements datapath.Tracer (see Objects.Trace).
func (x *XDP) Trace(f datapath.TraceFilter) (datapath.TraceReader, error) {
	return x.objs.Trace(f)
}

// Trace turns the program's tracing on for what f takes (trace_match,
// trace_on) and reads its events from trace_events until the reader is
// closed, which turns it off. Events left in the ring from before (a
// trace whose daemon died) are skipped.
func (o *Objects) Trace(f datapath.TraceFilter) (datapath.TraceReader, error) {
	if !o.tracing.CompareAndSwap(false, true) {
		return nil, datapath.ErrTraceBusy
	}
	r, err := o.startTrace(f)
	if err != nil {
		o.tracing.Store(false)
		return nil, err
	}
	return r, nil
}

func (o *Objects) startTrace(f datapath.TraceFilter) (*traceReader, error) {
	rd, err := ringbuf.NewReader(o.Maps.Raw().TraceEvents)
	if err != nil {
		return nil, fmt.Errorf("open trace_events: %w", err)
	}
	v := o.TetherVariables
	lost, err := traceLost(o)
	if err == nil {
		err = v.TraceMatch.Set(maps.TraceFilter(f))
	}
	if err == nil {
		err = v.TraceReason.Set(make([]uint32, v.TraceReason.Size()/4))
	}
	if err != nil {
		rd.Close()
		return nil, fmt.Errorf("set the trace filter: %w", err)
	}
	r := &traceReader{o: o, rd: rd, since: monoNow(), lost0: lost}
	if err := v.TraceOn.Set(uint32(1)); err != nil {
		rd.Close()
		return nil, fmt.Errorf("turn tracing on: %w", err)
	}
	return r, nil
}

// traceLost reads trace_lost.
func traceLost(o *Objects) (uint64, error) {
	var n uint64
	err := o.TetherVariables.TraceLost.Get(&n)
	return n, err
}

// monoNow is CLOCK_MONOTONIC in ns, bpf_ktime_get_ns's clock.
func monoNow() uint64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return uint64(ts.Nano())
}

type traceReader struct {
	o     *Objects
	rd    *ringbuf.Reader
	rec   ringbuf.Record
	since uint64 // events before this (CLOCK_MONOTONIC ns) are old
	lost0 uint64 // trace_lost when the trace began
	once  sync.Once
}

func (r *traceReader) Read() (datapath.TraceEvent, error) {
	for {
		if err := r.rd.ReadInto(&r.rec); err != nil {
			if errors.Is(err, ringbuf.ErrClosed) {
				err = fmt.Errorf("trace: %w", os.ErrClosed)
			}
			return datapath.TraceEvent{}, err
		}
		ev, mono, err := maps.TraceEvent(r.rec.RawSample)
		if err != nil {
			return ev, err
		}
		if mono < r.since {
			continue
		}
		now, wall := monoNow(), time.Now()
		ev.Time = wall.Add(-time.Duration(now - min(mono, now)))
		return ev, nil
	}
}

func (r *traceReader) SetDeadline(t time.Time) { r.rd.SetDeadline(t) }

func (r *traceReader) Lost() uint64 {
	n, err := traceLost(r.o)
	if err != nil || n < r.lost0 {
		return 0
	}
	return n - r.lost0
}

// Close turns tracing off and closes the reader.
func (r *traceReader) Close() error {
	var err error
	r.once.Do(func() {
		err = r.o.TetherVariables.TraceOn.Set(uint32(0))
		err = errors.Join(err, r.rd.Close())
		r.o.tracing.Store(false)
	})
	return err
}

var _ datapath.Tracer = (*XDP)(nil)
