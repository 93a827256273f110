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
	backend *net.TCPConn
	key     connKey
	service uint32
	be      *backend

	closing  atomic.Bool  // a side ended: the flow no longer counts as active
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

// run moves bytes both ways until both directions have ended, then closes
// both sockets. It returns when the connection is gone.
func (c *conn) run(idleTimeout time.Duration) {
	c.lastSeen.Store(c.p.now())
	if idleTimeout > 0 {
		c.idleMu.Lock()
		c.idle = time.AfterFunc(idleTimeout, func() { c.checkIdle(idleTimeout) })
		c.idleMu.Unlock()
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		c.direction(c.backend, c.client)
	}()
	c.direction(c.client, c.backend)
	wg.Wait()
	c.close(false)
	c.idleMu.Lock()
	c.ended = true
	if c.idle != nil {
		c.idle.Stop()
	}
	c.idleMu.Unlock()
}

// direction moves src's bytes to dst. At the end of src's stream it shuts
// down dst's sending side (half-close, the FIN goes on); on any error it
// closes both sockets, which also ends the other direction.
func (c *conn) direction(dst, src *net.TCPConn) {
	err := c.pump(dst, src)
	c.closing.Store(true)
	if err == nil {
		err = dst.CloseWrite()
	}
	if err != nil {
		if !errors.Is(err, net.ErrClosed) {
			c.p.log.Debug("connection failed", "client", c.key.client, "vip", c.key.vip, "backend", c.be.ID, "err", err)
		}
		c.close(false)
	}
}

// close closes both sockets once; with rst, the client gets a TCP reset.
func (c *conn) close(rst bool) {
	c.once.Do(func() {
		c.closing.Store(true)
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
func (c *conn) pump(dst, src *net.TCPConn) error {
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
func spliceRetry(in, out, n int) (int, error) {
	for {
		m, err := unix.Splice(in, nil, out, nil, n, spliceFlags)
		if err != syscall.EINTR {
			return int(m), err
		}
	}
}
