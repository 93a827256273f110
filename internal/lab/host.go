package lab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Host is one network namespace of a lab. Every host except the wire has a
// single interface eth0 (a veth whose peer is the bridge port named Name in
// the wire namespace) and lo.
type Host struct {
	// Name is the host's role: "wire", "client", "lb" or "be<i>". It is also
	// the name of the host's bridge port in the wire namespace.
	Name string
	// NS is the name of the network namespace, as `ip netns list` shows it.
	NS string
	// Addr4 and Addr6 are the infrastructure addresses on eth0 (zero for
	// the wire).
	Addr4, Addr6 netip.Addr
	// MAC is eth0's hardware address (the bridge's for the wire).
	MAC net.HardwareAddr
	// Ifindex is eth0's interface index inside NS (the bridge's for the
	// wire).
	Ifindex int
	// PortMAC and PortIfindex describe the host's bridge port in the wire
	// namespace (zero for the wire itself).
	PortMAC     net.HardwareAddr
	PortIfindex int

	lab *Lab
	ns  netns.NsHandle
}

// Do runs fn with the network namespace of h, on a separate goroutine whose
// OS thread is locked for the duration and switched back afterwards; the
// caller's thread never changes namespace. A thread that cannot be switched
// back is discarded. Sockets created by fn stay in h's namespace. fn must not
// call t.FailNow (it runs on another goroutine); a panic in fn is re-raised.
func (h *Host) Do(fn func() error) error {
	if !h.ns.IsOpen() {
		return fmt.Errorf("host %s: namespace closed", h.Name)
	}
	return inNetns(h.ns, fn)
}

// Listen is net.Listen with the socket created in h's namespace. address
// must use IP literals (no name resolution).
func (h *Host) Listen(network, address string) (net.Listener, error) {
	var ln net.Listener
	err := h.Do(func() error {
		var err error
		ln, err = net.Listen(network, address)
		return err
	})
	return ln, err
}

// ListenPacket is net.ListenPacket with the socket created in h's namespace.
func (h *Host) ListenPacket(network, address string) (net.PacketConn, error) {
	var pc net.PacketConn
	err := h.Do(func() error {
		var err error
		pc, err = net.ListenPacket(network, address)
		return err
	})
	return pc, err
}

// Dial connects from h's namespace to raddr (an IP literal with port) over
// network ("tcp", "tcp4", "tcp6", "udp", ...), with the socket bound to
// source address laddr and an ephemeral port. A zero laddr lets the kernel
// choose. The whole dial, bounded by ctx, runs on a thread in h's namespace.
func (h *Host) Dial(ctx context.Context, network string, laddr netip.Addr, raddr string) (net.Conn, error) {
	var d net.Dialer
	if laddr.IsValid() {
		ap := netip.AddrPortFrom(laddr, 0)
		switch {
		case strings.HasPrefix(network, "tcp"):
			d.LocalAddr = net.TCPAddrFromAddrPort(ap)
		case strings.HasPrefix(network, "udp"):
			d.LocalAddr = net.UDPAddrFromAddrPort(ap)
		default:
			return nil, fmt.Errorf("dial %s: source address not supported for this network", network)
		}
	}
	var c net.Conn
	err := h.Do(func() error {
		var err error
		c, err = d.DialContext(ctx, network, raddr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial %s %s from %s in %s: %w", network, raddr, laddr, h.Name, err)
	}
	return c, nil
}

// Netlink returns a netlink handle whose sockets live in h's namespace. The
// caller closes it. (The sockets are opened on a thread switched by Do, so a
// failed switch back never returns a thread to the pool.)
func (h *Host) Netlink() (*netlink.Handle, error) {
	var nh *netlink.Handle
	err := h.Do(func() error {
		var err error
		nh, err = netlink.NewHandle()
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("netlink handle in %s: %w", h.NS, err)
	}
	return nh, nil
}

// withNetlink runs fn with a netlink handle in h's namespace.
func (h *Host) withNetlink(fn func(*netlink.Handle) error) error {
	nh, err := h.Netlink()
	if err != nil {
		return err
	}
	defer nh.Close()
	return fn(nh)
}

func (h *Host) close() error {
	if !h.ns.IsOpen() {
		return nil
	}
	err := h.ns.Close()
	h.ns = netns.None()
	if err != nil {
		return fmt.Errorf("close %s handle: %w", h.NS, err)
	}
	return nil
}

var errClosed = errors.New("lab is closed")
