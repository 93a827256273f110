package control

import (
	"net/netip"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/flowsync"
)

// keepBounds bound how often the daemon renews the affinity entries of
// clients that hold connections: a quarter of the shortest affinity
// timeout, within these.
const (
	minKeepEvery = time.Second
	maxKeepEvery = time.Minute
)

// startAffinityKeeper renews, until Close, the affinity entries of the
// clients that hold open connections, so that a client's backend is
// remembered as long as one of its connections lives and affinity_timeout
// after its last one ended (tables that forget on their own time would
// send a client that reconnects after hours on one long connection
// elsewhere). With a sync block, the renewed entries go to the peers too.
// Only a datapath that can renew them (datapath.AffinityKeeper) has it
// done.
func (d *Daemon) startAffinityKeeper() {
	k, ok := d.dp.(datapath.AffinityKeeper)
	if !ok {
		return
	}
	d.keepStop, d.keepDone = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(d.keepDone)
		for {
			select {
			case <-d.keepStop:
				return
			case <-time.After(d.keepEvery()):
			}
			if d.hasSourceAffinity() {
				d.keepAffinities(k)
			}
		}
	}()
}

// keepEvery is a quarter of the shortest affinity timeout of the
// services, within minKeepEvery..maxKeepEvery.
func (d *Daemon) keepEvery() time.Duration {
	every := maxKeepEvery
	if cfg := d.ctl.Config(); cfg != nil {
		for _, s := range cfg.Services {
			if s.AffinityTimeout > 0 {
				every = min(every, s.AffinityTimeout/4)
			}
		}
	}
	return max(every, minKeepEvery)
}

// hasSourceAffinity says whether a service keys by client address: only
// then is there an affinity entry to renew, and a table worth listing.
func (d *Daemon) hasSourceAffinity() bool {
	if cfg := d.ctl.Config(); cfg != nil {
		for _, s := range cfg.Services {
			if s.Affinity == config.AffinitySource {
				return true
			}
		}
	}
	return false
}

// keepAffinities renews the affinity entry of every client with an open
// connection (not closing; not one another host made and this one has not
// seen a packet of) to a source-affinity service.
func (d *Daemon) keepAffinities(k datapath.AffinityKeeper) {
	flows, err := d.dp.Flows()
	if err != nil {
		d.log.Warn("affinity: list the connections", "err", err)
		return
	}
	view := d.ctl.ShareView()
	type key struct {
		svc    uint32
		client netip.Addr
	}
	seen := map[key]bool{}
	var keep []datapath.Flow
	for _, f := range flows {
		if f.Closing || f.Learned || seen[key{f.Service, f.Client.Addr()}] {
			continue
		}
		if s := view.byID[f.Service]; s == nil || !s.SourceAffinity {
			continue
		}
		seen[key{f.Service, f.Client.Addr()}] = true
		keep = append(keep, f)
	}
	renewed, err := k.KeepAffinity(keep)
	if err != nil {
		d.log.Warn("affinity: renew the entries of connected clients", "err", err)
	}
	s := &d.share
	s.mu.Lock()
	syncer := s.syncer
	s.mu.Unlock()
	if syncer == nil {
		return
	}
	var entries []flowsync.Entry
	for _, f := range renewed {
		if vip, proto, be, ok := view.Name(f); ok {
			entries = append(entries, flowsync.Entry{Kind: flowsync.KindAffinity, Proto: proto,
				Client: netip.AddrPortFrom(f.Client.Addr(), 0), VIP: vip, Backend: be})
		}
	}
	syncer.Send(entries...)
}
