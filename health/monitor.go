package health

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tetherlb/tether/internal/damp"
)

// ErrClosed is returned by Set on a Monitor that was closed.
var ErrClosed = errors.New("health: monitor closed")

// Monitor probes a set of targets, one goroutine each, and keeps their
// state. Its methods are safe for concurrent use. A Monitor lives from New
// to Close; Close stops every prober and waits for them.
type Monitor struct {
	log      *slog.Logger
	onChange func(Target, Status)
	damp     damp.Damper // transitions of a flapping target, logged now and then
	path     atomic.Pointer[PathFunc]

	setMu sync.Mutex // serialises Set and Close

	mu      sync.Mutex // guards the fields below and every prober's state
	probers map[Target]*prober
	refs    map[Target]int // how many times the set lists each target
	closed  bool
}

// prober is the goroutine that probes one target, and the target's state.
type prober struct {
	target Target
	cancel context.CancelFunc
	done   chan struct{} // closed when the goroutine has returned
	state  state         // guarded by Monitor.mu
}

// New returns a Monitor with no targets. log receives the transitions (nil
// discards them). onChange, when not nil, is called after every transition,
// from the target's prober goroutine and with no lock held, so that the
// calls for one target come in order; it must not call Set or Close, but may
// call Status and All.
func New(log *slog.Logger, onChange func(Target, Status)) *Monitor {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Monitor{log: log, onChange: onChange, probers: make(map[Target]*prober), refs: make(map[Target]int)}
}

// Set makes targets the set of probed targets, compared after Check.Defaults:
// it starts a prober for each new target, stops and forgets those no longer
// listed, and leaves the others, with their state and counters, untouched.
// Repeated targets share one prober. A new target starts up (see the package
// documentation) and is not reported to onChange until it changes.
//
// Set refuses an invalid target, changing nothing. When it returns, the
// removed probers have stopped and their callbacks have returned.
func (m *Monitor) Set(targets []Target) error {
	want := make(map[Target]int, len(targets))
	for _, t := range targets {
		t = t.withDefaults()
		if err := t.validate(); err != nil {
			return err
		}
		want[t]++
	}

	m.setMu.Lock()
	defer m.setMu.Unlock()

	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return ErrClosed
	}
	var stopped []*prober
	for t, p := range m.probers {
		if want[t] == 0 {
			delete(m.probers, t)
			stopped = append(stopped, p)
		}
	}
	now := time.Now()
	for t := range want {
		if m.probers[t] == nil {
			m.probers[t] = m.start(t, now)
		}
	}
	m.refs = want
	m.mu.Unlock()

	stop(stopped)
	return nil
}

// Edit changes the set as a change of a few backends does, in time
// proportional to them: the targets of add are listed once more, those of
// remove once less (as the same backends' targets before and after the
// change), and Set's rules follow: a target listed for the first time
// starts up, one no longer listed is stopped and forgotten, the others
// are untouched. Like Set, it refuses an invalid target, changing nothing.
func (m *Monitor) Edit(remove, add []Target) error {
	add = slices.Clone(add)
	for i, t := range add {
		add[i] = t.withDefaults()
		if err := add[i].validate(); err != nil {
			return err
		}
	}
	m.setMu.Lock()
	defer m.setMu.Unlock()

	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return ErrClosed
	}
	now := time.Now()
	for _, t := range add {
		if m.refs[t]++; m.probers[t] == nil {
			m.probers[t] = m.start(t, now)
		}
	}
	var stopped []*prober
	for _, t := range remove {
		t = t.withDefaults()
		if m.refs[t] == 0 {
			continue
		}
		if m.refs[t]--; m.refs[t] == 0 {
			delete(m.refs, t)
			if p := m.probers[t]; p != nil {
				stopped = append(stopped, p)
				delete(m.probers, t)
			}
		}
	}
	m.mu.Unlock()

	stop(stopped)
	return nil
}

// Status returns the state of target, compared after Check.Defaults, and
// whether it is probed.
func (m *Monitor) Status(target Target) (Status, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	p, ok := m.probers[target.withDefaults()]
	if !ok {
		return Status{}, false
	}
	return p.state.status, true
}

// All returns the state of every probed target, keyed by the target with
// its check's defaults applied.
func (m *Monitor) All() map[Target]Status {
	m.mu.Lock()
	defer m.mu.Unlock()
	all := make(map[Target]Status, len(m.probers))
	for t, p := range m.probers {
		all[t] = p.state.status
	}
	return all
}

// Close stops every prober and waits until their goroutines, and any
// callback in progress, have returned. Later calls do nothing; Set then
// returns ErrClosed.
func (m *Monitor) Close() {
	m.setMu.Lock()
	defer m.setMu.Unlock()

	m.mu.Lock()
	m.closed = true
	probers := slices.Collect(maps.Values(m.probers))
	clear(m.probers)
	m.mu.Unlock()

	stop(probers)
}

// stop cancels every prober, then waits for each of them to return.
func stop(probers []*prober) {
	for _, p := range probers {
		p.cancel()
	}
	for _, p := range probers {
		<-p.done
	}
}

// start starts the prober of t, which starts up at now. m.mu must be held.
func (m *Monitor) start(t Target, now time.Time) *prober {
	ctx, cancel := context.WithCancel(context.Background())
	p := &prober{
		target: t,
		cancel: cancel,
		done:   make(chan struct{}),
		state:  state{status: Status{Up: true, Since: now}},
	}
	m.log.Debug("health: probing", "target", t.String(), "interval", t.Check.Interval, "timeout", t.Check.Timeout)
	go m.run(ctx, p)
	return p
}

// run probes p's target until ctx is cancelled: first at once, then at a
// random phase between half an interval and one and a half intervals later,
// then every interval. A probe that overruns its slot skips the slots it
// missed rather than bunching up.
func (m *Monitor) run(ctx context.Context, p *prober) {
	defer close(p.done)
	c := p.target.Check

	next := time.Now()
	timer := time.NewTimer(0)
	defer timer.Stop()
	for first := true; ; first = false {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}

		res := m.probe(ctx, p.target, m.failing(p))
		if ctx.Err() != nil {
			return // stopped mid-probe: the result says nothing of the backend
		}
		m.record(p, res)

		if first {
			next = next.Add(c.Interval/2 + rand.N(c.Interval))
		} else {
			next = next.Add(c.Interval)
		}
		now := time.Now()
		if late := now.Sub(next); late >= 0 {
			next = next.Add((late/c.Interval + 1) * c.Interval)
		}
		timer.Reset(next.Sub(now))
	}
}

// Path is how a probe that follows the clients' path leaves this host: from
// Source, its socket marked with Mark, which the datapath steers to the
// backend the way it sends clients' packets.
type Path struct {
	Mark   uint32
	Source netip.Addr
}

// PathFunc returns the Path of a target with a VIP. The zero Path means
// that the clients reach the backend at its own address (a proxy
// datapath): the probe goes there. An error fails the probe, the error
// its reason.
type PathFunc func(Target) (Path, error)

// SetPath sets how probes of targets with a VIP follow the clients' path.
// Without it (or with nil) they probe the backend's own address.
func (m *Monitor) SetPath(fn PathFunc) {
	if fn == nil {
		m.path.Store(nil)
		return
	}
	m.path.Store(&fn)
}

// probe runs one probe of t. A probe that follows the clients' path, of a
// target whose last probe failed, probes the backend's own address at the
// same time, within the same timeout, so that the reason tells a backend
// that does not answer on the VIP from one that does not answer at all.
func (m *Monitor) probe(ctx context.Context, t Target, failing bool) Result {
	fn := m.path.Load()
	if !t.VIP.IsValid() || fn == nil {
		return probe(ctx, plain(t))
	}
	start := time.Now()
	path, err := (*fn)(t)
	if err != nil {
		return Result{Reason: "VIP path: " + err.Error(), At: start, Latency: time.Since(start)}
	}
	if path == (Path{}) {
		return probe(ctx, plain(t))
	}
	own := make(chan Result, 1)
	if failing {
		go func() { own <- probe(ctx, plain(t)) }()
	}
	res := probe(ctx, attempt{Check: t.Check, to: t.VIP, path: path})
	var o Result
	if failing {
		o = <-own
	}
	switch {
	case res.OK || ctx.Err() != nil:
	case !failing:
		res.Reason += " on the VIP path"
	case o.OK:
		res.Reason += " on the VIP path; the backend answers on its own address"
	default:
		res.Reason += " on the VIP path; " + o.Reason + " on its own address too"
	}
	return res
}

// failing says whether the last probe of p failed.
func (m *Monitor) failing(p *prober) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := p.state.status
	return st.Probes > 0 && !st.Result.OK
}

// record applies the result of a probe to p's state, and logs and reports
// the transition it causes, if any.
func (m *Monitor) record(p *prober, res Result) {
	now := time.Now()
	m.mu.Lock()
	if m.probers[p.target] != p {
		m.mu.Unlock()
		return // removed while probing
	}
	changed := p.state.record(res, p.target.Check, now)
	st := p.state.status
	m.mu.Unlock()

	if !res.OK {
		m.log.Debug("health: probe failed", "target", p.target.String(), "reason", res.Reason, "latency", res.Latency)
	}
	if !changed {
		// A flapping target that has calmed: its state now, once.
		if v := m.damp.Flush(p.target.String(), now); v.Log {
			state := "down"
			if st.Up {
				state = "up"
			}
			m.log.Warn("health: backend "+state+" after flapping", "target", p.target.String(),
				"transitions", st.Transitions, "transitions_last_minute", v.Recent, "not_logged", v.Held)
		}
		return
	}
	if v := m.damp.Note(p.target.String(), now); v.Log {
		msg, level := "health: backend up", slog.LevelInfo
		if !st.Up {
			msg, level = "health: backend down", slog.LevelWarn
		}
		args := []any{"target", p.target.String(), "reason", res.Reason, "latency", res.Latency, "transitions", st.Transitions}
		if v.Damped {
			// A flapping target: one line now and then, not one per
			// transition.
			msg, level = msg+" (flapping: its transitions are logged now and then)", slog.LevelWarn
			args = append(args, "transitions_last_minute", v.Recent)
		}
		if v.Held > 0 {
			args = append(args, "not_logged", v.Held)
		}
		m.log.Log(context.Background(), level, msg, args...)
	}
	if m.onChange != nil {
		m.onChange(p.target, st)
	}
}

// state is the verdict on one target and the run of results against it.
type state struct {
	status Status
	streak int // results in a row that disagree with status.Up
}

// record counts res, made with check c and completed at now, and says
// whether it changed the verdict: fall failures in a row take an up target
// down, rise successes in a row bring a down target up.
func (s *state) record(res Result, c Check, now time.Time) bool {
	s.status.Probes++
	if !res.OK {
		s.status.Failures++
	}
	s.status.Result = res
	if res.OK == s.status.Up {
		s.streak = 0
		return false
	}
	s.streak++
	need := c.Fall
	if !s.status.Up {
		need = c.Rise
	}
	if s.streak < need {
		return false
	}
	s.streak = 0
	s.status.Up = res.OK
	s.status.Since = now
	s.status.Transitions++
	return true
}
