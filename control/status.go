package control

import (
	"fmt"
	"net/netip"
	"sort"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/health"
)

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
	// BGP is the BGP speaker's sessions and announcements, when one runs.
	BGP *BGPStatus `json:"bgp,omitempty"`
	// Sync is the sharing of entries with the other hosts, when the
	// configuration has a sync block.
	Sync *SyncStatus `json:"sync,omitempty"`
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
// it, durations as "2s"; Type is "none" when nothing is probed. Status
// reports checks in it, and ServiceSpec takes one in it (fields left out
// take their defaults, as in the file).
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
	Via          string `json:"via,omitempty"`
}

func healthSpec(c health.Check) HealthSpec {
	h := HealthSpec{Type: c.Type, Path: c.Path, Host: c.Host, Send: c.Send, Rise: c.Rise, Fall: c.Fall, Via: c.Via}
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
	// its health) or "down" (out of the ring: its health check failed, or
	// the datapath cannot reach it).
	State string `json:"state"`
	// Unreachable says why the datapath cannot reach the backend (the XDP
	// datapath: no answer to ARP/ND), when it cannot: it is down until it
	// answers, whatever its health check says.
	Unreachable string `json:"unreachable,omitempty"`
	// Health is the verdict of the backend's health check.
	Health BackendHealth `json:"health"`
	// ActiveConnections counts the backend's open flows in the connection
	// table (not seen closing: no FIN or RST yet) that sent a packet
	// within the service's idle_after. IdleConnections counts those open
	// and quieter, on a backend that is not down. LostConnections counts
	// those of a down backend whose clients went quiet or, since, sent
	// from a connection to another backend of the service, and, with
	// source affinity, the quiet ones of an active backend whose clients
	// have since sent to another (see countFlows): with direct server
	// return a connection that died with its backend ends without a FIN
	// tether could see.
	ActiveConnections int `json:"active_connections"`
	IdleConnections   int `json:"idle_connections"`
	LostConnections   int `json:"lost_connections"`
	// Drain is the backend's paced drain: a draining backend whose
	// remaining connections close at a given time and rate.
	Drain *DrainStatus `json:"drain,omitempty"`
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
	// Unrecorded counts the packets of new flows forwarded without being
	// recorded: a CPU had recorded tables.insert_rate new flows that
	// second (XDP's insertion guard).
	Unrecorded uint64 `json:"unrecorded"`
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
	// Idle is how long ago the flow's last packet came, to about a second
	// with XDP ("0s" within the last second, or unknown).
	Idle string `json:"idle"`
}

// Status returns the running state, with each backend's active
// connections counted from the connection table.
func (d *Daemon) Status() (Status, error) {
	cfg, _ := d.snapshot()
	svcs, err := d.Services("")
	if err != nil {
		return Status{}, err
	}
	return Status{Config: d.path, Datapath: cfg.Datapath, Interfaces: d.dp.Modes(), Services: svcs, BGP: d.BGPStatus(), Sync: d.SyncStatus()}, nil
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
	counts := countFlows(flows, cfg, applied)
	byKey := appliedByKey(applied)
	unreachable := d.ctl.Unreachable()
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
			Health:          healthSpec(cs.Check()),
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
				Unreachable:       unreachable[b.Addr],
				ActiveConnections: counts[idPair{as.ID, b.ID}].active,
				IdleConnections:   counts[idPair{as.ID, b.ID}].idle,
				LostConnections:   counts[idPair{as.ID, b.ID}].lost,
			})
			if cb, ok := configBackend(cs, b.Addr, b.Port); ok {
				s.Backends[len(s.Backends)-1].Drain = d.drainStatus(as.ID, b.ID, cb)
			}
		}
		out = append(out, s)
	}
	return out, nil
}

// idPair names a backend of a service by their ids.
type idPair struct{ svc, be uint32 }

// flowCounts are a backend's open connections (BackendStatus).
type flowCounts struct{ active, idle, lost int }

// countFlows counts the open flows of each backend of the applied
// services: those not seen closing, and not another host's (sync) that
// never reached this one. A flow quiet for the service's idle_after is
// idle, or lost on a down backend; so is a flow of a down backend whose
// client has since sent on a connection to another backend of the
// service. With source affinity, a flow quiet for movedAfter whose client
// has since sent to another backend is lost on an active backend too:
// the client moved, which it does only when its backend went down or
// was drained, and a backend that died and came back holds only the
// entries of the connections it lost. A live connection that was merely
// quiet counts as active again at its next packet. Draining backends
// keep such flows: their clients may well still hold them.
func countFlows(flows []datapath.Flow, cfg *config.Config, applied []datapath.Service) map[idPair]flowCounts {
	quiet := map[uint32]time.Duration{}
	source := map[uint32]bool{}
	byKey := appliedByKey(applied)
	for _, cs := range cfg.Services {
		if as, ok := byKey[cs.Key()]; ok {
			quiet[as.ID] = cs.QuietAfter()
			source[as.ID] = cs.Affinity == config.AffinitySource
		}
	}
	state := map[idPair]datapath.State{}
	for _, as := range applied {
		for _, b := range as.Backends {
			state[idPair{as.ID, b.ID}] = b.State
		}
	}
	type client struct {
		svc  uint32
		addr netip.Addr
	}
	// The latest packet of each client on each backend that is not down.
	type seen struct {
		backend uint32
		idle    time.Duration
	}
	latest := map[client][]seen{}
	for _, f := range flows {
		if f.Closing || f.Learned || state[idPair{f.Service, f.Backend}] == datapath.Down {
			continue
		}
		c := client{f.Service, f.Client.Addr()}
		found := false
		for i, s := range latest[c] {
			if s.backend == f.Backend {
				latest[c][i].idle = min(s.idle, f.Idle)
				found = true
			}
		}
		if !found {
			latest[c] = append(latest[c], seen{f.Backend, f.Idle})
		}
	}
	// elsewhere: the client has since sent to another backend.
	elsewhere := func(f datapath.Flow) bool {
		for _, s := range latest[client{f.Service, f.Client.Addr()}] {
			if s.backend != f.Backend && s.idle < f.Idle {
				return true
			}
		}
		return false
	}
	out := map[idPair]flowCounts{}
	for _, f := range flows {
		if f.Closing || f.Learned {
			continue
		}
		k := idPair{f.Service, f.Backend}
		q := quiet[f.Service]
		if q == 0 {
			q = config.DefaultIdleAfter
		}
		n := out[k]
		switch st := state[k]; {
		case st == datapath.Down && (f.Idle >= q || elsewhere(f)):
			n.lost++
		case st == datapath.Active && source[f.Service] && f.Idle >= movedAfter && elsewhere(f):
			n.lost++
		case st != datapath.Down && f.Idle >= q:
			n.idle++
		default:
			n.active++
		}
		out[k] = n
	}
	return out
}

// movedAfter is how quiet a flow of an active backend must be to count as
// lost once its client sent elsewhere: two units of the XDP program's
// clock, so that a connection that sends every second never does.
const movedAfter = 2 << 30

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
	out := Stats{Services: []ServiceStats{}, Reasons: c.Reasons, Unrecorded: c.Unrecorded}
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
			Idle:     f.Idle.Round(time.Second).String(),
		})
	}
	return out, nil
}
