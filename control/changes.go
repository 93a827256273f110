package control

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/health"
)

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

// Result is the outcome of a change, in words for the operator, and for a
// reload what it changed (or would change).
type Result struct {
	Message string   `json:"message"`
	Changes *Changes `json:"changes,omitempty"`
}

// ServiceSpec is a service to add. VIP is "VIP:PORT" (a "/PROTO" suffix
// may stand for Protocol); the other fields default as in the
// configuration file, and the name to "<vip>-<port>".
type ServiceSpec struct {
	VIP             string      `json:"vip"`
	Protocol        string      `json:"protocol,omitempty"`
	Name            string      `json:"name,omitempty"`
	Affinity        string      `json:"affinity,omitempty"`
	AffinityTimeout string      `json:"affinity_timeout,omitempty"`
	Forwarding      string      `json:"forwarding,omitempty"`
	SNATAddress     string      `json:"snat_address,omitempty"`
	TunnelSource    string      `json:"tunnel_source,omitempty"`
	GUEPort         uint16      `json:"gue_port,omitempty"`
	Health          *HealthSpec `json:"health,omitempty"`
	OnDown          string      `json:"on_down,omitempty"`
	ICMPEcho        string      `json:"icmp_echo,omitempty"`
}

// sent says which of the configuration's fields of a service the request
// gave, by the names the file and the API share.
func (spec ServiceSpec) sent() map[string]bool {
	return map[string]bool{
		"vip": true, "port": true, "protocol": spec.Protocol != "", "name": spec.Name != "",
		"affinity": spec.Affinity != "", "affinity_timeout": spec.AffinityTimeout != "",
		"forwarding": spec.Forwarding != "", "snat_address": spec.SNATAddress != "",
		"tunnel_source": spec.TunnelSource != "", "gue_port": spec.GUEPort != 0,
		"health": spec.Health != nil, "on_down": spec.OnDown != "", "icmp_echo": spec.ICMPEcho != "",
	}
}

// narrow turns the refusal of a configuration to which a request added
// services[i] into the problems of the fields the request gave:
// "services[i].protocol" becomes "protocol", and a problem of a field it
// did not give (the name made of a bad protocol) is left out while another
// explains the refusal. Problems elsewhere (too many services) stay.
func narrow(err error, i int, sent map[string]bool) error {
	prefix := fmt.Sprintf("services[%d]", i)
	var kept []*config.FieldError
	var first *config.FieldError
	for _, e := range unjoin(err) {
		var fe *config.FieldError
		if !errors.As(e, &fe) {
			continue
		}
		if first == nil {
			first = fe
		}
		if fe.Path != prefix && !strings.HasPrefix(fe.Path, prefix+".") {
			kept = append(kept, fe)
			continue
		}
		field := strings.TrimPrefix(strings.TrimPrefix(fe.Path, prefix), ".")
		if top, _, _ := strings.Cut(field, "."); sent[top] || field == "" {
			c := *fe
			c.Path, c.Line, c.File = field, 0, ""
			kept = append(kept, &c)
		}
	}
	if len(kept) == 0 {
		if first == nil {
			return refused(err)
		}
		kept = append(kept, first)
	}
	msgs := make([]string, len(kept))
	for k, fe := range kept {
		msgs[k] = fe.Path + ": " + fe.Msg
		if fe.Path == "" {
			msgs[k] = fe.Msg
		}
	}
	return &RefusedError{Field: kept[0].Path, Msg: strings.Join(msgs, "; "), named: true}
}

// unjoin returns the errors errors.Join joined into err, or err alone.
func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// check turns h, as a request gives it, into a health check as the file's
// decoder does: defaults
// applied (none has no other field), durations read with
// config.ParseDuration; the configuration's validation judges the rest.
func (h *HealthSpec) check() (health.Check, error) {
	c := health.Check{Type: h.Type, Path: h.Path, Host: h.Host, Send: h.Send, Rise: h.Rise, Fall: h.Fall, Via: h.Via}
	switch len(h.ExpectStatus) {
	case 0:
	case 1:
		c.ExpectStatus = [2]int{h.ExpectStatus[0], h.ExpectStatus[0]}
	case 2:
		c.ExpectStatus = [2]int{h.ExpectStatus[0], h.ExpectStatus[1]}
	default:
		return c, refusef("health.expect_status", "a list of %d statuses; want an HTTP status such as 200, or a range such as [200, 399]", len(h.ExpectStatus))
	}
	for _, d := range []struct {
		field string
		in    string
		out   *time.Duration
	}{{"health.interval", h.Interval, &c.Interval}, {"health.timeout", h.Timeout, &c.Timeout}} {
		if d.in == "" {
			continue
		}
		v, err := config.ParseDuration(d.in)
		if err != nil {
			return c, refusef(d.field, "%v", err)
		}
		if v <= 0 {
			return c, refusef(d.field, "%s: must be more than 0", d.in)
		}
		*d.out = v
	}
	if c.Type == config.HealthNone {
		return c, nil
	}
	return c.Defaults(), nil
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
	// CloseIn, with state draining, closes the backend's remaining
	// connections that long from now (a duration such as "30m"; "0s":
	// now), CloseRate of them a second (0: config.DefaultCloseRate): a
	// paced drain. Empty keeps the close time the backend has, if any.
	CloseIn   string `json:"close_in,omitempty"`
	CloseRate int    `json:"close_rate,omitempty"`
}

// AddService adds a service without backends.
func (d *Daemon) AddService(spec ServiceSpec) (Result, error) {
	ref, err := parseServiceRef(spec.VIP, "vip")
	if err != nil {
		return Result{}, err
	}
	s := config.DefaultService()
	s.Name, s.VIP, s.Port = spec.Name, ref.VIP, ref.Port
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
	if spec.SNATAddress != "" {
		if s.SNATAddress, err = netip.ParseAddr(spec.SNATAddress); err != nil {
			return Result{}, refusef("snat_address", "%q is not an IP address", spec.SNATAddress)
		}
	}
	if spec.TunnelSource != "" {
		if s.TunnelSource, err = config.ParsePrefix(spec.TunnelSource); err != nil {
			return Result{}, refusef("tunnel_source", "%v", err)
		}
	}
	if spec.GUEPort != 0 {
		s.GUEPort = spec.GUEPort
	}
	if spec.AffinityTimeout != "" {
		if s.AffinityTimeout, err = config.ParseDuration(spec.AffinityTimeout); err != nil {
			return Result{}, refusef("affinity_timeout", "%v", err)
		}
	}
	s.Health = config.DefaultHealthFor(s.Protocol)
	if spec.Health != nil {
		if s.Health, err = spec.Health.check(); err != nil {
			return Result{}, err
		}
	}
	if spec.OnDown != "" {
		s.OnDown = spec.OnDown
	}
	if spec.ICMPEcho != "" {
		s.ICMPEcho = spec.ICMPEcho
	}
	if s.Name == "" {
		s.Name = strings.ReplaceAll(s.VIP.String(), ":", "-") + "-" + fmt.Sprint(s.Port)
		if s.Protocol != config.ProtocolTCP {
			s.Name += "-" + s.Protocol
		}
	}

	err = d.change("add service "+s.Key(), func(cfg *config.Config) (span, error) {
		for _, o := range cfg.Services {
			if o.Key() == s.Key() {
				return span{}, refusef("vip", "%s is already the service %s", s.Key(), o.Name)
			}
			if o.Name == s.Name {
				return span{}, refusef("name", "%q is already the name of %s", s.Name, o.Key())
			}
		}
		n := len(cfg.Services)
		cfg.Services = append(cfg.Services, s)
		// Judge the service by the fields the request gave: a bad
		// protocol is refused as the protocol, not as the name made of it.
		if err := cfg.ValidateEdit(n, n+1); err != nil {
			return span{}, narrow(err, n, spec.sent())
		}
		return span{n, n, n + 1}, nil
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
	err = d.change("remove service "+ref, func(cfg *config.Config) (span, error) {
		i, err := findService(cfg, r, "service")
		if err != nil {
			return span{}, err
		}
		gone = cfg.Services[i]
		cfg.Services = slices.Delete(cfg.Services, i, i+1)
		return span{i, i + 1, i}, nil
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
	err = d.change("add backend "+spec.Backend+" to "+spec.Service, func(cfg *config.Config) (span, error) {
		i, s, addr, port, err := serviceBackend(cfg, r, spec.Backend)
		if err != nil {
			return span{}, err
		}
		b := config.Backend{Address: addr, Port: port, Weight: weight, State: config.StateActive}
		if _, err := findBackend(s, addr, port, "backend"); err == nil {
			return span{}, refusef("backend", "%s is already a backend of %s (%s)", b.Key(), s.Name, s.Key())
		}
		s.Backends = append(s.Backends, b)
		msg = fmt.Sprintf("added backend %s to %s (%s), weight %d", b.Key(), s.Name, s.Key(), weight)
		return span{i, i + 1, i + 1}, nil
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
	err = d.change("remove backend "+backend+" from "+service, func(cfg *config.Config) (span, error) {
		i, s, addr, port, err := serviceBackend(cfg, r, backend)
		if err != nil {
			return span{}, err
		}
		j, err := findBackend(s, addr, port, "backend")
		if err != nil {
			return span{}, err
		}
		msg = fmt.Sprintf("removed backend %s from %s (%s)", s.Backends[j].Key(), s.Name, s.Key())
		s.Backends = slices.Delete(s.Backends, j, j+1)
		return span{i, i + 1, i + 1}, nil
	})
	if err != nil {
		return Result{}, err
	}
	return Result{Message: msg}, nil
}

// BackendWeightSpec changes the weight of a backend in place (ipvsadm -e).
type BackendWeightSpec struct {
	Service string `json:"service"`
	Backend string `json:"backend"`
	Weight  *int   `json:"weight"`
}

// SetBackendWeight changes a backend's weight in place: its share of the
// ring, hence of new clients, follows; its established connections stay.
// Weight 0 takes it out of the ring, as draining does.
func (d *Daemon) SetBackendWeight(spec BackendWeightSpec) (Result, error) {
	if spec.Weight == nil {
		return Result{}, refusef("weight", "missing")
	}
	if *spec.Weight < 0 || *spec.Weight > config.MaxWeight {
		return Result{}, refusef("weight", "%d is out of range 0..%d", *spec.Weight, config.MaxWeight)
	}
	weight := uint32(*spec.Weight)
	what := fmt.Sprintf("set the weight of backend %s of %s to %d", spec.Backend, spec.Service, weight)
	return d.changeBackend(what, spec.Service, spec.Backend, func(s *config.Service, b *config.Backend) string {
		defer func() { b.Weight = weight }()
		switch {
		case b.Weight == weight:
			return fmt.Sprintf("backend %s of %s (%s) already has weight %d", b.Key(), s.Name, s.Key(), weight)
		case weight == 0:
			return fmt.Sprintf("backend %s of %s (%s) has weight 0: out of the ring, it keeps its connections and takes no new ones", b.Key(), s.Name, s.Key())
		}
		return fmt.Sprintf("backend %s of %s (%s) has weight %d (was %d)", b.Key(), s.Name, s.Key(), weight, b.Weight)
	})
}

// changeBackend makes one change to the backend named backend of the
// service named service: edit changes it and returns what to tell.
func (d *Daemon) changeBackend(what, service, backend string, edit func(*config.Service, *config.Backend) string) (Result, error) {
	r, err := parseServiceRef(service, "service")
	if err != nil {
		return Result{}, err
	}
	var msg string
	err = d.change(what, func(cfg *config.Config) (span, error) {
		i, s, addr, port, err := serviceBackend(cfg, r, backend)
		if err != nil {
			return span{}, err
		}
		j, err := findBackend(s, addr, port, "backend")
		if err != nil {
			return span{}, err
		}
		msg = edit(s, &s.Backends[j])
		return span{i, i + 1, i + 1}, nil
	})
	if err != nil {
		return Result{}, err
	}
	return Result{Message: msg}, nil
}

// SetBackendState drains a backend (config.StateDraining: it keeps its
// connections and takes no new ones), with CloseIn a paced drain, or
// makes it active again (which cancels a paced drain).
func (d *Daemon) SetBackendState(spec BackendStateSpec) (Result, error) {
	if spec.State != config.StateActive && spec.State != config.StateDraining {
		return Result{}, refusef("state", "unknown state %q (want active or draining)", spec.State)
	}
	var closeIn time.Duration
	if spec.CloseIn != "" || spec.CloseRate != 0 {
		if spec.State != config.StateDraining {
			return Result{}, refusef("close_in", "only a drain closes connections at a deadline (tether backend drain --deadline)")
		}
		if spec.CloseIn == "" {
			return Result{}, refusef("close_rate", "a close rate paces the closes of a deadline: give the deadline too (--deadline 30m --rate %d/s)", max(spec.CloseRate, 1))
		}
		var err error
		if closeIn, err = time.ParseDuration(spec.CloseIn); err != nil || closeIn < 0 {
			return Result{}, refusef("close_in", "%q is not a duration from now such as 30m, 90s or 0s", spec.CloseIn)
		}
		if spec.CloseRate < 0 || spec.CloseRate > config.MaxCloseRate {
			return Result{}, refusef("close_rate", "%d connections a second is out of range 1..%d", spec.CloseRate, config.MaxCloseRate)
		}
	}
	rate := spec.CloseRate
	if rate == 0 {
		rate = config.DefaultCloseRate
	}
	// Milliseconds are what a deadline needs; the file keeps them.
	at := time.Now().Add(closeIn).UTC().Round(time.Millisecond)
	what := "set backend " + spec.Backend + " of " + spec.Service + " " + spec.State
	return d.changeBackend(what, spec.Service, spec.Backend, func(s *config.Service, b *config.Backend) string {
		was := *b
		b.State = spec.State
		switch {
		case spec.State == config.StateActive:
			b.CloseAt, b.CloseRate = time.Time{}, 0
		case spec.CloseIn != "":
			b.CloseAt, b.CloseRate = at, rate
		}
		paced := ""
		switch left := time.Until(b.CloseAt); {
		case b.CloseAt.IsZero():
		case left > 0:
			paced = fmt.Sprintf("; its remaining connections close from %s (in %s), %d a second",
				b.CloseAt.Local().Format(time.DateTime), left.Round(time.Second), b.CloseRate)
		default:
			paced = fmt.Sprintf("; its remaining connections are closing since %s, %d a second",
				b.CloseAt.Local().Format(time.DateTime), b.CloseRate)
		}
		switch {
		case was.State == spec.State && was.CloseAt.Equal(b.CloseAt) && was.CloseRate == b.CloseRate:
			return fmt.Sprintf("backend %s of %s (%s) is already %s%s", b.Key(), s.Name, s.Key(), spec.State, paced)
		case spec.State == config.StateDraining && paced == "":
			return fmt.Sprintf("backend %s of %s (%s) is draining: it keeps its connections and takes no new ones; `tether backend ls %s` shows when it has none left",
				b.Key(), s.Name, s.Key(), s.Key())
		case spec.State == config.StateDraining:
			return fmt.Sprintf("backend %s of %s (%s) is draining: it takes no new connections%s; `tether backend ls %s` shows what is left",
				b.Key(), s.Name, s.Key(), paced, s.Key())
		case b.Weight == 0:
			return fmt.Sprintf("backend %s of %s (%s) is active, but its weight 0 keeps it out of the ring", b.Key(), s.Name, s.Key())
		}
		return fmt.Sprintf("backend %s of %s (%s) is active again", b.Key(), s.Name, s.Key())
	})
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
	var dpRefused *datapath.RefusedError
	switch {
	case err == nil:
		d.log.Info("reloaded", "config", d.path, "services", len(d.ctl.Config().Services))
	case errors.As(err, &refused), errors.As(err, &dpRefused):
		d.log.Error("reload refused; running state unchanged", "err", err)
	default:
		d.log.Error("reload failed", "err", err)
	}
	return res, err
}

func (d *Daemon) reload() (Result, error) {
	data, err := os.ReadFile(d.path)
	if err == nil && d.sameFile(data) {
		// What runs was applied in full from this very content.
		ch := &Changes{}
		return Result{Message: fmt.Sprintf("reloaded %s: %s", d.path, ch), Changes: ch}, nil
	}
	cur, f, err := d.loadNext(data, err)
	if err != nil {
		return Result{}, err
	}
	next := f.Config()
	edit, alone := d.editOf(cur, f)
	ch := diff(edit.was, edit.Changed)
	if alone {
		err = d.applyEdit(cur, next, &edit)
	} else {
		err = d.apply(cur, next)
	}
	if err != nil {
		return Result{}, err
	}
	d.file = f
	return Result{Message: fmt.Sprintf("reloaded %s: %s", d.path, ch), Changes: ch}, nil
}

// fileEdit is an Edit of the running configuration, with the running
// services it replaces (was).
type fileEdit struct {
	Edit
	was []config.Service
}

// editOf says which services f changes: those the file says, alone is
// true, when f was read from the file of the running configuration cur
// (d.file), and every service otherwise. d.mu is held.
func (d *Daemon) editOf(cur *config.Config, f *config.File) (e fileEdit, alone bool) {
	if d.file != nil && d.file.Config() == cur {
		if from, oldTo, newTo, ok := f.Edit(d.file); ok {
			return editFor(cur.Services[from:oldTo], f.Config().Services[from:newTo]), true
		}
	}
	return editFor(cur.Services, f.Config().Services), false
}

// editFor is the edit that replaces the running services was by changed.
func editFor(was, changed []config.Service) fileEdit {
	e := fileEdit{Edit: Edit{Changed: changed}, was: was}
	stays := make(map[string]bool, len(changed))
	for _, s := range changed {
		stays[s.Key()] = true
	}
	for _, s := range was {
		if k := s.Key(); !stays[k] {
			e.Removed = append(e.Removed, k)
		}
	}
	return e
}

// sameFile says whether data is the content the running configuration
// was last applied from, or written to, in full. d.mu is held.
func (d *Daemon) sameFile(data []byte) bool {
	return d.file != nil && bytes.Equal(data, d.file.Data)
}

// ReloadPlan reads the configuration file as Reload would and says what
// Reload would change, refusing what it would refuse; it changes nothing
// (tether reload --dry-run). A datapath's own refusals (a backend it
// cannot reach) show only when the change is applied.
func (d *Daemon) ReloadPlan() (Result, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	data, err := os.ReadFile(d.path)
	cur, f, err := d.loadNext(data, err)
	if err != nil {
		return Result{}, err
	}
	edit, _ := d.editOf(cur, f)
	ch := diff(edit.was, edit.Changed)
	return Result{Message: fmt.Sprintf("reload of %s would apply: %s", d.path, ch), Changes: ch}, nil
}

// loadNext reads the file for a reload, refusing a file that does not
// load or changes a setting fixed at start: cur is the running
// configuration, next the file's. data and readErr are what reading the
// file gave. The file is parsed in proportion to what changed since the
// daemon last read or wrote it. d.mu is held.
func (d *Daemon) loadNext(data []byte, readErr error) (cur *config.Config, next *config.File, err error) {
	if readErr != nil {
		next, err = config.ReadFile(d.path, nil) // says why, as a load does
	} else {
		next, err = config.ParseFile(d.path, data, d.file)
	}
	if err != nil {
		return nil, nil, refused(err)
	}
	if err := d.checkFixed(next.Config()); err != nil {
		return nil, nil, err
	}
	return d.ctl.Config(), next, nil
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
	case next.Splice.Loops != f.Splice.Loops:
		return refusef("splice.loops", "%d differs from the running %d: the number of event loops %s", next.Splice.Loops, f.Splice.Loops, restart)
	case next.Splice.MaxConnections != f.Splice.MaxConnections:
		return refusef("splice.max_connections", "%d differs from the running %d: the connection cap %s", next.Splice.MaxConnections, f.Splice.MaxConnections, restart)
	}
	n, r := next.Tables, f.Tables
	for _, t := range []struct {
		name       string
		next, runs uint32
	}{
		{"connections", n.Connections, r.Connections},
		{"nat", n.NAT, r.NAT},
		{"affinity", n.Affinity, r.Affinity},
		{"ring_size", n.RingSize, r.RingSize},
		{"max_services", n.MaxServices, r.MaxServices},
		{"max_backends", n.MaxBackends, r.MaxBackends},
		{"insert_rate", n.InsertRate, r.InsertRate},
	} {
		if t.next != t.runs {
			return refusef("tables."+t.name, "%d differs from the running %d: the tables' settings take effect only at start; restart tether to change them", t.next, t.runs)
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

// span is what an edit of a configuration did to its services: the
// running services [from, oldTo) are its services [from, newTo).
type span struct{ from, oldTo, newTo int }

// change applies edit to a copy of the running configuration, validates
// the services it changed (span) against the others, writes the result
// to a temporary file beside the configuration file, applies it, and
// renames the temporary file over the configuration file. A refused or
// failed change leaves the running state and the file as they were. The
// copy shares the running services' backends: edit must copy those of a
// service it changes (serviceBackend does).
func (d *Daemon) change(what string, edit func(*config.Config) (span, error)) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	cur := d.ctl.Config()
	if err := d.checkFile(cur); err != nil {
		return err
	}
	next := *cur
	next.Services = slices.Clone(cur.Services)
	sp, err := edit(&next)
	if err != nil {
		return err
	}
	if err := next.ValidateEdit(sp.from, sp.newTo); err != nil {
		return refused(err)
	}
	if sp.oldTo-sp.from == 1 && sp.newTo-sp.from == 1 && reflect.DeepEqual(cur.Services[sp.from], next.Services[sp.from]) {
		return nil // nothing to do
	}
	changes := editFor(cur.Services[sp.from:sp.oldTo], next.Services[sp.from:sp.newTo])
	var f *config.File
	if d.file != nil && d.file.Config() == cur {
		f, err = next.MarshalEdit(d.file, sp.from, sp.oldTo, sp.newTo)
	} else {
		f, err = next.MarshalFile()
	}
	if err != nil {
		return err
	}
	data := f.Data
	target, err := filepath.EvalSymlinks(d.path)
	if err != nil {
		return fmt.Errorf("write %s: %w", d.path, err)
	}
	tmp, err := writeTemp(target, data)
	if err != nil {
		return err
	}
	if err := d.applyEdit(cur, &next, &changes); err != nil {
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
	d.file = f
	d.log.Info("configuration changed", "change", what, "config", d.path)
	return nil
}

// apply applies next, and on failure applies cur again so that the
// running state is what it was. The health checks follow what runs.
func (d *Daemon) apply(cur, next *config.Config) error {
	return d.applyEdit(cur, next, nil)
}

// applyEdit is apply of next, which differs from cur as edit says (see
// Controller.ApplyEdit), or in any way when edit is nil. The health
// checks of an edit that applied change with the services it changed.
func (d *Daemon) applyEdit(cur, next *config.Config, edit *fileEdit) error {
	var err error
	if edit != nil {
		err = d.ctl.ApplyEdit(next, edit.Edit)
	} else {
		err = d.ctl.Apply(next)
	}
	if err == nil {
		if edit != nil {
			d.syncEdit(edit)
		} else {
			d.syncTargets()
		}
		return nil
	}
	defer d.syncTargets()
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
		d.file = nil // what runs is neither the file nor cur: reload in full
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
	if data, err := os.ReadFile(d.path); err == nil && d.sameFile(data) {
		return nil
	}
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
	f, err := os.CreateTemp(filepath.Dir(target), tempPattern(target))
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

// tempPattern names the temporary files written beside target (see
// writeTemp), as os.CreateTemp and filepath.Glob take it.
func tempPattern(target string) string { return "." + filepath.Base(target) + ".tmp-*" }
