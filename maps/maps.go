// Package maps gives typed Go views of the XDP program's BPF maps: services,
// backends, Maglev rings, the connection and affinity tables and the per-CPU
// counters. It owns the byte layouts (addresses as four words, ports in
// network byte order) so that no other package handles raw map entries.
//
// A *Maps is valid as long as the maps it wraps; it needs a kernel with BPF
// map-in-map support (4.12+) and BPF LRU hashes (4.10+).
package maps

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tetherlb/tether/bpf"
	"github.com/tetherlb/tether/maglev"
)

// Backend states as the XDP program reads them: enum backend_state of
// bpf/consts.h, through the constants bpf2go generates from it.
const (
	StateUnused   = uint8(bpf.TetherBackendStateBE_UNUSED)
	StateActive   = uint8(bpf.TetherBackendStateBE_ACTIVE)
	StateDraining = uint8(bpf.TetherBackendStateBE_DRAINING)
	StateDown     = uint8(bpf.TetherBackendStateBE_DOWN)
	// StateDownReset is StateDown for a service whose established
	// connections to a down backend are reset (on_down: reset).
	StateDownReset = uint8(bpf.TetherBackendStateBE_DOWN_RESET)
)

// Service flags.
const (
	FlagSourceAffinity uint32 = 1 << 0
	FlagResetOnDown    uint32 = 1 << 1
)

const (
	afInet  = 2
	afInet6 = 10
)

// Maps is the set of tether's BPF maps.
type Maps struct {
	m        *bpf.TetherMaps
	ringSize uint32
}

// New wraps loaded maps. ringSize is the number of slots of every ring, as
// the program was loaded with.
func New(m *bpf.TetherMaps, ringSize uint32) *Maps {
	return &Maps{m: m, ringSize: ringSize}
}

// RingSize is the number of slots in every ring.
func (m *Maps) RingSize() uint32 { return m.ringSize }

// Raw returns the underlying maps, for tests and for pinning.
func (m *Maps) Raw() *bpf.TetherMaps { return m.m }

// Port converts a host-order port to the network-order value the maps hold.
func Port(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

// HostPort converts a port read from a map back to host order.
func HostPort(p uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], p)
	return binary.BigEndian.Uint16(b[:])
}

func family(a netip.Addr) uint8 {
	if a.Unmap().Is4() {
		return afInet
	}
	return afInet6
}

func addrOf(w [4]uint32, fam uint8) netip.Addr {
	if fam == afInet {
		return maglev.WordsAddr(w, 4)
	}
	return maglev.WordsAddr(w, 6)
}

// serviceMap returns the services map of vip's family and vip's key in it.
func (m *Maps) serviceMap(vip netip.Addr, port uint16, proto uint8) (*ebpf.Map, any) {
	if vip.Unmap().Is4() {
		return m.m.Services4, &bpf.TetherServiceKey4{Addr: maglev.AddrWords(vip)[0], Port: Port(port), Proto: proto}
	}
	return m.m.Services6, &bpf.TetherServiceKey{Addr: maglev.AddrWords(vip), Port: Port(port), Proto: proto}
}

// Service is a service's entry.
type Service struct {
	ID              uint32
	SourceAffinity  bool
	ResetOnDown     bool
	AffinityTimeout time.Duration
}

// PutService creates or replaces a service entry. Publish its ring and
// backends first, so that the first packet finds them.
func (m *Maps) PutService(vip netip.Addr, port uint16, proto uint8, s Service) error {
	v := bpf.TetherService{Id: s.ID, AffinityTimeoutNs: uint64(s.AffinityTimeout)}
	if s.SourceAffinity {
		v.Flags |= FlagSourceAffinity
	}
	if s.ResetOnDown {
		v.Flags |= FlagResetOnDown
	}
	mp, key := m.serviceMap(vip, port, proto)
	if err := mp.Put(key, &v); err != nil {
		return fmt.Errorf("put service %s:%d: %w", vip, port, err)
	}
	return nil
}

// DeleteService removes a service entry; a missing one is not an error.
func (m *Maps) DeleteService(vip netip.Addr, port uint16, proto uint8) error {
	mp, key := m.serviceMap(vip, port, proto)
	if err := mp.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete service %s:%d: %w", vip, port, err)
	}
	return nil
}

// Backend is a backend's entry.
type Backend struct {
	Service uint32 // id of the service it belongs to
	Addr    netip.Addr
	Port    uint16
	State   uint8
	MAC     net.HardwareAddr // the backend's
	SrcMAC  net.HardwareAddr // the sending interface's
	Ifindex uint32           // the sending interface; 0 or the ingress one means XDP_TX
}

// PutBackend writes backend id.
func (m *Maps) PutBackend(id uint32, b Backend) error {
	v := bpf.TetherBackend{
		Addr:    maglev.AddrWords(b.Addr),
		Ifindex: b.Ifindex,
		Service: b.Service,
		Port:    Port(b.Port),
		State:   b.State,
		Family:  family(b.Addr),
	}
	copy(v.Dmac[:], b.MAC)
	copy(v.Smac[:], b.SrcMAC)
	if err := m.m.Backends.Put(&id, &v); err != nil {
		return fmt.Errorf("put backend %d (%s): %w", id, b.Addr, err)
	}
	return nil
}

// ClearBackend marks backend id unused: flows that still point at it choose again.
func (m *Maps) ClearBackend(id uint32) error {
	var v bpf.TetherBackend
	if err := m.m.Backends.Put(&id, &v); err != nil {
		return fmt.Errorf("clear backend %d: %w", id, err)
	}
	return nil
}

// LookupBackend reads backend id.
func (m *Maps) LookupBackend(id uint32) (Backend, error) {
	var v bpf.TetherBackend
	if err := m.m.Backends.Lookup(&id, &v); err != nil {
		return Backend{}, fmt.Errorf("lookup backend %d: %w", id, err)
	}
	return backendOf(v), nil
}

func backendOf(v bpf.TetherBackend) Backend {
	return Backend{
		Service: v.Service,
		Addr:    addrOf(v.Addr, v.Family),
		Port:    HostPort(v.Port),
		State:   v.State,
		MAC:     net.HardwareAddr(v.Dmac[:]),
		SrcMAC:  net.HardwareAddr(v.Smac[:]),
		Ifindex: v.Ifindex,
	}
}

// slotsPerEntry is RING_SLOTS_PER_ENTRY: 16-bit ring slots per 8-byte
// array entry, the first in the low bits.
const slotsPerEntry = 4

// MaxBackendID is the largest backend id a ring can hold (16-bit slots).
const MaxBackendID = 1<<16 - 1

// RingEntries is the number of array entries of a ring of ringSize slots.
func RingEntries(ringSize uint32) uint32 {
	return (ringSize + uint32(slotsPerEntry) - 1) / uint32(slotsPerEntry)
}

// PublishRing replaces the ring of service id with slots, whole: a new inner
// map is filled first and then swapped into the outer map in one update, so
// a packet reads either the old ring or the new one, never a mix.
func (m *Maps) PublishRing(id uint32, slots []uint32) error {
	if uint32(len(slots)) != m.ringSize {
		return fmt.Errorf("publish ring %d: %d slots, want %d", id, len(slots), m.ringSize)
	}
	n := RingEntries(m.ringSize)
	keys := make([]uint32, n)
	entries := make([]uint64, n)
	for i, b := range slots {
		if b > MaxBackendID {
			return fmt.Errorf("publish ring %d: backend id %d does not fit a ring slot", id, b)
		}
		entries[i/slotsPerEntry] |= uint64(b) << (16 * (i % slotsPerEntry))
	}
	for i := range keys {
		keys[i] = uint32(i)
	}
	inner, err := ebpf.NewMap(&ebpf.MapSpec{
		Name:       "tether_ring",
		Type:       ebpf.Array,
		KeySize:    4,
		ValueSize:  8,
		MaxEntries: n,
	})
	if err != nil {
		return fmt.Errorf("create ring %d: %w", id, err)
	}
	defer inner.Close() // the outer map holds its own reference
	if _, err := inner.BatchUpdate(keys, entries, nil); err != nil {
		return fmt.Errorf("fill ring %d: %w", id, err)
	}
	if err := m.m.Rings.Put(id, inner); err != nil {
		return fmt.Errorf("swap ring %d: %w", id, err)
	}
	return nil
}

// DeleteRing removes the ring of service id.
func (m *Maps) DeleteRing(id uint32) error {
	if err := m.m.Rings.Delete(id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete ring %d: %w", id, err)
	}
	return nil
}

// Ring reads the ring of service id, as packets see it now.
func (m *Maps) Ring(id uint32) ([]uint32, error) {
	var inner *ebpf.Map
	if err := m.m.Rings.Lookup(id, &inner); err != nil {
		return nil, fmt.Errorf("lookup ring %d: %w", id, err)
	}
	defer inner.Close()
	n := RingEntries(m.ringSize)
	keys := make([]uint32, n)
	entries := make([]uint64, n)
	var cursor ebpf.MapBatchCursor
	got, err := inner.BatchLookup(&cursor, keys, entries, nil)
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil, fmt.Errorf("read ring %d: %w", id, err)
	}
	out := make([]uint32, n*uint32(slotsPerEntry))
	for i := 0; i < got; i++ {
		for j := 0; j < slotsPerEntry; j++ {
			out[int(keys[i])*slotsPerEntry+j] = uint32(entries[i]>>(16*j)) & 0xffff
		}
	}
	return out[:m.ringSize], nil
}
