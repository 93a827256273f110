package control

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/health"
)

// healthRetry is how long the daemon waits before applying again a health
// transition the datapath failed to apply.
const healthRetry = time.Second

// StartHealth starts probing the backends of the running configuration
// and applying the verdicts: a backend that its check takes down leaves
// the ring of its service, and comes back when the check takes it up.
// Every target starts up (see the health package). Transitions are logged
// through the daemon's logger with the reason of the probe that decided
// them. Call it once; Close stops it.
func (d *Daemon) StartHealth() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.mon.Load() != nil {
		return errors.New("health checking is already running")
	}
	d.stop = make(chan struct{})
	d.loopDone = make(chan struct{})
	mon := health.New(d.log, d.healthChanged)
	mon.SetPath(d.probePath)
	if err := mon.Set(targets(d.ctl.Config())); err != nil {
		mon.Close()
		return fmt.Errorf("start health checks: %w", err)
	}
	d.mon.Store(mon)
	d.ctl.SetHealth(func(t health.Target) bool {
		st, ok := mon.Status(t)
		return !ok || st.Up // a target not probed (yet) is up
	})
	go d.healthLoop()
	return nil
}

// probePath is the monitor's PathFunc: how a probe via the VIP reaches its
// backend the way the datapath sends the clients' packets. A datapath that
// cannot steer probes (the splice proxy) serves its clients from the
// backends' own addresses, where the probes go then.
func (d *Daemon) probePath(t health.Target) (health.Path, error) {
	p, ok := d.dp.(datapath.Prober)
	if !ok {
		return health.Path{}, nil
	}
	key := t.VIP.String() + "/" + t.Protocol
	id, ok := d.ctl.BackendID(key, t.Addr)
	if !ok {
		return health.Path{}, fmt.Errorf("backend %s of service %s is not applied", t.Addr, key)
	}
	pp, err := p.ProbePath(id, t.Addr.Addr(), t.VIP.Addr())
	return health.Path{Mark: pp.Mark, Source: pp.Source}, err
}

// healthChanged is the monitor's callback. It must not block, nor call the
// monitor's Set: it notes the target for the health loop and returns.
func (d *Daemon) healthChanged(t health.Target, _ health.Status) {
	d.pendingMu.Lock()
	d.pending[t] = true
	d.pendingMu.Unlock()
	select {
	case d.wake <- struct{}{}:
	default: // already woken
	}
}

// backendAnswered is the datapath's callback (datapath.Resolver): a
// backend it could not reach answers now. Like healthChanged, it notes it
// for the health loop.
func (d *Daemon) backendAnswered(a netip.Addr) {
	d.pendingMu.Lock()
	d.answered[a] = true
	d.pendingMu.Unlock()
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// healthLoop applies the pending transitions until Close, and the
// backends the datapath reaches again. The Controller reads each target's
// state from the monitor when it plans, so a transition applied late, or
// twice, still ends in the monitor's verdict.
func (d *Daemon) healthLoop() {
	defer close(d.loopDone)
	retry := time.NewTimer(0)
	<-retry.C
	for {
		select {
		case <-d.stop:
			retry.Stop()
			return
		case <-d.wake:
		case <-retry.C:
		}
		d.pendingMu.Lock()
		todo := slices.Collect(maps.Keys(d.pending))
		answered := slices.Collect(maps.Keys(d.answered))
		clear(d.pending)
		clear(d.answered)
		d.pendingMu.Unlock()
		failed := applyOrKeep(d, todo, d.pending, d.ctl.Refresh, "apply a health transition; retrying")
		if applyOrKeep(d, answered, d.answered, d.ctl.Reachable, "apply a backend that answers again; retrying") || failed {
			retry.Reset(healthRetry)
		}
	}
}

// applyOrKeep applies items, if any, and puts them back into pending when
// that fails, to be applied again after healthRetry; it says whether it
// failed.
func applyOrKeep[K comparable](d *Daemon, items []K, pending map[K]bool, apply func(...K) error, msg string) bool {
	if len(items) == 0 {
		return false
	}
	err := apply(items...)
	if err == nil {
		return false
	}
	d.log.Error(msg, "err", err, "retry_in", healthRetry)
	d.pendingMu.Lock()
	for _, k := range items {
		pending[k] = true
	}
	d.pendingMu.Unlock()
	return true
}

// syncTargets makes the monitor probe the backends of the configuration
// the controller runs: new backends start up, removed ones are forgotten
// (a backend removed and added again starts afresh).
func (d *Daemon) syncTargets() {
	mon := d.mon.Load()
	if mon == nil {
		return
	}
	if err := mon.Set(targets(d.ctl.Config())); err != nil {
		d.log.Error("update the health checks", "err", err)
	}
}

// syncEdit is syncTargets after edit applied: the monitor stops probing
// the backends of the services it replaced and probes those of the
// services it changed, in time proportional to them; a backend in both
// goes on as it was.
func (d *Daemon) syncEdit(edit *fileEdit) {
	mon := d.mon.Load()
	if mon == nil {
		return
	}
	if err := mon.Edit(serviceTargets(edit.was), serviceTargets(edit.Changed)); err != nil {
		d.log.Error("update the health checks", "err", err)
		d.syncTargets()
	}
}

// targets lists the health targets of cfg: every backend of every
// service that probes, with its service's check.
func targets(cfg *config.Config) []health.Target {
	if cfg == nil {
		return nil
	}
	return serviceTargets(cfg.Services)
}

// serviceTargets lists the health targets of services.
func serviceTargets(services []config.Service) []health.Target {
	var out []health.Target
	for _, s := range services {
		for _, b := range s.Backends {
			if t, ok := s.Target(b); ok {
				out = append(out, t)
			}
		}
	}
	return out
}

// backendHealth is the health of backend b of s as status shows it.
func (d *Daemon) backendHealth(s config.Service, b config.Backend) BackendHealth {
	t, ok := s.Target(b)
	mon := d.mon.Load()
	if !ok || mon == nil {
		return BackendHealth{State: HealthUnchecked}
	}
	st, ok := mon.Status(t)
	if !ok {
		return BackendHealth{State: HealthUnchecked, Check: t.String()}
	}
	h := BackendHealth{
		State:       HealthUp,
		Check:       t.String(),
		Since:       st.Since,
		Probes:      st.Probes,
		Failures:    st.Failures,
		Transitions: st.Transitions,
	}
	if !st.Up {
		h.State = HealthDown
	}
	if r := st.Result; !r.At.IsZero() {
		h.LastResult = r.Reason
		h.LastLatency = roundLatency(r.Latency).String()
		h.LastProbe = r.At
	}
	return h
}

// roundLatency rounds a probe's latency to what an operator reads.
func roundLatency(d time.Duration) time.Duration {
	switch {
	case d >= time.Second:
		return d.Round(time.Millisecond)
	case d >= time.Millisecond:
		return d.Round(10 * time.Microsecond)
	}
	return d.Round(time.Microsecond)
}
