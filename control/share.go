package control

import (
	"net/netip"

	"github.com/tetherlb/tether/datapath"
)

// ShareView names the services and backends the datapath serves by id and
// by address, for the entries hosts share (flowsync): the ids of the
// tables are this host's own, the addresses are the same on every host.
// It is a snapshot of one apply; Controller.ShareView gives the current
// one.
type ShareView struct {
	gen      uint64
	byID     map[uint32]*datapath.Service
	byKey    map[shareKey]*datapath.Service
	backends map[uint32]datapath.Backend
}

// shareKey names a service as entries do: VIP, port and protocol.
type shareKey struct {
	vip   netip.AddrPort
	proto uint8
}

// ShareView returns the view of the services as applied now; the same
// pointer until the next apply. It takes the controller's lock only when
// an apply happened since the last view was built.
func (c *Controller) ShareView() *ShareView {
	if v := c.view.Load(); v != nil && v.gen == c.gen.Load() {
		return v
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	v := &ShareView{gen: c.gen.Load(), byID: map[uint32]*datapath.Service{}, byKey: map[shareKey]*datapath.Service{},
		backends: map[uint32]datapath.Backend{}}
	for _, s := range c.applied {
		s := s
		v.byID[s.ID] = &s
		v.byKey[shareKey{netip.AddrPortFrom(s.VIP, s.Port), s.Proto}] = &s
		for _, b := range s.Backends {
			v.backends[b.ID] = b
		}
	}
	c.view.Store(v)
	return v
}

// Name returns flow f's service (VIP and port, protocol) and backend
// (address and port), and whether the service shares its entries.
func (v *ShareView) Name(f datapath.Flow) (vip netip.AddrPort, proto uint8, backend netip.AddrPort, ok bool) {
	s := v.byID[f.Service]
	b, hasB := v.backends[f.Backend]
	if s == nil || !hasB || !s.Share {
		return netip.AddrPort{}, 0, netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(s.VIP, s.Port), s.Proto, netip.AddrPortFrom(b.Addr, b.Port), true
}

// Local returns this host's service of vip and proto, if it serves one
// that shares its entries, and the id of its backend at addr.
func (v *ShareView) Local(vip netip.AddrPort, proto uint8, addr netip.AddrPort) (svc *datapath.Service, backend uint32, ok bool) {
	s := v.byKey[shareKey{vip, proto}]
	if s == nil || !s.Share {
		return nil, 0, false
	}
	for _, b := range s.Backends {
		if b.Addr == addr.Addr() && b.Port == addr.Port() {
			return s, b.ID, true
		}
	}
	return nil, 0, false
}
