package userspace

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/maglev"
)

// service is one service as the proxy serves it. It is built whole by
// UpsertService and never changed afterwards: a new version replaces it, so
// that a connection sees the old ring and backends or the new ones.
type service struct {
	datapath.Service                     // without its Ring: see ring
	ring             []uint16            // the Maglev ring, backend IDs in 16 bits
	backends         map[uint32]*backend // by ID
	stats            *serviceStats
}

// backend is a backend of a service with its counters. The counters live as
// long as the backend keeps its ID in the service: a backend that is removed
// and comes back starts from zero, like the XDP datapath's.
type backend struct {
	datapath.Backend
	stats *backendStats
}

type serviceStats struct {
	newConns, affinityHits, affinityMisses atomic.Uint64
}

type backendStats struct {
	packets, bytes, newConns atomic.Uint64
}

// newService builds the proxy's view of s, keeping the counters of the
// backends old already had, and old's ring when s keeps it. The ring is
// kept once, in 16 bits a slot (backend IDs fit: maps.MaxBackendID).
func newService(s datapath.Service, old *service) *service {
	ns := &service{Service: s, backends: make(map[uint32]*backend, len(s.Backends))}
	ns.Backends = append([]datapath.Backend(nil), s.Backends...)
	if s.KeepRing && old != nil {
		ns.ring = old.ring
	} else {
		ns.ring = make([]uint16, len(s.Ring))
		for i, id := range s.Ring {
			ns.ring[i] = uint16(id)
		}
	}
	ns.Ring, ns.KeepRing = nil, false
	ns.stats = &serviceStats{}
	if old != nil {
		ns.stats = old.stats
	}
	for _, b := range ns.Backends {
		st := &backendStats{}
		if old != nil {
			if ob := old.backends[b.ID]; ob != nil {
				st = ob.stats
			}
		}
		ns.backends[b.ID] = &backend{Backend: b, stats: st}
	}
	return ns
}

// choose picks the backend of a new connection from client to s exactly as
// the XDP program picks it for a new flow (bpf/tether.c, new_flow): with
// source affinity, the affinity table's entry for the client if it has not
// timed out and its backend is active; otherwise the ring's slot at
// SourceHash (source affinity) or ConnHash (connection affinity) modulo the
// ring's size. It returns nil when the service has no backend for the
// client (an empty ring), and whether the affinity table decided.
//
// client's address is as the XDP program sees it in the packet: an IPv4
// address for an IPv4 service (see clientOf). A proxy accepts every
// connection whole, so there is never an entry of the connection table to
// find first: each accepted connection is a new flow.
func (p *Proxy) choose(s *service, client netip.AddrPort, now int64) (b *backend, affinityHit bool) {
	addr := client.Addr()
	if s.SourceAffinity {
		if id, ok := p.affinity.lookup(s.ID, addr, now, s.AffinityTimeout); ok {
			if b := s.backends[id]; b != nil && b.State == datapath.Active {
				return b, true
			}
		}
	}
	var h uint32
	if s.SourceAffinity {
		h = maglev.SourceHash(p.seed, addr)
	} else {
		h = maglev.ConnHash(p.seed, addr, client.Port(), s.Port, s.Proto)
	}
	if len(s.ring) == 0 {
		return nil, false
	}
	return s.backends[uint32(s.ring[h%uint32(len(s.ring))])], false
}

// record remembers and counts the choice of b for a new connection of
// client, as the XDP program's record() does: the affinity entry is written
// (or refreshed) on every new connection of a source-affinity service, hit
// or not.
func (p *Proxy) record(s *service, client netip.AddrPort, b *backend, affinityHit bool, now int64) {
	if s.SourceAffinity {
		p.affinity.put(s.ID, client.Addr(), b.ID, now)
	}
	s.stats.newConns.Add(1)
	if affinityHit {
		s.stats.affinityHits.Add(1)
	} else {
		s.stats.affinityMisses.Add(1)
	}
	b.stats.newConns.Add(1)
}

// affinityKey is a client of a service.
type affinityKey struct {
	addr    [16]byte
	service uint32
}

// affinityEntry is the backend a client was last sent to, and when.
type affinityEntry struct {
	backend  uint32
	lastSeen int64 // Proxy.now
}

// affinityTable is the source-affinity table: (service, client address) →
// backend and the time of the client's last new connection. It holds at
// most max entries; when it is full, an insert evicts the least recently
// seen of a few sampled entries (an approximate LRU, as the kernel's LRU
// hash is).
type affinityTable struct {
	mu      sync.Mutex
	entries map[affinityKey]affinityEntry
	max     int
}

// evictSample is how many entries an insert into a full table looks at.
const evictSample = 8

func newAffinityTable(max int) *affinityTable {
	return &affinityTable{entries: make(map[affinityKey]affinityEntry), max: max}
}

func affKey(service uint32, addr netip.Addr) affinityKey {
	return affinityKey{addr: addr.As16(), service: service}
}

// lookup returns the backend remembered for addr if its entry is not older
// than timeout, the test the XDP program makes
// (now - last_seen > timeout means expired).
func (t *affinityTable) lookup(service uint32, addr netip.Addr, now int64, timeout time.Duration) (uint32, bool) {
	t.mu.Lock()
	e, ok := t.entries[affKey(service, addr)]
	t.mu.Unlock()
	if !ok || now-e.lastSeen > int64(timeout) {
		return 0, false
	}
	return e.backend, true
}

func (t *affinityTable) put(service uint32, addr netip.Addr, id uint32, now int64) {
	k := affKey(service, addr)
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.entries[k]; !ok && len(t.entries) >= t.max {
		t.evictLocked()
	}
	t.entries[k] = affinityEntry{backend: id, lastSeen: now}
}

// evictLocked removes the oldest of evictSample entries (map iteration
// order is random).
func (t *affinityTable) evictLocked() {
	var (
		oldest affinityKey
		seen   = int64(1<<63 - 1)
		n      int
	)
	for k, e := range t.entries {
		if e.lastSeen < seen {
			oldest, seen = k, e.lastSeen
		}
		if n++; n == evictSample {
			break
		}
	}
	delete(t.entries, oldest)
}

// age sets the time of an entry's last use; for tests.
func (t *affinityTable) age(service uint32, addr netip.Addr, lastSeen int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	k := affKey(service, addr)
	if e, ok := t.entries[k]; ok {
		e.lastSeen = lastSeen
		t.entries[k] = e
	}
}

// get returns an entry as it is, expired or not; for tests.
func (t *affinityTable) get(service uint32, addr netip.Addr) (affinityEntry, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.entries[affKey(service, addr)]
	return e, ok
}

// deleteService forgets every entry of a service, so that an ID given to
// another service later starts with an empty table.
func (t *affinityTable) deleteService(service uint32) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for k := range t.entries {
		if k.service == service {
			delete(t.entries, k)
		}
	}
}

func (t *affinityTable) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.entries)
}
