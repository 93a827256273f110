package userspace

import (
	"container/heap"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/datapath"
)

// Handing a running proxy to its successor. A proxied connection lives in
// the proxy's sockets, so a daemon that stops ends it; a daemon that hands
// over instead gives a new process (a restarted or upgraded tether) every
// socket it holds, with what it knows of each:
//
//  1. Freeze stops every loop where it stands (each blocks in a command,
//     so no byte moves and no client is accepted) and returns the State:
//     the listening sockets, every connection with both its sockets, the
//     pipes that hold its bytes in flight and its progress, the services
//     as served, the counters, the affinity table and the VIPs' local
//     routes. The descriptors stay open in this process too.
//  2. The successor receives them (package handover passes descriptors
//     with SCM_RIGHTS), builds its proxy with Options.Inherit and applies
//     its configuration. Until it says it has taken them, it moves no
//     byte and accepts nobody.
//  3. Release, once the successor has taken everything: the loops forget
//     the handed connections and listening sockets and close their copies
//     of the descriptors, which neither closes nor resets a socket the
//     successor holds. Thaw instead, when the successor failed or went
//     away before taking them: the loops go on as if nothing had happened.
//  4. The successor's Resume starts serving: it registers the connections
//     with its loops and starts accepting.
//
// Nothing is lost: the kernel keeps the bytes that arrive meanwhile in the
// sockets' buffers and the clients that connect in the listening sockets'
// queues, and a pipe's bytes are handed with the pipe.

// State is what a proxy hands to its successor. Descriptors are numbers in
// the process that holds the State.
type State struct {
	Services  []datapath.Service // as served, with their rings
	Counters  datapath.Counters
	Listeners []HandedListener
	Conns     []HandedConn
	Affinity  []HandedAffinity
	// Routes are the VIPs whose local route the proxy added: the
	// successor removes them when it no longer needs them.
	Routes []netip.Addr
}

// HandedListener is a listening socket of a service.
type HandedListener struct {
	Service uint32
	Addr    netip.AddrPort
	FD      int
}

// HandedConn is a proxied connection.
type HandedConn struct {
	Client, VIP netip.AddrPort
	Service     uint32
	Backend     datapath.Backend
	ClientFD    int
	BackendFD   int
	// Dialing: the backend's handshake is still going on; DialLeft is
	// what remains of its timeout.
	Dialing  bool          `json:",omitempty"`
	DialLeft time.Duration `json:",omitempty"`
	// Header is what remains to be sent of the PROXY protocol header.
	Header      []byte `json:",omitempty"`
	IdleTimeout time.Duration
	Idle        time.Duration // since the last byte moved
	Dirs        [2]HandedDir  // client to backend, backend to client
	Closing     bool          `json:",omitempty"`
}

// HandedDir is one direction of a connection: the pipe that holds its
// bytes in flight, if any (PipeR, PipeW; -1 when none), how many, and
// whether its source's stream ended.
type HandedDir struct {
	PipeR, PipeW int
	Bytes        int  `json:",omitempty"`
	EOF          bool `json:",omitempty"`
	Ended        bool `json:",omitempty"`
}

// HandedAffinity is an entry of the affinity table.
type HandedAffinity struct {
	Service uint32
	Client  netip.Addr
	Backend uint32
	Age     time.Duration
}

// FDs returns every descriptor of s, in a fixed order (listeners, then
// each connection's), for a transport to pass.
func (s *State) FDs() []*int {
	var out []*int
	for i := range s.Listeners {
		out = append(out, &s.Listeners[i].FD)
	}
	for i := range s.Conns {
		c := &s.Conns[i]
		out = append(out, &c.ClientFD, &c.BackendFD)
		for d := range c.Dirs {
			if c.Dirs[d].PipeR >= 0 {
				out = append(out, &c.Dirs[d].PipeR, &c.Dirs[d].PipeW)
			}
		}
	}
	return out
}

// ErrHandedOver is what a proxy that handed its state to a successor, or
// is handing it, says to a change.
var ErrHandedOver = errors.New("the splice proxy is handing its connections to a new daemon")

// freeze is one handover, as the loops see it.
type freeze struct {
	paused  chan struct{}   // a loop stopped
	all     chan struct{}   // closed: every loop stopped
	snaps   chan *loopState // a loop's connections and listening sockets
	verdict chan struct{}   // closed once release is set
	release bool
}

type loopState struct {
	lp     *loop
	conns  []*conn
	lsocks []*lsock
}

// Freeze stops the proxy for a handover and returns its state (see the
// top of this file). Every change is refused with ErrHandedOver until Thaw.
// It fails if the proxy is closed or handing over already.
func (p *Proxy) Freeze() (*State, error) {
	p.mu.Lock()
	switch {
	case p.closed:
		p.mu.Unlock()
		return nil, errors.New("freeze the splice proxy: it is closed")
	case p.frozen != nil || p.handedOver:
		p.mu.Unlock()
		return nil, fmt.Errorf("freeze the splice proxy: %w", ErrHandedOver)
	}
	loops := p.loops
	f := &freeze{
		paused:  make(chan struct{}, len(loops)),
		all:     make(chan struct{}),
		snaps:   make(chan *loopState, len(loops)),
		verdict: make(chan struct{}),
	}
	p.frozen = f // changes are refused from now on
	// Sent under p.mu, so that Close, which stops the loops, comes after:
	// every loop takes the freeze (and Close's thaw) before its stop.
	for _, lp := range loops {
		lp.send(command{op: cmdFreeze, f: f})
	}
	p.mu.Unlock()
	// Two steps: a loop may hand a client it accepted to another (cmdServe)
	// until it stops itself; once all have stopped, each takes what it was
	// handed and then tells what it holds. The loops take p.mu on the way
	// (add), so it is not held while they work.
	for range loops {
		<-f.paused
	}
	close(f.all)
	snaps := make([]*loopState, 0, len(loops))
	for range loops {
		snaps = append(snaps, <-f.snaps)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		// Close came meanwhile and thawed the loops, which are closing
		// the descriptors.
		return nil, errors.New("freeze the splice proxy: it closed meanwhile")
	}
	st := &State{Counters: p.countersLocked()}
	for _, l := range p.listeners {
		s := l.svc.Load()
		ds := s.Service
		ds.Ring = make([]uint32, len(s.ring))
		for i, id := range s.ring {
			ds.Ring[i] = uint32(id)
		}
		ds.Backends = slices.Clone(s.Backends)
		st.Services = append(st.Services, ds)
	}
	slices.SortFunc(st.Services, func(a, b datapath.Service) int { return int(a.ID) - int(b.ID) })
	for vip, r := range p.vips {
		if r.route != nil {
			st.Routes = append(st.Routes, vip)
		}
	}
	now := p.now()
	for _, ls := range snaps {
		for _, s := range ls.lsocks {
			st.Listeners = append(st.Listeners, HandedListener{Service: s.l.svc.Load().ID, Addr: s.l.addr, FD: s.fd})
		}
		for _, c := range ls.conns {
			st.Conns = append(st.Conns, c.handed(now))
		}
	}
	st.Affinity = p.affinity.handed(now)
	return st, nil
}

// handed is c as a successor takes it. c's loop is frozen.
func (c *conn) handed(now int64) HandedConn {
	h := HandedConn{
		Client: c.key.client, VIP: c.key.vip,
		Service:     c.service,
		Backend:     c.be.Backend,
		ClientFD:    c.sides[0].fd,
		BackendFD:   c.sides[1].fd,
		Header:      slices.Clone(c.hdr),
		IdleTimeout: c.idleTimeout,
		Idle:        time.Duration(now - c.lastSeen.Load()),
		Closing:     c.closing.Load(),
	}
	if c.dialing != nil {
		h.Dialing = true
		h.DialLeft = c.p.opts.DialTimeout
		if c.dialTimer >= 0 {
			h.DialLeft = time.Duration(max(c.loop.timers[c.dialTimer].when-now, 0))
		}
	}
	for i, d := range c.dirs {
		h.Dirs[i] = HandedDir{PipeR: -1, PipeW: -1, Bytes: d.n, EOF: d.eof, Ended: d.ended}
		if d.have {
			h.Dirs[i].PipeR, h.Dirs[i].PipeW = d.pp.r, d.pp.w
		}
	}
	return h
}

// Thaw ends a handover that failed: the loops go on where they stopped.
func (p *Proxy) Thaw() { p.endFreeze(false) }

// Release ends a handover that succeeded: the loops forget the handed
// connections and listening sockets and close their descriptors (the
// successor's copies keep the sockets), the VIPs' local routes become the
// successor's, and the proxy refuses every change from then on. Close
// still stops it.
func (p *Proxy) Release() { p.endFreeze(true) }

func (p *Proxy) endFreeze(release bool) {
	p.mu.Lock()
	f := p.frozen
	if f == nil || p.handedOver {
		p.mu.Unlock()
		return
	}
	if release {
		p.handedOver = true
		for _, r := range p.vips {
			r.route = nil // the successor's now
		}
		for _, l := range p.listeners {
			l.socks = nil
		}
		p.listeners = map[uint32]*listener{}
	} else {
		p.frozen = nil
	}
	f.release = release
	close(f.verdict)
	p.mu.Unlock()
}

// changing refuses a change while the proxy hands over or has handed over.
// p.mu is held.
func (p *Proxy) changing() error {
	if p.frozen != nil || p.handedOver {
		return ErrHandedOver
	}
	return nil
}

// frozenLoop is a loop's part of a handover: it stops, reports what it
// holds once every loop has stopped, and waits for the verdict.
//
// rest are the commands that came after the freeze in the loop's batch:
// they are taken like those queued meanwhile, and it returns those that
// must wait until after the verdict.
func (lp *loop) frozenLoop(f *freeze, rest []command) (later []command) {
	f.paused <- struct{}{}
	<-f.all
	lp.mu.Lock()
	rest = append(rest, lp.cmds...)
	lp.cmds = nil
	lp.mu.Unlock()
	for _, c := range rest {
		switch c.op {
		case cmdServe:
			lp.serve(c.svc, c.fd, c.client)
		case cmdReset:
			c.c.finish(true)
		default:
			// cmdListen and cmdUnlisten come from changes, refused while
			// frozen; cmdStop from Close, which ends the freeze first.
			later = append(later, c)
		}
	}
	st := &loopState{lp: lp}
	for fd, c := range lp.conns {
		if c != nil && c.sides[0].fd == fd && !c.done {
			st.conns = append(st.conns, c)
		}
	}
	for _, ls := range lp.lsocks {
		st.lsocks = append(st.lsocks, ls)
	}
	f.snaps <- st
	<-f.verdict
	if !f.release {
		lp.thaw(st)
		return later
	}
	lp.forget(st)
	return later
}

// thaw resumes the loop after a failed handover. Edges that epoll reported
// meanwhile are waiting in its ready list; the connections and listening
// sockets are looked at again anyway.
func (lp *loop) thaw(st *loopState) {
	for _, c := range st.conns {
		c.sides[0].r, c.sides[0].w, c.sides[1].r, c.sides[1].w = true, true, true, true
		lp.enqueue(c)
	}
	for _, ls := range st.lsocks {
		if !ls.queued {
			ls.queued = true
			lp.acceptq = append(lp.acceptq, ls)
		}
	}
}

// forget drops what the loop handed over. Each descriptor leaves the epoll
// set before it is closed: the successor holds the same open socket, which
// would otherwise stay registered here.
func (lp *loop) forget(st *loopState) {
	p := lp.p
	del := func(fd int) {
		unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(lp.epfd), unix.EPOLL_CTL_DEL, uintptr(fd), 0, 0, 0)
		closeFD(fd)
	}
	for _, c := range st.conns {
		c.done = true
		if c.dialTimer >= 0 {
			heap.Remove(&lp.timers, c.dialTimer)
		}
		if c.idleTimer >= 0 {
			heap.Remove(&lp.timers, c.idleTimer)
		}
		for i := range c.dirs {
			if d := &c.dirs[i]; d.have {
				d.pp.close()
				d.have = false
			}
		}
		lp.unregister(c)
		del(c.sides[0].fd)
		del(c.sides[1].fd)
		p.remove(c)
		p.active.Add(-1)
		lp.load.Add(-1)
	}
	for _, ls := range st.lsocks {
		ls.closed = true
		delete(lp.lsocks, ls.fd)
		del(ls.fd)
	}
}

// handed lists the affinity table's entries with their ages.
func (t *affinityTable) handed(now int64) []HandedAffinity {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]HandedAffinity, 0, len(t.entries))
	for k, e := range t.entries {
		out = append(out, HandedAffinity{
			Service: k.service,
			Client:  netip.AddrFrom16(k.addr).Unmap(),
			Backend: e.backend,
			Age:     time.Duration(now - e.lastSeen),
		})
	}
	return out
}

// inheritance is what a proxy started with Options.Inherit still holds of
// its predecessor's state until its configuration claims it and Resume
// serves it.
type inheritance struct {
	services  map[uint32]*service                 // by ID, with their counters
	listeners map[netip.AddrPort][]HandedListener // not yet claimed by a service
	conns     []HandedConn
	routes    map[netip.Addr]bool
	claimed   bool // its services are the proxy's (claimLocked)
	resumed   bool
	closed    bool     // closeInherited: Close came before Resume
	lsocks    []*lsock // claimed, polled at Resume
}

func newInheritance(st *State) *inheritance {
	in := &inheritance{
		services:  make(map[uint32]*service),
		listeners: make(map[netip.AddrPort][]HandedListener),
		conns:     st.Conns,
		routes:    make(map[netip.Addr]bool),
	}
	for _, s := range st.Services {
		ns := newService(s, nil)
		c := st.Counters.Services[s.ID]
		ns.stats.newConns.Store(c.NewConns)
		ns.stats.affinityHits.Store(c.AffinityHits)
		ns.stats.affinityMisses.Store(c.AffinityMisses)
		for id, b := range ns.backends {
			c := st.Counters.Backends[id]
			b.stats.packets.Store(c.Packets)
			b.stats.bytes.Store(c.Bytes)
			b.stats.newConns.Store(c.NewConns)
		}
		in.services[s.ID] = ns
	}
	for _, l := range st.Listeners {
		in.listeners[l.Addr] = append(in.listeners[l.Addr], l)
	}
	for _, vip := range st.Routes {
		in.routes[vip] = true
	}
	return in
}

// Adopted implements datapath.Adopter: whether the proxy started with a
// predecessor's state (Options.Inherit).
func (p *Proxy) Adopted() bool { return p.inherit != nil }

// AdoptedServices implements datapath.Adopter: the predecessor's services,
// so that the control plane gives them and their backends their ids again
// (the handed connections and affinity entries name them by id).
func (p *Proxy) AdoptedServices() []datapath.Service {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.inherit == nil || p.inherit.services == nil {
		return nil
	}
	out := make([]datapath.Service, 0, len(p.inherit.services))
	for _, s := range p.inherit.services {
		ds := s.Service
		ds.Ring = make([]uint32, len(s.ring))
		for i, id := range s.ring {
			ds.Ring[i] = uint32(id)
		}
		out = append(out, ds)
	}
	slices.SortFunc(out, func(a, b datapath.Service) int { return int(a.ID) - int(b.ID) })
	return out
}

// claimLocked serves the predecessor's services as it served them, on its
// listening sockets (polled from Resume on), before the first change: the
// control plane, which adopted them (AdoptedServices), changes only what
// its configuration changes. p.mu is held.
func (p *Proxy) claimLocked() error {
	in := p.inherit
	if in == nil || in.claimed {
		return nil
	}
	in.claimed = true
	if len(in.services) == 0 && len(in.conns) == 0 {
		return nil
	}
	if err := p.startLoops(); err != nil {
		return err
	}
	for _, id := range slices.Sorted(maps.Keys(in.services)) {
		s := in.services[id]
		vip := netip.AddrPortFrom(s.VIP, s.Port)
		fds := p.inheritedListeners(vip)
		if len(fds) == 0 {
			continue // it listened nowhere: the next upsert binds
		}
		if err := p.acquireVIP(s.VIP); err != nil {
			return err
		}
		p.svcVIP[id] = s.VIP
		l := &listener{addr: vip}
		l.svc.Store(s)
		for i, fd := range fds {
			ls := &lsock{fd: fd, l: l, loop: p.loops[i%len(p.loops)]}
			l.socks = append(l.socks, ls)
			in.lsocks = append(in.lsocks, ls)
		}
		p.listeners[id] = l
	}
	return nil
}

// inheritedListeners takes the predecessor's listening sockets on vip, if
// any. p.mu is held.
func (p *Proxy) inheritedListeners(vip netip.AddrPort) []int {
	if p.inherit == nil {
		return nil
	}
	ls := p.inherit.listeners[vip]
	if len(ls) == 0 {
		return nil
	}
	delete(p.inherit.listeners, vip)
	fds := make([]int, len(ls))
	for i, l := range ls {
		fds[i] = l.FD
	}
	return fds
}

// Resume implements datapath.Resumer: the proxy serves what it inherited
// (Options.Inherit), once the configuration has claimed the services:
// the loops take the connections, the listening sockets are polled, and
// the predecessor's listening sockets that no service claimed close (their
// waiting clients are refused), as do the local routes no VIP needs.
// Without an inheritance it does nothing.
func (p *Proxy) Resume() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	in := p.inherit
	if in == nil || in.resumed || in.closed {
		return nil
	}
	if err := p.claimLocked(); err != nil {
		return err
	}
	if len(in.conns) > 0 {
		if err := p.startLoops(); err != nil {
			return err
		}
	}
	in.resumed = true
	for _, ls := range in.listeners {
		for _, l := range ls {
			closeFD(l.FD) // the predecessor has let go: no shutdown needed
		}
	}
	in.listeners = nil
	for vip := range in.routes {
		if _, ok := p.vips[vip]; !ok {
			r, err := p.localRoute(vip)
			if err == nil {
				err = p.delRoute(r)
			}
			if err != nil {
				p.log.Error("remove the local route of a VIP no service uses", "vip", vip, "err", err)
			}
		}
	}
	for _, ls := range in.lsocks {
		ls.loop.send(command{op: cmdListen, ls: ls})
	}
	in.lsocks = nil
	now := p.now()
	for i, h := range in.conns {
		c := p.inheritConn(h, now)
		lp := p.loops[i%len(p.loops)]
		c.loop = lp
		lp.load.Add(1)
		p.active.Add(1)
		if c.dialing == nil {
			p.conns[c.key] = c
		}
		lp.send(command{op: cmdAdopt, c: c})
	}
	for _, l := range p.listeners {
		p.resetDownLocked(l.svc.Load()) // after the adoptions, in each loop's queue
	}
	p.log.Info("serving the connections handed over by the previous daemon", "connections", len(in.conns))
	in.conns = nil
	in.services = nil
	return nil
}

// inheritConn rebuilds a handed connection, bound to its backend as the
// service now has it (with its counters), or as it was if the service no
// longer has it. p.mu is held.
func (p *Proxy) inheritConn(h HandedConn, now int64) *conn {
	var be *backend
	if l := p.listeners[h.Service]; l != nil {
		if b := l.svc.Load().backends[h.Backend.ID]; b != nil && b.Addr == h.Backend.Addr && b.Port == h.Backend.Port {
			be = b
		}
	}
	if be == nil {
		be = &backend{Backend: h.Backend, stats: &backendStats{}}
	}
	c := &conn{
		p: p, key: connKey{h.Client, h.VIP}, service: h.Service, be: be,
		sides:       [2]side{{fd: h.ClientFD, r: true, w: true}, {fd: h.BackendFD, r: true, w: true}},
		dialTimer:   -1,
		idleTimer:   -1,
		hdr:         h.Header,
		idleTimeout: h.IdleTimeout,
	}
	c.lastSeen.Store(now - int64(h.Idle))
	c.closing.Store(h.Closing)
	for i, d := range h.Dirs {
		c.dirs[i] = dir{n: d.Bytes, eof: d.EOF, ended: d.Ended}
		if d.PipeR >= 0 {
			c.dirs[i].pp, c.dirs[i].have = pipe{r: d.PipeR, w: d.PipeW}, true
		}
		if d.Ended {
			c.ended++
		}
	}
	if h.Dialing {
		sa, salen, _ := rawSockaddr(netip.AddrPortFrom(h.Backend.Addr, h.Backend.Port))
		c.dialing = &dialing{salen: salen}
		copy(c.dialing.sa[:salen], unsafe.Slice((*byte)(sa), salen))
		c.dialLeft = h.DialLeft
	}
	return c
}

// adopt registers a handed connection with the loop and moves what it can.
func (lp *loop) adopt(c *conn) {
	if err := lp.register(c); err != nil {
		lp.p.log.Warn("cannot poll a handed connection", "client", c.key.client, "vip", c.key.vip, "err", err)
		c.finish(true)
		return
	}
	if c.dialing != nil {
		heap.Push(&lp.timers, timer{when: lp.now + int64(c.dialLeft), c: c, dial: true})
	}
	if c.idleTimeout > 0 {
		heap.Push(&lp.timers, timer{when: c.lastSeen.Load() + int64(c.idleTimeout), c: c})
	}
	lp.keepAliveLater(c)
	c.progress()
}

// closeInherited closes what an inheritance never served, at a Close
// before Resume: plain closes, for the predecessor may still serve them.
// p.mu is held.
func (p *Proxy) closeInherited() {
	in := p.inherit
	if in == nil || in.resumed || in.closed {
		return
	}
	in.closed = true // still not resumed: its routes stay (mayRemove)
	for _, ls := range in.listeners {
		for _, l := range ls {
			closeFD(l.FD)
		}
	}
	for _, ls := range in.lsocks {
		ls.closed = true
		closeFD(ls.fd)
	}
	for _, h := range in.conns {
		closeFD(h.ClientFD)
		closeFD(h.BackendFD)
		for _, d := range h.Dirs {
			if d.PipeR >= 0 {
				closeFD(d.PipeR)
				closeFD(d.PipeW)
			}
		}
	}
	in.conns, in.listeners, in.lsocks = nil, nil, nil
}
