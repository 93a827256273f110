// Package control turns a desired configuration into the state of a
// datapath. It owns service and backend ids and builds the Maglev rings;
// it talks to the datapath only through datapath.Datapath, so it works the
// same over the XDP program and the splice proxy.
//
// Daemon is what `tether run` serves: the configuration file kept as the
// source of truth, changes made through the API written back to it, and
// the HTTP+JSON API on a unix socket (Handler, Listen, Serve) that the CLI
// reaches with Client.
package control

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"maps"
	"net/netip"
	"reflect"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/health"
	"github.com/tetherlb/tether/internal/damp"
	"github.com/tetherlb/tether/maglev"
)

// Controller applies configurations to one datapath. Its methods are safe
// for concurrent use.
//
// Backend health is an overlay on the configuration: a backend whose
// health check says down (see SetHealth) gets datapath.Down and leaves its
// service's ring, unless the configuration drains it (state draining or
// weight 0), in which case it stays datapath.Draining, out of the ring
// either way. A service whose backends are all down, drained or absent
// has an empty ring: the datapath then refuses its new connections.
type Controller struct {
	dp  datapath.Datapath
	log *slog.Logger
	// damp keeps a service whose backends flap from logging each change.
	damp damp.Damper

	mu       sync.Mutex
	seed     uint32
	ringSize uint32
	services *idPool // by service key "vip:port/proto"
	backends *idPool // by "service key|backend key"
	// applied are the services the datapath serves, without their rings
	// (the datapath holds them), and rings the signature of each ring's
	// inputs: a service whose signature has not changed keeps its ring,
	// which is neither built nor sent again. An adopted service comes with
	// its ring and no signature until its first Apply.
	applied map[string]datapath.Service
	rings   map[string]uint64
	cfg     *config.Config // the last configuration applied in full
	desired *config.Config // the last configuration Apply was given and planned
	// exact: the datapath serves cfg as planned, no apply having failed
	// since (an edit may then be applied alone).
	exact bool
	up    func(health.Target) bool
	// unreachable are the backend addresses the datapath cannot reach
	// (see datapath.Resolver), with why: planned down.
	unreachable map[netip.Addr]error
	// share: the configuration has a sync block, and dsr, ipip and gue
	// services hand their new flows out (datapath.Service.Share).
	share bool
	// gen counts the applies; view is the last ShareView built (of its
	// generation), read without the lock by the reader of new flows.
	gen  atomic.Uint64
	view atomic.Pointer[ShareView]
}

// New returns a controller for dp. The hash seed and the ring size are
// those the datapath was created with; the pools hold as many ids as the
// datapath's tables.
func New(dp datapath.Datapath, seed, ringSize, maxServices, maxBackends uint32, log *slog.Logger) *Controller {
	return &Controller{
		dp:       dp,
		log:      log,
		seed:     seed,
		ringSize: ringSize,
		services: newIDPool(0, maxServices),
		backends: newIDPool(1, maxBackends+1), // backend id 0 means "none"
		applied:  make(map[string]datapath.Service),
		rings:    make(map[string]uint64),

		unreachable: make(map[netip.Addr]error),
	}
}

// SetHealth makes up the source of backend health: up(t) reports whether
// the backends probed as t are in service (it should say true for a
// target it does not know, as a new target starts up). With no source, or
// a nil one, every backend is up. SetHealth changes nothing by itself:
// the next Apply or Refresh uses it.
func (c *Controller) SetHealth(up func(health.Target) bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.up = up
}

// Refresh applies the health of targets: every service of the
// configuration that probes a backend as one of them is planned again
// with the current health (see SetHealth), and upserted whole if that
// changed it. Other services are not touched.
func (c *Controller) Refresh(targets ...health.Target) error {
	changed := make(map[health.Target]bool, len(targets))
	for _, t := range targets {
		t.Check = t.Check.Defaults()
		changed[t] = true
	}
	return c.refresh("health", func(cs config.Service, b config.Backend) bool {
		t, ok := cs.Target(b)
		return ok && changed[t]
	})
}

// Reachable applies what the datapath found (see datapath.Resolver): the
// backends at addrs answer now, and every service with one of them is
// planned again, as Refresh does.
func (c *Controller) Reachable(addrs ...netip.Addr) error {
	c.mu.Lock()
	for _, a := range addrs {
		delete(c.unreachable, a)
	}
	c.mu.Unlock()
	return c.refresh("reachability", func(_ config.Service, b config.Backend) bool {
		return slices.Contains(addrs, b.Address)
	})
}

// refresh plans again every service of the configuration with a backend
// that has, and upserts it whole if that changed it.
func (c *Controller) refresh(why string, has func(config.Service, config.Backend) bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.desired == nil {
		return nil
	}
	var todo []config.Service
	for _, cs := range c.desired.Services {
		if slices.ContainsFunc(cs.Backends, func(b config.Backend) bool { return has(cs, b) }) {
			todo = append(todo, cs)
		}
	}
	errs := []error{c.reach(todo)}
	for _, cs := range todo {
		key := cs.Key()
		p, err := c.planService(cs)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if c.ring(&p); p.err != nil {
			errs = append(errs, p.err)
			continue
		}
		if p.unchanged {
			continue
		}
		s := p.svc
		old, ok := c.applied[key]
		if err := c.dp.UpsertService(s); err != nil {
			errs = append(errs, fmt.Errorf("apply the %s of service %s: %w", why, cs.Name, err))
			continue
		}
		c.record(key, p)
		active, down := countStates(s)
		if v := c.damp.Note(key, time.Now()); v.Log {
			args := []any{"service", s.Name, "vip", key, "active", active, "down", down}
			if v.Damped {
				args = append(args, "changes_last_minute", v.Recent)
			}
			if v.Held > 0 {
				args = append(args, "not_logged", v.Held)
			}
			c.log.Info("service changed by "+why, args...)
		}
		c.noteUsable(old, ok, s)
	}
	return errors.Join(errs...)
}

// reach asks a datapath that finds backends itself (datapath.Resolver)
// about every backend of services, and records those it cannot reach, for
// planService to plan down. An address the datapath refuses fails reach,
// and with it the change, before anything is applied.
func (c *Controller) reach(services []config.Service) error {
	r, ok := c.dp.(datapath.Resolver)
	if !ok {
		return nil
	}
	seen := make(map[netip.Addr]bool)
	var addrs []netip.Addr
	for _, cs := range services {
		for _, b := range cs.Backends {
			if !seen[b.Address] {
				seen[b.Address] = true
				addrs = append(addrs, b.Address)
			}
		}
	}
	failed := r.Resolve(addrs)
	var errs []error
	for _, a := range addrs {
		err, bad := failed[a]
		var refused *datapath.RefusedError
		switch {
		case !bad:
			delete(c.unreachable, a)
		case errors.As(err, &refused):
			errs = append(errs, err)
		default:
			if _, known := c.unreachable[a]; !known {
				c.log.Warn("backend unreachable: down until it answers", "backend", a, "err", err)
			}
			c.unreachable[a] = err
		}
	}
	return errors.Join(errs...)
}

// forgetUnreachable forgets the unreachable addresses that no backend of
// services (the whole configuration) has. It reads them only when there
// are some.
func (c *Controller) forgetUnreachable(services []config.Service) {
	if len(c.unreachable) == 0 {
		return
	}
	used := make(map[netip.Addr]bool)
	for _, cs := range services {
		for _, b := range cs.Backends {
			used[b.Address] = true
		}
	}
	for a := range c.unreachable {
		if !used[a] {
			delete(c.unreachable, a)
		}
	}
}

// Unreachable says, of each backend address the datapath cannot reach,
// why.
func (c *Controller) Unreachable() map[netip.Addr]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[netip.Addr]string, len(c.unreachable))
	for a, err := range c.unreachable {
		out[a] = err.Error()
	}
	return out
}

// countStates counts the active and the down backends of s.
func countStates(s datapath.Service) (active, down int) {
	for _, b := range s.Backends {
		switch b.State {
		case datapath.Active:
			active++
		case datapath.Down:
			down++
		}
	}
	return active, down
}

// Usable reports whether s has a backend that takes new connections.
func Usable(s datapath.Service) bool {
	return slices.ContainsFunc(s.Backends, func(b datapath.Backend) bool { return b.State == datapath.Active })
}

// noteUsable logs a service that has lost its last usable backend, or
// found one again.
func (c *Controller) noteUsable(old datapath.Service, existed bool, s datapath.Service) {
	was, is := existed && Usable(old), Usable(s)
	up := is && existed && !was
	if !up && (is || !(was || !existed) || len(s.Backends) == 0) {
		return
	}
	v := c.damp.Note("usable "+s.Name, time.Now())
	if !v.Log {
		return
	}
	args := []any{"service", s.Name}
	if v.Held > 0 {
		args = append(args, "not_logged", v.Held)
	}
	if up {
		c.log.Info("service up: it has a usable backend again", args...)
		return
	}
	_, down := countStates(s)
	c.log.Warn("service down: no usable backend; new TCP connections are refused with a reset, UDP packets dropped",
		append(args, "backends", len(s.Backends), "down", down)...)
}

// Apply makes the datapath serve cfg: services that changed are replaced
// whole, services that are gone are deleted, unchanged ones are not touched.
// cfg is validated first; an invalid one changes nothing.
func (c *Controller) Apply(cfg *config.Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.apply(cfg, nil)
}

// Edit is what a change did to the services of a configuration: the
// services of the new one that may differ from the running ones (added or
// changed), and the keys of running services it no longer has.
type Edit struct {
	Changed []config.Service
	Removed []string
}

// ApplyEdit applies cfg, a valid configuration that differs from the one
// running (the last one applied in full) only as edit says: it plans,
// sends and accounts for those services alone, so that a change of a few
// services of thousands costs time in proportion to them. When what runs
// is not exactly a configuration applied in full (an apply failed part
// way since, and so may the undo of it), it applies cfg whole, as Apply
// does.
func (c *Controller) ApplyEdit(cfg *config.Config, edit Edit) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.exact {
		if err := cfg.Validate(); err != nil {
			return err
		}
		return c.apply(cfg, nil)
	}
	return c.apply(cfg, &edit)
}

// apply applies cfg: whole, or with edit only the services it names.
// c.mu is held.
func (c *Controller) apply(cfg *config.Config, edit *Edit) error {
	services := cfg.Services
	var touched []string // the keys of an edit
	if edit != nil {
		services = edit.Changed
		for _, cs := range services {
			touched = append(touched, cs.Key())
		}
		touched = append(touched, edit.Removed...)
	}
	if err := c.reach(services); err != nil {
		return err
	}
	c.share = cfg.Sync != nil
	c.forgetUnreachable(cfg.Services)
	desired, err := c.plan(services)
	if err != nil {
		// Give back the ids plan allocated for a configuration that is not
		// going to be applied.
		c.releaseUnused(nil)
		return err
	}
	c.desired = cfg
	before := make(map[string]datapath.Service, len(touched))
	for _, k := range touched {
		if s, ok := c.applied[k]; ok {
			before[k] = s
		}
	}
	var errs []error
	var notes []note
	keys := make([]string, 0, len(desired))
	for k := range desired {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	ps := make([]*planned, len(keys))
	for i, k := range keys {
		ps[i] = desired[k]
	}
	wait := c.buildAhead(ps)
	for i, k := range keys {
		p := ps[i]
		wait(i)
		if p.err != nil {
			errs = append(errs, p.err)
			continue
		}
		if p.unchanged {
			continue
		}
		s := p.svc
		p.svc.Ring = nil // the datapath's, once sent
		if err := c.dp.UpsertService(s); err != nil {
			errs = append(errs, err)
			continue
		}
		old, existed := c.applied[k]
		c.record(k, *p)
		notes = append(notes, note{"service applied", []any{"service", s.Name, "vip", k, "backends", len(s.Backends)}})
		c.noteUsable(old, existed, s)
	}
	var gone []string // the keys to delete if no longer desired
	if edit != nil {
		gone = edit.Removed
	} else {
		gone = slices.Collect(maps.Keys(c.applied))
	}
	for _, k := range gone {
		s, ok := c.applied[k]
		if _, stays := desired[k]; !ok || stays {
			continue
		}
		if err := c.dp.DeleteService(s); err != nil {
			errs = append(errs, err)
			continue
		}
		delete(c.applied, k)
		delete(c.rings, k)
		c.services.release(k)
		for _, b := range s.Backends {
			c.backends.release(backendKey(k, b.Addr, b.Port))
		}
		notes = append(notes, note{"service removed", []any{"service", s.Name, "vip", k}})
	}
	c.logNotes(notes)
	if edit == nil {
		c.releaseUnused(desired)
	} else {
		c.releaseTouched(touched, desired, before)
	}
	c.exact = len(errs) == 0
	if len(errs) == 0 {
		c.cfg = cfg
	}
	c.gen.Add(1) // after the services changed: ShareView builds anew
	return errors.Join(errs...)
}

// note is a line for the log.
type note struct {
	msg  string
	args []any
}

// logNotes logs what an Apply changed: a line per service when it changed
// a few (an edit, a reload), a count when it changed many (a start), with
// the lines at debug level.
func (c *Controller) logNotes(notes []note) {
	const few = 16
	level := slog.LevelInfo
	if len(notes) > few {
		level = slog.LevelDebug
		c.log.Info("services applied", "changed", len(notes))
	}
	for _, n := range notes {
		c.log.Log(context.Background(), level, n.msg, n.args...)
	}
}

// planned is a service as the next Apply or Refresh would send it, with
// what its ring is made of.
type planned struct {
	svc  datapath.Service
	ring []maglev.Backend // the ring's backends
	sig  uint64           // the signature of the ring's inputs
	// unchanged: the datapath serves this service as it is (nothing to
	// send).
	unchanged bool
	err       error // building the ring failed
}

// plan computes the datapath services of services, allocating ids for
// new services and backends. Rings are not built yet: see buildAhead.
func (c *Controller) plan(services []config.Service) (map[string]*planned, error) {
	out := make(map[string]*planned, len(services))
	for _, cs := range services {
		p, err := c.planService(cs)
		if err != nil {
			return nil, err
		}
		out[cs.Key()] = &p
	}
	return out, nil
}

// keepRing says whether the datapath has p's ring already: its inputs'
// signature is the one recorded. p then keeps its ring (KeepRing), and is
// unchanged if nothing else changed.
func (c *Controller) keepRing(p *planned) bool {
	key := serviceKeyOf(p.svc)
	old, ok := c.applied[key]
	if sig, known := c.rings[key]; !ok || !known || sig != p.sig {
		return false
	}
	p.svc.KeepRing = true
	p.unchanged = sameService(old, p.svc)
	return true
}

// buildRing builds p's ring; a failure is p's err. It reads nothing but p,
// so that rings are built in parallel.
func (c *Controller) buildRing(p *planned) {
	ring, err := maglev.Build(p.ring, c.ringSize, c.seed)
	if err != nil {
		p.err = fmt.Errorf("service %s: %w", p.svc.Name, err)
		return
	}
	p.svc.Ring = ring
}

// keepAdopted compares p's new ring with the ring of the adopted service
// it replaces, whose signature is unknown: p keeps that ring if it is the
// same.
func (c *Controller) keepAdopted(p *planned) {
	old, ok := c.applied[serviceKeyOf(p.svc)]
	if p.err == nil && ok && old.Ring != nil && slices.Equal(old.Ring, p.svc.Ring) {
		p.svc.Ring, p.svc.KeepRing = nil, true
		p.unchanged = sameService(old, p.svc)
	}
}

// ring finishes p: its ring is kept or built.
func (c *Controller) ring(p *planned) {
	if !c.keepRing(p) {
		c.buildRing(p)
		c.keepAdopted(p)
	}
}

// buildAhead finishes ps in order: rings are built ahead on every CPU
// while the caller hands those built to the datapath, at most a window of
// them built and not yet taken, so that a start with thousands of
// services holds a few rings at a time, not thousands. wait(i) returns
// when ps[i] is finished; the caller waits for each in order and drops
// each ring once sent.
func (c *Controller) buildAhead(ps []*planned) (wait func(i int)) {
	done := make([]chan struct{}, len(ps))
	for i, p := range ps {
		if !c.keepRing(p) {
			done[i] = make(chan struct{})
		}
	}
	workers := runtime.GOMAXPROCS(0)
	room := make(chan struct{}, 2*workers)
	jobs := make(chan int)
	for range workers {
		go func() {
			for i := range jobs {
				c.buildRing(ps[i])
				close(done[i])
			}
		}()
	}
	go func() {
		defer close(jobs)
		for i := range ps {
			if done[i] != nil {
				room <- struct{}{} // the caller takes rings in this order
				jobs <- i
			}
		}
	}()
	return func(i int) {
		if done[i] == nil {
			return
		}
		<-done[i]
		<-room
		c.keepAdopted(ps[i])
	}
}

// sameService says whether the datapath serves next as it serves old,
// rings aside.
func sameService(old, next datapath.Service) bool {
	old.Ring, old.KeepRing, next.Ring, next.KeepRing = nil, false, nil, false
	return reflect.DeepEqual(old, next)
}

// record notes that the datapath serves p: without its ring, with the
// ring's signature.
func (c *Controller) record(key string, p planned) {
	s := p.svc
	s.Ring, s.KeepRing = nil, false
	c.applied[key] = s
	c.rings[key] = p.sig
}

// serviceKeyOf is the key of a planned service, as config.Service.Key
// spells it.
func serviceKeyOf(s datapath.Service) string {
	k, _ := serviceKey(s)
	return k
}

// planService computes the datapath service of cs with the current
// health of its backends, allocating ids for it and its backends if they
// have none; its ring is left to buildAhead.
func (c *Controller) planService(cs config.Service) (planned, error) {
	key := cs.Key()
	id, err := c.services.get(key)
	if err != nil {
		return planned{}, fmt.Errorf("service %s: %w", cs.Name, err)
	}
	s := datapath.Service{
		ID:              id,
		Name:            cs.Name,
		VIP:             cs.VIP,
		Port:            cs.Port,
		Proto:           cs.ProtoNumber(),
		SourceAffinity:  cs.Affinity == config.AffinitySource,
		AffinityTimeout: cs.AffinityTimeout,
		OnDownReset:     cs.OnDown == config.OnDownReset,
		Forwarding:      datapath.Forwarding(cs.Forwarding),
		SNATAddress:     cs.SNATAddress,
		TunnelSource:    cs.TunnelSource,
		EchoReply:       cs.ICMPEcho == config.ICMPEchoReply,
		GUEPort:         cs.GUEPort,
		IdleTimeout:     cs.IdleTimeout,
		ProxyProtocol:   cs.ProxyProtocol == config.ProxyProtocolV2,
		Share:           c.share && cs.Forwarding != config.ForwardingNAT && cs.Forwarding != config.ForwardingFullNAT,
	}
	var ring []maglev.Backend
	for _, cb := range cs.Backends {
		bid, err := c.backends.get(backendKey(key, cb.Address, cb.Port))
		if err != nil {
			return planned{}, fmt.Errorf("service %s backend %s: %w", cs.Name, cb.Key(), err)
		}
		b := datapath.Backend{ID: bid, Addr: cb.Address, Port: cb.Port, Weight: cb.Weight, State: datapath.Active}
		switch {
		case c.unreachable[cb.Address] != nil:
			b.State = datapath.Down // no frame can reach it, drained or not
		case cb.State == config.StateDraining || cb.Weight == 0:
			b.State = datapath.Draining // drained, whatever its health
		case !c.isUp(cs, cb):
			b.State = datapath.Down
		}
		s.Backends = append(s.Backends, b)
		if b.State == datapath.Active {
			ring = append(ring, maglev.Backend{ID: bid, Key: cb.Key(), Weight: cb.Weight})
		}
	}
	s.RingSignature = c.ringSignature(ring)
	return planned{svc: s, ring: ring, sig: s.RingSignature}, nil
}

// ringSignature hashes what a ring is built of: the ring size, the seed
// and its backends' keys, ids and weights, in the order Build sorts them.
// The datapath stores it with the service for the next daemon, whose
// seed may differ. It is never 0 (which says "unknown").
func (c *Controller) ringSignature(bs []maglev.Backend) uint64 {
	sorted := slices.Clone(bs)
	slices.SortFunc(sorted, func(a, b maglev.Backend) int { return strings.Compare(a.Key, b.Key) })
	h := fnv.New64a()
	var num [8]byte
	binary.LittleEndian.PutUint32(num[:4], c.ringSize)
	binary.LittleEndian.PutUint32(num[4:], c.seed)
	h.Write(num[:])
	for _, b := range sorted {
		h.Write([]byte(b.Key))
		binary.LittleEndian.PutUint32(num[:4], b.ID)
		binary.LittleEndian.PutUint32(num[4:], b.Weight)
		h.Write(num[:])
	}
	return max(h.Sum64(), 1)
}

// isUp reports whether backend b of service s is up by its health check:
// always with health type none or without a source of health.
func (c *Controller) isUp(s config.Service, b config.Backend) bool {
	if c.up == nil {
		return true
	}
	t, ok := s.Target(b)
	return !ok || c.up(t)
}

// releaseUnused gives back the ids that neither the desired services nor
// the services the datapath still holds use: those of backends that left a
// service, and those allocated for services that are not applied. The ids
// of a service whose change or deletion failed stay taken, as the datapath
// still serves it with them.
func (c *Controller) releaseUnused(desired map[string]*planned) {
	services, backends := map[uint32]bool{}, map[uint32]bool{}
	note := func(s datapath.Service) {
		services[s.ID] = true
		for _, b := range s.Backends {
			backends[b.ID] = true
		}
	}
	for _, p := range desired {
		note(p.svc)
	}
	for _, s := range c.applied {
		note(s)
	}
	c.backends.retain(func(id uint32) bool { return backends[id] })
	c.services.retain(func(id uint32) bool { return services[id] })
}

// releaseTouched is releaseUnused for the services of keys alone, which
// are all an edit allocates ids for or stops using: it gives back the ids
// of those that neither desired nor the datapath has, among those they
// had before (before) and those planned.
func (c *Controller) releaseTouched(keys []string, desired map[string]*planned, before map[string]datapath.Service) {
	for _, k := range keys {
		p, isDesired := desired[k]
		now, isApplied := c.applied[k]
		if !isDesired && !isApplied {
			c.services.release(k)
		}
		keep := map[uint32]bool{}
		for _, b := range now.Backends {
			keep[b.ID] = true
		}
		var had []datapath.Backend
		if isDesired {
			for _, b := range p.svc.Backends {
				keep[b.ID] = true
			}
			had = p.svc.Backends
		}
		for _, b := range slices.Concat(had, before[k].Backends) {
			if !keep[b.ID] {
				c.backends.release(backendKey(k, b.Addr, b.Port))
			}
		}
	}
}

// BackendID returns the id of the backend at addr of the service whose key
// is key ("vip:port/proto") as applied, and whether it has one.
func (c *Controller) BackendID(key string, addr netip.AddrPort) (uint32, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, b := range c.applied[key].Backends {
		if b.Addr == addr.Addr() && b.Port == addr.Port() {
			return b.ID, true
		}
	}
	return 0, false
}

// Usable counts the usable backends (active, weight above 0) of every
// service as applied, by key ("vip:port/proto").
func (c *Controller) Usable() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]int, len(c.applied))
	for key, s := range c.applied {
		n := 0
		for _, b := range s.Backends {
			if b.State == datapath.Active && b.Weight > 0 {
				n++
			}
		}
		out[key] = n
	}
	return out
}

// Services returns the services as applied, sorted by ID.
func (c *Controller) Services() []datapath.Service {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]datapath.Service, 0, len(c.applied))
	for _, s := range c.applied {
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Config returns the configuration last applied in full.
func (c *Controller) Config() *config.Config {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cfg
}
