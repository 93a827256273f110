package loader

import (
	"errors"
	"fmt"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/maps"
)

// NewFlows opens the reader of sync_events: the flows the program enters
// for services with Share set.
func (x *XDP) NewFlows() (datapath.FlowReader, error) {
	rd, err := ringbuf.NewReader(x.objs.Maps.Raw().SyncEvents)
	if err != nil {
		return nil, fmt.Errorf("open sync_events: %w", err)
	}
	return &flowReader{rd: rd}, nil
}

type flowReader struct {
	rd  *ringbuf.Reader
	rec ringbuf.Record
}

func (r *flowReader) Read() (datapath.Flow, error) {
	if err := r.rd.ReadInto(&r.rec); err != nil {
		return datapath.Flow{}, err
	}
	return maps.SyncFlow(r.rec.RawSample)
}

func (r *flowReader) SetDeadline(t time.Time) { r.rd.SetDeadline(t) }
func (r *flowReader) Close() error            { return r.rd.Close() }

// Learn enters flows other hosts entered (see datapath.Sharer).
func (x *XDP) Learn(flows []datapath.LearnedFlow) (int, error) {
	m := x.objs.Maps
	n := 0
	var errs []error
	for _, l := range flows {
		if l.Conn {
			ok, err := m.PutFlow(l.Flow, l.Encap)
			if err != nil {
				errs = append(errs, err)
			} else if ok {
				n++
			}
		}
		if l.Affinity {
			rule := maps.IfOlder
			switch {
			case l.Dumped:
				rule = maps.IfAbsent
			case l.Renewal:
				rule = maps.IfSame
			}
			if _, err := m.LearnAffinity(l.Flow.Service, l.Flow.Client.Addr(), l.Flow.Backend, l.Age, rule); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return n, errors.Join(errs...)
}

// SharedLost counts the flows sync_events had no room for.
func (x *XDP) SharedLost() (uint64, error) { return x.objs.Maps.SyncLost() }

// KeepAffinity renews the affinity entries of connected clients (see
// datapath.AffinityKeeper).
func (x *XDP) KeepAffinity(flows []datapath.Flow) ([]datapath.Flow, error) {
	m := x.objs.Maps
	var out []datapath.Flow
	var errs []error
	for _, f := range flows {
		renewed, err := m.LearnAffinity(f.Service, f.Client.Addr(), f.Backend, 0, maps.IfSame)
		if err != nil {
			errs = append(errs, err)
		} else if renewed {
			out = append(out, f)
		}
	}
	return out, errors.Join(errs...)
}
