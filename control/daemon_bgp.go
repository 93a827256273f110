package control

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/tetherlb/tether/bgp"
	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
)

// bgpTick is how often the daemon reconsiders what it announces: a VIP
// that can no longer be served is withdrawn within it.
const bgpTick = 250 * time.Millisecond

// announcer is the daemon's BGP state: the speaker (nil while the
// configuration has no bgp block), whether the host is drained, and, per
// VIP, when it was last withdrawn and since when it can be served again.
type announcer struct {
	spk       *bgp.Speaker
	cfg       *config.BGP // the speaker's configuration
	drained   bool
	learning  string                   // why the host waits before it announces (sync), "" when it does not
	withdrawn map[netip.Addr]bool      // VIPs withdrawn because they could not be served
	servable  map[netip.Addr]time.Time // since when a withdrawn VIP can be served again
	vips      []VIPAnnouncement        // the last round's verdicts, for status
	err       error                    // the last round's error, for status
	retry     time.Time                // when a speaker that failed to start is tried again
	started   bool                     // a speaker was started (the first follows a restart)
	stopped   bool                     // Close stopped the speaker for good
}

// bgpRetry is how long the daemon waits before it starts again a speaker
// that failed to start.
const bgpRetry = 5 * time.Second

// VIPAnnouncement is whether a VIP is announced, and why.
type VIPAnnouncement struct {
	VIP       netip.Addr `json:"vip"`
	Announced bool       `json:"announced"`
	// Reason says why: "servable", "drained", "no service has min_healthy
	// usable backends", "servable again, announced in 3s".
	Reason string `json:"reason"`
}

// BGPStatus is the BGP speaker's state as status shows it.
type BGPStatus struct {
	bgp.Status
	Drained bool              `json:"drained"`
	VIPs    []VIPAnnouncement `json:"vips"`
	Error   string            `json:"error,omitempty"`
}

// startBGP starts the loop that runs the BGP speaker of the running
// configuration, if any, and keeps what it announces in step with what
// this host can serve. Close stops it, and the speaker: its peers then
// drop the routes.
func (d *Daemon) startBGP() {
	d.ann = announcer{withdrawn: make(map[netip.Addr]bool), servable: make(map[netip.Addr]time.Time)}
	if d.drainMark != "" {
		if _, err := os.Stat(d.drainMark); err == nil {
			d.ann.drained = true
			d.log.Warn("host drained before this start: its VIPs stay withdrawn until tether host undrain", "mark", d.drainMark)
		}
	}
	d.bgpStop, d.bgpDone = make(chan struct{}), make(chan struct{})
	d.bgpRound()
	go func() {
		defer close(d.bgpDone)
		tick := time.NewTicker(bgpTick)
		defer tick.Stop()
		for {
			select {
			case <-d.bgpStop:
				d.bgpMu.Lock()
				d.ann.stopped = true
				if d.ann.spk != nil {
					// A datapath that forwards on after a stop (the pinned
					// XDP program, unless it is removed) keeps the routes
					// with the peers while the next daemon starts (graceful
					// restart), as does a splice daemon that handed its
					// connections over; otherwise the splice proxy ends
					// with the daemon.
					_, outlives := d.dp.(datapath.Remover)
					d.ann.spk.Close(outlives && !d.remove || d.handedOver.Load())
					d.ann.spk = nil
				}
				d.bgpMu.Unlock()
				return
			case <-tick.C:
				d.bgpRound()
			}
		}
	}()
}

// bgpRound starts, reconfigures or stops the speaker as the configuration
// says, and announces the VIPs this host can serve.
func (d *Daemon) bgpRound() {
	d.bgpMu.Lock()
	defer d.bgpMu.Unlock()
	a := &d.ann
	if a.stopped {
		return
	}
	// Taken under bgpMu, so that rounds apply configurations in order
	// (nothing takes bgpMu while it holds d.mu).
	d.mu.Lock()
	cfg, usable := d.ctl.Config(), d.ctl.Usable()
	d.mu.Unlock()
	if a.retry.IsZero() || !time.Now().Before(a.retry) {
		a.err = nil
	}
	switch {
	case cfg.BGP == nil && a.spk != nil:
		a.spk.Close(false)
		a.spk, a.cfg = nil, nil
	case cfg.BGP != nil && a.spk == nil:
		if time.Now().Before(a.retry) {
			return
		}
		// Only the first speaker follows the one an adopted datapath's
		// daemon stopped.
		spk, err := bgp.Start(cfg.BGP, d.adopted && !a.started, d.log)
		if err != nil {
			a.err, a.retry = err, time.Now().Add(bgpRetry)
			d.logBGPError("start the BGP speaker", err)
			return
		}
		a.spk, a.cfg, a.started = spk, cfg.BGP.Clone(), true
	case cfg.BGP != nil && !reflect.DeepEqual(cfg.BGP, a.cfg):
		if err := a.spk.Reconfigure(cfg.BGP); err != nil {
			// Start afresh, after bgpRetry, rather than run half of it.
			a.err, a.retry = err, time.Now().Add(bgpRetry)
			d.logBGPError("reconfigure the BGP speaker; starting it again", err)
			a.spk.Close(false)
			a.spk, a.cfg = nil, nil
			return
		}
		a.cfg = cfg.BGP.Clone()
	}
	if a.spk == nil {
		a.vips = nil
		return
	}
	a.learning = d.syncLearning()
	a.vips = a.verdicts(cfg, usable, time.Now())
	var vips []netip.Addr
	for _, v := range a.vips {
		if v.Announced {
			vips = append(vips, v.VIP)
		}
	}
	if err := a.spk.Announce(vips); err != nil {
		a.err = err
		d.logBGPError("announce the VIPs", err)
	}
}

// logBGPError logs a BGP failure once until it changes.
func (d *Daemon) logBGPError(what string, err error) {
	if msg := what + ": " + err.Error(); msg != d.bgpLastErr {
		d.bgpLastErr = msg
		d.log.Error("bgp: "+what, "err", err)
	}
}

// verdicts decides, for every VIP of cfg, whether it is announced at now:
// not while the host is drained; while one of its services has
// min_healthy usable backends (usable: their counts in the datapath, by
// service key, see Controller.Usable); after a withdrawal, only once that
// has held for the configuration's reannounce delay.
func (a *announcer) verdicts(cfg *config.Config, usable map[string]int, now time.Time) []VIPAnnouncement {
	servable := make(map[netip.Addr]bool)
	short := make(map[netip.Addr][]string) // why each service of a VIP falls short
	for _, s := range cfg.Services {
		n := usable[s.Key()]
		ok := n >= s.MinHealthy
		servable[s.VIP] = servable[s.VIP] || ok
		if !ok {
			short[s.VIP] = append(short[s.VIP], fmt.Sprintf("%s: %d of %d", s.Name, n, s.MinHealthy))
		}
	}
	peers := map[bool]bool{} // by IPv4: a peer of the family exists
	for _, p := range a.cfg.Peers {
		peers[p.Address.Is4()] = true
	}
	vips := make([]netip.Addr, 0, len(servable))
	for v := range servable {
		vips = append(vips, v)
	}
	sort.Slice(vips, func(i, j int) bool { return vips[i].Less(vips[j]) })
	out := make([]VIPAnnouncement, 0, len(vips))
	for _, v := range vips {
		va := VIPAnnouncement{VIP: v}
		switch {
		case !servable[v]:
			va.Reason = "no service of this VIP has min_healthy usable backends (" + strings.Join(short[v], ", ") + ")"
			a.withdrawn[v] = true
			delete(a.servable, v)
		case a.drained:
			va.Reason = "drained (tether host undrain announces it again)"
		case a.learning != "":
			va.Reason = a.learning
		case !a.withdrawn[v]:
			va.Announced, va.Reason = true, "servable"
		default:
			since, ok := a.servable[v]
			if !ok {
				since = now
				a.servable[v] = since
			}
			if wait := since.Add(a.cfg.ReannounceDelay).Sub(now); wait > 0 {
				va.Reason = fmt.Sprintf("servable again, announced in %v (reannounce_delay)", wait.Round(time.Second/10))
				break
			}
			delete(a.withdrawn, v)
			delete(a.servable, v)
			va.Announced, va.Reason = true, "servable"
		}
		if va.Announced && !peers[v.Is4()] {
			va.Reason += ", but no peer of its family to announce it to"
		}
		out = append(out, va)
	}
	// Forget what is known of VIPs no longer configured.
	for v := range a.withdrawn {
		if _, ok := servable[v]; !ok {
			delete(a.withdrawn, v)
			delete(a.servable, v)
		}
	}
	return out
}

// HostDrainSpec drains or undrains this host.
type HostDrainSpec struct {
	Drained bool `json:"drained"`
}

// SetDrained drains this host (withdraws every VIP it announces, while it
// goes on forwarding what still arrives) or undrains it (announces again,
// at once, what it can serve).
func (d *Daemon) SetDrained(drained bool) (Result, error) {
	if cfg, _ := d.snapshot(); cfg.BGP == nil {
		return Result{}, refusef("bgp", "this daemon runs no BGP speaker (the configuration has no bgp block): there is nothing to withdraw")
	}
	d.bgpMu.Lock()
	if err := d.markDrained(drained); err != nil {
		d.bgpMu.Unlock()
		return Result{}, err
	}
	was := d.ann.drained
	d.ann.drained = drained
	if !drained {
		// The operator's word: no reannounce delay.
		clear(d.ann.withdrawn)
		clear(d.ann.servable)
	}
	d.bgpMu.Unlock()
	d.bgpRound()
	msg := "host drained: every VIP withdrawn; established connections keep flowing"
	switch {
	case was == drained && drained:
		msg = "host already drained"
	case was == drained:
		msg = "host not drained"
	case !drained:
		msg = "host undrained: the VIPs it can serve are announced"
	}
	d.log.Info(msg)
	return Result{Message: msg}, nil
}

// markDrained records the drain in the drain mark, so that a restarted
// daemon stays drained: the file exists while the host is drained.
func (d *Daemon) markDrained(drained bool) error {
	if d.drainMark == "" {
		return nil
	}
	if !drained {
		if err := os.Remove(d.drainMark); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("undrain: remove %s, which keeps the host drained across restarts: %w", d.drainMark, err)
		}
		return nil
	}
	msg := fmt.Sprintf("drained by tether host drain at %s; tether host undrain removes this file\n", time.Now().UTC().Format(time.RFC3339))
	if err := os.WriteFile(d.drainMark, []byte(msg), 0o600); err != nil {
		return fmt.Errorf("drain: record it in %s, which keeps the host drained across restarts: %w", d.drainMark, err)
	}
	return nil
}

// BGPStatus returns the speaker's state, nil when none runs.
func (d *Daemon) BGPStatus() *BGPStatus {
	d.bgpMu.Lock()
	defer d.bgpMu.Unlock()
	a := &d.ann
	if a.spk == nil && a.err == nil {
		return nil
	}
	st := &BGPStatus{Drained: a.drained, VIPs: slices.Clone(a.vips)}
	st.Peers, st.Announced = []bgp.PeerStatus{}, []string{}
	if st.VIPs == nil {
		st.VIPs = []VIPAnnouncement{}
	}
	if cfg, _ := d.snapshot(); cfg.BGP != nil {
		st.ASN, st.RouterID = cfg.BGP.ASN, cfg.BGP.RouterID.String()
	}
	if a.spk != nil {
		s, err := a.spk.Status()
		st.Status = s
		if err != nil && a.err == nil {
			st.Error = err.Error()
		}
	}
	if a.err != nil {
		st.Error = a.err.Error()
	}
	return st
}
