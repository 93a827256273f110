package maglev

import (
	"encoding/binary"
	"math/bits"
	"net/netip"
)

// DefaultSeed is the flow-hash seed every tether host uses unless configured
// otherwise. Hosts that share a VIP through ECMP must use the same seed.
const DefaultSeed uint32 = 0x74657468 // "teth"

// The hash is MurmurHash3 (x86, 32-bit) over whole 32-bit words. The XDP
// program in bpf/hash.h computes the same function; a word is four key bytes
// loaded little-endian, exactly as the C code reads a __u32 out of packet
// memory on a little-endian host.
const (
	c1 = 0xcc9e2d51
	c2 = 0x1b873593
)

func mixWord(h, w uint32) uint32 {
	w *= c1
	w = bits.RotateLeft32(w, 15)
	w *= c2
	h ^= w
	h = bits.RotateLeft32(h, 13)
	return h*5 + 0xe6546b64
}

func finish(h uint32, n uint32) uint32 {
	h ^= n
	h ^= h >> 16
	h *= 0x85ebca6b
	h ^= h >> 13
	h *= 0xc2b2ae35
	h ^= h >> 16
	return h
}

// addrWords returns the four words the datapath stores for an address: the
// 16 bytes of an IPv6 address, or the 4 bytes of an IPv4 address followed by
// twelve zero bytes.
func addrWords(a netip.Addr) [4]uint32 {
	var b [16]byte
	if a.Is4() {
		v4 := a.As4()
		copy(b[:], v4[:])
	} else {
		b = a.As16()
	}
	var w [4]uint32
	for i := range w {
		w[i] = binary.LittleEndian.Uint32(b[4*i:])
	}
	return w
}

// SourceHash is the flow hash for source affinity: it depends on the client
// address only, so every connection of a client lands on the same ring slot.
func SourceHash(seed uint32, client netip.Addr) uint32 {
	h := seed
	for _, w := range addrWords(client.Unmap()) {
		h = mixWord(h, w)
	}
	return finish(h, 16)
}

// ConnHash is the flow hash for connection affinity: client address, client
// port, service port and IP protocol number. The VIP is left out because
// every service has a ring of its own.
func ConnHash(seed uint32, client netip.Addr, clientPort, servicePort uint16, proto uint8) uint32 {
	h := seed
	for _, w := range addrWords(client.Unmap()) {
		h = mixWord(h, w)
	}
	// The ports as they sit in the TCP/UDP header: two big-endian halves.
	var p [4]byte
	binary.BigEndian.PutUint16(p[0:], clientPort)
	binary.BigEndian.PutUint16(p[2:], servicePort)
	h = mixWord(h, binary.LittleEndian.Uint32(p[:]))
	h = mixWord(h, uint32(proto))
	return finish(h, 24)
}

// AddrWords returns the four 32-bit words in which the datapath stores an
// address, the layout of every address field in the BPF maps: the 16 bytes of
// an IPv6 address, or the 4 bytes of an IPv4 address followed by twelve zero
// bytes, each word loaded little-endian from those bytes.
func AddrWords(a netip.Addr) [4]uint32 { return addrWords(a.Unmap()) }

// WordsAddr is the inverse of AddrWords for an address of the given family
// (4 or 6).
func WordsAddr(w [4]uint32, family int) netip.Addr {
	var b [16]byte
	for i := range w {
		binary.LittleEndian.PutUint32(b[4*i:], w[i])
	}
	if family == 4 {
		return netip.AddrFrom4([4]byte(b[:4]))
	}
	return netip.AddrFrom16(b)
}
