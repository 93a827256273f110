package bpftest

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
)

// TCPSegment is what a test checks of a TCP frame the program sent.
type TCPSegment struct {
	SrcMAC, DstMAC string
	VLAN           uint16
	Src, Dst       netip.AddrPort
	Seq, Ack       uint32
	Flags          uint8
	PayloadLen     int
}

// layout finds the IP and TCP headers of an untagged or tagged frame.
func layout(frame []byte) (l3 int, v4 bool, vlan uint16, err error) {
	if len(frame) < 14 {
		return 0, false, 0, fmt.Errorf("frame of %d bytes", len(frame))
	}
	l3, et := 14, binary.BigEndian.Uint16(frame[12:])
	if et == 0x8100 {
		if len(frame) < 18 {
			return 0, false, 0, fmt.Errorf("frame of %d bytes", len(frame))
		}
		vlan, et, l3 = binary.BigEndian.Uint16(frame[14:]), binary.BigEndian.Uint16(frame[16:]), 18
	}
	switch et {
	case 0x0800:
		return l3, true, vlan, nil
	case 0x86dd:
		return l3, false, vlan, nil
	}
	return 0, false, 0, fmt.Errorf("EtherType %#x", et)
}

// ParseTCP reads a TCP frame (no IP options or extension headers).
func ParseTCP(frame []byte) (TCPSegment, error) {
	l3, v4, vlan, err := layout(frame)
	if err != nil {
		return TCPSegment{}, err
	}
	var src, dst netip.Addr
	l4, total := 0, 0
	if v4 {
		if len(frame) < l3+20 || frame[l3+9] != TCP {
			return TCPSegment{}, fmt.Errorf("not a TCP/IPv4 frame")
		}
		src = netip.AddrFrom4([4]byte(frame[l3+12 : l3+16]))
		dst = netip.AddrFrom4([4]byte(frame[l3+16 : l3+20]))
		l4, total = l3+20, l3+int(binary.BigEndian.Uint16(frame[l3+2:]))
	} else {
		if len(frame) < l3+40 || frame[l3+6] != TCP {
			return TCPSegment{}, fmt.Errorf("not a TCP/IPv6 frame")
		}
		src = netip.AddrFrom16([16]byte(frame[l3+8 : l3+24]))
		dst = netip.AddrFrom16([16]byte(frame[l3+24 : l3+40]))
		l4, total = l3+40, l3+40+int(binary.BigEndian.Uint16(frame[l3+4:]))
	}
	if len(frame) < l4+20 || total != len(frame) {
		return TCPSegment{}, fmt.Errorf("IP length %d, frame %d bytes", total, len(frame))
	}
	t := frame[l4:]
	return TCPSegment{
		SrcMAC:     net.HardwareAddr(frame[6:12]).String(),
		DstMAC:     net.HardwareAddr(frame[0:6]).String(),
		VLAN:       vlan,
		Src:        netip.AddrPortFrom(src, binary.BigEndian.Uint16(t[0:])),
		Dst:        netip.AddrPortFrom(dst, binary.BigEndian.Uint16(t[2:])),
		Seq:        binary.BigEndian.Uint32(t[4:]),
		Ack:        binary.BigEndian.Uint32(t[8:]),
		Flags:      t[13] & 0x3f,
		PayloadLen: len(t) - int(t[12]>>4)*4,
	}, nil
}

// OnesSum adds b's big-endian 16-bit words (an odd last byte padded with
// zero) to the one's complement sum s, unfolded: the Internet checksum's
// sum. pktgen builds its frames' checksums with it too.
func OnesSum(b []byte, s uint32) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	return s
}

// Fold reduces a one's complement sum to 16 bits: 0xffff for data whose
// checksum is right.
func Fold(s uint32) uint16 {
	for s > 0xffff {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

// VerifyChecksums checks the IPv4 header checksum and the TCP or UDP
// checksum of a frame, as a receiver would (an IPv4 UDP checksum of 0 means
// none).
func VerifyChecksums(frame []byte) error {
	l3, v4, _, err := layout(frame)
	if err != nil {
		return err
	}
	var (
		src, dst netip.Addr
		l4       int
		proto    uint8
	)
	if v4 {
		if len(frame) < l3+20 {
			return fmt.Errorf("frame of %d bytes", len(frame))
		}
		if Fold(OnesSum(frame[l3:l3+20], 0)) != 0xffff {
			return fmt.Errorf("bad IPv4 header checksum")
		}
		src, dst = netip.AddrFrom4([4]byte(frame[l3+12:l3+16])), netip.AddrFrom4([4]byte(frame[l3+16:l3+20]))
		l4, proto = l3+20, frame[l3+9]
	} else {
		if len(frame) < l3+40 {
			return fmt.Errorf("frame of %d bytes", len(frame))
		}
		src, dst = netip.AddrFrom16([16]byte(frame[l3+8:l3+24])), netip.AddrFrom16([16]byte(frame[l3+24:l3+40]))
		l4, proto = l3+40, frame[l3+6]
	}
	seg := frame[l4:]
	if len(seg) < checksumAt(proto)+2 {
		return fmt.Errorf("L4 segment of %d bytes", len(seg))
	}
	if proto == UDP && v4 && binary.BigEndian.Uint16(seg[6:]) == 0 {
		return nil
	}
	if Fold(OnesSum(seg, OnesSum(PseudoHeader(src, dst, proto, len(seg)), 0))) != 0xffff {
		return fmt.Errorf("bad %s checksum", map[uint8]string{TCP: "TCP", UDP: "UDP"}[proto])
	}
	return nil
}
