package userspace

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// listen opens the listening socket of a service on vip, in the proxy's
// namespace, with IP_FREEBIND (IPv4) or IPV6_FREEBIND (IPv6) so that the
// bind succeeds whether or not vip is an address of this host.
//
// Freebind only lifts the check at bind time. For connections to reach the
// socket, the kernel must deliver packets for vip locally: the address is
// on an interface (`ip addr add VIP/32 dev lo`, or moved in later by
// keepalived and the like), or a local route covers it
// (`ip route add local VIP/32 dev lo`, the "AnyIP" route, which also serves
// a whole prefix of VIPs). Where IPV6_FREEBIND is unknown (Linux before
// 4.15) IPV6_TRANSPARENT is used instead, which needs CAP_NET_ADMIN.
func (p *Proxy) listen(vip netip.AddrPort) (*net.TCPListener, error) {
	network := "tcp4"
	if vip.Addr().Is6() {
		network = "tcp6"
	}
	lc := net.ListenConfig{
		KeepAliveConfig: p.opts.KeepAlive,
		Control: func(_, _ string, rc syscall.RawConn) error {
			return control(rc, func(fd int) error {
				if err := freebind(fd, vip.Addr().Is6()); err != nil {
					return err
				}
				// Accepted sockets inherit the buffer sizes, and the
				// window scale is chosen at the handshake from them.
				if err := p.setBuffers(fd); err != nil {
					return err
				}
				// They inherit the keepalive settings too: set once
				// here, they cost no system call per connection.
				return setKeepAlive(fd, p.opts.KeepAlive)
			})
		},
		// Keepalive is set on the listening socket (above), not by net
		// on every accepted one (four setsockopt(2) calls each).
		KeepAlive: -1,
	}
	var ln net.Listener
	err := p.opts.Netns(func() error {
		var err error
		ln, err = lc.Listen(context.Background(), network, vip.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", vip, err)
	}
	return ln.(*net.TCPListener), nil
}

// freebind lets fd bind an address that is not (yet) local.
func freebind(fd int, v6 bool) error {
	if !v6 {
		if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_FREEBIND, 1); err != nil {
			return fmt.Errorf("set IP_FREEBIND: %w", err)
		}
		return nil
	}
	err := unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_FREEBIND, 1)
	if errors.Is(err, unix.ENOPROTOOPT) {
		err = unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
		if err != nil {
			return fmt.Errorf("set IPV6_TRANSPARENT (IPV6_FREEBIND is unknown to this kernel; IPV6_TRANSPARENT needs CAP_NET_ADMIN): %w", err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("set IPV6_FREEBIND: %w", err)
	}
	return nil
}

// setKeepAlive applies ka to fd as net's SetKeepAliveConfig would: zero
// fields take net's defaults (15s, 15s, 9 probes), negative ones leave the
// kernel's value. Sockets accepted from a listening fd inherit them.
func setKeepAlive(fd int, ka net.KeepAliveConfig) error {
	if !ka.Enable {
		return nil
	}
	secs := func(d time.Duration) int {
		if d == 0 {
			d = 15 * time.Second
		}
		return int((d + time.Second - 1) / time.Second)
	}
	opts := []struct {
		level, opt, v int
		skip          bool
		name          string
	}{
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1, false, "SO_KEEPALIVE"},
		{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, secs(ka.Idle), ka.Idle < 0, "TCP_KEEPIDLE"},
		{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, secs(ka.Interval), ka.Interval < 0, "TCP_KEEPINTVL"},
		{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, cmp.Or(ka.Count, 9), ka.Count < 0, "TCP_KEEPCNT"},
	}
	for _, o := range opts {
		if o.skip {
			continue
		}
		if err := unix.SetsockoptInt(fd, o.level, o.opt, o.v); err != nil {
			return fmt.Errorf("set %s: %w", o.name, err)
		}
	}
	return nil
}

// setBuffers caps the socket's kernel buffers at Options.SocketBuffer, if
// set; otherwise the kernel sizes them (tcp_rmem, tcp_wmem).
func (p *Proxy) setBuffers(fd int) error {
	if p.opts.SocketBuffer <= 0 {
		return nil
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, p.opts.SocketBuffer); err != nil {
		return fmt.Errorf("set SO_RCVBUF: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, p.opts.SocketBuffer); err != nil {
		return fmt.Errorf("set SO_SNDBUF: %w", err)
	}
	return nil
}

// dial connects to a backend from the proxy's namespace, within
// Options.DialTimeout, with keepalive and buffer settings.
func (p *Proxy) dial(ctx context.Context, b netip.AddrPort) (*net.TCPConn, error) {
	d := net.Dialer{
		Timeout:         p.opts.DialTimeout,
		KeepAliveConfig: p.opts.KeepAlive,
		Control: func(_, _ string, rc syscall.RawConn) error {
			return control(rc, p.setBuffers)
		},
	}
	if !p.opts.KeepAlive.Enable {
		d.KeepAlive = -1
	}
	network := "tcp4"
	if b.Addr().Is6() {
		network = "tcp6"
	}
	var c net.Conn
	err := p.opts.Netns(func() error {
		var err error
		c, err = d.DialContext(ctx, network, b.String())
		return err
	})
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// control runs fn on rc's file descriptor and returns the first error.
func control(rc syscall.RawConn, fn func(fd int) error) error {
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

// reset closes c with a TCP reset instead of a FIN (SO_LINGER 0), so that
// its peer fails at once.
func reset(c *net.TCPConn) {
	_ = c.SetLinger(0)
	_ = c.Close()
}

// clientOf returns the address of c's peer as the XDP program sees it in
// the packet: net gives IPv4 peers as IPv4-mapped IPv6 addresses, which
// would hash differently.
func clientOf(c net.Conn) netip.AddrPort {
	ap := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}
