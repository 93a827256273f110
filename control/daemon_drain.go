package control

import (
	"math"
	"net/netip"
	"sync"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
)

// Pacing bounds of a drain's closes: the pacer looks at the configuration
// at least every paceIdle for a close_at to come, and while it closes it
// wakes once per connection to close, within paceMinTick..paceMaxTick
// (so closes come one at a time at low rates, a few at once at high ones:
// on average, never faster than the rate). It lists the connection table
// again paceRelist after a listing that found connections, and
// paceRelistIdle after one that found none (see closer.relistDue).
const (
	paceIdle       = 250 * time.Millisecond
	paceMinTick    = 5 * time.Millisecond
	paceMaxTick    = 100 * time.Millisecond
	paceRelist     = time.Second
	paceRelistIdle = 5 * time.Second
)

// drainKey names a backend of a service as the datapath applies it.
type drainKey struct{ service, backend uint32 }

// closer is the pacing of one backend whose close_at has passed.
type closer struct {
	at      time.Time // the close_at it paces (another one starts afresh)
	rate    int
	closed  int             // connections closed so far by this daemon
	tokens  float64         // closes it may make now
	last    time.Time       // when tokens were last added
	listed  time.Time       // when pending was last listed
	found   bool            // the last listing found connections to close
	pending []datapath.Flow // connections still to close, as last listed
}

// pacer closes, until Close, the remaining connections of each draining
// backend whose close_at has passed, close_rate of them a second: each at
// most 1/rate after the one before, the first at close_at. Only a
// datapath that can close connections one by one (datapath.Closer) does
// it. What it closed is counted per backend (DrainStatus) for as long as
// the backend's close_at stays; a restart starts the count afresh and
// goes on with what is left.
type pacer struct {
	mu      sync.Mutex
	closers map[drainKey]*closer
	stop    chan struct{}
	done    chan struct{}
}

// startPacer starts closing connections of draining backends at their
// close_at.
func (d *Daemon) startPacer() {
	c, ok := d.dp.(datapath.Closer)
	if !ok {
		return
	}
	p := &pacer{closers: map[drainKey]*closer{}, stop: make(chan struct{}), done: make(chan struct{})}
	d.pace = p
	go func() {
		defer close(p.done)
		wait := time.Duration(0)
		for {
			select {
			case <-p.stop:
				return
			case <-time.After(wait):
			}
			wait = d.paceOnce(c, time.Now())
		}
	}()
}

// stopPacer stops the pacer and waits for it.
func (d *Daemon) stopPacer() {
	if d.pace != nil {
		close(d.pace.stop)
		<-d.pace.done
	}
}

// paceOnce makes the closes due at now and returns how long to wait
// before the next look.
func (d *Daemon) paceOnce(c datapath.Closer, now time.Time) time.Duration {
	p := d.pace
	if d.handedOver.Load() {
		return paceIdle // the successor closes them
	}
	cfg, applied := d.snapshot()
	wait := paceIdle
	due := map[drainKey]config.Backend{}
	byKey := appliedByKey(applied)
	for _, cs := range cfg.Services {
		as, ok := byKey[cs.Key()]
		if !ok {
			continue
		}
		for _, b := range cs.Backends {
			if b.State != config.StateDraining || b.CloseAt.IsZero() {
				continue
			}
			if now.Before(b.CloseAt) {
				wait = min(wait, b.CloseAt.Sub(now))
				continue
			}
			for _, ab := range as.Backends {
				if ab.Addr == b.Address && ab.Port == b.Port {
					due[drainKey{as.ID, ab.ID}] = b
				}
			}
		}
	}

	p.mu.Lock()
	for k, cl := range p.closers {
		if b, ok := due[k]; !ok || !b.CloseAt.Equal(cl.at) {
			delete(p.closers, k) // undrained, removed, or given another close_at
		}
	}
	relist := false
	for k, b := range due {
		cl := p.closers[k]
		if cl == nil {
			cl = &closer{at: b.CloseAt, tokens: 1, last: now, found: true}
			p.closers[k] = cl
		}
		cl.rate = b.CloseRate
		// Closes accrue at the rate, at most a tick's worth ahead: a
		// pacer that slept long does not catch up in a burst.
		cl.tokens = min(cl.tokens+now.Sub(cl.last).Seconds()*float64(cl.rate), max(1, float64(cl.rate)*paceMaxTick.Seconds()))
		cl.last = now
		relist = relist || cl.relistDue(now)
	}
	p.mu.Unlock()

	// The listing walks the whole table: not under p.mu, which status
	// takes.
	var lists map[drainKey][]datapath.Flow
	if relist {
		flows, err := d.dp.Flows()
		if err != nil {
			d.log.Warn("paced drain: cannot read the connection table", "err", err)
			return paceMaxTick
		}
		lists = map[drainKey][]datapath.Flow{}
		for _, f := range flows {
			if !f.Closing && !f.Learned {
				k := drainKey{f.Service, f.Backend}
				lists[k] = append(lists[k], f)
			}
		}
	}

	p.mu.Lock()
	defer p.mu.Unlock()
	for k, cl := range p.closers {
		if lists != nil && cl.relistDue(now) {
			cl.pending, cl.listed = lists[k], now
			cl.found = len(cl.pending) > 0
		}
		for cl.tokens >= 1 && len(cl.pending) > 0 {
			n := min(int(cl.tokens), len(cl.pending))
			closed, err := c.CloseFlows(cl.pending[:n])
			cl.tokens -= float64(len(closed))
			cl.closed += len(closed)
			if err != nil {
				// The batch is passed over (what it left open is listed
				// again later), so that one flow cannot stop the others.
				d.log.Warn("paced drain: cannot close connections", "service", k.service, "backend", k.backend, "err", err)
			}
			cl.pending = cl.pending[n:]
		}
		if len(cl.pending) > 0 && cl.rate > 0 {
			// The next close is due when a whole token has accrued.
			next := time.Duration(math.Ceil((1 - cl.tokens) / float64(cl.rate) * float64(time.Second)))
			wait = min(wait, max(paceMinTick, min(next, paceMaxTick)))
		}
	}
	return wait
}

// relistDue says whether the closer's connections are to be listed
// again at now: when it has none left to close, a second after a listing
// that found some (a client that reused its 5-tuple, a flow another host
// made that became this one's), five seconds after one that found none.
func (cl *closer) relistDue(now time.Time) bool {
	if len(cl.pending) > 0 {
		return false
	}
	every := paceRelistIdle
	if cl.found {
		every = paceRelist
	}
	return cl.listed.IsZero() || now.Sub(cl.listed) >= every
}

// DrainStatus is a paced drain of one backend: when its remaining
// connections close, at what rate, and how many this daemon has closed.
type DrainStatus struct {
	// CloseAt is when the backend's remaining connections start to be
	// closed, Rate of them a second.
	CloseAt time.Time `json:"close_at"`
	Rate    int       `json:"rate"`
	// Closed counts the connections closed so far (by this daemon: a
	// restart counts afresh). Pending counts those listed to close next.
	Closed  int `json:"closed"`
	Pending int `json:"pending"`
}

// drainStatus returns the paced drain of backend b (id) of service
// svcID, or nil when it has no close_at.
func (d *Daemon) drainStatus(svcID, id uint32, b config.Backend) *DrainStatus {
	if b.CloseAt.IsZero() || b.State != config.StateDraining {
		return nil
	}
	st := &DrainStatus{CloseAt: b.CloseAt, Rate: b.CloseRate}
	if p := d.pace; p != nil {
		p.mu.Lock()
		if cl := p.closers[drainKey{svcID, id}]; cl != nil && cl.at.Equal(b.CloseAt) {
			st.Closed, st.Pending = cl.closed, len(cl.pending)
		}
		p.mu.Unlock()
	}
	return st
}

// configBackend finds backend addr:port in cs.
func configBackend(cs config.Service, addr netip.Addr, port uint16) (config.Backend, bool) {
	for _, b := range cs.Backends {
		if b.Address == addr && b.Port == port {
			return b, true
		}
	}
	return config.Backend{}, false
}
