package maps

import (
	"fmt"
	"net/netip"
	"sync"

	"github.com/cilium/ebpf"

	"github.com/tetherlb/tether/maglev"
)

// vipFilterLog2 is VIP_FILTER_LOG2 of bpf/consts.h.
const vipFilterLog2 = 8

// VIPFilterBits is the number of bits of the program's vip_filter.
const VIPFilterBits = 1 << vipFilterLog2

// VIPFilterBit is the bit of vip_filter that address a sets: bpf/lookup.h's
// may_be_vip, over the words the maps hold addresses in.
func VIPFilterBit(a netip.Addr) uint32 {
	w := maglev.AddrWords(a.Unmap())
	return ((w[0] ^ w[1] ^ w[2] ^ w[3]) * 0x9e3779b1) >> (32 - vipFilterLog2)
}

// serviceID names a service entry: its VIP, port and protocol.
type serviceID struct {
	vip   netip.Addr
	port  uint16
	proto uint8
}

// vipFilter keeps the program's vip_filter as the service entries say:
// a VIP's bit is set while a service on it has an entry (or another VIP
// with the same bit does).
type vipFilter struct {
	mu       sync.Mutex
	v        *ebpf.Variable // nil: not kept, the program looks every packet up
	services map[serviceID]bool
	bits     [VIPFilterBits]int // the services of each bit
}

// UseVIPFilter makes m keep v, the program's vip_filter, as its services
// say: it reads the service entries the maps hold (a pinned state's) and
// writes the filter from them, and from then on PutService sets a new
// VIP's bit before the service's entry is written and DeleteService clears
// it after the VIP's last entry is gone, so that a packet of a service
// always finds its connection entry. Until it is called, every bit is set.
func (m *Maps) UseVIPFilter(v *ebpf.Variable) error {
	f := &m.filter
	f.mu.Lock()
	defer f.mu.Unlock()
	svcs, err := m.Services()
	if err != nil {
		return err
	}
	f.services = map[serviceID]bool{}
	f.bits = [VIPFilterBits]int{}
	for _, e := range svcs {
		f.count(serviceID{e.VIP.Unmap(), e.Port, e.Proto}, 1)
	}
	f.v = v
	return f.write()
}

// count adds d (1 or -1) to service id's entries and says whether that
// changed a bit of the filter. f.mu is held.
func (f *vipFilter) count(id serviceID, d int) bool {
	if f.services[id] == (d > 0) {
		return false
	}
	if d > 0 {
		f.services[id] = true
	} else {
		delete(f.services, id)
	}
	b := VIPFilterBit(id.vip)
	f.bits[b] += d
	return f.bits[b] == max(d, 0)
}

// write writes the filter to the program. Only bits that change move: a
// reader that meets the write half done sees every bit set before and
// after set. f.mu is held.
func (f *vipFilter) write() error {
	if f.v == nil {
		return nil
	}
	var words [VIPFilterBits / 64]uint64
	for b, n := range f.bits {
		if n > 0 {
			words[b/64] |= 1 << (b % 64)
		}
	}
	if err := f.v.Set(words); err != nil {
		return fmt.Errorf("write vip_filter: %w", err)
	}
	return nil
}

// add notes a service entry about to be written, setting its VIP's bit
// first if it is new. It says whether the entry is new, for undo.
func (f *vipFilter) add(id serviceID) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.services == nil || f.services[id] {
		return false, nil
	}
	if f.count(id, 1) {
		if err := f.write(); err != nil {
			f.count(id, -1)
			return false, err
		}
	}
	return true, nil
}

// remove notes a service entry gone, clearing its VIP's bit if no entry
// needs it any more.
func (f *vipFilter) remove(id serviceID) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.services == nil || !f.count(id, -1) {
		return nil
	}
	return f.write()
}
