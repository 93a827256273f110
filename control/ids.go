package control

import (
	"fmt"
	"net/netip"
)

// idPool hands out small integer ids for string keys, stable for as long as
// the key is in use. A released id is not handed out again before the pool
// has gone round once, so that state the datapath still holds for it (a
// connection-table entry, say) has time to age out.
type idPool struct {
	first, limit uint32 // ids are first..limit-1
	next         uint32
	byKey        map[string]uint32
	used         map[uint32]bool
}

func newIDPool(first, limit uint32) *idPool {
	return &idPool{first: first, limit: limit, next: first, byKey: map[string]uint32{}, used: map[uint32]bool{}}
}

// get returns key's id, allocating one if key has none.
func (p *idPool) get(key string) (uint32, error) {
	if id, ok := p.byKey[key]; ok {
		return id, nil
	}
	for range p.limit - p.first {
		id := p.next
		p.next++
		if p.next >= p.limit {
			p.next = p.first
		}
		if !p.used[id] {
			p.used[id] = true
			p.byKey[key] = id
			return id, nil
		}
	}
	return 0, fmt.Errorf("no free id: all %d are in use (raise the table size in the config's tables section)", p.limit-p.first)
}

func (p *idPool) release(key string) {
	if id, ok := p.byKey[key]; ok {
		delete(p.used, id)
		delete(p.byKey, key)
	}
}

// retain releases every key whose id keep says no to.
func (p *idPool) retain(keep func(id uint32) bool) {
	for k, id := range p.byKey {
		if !keep(id) {
			p.release(k)
		}
	}
}

func backendKey(service string, addr netip.Addr, port uint16) string {
	return service + "|" + netip.AddrPortFrom(addr, port).String()
}
