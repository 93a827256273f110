package control

import (
	"fmt"
	"net/netip"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
)

// Adopt takes over services that the datapath already serves, as an earlier
// daemon left them in pinned maps: each keeps its id, and so does each of
// its backends, so that the next Apply of the same configuration gives every
// service and backend the id it had (the same rings, and connection and
// affinity entries that still point at the right backend). Adopted services
// count as applied: the next Apply replaces those still configured and
// deletes the others. Call Adopt once, before the first Apply.
func (c *Controller) Adopt(services []datapath.Service) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.applied) > 0 || c.cfg != nil {
		return fmt.Errorf("adopt services: the controller has already applied a configuration")
	}
	for _, s := range services {
		key, err := serviceKey(s)
		if err != nil {
			return err
		}
		if err := c.services.reserve(key, s.ID); err != nil {
			return fmt.Errorf("adopt service %s: %w", key, err)
		}
		for _, b := range s.Backends {
			if err := c.backends.reserve(backendKey(key, b.Addr, b.Port), b.ID); err != nil {
				return fmt.Errorf("adopt service %s backend %s: %w", key, netip.AddrPortFrom(b.Addr, b.Port), err)
			}
		}
		if s.Name == "" {
			s.Name = key // the maps do not hold names
		}
		if s.RingSignature != 0 {
			// The datapath's ring was built from what this signature
			// says: the first Apply keeps it if it would build it alike.
			c.rings[key] = s.RingSignature
			s.Ring = nil
		}
		c.applied[key] = s
	}
	return nil
}

// serviceKey is the key of a datapath service, as config.Service.Key
// spells it.
func serviceKey(s datapath.Service) (string, error) {
	cs := config.Service{VIP: s.VIP, Port: s.Port}
	switch s.Proto {
	case 6:
		cs.Protocol = config.ProtocolTCP
	case 17:
		cs.Protocol = config.ProtocolUDP
	default:
		return "", fmt.Errorf("adopt service %s:%d: unknown protocol %d", s.VIP, s.Port, s.Proto)
	}
	return cs.Key(), nil
}

// reserve gives key the id it already has in the datapath. Ids allocated
// later follow the highest reserved one.
func (p *idPool) reserve(key string, id uint32) error {
	if old, ok := p.byKey[key]; ok {
		if old == id {
			return nil
		}
		return fmt.Errorf("holds ids %d and %d", old, id)
	}
	if id < p.first || id >= p.limit {
		return fmt.Errorf("id %d is outside %d..%d", id, p.first, p.limit-1)
	}
	if p.used[id] {
		return fmt.Errorf("id %d is used twice", id)
	}
	p.used[id] = true
	p.byKey[key] = id
	if id >= p.next {
		p.next = id + 1
		if p.next >= p.limit {
			p.next = p.first
		}
	}
	return nil
}
