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
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"sort"
	"sync"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/health"
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

	mu       sync.Mutex
	seed     uint32
	ringSize uint32
	services *idPool // by service key "vip:port/proto"
	backends *idPool // by "service key|backend key"
	applied  map[string]datapath.Service
	cfg      *config.Config // the last configuration applied in full
	desired  *config.Config // the last configuration Apply was given and planned
	up       func(health.Target) bool
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
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.desired == nil || len(targets) == 0 {
		return nil
	}
	changed := make(map[health.Target]bool, len(targets))
	for _, t := range targets {
		t.Check = t.Check.Defaults()
		changed[t] = true
	}
	var errs []error
	for _, cs := range c.desired.Services {
		if !slices.ContainsFunc(cs.Backends, func(b config.Backend) bool {
			t, ok := cs.Target(b)
			return ok && changed[t]
		}) {
			continue
		}
		key := cs.Key()
		s, err := c.planService(cs)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		old, ok := c.applied[key]
		if ok && reflect.DeepEqual(old, s) {
			continue
		}
		if err := c.dp.UpsertService(s); err != nil {
			errs = append(errs, fmt.Errorf("apply the health of service %s: %w", cs.Name, err))
			continue
		}
		c.applied[key] = s
		active, down := countStates(s)
		c.log.Info("service changed by health", "service", s.Name, "vip", key, "active", active, "down", down)
		c.noteUsable(old, ok, s)
	}
	return errors.Join(errs...)
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
	switch {
	case is && existed && !was:
		c.log.Info("service up: it has a usable backend again", "service", s.Name)
	case !is && (was || !existed) && len(s.Backends) > 0:
		_, down := countStates(s)
		c.log.Warn("service down: no usable backend; new TCP connections are refused with a reset, UDP packets dropped",
			"service", s.Name, "backends", len(s.Backends), "down", down)
	}
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

	desired, err := c.plan(cfg)
	if err != nil {
		// Give back the ids plan allocated for a configuration that is not
		// going to be applied.
		c.releaseUnused(nil)
		return err
	}
	c.desired = cfg
	var errs []error
	keys := make([]string, 0, len(desired))
	for k := range desired {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		s := desired[k]
		if old, ok := c.applied[k]; ok && reflect.DeepEqual(old, s) {
			continue
		}
		if err := c.dp.UpsertService(s); err != nil {
			errs = append(errs, err)
			continue
		}
		old, existed := c.applied[k]
		c.applied[k] = s
		c.log.Info("service applied", "service", s.Name, "vip", k, "backends", len(s.Backends))
		c.noteUsable(old, existed, s)
	}
	for k, s := range c.applied {
		if _, ok := desired[k]; ok {
			continue
		}
		if err := c.dp.DeleteService(s); err != nil {
			errs = append(errs, err)
			continue
		}
		delete(c.applied, k)
		c.services.release(k)
		for _, b := range s.Backends {
			c.backends.release(backendKey(k, b.Addr, b.Port))
		}
		c.log.Info("service removed", "service", s.Name, "vip", k)
	}
	c.releaseUnused(desired)
	if len(errs) == 0 {
		c.cfg = cfg
	}
	return errors.Join(errs...)
}

// plan computes the datapath services of cfg, allocating ids for new
// services and backends.
func (c *Controller) plan(cfg *config.Config) (map[string]datapath.Service, error) {
	out := make(map[string]datapath.Service, len(cfg.Services))
	for _, cs := range cfg.Services {
		s, err := c.planService(cs)
		if err != nil {
			return nil, err
		}
		out[cs.Key()] = s
	}
	return out, nil
}

// planService computes the datapath service of cs with the current
// health of its backends, allocating ids for it and its backends if they
// have none.
func (c *Controller) planService(cs config.Service) (datapath.Service, error) {
	key := cs.Key()
	id, err := c.services.get(key)
	if err != nil {
		return datapath.Service{}, fmt.Errorf("service %s: %w", cs.Name, err)
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
		IdleTimeout:     cs.IdleTimeout,
		ProxyProtocol:   cs.ProxyProtocol == config.ProxyProtocolV2,
	}
	var ring []maglev.Backend
	for _, cb := range cs.Backends {
		bid, err := c.backends.get(backendKey(key, cb.Address, cb.Port))
		if err != nil {
			return datapath.Service{}, fmt.Errorf("service %s backend %s: %w", cs.Name, cb.Key(), err)
		}
		b := datapath.Backend{ID: bid, Addr: cb.Address, Port: cb.Port, Weight: cb.Weight, State: datapath.Active}
		switch {
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
	s.Ring, err = maglev.Build(ring, c.ringSize, c.seed)
	if err != nil {
		return datapath.Service{}, fmt.Errorf("service %s: %w", cs.Name, err)
	}
	return s, nil
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
func (c *Controller) releaseUnused(desired map[string]datapath.Service) {
	keep := map[string]bool{}
	for _, m := range []map[string]datapath.Service{desired, c.applied} {
		for k, s := range m {
			keep["svc "+k] = true
			for _, b := range s.Backends {
				keep[backendKey(k, b.Addr, b.Port)] = true
			}
		}
	}
	c.backends.retain(func(key string) bool { return keep[key] })
	c.services.retain(func(key string) bool { return keep["svc "+key] })
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
