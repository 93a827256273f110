package pktgen

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/internal/bpftest"
)

// packetBatch is how many frames the AF_PACKET sender hands the kernel per
// sendmmsg(2).
const packetBatch = 64

// liveRefused says whether err is the kernel refusing live-frame mode
// itself (a kernel before 5.18, or one whose security policy forbids
// injecting frames from BPF_PROG_TEST_RUN), as opposed to a failure of
// the run.
func liveRefused(err error) bool {
	return errors.Is(err, unix.EPERM) || errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL)
}

// sendPacket transmits count frames of st's sequence out of interface
// ifindex from an AF_PACKET socket (opened in the calling thread's network
// namespace, qdisc bypassed), packetBatch frames per sendmmsg(2). Each
// frame is written from st as the generator's program would: the template
// headers, the flow's source address and port, the IPv4 checksum. It is
// the generator's way where the kernel refuses live frames: slower (one
// system call per batch, frames built in Go), and it says so in Method.
func sendPacket(ifindex int, frame []byte, count uint32, st genState, sources, ports int) (time.Duration, uint64, error) {
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0) // protocol 0: send only
	if err != nil {
		return 0, 0, fmt.Errorf("generator: AF_PACKET socket: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_QDISC_BYPASS, 1); err != nil {
		return 0, 0, fmt.Errorf("generator: PACKET_QDISC_BYPASS: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Ifindex: ifindex}); err != nil {
		return 0, 0, fmt.Errorf("generator: bind AF_PACKET socket to interface %d: %w", ifindex, err)
	}
	bufs := make([][]byte, packetBatch)
	iovs := make([]unix.Iovec, packetBatch)
	msgs := make([]unix.Mmsghdr, packetBatch)
	for i := range bufs {
		bufs[i] = append([]byte(nil), frame...)
		iovs[i].Base = &bufs[i][0]
		iovs[i].SetLen(len(frame))
		msgs[i].Hdr.Iov = &iovs[i]
		msgs[i].Hdr.Iovlen = 1
	}
	flows := uint64(sources * ports)
	var sent uint64
	start := time.Now()
	for sent < uint64(count) {
		n := min(uint64(packetBatch), uint64(count)-sent)
		for i := range n {
			writeFlow(bufs[i], st, (sent+i)%flows, uint64(ports))
		}
		done := uint64(0)
		for done < n {
			r, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, uintptr(fd), uintptr(unsafe.Pointer(&msgs[done])), uintptr(n-done), 0, 0, 0)
			switch {
			case errno == unix.EINTR:
				continue
			case errno == unix.ENOBUFS || errno == unix.EAGAIN:
				// The device's queue is full: the frame is lost, as a
				// full ring loses it with live frames. Count it sent.
				done++
				continue
			case errno != 0:
				return time.Since(start), sent + done, fmt.Errorf("generator: sendmmsg on interface %d: %w", ifindex, errno)
			}
			done += uint64(r)
		}
		sent += n
	}
	return time.Since(start), sent, nil
}

// writeFlow writes flow f's frame into b (which holds the template frame):
// the headers from the template, source port st.Port + f mod ports, source
// address (its last 32 bits with IPv6) st.Addr + f div ports, the IPv4
// header checksum and a TCP or IPv6 UDP frame's checksum.
func writeFlow(b []byte, st genState, f, ports uint64) {
	lay := layoutOf(b)
	copy(b, st.Template[:lay.hdr])
	port := uint16(st.Port + f%ports)
	binary.BigEndian.PutUint16(b[lay.sport:], port)
	addr := uint32(st.Addr + f/ports)
	binary.BigEndian.PutUint32(b[lay.src:], addr)
	if lay.ipCsum != 0 {
		sum := uint32(st.Sum) + addr>>16 + addr&0xffff
		binary.BigEndian.PutUint16(b[lay.ipCsum:], ^bpftest.Fold(sum))
	}
	if lay.l4Csum != 0 {
		c := ^bpftest.Fold(uint32(st.L4Sum) + addr>>16 + addr&0xffff + uint32(port))
		if c == 0 && lay.udp {
			c = 0xffff
		}
		binary.BigEndian.PutUint16(b[lay.l4Csum:], c)
	}
}
