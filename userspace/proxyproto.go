package userspace

import (
	"encoding/binary"
	"net/netip"
)

// proxySignature opens every PROXY protocol version 2 header (HAProxy's
// proxy-protocol.txt, section 2.2).
const proxySignature = "\r\n\r\n\x00\r\nQUIT\n"

// PROXY v2 header fields.
const (
	proxyV2Proxy = 0x21 // version 2, command PROXY
	proxyTCP4    = 0x11 // AF_INET, STREAM
	proxyTCP6    = 0x21 // AF_INET6, STREAM
)

// appendProxyHeader appends the PROXY protocol v2 header that tells a
// backend that a TCP connection comes from client and was made to vip. Both
// must be of the same family (IPv4-mapped IPv6 addresses count as IPv4).
// No TLVs are sent.
func appendProxyHeader(b []byte, client, vip netip.AddrPort) []byte {
	src, dst := client.Addr().Unmap(), vip.Addr().Unmap()
	b = append(b, proxySignature...)
	b = append(b, proxyV2Proxy)
	if src.Is4() && dst.Is4() {
		b = append(b, proxyTCP4)
		b = binary.BigEndian.AppendUint16(b, 12)
		s, d := src.As4(), dst.As4()
		b = append(b, s[:]...)
		b = append(b, d[:]...)
	} else {
		b = append(b, proxyTCP6)
		b = binary.BigEndian.AppendUint16(b, 36)
		s, d := src.As16(), dst.As16()
		b = append(b, s[:]...)
		b = append(b, d[:]...)
	}
	b = binary.BigEndian.AppendUint16(b, client.Port())
	return binary.BigEndian.AppendUint16(b, vip.Port())
}
