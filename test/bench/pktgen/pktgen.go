// Package pktgen measures packet rates on the wire through balancers in a
// lab of network namespaces (package lab), with small XDP programs written
// as github.com/cilium/ebpf/asm instructions:
//
//   - Generator transmits UDP (IPv4 or IPv6; or TCP over IPv4: a flood of
//     spoofed SYNs or ACKs) frames with BPF_PROG_TEST_RUN in live-frame
//     mode (like xdp-trafficgen), varying the source address and port of
//     each frame, so that one call puts millions of frames of many flows
//     on an interface without a socket or a user-space loop;
//   - Counter counts the frames of one UDP destination port that arrive at
//     an interface, and drops them;
//   - Forwarder is the floor of an XDP balancer: it rewrites the Ethernet
//     addresses of the frames it takes and sends them back out with
//     XDP_TX, to one backend, or spread over several by client address
//     (AttachSpreadForwarder), or after a lookup in a flow table
//     (AttachTableForwarder, AttachArrayForwarder).
//
// EnableRunStats, RunStats and XDPProgramID read what the kernel measures of
// an attached program (run count and run time), whoever loaded it.
//
// Interface indexes are always resolved in the network namespace of the
// calling thread, so callers use them inside lab.Host.Do. Everything here
// needs root (CAP_BPF and CAP_NET_ADMIN) except UDPFrame.
package pktgen

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/internal/bpftest"
)

// Frame layout of UDPFrame and TCPFrame (IPv4 header without options).
const (
	ethLen    = 14
	ipv4Len   = 20
	udpLen    = 8
	tcpLen    = 20
	hdrLen    = ethLen + ipv4Len + udpLen // 42: first payload byte
	tcpHdrLen = ethLen + ipv4Len + tcpLen // 54
	minFrame  = 60                        // Ethernet minimum without FCS
	maxFrame  = ethLen + 0xffff           // IPv4 total length is 16 bits

	offEtherType = 12
	offIPv4      = ethLen
	offIPProto   = offIPv4 + 9
	offIPCsum    = offIPv4 + 10
	offIPSrc     = offIPv4 + 12
	offIPDst     = offIPv4 + 16
	offUDP       = offIPv4 + ipv4Len
	offUDPSport  = offUDP
	offUDPDport  = offUDP + 2
	offTCPCsum   = offUDP + 16 // the TCP header starts where the UDP one would

	etherTypeIPv4 = 0x0800
	protoUDP      = 17
	protoTCP      = 6
)

// Frame layout of UDPFrame6 (an IPv6 header without extension headers).
const (
	ipv6Len       = 40
	hdrLen6       = ethLen + ipv6Len + udpLen // 62
	offIP6Next    = ethLen + 6
	offIP6Src     = ethLen + 8
	offIP6SrcLow  = offIP6Src + 12 // the source address's last 32 bits, which the generator varies
	offIP6Dst     = ethLen + 24
	offUDP6       = ethLen + ipv6Len
	offUDP6Csum   = offUDP6 + 6
	etherTypeIPv6 = 0x86dd
)

// UDPFrame builds an Ethernet/IPv4/UDP frame of size bytes from srcMAC to
// dstMAC and from src to dst, with a correct IPv4 header checksum and UDP
// checksum 0 (none). A size below 60 (the Ethernet minimum, without FCS)
// gives 60; the payload is zeros. The IPv4 header has no options, TTL 64,
// DF set and IP ID 0.
//
// UDPFrame panics on a MAC that is not 6 bytes, an address that is not
// IPv4 (IPv4-mapped IPv6 is accepted) or a size above 65549.
func UDPFrame(srcMAC, dstMAC net.HardwareAddr, src, dst netip.AddrPort, size int) []byte {
	s, d := checkEnds("UDPFrame", srcMAC, dstMAC, src, dst)
	size = max(size, minFrame)
	if size > maxFrame {
		panic(fmt.Sprintf("pktgen.UDPFrame: size %d above %d", size, maxFrame))
	}
	// bpftest's frames have the same header fields; the IPv4 checksum,
	// which its tests never need, is pktgen's to write.
	b := bpftest.Frame{
		SrcMAC: srcMAC, DstMAC: dstMAC,
		Src: netip.AddrPortFrom(s, src.Port()), Dst: netip.AddrPortFrom(d, dst.Port()),
		Proto: bpftest.UDP, Payload: make([]byte, size-hdrLen),
	}.Bytes()
	ip := b[offIPv4:offUDP]
	binary.BigEndian.PutUint16(ip[10:], ipv4Checksum(ip))
	return b
}

// TCPFrame builds an Ethernet/IPv4/TCP frame without payload or options
// from srcMAC to dstMAC and from src to dst, with the TCP flags given
// (bpftest.SYN, bpftest.ACK...) and correct checksums. A generator sends
// it with its source address and port varied, both checksums rewritten,
// as a flood of spoofed handshakes or ACKs. It panics as UDPFrame does.
func TCPFrame(srcMAC, dstMAC net.HardwareAddr, src, dst netip.AddrPort, flags uint8) []byte {
	s, d := checkEnds("TCPFrame", srcMAC, dstMAC, src, dst)
	b := bpftest.Frame{
		SrcMAC: srcMAC, DstMAC: dstMAC,
		Src: netip.AddrPortFrom(s, src.Port()), Dst: netip.AddrPortFrom(d, dst.Port()),
		Proto: bpftest.TCP, Flags: flags, Seq: 1, Checksum: true,
	}.Bytes()
	ip := b[offIPv4:offUDP]
	binary.BigEndian.PutUint16(ip[10:], ipv4Checksum(ip))
	return b
}

// UDPFrame6 is UDPFrame for IPv6: an Ethernet/IPv6/UDP frame of size
// bytes (at least 64), hop limit 64, no extension headers, with its UDP
// checksum (IPv6 requires one). It panics on a MAC that is not 6 bytes, an
// address that is not IPv6 or a size above 65589.
func UDPFrame6(srcMAC, dstMAC net.HardwareAddr, src, dst netip.AddrPort, size int) []byte {
	if len(srcMAC) != 6 || len(dstMAC) != 6 {
		panic(fmt.Sprintf("pktgen.UDPFrame6: MACs must be 6 bytes, have %v and %v", srcMAC, dstMAC))
	}
	if !src.Addr().Is6() || src.Addr().Is4In6() || !dst.Addr().Is6() || dst.Addr().Is4In6() {
		panic(fmt.Sprintf("pktgen.UDPFrame6: %v -> %v is not IPv6", src, dst))
	}
	size = max(size, 64)
	if size > offUDP6+0xffff {
		panic(fmt.Sprintf("pktgen.UDPFrame6: size %d above %d", size, offUDP6+0xffff))
	}
	return bpftest.Frame{
		SrcMAC: srcMAC, DstMAC: dstMAC, Src: src, Dst: dst,
		Proto: bpftest.UDP, Payload: make([]byte, size-hdrLen6), Checksum: true,
	}.Bytes()
}

// checkEnds panics, naming fn, unless both MACs are 6 bytes and both
// addresses IPv4 (IPv4-mapped IPv6 accepted); it returns the addresses
// unmapped.
func checkEnds(fn string, srcMAC, dstMAC net.HardwareAddr, src, dst netip.AddrPort) (s, d netip.Addr) {
	if len(srcMAC) != 6 || len(dstMAC) != 6 {
		panic(fmt.Sprintf("pktgen.%s: MACs must be 6 bytes, have %v and %v", fn, srcMAC, dstMAC))
	}
	s, d = src.Addr().Unmap(), dst.Addr().Unmap()
	if !s.Is4() || !d.Is4() {
		panic(fmt.Sprintf("pktgen.%s: %v -> %v is not IPv4", fn, src, dst))
	}
	return s, d
}

// ipv4Checksum is the checksum of header hdr with its checksum field
// (bytes 10 and 11) taken as zero.
func ipv4Checksum(hdr []byte) uint16 {
	sum := bpftest.OnesSum(hdr, 0) - uint32(binary.BigEndian.Uint16(hdr[10:]))
	return ^bpftest.Fold(sum)
}

// EnableRunStats turns on the kernel's BPF run-time statistics (run_time_ns
// and run_cnt of every program, ebpf.EnableStats with
// unix.BPF_STATS_RUN_TIME) until the returned closer is closed. Statistics
// stay on while any holder keeps them on, and cost some nanoseconds per
// program run while on.
func EnableRunStats() (io.Closer, error) {
	c, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		return nil, fmt.Errorf("enable bpf run-time statistics: %w", err)
	}
	return c, nil
}

// RunStats returns the accumulated run time and run count of the program
// with id, as the kernel counts them while statistics are on (see
// EnableRunStats). The program may belong to another process.
func RunStats(id ebpf.ProgramID) (runtime time.Duration, count uint64, err error) {
	prog, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return 0, 0, fmt.Errorf("open program %d: %w", id, err)
	}
	defer prog.Close()
	// cilium/ebpf v0.22 moved Runtime and RunCount from ProgramInfo to
	// ProgramStats; both come from the same bpf_prog_info fields.
	st, err := prog.Stats()
	if err != nil {
		return 0, 0, fmt.Errorf("statistics of program %d: %w", id, err)
	}
	return st.Runtime, st.RunCount, nil
}

// TimeRuns runs send while the run-time statistics are on (see
// EnableRunStats) and returns the ns a run of program id took meanwhile,
// and its runs (0 and 0 if it did not run).
func TimeRuns(id ebpf.ProgramID, send func() error) (ns float64, runs uint64, err error) {
	t0, n0, err := RunStats(id)
	if err != nil {
		return 0, 0, err
	}
	if err := send(); err != nil {
		return 0, 0, err
	}
	t1, n1, err := RunStats(id)
	if err != nil || n1 <= n0 {
		return 0, 0, err
	}
	return float64((t1 - t0).Nanoseconds()) / float64(n1-n0), n1 - n0, nil
}

// XDPProgramID returns the id of the XDP program attached to interface
// ifindex, in the network namespace of the calling thread, or an error
// naming the interface if none is attached.
func XDPProgramID(ifindex int) (ebpf.ProgramID, error) {
	// A handle of its own: its socket is opened in the calling thread's
	// namespace, whatever the package handle did before.
	nh, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return 0, fmt.Errorf("netlink handle: %w", err)
	}
	defer nh.Close()
	lk, err := nh.LinkByIndex(ifindex)
	if err != nil {
		return 0, fmt.Errorf("interface %d: %w", ifindex, err)
	}
	a := lk.Attrs()
	if a.Xdp == nil || !a.Xdp.Attached || a.Xdp.ProgId == 0 {
		return 0, fmt.Errorf("interface %s (index %d): %w", a.Name, ifindex, ErrNoXDP)
	}
	return ebpf.ProgramID(a.Xdp.ProgId), nil
}

// ErrNoXDP is wrapped by XDPProgramID when the interface has no XDP program.
var ErrNoXDP = errors.New("no XDP program attached")
