package control

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"reflect"
	"sync"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/flowsync"
)

// syncTick is how often the daemon checks its sync block (a reload may
// change it); requestEvery how often it asks again a peer that has not
// answered a start's request; dumpEvery how often at most it answers one
// peer's requests.
const (
	syncTick     = 250 * time.Millisecond
	requestEvery = time.Second
	dumpEvery    = time.Second
)

// sharer is the daemon's sharing of entries with its peers (the sync
// block): the syncer, the reader of the datapath's new flows, and what a
// start waits for.
type sharer struct {
	mu      sync.Mutex
	cfg     *config.Sync // the running syncer's
	syncer  *flowsync.Syncer
	reader  datapath.FlowReader
	readers sync.WaitGroup
	err     error // the last start's failure, for status
	retry   time.Time
	// A daemon that starts afresh (no pinned state adopted) announces
	// nothing until every peer has answered its request, or until
	// gateUntil; after that, or with adopted state, it is ready.
	gateUntil time.Time
	ready     bool
	answered  map[netip.AddrPort]bool
	requested time.Time
	dumping   map[netip.AddrPort]time.Time // when this host last began answering each peer
	// counters, beside the syncer's
	learned, known, unknown, dumped uint64
}

// startSync runs the sharing as the configuration says, until Close: its
// first round before it returns, so that BGP's first round knows whether
// the host must learn its peers' entries first. Only a daemon that starts
// afresh waits for them: with adopted state it has its entries, and its
// routers expect its routes back within the graceful restart's deferral.
func (d *Daemon) startSync() {
	d.syncStop, d.syncDone = make(chan struct{}), make(chan struct{})
	s := &d.share
	s.dumping = map[netip.AddrPort]time.Time{}
	s.ready = true
	_, sharing := d.dp.(datapath.Sharer)
	if cfg := d.ctl.Config(); cfg != nil && cfg.Sync != nil && sharing && !d.adopted && cfg.Sync.StartWait > 0 {
		s.ready, s.gateUntil = false, time.Now().Add(cfg.Sync.StartWait)
	}
	d.syncRound()
	go func() {
		defer close(d.syncDone)
		tick := time.NewTicker(syncTick)
		defer tick.Stop()
		for {
			select {
			case <-d.syncStop:
				d.stopSync()
				return
			case <-tick.C:
			}
			d.syncRound()
		}
	}()
}

// syncRound starts, restarts or stops the syncer as the configuration
// says, and asks again the peers that have not answered a start's
// request.
func (d *Daemon) syncRound() {
	cfg := d.ctl.Config()
	s := &d.share
	s.mu.Lock()
	running := s.cfg
	s.mu.Unlock()
	var want *config.Sync
	if cfg != nil {
		want = cfg.Sync
	}
	if !reflect.DeepEqual(want, running) {
		d.stopSync()
		if want != nil {
			d.runSync(want)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.syncer == nil || s.ready {
		return
	}
	var ask []netip.AddrPort
	for _, p := range s.cfg.Peers {
		if !s.answered[p] {
			ask = append(ask, p)
		}
	}
	if len(ask) == 0 {
		s.ready = true
		d.log.Info("sync: learned the peers' entries; announcing", "peers", len(s.cfg.Peers), "entries", s.learned)
		return
	}
	if time.Since(s.requested) >= requestEvery {
		s.requested = time.Now()
		s.syncer.Request(ask...)
	}
}

// runSync starts sharing with the peers of c.
func (d *Daemon) runSync(c *config.Sync) {
	s := &d.share
	s.mu.Lock()
	defer s.mu.Unlock()
	if time.Now().Before(s.retry) {
		return
	}
	sh, ok := d.dp.(datapath.Sharer)
	if !ok {
		s.err, s.retry = errors.New("the splice datapath holds its connections itself: only XDP shares entries"), time.Now().Add(time.Hour)
		d.log.Warn("sync: " + s.err.Error())
		return
	}
	rd, err := sh.NewFlows()
	if err != nil {
		s.err, s.retry = err, time.Now().Add(bgpRetry)
		d.log.Error("sync: read the new flows", "err", err)
		return
	}
	syncer, err := flowsync.Start(flowsync.Options{Listen: c.Listen, Peers: c.Peers, Key: []byte(c.Key), Log: d.log,
		Learn:    func(h flowsync.Header, entries []flowsync.Entry) { d.learn(sh, h, entries) },
		Answered: d.peerAnswered})
	if err != nil {
		rd.Close()
		s.err, s.retry = err, time.Now().Add(bgpRetry)
		d.log.Error("sync: start", "err", err)
		return
	}
	s.cfg, s.syncer, s.reader, s.err = c.Clone(), syncer, rd, nil
	s.answered = map[netip.AddrPort]bool{}
	s.readers.Add(1)
	go d.sendNewFlows(rd, syncer)
	if !s.ready {
		s.requested = time.Now()
		syncer.Request(c.Peers...)
	}
	d.log.Info("sync: started", "listen", c.Listen, "peers", c.Peers)
}

// peerAnswered notes that peer answered a request, wholly or not (then it is
// asked again).
func (d *Daemon) peerAnswered(peer netip.AddrPort, complete bool) {
	s := &d.share
	s.mu.Lock()
	defer s.mu.Unlock()
	if !complete {
		d.log.Warn("sync: a peer's answer arrived incomplete; asking again", "peer", peer)
		return
	}
	if s.answered != nil {
		s.answered[peer] = true
	}
}

// stopSync stops the syncer, if one runs.
func (d *Daemon) stopSync() {
	s := &d.share
	s.mu.Lock()
	syncer, rd := s.syncer, s.reader
	s.syncer, s.reader, s.cfg = nil, nil, nil
	s.mu.Unlock()
	if rd != nil {
		rd.Close()
		s.readers.Wait()
	}
	if syncer != nil {
		syncer.Close()
		d.log.Info("sync: stopped")
	}
}

// sendNewFlows sends the datapath's new flows, named by addresses, until
// the reader closes. It drains the ring every flowsync.FlushEvery rather
// than waking for each flow: the entries wait that long for a datagram
// anyway, and a wakeup per new connection costs more than the sending.
func (d *Daemon) sendNewFlows(rd datapath.FlowReader, syncer *flowsync.Syncer) {
	defer d.share.readers.Done()
	var batch []flowsync.Entry
	for {
		rd.SetDeadline(time.Now()) // read what is there, wait for nothing
		view := d.ctl.ShareView()
		for {
			f, err := rd.Read()
			if errors.Is(err, os.ErrClosed) {
				return
			}
			if err != nil {
				break // empty (os.ErrDeadlineExceeded), or a read to try again next round
			}
			if vip, proto, be, ok := view.Name(f); ok { // else a service that stopped sharing, a backend just removed
				batch = append(batch, flowsync.Entry{Kind: flowsync.KindConn, Proto: proto, Client: f.Client, VIP: vip, Backend: be})
			}
		}
		if len(batch) > 0 {
			syncer.Send(batch...)
			syncer.Flush() // they have waited their FlushEvery here already
			batch = batch[:0]
		}
		time.Sleep(flowsync.FlushEvery)
	}
}

// learn enters the entries a peer sent, in this host's ids, and answers a
// peer's request with every entry this host holds for the services it
// shares.
func (d *Daemon) learn(sh datapath.Sharer, h flowsync.Header, entries []flowsync.Entry) {
	s := &d.share
	if h.Type == flowsync.TypeRequest {
		s.mu.Lock()
		syncer, last := s.syncer, s.dumping[h.Sender]
		busy := syncer == nil || time.Since(last) < dumpEvery
		if !busy {
			s.dumping[h.Sender] = time.Now()
		}
		s.mu.Unlock()
		if !busy {
			go d.dump(syncer, h.Sender)
		}
		return
	}
	view := d.ctl.ShareView()
	ls := make([]datapath.LearnedFlow, 0, len(entries))
	var unknown uint64
	for _, e := range entries {
		svc, id, ok := view.Local(e.VIP, e.Proto, e.Backend)
		if !ok {
			unknown++ // a service or backend this host does not serve (yet)
			continue
		}
		l := datapath.LearnedFlow{Flow: datapath.Flow{Client: e.Client, VIP: e.VIP, Proto: e.Proto, Service: svc.ID, Backend: id},
			Affinity: svc.SourceAffinity, Dumped: h.Type == flowsync.TypeDump, Age: e.Age}
		if e.Kind == flowsync.KindConn {
			l.Conn, l.Encap = true, svc.Forwarding == datapath.IPIP || svc.Forwarding == datapath.GUE
		} else {
			l.Renewal = true // affinity entries travel alone as renewals (keepAffinities)
		}
		ls = append(ls, l)
	}
	n, err := sh.Learn(ls)
	if err != nil {
		d.log.Warn("sync: enter learned entries", "err", err)
	}
	s.mu.Lock()
	s.learned += uint64(n)
	s.known += uint64(len(ls) - n)
	s.unknown += unknown
	s.mu.Unlock()
}

// dump sends peer every connection entry this host made (not those it
// learned and has not seen a packet of) for the services it shares.
func (d *Daemon) dump(syncer *flowsync.Syncer, peer netip.AddrPort) {
	flows, err := d.dp.Flows()
	if err != nil {
		// No answer rather than an empty one the peer would take as
		// whole: it asks again.
		d.log.Warn("sync: list the flows for a peer; not answering", "peer", peer, "err", err)
		return
	}
	view := d.ctl.ShareView()
	entries := make([]flowsync.Entry, 0, len(flows))
	for _, f := range flows {
		if f.Closing || f.Learned {
			continue
		}
		if vip, proto, be, ok := view.Name(f); ok {
			entries = append(entries, flowsync.Entry{Kind: flowsync.KindConn, Proto: proto, Client: f.Client, VIP: vip, Backend: be})
		}
	}
	flows = nil
	syncer.Dump(peer, entries)
	s := &d.share
	s.mu.Lock()
	s.dumped += uint64(len(entries))
	s.mu.Unlock()
	d.log.Info("sync: sent a peer our entries", "peer", peer, "entries", len(entries))
}

// syncLearning says why the host must not announce yet (it is learning
// its peers' entries), or "" when it may.
func (d *Daemon) syncLearning() string {
	s := &d.share
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ready {
		return ""
	}
	if !time.Now().Before(s.gateUntil) {
		s.ready = true
		d.log.Warn("sync: start_wait passed before every peer answered; announcing", "answered", len(s.answered))
		return ""
	}
	peers := 0
	if s.cfg != nil {
		peers = len(s.cfg.Peers)
	}
	return fmt.Sprintf("learning the peers' entries (%d of %d answered, at most %v more)", len(s.answered), peers,
		time.Until(s.gateUntil).Round(time.Second/10))
}

// SyncStatus is what tether status shows of the sharing of entries.
type SyncStatus struct {
	Listen string   `json:"listen"`
	Peers  []string `json:"peers"`
	// Ready: the host learned its peers' entries (or waited start_wait).
	Ready bool   `json:"ready"`
	Error string `json:"error,omitempty"`
	// Sent and received datagrams and entries; Learned: entries entered,
	// Known: entries this host had already, Unknown: entries of services
	// or backends it does not serve; Dumped: entries sent answering
	// requests; Lost: new flows the datapath had no room to hand out.
	SentDatagrams     uint64            `json:"sent_datagrams"`
	SentEntries       uint64            `json:"sent_entries"`
	SentBytes         uint64            `json:"sent_bytes"`
	SendErrors        uint64            `json:"send_errors"`
	Dropped           uint64            `json:"dropped"`
	ReceivedDatagrams uint64            `json:"received_datagrams"`
	ReceivedEntries   uint64            `json:"received_entries"`
	Refused           map[string]uint64 `json:"refused"`
	Learned           uint64            `json:"learned"`
	Known             uint64            `json:"known"`
	Unknown           uint64            `json:"unknown"`
	Dumped            uint64            `json:"dumped"`
	Lost              uint64            `json:"lost"`
}

// SyncStatus returns the sharing's state, nil when the configuration has
// no sync block.
func (d *Daemon) SyncStatus() *SyncStatus {
	s := &d.share
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.syncer == nil && s.err == nil {
		return nil
	}
	st := &SyncStatus{Ready: s.ready, Learned: s.learned, Known: s.known, Unknown: s.unknown, Dumped: s.dumped}
	if s.err != nil {
		st.Error = s.err.Error()
	}
	if s.cfg != nil {
		st.Listen = s.cfg.Listen.String()
		for _, p := range s.cfg.Peers {
			st.Peers = append(st.Peers, p.String())
		}
	}
	if s.syncer != nil {
		x := s.syncer.Stats()
		st.SentDatagrams, st.SentEntries, st.SentBytes, st.SendErrors, st.Dropped = x.SentDatagrams, x.SentEntries, x.SentBytes, x.SendErrors, x.Dropped
		st.ReceivedDatagrams, st.ReceivedEntries, st.Refused = x.ReceivedDatagrams, x.ReceivedEntries, x.Refused
	}
	if sh, ok := d.dp.(datapath.Sharer); ok {
		st.Lost, _ = sh.SharedLost()
	}
	return st
}
