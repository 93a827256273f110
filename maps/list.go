package maps

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tetherlb/tether/bpf"
	"github.com/tetherlb/tether/datapath"
)

// ServiceEntry is one entry of the services maps: a service's key and its
// value.
type ServiceEntry struct {
	VIP   netip.Addr
	Port  uint16 // host byte order
	Proto uint8
	Service
}

// Services lists the services maps, IPv4 then IPv6. A daemon that adopts
// pinned maps reads them to learn the ids the previous one assigned.
func (m *Maps) Services() ([]ServiceEntry, error) {
	var out []ServiceEntry
	var (
		k4 bpf.TetherServiceKey4
		v  bpf.TetherService
	)
	it := m.m.Services4.Iterate()
	for it.Next(&k4, &v) {
		out = append(out, serviceEntry(addrOf([4]uint32{k4.Addr}, afInet), k4.Port, k4.Proto, v))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list IPv4 services: %w", err)
	}
	var k6 bpf.TetherServiceKey
	it = m.m.Services6.Iterate()
	for it.Next(&k6, &v) {
		out = append(out, serviceEntry(addrOf(k6.Addr, afInet6), k6.Port, k6.Proto, v))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list IPv6 services: %w", err)
	}
	return out, nil
}

func serviceEntry(vip netip.Addr, port uint16, proto uint8, v bpf.TetherService) ServiceEntry {
	return ServiceEntry{
		VIP:   vip,
		Port:  HostPort(port),
		Proto: proto,
		Service: Service{
			ID:              v.Id,
			SourceAffinity:  v.Flags&FlagSourceAffinity != 0,
			ResetOnDown:     v.Flags&FlagResetOnDown != 0,
			Forwarding:      forwardingOf(v.Flags),
			AffinityTimeout: time.Duration(v.AffinityTimeoutNs),
			RingSignature:   uint64(v.RingSigHi)<<32 | uint64(v.RingSigLo),
			Share:           v.Flags&FlagShare != 0,
		},
	}
}

func forwardingOf(flags uint32) uint8 {
	switch {
	case flags&FlagGUE != 0:
		return ForwardGUE
	case flags&FlagIPIP != 0:
		return ForwardIPIP
	case flags&FlagFullNAT != 0:
		return ForwardFullNAT
	case flags&FlagNAT != 0:
		return ForwardNAT
	}
	return ForwardDSR
}

// Backends lists the backends map entries in use (state not StateUnused),
// by id, without their fullnat source addresses and tunnels (LookupBackend
// has them):
// a restart reads every backend, and needs none.
func (m *Maps) Backends() (map[uint32]Backend, error) {
	out := map[uint32]Backend{}
	var (
		id uint32
		v  bpf.TetherBackend
	)
	it := m.m.Backends.Iterate()
	for it.Next(&id, &v) {
		if v.State == StateUnused {
			continue
		}
		out[id] = backendOf(v, bpf.TetherSnat{})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list backends: %w", err)
	}
	return out, nil
}

// Entries counts the entries of the connection tables (both families) and
// of the affinity table. The tables change while they are counted.
func (m *Maps) Entries() (conns, affinities int, err error) {
	n4, err := count[bpf.TetherFlowKey4, bpf.TetherConn](m.m.Conns4)
	if err != nil {
		return 0, 0, err
	}
	n6, err := count[bpf.TetherFlowKey, bpf.TetherConn](m.m.Conns6)
	if err != nil {
		return 0, 0, err
	}
	na, err := count[bpf.TetherAffinityKey, bpf.TetherAffinity](m.m.Affinities)
	if err != nil {
		return 0, 0, err
	}
	return n4 + n6, na, nil
}

// count counts a hash table's entries (each).
func count[K, V any](mp *ebpf.Map) (int, error) {
	n := 0
	if err := each(mp, func(K, V) { n++ }); err != nil {
		return n, fmt.Errorf("count %s: %w", mp, err)
	}
	return n, nil
}

// batch is how many entries each reads a system call.
const batch = 4096

// each calls f with every entry of a hash table, read in batches where
// the kernel can (5.6+), one by one otherwise: a listing of a million
// connections takes a few hundred system calls instead of two million.
// The table changes while it is read: the result is a best-effort
// snapshot.
func each[K, V any](mp *ebpf.Map, f func(K, V)) error {
	keys, vals := make([]K, batch), make([]V, batch)
	var cursor ebpf.MapBatchCursor
	for first := true; ; first = false {
		got, err := mp.BatchLookup(&cursor, keys, vals, nil)
		if first && errors.Is(err, ebpf.ErrNotSupported) {
			return eachOneByOne(mp, f)
		}
		for i := range got {
			f(keys[i], vals[i])
		}
		switch {
		case errors.Is(err, ebpf.ErrKeyNotExist):
			return nil
		case err != nil:
			return err
		}
	}
}

func eachOneByOne[K, V any](mp *ebpf.Map, f func(K, V)) error {
	var (
		k K
		v V
	)
	it := mp.Iterate()
	for it.Next(&k, &v) {
		f(k, v)
	}
	return it.Err()
}

// Table names of Tables.
const (
	TableConnections4 = "connections_ipv4"
	TableConnections6 = "connections_ipv6"
	TableAffinity     = "affinity"
	TableNAT4         = "nat_ipv4"
	TableNAT6         = "nat_ipv6"
)

// Tables counts the entries of the connection tables (one per family) and
// of the affinity table, in batches where the kernel can, and gives each
// table's capacity. The tables change while they are counted.
func (m *Maps) Tables() ([]datapath.Table, error) {
	n4, err := count[bpf.TetherFlowKey4, bpf.TetherConn](m.m.Conns4)
	if err != nil {
		return nil, err
	}
	n6, err := count[bpf.TetherFlowKey, bpf.TetherConn](m.m.Conns6)
	if err != nil {
		return nil, err
	}
	na, err := count[bpf.TetherAffinityKey, bpf.TetherAffinity](m.m.Affinities)
	if err != nil {
		return nil, err
	}
	t4, err := count[bpf.TetherFlowKey4, bpf.TetherNatEntry](m.m.Nat4)
	if err != nil {
		return nil, err
	}
	t6, err := count[bpf.TetherFlowKey, bpf.TetherNatEntry](m.m.Nat6)
	if err != nil {
		return nil, err
	}
	return []datapath.Table{
		{Name: TableConnections4, Entries: n4, Capacity: int(m.m.Conns4.MaxEntries())},
		{Name: TableConnections6, Entries: n6, Capacity: int(m.m.Conns6.MaxEntries())},
		{Name: TableAffinity, Entries: na, Capacity: int(m.m.Affinities.MaxEntries())},
		{Name: TableNAT4, Entries: t4, Capacity: int(m.m.Nat4.MaxEntries())},
		{Name: TableNAT6, Entries: t6, Capacity: int(m.m.Nat6.MaxEntries())},
	}, nil
}
