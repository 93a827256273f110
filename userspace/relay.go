package userspace

import (
	"container/heap"
	"fmt"
	"io"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// pipe is a kernel pipe that carries a connection's bytes from one socket
// to the other with splice(2), without copying them to userspace.
type pipe struct{ r, w int }

func (p pipe) close() {
	unix.Close(p.r)
	unix.Close(p.w)
}

// pipePool lends pipes to connections while they have bytes in flight. A
// connection holds a pipe per direction only from the moment data is
// readable until the pipe is empty again and its source has nothing more
// to read; idle connections hold none. At most max idle pipes are kept.
type pipePool struct {
	size int // capacity asked for with F_SETPIPE_SZ

	mu     sync.Mutex
	free   []pipe
	max    int
	closed bool
}

func (pp *pipePool) get() (pipe, error) {
	pp.mu.Lock()
	if n := len(pp.free); n > 0 {
		p := pp.free[n-1]
		pp.free = pp.free[:n-1]
		pp.mu.Unlock()
		return p, nil
	}
	pp.mu.Unlock()
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return pipe{}, fmt.Errorf("create pipe: %w", err)
	}
	if pp.size != defaultPipeSize {
		// Best effort: an unprivileged process cannot go past
		// /proc/sys/fs/pipe-max-size, and splice then moves less per call.
		unix.FcntlInt(uintptr(fds[0]), unix.F_SETPIPE_SZ, pp.size)
	}
	return pipe{r: fds[0], w: fds[1]}, nil
}

// put returns an empty pipe to the pool.
func (pp *pipePool) put(p pipe) {
	pp.mu.Lock()
	if pp.closed || len(pp.free) >= pp.max {
		pp.mu.Unlock()
		p.close()
		return
	}
	pp.free = append(pp.free, p)
	pp.mu.Unlock()
}

func (pp *pipePool) close() {
	pp.mu.Lock()
	defer pp.mu.Unlock()
	pp.closed = true
	for _, p := range pp.free {
		p.close()
	}
	pp.free = nil
}

// spliceFlags: SPLICE_F_NONBLOCK makes a full or empty pipe return EAGAIN
// instead of blocking the thread; the sockets are non-blocking already and
// their readiness comes from the loop's epoll set.
const spliceFlags = unix.SPLICE_F_MOVE | unix.SPLICE_F_NONBLOCK

// conn is one proxied connection, owned by the loop that accepted it: an
// entry of the connection table once its backend is connected.
type conn struct {
	p       *Proxy
	loop    *loop
	key     connKey
	service uint32
	be      *backend

	closing atomic.Bool // a side ended: the flow no longer counts as active

	// Owned by the loop.
	sides       [2]side // client, backend: the connection's two sockets
	dirs        [2]dir  // client to backend, backend to client
	ended       int     // directions whose source's stream ended
	dialing     *dialing
	dialTimer   int           // index of the dial timeout in loop.timers, or -1
	dialLeft    time.Duration // a handed connection's dial timeout (adopt)
	idleTimer   int           // index of the idle check in loop.timers, or -1
	hdr         []byte        // PROXY header still to send
	idleTimeout time.Duration
	lastSeen    atomic.Int64 // Proxy.now of the last bytes moved, either way (read by Flows)
	done        bool         // sockets closed
	queued      bool         // in loop.runq
}

// side is what the loop knows of one socket of a connection: readable
// and writable until a system call says EAGAIN.
type side struct {
	fd   int
	r, w bool
}

// dir is one direction of a connection and the pipe it holds while bytes
// are in flight.
type dir struct {
	pp    pipe
	have  bool // pp is ours
	n     int  // bytes in pp
	eof   bool // the source's stream ended
	ended bool // ... and the pipe was drained: the direction is over
}

// dialing is the state of a backend connection still in progress.
type dialing struct {
	sa    [unsafe.Sizeof(unix.RawSockaddrInet6{})]byte
	salen uintptr
}

// connKey is a connection's 5-tuple (the protocol is always TCP).
type connKey struct {
	client, vip netip.AddrPort
}

// event records what epoll says of one of c's sockets and moves what can
// be moved.
func (c *conn) event(fd int, ev uint32) {
	s := &c.sides[0]
	if fd != s.fd {
		s = &c.sides[1]
	}
	if ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		s.r = true
	}
	if ev&(unix.EPOLLOUT|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		s.w = true
	}
	c.progress()
}

// progress completes the backend connection and the PROXY header, then
// moves bytes both ways until the sockets would block, a direction used
// its budget (the loop comes back), or the connection ends.
func (c *conn) progress() {
	if c.done {
		return
	}
	b := &c.sides[1]
	if c.dialing != nil {
		if !b.w {
			return
		}
		switch e := connectRaw(b.fd, unsafe.Pointer(&c.dialing.sa), c.dialing.salen); e {
		case 0, unix.EISCONN:
		case unix.EALREADY, unix.EINPROGRESS:
			b.w = false
			return
		default:
			c.dialFailed(os.NewSyscallError("connect", e))
			return
		}
		c.dialing = nil
		if c.dialTimer >= 0 {
			heap.Remove(&c.loop.timers, c.dialTimer)
		}
		if !c.p.add(c) {
			c.finish(false)
			return
		}
	}
	for len(c.hdr) > 0 {
		if !b.w {
			return
		}
		n, _, e := unix.RawSyscall(unix.SYS_WRITE, uintptr(b.fd), uintptr(unsafe.Pointer(&c.hdr[0])), uintptr(len(c.hdr)))
		switch e {
		case 0:
			c.hdr = c.hdr[n:]
		case unix.EINTR:
		case unix.EAGAIN:
			b.w = false
			return
		default:
			c.dialFailed(fmt.Errorf("send PROXY header: %w", os.NewSyscallError("write", e)))
			return
		}
	}
	more := c.pump(0)
	if !c.done {
		more = c.pump(1) || more
	}
	if more && !c.done {
		c.loop.enqueue(c)
	}
}

// pump moves bytes of direction d: it splices the source into a pipe and
// the pipe into the destination, without the bytes entering userspace,
// until either socket would block; true if it stopped on its budget
// instead. At the end of the source's stream it shuts down the
// destination's sending side (half-close, the FIN goes on), unless the
// other direction has ended already: then both sockets close, and the
// close sends the FIN. On any error both sockets close.
func (c *conn) pump(d int) bool {
	dr := &c.dirs[d]
	if dr.ended {
		return false
	}
	src, dst := &c.sides[d], &c.sides[1-d]
	pool, stats := c.p.pipes, c.be.stats
	for budget := pumpBudget; ; {
		if dr.n > 0 {
			if !dst.w {
				return false
			}
			m, e := splice(dr.pp.r, dst.fd, dr.n)
			if e == unix.EAGAIN {
				dst.w = false
				return false
			}
			if e != 0 {
				c.fail(os.NewSyscallError("splice", e))
				return false
			}
			if m == 0 {
				c.fail(io.ErrUnexpectedEOF)
				return false
			}
			dr.n -= m
			stats.bytes.Add(uint64(m))
			// A slow reader is not an idle one.
			c.lastSeen.Store(c.loop.now)
			continue
		}
		if dr.eof {
			c.endDir(d)
			return false
		}
		if !src.r {
			if dr.have {
				// Nothing to read: wait without holding the pipe.
				pool.put(dr.pp)
				dr.have = false
			}
			return false
		}
		if budget == 0 {
			return true
		}
		if !dr.have {
			pp, err := pool.get()
			if err != nil {
				c.fail(err)
				return false
			}
			dr.pp, dr.have = pp, true
		}
		m, e := splice(src.fd, dr.pp.w, pool.size)
		switch {
		case e == unix.EAGAIN:
			src.r = false
			continue
		case e != 0:
			c.fail(os.NewSyscallError("splice", e))
			return false
		case m == 0:
			// End of src's stream; the pipe is empty.
			dr.eof = true
			pool.put(dr.pp)
			dr.have = false
			continue
		}
		budget--
		dr.n = m
		stats.packets.Add(1)
		c.lastSeen.Store(c.loop.now)
	}
}

// endDir ends direction d, whose source's stream ended and whose pipe is
// empty.
func (c *conn) endDir(d int) {
	c.dirs[d].ended = true
	c.closing.Store(true)
	c.ended++
	if c.ended == 2 {
		c.finish(false)
		return
	}
	_, _, e := unix.RawSyscall(unix.SYS_SHUTDOWN, uintptr(c.sides[1-d].fd), unix.SHUT_WR, 0)
	if e != 0 {
		c.fail(os.NewSyscallError("shutdown", e))
	}
}

// fail closes c after an error on either socket.
func (c *conn) fail(err error) {
	c.p.log.Debug("connection failed", "client", c.key.client, "vip", c.key.vip, "backend", c.be.ID, "err", err)
	c.finish(false)
}

// dialFailed resets the client of a backend that failed.
func (c *conn) dialFailed(err error) {
	c.p.reasons[rDialFailed].Add(1)
	baddr := netip.AddrPortFrom(c.be.Addr, c.be.Port)
	c.p.log.Debug("backend failed; client reset", "service", c.service, "client", c.key.client, "backend", baddr, "err", err)
	c.finish(true)
}

// finish closes both sockets once (with rst, as TCP resets), returns or
// closes the pipes and takes the connection out of the loop, the table
// and the proxy's count.
func (c *conn) finish(rst bool) {
	if c.done {
		return
	}
	c.done = true
	c.closing.Store(true)
	if c.dialTimer >= 0 {
		heap.Remove(&c.loop.timers, c.dialTimer)
	}
	if c.idleTimer >= 0 {
		heap.Remove(&c.loop.timers, c.idleTimer)
	}
	for i := range c.dirs {
		if dr := &c.dirs[i]; dr.have {
			if dr.n > 0 {
				// Bytes are left in it: never lend it again.
				dr.pp.close()
			} else {
				c.p.pipes.put(dr.pp)
			}
			dr.have = false
		}
	}
	c.loop.unregister(c)
	if rst {
		resetFD(c.sides[0].fd)
		resetFD(c.sides[1].fd)
	} else {
		closeFD(c.sides[0].fd)
		closeFD(c.sides[1].fd)
	}
	c.p.remove(c)
	c.p.active.Add(-1)
	c.loop.load.Add(-1)
}

// splice is splice(2) between two descriptors, retried on EINTR.
//
// It is a raw system call: with SPLICE_F_NONBLOCK, non-blocking sockets
// and pipes it never waits, but it can take tens of microseconds of
// kernel work (the TCP stack, and on veth or loopback the receiving
// side's too). Through the runtime's system call path, the scheduler
// would take such a call for a blocked one and hand the loop's P to
// another thread, waking one.
func splice(in, out, n int) (int, syscall.Errno) {
	for {
		m, _, e := unix.RawSyscall6(unix.SYS_SPLICE, uintptr(in), 0, uintptr(out), 0, uintptr(n), spliceFlags)
		if e != syscall.EINTR {
			return int(m), e
		}
	}
}
