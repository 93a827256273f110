package userspace

import (
	"container/heap"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/internal/hostaddr"
)

// Defaults of Options.
const (
	DefaultDialTimeout     = 5 * time.Second
	DefaultPipeSize        = defaultPipeSize
	DefaultMaxIdlePipes    = 64
	DefaultAffinityEntries = 1 << 20

	defaultPipeSize = 64 << 10 // the kernel's default pipe capacity
)

// DefaultKeepAlive is the TCP keepalive set on both sockets of every
// connection unless Options.KeepAlive says otherwise: a peer that vanished
// without a FIN or RST is found within Idle + Interval·Count (two minutes)
// of silence, and a quiet connection sends a probe every minute, which keeps
// NAT and firewall state along the path alive.
var DefaultKeepAlive = net.KeepAliveConfig{Enable: true, Idle: 60 * time.Second, Interval: 15 * time.Second, Count: 4}

// ErrUDP is the error UpsertService returns for a UDP service: the splice
// datapath proxies TCP only.
var ErrUDP = errors.New("udp services need the xdp datapath (the splice datapath proxies TCP only)")

// Options configure a Proxy. Zero values take the defaults.
type Options struct {
	// Netns runs fn where the proxy's sockets belong (a network
	// namespace): listening sockets and the sockets that connect to
	// backends are created inside it and stay there. Nil runs fn as it is,
	// in the caller's namespace. lab.Host.Do fits.
	Netns func(fn func() error) error
	// DialTimeout bounds the connection to a backend (DefaultDialTimeout).
	// A client whose backend does not answer in time is reset.
	DialTimeout time.Duration
	// KeepAlive is the TCP keepalive of both sockets of every connection
	// (DefaultKeepAlive when zero). A non-zero KeepAlive with Enable false,
	// such as {Idle: -1}, turns keepalive off.
	KeepAlive net.KeepAliveConfig
	// MaxConns caps the connections proxied at once, over all services;
	// clients beyond it are reset. 0 means no cap other than the process's
	// file descriptor limit (each connection takes two, plus up to four
	// while bytes are in flight).
	MaxConns int
	// PipeSize is the capacity of the pipes that carry bytes between the
	// sockets (DefaultPipeSize, 64 KiB): what one splice(2) call moves and
	// the most a direction of a connection holds in the proxy. Beyond
	// /proc/sys/fs/pipe-max-size it stays at the kernel's default.
	PipeSize int
	// MaxIdlePipes is how many empty pipes are kept for reuse
	// (DefaultMaxIdlePipes).
	MaxIdlePipes int
	// SocketBuffer, if positive, sets SO_RCVBUF and SO_SNDBUF of both
	// sockets of every connection, which bounds the kernel memory of a
	// connection (the kernel doubles the value for its bookkeeping). 0
	// leaves the buffers to the kernel's autotuning (net.ipv4.tcp_rmem and
	// tcp_wmem), best for throughput.
	SocketBuffer int
	// Loops is the number of event loops, each a goroutine with its own
	// epoll set and a listening socket per service (runtime.GOMAXPROCS
	// when zero, as HAProxy runs a thread per CPU). Each loop holds a P
	// while it waits: while loops run, GOMAXPROCS is raised to one more
	// than the loops of all proxies in the process.
	Loops int
	// Interfaces are the interfaces the proxy stands in for, when it
	// serves in place of an XDP datapath that could not attach to them
	// (datapath auto): Modes reports each as "splice".
	Interfaces []string
	// AffinityEntries is the size of the source-affinity table
	// (DefaultAffinityEntries); when it is full, the least recently seen of
	// a few sampled entries makes room.
	AffinityEntries int
	// Inherit is the state a predecessor handed over (see Freeze): its
	// services keep their ids (AdoptedServices), UpsertService takes
	// their listening sockets instead of binding new ones, and Resume
	// serves their connections. The proxy owns its descriptors from New.
	Inherit *State
}

// Reasons a connection was not proxied or was cut, as Counters reports
// them. The XDP datapath counts packets by reason; the proxy counts
// connections.
const (
	ReasonNoBackend    = "reset_no_backend"   // the service had no backend for the client
	ReasonBackendDown  = "reset_backend_down" // established, reset when its backend went down (OnDownReset)
	ReasonDrained      = "reset_drained"      // established, reset by a paced drain (CloseFlows)
	ReasonDialFailed   = "reset_dial_failed"  // the backend did not accept the connection in time
	ReasonConnLimit    = "reset_conn_limit"   // Options.MaxConns reached
	ReasonAcceptFailed = "drop_accept_failed" // accept(2) failed (out of file descriptors...)
)

var reasonNames = [...]string{ReasonNoBackend, ReasonBackendDown, ReasonDialFailed, ReasonConnLimit, ReasonAcceptFailed, ReasonDrained}

const (
	rNoBackend = iota
	rBackendDown
	rDialFailed
	rConnLimit
	rAcceptFailed
	rDrained
	rMax
)

// Proxy is the splice datapath: a TCP proxy that accepts clients on each
// service's VIP and port, picks their backend exactly as the XDP program
// would, connects to it and moves the bytes between the two sockets with
// splice(2), without copying them through userspace. It implements
// datapath.Datapath. It runs on any Linux kernel Go supports.
//
// A Proxy lives until Close, which closes every listener and connection.
type Proxy struct {
	log      *slog.Logger
	seed     uint32
	opts     Options
	epoch    time.Time
	now      func() int64 // monotonic nanoseconds; replaced by tests
	pipes    *pipePool
	affinity *affinityTable
	wg       sync.WaitGroup // event loops

	reasons [rMax]atomic.Uint64
	trace   atomic.Pointer[spliceTrace] // the trace that runs, if one does
	active  atomic.Int64                // connections being proxied or dialled

	mu        sync.Mutex
	closed    bool
	loops     []*loop              // started with the first service
	next      int                  // loop of the next single-socket listener
	listeners map[uint32]*listener // by service ID
	vips      map[netip.Addr]*vipRoute
	svcVIP    map[uint32]netip.Addr // the VIP each service holds a reference on
	vetter    hostaddr.Vetter
	conns     map[connKey]*conn // the connection table

	frozen     *freeze      // handing over (Freeze) until Thaw or Release
	handedOver bool         // Release: a successor serves everything
	inherit    *inheritance // Options.Inherit until Resume
}

// listener is the listening socket of a service and the service's current
// version, which every new connection reads once.
type listener struct {
	socks []*lsock // one per loop
	addr  netip.AddrPort
	svc   atomic.Pointer[service]
}

var _ datapath.Datapath = (*Proxy)(nil)

// New returns a proxy that serves no service yet. seed is the flow-hash
// seed, the same as the XDP datapath's (config hash_seed), so that both
// datapaths and every tether host choose the same backends.
func New(log *slog.Logger, seed uint32, opts Options) *Proxy {
	if opts.Netns == nil {
		opts.Netns = func(fn func() error) error { return fn() }
	}
	if opts.DialTimeout <= 0 {
		opts.DialTimeout = DefaultDialTimeout
	}
	if opts.KeepAlive == (net.KeepAliveConfig{}) {
		opts.KeepAlive = DefaultKeepAlive
	}
	if opts.PipeSize <= 0 {
		opts.PipeSize = DefaultPipeSize
	}
	if opts.MaxIdlePipes <= 0 {
		opts.MaxIdlePipes = DefaultMaxIdlePipes
	}
	if opts.AffinityEntries <= 0 {
		opts.AffinityEntries = DefaultAffinityEntries
	}
	p := &Proxy{
		log:       log,
		seed:      seed,
		opts:      opts,
		epoch:     time.Now(),
		pipes:     &pipePool{size: opts.PipeSize, max: opts.MaxIdlePipes},
		affinity:  newAffinityTable(opts.AffinityEntries),
		listeners: make(map[uint32]*listener),
		vips:      make(map[netip.Addr]*vipRoute),
		svcVIP:    make(map[uint32]netip.Addr),
		conns:     make(map[connKey]*conn),
	}
	p.now = func() int64 { return int64(time.Since(p.epoch)) }
	if opts.Inherit != nil {
		p.inherit = newInheritance(opts.Inherit)
		for r, name := range reasonNames {
			p.reasons[r].Store(opts.Inherit.Counters.Reasons[name])
		}
		for _, a := range opts.Inherit.Affinity {
			p.affinity.put(a.Service, a.Client, a.Backend, p.now()-int64(a.Age))
		}
	}
	p.vetter = hostaddr.Vetter{Local: true, TTL: time.Second, Read: func() (h *hostaddr.Host, err error) {
		err = opts.Netns(func() error {
			h, err = hostaddr.Read()
			return err
		})
		return h, err
	}}
	return p
}

// Modes implements datapath.Datapath: "splice" for each interface the
// proxy stands in for (Options.Interfaces), or "*" when it was given none.
func (p *Proxy) Modes() map[string]string {
	if len(p.opts.Interfaces) == 0 {
		return map[string]string{"*": "splice"}
	}
	out := make(map[string]string, len(p.opts.Interfaces))
	for _, name := range p.opts.Interfaces {
		out[name] = "splice"
	}
	return out
}

// UpsertService implements datapath.Datapath. A new service, or one whose
// VIP or port changed, gets a listening socket first (see listen: the VIP
// need not be local), and its VIP a local route if the host does not
// deliver it yet (see acquireVIP); if either fails nothing changes. The
// service's IdleTimeout and ProxyProtocol apply to the connections it
// accepts from then on. Then the new ring and
// backends replace the old ones at once for every connection accepted
// afterwards. Established connections keep their backend whatever
// happens to it (drained, down, removed from the service), except that
// with OnDownReset the connections to a Down backend are reset.
//
// UDP services are refused with ErrUDP.
func (p *Proxy) UpsertService(s datapath.Service) error {
	if err := check(s); err != nil {
		return fmt.Errorf("service %s: %w", s.Name, err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return fmt.Errorf("service %s: %w", s.Name, net.ErrClosed)
	}
	if err := p.changing(); err != nil {
		return fmt.Errorf("service %s: %w", s.Name, err)
	}
	if err := p.claimLocked(); err != nil {
		return fmt.Errorf("service %s: %w", s.Name, err)
	}
	if err := p.vet(s.Backends); err != nil {
		return fmt.Errorf("service %s: %w", s.Name, err)
	}
	old, had := p.svcVIP[s.ID]
	moved := !had || old != s.VIP
	if moved {
		if err := p.acquireVIP(s.VIP); err != nil {
			return fmt.Errorf("service %s: %w", s.Name, err)
		}
	}
	if err := p.upsertLocked(s); err != nil {
		if moved {
			p.releaseVIP(s.VIP)
		}
		return err
	}
	if had && moved {
		p.releaseVIP(old)
	}
	p.svcVIP[s.ID] = s.VIP
	return nil
}

// upsertLocked serves s on its listener, starting one if needed. p.mu is
// held.
func (p *Proxy) upsertLocked(s datapath.Service) error {
	vip := netip.AddrPortFrom(s.VIP, s.Port)
	l := p.listeners[s.ID]
	var old *service
	if l != nil {
		old = l.svc.Load()
	} else if p.inherit != nil && p.inherit.services != nil {
		old = p.inherit.services[s.ID] // the predecessor's, with its counters
	}
	if s.KeepRing && old == nil {
		return fmt.Errorf("service %s: no ring to keep: the proxy does not serve it", s.Name)
	}
	ns := newService(s, old)
	if l != nil && l.addr == vip {
		l.svc.Store(ns)
	} else {
		if err := p.startLoops(); err != nil {
			return fmt.Errorf("service %s: %w", s.Name, err)
		}
		// The sockets share the port (SO_REUSEPORT): only this check
		// keeps two services of this proxy off the same address.
		for id, o := range p.listeners {
			if id != s.ID && o.addr == vip {
				return fmt.Errorf("service %s: listen on %s: %w", s.Name, vip, os.NewSyscallError("bind", syscall.EADDRINUSE))
			}
		}
		fds := p.inheritedListeners(vip)
		if fds == nil {
			var err error
			if fds, err = p.listen(vip, len(p.loops)); err != nil {
				return fmt.Errorf("service %s: %w", s.Name, err)
			}
		}
		nl := &listener{addr: vip}
		nl.svc.Store(ns)
		for i, fd := range fds {
			lp := p.loops[(p.next+i)%len(p.loops)]
			ls := &lsock{fd: fd, l: nl, loop: lp}
			nl.socks = append(nl.socks, ls)
			if p.inherit != nil && !p.inherit.resumed {
				p.inherit.lsocks = append(p.inherit.lsocks, ls) // polled at Resume
				continue
			}
			lp.send(command{op: cmdListen, ls: ls})
		}
		p.next++
		p.listeners[s.ID] = nl
		if l != nil {
			l.close()
		}
		p.log.Info("splice listener started", "service", s.Name, "vip", vip)
	}
	p.resetDownLocked(ns)
	return nil
}

// check refuses what the proxy cannot serve.
func check(s datapath.Service) error {
	for _, id := range s.Ring {
		if id > 1<<16-1 {
			return fmt.Errorf("backend id %d does not fit a ring slot", id)
		}
	}
	switch {
	case s.Proto == 17:
		return ErrUDP
	case s.Proto != 6:
		return fmt.Errorf("protocol %d is not TCP", s.Proto)
	case !s.VIP.IsValid():
		return errors.New("no VIP")
	case s.Port == 0:
		return errors.New("port 0")
	}
	return nil
}

// resetDownLocked resets the established connections of s whose backend is
// Down, when s asks for it (OnDownReset), like the XDP program's
// on_down: reset.
func (p *Proxy) resetDownLocked(s *service) {
	if !s.OnDownReset {
		return
	}
	for _, c := range p.conns {
		if c.service != s.ID {
			continue
		}
		if b := s.backends[c.be.ID]; b != nil && b.State == datapath.Down && !c.closing.Load() {
			p.resetConn(c, rBackendDown)
		}
	}
}

// resetConn has c's loop reset both its sockets, counted (and traced) as
// reason r.
func (p *Proxy) resetConn(c *conn, r int) {
	p.reasons[r].Add(1)
	p.traced(c.service, c.key.client, c.key.vip, c.be.ID, "reset", reasonNames[r], "conn")
	c.closing.Store(true)
	c.loop.send(command{op: cmdReset, c: c})
}

// CloseFlows implements datapath.Closer: it resets both sockets of each
// connection it still holds as flows name it (same client, VIP, service
// and backend, not closing), as on_down: reset does, and returns those.
func (p *Proxy) CloseFlows(flows []datapath.Flow) ([]datapath.Flow, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.changing(); err != nil {
		return nil, err
	}
	var out []datapath.Flow
	for _, f := range flows {
		c := p.conns[connKey{client: f.Client, vip: f.VIP}]
		if c == nil || c.service != f.Service || c.be.ID != f.Backend || f.Proto != 6 || c.closing.Load() {
			continue
		}
		p.resetConn(c, rDrained)
		f.Closing = true
		out = append(out, f)
	}
	return out, nil
}

// DeleteService implements datapath.Datapath: the service's listener
// closes, so new clients are refused by the kernel, its affinity entries
// are forgotten and its VIP's local route goes with the VIP's last
// service. Its established connections keep flowing until
// either side closes them (or Close): a proxied TCP connection is bound to
// its backend socket, and cutting it is never needed to stop accepting.
func (p *Proxy) DeleteService(s datapath.Service) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.changing(); err != nil {
		return fmt.Errorf("service %s: %w", s.Name, err)
	}
	if err := p.claimLocked(); err != nil {
		return fmt.Errorf("service %s: %w", s.Name, err)
	}
	l := p.listeners[s.ID]
	if l == nil {
		return nil
	}
	l.close()
	delete(p.listeners, s.ID)
	if vip, ok := p.svcVIP[s.ID]; ok {
		delete(p.svcVIP, s.ID)
		p.releaseVIP(vip)
	}
	p.affinity.deleteService(s.ID)
	p.log.Info("splice listener stopped", "service", s.Name, "vip", l.addr)
	return nil
}

// Counters implements datapath.Datapath for the services served now and
// their backends. A backend's Bytes are the bytes it sent and received
// through the proxy, and its Packets the splice(2) calls that read them
// from either socket (up to PipeSize each), not IP packets. Reasons count
// connections (see the Reason constants).
func (p *Proxy) Counters() (datapath.Counters, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.countersLocked(), nil
}

// countersLocked is Counters with p.mu held.
func (p *Proxy) countersLocked() datapath.Counters {
	c := datapath.Counters{
		Services: make(map[uint32]datapath.ServiceCounters),
		Backends: make(map[uint32]datapath.BackendCounters),
		Reasons:  make(map[string]uint64, rMax),
	}
	for r, name := range reasonNames {
		c.Reasons[name] = p.reasons[r].Load()
	}
	for id, l := range p.listeners {
		s := l.svc.Load()
		c.Services[id] = datapath.ServiceCounters{
			NewConns:       s.stats.newConns.Load(),
			AffinityHits:   s.stats.affinityHits.Load(),
			AffinityMisses: s.stats.affinityMisses.Load(),
		}
		for bid, b := range s.backends {
			c.Backends[bid] = datapath.BackendCounters{
				Packets:  b.stats.packets.Load(),
				Bytes:    b.stats.bytes.Load(),
				NewConns: b.stats.newConns.Load(),
			}
		}
	}
	return c
}

// Tables implements datapath.TableReader: the connections being proxied,
// whose capacity is Options.MaxConns (0: none but the file descriptor
// limit), and the source-affinity table.
func (p *Proxy) Tables() ([]datapath.Table, error) {
	p.mu.Lock()
	conns := len(p.conns)
	p.mu.Unlock()
	return []datapath.Table{
		{Name: "connections", Entries: conns, Capacity: max(p.opts.MaxConns, 0)},
		{Name: "affinity", Entries: p.affinity.len(), Capacity: p.affinity.max},
	}, nil
}

// Flows implements datapath.Datapath: the connections being proxied,
// sorted by service, VIP and client. Closing is set once either side has
// ended its stream (FIN) or failed.
func (p *Proxy) Flows() ([]datapath.Flow, error) {
	p.mu.Lock()
	now := p.now()
	out := make([]datapath.Flow, 0, len(p.conns))
	for k, c := range p.conns {
		out = append(out, datapath.Flow{
			Client:  k.client,
			VIP:     k.vip,
			Proto:   6,
			Service: c.service,
			Backend: c.be.ID,
			Closing: c.closing.Load(),
			Idle:    time.Duration(max(now-c.lastSeen.Load(), 0)),
		})
	}
	p.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.Service != b.Service {
			return a.Service < b.Service
		}
		if a.VIP != b.VIP {
			return a.VIP.Compare(b.VIP) < 0
		}
		return a.Client.Compare(b.Client) < 0
	})
	return out, nil
}

// Close implements datapath.Datapath: it closes every listener and every
// connection (a proxied connection cannot outlive its process), removes
// the local routes it added, and returns once all of them are gone. It is
// idempotent.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	if f := p.frozen; f != nil && !p.handedOver {
		// A handover under way fails: the loops go on, to stop.
		p.frozen = nil
		close(f.verdict)
	}
	if p.inherit != nil && !p.inherit.resumed {
		// Never served: the predecessor may still serve these sockets,
		// which a shutdown would stop for it too.
		p.closeInherited()
	} else {
		for _, l := range p.listeners {
			l.close()
		}
	}
	p.listeners = map[uint32]*listener{}
	for _, lp := range p.loops {
		lp.send(command{op: cmdStop})
	}
	loops := len(p.loops)
	p.mu.Unlock()
	p.wg.Wait()
	releaseProcs(loops)
	p.pipes.close()
	// The routes go after the connections: until then the VIPs stay local,
	// so that the clients' last packets are answered (by a RST once the
	// sockets are gone) rather than lost.
	p.mu.Lock()
	err := p.releaseVIPs()
	p.mu.Unlock()
	p.log.Info("splice proxy closed with its connections")
	return err
}

// startLoops starts the event loops, Options.Loops or one per P (see
// holdProcs), unless they run.
func (p *Proxy) startLoops() error {
	if p.loops != nil {
		return nil
	}
	n := holdProcs(p.opts.Loops)
	loops := make([]*loop, 0, n)
	for range n {
		lp, err := newLoop(p)
		if err != nil {
			for _, lp := range loops {
				closeFD(lp.epfd)
				closeFD(lp.evfd)
			}
			releaseProcs(n)
			return err
		}
		loops = append(loops, lp)
	}
	p.loops = loops
	for _, lp := range loops {
		p.wg.Add(1)
		go lp.run()
	}
	return nil
}

// close stops l's sockets at once (the kernel refuses new clients from
// now on) and has their loops close them.
func (l *listener) close() {
	for _, ls := range l.socks {
		if in := ls.loop.p.inherit; in != nil && !in.resumed {
			// Inherited and never polled: the predecessor may still
			// serve it, which a shutdown would stop for it too.
			in.lsocks = slices.DeleteFunc(in.lsocks, func(o *lsock) bool { return o == ls })
			ls.closed = true
			closeFD(ls.fd)
			continue
		}
		// The loop alone closes the descriptor, so it cannot be
		// reused under the loop; shutdown stops the listening now.
		unix.RawSyscall(unix.SYS_SHUTDOWN, uintptr(ls.fd), unix.SHUT_RDWR, 0)
		ls.loop.send(command{op: cmdUnlisten, ls: ls})
	}
}

// serve starts proxying a client accepted on a listening socket of s
// (and counted in lp.load): it picks the backend, starts connecting to it,
// and registers both sockets with the loop.
func (lp *loop) serve(s *service, cfd int, client netip.AddrPort) {
	p := lp.p
	if n := p.active.Add(1); p.opts.MaxConns > 0 && n > int64(p.opts.MaxConns) {
		p.traced(s.ID, client, netip.AddrPortFrom(s.VIP, s.Port), 0, "reset", ReasonConnLimit, "")
		lp.refuse(cfd, rConnLimit)
		return
	}
	vip := netip.AddrPortFrom(s.VIP, s.Port)
	now := p.now()
	b, hit := p.choose(s, client, now)
	if b == nil {
		p.traced(s.ID, client, vip, 0, "reset", ReasonNoBackend, "")
		lp.refuse(cfd, rNoBackend)
		return
	}
	p.record(s, client, b, hit, now)
	baddr := netip.AddrPortFrom(b.Addr, b.Port)
	bfd, dialing, err := p.dial(baddr)
	if err != nil {
		p.log.Debug("backend failed; client reset", "service", s.Name, "client", client, "backend", baddr, "err", err)
		p.traced(s.ID, client, vip, b.ID, "reset", ReasonDialFailed, byOf(hit))
		lp.refuse(cfd, rDialFailed)
		return
	}
	p.traced(s.ID, client, vip, b.ID, "proxy", "", byOf(hit))
	c := &conn{
		p: p, loop: lp,
		key: connKey{client, vip}, service: s.ID, be: b,
		sides:       [2]side{{fd: cfd, w: true}, {fd: bfd, w: dialing == nil}},
		dialing:     dialing,
		dialTimer:   -1,
		idleTimer:   -1,
		idleTimeout: s.IdleTimeout,
	}
	c.lastSeen.Store(lp.now)
	if s.ProxyProtocol {
		c.hdr = appendProxyHeader(make([]byte, 0, 52), client, vip)
	}
	if err := lp.register(c); err != nil {
		p.log.Warn("cannot poll connection", "client", client, "vip", vip, "err", err)
		c.finish(true)
		return
	}
	if dialing != nil {
		heap.Push(&lp.timers, timer{when: lp.now + int64(p.opts.DialTimeout), c: c, dial: true})
	} else if !p.add(c) {
		c.finish(false)
		return
	}
	if c.idleTimeout > 0 {
		heap.Push(&lp.timers, timer{when: lp.now + int64(c.idleTimeout), c: c})
	}
	lp.keepAliveLater(c)
	c.progress()
}

// refuse resets a client that serve counted but cannot proxy, for reason r.
func (lp *loop) refuse(cfd int, r int) {
	lp.load.Add(-1)
	lp.p.active.Add(-1)
	lp.p.reasons[r].Add(1)
	resetFD(cfd)
}

// add enters c in the connection table, unless the proxy is closed.
func (p *Proxy) add(c *conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.conns[c.key] = c
	return true
}

func (p *Proxy) remove(c *conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conns[c.key] == c {
		delete(p.conns, c.key)
	}
}
