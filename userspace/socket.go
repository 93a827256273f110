package userspace

import (
	"cmp"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// listen opens the listening sockets of a service on vip, n of them
// (one per event loop, with SO_REUSEPORT so that the kernel spreads the
// clients over them), in the proxy's namespace, with IP_FREEBIND (IPv4) or
// IPV6_FREEBIND (IPv6) so that the bind succeeds whether or not vip is an
// address of this host.
//
// Freebind only lifts the check at bind time. For connections to reach the
// socket, the kernel must deliver packets for vip locally: the address is
// on an interface (`ip addr add VIP/32 dev lo`, or moved in later by
// keepalived and the like), or a local route covers it
// (`ip route add local VIP/32 dev lo`, the "AnyIP" route, which also serves
// a whole prefix of VIPs). Where IPV6_FREEBIND is unknown (Linux before
// 4.15) IPV6_TRANSPARENT is used instead, which needs CAP_NET_ADMIN.
func (p *Proxy) listen(vip netip.AddrPort, n int) ([]int, error) {
	var fds []int
	err := p.opts.Netns(func() error {
		if n > 1 {
			// SO_REUSEPORT would also let these sockets join those of
			// another process of the same user on vip, a second tether
			// say, and share its clients without a word. A socket without
			// it finds such a listener: its bind fails (EADDRINUSE), as a
			// single listening socket's would.
			fd, err := p.bindOne(vip, false)
			if err != nil {
				return err
			}
			closeFD(fd)
		}
		for range n {
			fd, err := p.listenOne(vip, n > 1)
			if err != nil {
				return err
			}
			fds = append(fds, fd)
		}
		return nil
	})
	if err != nil {
		for _, fd := range fds {
			closeFD(fd)
		}
		return nil, fmt.Errorf("listen on %s: %w", vip, err)
	}
	return fds, nil
}

// listenOne opens one listening socket on vip.
func (p *Proxy) listenOne(vip netip.AddrPort, reusePort bool) (int, error) {
	fd, err := p.bindOne(vip, reusePort)
	if err != nil {
		return -1, err
	}
	// The kernel caps the backlog at net.core.somaxconn, as net does.
	if _, _, e := unix.RawSyscall(unix.SYS_LISTEN, uintptr(fd), 65535, 0); e != 0 {
		closeFD(fd)
		return -1, os.NewSyscallError("listen", e)
	}
	return fd, nil
}

// bindOne makes a socket with the options of a listening one and binds
// it to vip.
func (p *Proxy) bindOne(vip netip.AddrPort, reusePort bool) (int, error) {
	sa, salen, family := rawSockaddr(vip)
	r, _, e := unix.RawSyscall(unix.SYS_SOCKET, uintptr(family), unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if e != 0 {
		return -1, os.NewSyscallError("socket", e)
	}
	fd := int(r)
	if err := p.listenOptions(fd, vip.Addr().Is6(), reusePort); err != nil {
		closeFD(fd)
		return -1, err
	}
	if _, _, e := unix.RawSyscall(unix.SYS_BIND, uintptr(fd), uintptr(sa), salen); e != 0 {
		closeFD(fd)
		return -1, os.NewSyscallError("bind", e)
	}
	return fd, nil
}

// listenOptions sets the options of a listening socket. Accepted sockets
// inherit the buffer sizes (and the window scale is chosen at the
// handshake from them), keepalive and TCP_NODELAY: set once here, they
// cost no system call per connection.
func (p *Proxy) listenOptions(fd int, v6, reusePort bool) error {
	if err := setsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return fmt.Errorf("set SO_REUSEADDR: %w", err)
	}
	if reusePort {
		if err := setsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			return fmt.Errorf("set SO_REUSEPORT: %w", err)
		}
	}
	if v6 {
		if err := setsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1); err != nil {
			return fmt.Errorf("set IPV6_V6ONLY: %w", err)
		}
	}
	if err := freebind(fd, v6); err != nil {
		return err
	}
	if err := setKeepAlive(fd, p.opts.KeepAlive); err != nil {
		return err
	}
	return p.connOptions(fd)
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

// dial makes the socket to a backend in the proxy's namespace, with
// buffer settings and TCP_NODELAY, and starts connecting it (its keepalive
// comes later: loop.keepAliveLater). The socket is
// non-blocking: connected says whether the handshake is over already
// (over veth or loopback it often is when connect returns); if not, the
// returned dialing lets the loop ask again once the socket is writable, as
// HAProxy does.
func (p *Proxy) dial(b netip.AddrPort) (fd int, d *dialing, err error) {
	sa, salen, family := rawSockaddr(b)
	if err := p.opts.Netns(func() error {
		r, _, e := unix.RawSyscall(unix.SYS_SOCKET, uintptr(family), unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		if e != 0 {
			return os.NewSyscallError("socket", e)
		}
		fd = int(r)
		return nil
	}); err != nil {
		return -1, nil, err
	}
	if err := p.connOptions(fd); err != nil {
		closeFD(fd)
		return -1, nil, err
	}
	cerr := connectRaw(fd, sa, salen)
	if cerr == unix.EINPROGRESS {
		if cerr = connectRaw(fd, sa, salen); cerr == unix.EISCONN {
			cerr = 0
		}
	}
	switch cerr {
	case 0:
		return fd, nil, nil
	case unix.EINPROGRESS, unix.EALREADY:
		d = &dialing{salen: salen}
		copy(d.sa[:salen], unsafe.Slice((*byte)(sa), salen))
		return fd, d, nil
	}
	closeFD(fd)
	return -1, nil, os.NewSyscallError("connect", cerr)
}

// connOptions sets the options that both sockets of a connection have
// from the start: buffers and TCP_NODELAY (as net does). A socket to a
// backend gets them before it connects, a client's socket from its
// listening one.
func (p *Proxy) connOptions(fd int) error {
	if err := p.setBuffers(fd); err != nil {
		return err
	}
	if err := setsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
		return fmt.Errorf("set TCP_NODELAY: %w", err)
	}
	return nil
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
// the call on a connection's path (see splice).
func setsockoptInt(fd, level, opt, v int) error {
	v32 := int32(v)
	_, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&v32)), unsafe.Sizeof(v32), 0)
	if e != 0 {
		return e
	}
	return nil
}

// sockaddrAddrPort returns the address of an accepted client as the XDP
// program sees it in the packet (IPv4 as IPv4, not IPv4-mapped IPv6,
// which would hash differently).
func sockaddrAddrPort(rsa *unix.RawSockaddrAny) netip.AddrPort {
	switch rsa.Addr.Family {
	case unix.AF_INET:
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(rsa))
		port := (*[2]byte)(unsafe.Pointer(&sa.Port))
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(port[0])<<8|uint16(port[1]))
	case unix.AF_INET6:
		sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(rsa))
		port := (*[2]byte)(unsafe.Pointer(&sa.Port))
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(port[0])<<8|uint16(port[1]))
	}
	return netip.AddrPort{}
}
