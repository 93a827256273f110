package userspace

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"syscall"
	"time"
	"unsafe"

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
		// on every accepted one (four setsockopt(2) calls each): net
		// sets it on each accepted socket whenever KeepAliveConfig is
		// enabled, whatever KeepAlive says, so KeepAliveConfig stays
		// zero here.
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
		if err := setsockoptInt(fd, o.level, o.opt, o.v); err != nil {
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
	if err := setsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, p.opts.SocketBuffer); err != nil {
		return fmt.Errorf("set SO_RCVBUF: %w", err)
	}
	if err := setsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, p.opts.SocketBuffer); err != nil {
		return fmt.Errorf("set SO_SNDBUF: %w", err)
	}
	return nil
}

// sock is a connected TCP socket of the proxy: a *net.TCPConn (clients)
// or the *os.File of a socket that dial made.
type sock interface {
	syscall.Conn
	io.Writer
	SetWriteDeadline(time.Time) error
	Close() error
}

// dial connects to a backend from the proxy's namespace, within
// Options.DialTimeout, with keepalive and buffer settings.
//
// It makes the socket itself, with raw system calls, rather than with
// net.Dialer: per connection, that saves the runtime's system call path
// on half a dozen calls (see spliceRetry), the getsockname and getpeername
// that net makes for addresses the proxy never reads, and a deep stack
// that a new goroutine had to grow. The socket is handed to the runtime's
// poller as an *os.File, which splices as a *net.TCPConn does.
func (p *Proxy) dial(ctx context.Context, b netip.AddrPort) (sock, error) {
	sa, salen, family := rawSockaddr(b)
	var fd int
	err := p.opts.Netns(func() error {
		r, _, e := unix.RawSyscall(unix.SYS_SOCKET, uintptr(family), unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		if e != 0 {
			return os.NewSyscallError("socket", e)
		}
		fd = int(r)
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := p.dialOptions(fd); err != nil {
		unix.Close(fd)
		return nil, err
	}
	cerr := connectRaw(fd, sa, salen)
	if cerr == unix.EINPROGRESS {
		// Over veth or loopback the handshake is often over when
		// connect returns: then no deadline or wait is needed.
		if cerr = connectRaw(fd, sa, salen); cerr == unix.EISCONN {
			cerr = 0
		}
	}
	if cerr != 0 && cerr != unix.EINPROGRESS && cerr != unix.EALREADY {
		unix.Close(fd)
		return nil, os.NewSyscallError("connect", cerr)
	}
	f := os.NewFile(uintptr(fd), "backend")
	if cerr == 0 {
		return f, nil
	}
	if err := p.waitConnected(ctx, f, sa, salen); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// dialOptions sets the options of a socket to a backend before it
// connects: buffers, keepalive and TCP_NODELAY (as net does).
func (p *Proxy) dialOptions(fd int) error {
	if err := p.setBuffers(fd); err != nil {
		return err
	}
	if err := setKeepAlive(fd, p.opts.KeepAlive); err != nil {
		return err
	}
	if err := setsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
		return fmt.Errorf("set TCP_NODELAY: %w", err)
	}
	return nil
}

// waitConnected waits until f's connection is established or failed,
// within Options.DialTimeout and ctx. It asks with connect(2) again, as
// HAProxy does: 0 or EISCONN once established, EALREADY while in
// progress, the connection's error once failed.
func (p *Proxy) waitConnected(ctx context.Context, f *os.File, sa unsafe.Pointer, salen uintptr) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	if err := f.SetWriteDeadline(time.Now().Add(p.opts.DialTimeout)); err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { f.SetWriteDeadline(time.Unix(1, 0)) })
	// Ask first, then wait: RawConn.Write forgets a readiness that came
	// before it was called, and on veth or loopback the handshake is
	// often over by now anyway.
	var cerr syscall.Errno
	err = rc.Write(func(fd uintptr) bool {
		cerr = connectRaw(int(fd), sa, salen)
		return cerr != unix.EALREADY && cerr != unix.EINPROGRESS
	})
	if !stop() {
		return ctx.Err()
	}
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return fmt.Errorf("connect: timed out after %v", p.opts.DialTimeout)
		}
		return err
	}
	if cerr != 0 && cerr != unix.EISCONN {
		return os.NewSyscallError("connect", cerr)
	}
	return f.SetWriteDeadline(time.Time{})
}

// rawSockaddr is b as a struct sockaddr for connect(2).
func rawSockaddr(b netip.AddrPort) (unsafe.Pointer, uintptr, int) {
	port := [2]byte{byte(b.Port() >> 8), byte(b.Port())}
	if a := b.Addr(); a.Is4() {
		sa := &unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: a.As4()}
		*(*[2]byte)(unsafe.Pointer(&sa.Port)) = port
		return unsafe.Pointer(sa), unsafe.Sizeof(*sa), unix.AF_INET
	}
	sa := &unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: b.Addr().As16()}
	*(*[2]byte)(unsafe.Pointer(&sa.Port)) = port
	if z := b.Addr().Zone(); z != "" {
		if ifi, err := net.InterfaceByName(z); err == nil {
			sa.Scope_id = uint32(ifi.Index)
		} else if n, err := strconv.ParseUint(z, 10, 32); err == nil {
			sa.Scope_id = uint32(n)
		}
	}
	return unsafe.Pointer(sa), unsafe.Sizeof(*sa), unix.AF_INET6
}

// connectRaw is connect(2) as a raw system call: on a non-blocking socket
// it never waits.
func connectRaw(fd int, sa unsafe.Pointer, salen uintptr) syscall.Errno {
	for {
		_, _, e := unix.RawSyscall(unix.SYS_CONNECT, uintptr(fd), uintptr(sa), salen)
		if e != syscall.EINTR {
			return e
		}
	}
}

// setsockoptInt is unix.SetsockoptInt as a raw system call: setting an
// option never blocks, and the runtime's system call path costs more than
// the call on a connection's path (see spliceRetry).
func setsockoptInt(fd, level, opt, v int) error {
	v32 := int32(v)
	_, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&v32)), unsafe.Sizeof(v32), 0)
	if e != 0 {
		return e
	}
	return nil
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
func reset(c sock) {
	if rc, err := c.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) {
			l := unix.Linger{Onoff: 1, Linger: 0}
			unix.RawSyscall6(unix.SYS_SETSOCKOPT, fd, unix.SOL_SOCKET, unix.SO_LINGER, uintptr(unsafe.Pointer(&l)), unsafe.Sizeof(l), 0)
		})
	}
	_ = c.Close()
}

// clientOf returns the address of c's peer as the XDP program sees it in
// the packet: net gives IPv4 peers as IPv4-mapped IPv6 addresses, which
// would hash differently.
func clientOf(c net.Conn) netip.AddrPort {
	ap := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}
