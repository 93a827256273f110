package control

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/health"
)

// Daemon is what `tether run` serves its API from: the configuration file,
// the Controller that applies it and the datapath that forwards. The file
// stays the source of truth: every change made through the API is written
// back to it (atomically, by renaming a complete new file over it), and
// Reload re-reads it.
//
// A change is refused whole when its input is wrong (a *RefusedError, or
// a *config.FieldError naming the field), and undone when the datapath
// fails to apply it; either way the running state and the file stay as
// they were. Its methods are safe for concurrent use; changes are applied
// one at a time. A Daemon lives as long as its datapath.
//
// After StartHealth the daemon also probes every backend of every service
// with its service's check (a health.Monitor, whose targets follow every
// change and reload; a backend shared by services with equal checks is
// probed once) and feeds the verdicts to the Controller, which takes down
// backends out of their rings. Close stops the probing.
type Daemon struct {
	path string
	ctl  *Controller
	dp   datapath.Datapath
	log  *slog.Logger

	// fixed holds the settings that take effect only at start (interfaces,
	// datapath, hash seed, tables); its services are unused.
	fixed *config.Config

	mu sync.Mutex // serialises changes and reloads

	// Health checking, from StartHealth to Close.
	mon       atomic.Pointer[health.Monitor]
	pendingMu sync.Mutex
	pending   map[health.Target]bool // transitions not yet applied
	wake      chan struct{}          // a transition is pending (capacity 1)
	stop      chan struct{}          // closed by Close
	loopDone  chan struct{}          // closed when the health loop returns
	closeOnce sync.Once
}

// NewDaemon returns the daemon of the configuration file at path. cfg is
// the configuration the datapath was created with and ctl has applied:
// its interfaces, datapath, hash seed and table sizes stay fixed for the
// life of the daemon.
func NewDaemon(path string, cfg *config.Config, ctl *Controller, dp datapath.Datapath, log *slog.Logger) *Daemon {
	return &Daemon{path: path, ctl: ctl, dp: dp, log: log, fixed: cfg.Clone()}
}

// ConfigPath returns the configuration file the daemon serves.
func (d *Daemon) ConfigPath() string { return d.path }

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
	d.pending = make(map[health.Target]bool)
	d.wake = make(chan struct{}, 1)
	d.stop = make(chan struct{})
	d.loopDone = make(chan struct{})
	mon := health.New(d.log, d.healthChanged)
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

// Close stops the health checks, if they run, and waits for them. The
// datapath stays as it is. Later calls do nothing.
func (d *Daemon) Close() {
	d.closeOnce.Do(func() {
		d.mu.Lock()
		mon := d.mon.Load()
		d.mu.Unlock()
		if mon == nil {
			return
		}
		mon.Close() // no callback runs after this
		close(d.stop)
		<-d.loopDone
	})
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

// healthLoop applies the pending transitions until Close. The Controller
// reads each target's state from the monitor when it plans, so a
// transition applied late, or twice, still ends in the monitor's verdict.
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
		todo := make([]health.Target, 0, len(d.pending))
		for t := range d.pending {
			todo = append(todo, t)
		}
		clear(d.pending)
		d.pendingMu.Unlock()
		if len(todo) == 0 {
			continue
		}
		if err := d.ctl.Refresh(todo...); err != nil {
			d.log.Error("apply a health transition; retrying", "err", err, "retry_in", healthRetry)
			d.pendingMu.Lock()
			for _, t := range todo {
				d.pending[t] = true
			}
			d.pendingMu.Unlock()
			retry.Reset(healthRetry)
		}
	}
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

// targets lists the health targets of cfg: every backend of every
// service that probes, with its service's check.
func targets(cfg *config.Config) []health.Target {
	if cfg == nil {
		return nil
	}
	var out []health.Target
	for _, s := range cfg.Services {
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

// RefusedError is a request refused because of its input. Nothing was
// changed.
type RefusedError struct {
	// Field names the argument or configuration field at fault, such as
	// "weight" or "services[1].backends[0].port"; empty when the request
	// as a whole is refused.
	Field string
	// Msg says what is wrong.
	Msg string

	named bool // Msg names the field already
}

func (e *RefusedError) Error() string {
	if e.Field == "" || e.named {
		return e.Msg
	}
	return e.Field + ": " + e.Msg
}

func refusef(field, format string, args ...any) error {
	return &RefusedError{Field: field, Msg: fmt.Sprintf(format, args...)}
}

// Result is the outcome of a change, in words for the operator.
type Result struct {
	Message string `json:"message"`
}

// Status is the running state: the datapath and every service with its
// backends.
type Status struct {
	// Config is the configuration file.
	Config string `json:"config"`
	// Datapath is the configured datapath; Interfaces the mode in force on
	// each interface ("eth0": "native").
	Datapath   string            `json:"datapath"`
	Interfaces map[string]string `json:"interfaces"`
	Services   []ServiceStatus   `json:"services"`
}

// ServiceStatus is one service as the datapath serves it.
type ServiceStatus struct {
	ID              uint32 `json:"id"`
	Name            string `json:"name"`
	VIP             string `json:"vip"` // VIP:PORT
	Protocol        string `json:"protocol"`
	Affinity        string `json:"affinity"`
	AffinityTimeout string `json:"affinity_timeout"`
	Forwarding      string `json:"forwarding"`
	// State is ServiceUp while a backend takes new connections, and
	// ServiceDown when none does (no backend, or every one down, draining
	// or of weight 0): new TCP connections are then refused with a reset
	// and UDP packets dropped, until a backend is usable again.
	State string `json:"state"`
	// Health is the service's health check and OnDown what becomes of the
	// established connections of a backend it takes down.
	Health   HealthSpec      `json:"health"`
	OnDown   string          `json:"on_down"`
	Backends []BackendStatus `json:"backends"`
}

// Service states.
const (
	ServiceUp   = "up"
	ServiceDown = "down"
)

// HealthSpec is a service's health check as the configuration file spells
// it; Type is "none" when nothing is probed.
type HealthSpec struct {
	Type         string `json:"type"`
	Path         string `json:"path,omitempty"`
	Host         string `json:"host,omitempty"`
	ExpectStatus []int  `json:"expect_status,omitempty"`
	Send         string `json:"send,omitempty"`
	Interval     string `json:"interval,omitempty"`
	Timeout      string `json:"timeout,omitempty"`
	Rise         int    `json:"rise,omitempty"`
	Fall         int    `json:"fall,omitempty"`
}

func healthSpec(c health.Check) HealthSpec {
	h := HealthSpec{Type: c.Type, Path: c.Path, Host: c.Host, Send: c.Send, Rise: c.Rise, Fall: c.Fall}
	if c.ExpectStatus != [2]int{} {
		h.ExpectStatus = c.ExpectStatus[:]
	}
	if c.Interval != 0 {
		h.Interval = c.Interval.String()
	}
	if c.Timeout != 0 {
		h.Timeout = c.Timeout.String()
	}
	return h
}

// BackendStatus is one backend of a service.
type BackendStatus struct {
	ID      uint32 `json:"id"`
	Address string `json:"address"` // ADDR:PORT
	Weight  uint32 `json:"weight"`
	// State is the state the datapath applies: "active" (in the ring),
	// "draining" (out of the ring: state draining or weight 0, whatever
	// its health) or "down" (out of the ring: its health check failed).
	State string `json:"state"`
	// Health is the verdict of the backend's health check.
	Health BackendHealth `json:"health"`
	// ActiveConnections counts the backend's flows in the connection table
	// that have not been seen closing (no FIN or RST yet). A connection
	// that ended silently stays counted until its entry is evicted.
	ActiveConnections int `json:"active_connections"`
}

// Health verdicts of a backend.
const (
	HealthUp   = "up"
	HealthDown = "down"
	// HealthUnchecked is a backend that is not probed (health type none),
	// and taken as up.
	HealthUnchecked = "unchecked"
)

// BackendHealth is what the health check of one backend has found.
type BackendHealth struct {
	// State is HealthUp, HealthDown or HealthUnchecked.
	State string `json:"state"`
	// Check is the probe as logs name it, such as "tcp://192.0.2.11:8765".
	Check string `json:"check,omitempty"`
	// Since is when the backend last changed state, or when its probing
	// began.
	Since time.Time `json:"since,omitzero"`
	// LastResult is the last probe's outcome, "ok" or why it failed
	// ("connection refused", "timeout", "status 503", "handshake: status
	// 200, want 101"...), LastLatency how long it took and LastProbe when
	// it started; empty before the first probe completes.
	LastResult  string    `json:"last_result,omitempty"`
	LastLatency string    `json:"last_latency,omitempty"`
	LastProbe   time.Time `json:"last_probe,omitzero"`
	// Probes, Failures and Transitions count the probes, the failed ones
	// and the changes between up and down since probing began (a change
	// of the service's check, or the backend's removal, starts afresh).
	Probes      uint64 `json:"probes"`
	Failures    uint64 `json:"failures"`
	Transitions uint64 `json:"transitions"`
}

// Stats are the datapath's counters by service and backend, and the
// packets passed to the kernel, dropped or answered with a reset, by
// reason.
type Stats struct {
	Services []ServiceStats `json:"services"`
	// Reasons counts the packets not forwarded, by reason: "pass_..."
	// went to the kernel, "drop_..." were dropped, "reset_..." were
	// answered with a TCP reset.
	Reasons map[string]uint64 `json:"reasons"`
}

// ServiceStats are the counters of one service; Packets and Bytes are
// the sums over its backends.
type ServiceStats struct {
	Name     string `json:"name"`
	VIP      string `json:"vip"`
	Protocol string `json:"protocol"`
	datapath.ServiceCounters
	Packets  uint64         `json:"packets"`
	Bytes    uint64         `json:"bytes"`
	Backends []BackendStats `json:"backends"`
}

// BackendStats are the counters of one backend, since it joined its
// service.
type BackendStats struct {
	Address string `json:"address"`
	datapath.BackendCounters
	// HealthProbes, HealthFailures and HealthTransitions count the
	// backend's health probes, the failed ones, and its changes between up
	// and down, since its probing began (0 when it is not probed).
	HealthProbes      uint64 `json:"health_probes"`
	HealthFailures    uint64 `json:"health_failures"`
	HealthTransitions uint64 `json:"health_transitions"`
}

// FlowStatus is one connection-table entry.
type FlowStatus struct {
	Client   string `json:"client"`
	VIP      string `json:"vip"`
	Protocol string `json:"protocol"`
	// Service is the service's name and Backend the backend's ADDR:PORT;
	// both are empty for a flow whose backend has been removed (it
	// chooses again on its next packet).
	Service string `json:"service"`
	Backend string `json:"backend"`
	// Closing is set once a FIN or RST was seen.
	Closing bool `json:"closing"`
}

// ServiceSpec is a service to add. VIP is "VIP:PORT" (a "/PROTO" suffix
// may stand for Protocol); the other fields default as in the
// configuration file, and the name to "<vip>-<port>".
type ServiceSpec struct {
	VIP             string `json:"vip"`
	Protocol        string `json:"protocol,omitempty"`
	Name            string `json:"name,omitempty"`
	Affinity        string `json:"affinity,omitempty"`
	AffinityTimeout string `json:"affinity_timeout,omitempty"`
	Forwarding      string `json:"forwarding,omitempty"`
}

// BackendSpec is a backend to add: Backend is "ADDR" or "ADDR:PORT" (the
// port defaults to the service's), Weight defaults to 1.
type BackendSpec struct {
	Service string `json:"service"`
	Backend string `json:"backend"`
	Weight  *int   `json:"weight,omitempty"`
}

// BackendStateSpec sets the state of a backend: config.StateActive or
// config.StateDraining.
type BackendStateSpec struct {
	Service string `json:"service"`
	Backend string `json:"backend"`
	State   string `json:"state"`
}

// snapshot returns the configuration and the services as applied, taken
// together.
func (d *Daemon) snapshot() (*config.Config, []datapath.Service) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.ctl.Config(), d.ctl.Services()
}

// Status returns the running state, with each backend's active
// connections counted from the connection table.
func (d *Daemon) Status() (Status, error) {
	cfg, _ := d.snapshot()
	svcs, err := d.Services("")
	if err != nil {
		return Status{}, err
	}
	return Status{Config: d.path, Datapath: cfg.Datapath, Interfaces: d.dp.Modes(), Services: svcs}, nil
}

// Services returns the services in file order, or only the one ref names
// ("VIP:PORT[/PROTO]") if ref is not empty.
func (d *Daemon) Services(ref string) ([]ServiceStatus, error) {
	cfg, applied := d.snapshot()
	services := cfg.Services
	if ref != "" {
		r, err := parseServiceRef(ref, "service")
		if err != nil {
			return nil, err
		}
		i, err := findService(cfg, r, "service")
		if err != nil {
			return nil, err
		}
		services = services[i : i+1]
	}
	flows, err := d.dp.Flows()
	if err != nil {
		return nil, fmt.Errorf("read the connection table: %w", err)
	}
	type idPair struct{ svc, be uint32 }
	active := map[idPair]int{}
	for _, f := range flows {
		if !f.Closing {
			active[idPair{f.Service, f.Backend}]++
		}
	}
	byKey := appliedByKey(applied)
	out := make([]ServiceStatus, 0, len(services))
	for _, cs := range services {
		s := ServiceStatus{
			Name:            cs.Name,
			VIP:             netip.AddrPortFrom(cs.VIP, cs.Port).String(),
			Protocol:        cs.Protocol,
			Affinity:        cs.Affinity,
			AffinityTimeout: cs.AffinityTimeout.String(),
			Forwarding:      cs.Forwarding,
			State:           ServiceDown,
			Health:          healthSpec(cs.Health),
			OnDown:          cs.OnDown,
			Backends:        []BackendStatus{},
		}
		as, ok := byKey[cs.Key()]
		if ok {
			s.ID = as.ID
		}
		if Usable(as) {
			s.State = ServiceUp
		}
		for _, b := range as.Backends {
			s.Backends = append(s.Backends, BackendStatus{
				ID:                b.ID,
				Address:           netip.AddrPortFrom(b.Addr, b.Port).String(),
				Weight:            b.Weight,
				State:             b.State.String(),
				Health:            d.backendHealth(cs, config.Backend{Address: b.Addr, Port: b.Port}),
				ActiveConnections: active[idPair{as.ID, b.ID}],
			})
		}
		out = append(out, s)
	}
	return out, nil
}

// appliedByKey indexes applied services by their configuration key.
func appliedByKey(applied []datapath.Service) map[string]datapath.Service {
	m := make(map[string]datapath.Service, len(applied))
	for _, s := range applied {
		m[netip.AddrPortFrom(s.VIP, s.Port).String()+"/"+protoName(s.Proto)] = s
	}
	return m
}

// Stats reads the datapath's counters.
func (d *Daemon) Stats() (Stats, error) {
	cfg, applied := d.snapshot()
	c, err := d.dp.Counters()
	if err != nil {
		return Stats{}, fmt.Errorf("read counters: %w", err)
	}
	byKey := appliedByKey(applied)
	out := Stats{Services: []ServiceStats{}, Reasons: c.Reasons}
	if out.Reasons == nil {
		out.Reasons = map[string]uint64{}
	}
	for _, cs := range cfg.Services {
		as := byKey[cs.Key()]
		s := ServiceStats{
			Name:            cs.Name,
			VIP:             netip.AddrPortFrom(cs.VIP, cs.Port).String(),
			Protocol:        cs.Protocol,
			ServiceCounters: c.Services[as.ID],
			Backends:        []BackendStats{},
		}
		for _, b := range as.Backends {
			bc := c.Backends[b.ID]
			s.Packets += bc.Packets
			s.Bytes += bc.Bytes
			h := d.backendHealth(cs, config.Backend{Address: b.Addr, Port: b.Port})
			s.Backends = append(s.Backends, BackendStats{
				Address:           netip.AddrPortFrom(b.Addr, b.Port).String(),
				BackendCounters:   bc,
				HealthProbes:      h.Probes,
				HealthFailures:    h.Failures,
				HealthTransitions: h.Transitions,
			})
		}
		out.Services = append(out.Services, s)
	}
	return out, nil
}

// Flows lists the connection table, or only the flows to the service ref
// names if ref is not empty, sorted by VIP and client.
func (d *Daemon) Flows(ref string) ([]FlowStatus, error) {
	cfg, applied := d.snapshot()
	var r serviceRef
	if ref != "" {
		var err error
		if r, err = parseServiceRef(ref, "service"); err != nil {
			return nil, err
		}
		i, err := findService(cfg, r, "service")
		if err != nil {
			return nil, err
		}
		r.Proto = cfg.Services[i].Protocol
	}
	flows, err := d.dp.Flows()
	if err != nil {
		return nil, fmt.Errorf("read the connection table: %w", err)
	}
	type backend struct{ service, addr string }
	names := map[[2]uint32]backend{}
	for _, s := range applied {
		for _, b := range s.Backends {
			names[[2]uint32{s.ID, b.ID}] = backend{s.Name, netip.AddrPortFrom(b.Addr, b.Port).String()}
		}
	}
	sort.Slice(flows, func(i, j int) bool {
		a, b := flows[i], flows[j]
		if c := a.VIP.Compare(b.VIP); c != 0 {
			return c < 0
		}
		if a.Proto != b.Proto {
			return a.Proto < b.Proto
		}
		return a.Client.Compare(b.Client) < 0
	})
	out := []FlowStatus{}
	for _, f := range flows {
		if ref != "" && (f.VIP != netip.AddrPortFrom(r.VIP, r.Port) || protoName(f.Proto) != r.Proto) {
			continue
		}
		be := names[[2]uint32{f.Service, f.Backend}]
		out = append(out, FlowStatus{
			Client:   f.Client.String(),
			VIP:      f.VIP.String(),
			Protocol: protoName(f.Proto),
			Service:  be.service,
			Backend:  be.addr,
			Closing:  f.Closing,
		})
	}
	return out, nil
}

// AddService adds a service without backends.
func (d *Daemon) AddService(spec ServiceSpec) (Result, error) {
	ref, err := parseServiceRef(spec.VIP, "vip")
	if err != nil {
		return Result{}, err
	}
	s := config.Service{
		Name:            spec.Name,
		VIP:             ref.VIP,
		Port:            ref.Port,
		Protocol:        config.ProtocolTCP,
		Affinity:        config.AffinitySource,
		AffinityTimeout: config.DefaultAffinityTimeout,
		Forwarding:      config.ForwardingDSR,
		Health:          config.DefaultHealth(),
		OnDown:          config.OnDownKeep,
	}
	switch {
	case ref.Proto != "" && spec.Protocol != "" && ref.Proto != spec.Protocol:
		return Result{}, refusef("protocol", "%q contradicts the protocol %s of %s", spec.Protocol, ref.Proto, spec.VIP)
	case spec.Protocol != "":
		s.Protocol = spec.Protocol
	case ref.Proto != "":
		s.Protocol = ref.Proto
	}
	if spec.Affinity != "" {
		s.Affinity = spec.Affinity
	}
	if spec.Forwarding != "" {
		s.Forwarding = spec.Forwarding
	}
	if spec.AffinityTimeout != "" {
		if s.AffinityTimeout, err = time.ParseDuration(spec.AffinityTimeout); err != nil {
			return Result{}, refusef("affinity_timeout", "%q is not a duration (want a number and a unit, such as 90s, 30m or 3h)", spec.AffinityTimeout)
		}
	}
	if s.Name == "" {
		s.Name = strings.ReplaceAll(s.VIP.String(), ":", "-") + "-" + fmt.Sprint(s.Port)
		if s.Protocol != config.ProtocolTCP {
			s.Name += "-" + s.Protocol
		}
	}
	err = d.change("add service "+s.Key(), func(cfg *config.Config) error {
		for _, o := range cfg.Services {
			if o.Key() == s.Key() {
				return refusef("vip", "%s is already the service %s", s.Key(), o.Name)
			}
			if o.Name == s.Name {
				return refusef("name", "%q is already the name of %s", s.Name, o.Key())
			}
		}
		cfg.Services = append(cfg.Services, s)
		return nil
	})
	if err != nil {
		return Result{}, err
	}
	return Result{Message: fmt.Sprintf("added service %s (%s), with no backends yet", s.Name, s.Key())}, nil
}

// RemoveService removes the service ref names, with its backends. Their
// flows are no longer forwarded.
func (d *Daemon) RemoveService(ref string) (Result, error) {
	r, err := parseServiceRef(ref, "service")
	if err != nil {
		return Result{}, err
	}
	var gone config.Service
	err = d.change("remove service "+ref, func(cfg *config.Config) error {
		i, err := findService(cfg, r, "service")
		if err != nil {
			return err
		}
		gone = cfg.Services[i]
		cfg.Services = slices.Delete(cfg.Services, i, i+1)
		return nil
	})
	if err != nil {
		return Result{}, err
	}
	return Result{Message: fmt.Sprintf("removed service %s (%s) and its %d backends", gone.Name, gone.Key(), len(gone.Backends))}, nil
}

// AddBackend adds an active backend to a service.
func (d *Daemon) AddBackend(spec BackendSpec) (Result, error) {
	r, err := parseServiceRef(spec.Service, "service")
	if err != nil {
		return Result{}, err
	}
	weight := uint32(1)
	if spec.Weight != nil {
		if *spec.Weight < 0 || *spec.Weight > config.MaxWeight {
			return Result{}, refusef("weight", "%d is out of range 0..%d", *spec.Weight, config.MaxWeight)
		}
		weight = uint32(*spec.Weight)
	}
	var msg string
	err = d.change("add backend "+spec.Backend+" to "+spec.Service, func(cfg *config.Config) error {
		i, err := findService(cfg, r, "service")
		if err != nil {
			return err
		}
		s := &cfg.Services[i]
		addr, port, err := parseBackendRef(spec.Backend, s.Port, "backend")
		if err != nil {
			return err
		}
		b := config.Backend{Address: addr, Port: port, Weight: weight, State: config.StateActive}
		if _, err := findBackend(s, addr, port, "backend"); err == nil {
			return refusef("backend", "%s is already a backend of %s (%s)", b.Key(), s.Name, s.Key())
		}
		s.Backends = append(s.Backends, b)
		msg = fmt.Sprintf("added backend %s to %s (%s), weight %d", b.Key(), s.Name, s.Key(), weight)
		return nil
	})
	if err != nil {
		return Result{}, err
	}
	return Result{Message: msg}, nil
}

// RemoveBackend removes a backend from a service. Its flows choose a
// backend again on their next packet (a TCP connection usually breaks).
func (d *Daemon) RemoveBackend(service, backend string) (Result, error) {
	r, err := parseServiceRef(service, "service")
	if err != nil {
		return Result{}, err
	}
	var msg string
	err = d.change("remove backend "+backend+" from "+service, func(cfg *config.Config) error {
		i, err := findService(cfg, r, "service")
		if err != nil {
			return err
		}
		s := &cfg.Services[i]
		addr, port, err := parseBackendRef(backend, s.Port, "backend")
		if err != nil {
			return err
		}
		j, err := findBackend(s, addr, port, "backend")
		if err != nil {
			return err
		}
		msg = fmt.Sprintf("removed backend %s from %s (%s)", s.Backends[j].Key(), s.Name, s.Key())
		s.Backends = slices.Delete(s.Backends, j, j+1)
		return nil
	})
	if err != nil {
		return Result{}, err
	}
	return Result{Message: msg}, nil
}

// SetBackendState drains a backend (config.StateDraining: it keeps its
// connections and takes no new ones) or makes it active again.
func (d *Daemon) SetBackendState(spec BackendStateSpec) (Result, error) {
	r, err := parseServiceRef(spec.Service, "service")
	if err != nil {
		return Result{}, err
	}
	if spec.State != config.StateActive && spec.State != config.StateDraining {
		return Result{}, refusef("state", "unknown state %q (want active or draining)", spec.State)
	}
	var msg string
	err = d.change("set backend "+spec.Backend+" of "+spec.Service+" "+spec.State, func(cfg *config.Config) error {
		i, err := findService(cfg, r, "service")
		if err != nil {
			return err
		}
		s := &cfg.Services[i]
		addr, port, err := parseBackendRef(spec.Backend, s.Port, "backend")
		if err != nil {
			return err
		}
		j, err := findBackend(s, addr, port, "backend")
		if err != nil {
			return err
		}
		b := &s.Backends[j]
		switch {
		case b.State == spec.State:
			msg = fmt.Sprintf("backend %s of %s (%s) is already %s", b.Key(), s.Name, s.Key(), spec.State)
		case spec.State == config.StateDraining:
			msg = fmt.Sprintf("backend %s of %s (%s) is draining: it keeps its connections and takes no new ones; `tether backend ls %s` shows when it has none left",
				b.Key(), s.Name, s.Key(), s.Key())
		case b.Weight == 0:
			msg = fmt.Sprintf("backend %s of %s (%s) is active, but its weight 0 keeps it out of the ring", b.Key(), s.Name, s.Key())
		default:
			msg = fmt.Sprintf("backend %s of %s (%s) is active again", b.Key(), s.Name, s.Key())
		}
		b.State = spec.State
		return nil
	})
	if err != nil {
		return Result{}, err
	}
	return Result{Message: msg}, nil
}

// Reload re-reads the configuration file and applies what changed. A file
// that does not load, or that changes a setting fixed at start, is refused
// whole; a change the datapath fails to apply is undone. It logs
// "reloaded" on success, so that SIGHUP and the API report alike.
func (d *Daemon) Reload() (Result, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	res, err := d.reload()
	var refused *RefusedError
	switch {
	case err == nil:
		d.log.Info("reloaded", "config", d.path, "services", len(d.ctl.Config().Services))
	case errors.As(err, &refused):
		d.log.Error("reload refused; running state unchanged", "err", err)
	default:
		d.log.Error("reload failed", "err", err)
	}
	return res, err
}

func (d *Daemon) reload() (Result, error) {
	next, err := config.Load(d.path)
	if err != nil {
		return Result{}, refused(err)
	}
	if err := d.checkFixed(next); err != nil {
		return Result{}, err
	}
	cur := d.ctl.Config()
	if err := d.apply(cur, next); err != nil {
		return Result{}, err
	}
	return Result{Message: fmt.Sprintf("reloaded %s: %d services", d.path, len(next.Services))}, nil
}

// checkFixed refuses a configuration that changes a setting taking effect
// only at start.
func (d *Daemon) checkFixed(next *config.Config) error {
	const restart = "takes effect only at start; restart tether to change it"
	f := d.fixed
	switch {
	case !slices.Equal(next.Interfaces, f.Interfaces):
		return refusef("interfaces", "%v differs from the running %v: the interface list %s", next.Interfaces, f.Interfaces, restart)
	case next.Datapath != f.Datapath:
		return refusef("datapath", "%q differs from the running %q: the datapath %s", next.Datapath, f.Datapath, restart)
	case next.HashSeed != f.HashSeed:
		return refusef("hash_seed", "0x%08x differs from the running 0x%08x: the hash seed %s", next.HashSeed, f.HashSeed, restart)
	}
	n, r := next.Tables, f.Tables
	for _, t := range []struct {
		name       string
		next, runs uint32
	}{
		{"connections", n.Connections, r.Connections},
		{"affinity", n.Affinity, r.Affinity},
		{"ring_size", n.RingSize, r.RingSize},
		{"max_services", n.MaxServices, r.MaxServices},
		{"max_backends", n.MaxBackends, r.MaxBackends},
	} {
		if t.next != t.runs {
			return refusef("tables."+t.name, "%d differs from the running %d: table sizes take effect only at start; restart tether to change them", t.next, t.runs)
		}
	}
	return nil
}

// refused marks a configuration error as refused input, naming the first
// field at fault.
func refused(err error) error {
	var fe *config.FieldError
	if errors.As(err, &fe) {
		return &RefusedError{Field: fe.Path, Msg: err.Error(), named: true}
	}
	return &RefusedError{Msg: err.Error()}
}

// change applies edit to a copy of the running configuration, validates
// the result whole, writes it to a temporary file beside the
// configuration file, applies it, and renames the temporary file over the
// configuration file. A refused or failed change leaves the running state
// and the file as they were.
func (d *Daemon) change(what string, edit func(*config.Config) error) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	cur := d.ctl.Config()
	if err := d.checkFile(cur); err != nil {
		return err
	}
	next := cur.Clone()
	if err := edit(next); err != nil {
		return err
	}
	if err := next.Validate(); err != nil {
		return refused(err)
	}
	data, err := next.Marshal()
	if err != nil {
		return err
	}
	if old, err := cur.Marshal(); err == nil && bytes.Equal(old, data) {
		return nil // nothing to do
	}
	target, err := filepath.EvalSymlinks(d.path)
	if err != nil {
		return fmt.Errorf("write %s: %w", d.path, err)
	}
	tmp, err := writeTemp(target, data)
	if err != nil {
		return err
	}
	if err := d.apply(cur, next); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, target); err != nil {
		os.Remove(tmp)
		err = fmt.Errorf("replace %s: %w", target, err)
		defer d.syncTargets()
		return errors.Join(err, d.rollback(cur, err))
	}
	syncDir(filepath.Dir(target))
	d.log.Info("configuration changed", "change", what, "config", d.path)
	return nil
}

// apply applies next, and on failure applies cur again so that the
// running state is what it was. The health checks follow what runs.
func (d *Daemon) apply(cur, next *config.Config) error {
	defer d.syncTargets()
	err := d.ctl.Apply(next)
	if err == nil {
		return nil
	}
	var fe *config.FieldError
	if errors.As(err, &fe) {
		return refused(err)
	}
	err = fmt.Errorf("apply: %w", err)
	if rerr := d.rollback(cur, err); rerr != nil {
		return errors.Join(err, rerr)
	}
	return fmt.Errorf("%w; the running state is unchanged", err)
}

// rollback applies cur again after a failed change.
func (d *Daemon) rollback(cur *config.Config, cause error) error {
	if err := d.ctl.Apply(cur); err != nil {
		d.log.Error("undo of a failed change failed: the running state differs from the configuration file; run tether reload",
			"cause", cause, "err", err)
		return fmt.Errorf("undo the change: %w (the running state differs from %s; run tether reload)", err, d.path)
	}
	return nil
}

// checkFile refuses a change made through the API while the
// configuration file holds something else than the running configuration
// (an edit not reloaded yet), which writing the file would lose.
func (d *Daemon) checkFile(cur *config.Config) error {
	onDisk, err := config.Load(d.path)
	if err != nil {
		return refusef("config", "%s no longer holds the running configuration (%v): fix it and run tether reload, or restore it, before changing the configuration through tether", d.path, err)
	}
	a, err1 := onDisk.Marshal()
	b, err2 := cur.Marshal()
	if err1 != nil || err2 != nil || !bytes.Equal(a, b) {
		return refusef("config", "%s was edited since tether last read it: run tether reload to apply the edit (or undo it) first, as this change would overwrite it", d.path)
	}
	return nil
}

// writeTemp writes data to a new file beside target, with target's mode
// and owner, and syncs it. It returns the new file's path.
func writeTemp(target string, data []byte) (string, error) {
	fi, err := os.Stat(target)
	if err != nil {
		return "", fmt.Errorf("write %s: %w", target, err)
	}
	f, err := os.CreateTemp(filepath.Dir(target), "."+filepath.Base(target)+".tmp-*")
	if err != nil {
		return "", fmt.Errorf("write %s: %w", target, err)
	}
	fail := func(err error) (string, error) {
		f.Close()
		os.Remove(f.Name())
		return "", fmt.Errorf("write %s: %w", f.Name(), err)
	}
	if err := f.Chmod(fi.Mode().Perm()); err != nil {
		return fail(err)
	}
	if st, ok := fileOwner(fi); ok {
		_ = f.Chown(st.uid, st.gid) // best effort: keep the owner when allowed
	}
	if _, err := f.Write(data); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		os.Remove(f.Name())
		return "", fmt.Errorf("write %s: %w", f.Name(), err)
	}
	return f.Name(), nil
}

// syncDir makes a rename in dir durable; failure only weakens durability.
func syncDir(dir string) {
	if f, err := os.Open(dir); err == nil {
		_ = f.Sync()
		f.Close()
	}
}

type owner struct{ uid, gid int }

// fileOwner returns the owner of a file, where the system says.
func fileOwner(fi os.FileInfo) (owner, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return owner{}, false
	}
	return owner{int(st.Uid), int(st.Gid)}, true
}

// Tables says how full the datapath's tables are: the XDP connection and
// affinity tables with their capacities, or, for a datapath that cannot
// say (the splice proxy), its connections counted from its flows, without
// a capacity. Counting walks the tables (in batches for XDP), so it costs
// tens of milliseconds with a million entries.
func (d *Daemon) Tables() ([]datapath.Table, error) {
	if tr, ok := d.dp.(datapath.TableReader); ok {
		t, err := tr.Tables()
		if err != nil {
			return nil, fmt.Errorf("count table entries: %w", err)
		}
		return t, nil
	}
	flows, err := d.dp.Flows()
	if err != nil {
		return nil, fmt.Errorf("read the connection table: %w", err)
	}
	return []datapath.Table{{Name: "connections", Entries: len(flows)}}, nil
}
