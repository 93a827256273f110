package userspace

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

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
// their readiness comes from the runtime's poller (RawConn.Read and Write).
const spliceFlags = unix.SPLICE_F_MOVE | unix.SPLICE_F_NONBLOCK

// conn is one proxied connection: an entry of the connection table.
type conn struct {
	p       *Proxy
	client  *net.TCPConn
	backend sock // *os.File (see dial)
	key     connKey
	service uint32
	be      *backend

	closing  atomic.Bool  // a side ended: the flow no longer counts as active
	srcEnded atomic.Int32 // directions whose source's stream ended
	halves   atomic.Int32 // directions that returned
	shut     atomic.Bool  // close has closed the sockets
	lastSeen atomic.Int64 // Proxy.now of the last bytes moved, either way
	once     sync.Once

	idleMu sync.Mutex
	idle   *time.Timer // with an idle timeout
	ended  bool        // run has returned: the timer stays stopped
}

// connKey is a connection's 5-tuple (the protocol is always TCP).
type connKey struct {
	client, vip netip.AddrPort
}

// run moves bytes both ways, client to backend on the calling goroutine
// and backend to client on another, until both directions have ended;
// whichever ends last closes both sockets and takes the connection out of
// the table (finish), so that neither waits for the other. run returns
// when its direction has ended: the connection may outlive it.
func (c *conn) run(idleTimeout time.Duration) {
	c.lastSeen.Store(c.p.now())
	if idleTimeout > 0 {
		c.idleMu.Lock()
		c.idle = time.AfterFunc(idleTimeout, func() { c.checkIdle(idleTimeout) })
		c.idleMu.Unlock()
	}
	go c.half(c.backend, c.client)
	c.half(c.client, c.backend)
}

// half runs one direction; the last one to end finishes the connection.
func (c *conn) half(dst, src sock) {
	c.direction(dst, src)
	if c.halves.Add(1) == 2 {
		c.finish()
	}
}

// finish closes both sockets, stops the idle timer and takes the
// connection out of the table and the proxy's count.
func (c *conn) finish() {
	c.close(false)
	c.idleMu.Lock()
	c.ended = true
	if c.idle != nil {
		c.idle.Stop()
	}
	c.idleMu.Unlock()
	c.p.remove(c)
	c.p.served()
}

// direction moves src's bytes to dst. At the end of src's stream it shuts
// down dst's sending side (half-close, the FIN goes on), unless the other
// direction has ended already: then finish closes both sockets at once, and
// the close sends dst's FIN (src's stream was read to its end, so nothing
// unread turns it into a reset). On any error it closes both sockets,
// which also ends the other direction.
func (c *conn) direction(dst, src sock) {
	err := c.pump(dst, src)
	c.closing.Store(true)
	if err == nil && c.srcEnded.Add(1) == 1 {
		err = shutdownWrite(dst)
	}
	if err != nil {
		// A socket that close closed fails with net.ErrClosed (client)
		// or the *os.File's own error (backend): not worth a line.
		if !errors.Is(err, net.ErrClosed) && !c.shut.Load() {
			c.p.log.Debug("connection failed", "client", c.key.client, "vip", c.key.vip, "backend", c.be.ID, "err", err)
		}
		c.close(false)
	}
}

// close closes both sockets once; with rst, the client gets a TCP reset.
func (c *conn) close(rst bool) {
	c.once.Do(func() {
		c.closing.Store(true)
		c.shut.Store(true)
		if rst {
			reset(c.client)
			reset(c.backend)
			return
		}
		c.client.Close()
		c.backend.Close()
	})
}

// checkIdle closes the connection if nothing moved for timeout, or looks
// again when it could be.
func (c *conn) checkIdle(timeout time.Duration) {
	c.idleMu.Lock()
	defer c.idleMu.Unlock()
	if c.ended {
		return
	}
	quiet := time.Duration(c.p.now() - c.lastSeen.Load())
	if quiet < timeout {
		c.idle.Reset(timeout - quiet)
		return
	}
	c.p.log.Debug("closing idle connection", "client", c.key.client, "vip", c.key.vip, "backend", c.be.ID, "idle", quiet)
	c.close(false)
}

// pump splices src's bytes into a pipe and from the pipe into dst until
// src ends (nil) or either side fails. The bytes never enter userspace.
func (c *conn) pump(dst, src sock) error {
	srcRC, err := src.SyscallConn()
	if err != nil {
		return err
	}
	dstRC, err := dst.SyscallConn()
	if err != nil {
		return err
	}
	pool, stats := c.p.pipes, c.be.stats
	var (
		pp   pipe
		have bool // pp is ours
	)
	defer func() {
		if have {
			// Bytes may be left in it: never lend it again.
			pp.close()
		}
	}()
	for {
		var (
			n          int
			serr, perr error
		)
		err := srcRC.Read(func(fd uintptr) bool {
			if !have {
				if pp, perr = pool.get(); perr != nil {
					return true
				}
				have = true
			}
			n, serr = spliceRetry(int(fd), pp.w, pool.size)
			if serr == unix.EAGAIN {
				// Nothing to read: wait without holding the pipe.
				pool.put(pp)
				have = false
				return false
			}
			return true
		})
		if err == nil {
			err = perr
		}
		if err == nil && serr != nil {
			err = os.NewSyscallError("splice", serr)
		}
		if err != nil {
			return err
		}
		if n == 0 {
			// End of src's stream; the pipe is empty.
			pool.put(pp)
			have = false
			return nil
		}
		c.lastSeen.Store(c.p.now())
		stats.packets.Add(1)
		for n > 0 {
			var m int
			err := dstRC.Write(func(fd uintptr) bool {
				m, serr = spliceRetry(pp.r, int(fd), n)
				return serr != unix.EAGAIN
			})
			if err == nil && serr != nil {
				err = os.NewSyscallError("splice", serr)
			}
			if err != nil {
				return err
			}
			if m == 0 {
				return io.ErrUnexpectedEOF
			}
			n -= m
			stats.bytes.Add(uint64(m))
			// A slow reader is not an idle one.
			c.lastSeen.Store(c.p.now())
		}
	}
}

// spliceRetry is splice(2) between two descriptors, retried on EINTR.
//
// It is a raw system call: with SPLICE_F_NONBLOCK, non-blocking sockets
// and pipes it never waits, but it can take tens of microseconds of
// kernel work (the TCP stack, and on veth or loopback the receiving
// side's too). Through the runtime's system call path, the scheduler
// takes such a call for a blocked one and hands its P to another thread,
// waking one: that churn cost more CPU per short connection than the
// call itself.
func spliceRetry(in, out, n int) (int, error) {
	for {
		m, _, e := unix.RawSyscall6(unix.SYS_SPLICE, uintptr(in), 0, uintptr(out), 0, uintptr(n), spliceFlags)
		if e == 0 {
			return int(m), nil
		}
		if e != syscall.EINTR {
			return 0, e
		}
	}
}

// shutdownWrite shuts down c's sending side (a FIN follows what is
// queued), with a raw system call as spliceRetry does: it never blocks.
func shutdownWrite(c syscall.Conn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var e syscall.Errno
	if err := rc.Control(func(fd uintptr) {
		_, _, e = unix.RawSyscall(unix.SYS_SHUTDOWN, fd, unix.SHUT_WR, 0)
	}); err != nil {
		return err
	}
	if e != 0 {
		return os.NewSyscallError("shutdown", e)
	}
	return nil
}
