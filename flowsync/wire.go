// Package flowsync shares connection and affinity entries between tether
// hosts that serve the same VIPs, so that a flow the routers move to
// another host (a host died, one was added, a router rehashed), or a
// client that returns through another host, finds the backend it had
// there too, even after the backend set changed.
//
// Entries travel in UDP datagrams sent to each configured peer, batched,
// and name services and backends by their addresses and ports, never by
// the per-host ids of the BPF tables. Every datagram carries an HMAC-SHA256
// (truncated to 16 bytes) keyed with the hosts' shared key, the sender's
// identity (its listen address and port), its epoch (drawn at its start),
// a sequence number and the send time; Verifier refuses what does not
// verify, what comes from an address that is not a peer or not the one it
// names, what is too old, and what it has seen before, and counts each
// refusal by reason.
package flowsync

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"
)

// The wire format, version 1. A datagram is a header, entries, and the
// MAC of both:
//
//	header  magic "TSYN" | version 1 | type | count (2) | epoch (8) | seq (8) | unix time, ms (8) | sender addr (16) | sender port (2) | 0 (2)
//	entry   kind | proto | families | 0 | client addr | client port (2) | VIP addr | VIP port (2) | backend addr | backend port (2) | age, s (4)
//	mac     HMAC-SHA256(key, header | entries), first 16 bytes
//
// Integers are big-endian. The sender's address is 16 bytes (an IPv4
// one mapped); an entry's address is 4 bytes or 16 as the families byte
// says (bit 0: the client's is IPv6, bit 1: the VIP's, bit 2: the
// backend's). An IPv4 entry takes 26 bytes, an IPv6 one 62.
const (
	Version    = 1
	headerLen  = 52
	macLen     = 16
	MaxPayload = 1400 // a datagram's size at most, below any usual MTU
)

var magic = [4]byte{'T', 'S', 'Y', 'N'}

// Type is what a datagram carries.
type Type uint8

const (
	// TypeEntries carries entries a host made or refreshed.
	TypeEntries Type = 1
	// TypeRequest asks a peer for every live entry it holds (a host that
	// starts sends it before it announces its VIPs); it carries none.
	TypeRequest Type = 2
	// TypeDump carries entries answering a request.
	TypeDump Type = 3
	// TypeDumpDone ends the answer to a request; count says how many
	// datagrams of type TypeDump it took.
	TypeDumpDone Type = 4
)

// Kind is what an entry is.
type Kind uint8

const (
	// KindConn is a connection-table entry: the flow Client -> VIP goes to
	// Backend.
	KindConn Kind = 1
	// KindAffinity is an affinity entry: the client address Client.Addr()
	// of the service on VIP goes to Backend, last seen Age ago.
	KindAffinity Kind = 2
)

// Entry is one shared table entry, named by addresses and ports.
type Entry struct {
	Kind    Kind
	Proto   uint8          // 6 (TCP) or 17 (UDP): the service's protocol
	Client  netip.AddrPort // the client; the port is 0 for affinity
	VIP     netip.AddrPort // the service
	Backend netip.AddrPort // the backend it goes to
	Age     time.Duration  // affinity: since the client's last new connection (whole seconds on the wire)
}

// Header is a datagram's header.
type Header struct {
	// Sender is the sending host's listen address and port: replay
	// state is kept per sender, and a datagram must come from the
	// address it names.
	Sender netip.AddrPort
	Type   Type
	Count  uint16 // entries, or for TypeDumpDone the dump's datagrams
	Epoch  uint64 // the sender's, drawn at its start
	Seq    uint64 // the sender's sequence number within the epoch, from 1
	Time   time.Time
}

// entryLen is how many bytes e takes on the wire.
func entryLen(e Entry) int {
	return 4 + addrLen(e.Client.Addr()) + addrLen(e.VIP.Addr()) + addrLen(e.Backend.Addr()) + 3*2 + 4
}

func addrLen(a netip.Addr) int {
	if a.Is4() {
		return 4
	}
	return 16
}

// Encoder batches entries into signed datagrams. It is not safe for
// concurrent use.
type Encoder struct {
	key    []byte
	sender netip.AddrPort
	epoch  uint64
	seq    uint64
}

// NewEncoder returns an encoder of sender's datagrams that signs with key
// and numbers them from 1 in epoch.
func NewEncoder(key []byte, sender netip.AddrPort, epoch uint64) *Encoder {
	return &Encoder{key: key, sender: sender, epoch: epoch}
}

// Encode packs entries into as few datagrams of type t as MaxPayload
// allows (one, with no entries, when there are none), stamped with now.
// Entries with an invalid address are left out.
func (c *Encoder) Encode(t Type, entries []Entry, now time.Time) [][]byte {
	entries = slices.DeleteFunc(slices.Clone(entries), func(e Entry) bool {
		return !e.Client.Addr().IsValid() || !e.VIP.Addr().IsValid() || !e.Backend.Addr().IsValid()
	})
	var out [][]byte
	for first := true; first || len(entries) > 0; first = false {
		size, n := headerLen+macLen, 0
		for n < len(entries) && n < 0xffff && size+entryLen(entries[n]) <= MaxPayload {
			size += entryLen(entries[n])
			n++
		}
		out = append(out, c.seal(t, uint16(n), entries[:n], now, size))
		entries = entries[n:]
	}
	return out
}

// Control returns a datagram of type t without entries, whose count is
// count (TypeRequest: 0; TypeDumpDone: the dump's datagrams).
func (c *Encoder) Control(t Type, count uint16, now time.Time) []byte {
	return c.seal(t, count, nil, now, headerLen+macLen)
}

func (c *Encoder) seal(t Type, count uint16, entries []Entry, now time.Time, size int) []byte {
	c.seq++
	b := make([]byte, 0, size)
	b = append(b, magic[:]...)
	b = append(b, Version, byte(t))
	b = binary.BigEndian.AppendUint16(b, count)
	b = binary.BigEndian.AppendUint64(b, c.epoch)
	b = binary.BigEndian.AppendUint64(b, c.seq)
	b = binary.BigEndian.AppendUint64(b, uint64(now.UnixMilli()))
	a := c.sender.Addr().As16()
	b = append(b, a[:]...)
	b = binary.BigEndian.AppendUint16(b, c.sender.Port())
	b = append(b, 0, 0)
	for _, e := range entries {
		var fam byte
		for i, a := range []netip.Addr{e.Client.Addr(), e.VIP.Addr(), e.Backend.Addr()} {
			if !a.Is4() {
				fam |= 1 << i
			}
		}
		b = append(b, byte(e.Kind), e.Proto, fam, 0)
		for _, ap := range []netip.AddrPort{e.Client, e.VIP, e.Backend} {
			b = append(b, ap.Addr().AsSlice()...)
			b = binary.BigEndian.AppendUint16(b, ap.Port())
		}
		b = binary.BigEndian.AppendUint32(b, uint32(min(e.Age/time.Second, 0xffffffff)))
	}
	m := hmac.New(sha256.New, c.key)
	m.Write(b)
	return m.Sum(b)[:len(b)+macLen]
}

// Errors of Decode, each a reason Verifier counts.
var (
	ErrTruncated = errors.New("truncated")
	ErrMagic     = errors.New("not a tether sync datagram")
	ErrVersion   = errors.New("unknown version")
	ErrMAC       = errors.New("bad MAC")
	ErrEntry     = errors.New("malformed entry")
)

// Decode checks a datagram's MAC against key and reads it. It reads
// nothing from a datagram whose MAC does not verify.
func Decode(key, b []byte) (Header, []Entry, error) {
	var h Header
	if len(b) < headerLen+macLen {
		return h, nil, ErrTruncated
	}
	if [4]byte(b[:4]) != magic {
		return h, nil, ErrMagic
	}
	if b[4] != Version {
		return h, nil, fmt.Errorf("%w %d", ErrVersion, b[4])
	}
	body, mac := b[:len(b)-macLen], b[len(b)-macLen:]
	m := hmac.New(sha256.New, key)
	m.Write(body)
	if !hmac.Equal(m.Sum(nil)[:macLen], mac) {
		return h, nil, ErrMAC
	}
	h.Type = Type(b[5])
	h.Count = binary.BigEndian.Uint16(b[6:])
	h.Epoch = binary.BigEndian.Uint64(b[8:])
	h.Seq = binary.BigEndian.Uint64(b[16:])
	h.Time = time.UnixMilli(int64(binary.BigEndian.Uint64(b[24:])))
	h.Sender = netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[32:48])).Unmap(), binary.BigEndian.Uint16(b[48:]))
	if h.Type != TypeEntries && h.Type != TypeDump {
		if len(body) != headerLen {
			return h, nil, ErrEntry
		}
		return h, nil, nil
	}
	p := body[headerLen:]
	entries := make([]Entry, 0, h.Count)
	for range h.Count {
		if len(p) < 4 {
			return h, nil, ErrEntry
		}
		e := Entry{Kind: Kind(p[0]), Proto: p[1]}
		fam := p[2]
		if (e.Kind != KindConn && e.Kind != KindAffinity) || fam > 7 || p[3] != 0 {
			return h, nil, ErrEntry
		}
		p = p[4:]
		for i, ap := range []*netip.AddrPort{&e.Client, &e.VIP, &e.Backend} {
			n := 4
			if fam&(1<<i) != 0 {
				n = 16
			}
			if len(p) < n+2 {
				return h, nil, ErrEntry
			}
			a, _ := netip.AddrFromSlice(p[:n])
			*ap = netip.AddrPortFrom(a, binary.BigEndian.Uint16(p[n:]))
			p = p[n+2:]
		}
		if len(p) < 4 {
			return h, nil, ErrEntry
		}
		e.Age = time.Duration(binary.BigEndian.Uint32(p)) * time.Second
		p = p[4:]
		entries = append(entries, e)
	}
	if len(p) != 0 {
		return h, nil, ErrEntry
	}
	return h, entries, nil
}
