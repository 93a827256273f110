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
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

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
	FlagNAT            uint32 = 1 << 2
	FlagFullNAT        uint32 = 1 << 3
	FlagIPIP           uint32 = 1 << 4
	FlagGUE            uint32 = 1 << 5
	FlagShare          uint32 = 1 << 6 // SVC_F_SYNC
)

// The source ports fullnat allocates (SNAT_PORT_MIN and SNAT_PORT_SPAN of
// bpf/consts.h).
const (
	SNATPortMin = 1024
	SNATPortMax = 32767
)

// Forwarding modes of a service entry (the flags FlagNAT, FlagFullNAT,
// FlagIPIP and FlagGUE).
const (
	ForwardDSR uint8 = iota
	ForwardNAT
	ForwardFullNAT
	ForwardIPIP
	ForwardGUE
)

const (
	afInet  = 2
	afInet6 = 10
)

// Maps is the set of tether's BPF maps.
type Maps struct {
	m        *bpf.TetherMaps
	ringSize uint32
	// ringsUnmapped: the rings map takes no memory-mapped rings (see
	// PublishRing).
	ringsUnmapped atomic.Bool
	// filter keeps the program's vip_filter (UseVIPFilter).
	filter vipFilter
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
	// Forwarding is one of ForwardDSR, ForwardNAT, ForwardFullNAT,
	// ForwardIPIP and ForwardGUE.
	Forwarding uint8
	// RingSignature is the control plane's, stored for the next daemon
	// (see datapath.Service.RingSignature).
	RingSignature uint64
	// Share hands the service's new flows to sync_events.
	Share bool
}

// PutService creates or replaces a service entry. Publish its ring and
// backends first, so that the first packet finds them.
func (m *Maps) PutService(vip netip.Addr, port uint16, proto uint8, s Service) error {
	v := bpf.TetherService{Id: s.ID, AffinityTimeoutNs: uint64(s.AffinityTimeout),
		RingSigLo: uint32(s.RingSignature), RingSigHi: uint32(s.RingSignature >> 32)}
	if s.SourceAffinity {
		v.Flags |= FlagSourceAffinity
	}
	if s.ResetOnDown {
		v.Flags |= FlagResetOnDown
	}
	if s.Share {
		v.Flags |= FlagShare
	}
	switch s.Forwarding {
	case ForwardDSR:
	case ForwardNAT:
		v.Flags |= FlagNAT
	case ForwardFullNAT:
		v.Flags |= FlagFullNAT
	case ForwardIPIP:
		v.Flags |= FlagIPIP
	case ForwardGUE:
		v.Flags |= FlagGUE
	default:
		return fmt.Errorf("put service %s:%d: forwarding mode %d unknown", vip, port, s.Forwarding)
	}
	id := serviceID{vip.Unmap(), port, proto}
	added, err := m.filter.add(id)
	if err != nil {
		return fmt.Errorf("put service %s:%d: %w", vip, port, err)
	}
	mp, key := m.serviceMap(vip, port, proto)
	if err := mp.Put(key, &v); err != nil {
		if added {
			m.filter.remove(id)
		}
		return fmt.Errorf("put service %s:%d: %w", vip, port, err)
	}
	return nil
}

// DeleteService removes a service entry; a missing one is not an error.
// Calls of PutService and DeleteService for one key must not overlap
// (the XDP datapath holds its lock): each keeps vip_filter in step with
// the entry it writes.
func (m *Maps) DeleteService(vip netip.Addr, port uint16, proto uint8) error {
	if err := m.deleteService(vip, port, proto); err != nil {
		return err
	}
	if err := m.filter.remove(serviceID{vip.Unmap(), port, proto}); err != nil {
		return fmt.Errorf("delete service %s:%d: %w", vip, port, err)
	}
	return nil
}

// MoveService removes the entry of a service that now lives under
// another key, written first with PutService, but keeps its old VIP's bit
// of vip_filter: the connections established to the old VIP go on to the
// service's backends, which their entries name. The bit stays set until
// the daemon loads the program again, which sets the bits of the service
// entries it finds.
func (m *Maps) MoveService(vip netip.Addr, port uint16, proto uint8) error {
	if err := m.deleteService(vip, port, proto); err != nil {
		return err
	}
	m.filter.moved(serviceID{vip.Unmap(), port, proto})
	return nil
}

func (m *Maps) deleteService(vip netip.Addr, port uint16, proto uint8) error {
	mp, key := m.serviceMap(vip, port, proto)
	if err := mp.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete service %s:%d: %w", vip, port, err)
	}
	return nil
}

// VIP flags (the vips map's values).
const (
	VIPEchoReply uint32 = 1 << 0 // answer ICMP echo requests
)

func vipKey(a netip.Addr) bpf.TetherVipKey {
	return bpf.TetherVipKey{Addr: maglev.AddrWords(a), Family: uint32(family(a))}
}

// PutVIP writes the flags of VIP a.
func (m *Maps) PutVIP(a netip.Addr, flags uint32) error {
	k := vipKey(a)
	if err := m.m.Vips.Put(&k, &flags); err != nil {
		return fmt.Errorf("put VIP %s: %w", a, err)
	}
	return nil
}

// DeleteVIP removes VIP a's entry; a missing one is not an error.
func (m *Maps) DeleteVIP(a netip.Addr) error {
	k := vipKey(a)
	if err := m.m.Vips.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete VIP %s: %w", a, err)
	}
	return nil
}

// VIPs lists the VIP entries with their flags.
func (m *Maps) VIPs() (map[netip.Addr]uint32, error) {
	out := map[netip.Addr]uint32{}
	var (
		k     bpf.TetherVipKey
		flags uint32
	)
	it := m.m.Vips.Iterate()
	for it.Next(&k, &flags) {
		out[addrOf(k.Addr, uint8(k.Family))] = flags
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list VIPs: %w", err)
	}
	return out, nil
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
	// SNAT is the address fullnat flows to the backend come from (unset
	// for other modes).
	SNAT netip.Addr
	// Tunnel is how ipip and gue flows to the backend are encapsulated
	// (zero for other modes).
	Tunnel Tunnel
}

// Tunnel is the outer header of a backend's ipip and gue flows.
type Tunnel struct {
	// Source holds the outer source addresses: per flow, its low bits (the
	// last 32 at most) vary. Its family is the backend's.
	Source netip.Prefix
	// GUEPort is the outer UDP destination port (gue); 0 means ipip.
	GUEPort uint16
}

// tunnelOf is t as the tunnels map holds it.
func tunnelOf(t Tunnel) bpf.TetherTunnel {
	var v bpf.TetherTunnel
	if !t.Source.IsValid() {
		return v
	}
	a := t.Source.Masked().Addr()
	v.Src = maglev.AddrWords(a)
	v.SrcBits = uint8(min(a.BitLen()-t.Source.Bits(), 32))
	v.GuePort = Port(t.GUEPort)
	return v
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
	// The source address is in place before the entry that uses it.
	var sn bpf.TetherSnat
	if b.SNAT.IsValid() {
		sn.Addr = maglev.AddrWords(b.SNAT)
	}
	if err := m.m.SnatAddrs.Put(&id, &sn); err != nil {
		return fmt.Errorf("put backend %d (%s) source address: %w", id, b.Addr, err)
	}
	tn := tunnelOf(b.Tunnel)
	if err := m.m.Tunnels.Put(&id, &tn); err != nil {
		return fmt.Errorf("put backend %d (%s) tunnel: %w", id, b.Addr, err)
	}
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
	var tn bpf.TetherTunnel
	if err := m.m.Tunnels.Put(&id, &tn); err != nil {
		return fmt.Errorf("clear backend %d tunnel: %w", id, err)
	}
	return nil
}

// LookupBackend reads backend id.
func (m *Maps) LookupBackend(id uint32) (Backend, error) {
	var (
		v  bpf.TetherBackend
		sn bpf.TetherSnat
		tn bpf.TetherTunnel
	)
	if err := m.m.Backends.Lookup(&id, &v); err != nil {
		return Backend{}, fmt.Errorf("lookup backend %d: %w", id, err)
	}
	if err := m.m.SnatAddrs.Lookup(&id, &sn); err != nil {
		return Backend{}, fmt.Errorf("lookup backend %d source address: %w", id, err)
	}
	if err := m.m.Tunnels.Lookup(&id, &tn); err != nil {
		return Backend{}, fmt.Errorf("lookup backend %d tunnel: %w", id, err)
	}
	b := backendOf(v, sn)
	if tn.Src != ([4]uint32{}) {
		a := addrOf(tn.Src, v.Family)
		b.Tunnel = Tunnel{Source: netip.PrefixFrom(a, a.BitLen()-int(tn.SrcBits)), GUEPort: HostPort(tn.GuePort)}
	}
	return b, nil
}

func backendOf(v bpf.TetherBackend, sn bpf.TetherSnat) Backend {
	b := Backend{
		Service: v.Service,
		Addr:    addrOf(v.Addr, v.Family),
		Port:    HostPort(v.Port),
		State:   v.State,
		MAC:     net.HardwareAddr(v.Dmac[:]),
		SrcMAC:  net.HardwareAddr(v.Smac[:]),
		Ifindex: v.Ifindex,
	}
	if sn.Addr != ([4]uint32{}) {
		b.SNAT = addrOf(sn.Addr, v.Family)
	}
	return b
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
//
// The inner map is memory-mapped and written in one copy: a batch update
// costs the kernel a user copy per 8-byte entry, which made filling a ring
// cost more than building it. Rings pinned by a tether that made them
// without BPF_F_MMAPABLE only take rings like theirs (the kernel compares
// the flags), so once the outer map refuses one, rings are filled entry by
// entry again.
func (m *Maps) PublishRing(id uint32, slots []uint32) error {
	if uint32(len(slots)) != m.ringSize {
		return fmt.Errorf("publish ring %d: %d slots, want %d", id, len(slots), m.ringSize)
	}
	n := RingEntries(m.ringSize)
	entries := make([]uint64, n)
	for i, b := range slots {
		if b > MaxBackendID {
			return fmt.Errorf("publish ring %d: backend id %d does not fit a ring slot", id, b)
		}
		entries[i/slotsPerEntry] |= uint64(b) << (16 * (i % slotsPerEntry))
	}
	if !m.ringsUnmapped.Load() {
		err := m.publish(id, entries, true)
		if !errors.Is(err, errRingRefused) {
			return err
		}
		m.ringsUnmapped.Store(true)
	}
	return m.publish(id, entries, false)
}

// errRingRefused is the outer map refusing an inner map unlike its
// template.
var errRingRefused = errors.New("the rings map refuses this kind of ring")

// publish makes a ring of entries and puts it in the outer map, mapped
// says how.
func (m *Maps) publish(id uint32, entries []uint64, mapped bool) error {
	n := uint32(len(entries))
	spec := &ebpf.MapSpec{
		Name:       "tether_ring",
		Type:       ebpf.Array,
		KeySize:    4,
		ValueSize:  8,
		MaxEntries: n,
	}
	if mapped {
		spec.Flags = unix.BPF_F_MMAPABLE
	}
	inner, err := ebpf.NewMap(spec)
	if err != nil {
		return fmt.Errorf("create ring %d: %w", id, err)
	}
	defer inner.Close() // the outer map holds its own reference
	if mapped {
		err = withRingMemory(inner, unix.PROT_READ|unix.PROT_WRITE, func(mem []byte) {
			for i, e := range entries {
				binary.NativeEndian.PutUint64(mem[8*i:], e)
			}
		})
	} else {
		keys := make([]uint32, n)
		for i := range keys {
			keys[i] = uint32(i)
		}
		_, err = inner.BatchUpdate(keys, entries, nil)
	}
	if err != nil {
		return fmt.Errorf("fill ring %d: %w", id, err)
	}
	if err := m.m.Rings.Put(id, inner); err != nil {
		if mapped && errors.Is(err, unix.EINVAL) {
			return errRingRefused
		}
		return fmt.Errorf("swap ring %d: %w", id, err)
	}
	return nil
}

// withRingMemory calls f with the memory of the memory-mapped ring inner,
// mapped with prot, and unmaps it: a mapping left to the garbage collector
// would keep a replaced ring's kernel memory until it ran.
func withRingMemory(inner *ebpf.Map, prot int, f func([]byte)) error {
	size := int(inner.MaxEntries() * inner.ValueSize())
	mem, err := unix.Mmap(inner.FD(), 0, size, prot, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("map ring memory: %w", err)
	}
	f(mem)
	return unix.Munmap(mem)
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
	if inner.MaxEntries() != n || inner.ValueSize() != 8 {
		return nil, fmt.Errorf("ring %d: %d entries of %d bytes, want %d of 8", id, inner.MaxEntries(), inner.ValueSize(), n)
	}
	keys := make([]uint32, n)
	entries := make([]uint64, n)
	got := int(n)
	var err error
	if inner.Flags()&unix.BPF_F_MMAPABLE != 0 {
		err = withRingMemory(inner, unix.PROT_READ, func(mem []byte) {
			for i := range entries {
				keys[i] = uint32(i)
				entries[i] = binary.NativeEndian.Uint64(mem[8*i:])
			}
		})
	} else {
		var cursor ebpf.MapBatchCursor
		got, err = inner.BatchLookup(&cursor, keys, entries, nil)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			err = nil
		}
	}
	if err != nil {
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
