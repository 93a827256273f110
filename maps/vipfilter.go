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
		f.inc(serviceID{e.VIP.Unmap(), e.Port, e.Proto})
	}
	f.v = v
	return f.write()
}

// inc counts service entry id, if it is not counted yet, in its VIP's
// bit, and says whether that set the bit. f.mu is held.
func (f *vipFilter) inc(id serviceID) bool {
	if f.services[id] {
		return false
	}
	f.services[id] = true
	b := VIPFilterBit(id.vip)
	f.bits[b]++
	return f.bits[b] == 1
}

// dec uncounts service entry id, if it is counted, and says whether that
// cleared its VIP's bit. f.mu is held.
func (f *vipFilter) dec(id serviceID) bool {
	if !f.services[id] {
		return false
	}
	delete(f.services, id)
	b := VIPFilterBit(id.vip)
	f.bits[b]--
	return f.bits[b] == 0
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
	if f.inc(id) {
		if err := f.write(); err != nil {
			f.dec(id)
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
	if f.services == nil || !f.dec(id) {
		return nil
	}
	return f.write()
}

// moved notes a service entry gone whose connections live on under
// another key: its count stays in its VIP's bit (until UseVIPFilter reads
// the entries again), but no longer under its key, so that a service put
// on that key later counts on its own.
func (f *vipFilter) moved(id serviceID) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.services, id)
}
