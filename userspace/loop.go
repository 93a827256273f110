package userspace

import (
	"container/heap"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Event loops. The proxy runs one loop per P (GOMAXPROCS) by default, as
// HAProxy runs one thread per CPU: a goroutine with its own epoll instance,
// which it waits for in epoll_wait, that does everything for the
// connections it owns. Each
// service listens with one socket per loop (SO_REUSEPORT: the kernel
// spreads new connections over them), so the loop that accepts a client is
// the one that dials its backend, moves its bytes and closes it, without
// any other goroutine or thread being woken on the way. Sockets are
// registered edge-triggered for both directions; the loop remembers which
// are readable and writable until a system call says EAGAIN.
//
// Other goroutines talk to a loop with commands (a queue under a mutex
// and an eventfd that wakes it): new and removed listening sockets, resets
// of connections whose backend went down, and the stop at Proxy.Close. A
// loop alone closes the descriptors it owns, so that no descriptor is
// closed under it and reused.

// Epoll event tags (EpollEvent.Pad).
const (
	tagConn = iota
	tagListener
	tagWake
)

const (
	acceptBatch = 32 // accepts per listening socket before other work
	pumpBudget  = 16 // reads per direction of a connection before other work
	maxEvents   = 128
)

type cmdOp int

const (
	cmdListen   cmdOp = iota // start accepting on ls
	cmdUnlisten              // close ls (shut down already)
	cmdReset                 // reset c (its backend went down)
	cmdServe                 // serve fd, a client that another loop accepted
	cmdStop                  // close everything and return
	cmdFreeze                // stop for a handover until its verdict (see Proxy.Freeze)
	cmdAdopt                 // serve c, handed over by a predecessor (see Proxy.Resume)
)

type command struct {
	op     cmdOp
	ls     *lsock
	c      *conn
	fd     int
	svc    *service
	client netip.AddrPort
	f      *freeze
}

// lsock is one loop's listening socket of a service.
type lsock struct {
	fd   int
	l    *listener
	loop *loop

	// Owned by the loop.
	closed bool
	queued bool // in loop.acceptq
	delay  time.Duration
}

// loop is an event loop and the connections it owns.
type loop struct {
	p    *Proxy
	epfd int
	evfd int
	load atomic.Int32 // connections accepted for this loop and not finished

	mu      sync.Mutex
	cmds    []command
	pending bool // evfd written since the loop took the commands
	stopped bool

	// Owned by the loop goroutine.
	conns   []*conn // by file descriptor, both sockets of each connection
	lsocks  map[int]*lsock
	timers  timerHeap
	runq    []*conn  // connections with work left over (pumpBudget)
	acceptq []*lsock // listening sockets with clients left over (acceptBatch)
	now     int64    // Proxy.now at the last wake-up
	// Connections whose backend socket has no keepalive yet
	// (keepAliveLater): served since the last sweep, and in the period
	// before it.
	kaYoung, kaAging []*conn
	kaDone           int  // kaAging[:kaDone] swept already
	kaTimer          bool // the sweep's timer is in timers
	events           [maxEvents]unix.EpollEvent
	rsa              unix.RawSockaddrAny
}

func newLoop(p *Proxy) (*loop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	evfd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(epfd)
		return nil, os.NewSyscallError("eventfd", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLET, Fd: int32(evfd), Pad: tagWake}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, evfd, &ev); err != nil {
		unix.Close(epfd)
		unix.Close(evfd)
		return nil, os.NewSyscallError("epoll_ctl", err)
	}
	return &loop{p: p, epfd: epfd, evfd: evfd, lsocks: make(map[int]*lsock)}, nil
}

// send queues a command and wakes the loop. Commands to a stopped loop
// are dropped (false).
//
// The eventfd is written after the mutex is released: the write wakes the
// loop, which takes the mutex at once to read its commands, and finding
// it still held would park the loop's goroutine, to be resumed by the
// runtime on whichever thread is free. Only the sender that found no
// write pending writes, and the loop takes the commands queued since the
// last wake-up only after that write has woken it. So when the loop takes
// a stop command, which also refuses every later command, no sender is
// left to write: it may close the eventfd.
func (lp *loop) send(c command) bool {
	lp.mu.Lock()
	if lp.stopped {
		lp.mu.Unlock()
		return false
	}
	lp.cmds = append(lp.cmds, c)
	wake := !lp.pending
	lp.pending = true
	lp.mu.Unlock()
	if wake {
		one := uint64(1)
		unix.RawSyscall(unix.SYS_WRITE, uintptr(lp.evfd), uintptr(unsafe.Pointer(&one)), 8)
	}
	return true
}

// run is the loop's goroutine. It waits for its sockets in its own
// epoll_wait, as each HAProxy thread does: the kernel wakes this loop's
// thread, and no other thread is woken on the way. The wait is a raw
// system call, so the goroutine keeps its P while it blocks (holdProcs
// keeps one more P for the rest of the process), and the runtime can
// still stop it for a garbage collection: its preemption signal ends the
// wait with EINTR. Two other designs were measured against this one in
// the same runs (README, the splice datapath against HAProxy): parking
// the goroutine in the runtime's poller, with the epoll descriptor
// registered there, where one thread waits for all loops and wakes the
// next, reached 0.87–0.96x the connection rate with 4 workers; the same
// wait through the runtime's system call path, where sysmon takes the P
// of a blocked loop and the loop must get one back on each wake-up,
// 0.88–0.92x, for 22% more CPU per connection.
func (lp *loop) run() {
	defer lp.p.wg.Done()
	p := lp.p
	lp.now = p.now()
	for {
		// Work left over (budgets): look, but do not wait.
		wait := 0
		if len(lp.runq) == 0 && len(lp.acceptq) == 0 {
			wait = maxWait
			if len(lp.timers) > 0 {
				d := max(lp.timers[0].when-p.now(), 0)
				wait = min(wait, int((d+int64(time.Millisecond)-1)/int64(time.Millisecond)))
			}
		}
		n, err := epollWait(lp.epfd, lp.events[:], wait)
		if err != nil {
			if err != unix.EINTR {
				p.log.Error("epoll_wait failed", "err", err)
				time.Sleep(10 * time.Millisecond)
			}
			n = 0
		}
		lp.now = p.now()
		for i := 0; i < n; i++ {
			ev := &lp.events[i]
			switch ev.Pad {
			case tagConn:
				if fd := int(ev.Fd); fd < len(lp.conns) {
					if c := lp.conns[fd]; c != nil {
						c.event(fd, ev.Events)
					}
				}
			case tagListener:
				if ls := lp.lsocks[int(ev.Fd)]; ls != nil {
					lp.accept(ls)
				}
			case tagWake:
				if lp.commands() {
					lp.stop()
					return
				}
			}
		}
		if q := lp.acceptq; len(q) > 0 {
			lp.acceptq = nil
			for _, ls := range q {
				ls.queued = false
				if !ls.closed {
					lp.accept(ls)
				}
			}
		}
		if q := lp.runq; len(q) > 0 {
			lp.runq = nil
			for _, c := range q {
				c.queued = false
				c.progress()
			}
		}
		lp.expire()
	}
}

// maxWait bounds a loop's wait for events, in milliseconds. The runtime
// ends a wait with a signal when it needs the loop's P, to stop the world
// for the garbage collector: with idle loops a runtime.GC() takes about
// 1 ms here. With its preemption signals off (GODEBUG=asyncpreemptoff=1)
// it waits for the loop to wake instead, up to this bound in each phase
// that stops the world: 300–400 ms for a runtime.GC().
const maxWait = 100

// epollWait is epoll_wait for up to msec milliseconds (0: do not block),
// as a raw system call (see splice).
func epollWait(epfd int, evs []unix.EpollEvent, msec int) (int, error) {
	r, _, e := unix.RawSyscall6(unix.SYS_EPOLL_WAIT, uintptr(epfd), uintptr(unsafe.Pointer(&evs[0])), uintptr(len(evs)), uintptr(msec), 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

// procs counts the Ps that event loops hold: each keeps its P while it
// waits in epoll_wait, so the rest of the process (the API, health
// checks, the garbage collector's workers) needs GOMAXPROCS above the
// number of loops to run at all.
var procs struct {
	sync.Mutex
	loops int // loops running, in all proxies of the process
	base  int // GOMAXPROCS before the first of them started
}

// holdProcs counts n more loops (n <= 0: as many as the process had Ps
// before any loop started, one per CPU by default) and raises GOMAXPROCS
// to one more than all loops if it is lower. It returns n.
func holdProcs(n int) int {
	procs.Lock()
	defer procs.Unlock()
	if procs.loops == 0 {
		procs.base = runtime.GOMAXPROCS(0)
	}
	if n <= 0 {
		n = procs.base
	}
	procs.loops += n
	if want := procs.loops + 1; runtime.GOMAXPROCS(0) < want {
		runtime.GOMAXPROCS(want)
	}
	return n
}

// releaseProcs uncounts n loops that have stopped and lowers GOMAXPROCS
// again, to no less than it was before the first loop.
func releaseProcs(n int) {
	if n <= 0 {
		return // a proxy that never started its loops
	}
	procs.Lock()
	defer procs.Unlock()
	procs.loops -= n
	runtime.GOMAXPROCS(max(procs.base, procs.loops+1))
}

// commands runs the queued commands; true means stop.
func (lp *loop) commands() bool {
	var buf uint64
	unix.RawSyscall(unix.SYS_READ, uintptr(lp.evfd), uintptr(unsafe.Pointer(&buf)), 8)
	lp.mu.Lock()
	cmds := lp.cmds
	lp.cmds = nil
	lp.pending = false
	stop := slices.ContainsFunc(cmds, func(c command) bool { return c.op == cmdStop })
	lp.stopped = stop
	lp.mu.Unlock()
	for i := 0; i < len(cmds); i++ {
		switch c := cmds[i]; c.op {
		case cmdListen:
			lp.lsocks[c.ls.fd] = c.ls
			ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLET, Fd: int32(c.ls.fd), Pad: tagListener}
			if err := unix.EpollCtl(lp.epfd, unix.EPOLL_CTL_ADD, c.ls.fd, &ev); err != nil {
				lp.p.log.Error("cannot poll listening socket", "vip", c.ls.l.addr, "err", err)
			}
		case cmdUnlisten:
			lp.closeListener(c.ls)
		case cmdReset:
			c.c.finish(true)
		case cmdServe:
			lp.serve(c.svc, c.fd, c.client)
		case cmdFreeze:
			later := lp.frozenLoop(c.f, cmds[i+1:])
			cmds = append(cmds[:i+1:i+1], later...)
		case cmdAdopt:
			lp.adopt(c.c)
		}
	}
	return stop
}

func (lp *loop) closeListener(ls *lsock) {
	if ls.closed {
		return
	}
	ls.closed = true
	delete(lp.lsocks, ls.fd)
	closeFD(ls.fd)
}

// stop closes every connection and listening socket of the loop, and the
// loop's own descriptors. The commands that came with the stop have run;
// later ones were refused (send).
func (lp *loop) stop() {
	for _, c := range lp.conns {
		if c != nil {
			c.finish(false)
		}
	}
	for _, ls := range lp.lsocks {
		lp.closeListener(ls)
	}
	closeFD(lp.evfd)
	closeFD(lp.epfd)
}

// accept accepts the clients waiting on ls, up to acceptBatch; the rest
// after the loop has looked at its other sockets.
func (lp *loop) accept(ls *lsock) {
	p := lp.p
	for range acceptBatch {
		salen := uint32(unsafe.Sizeof(lp.rsa))
		r, _, e := unix.RawSyscall6(unix.SYS_ACCEPT4, uintptr(ls.fd), uintptr(unsafe.Pointer(&lp.rsa)), uintptr(unsafe.Pointer(&salen)),
			unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0, 0)
		switch e {
		case 0:
			ls.delay = 0
			lp.dispatch(ls.l.svc.Load(), int(r), sockaddrAddrPort(&lp.rsa))
			continue
		case unix.EINTR, unix.ECONNABORTED:
			continue
		case unix.EAGAIN:
			return
		case unix.EINVAL:
			// Shut down: the listener is being closed.
			return
		}
		// Out of file descriptors or memory: back off as net/http does.
		// Clients left waiting raise no new edge: a timer comes back.
		p.reasons[rAcceptFailed].Add(1)
		ls.delay = min(max(2*ls.delay, 5*time.Millisecond), time.Second)
		p.log.Warn("accept failed; retrying", "vip", ls.l.addr, "err", os.NewSyscallError("accept4", e), "retry_in", ls.delay)
		heap.Push(&lp.timers, timer{when: lp.now + int64(ls.delay), ls: ls})
		return
	}
	if !ls.queued {
		ls.queued = true
		lp.acceptq = append(lp.acceptq, ls)
	}
}

// dispatch serves a client that the loop accepted, or hands it to the
// least loaded loop if this one has at least two connections more: the
// kernel spreads clients over the listening sockets by a hash of their
// addresses and ports, which leaves a few long connections (streams)
// unevenly spread.
func (lp *loop) dispatch(s *service, fd int, client netip.AddrPort) {
	to := lp
	for _, o := range lp.p.loops {
		if o.load.Load() < to.load.Load()-1 {
			to = o
		}
	}
	to.load.Add(1)
	if to == lp {
		lp.serve(s, fd, client)
		return
	}
	if !to.send(command{op: cmdServe, fd: fd, svc: s, client: client}) {
		to.load.Add(-1)
		resetFD(fd)
	}
}

// register enters c's sockets in the loop's table and epoll set.
func (lp *loop) register(c *conn) error {
	for _, fd := range [2]int{c.sides[0].fd, c.sides[1].fd} {
		if fd >= len(lp.conns) {
			n := max(2*len(lp.conns), fd+1, 64)
			lp.conns = append(lp.conns, make([]*conn, n-len(lp.conns))...)
		}
		lp.conns[fd] = c
		ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET, Fd: int32(fd), Pad: tagConn}
		_, _, e := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(lp.epfd), unix.EPOLL_CTL_ADD, uintptr(fd), uintptr(unsafe.Pointer(&ev)), 0, 0)
		if e != 0 {
			return os.NewSyscallError("epoll_ctl", e)
		}
	}
	return nil
}

// unregister takes c's sockets out of the loop's table; closing them
// takes them out of the epoll set.
func (lp *loop) unregister(c *conn) {
	for _, fd := range [2]int{c.sides[0].fd, c.sides[1].fd} {
		if fd < len(lp.conns) && lp.conns[fd] == c {
			lp.conns[fd] = nil
		}
	}
}

// enqueue has c's progress run again after the next poll.
func (lp *loop) enqueue(c *conn) {
	if !c.queued {
		c.queued = true
		lp.runq = append(lp.runq, c)
	}
}

// expire runs the timers that are due.
func (lp *loop) expire() {
	for len(lp.timers) > 0 && lp.timers[0].when <= lp.now {
		t := heap.Pop(&lp.timers).(timer)
		switch {
		case t.ls != nil:
			if !t.ls.closed {
				lp.accept(t.ls)
			}
		case t.sweep:
			lp.kaTimer = false
			lp.sweepKeepAlive()
		case t.dial:
			if c := t.c; !c.done && c.dialing != nil {
				c.dialFailed(fmt.Errorf("connect: timed out after %v", lp.p.opts.DialTimeout))
			}
		default:
			c := t.c
			if c.done {
				continue
			}
			quiet := time.Duration(lp.now - c.lastSeen.Load())
			if quiet < c.idleTimeout {
				heap.Push(&lp.timers, timer{when: c.lastSeen.Load() + int64(c.idleTimeout), c: c})
				continue
			}
			lp.p.log.Debug("closing idle connection", "client", c.key.client, "vip", c.key.vip, "backend", c.be.ID, "idle", quiet)
			c.finish(false)
		}
	}
}

// keepAliveAge is how old a connection is before its backend socket gets
// TCP keepalive: between one and two of these.
const keepAliveAge = time.Second

// sweepBatch bounds the backend sockets a keepalive sweep sets up between
// two polls of the loop's sockets: after a storm of new connections, each
// loop would otherwise spend four system calls on each of them at once
// while their bytes wait.
const sweepBatch = 256

// keepAliveLater has the keepalive of c's backend socket set once c is
// keepAliveAge old, if it lives that long. A client's socket has it from
// the start, from its listening socket, for free; a backend's socket
// needs four setsockopt(2) calls of its own (SO_KEEPALIVE and the three
// timers): a short connection through the proxy made 28 system calls
// with them and makes 24 without (the system call count of the peers bench's proxy rows).
// Keepalive only matters to a connection that has been quiet for its idle
// time, at least a second, so a short one never needs it: it ends before
// the sweep that would set it, and saves the calls.
func (lp *loop) keepAliveLater(c *conn) {
	if !lp.p.opts.KeepAlive.Enable {
		return
	}
	lp.kaYoung = append(lp.kaYoung, c)
	if !lp.kaTimer {
		lp.sweepIn(keepAliveAge)
	}
}

// sweepKeepAlive sets the keepalive of the backend sockets of the
// connections still open that were served before the previous sweep (at
// least keepAliveAge ago), sweepBatch of them at a time, and then makes
// those served since the aging ones. Connections that ended cost nothing.
func (lp *loop) sweepKeepAlive() {
	i, set := lp.kaDone, 0
	for ; i < len(lp.kaAging) && set < sweepBatch; i++ {
		c := lp.kaAging[i]
		lp.kaAging[i] = nil
		if c.done {
			continue // ended young: nothing to set up
		}
		set++
		if err := setKeepAlive(c.sides[1].fd, lp.p.opts.KeepAlive); err != nil {
			lp.p.log.Debug("cannot set keepalive toward backend", "client", c.key.client, "vip", c.key.vip, "backend", c.be.ID, "err", err)
		}
	}
	lp.kaDone = i
	if i < len(lp.kaAging) {
		lp.sweepIn(1) // the rest after the next poll
		return
	}
	lp.kaAging, lp.kaYoung, lp.kaDone = lp.kaYoung, lp.kaAging[:0], 0
	if len(lp.kaAging) > 0 {
		lp.sweepIn(keepAliveAge)
	}
}

// sweepIn schedules the next keepalive sweep.
func (lp *loop) sweepIn(d time.Duration) {
	lp.kaTimer = true
	heap.Push(&lp.timers, timer{when: lp.now + int64(d), sweep: true})
}

// timer is a deadline of the loop: a connection's dial timeout or idle
// check, the retry of a listening socket after accept failed, or the
// keepalive sweep.
type timer struct {
	when  int64
	c     *conn
	dial  bool
	ls    *lsock
	sweep bool
}

type timerHeap []timer

func (h timerHeap) Len() int           { return len(h) }
func (h timerHeap) Less(i, j int) bool { return h[i].when < h[j].when }
func (h timerHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].moved(i)
	h[j].moved(j)
}
func (h *timerHeap) Push(x any) {
	t := x.(timer)
	t.moved(len(*h))
	*h = append(*h, t)
}
func (h *timerHeap) Pop() any {
	old := *h
	t := old[len(old)-1]
	old[len(old)-1] = timer{}
	*h = old[:len(old)-1]
	t.moved(-1)
	return t
}

// moved keeps a connection's timers findable: its dial timeout leaves the
// heap as soon as the connection is established, and both leave it when
// the connection ends.
func (t timer) moved(i int) {
	switch {
	case t.c == nil:
	case t.dial:
		t.c.dialTimer = i
	default:
		t.c.idleTimer = i
	}
}

// closeFD closes a descriptor with a raw system call: closing a socket
// sends its FIN or RST but never waits (no SO_LINGER timeout is set).
func closeFD(fd int) {
	unix.RawSyscall(unix.SYS_CLOSE, uintptr(fd), 0, 0)
}

// resetFD closes fd with a TCP reset instead of a FIN (SO_LINGER 0), so
// that its peer fails at once.
func resetFD(fd int) {
	l := unix.Linger{Onoff: 1, Linger: 0}
	unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_LINGER, uintptr(unsafe.Pointer(&l)), unsafe.Sizeof(l), 0)
	closeFD(fd)
}
