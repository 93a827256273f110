package maps

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/bpf"
	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/maglev"
)

// Flow is one connection-table entry.
type Flow = datapath.Flow

// connClosing is CONN_F_CLOSING, connReset CONN_F_RESET.
const (
	connClosing = 1 << 0
	connReset   = 1 << 5
)

// flowKey6 is the key of flow client → vip in the IPv6 connection table.
func flowKey6(client, vip netip.AddrPort, proto uint8) bpf.TetherFlowKey {
	return bpf.TetherFlowKey{
		Src:   maglev.AddrWords(client.Addr()),
		Dst:   maglev.AddrWords(vip.Addr()),
		Sport: Port(client.Port()),
		Dport: Port(vip.Port()),
		Proto: proto,
	}
}

// flowKey4 is the key of flow client → vip in the IPv4 connection table.
func flowKey4(client, vip netip.AddrPort, proto uint8) bpf.TetherFlowKey4 {
	return bpf.TetherFlowKey4{
		Src:   maglev.AddrWords(client.Addr())[0],
		Dst:   maglev.AddrWords(vip.Addr())[0],
		Sport: Port(client.Port()),
		Dport: Port(vip.Port()),
		Proto: proto,
	}
}

// flow6 and flow4 are the flows of connection-table entries, read at
// now (SeenNow).
func flow6(k bpf.TetherFlowKey, v bpf.TetherConn, now uint32) Flow {
	return connFlow(netip.AddrPortFrom(addrOf(k.Src, afInet6), HostPort(k.Sport)),
		netip.AddrPortFrom(addrOf(k.Dst, afInet6), HostPort(k.Dport)), k.Proto, v, now)
}

func flow4(k bpf.TetherFlowKey4, v bpf.TetherConn, now uint32) Flow {
	return connFlow(netip.AddrPortFrom(addrOf([4]uint32{k.Src}, afInet), HostPort(k.Sport)),
		netip.AddrPortFrom(addrOf([4]uint32{k.Dst}, afInet), HostPort(k.Dport)), k.Proto, v, now)
}

func connFlow(client, vip netip.AddrPort, proto uint8, v bpf.TetherConn, now uint32) Flow {
	return Flow{
		Client:  client,
		VIP:     vip,
		Proto:   proto,
		Service: v.Service,
		Backend: v.Backend,
		Closing: v.Flags&connClosing != 0,
		Learned: v.Flags&connLearned != 0,
		Idle:    idleOf(v.Flags, now),
	}
}

// The time of a flow's last packet, in struct conn.flags (bpf/consts.h:
// CONN_SEEN_SHIFT).
const (
	seenShift = 8
	seenUnit  = 30 // log2 of its unit in ns
	seenMask  = 1<<24 - 1
)

// SeenNow is the program's clock (CLOCK_MONOTONIC_COARSE) as struct
// conn.flags holds it, which the loader writes into seen_now.
func SeenNow() uint32 {
	var ts unix.Timespec
	if unix.ClockGettime(unix.CLOCK_MONOTONIC_COARSE, &ts) != nil {
		return 0
	}
	return uint32(ts.Nano()>>seenUnit) & seenMask
}

// idleOf is how long before now (SeenNow) the flow whose entry holds
// flags sent its last packet, to a unit of about a second: 0 when it was
// within the current unit, or is unknown (an entry an earlier tether or
// another host made, or now unknown), or came after now (a packet during a
// long listing, which read now first).
func idleOf(flags, now uint32) time.Duration {
	seen := flags >> seenShift
	if seen == 0 || now == 0 {
		return 0
	}
	units := (now - seen) & seenMask
	if units > seenMask/2 {
		return 0 // after now: the difference wrapped
	}
	return time.Duration(units) << seenUnit
}

// Flows lists the connection tables, IPv4 then IPv6. The tables change
// while they are read, so the listing is a best-effort snapshot.
func (m *Maps) Flows() ([]Flow, error) {
	now := SeenNow()
	out, err := list(m.m.Conns4, now, flow4)
	if err != nil {
		return out, err
	}
	out6, err := list(m.m.Conns6, now, flow6)
	return append(out, out6...), err
}

func list[K, V any](mp *ebpf.Map, now uint32, conv func(K, V, uint32) Flow) ([]Flow, error) {
	var out []Flow
	if err := each(mp, func(k K, v V) { out = append(out, conv(k, v, now)) }); err != nil {
		return out, fmt.Errorf("list flows: %w", err)
	}
	return out, nil
}

// CloseFlows marks the connection entries of flows closed by a paced
// drain: they stop counting as active, and the program answers their next
// TCP packet with a reset (reason reset_drained) while a UDP flow chooses
// again. An entry that is gone, already closing, or that names another
// backend than the flow does (its 5-tuple was reused) is left alone. It
// returns the flows it marked. The program may rewrite an entry between
// the read and the write here; the only rewrite it can make of a flow
// being drained (its backend takes no new connections) is the entry a
// new handshake on the same 5-tuple makes, which the write keeps unless
// the two cross within microseconds.
func (m *Maps) CloseFlows(flows []Flow) ([]Flow, error) {
	var out []Flow
	for _, f := range flows {
		var (
			v   bpf.TetherConn
			err error
		)
		mark := func(mp *ebpf.Map, k any) error {
			if err := mp.Lookup(k, &v); err != nil {
				return err
			}
			if v.Flags&connClosing != 0 || v.Backend != f.Backend || v.Service != f.Service {
				return ebpf.ErrKeyNotExist
			}
			v.Flags |= connClosing | connReset
			return mp.Update(k, &v, ebpf.UpdateExist)
		}
		if f.Client.Addr().Unmap().Is4() {
			k := flowKey4(f.Client, f.VIP, f.Proto)
			err = mark(m.m.Conns4, &k)
		} else {
			k := flowKey6(f.Client, f.VIP, f.Proto)
			err = mark(m.m.Conns6, &k)
		}
		switch {
		case err == nil:
			f.Closing = true
			out = append(out, f)
		case errors.Is(err, ebpf.ErrKeyNotExist):
		default:
			return out, fmt.Errorf("close flow %s → %s: %w", f.Client, f.VIP, err)
		}
	}
	return out, nil
}

// LookupFlow reads the connection-table entry of one flow.
func (m *Maps) LookupFlow(client, vip netip.AddrPort, proto uint8) (Flow, bool, error) {
	var (
		v   bpf.TetherConn
		err error
		f   Flow
	)
	if client.Addr().Unmap().Is4() {
		k := flowKey4(client, vip, proto)
		err = m.m.Conns4.Lookup(&k, &v)
		f = flow4(k, v, SeenNow())
	} else {
		k := flowKey6(client, vip, proto)
		err = m.m.Conns6.Lookup(&k, &v)
		f = flow6(k, v, SeenNow())
	}
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return Flow{}, false, nil
	}
	if err != nil {
		return Flow{}, false, fmt.Errorf("lookup flow: %w", err)
	}
	return f, true, nil
}

// FlushFlows empties the connection tables and returns how many entries it removed.
func (m *Maps) FlushFlows() (int, error) {
	n4, err := flush[bpf.TetherFlowKey4, bpf.TetherConn](m.m.Conns4)
	if err != nil {
		return n4, err
	}
	n6, err := flush[bpf.TetherFlowKey, bpf.TetherConn](m.m.Conns6)
	return n4 + n6, err
}

// FlushAffinities empties the affinity table and returns how many entries it removed.
func (m *Maps) FlushAffinities() (int, error) {
	return flush[bpf.TetherAffinityKey, bpf.TetherAffinity](m.m.Affinities)
}

func flush[K, V any](mp *ebpf.Map) (int, error) {
	var keys []K
	if err := each(mp, func(k K, _ V) { keys = append(keys, k) }); err != nil {
		return 0, fmt.Errorf("flush %s: %w", mp, err)
	}
	n := 0
	for i := range keys {
		if err := mp.Delete(&keys[i]); err == nil {
			n++
		} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return n, fmt.Errorf("flush %s: %w", mp, err)
		}
	}
	return n, nil
}

// Affinity is one affinity-table entry.
type Affinity struct {
	Backend uint32
	Age     time.Duration // since the client's last new connection
}

// LookupAffinity reads the affinity entry of client for service id.
func (m *Maps) LookupAffinity(service uint32, client netip.Addr) (Affinity, bool, error) {
	k := bpf.TetherAffinityKey{Addr: maglev.AddrWords(client), Service: service}
	var v bpf.TetherAffinity
	if err := m.m.Affinities.Lookup(&k, &v); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return Affinity{}, false, nil
		}
		return Affinity{}, false, fmt.Errorf("lookup affinity: %w", err)
	}
	return Affinity{Backend: v.Backend, Age: time.Duration(monotonicNow() - v.LastSeenNs)}, true, nil
}

// AffinityRule says when LearnAffinity replaces this host's entry.
type AffinityRule uint8

const (
	// IfOlder: where this host has none or an older one. An affinity
	// entry is the client's latest choice, wherever it was made.
	IfOlder AffinityRule = iota
	// IfAbsent: only where it has none.
	IfAbsent
	// IfSame: where it has none, or one that names the same backend (a
	// renewal: it says the client still uses the backend, not that it
	// chose it again).
	IfSame
)

// LearnAffinity enters the affinity entry of client for service, naming
// backend and last used age ago, where rule lets it replace this host's:
// one another host made or renewed, or one this host renews. It says
// whether it entered it.
func (m *Maps) LearnAffinity(service uint32, client netip.Addr, backend uint32, age time.Duration, rule AffinityRule) (bool, error) {
	cur, ok, err := m.LookupAffinity(service, client)
	if err != nil {
		return false, err
	}
	if ok {
		switch rule {
		case IfAbsent:
			return false, nil
		case IfSame:
			if cur.Backend != backend {
				return false, nil
			}
		default:
			if cur.Age <= age {
				return false, nil
			}
		}
	}
	return true, m.PutAffinity(service, client, backend, age)
}

// PutAffinity writes an affinity entry whose last use lies age in the past.
// The daemon does not need it; tests use it to age entries.
func (m *Maps) PutAffinity(service uint32, client netip.Addr, backend uint32, age time.Duration) error {
	k := bpf.TetherAffinityKey{Addr: maglev.AddrWords(client), Service: service}
	v := bpf.TetherAffinity{Backend: backend, LastSeenNs: monotonicNow() - uint64(age)}
	if err := m.m.Affinities.Put(&k, &v); err != nil {
		return fmt.Errorf("put affinity: %w", err)
	}
	return nil
}

// monotonicNow is bpf_ktime_get_ns: CLOCK_MONOTONIC in nanoseconds.
func monotonicNow() uint64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return uint64(ts.Nano())
}

// connEncap is CONN_F_ENCAP, connLearned CONN_F_LEARNED.
const (
	connEncap   = 1 << 3
	connLearned = 1 << 4
)

// PutFlow enters flow f (client, VIP, protocol, service and backend ids),
// which another host made, in its connection table unless the table has
// an entry for it; encap marks it encapsulated. It says whether it
// entered it.
func (m *Maps) PutFlow(f Flow, encap bool) (bool, error) {
	v := bpf.TetherConn{Backend: f.Backend, Service: f.Service, Flags: connLearned}
	if encap {
		v.Flags |= connEncap
	}
	var err error
	if f.Client.Addr().Unmap().Is4() {
		k := flowKey4(f.Client, f.VIP, f.Proto)
		err = m.m.Conns4.Update(&k, &v, ebpf.UpdateNoExist)
	} else {
		k := flowKey6(f.Client, f.VIP, f.Proto)
		err = m.m.Conns6.Update(&k, &v, ebpf.UpdateNoExist)
	}
	switch {
	case errors.Is(err, ebpf.ErrKeyExist):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("put flow %s -> %s: %w", f.Client, f.VIP, err)
	}
	return true, nil
}

// SyncFlow reads a record of sync_events: the flow a service that shares
// its entries entered.
func SyncFlow(raw []byte) (Flow, error) {
	var ev bpf.TetherSyncEvent
	if len(raw) < binary.Size(ev) {
		return Flow{}, fmt.Errorf("a sync event of %d bytes, want %d", len(raw), binary.Size(ev))
	}
	if _, err := binary.Decode(raw, binary.NativeEndian, &ev); err != nil {
		return Flow{}, fmt.Errorf("read a sync event: %w", err)
	}
	var f Flow
	if ev.Family == afInet6 {
		f = flow6(ev.Key, bpf.TetherConn{}, 0)
	} else {
		f = flow4(bpf.TetherFlowKey4{Src: ev.Key.Src[0], Dst: ev.Key.Dst[0], Sport: ev.Key.Sport, Dport: ev.Key.Dport, Proto: ev.Key.Proto}, bpf.TetherConn{}, 0)
	}
	f.Service, f.Backend = ev.Service, ev.Backend
	return f, nil
}

// SyncLost sums sync_lost: the new flows sync_events had no room for.
func (m *Maps) SyncLost() (uint64, error) {
	var per []uint64
	if err := m.m.SyncLost.Lookup(uint32(0), &per); err != nil {
		return 0, fmt.Errorf("read sync_lost: %w", err)
	}
	var n uint64
	for _, v := range per {
		n += v
	}
	return n, nil
}
