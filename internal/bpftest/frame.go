// Package bpftest crafts Ethernet frames for running tether's XDP program
// with BPF_PROG_TEST_RUN, in tests and benchmarks. An IPv4 header carries
// its checksum (the program checks it on packets of new flows); TCP and UDP
// checksums are left zero unless Frame.Checksum asks for them (the program
// updates them when it translates addresses).
package bpftest

import (
	"encoding/binary"
	"net"
	"net/netip"
)

// Protocol numbers.
const (
	TCP = 6
	UDP = 17
)

// TCP flags.
const (
	FIN = 0x01
	SYN = 0x02
	RST = 0x04
	PSH = 0x08
	ACK = 0x10
)

// Frame describes a frame to build.
type Frame struct {
	SrcMAC, DstMAC net.HardwareAddr
	VLAN           uint16 // 0: untagged
	Src, Dst       netip.AddrPort
	Proto          uint8 // TCP or UDP
	Flags          uint8 // TCP flags; 0 means ACK
	Seq, Ack       uint32
	Payload        []byte
	// Checksum fills in the TCP or UDP checksum.
	Checksum bool
}

// Default MACs of crafted frames.
var (
	ClientMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x01}
	LBMAC     = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x02}
)

// Bytes builds the frame.
func (f Frame) Bytes() []byte {
	l4 := f.l4()
	var l3 []byte
	if f.Src.Addr().Is4() {
		l3 = make([]byte, 20, 20+len(l4))
		l3[0] = 0x45
		binary.BigEndian.PutUint16(l3[2:], uint16(20+len(l4)))
		l3[6] = 0x40 // DF
		l3[8] = 64
		l3[9] = f.Proto
		s, d := f.Src.Addr().As4(), f.Dst.Addr().As4()
		copy(l3[12:], s[:])
		copy(l3[16:], d[:])
		binary.BigEndian.PutUint16(l3[10:], ^Fold(OnesSum(l3, 0)))
	} else {
		l3 = make([]byte, 40, 40+len(l4))
		l3[0] = 0x60
		binary.BigEndian.PutUint16(l3[4:], uint16(len(l4)))
		l3[6] = f.Proto
		l3[7] = 64
		s, d := f.Src.Addr().As16(), f.Dst.Addr().As16()
		copy(l3[8:], s[:])
		copy(l3[24:], d[:])
	}
	if f.Checksum {
		c := ^Fold(OnesSum(l4, OnesSum(PseudoHeader(f.Src.Addr(), f.Dst.Addr(), f.Proto, len(l4)), 0)))
		if c == 0 && f.Proto == UDP {
			c = 0xffff
		}
		binary.BigEndian.PutUint16(l4[checksumAt(f.Proto):], c)
	}
	return append(f.ethernet(f.Src.Addr().Is4()), append(l3, l4...)...)
}

// PseudoHeader is the part of the IP header a TCP or UDP checksum covers.
func PseudoHeader(src, dst netip.Addr, proto uint8, l4len int) []byte {
	if src.Is4() {
		s, d := src.As4(), dst.As4()
		b := append(append(append([]byte{}, s[:]...), d[:]...), 0, proto)
		return binary.BigEndian.AppendUint16(b, uint16(l4len))
	}
	s, d := src.As16(), dst.As16()
	b := binary.BigEndian.AppendUint32(append(append([]byte{}, s[:]...), d[:]...), uint32(l4len))
	return append(b, 0, 0, 0, proto)
}

// checksumAt is where a TCP or UDP header holds its checksum.
func checksumAt(proto uint8) int {
	if proto == UDP {
		return 6
	}
	return 16
}

func (f Frame) ethernet(v4 bool) []byte {
	src, dst := f.SrcMAC, f.DstMAC
	if src == nil {
		src = ClientMAC
	}
	if dst == nil {
		dst = LBMAC
	}
	eth := make([]byte, 0, 18)
	eth = append(eth, dst...)
	eth = append(eth, src...)
	if f.VLAN != 0 {
		eth = binary.BigEndian.AppendUint16(eth, 0x8100)
		eth = binary.BigEndian.AppendUint16(eth, f.VLAN)
	}
	if v4 {
		return binary.BigEndian.AppendUint16(eth, 0x0800)
	}
	return binary.BigEndian.AppendUint16(eth, 0x86dd)
}

func (f Frame) l4() []byte {
	var h []byte
	if f.Proto == UDP {
		h = make([]byte, 8)
		binary.BigEndian.PutUint16(h[4:], uint16(8+len(f.Payload)))
	} else {
		h = make([]byte, 20)
		h[12] = 5 << 4
		h[13] = f.Flags
		if f.Flags == 0 {
			h[13] = ACK
		}
		binary.BigEndian.PutUint16(h[14:], 65535)
	}
	binary.BigEndian.PutUint16(h[0:], f.Src.Port())
	binary.BigEndian.PutUint16(h[2:], f.Dst.Port())
	if f.Proto != UDP {
		binary.BigEndian.PutUint32(h[4:], f.Seq)
		binary.BigEndian.PutUint32(h[8:], f.Ack)
	}
	return append(h, f.Payload...)
}

// L3Offset is where the IP header starts in a frame built without a VLAN tag.
const L3Offset = 14
