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
	"sort"
	"sync"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/maglev"
)

// Controller applies configurations to one datapath. Its methods are safe
// for concurrent use.
type Controller struct {
	dp  datapath.Datapath
	log *slog.Logger

	mu       sync.Mutex
	seed     uint32
	ringSize uint32
	services *idPool // by service key "vip:port/proto"
	backends *idPool // by "service key|backend key"
	applied  map[string]datapath.Service
	cfg      *config.Config
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
		c.applied[k] = s
		c.log.Info("service applied", "service", s.Name, "vip", k, "backends", len(s.Backends))
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
		key := cs.Key()
		id, err := c.services.get(key)
		if err != nil {
			return nil, fmt.Errorf("service %s: %w", cs.Name, err)
		}
		s := datapath.Service{
			ID:              id,
			Name:            cs.Name,
			VIP:             cs.VIP,
			Port:            cs.Port,
			Proto:           cs.ProtoNumber(),
			SourceAffinity:  cs.Affinity == config.AffinitySource,
			AffinityTimeout: cs.AffinityTimeout,
		}
		var ring []maglev.Backend
		for _, cb := range cs.Backends {
			bid, err := c.backends.get(backendKey(key, cb.Address, cb.Port))
			if err != nil {
				return nil, fmt.Errorf("service %s backend %s: %w", cs.Name, cb.Key(), err)
			}
			b := datapath.Backend{ID: bid, Addr: cb.Address, Port: cb.Port, Weight: cb.Weight, State: datapath.Active}
			if cb.State == config.StateDraining || cb.Weight == 0 {
				b.State = datapath.Draining
			}
			s.Backends = append(s.Backends, b)
			if b.State == datapath.Active {
				ring = append(ring, maglev.Backend{ID: bid, Key: cb.Key(), Weight: cb.Weight})
			}
		}
		s.Ring, err = maglev.Build(ring, c.ringSize, c.seed)
		if err != nil {
			return nil, fmt.Errorf("service %s: %w", cs.Name, err)
		}
		out[key] = s
	}
	return out, nil
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
