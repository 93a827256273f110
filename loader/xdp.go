package loader

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/internal/hostaddr"
	"github.com/tetherlb/tether/maps"
)

// ResolveTimeout bounds how long an update waits for backends' MAC
// addresses.
const ResolveTimeout = 3 * time.Second

// refreshInterval is how often backend neighbour entries are re-probed so
// that the kernel notices a backend whose MAC changed.
const refreshInterval = 10 * time.Second

// XDP is the XDP datapath: the program attached to interfaces and its maps
// driven through the datapath.Datapath interface. Backends' MACs come from
// the kernel's neighbour table and follow its changes.
//
// With a pin directory (Options.PinDir) the datapath outlives the XDP
// value: Close leaves the program attached and forwarding with its last
// state, and the next NewXDP adopts it (see Adopted).
type XDP struct {
	objs  *Objects
	modes map[string]string
	log   *slog.Logger

	mu       sync.Mutex
	services map[uint32]datapath.Service
	hops     map[netip.Addr]hop
	// unresolved are the addresses asked for that no host answered, with
	// as much of their hop as is known (interface and source MAC): they
	// are probed again in the background, and onResolved is told when one
	// answers.
	unresolved map[netip.Addr]unresolved
	// routed: some backend address was reached through a gateway, whose
	// neighbour entries neighbourChanged then looks for too.
	routed     bool
	onResolved func(netip.Addr)
	asked      map[netip.Addr]time.Time // when each address of hops was last asked for
	adopted    []datapath.Service
	vetter     hostaddr.Vetter
	// warnedPorts: the overlap of the kernel's ephemeral ports with
	// fullnat's was logged (see checkSNAT).
	warnedPorts bool
	// echo are the VIPs whose echo requests the program answers, as the
	// vips map holds them; echoing counts the services of each VIP that
	// say it should (EchoReply).
	echo    map[netip.Addr]bool
	echoing map[netip.Addr]int
	// probes: health probes via the VIP (probe.go); probeLink is the
	// probe device's index once set up.
	probes    probeState
	probeLink int

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

var (
	_ datapath.Datapath    = (*XDP)(nil)
	_ datapath.Adopter     = (*XDP)(nil)
	_ datapath.Remover     = (*XDP)(nil)
	_ datapath.TableReader = (*XDP)(nil)
	_ datapath.Resolver    = (*XDP)(nil)
	_ datapath.Prober      = (*XDP)(nil)
)

// unresolved is an address that did not answer ARP/ND: its partial hop,
// why, and when it was last asked for.
type unresolved struct {
	hop   hop
	err   error
	asked time.Time
}

// forgetUnresolved is how long an address that did not answer is probed
// after it was last asked for, once no service has it as a backend.
const forgetUnresolved = time.Minute

// NewXDP loads the program, attaches it to every interface in the given
// mode and starts following the neighbour table.
//
// With opts.PinDir (mounting bpffs at /sys/fs/bpf if needed), the state an
// earlier run pinned there is adopted: its maps replace new ones, with
// every entry kept; the services they hold are read back (Adopted); the
// pinned links of the interfaces get the new program in place, and those
// of interfaces no longer listed are detached. On error, a first start
// leaves nothing attached or pinned and an adoption leaves the earlier
// state forwarding.
func NewXDP(opts Options, ifaces []string, mode Mode, log *slog.Logger) (*XDP, error) {
	if opts.PinDir != "" {
		mounted, private, err := EnsureBPFFS(opts.PinDir)
		if err != nil {
			return nil, err
		}
		if mounted != "" {
			log.Info("mounted bpffs: it was not mounted", "path", mounted)
		}
		if private {
			log.Warn("bpffs was mounted in a mount namespace that may be this process's own "+
				"(ip netns exec, systemd PrivateMounts?): the pinned state would end with this process; "+
				"for restarts to keep connections, mount bpffs in the host's mount namespace or pass a --pin-dir on one",
				"path", mounted)
		}
	}
	objs, err := Load(opts)
	if err != nil {
		return nil, err
	}
	x := &XDP{
		objs:       objs,
		modes:      make(map[string]string),
		log:        log,
		services:   make(map[uint32]datapath.Service),
		hops:       make(map[netip.Addr]hop),
		unresolved: make(map[netip.Addr]unresolved),
		asked:      make(map[netip.Addr]time.Time),
		echo:       make(map[netip.Addr]bool),
		echoing:    make(map[netip.Addr]int),
		vetter:     hostaddr.Vetter{TTL: time.Second, Read: hostaddr.Read},
	}
	if err := x.attach(ifaces, mode); err != nil {
		if aerr := objs.Abort(); aerr != nil {
			log.Error("undo a failed start", "err", aerr)
		}
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	x.cancel = cancel
	x.wg.Add(1)
	go func() {
		defer x.wg.Done()
		x.followNeighbours(ctx)
	}()
	return x, nil
}

// attach adopts the pinned state, if any, and attaches the program.
func (x *XDP) attach(ifaces []string, mode Mode) error {
	objs := x.objs
	if objs.Adopted() {
		if err := x.adopt(); err != nil {
			return err
		}
	}
	for _, name := range ifaces {
		how, err := objs.Attach(name, mode)
		if err != nil {
			return err
		}
		x.modes[name] = string(mode)
		if how == AttachedNew {
			x.log.Info("attached XDP program", "interface", name, "mode", mode)
		} else {
			x.log.Info("attached XDP program: "+how.String(), "interface", name, "mode", mode)
		}
	}
	gone, err := objs.DetachUnlisted(ifaces)
	for _, name := range gone {
		x.log.Info("detached XDP program from an interface no longer configured", "interface", name)
	}
	return err
}

// adopt reads back the services and backends an earlier run left in the
// pinned maps, so that counters are kept and services no longer configured
// can be deleted. Backends of no service (a deletion that did not finish)
// are cleared.
func (x *XDP) adopt() error {
	m := x.objs.Maps
	entries, err := m.Services()
	if err != nil {
		return err
	}
	backends, err := m.Backends()
	if err != nil {
		return err
	}
	vips, err := m.VIPs()
	if err != nil {
		return err
	}
	served := map[netip.Addr]bool{}
	for _, e := range entries {
		served[e.VIP] = true
	}
	for a, flags := range vips {
		// A stop between a service's removal and its VIP's leaves the
		// VIP's entry: it answers for no service.
		if !served[a] {
			if err := m.DeleteVIP(a); err != nil {
				return err
			}
			continue
		}
		x.echo[a] = flags&maps.VIPEchoReply != 0
	}
	byService := map[uint32][]datapath.Backend{}
	for id, b := range backends {
		state := datapath.State(b.State)
		if b.State == maps.StateDownReset {
			state = datapath.Down
		}
		byService[b.Service] = append(byService[b.Service], datapath.Backend{ID: id, Addr: b.Addr, Port: b.Port, State: state})
	}
	for _, e := range entries {
		s := datapath.Service{
			ID:              e.ID,
			VIP:             e.VIP,
			Port:            e.Port,
			Proto:           e.Proto,
			SourceAffinity:  e.SourceAffinity,
			AffinityTimeout: e.AffinityTimeout,
			OnDownReset:     e.ResetOnDown,
			Forwarding:      forwardingOf(e.Forwarding),
			Share:           e.Share,
			EchoReply:       x.echo[e.VIP],
			Backends:        byService[e.ID],
		}
		slices.SortFunc(s.Backends, func(a, b datapath.Backend) int { return cmp.Compare(a.ID, b.ID) })
		delete(byService, e.ID)
		s.RingSignature = e.RingSignature
		x.services[s.ID] = s
		if s.EchoReply {
			x.echoing[s.VIP]++
		}
		if s.RingSignature == 0 {
			// Pinned by a tether that stored no signature: the control
			// plane compares the ring with the one it builds.
			if ring, err := m.Ring(e.ID); err == nil {
				s.Ring = ring // for the control plane only: this datapath keeps rings in the maps
			}
		}
		x.adopted = append(x.adopted, s)
	}
	slices.SortFunc(x.adopted, func(a, b datapath.Service) int { return cmp.Compare(a.ID, b.ID) })
	for svc, bs := range byService {
		for _, b := range bs {
			x.log.Info("cleared a pinned backend of no service", "backend", b.ID, "address", b.Addr, "service", svc)
			if err := m.ClearBackend(b.ID); err != nil {
				return err
			}
		}
	}
	conns, affinities, err := m.Entries()
	if err != nil {
		return err
	}
	x.log.Info("adopted pinned state", "dir", x.objs.PinDir(), "services", len(x.adopted), "backends", len(backends),
		"connections", conns, "affinities", affinities)
	return nil
}

// Adopted says whether the datapath took over state pinned by an earlier
// run.
func (x *XDP) Adopted() bool { return x.objs.Adopted() }

// AdoptedServices hands over the services found in the pinned maps at
// start, sorted by id, with their rings (without names or weights, which
// the maps do not hold), for the control plane to keep their ids
// (control.Controller.Adopt). A second call returns none.
func (x *XDP) AdoptedServices() []datapath.Service {
	x.mu.Lock()
	defer x.mu.Unlock()
	out := x.adopted
	x.adopted = nil
	return out
}

// serviceEntry is s as the services map holds it.
func serviceEntry(s datapath.Service) maps.Service {
	e := maps.Service{
		ID:              s.ID,
		SourceAffinity:  s.SourceAffinity,
		ResetOnDown:     s.OnDownReset,
		AffinityTimeout: s.AffinityTimeout,
		RingSignature:   s.RingSignature,
		Share:           s.Share,
	}
	switch s.Forwarding {
	case datapath.NAT:
		e.Forwarding = maps.ForwardNAT
	case datapath.FullNAT:
		e.Forwarding = maps.ForwardFullNAT
	case datapath.IPIP:
		e.Forwarding = maps.ForwardIPIP
	case datapath.GUE:
		e.Forwarding = maps.ForwardGUE
	}
	return e
}

// forwardingOf is the forwarding mode of a services map entry's.
func forwardingOf(f uint8) datapath.Forwarding {
	switch f {
	case maps.ForwardNAT:
		return datapath.NAT
	case maps.ForwardFullNAT:
		return datapath.FullNAT
	case maps.ForwardIPIP:
		return datapath.IPIP
	case maps.ForwardGUE:
		return datapath.GUE
	}
	return datapath.DSR
}

// checkSNAT refuses a fullnat source address that is not this host's (the
// backends' replies to it would not come back), and warns, once, when the
// kernel's ephemeral ports overlap fullnat's: the balancer's own
// connections to a backend (its health checks) could then share a
// 5-tuple with a translated flow, whose replies the program takes.
func (x *XDP) checkSNAT(s datapath.Service) error {
	if s.Forwarding != datapath.FullNAT {
		return nil
	}
	if a := s.SNATAddress; a.IsValid() {
		own, err := x.vetter.Own(a)
		if err != nil {
			return err
		}
		if !own {
			return datapath.Refuse(fmt.Errorf("service %s: snat_address %s is not an address of this host: the backends' replies to it would not come back (add it to an interface, or leave snat_address out)", s.Name, a))
		}
	}
	if !x.warnedPorts {
		if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
			var lo, hi int
			if _, err := fmt.Sscan(string(b), &lo, &hi); err == nil && lo <= maps.SNATPortMax {
				x.warnedPorts = true
				x.log.Warn("the kernel's ephemeral ports overlap fullnat's source ports: this host's own connections to a backend may clash with a translated flow (set net.ipv4.ip_local_port_range to start above 32767)",
					"ip_local_port_range", fmt.Sprintf("%d-%d", lo, hi), "fullnat_ports", fmt.Sprintf("%d-%d", maps.SNATPortMin, maps.SNATPortMax))
			}
		}
	}
	return nil
}

// checkForwarding refuses a mode the XDP program does not have, and one
// that asks the kernel's FIB for next hops while the kernel does not
// forward their family, as the FIB then answers nothing: nat and fullnat
// route the replies to the clients (the VIP's family), ipip and gue the
// outer packets to the backends (theirs).
func checkForwarding(s datapath.Service) error {
	var families []netip.Addr
	switch s.Forwarding {
	case "", datapath.DSR:
		return nil
	case datapath.NAT, datapath.FullNAT:
		families = append(families, s.VIP)
	case datapath.IPIP, datapath.GUE:
		// The backends' families; the VIP's while there are none.
		for _, b := range s.Backends {
			families = append(families, b.Addr)
		}
		if len(families) == 0 {
			families = append(families, s.VIP)
		}
	default:
		return datapath.Refuse(fmt.Errorf("service %s: the XDP datapath has no forwarding %q", s.Name, s.Forwarding))
	}
	why := "which routes the replies to the clients"
	if s.Forwarding.Encapsulates() {
		why = "which routes the encapsulated packets to the backends"
	}
	checked := map[bool]bool{}
	for _, a := range families {
		v6 := a.Unmap().Is6()
		if checked[v6] {
			continue
		}
		checked[v6] = true
		file, sysctl := "/proc/sys/net/ipv4/conf/all/forwarding", "net.ipv4.conf.all.forwarding"
		if v6 {
			file, sysctl = "/proc/sys/net/ipv6/conf/all/forwarding", "net.ipv6.conf.all.forwarding"
		}
		b, err := os.ReadFile(file)
		if err != nil {
			return fmt.Errorf("service %s: read %s: %w", s.Name, sysctl, err)
		}
		if strings.TrimSpace(string(b)) != "1" {
			return datapath.Refuse(fmt.Errorf("service %s: forwarding %s needs IP forwarding on this host, %s (sysctl -w %s=1)", s.Name, s.Forwarding, why, sysctl))
		}
	}
	return nil
}

// PinDir is the pin directory, or "" when nothing is pinned.
func (x *XDP) PinDir() string { return x.objs.PinDir() }

// Maps returns the typed view of the program's maps.
func (x *XDP) Maps() *maps.Maps { return x.objs.Maps }

// Modes implements datapath.Datapath.
func (x *XDP) Modes() map[string]string {
	out := make(map[string]string, len(x.modes))
	for k, v := range x.modes {
		out[k] = v
	}
	return out
}

// UpsertService implements datapath.Datapath. Backends are written before
// the ring that names them, and leave the ring before they are marked
// draining, down or removed, so that no packet meets a half-made change.
func (x *XDP) UpsertService(s datapath.Service) error {
	x.mu.Lock()
	defer x.mu.Unlock()
	if err := x.checkSNAT(s); err != nil {
		return err
	}
	if err := checkForwarding(s); err != nil {
		return err
	}
	if err := x.vet(s.Backends); err != nil {
		return fmt.Errorf("service %s: %w", s.Name, err)
	}
	if err := x.resolve(s.Backends); err != nil {
		return fmt.Errorf("service %s: %w", s.Name, err)
	}
	entries := make(map[uint32]maps.Backend, len(s.Backends))
	for _, b := range s.Backends {
		e, err := x.entry(s, b)
		if err != nil {
			return err
		}
		entries[b.ID] = e
	}
	old, existed := x.services[s.ID]
	oldIDs := map[uint32]bool{}
	for _, b := range old.Backends {
		oldIDs[b.ID] = true
	}
	m := x.objs.Maps
	for _, b := range s.Backends {
		if !oldIDs[b.ID] {
			if err := m.ResetBackendCounters(b.ID); err != nil {
				return err
			}
		}
		if b.State == datapath.Active {
			if err := m.PutBackend(b.ID, entries[b.ID]); err != nil {
				return err
			}
		}
	}
	switch {
	case !s.KeepRing:
		if existed && old.RingSignature != 0 {
			// Until the service entry has the new ring's signature, it
			// must not claim the old one's: a daemon stopped in between
			// would keep the new ring as the old.
			unsigned := old
			unsigned.RingSignature = 0
			if err := m.PutService(old.VIP, old.Port, old.Proto, serviceEntry(unsigned)); err != nil {
				return err
			}
		}
		if err := m.PublishRing(s.ID, s.Ring); err != nil {
			return err
		}
	case !existed:
		return fmt.Errorf("service %s: no ring to keep: the datapath does not serve it", s.Name)
	}
	for _, b := range s.Backends {
		if b.State != datapath.Active {
			if err := m.PutBackend(b.ID, entries[b.ID]); err != nil {
				return err
			}
		}
		delete(oldIDs, b.ID)
	}
	if err := m.PutService(s.VIP, s.Port, s.Proto, serviceEntry(s)); err != nil {
		return err
	}
	if existed && (old.VIP != s.VIP || old.Port != s.Port || old.Proto != s.Proto) {
		if err := m.MoveService(old.VIP, old.Port, old.Proto); err != nil {
			return err
		}
	}
	for id := range oldIDs {
		if err := m.ClearBackend(id); err != nil {
			return err
		}
	}
	s.Ring, s.KeepRing = nil, false // the ring lives in the maps
	x.services[s.ID] = s
	if existed && old.EchoReply {
		x.echoing[old.VIP]--
	}
	if s.EchoReply {
		x.echoing[s.VIP]++
	}
	if existed && old.VIP != s.VIP {
		if err := x.syncVIP(old.VIP); err != nil {
			return err
		}
	}
	return x.syncVIP(s.VIP)
}

// syncVIP writes or removes VIP a's entry as its services say: it answers
// echo requests if any of them does. x.mu must be held.
func (x *XDP) syncVIP(a netip.Addr) error {
	want := x.echoing[a] > 0
	if x.echoing[a] <= 0 {
		delete(x.echoing, a)
	}
	if want == x.echo[a] {
		return nil
	}
	m := x.objs.Maps
	if want {
		if err := m.PutVIP(a, maps.VIPEchoReply); err != nil {
			return err
		}
		x.echo[a] = true
		return nil
	}
	if err := m.DeleteVIP(a); err != nil {
		return err
	}
	delete(x.echo, a)
	return nil
}

// mapState is the program's state of a backend in state st, of a service
// that resets the connections of down backends or not.
func mapState(st datapath.State, onDownReset bool) (uint8, error) {
	switch st {
	case datapath.Active:
		return maps.StateActive, nil
	case datapath.Draining:
		return maps.StateDraining, nil
	case datapath.Down:
		if onDownReset {
			return maps.StateDownReset, nil
		}
		return maps.StateDown, nil
	}
	return 0, fmt.Errorf("backend state %d has no state in the XDP program", st)
}

// entry is the map entry of backend b of service s.
func (x *XDP) entry(s datapath.Service, b datapath.Backend) (maps.Backend, error) {
	st, err := mapState(b.State, s.OnDownReset)
	if err != nil {
		return maps.Backend{}, fmt.Errorf("service %s, backend %s: %w", s.Name, b.Addr, err)
	}
	e := maps.Backend{Service: s.ID, Addr: b.Addr, Port: b.Port, State: st}
	h, ok := x.hops[b.Addr]
	if ok {
		e.MAC, e.SrcMAC, e.Ifindex = h.DstMAC, h.SrcMAC, uint32(h.Ifindex)
	}
	if h.Via.IsValid() && (s.Forwarding == "" || s.Forwarding == datapath.DSR) {
		return maps.Backend{}, datapath.Refuse(fmt.Errorf("service %s: backend %s is reached through gateway %s: dsr forwarding needs backends on a directly connected network (forwarding ipip, gue, nat and fullnat route to them)", s.Name, b.Addr, h.Via))
	}
	// Likewise every backend has a tunnel: its own address towards it
	// unless the service says another.
	if h.Src.IsValid() {
		e.Tunnel.Source = netip.PrefixFrom(h.Src, h.Src.BitLen())
	}
	if s.Forwarding.Encapsulates() {
		if p := s.TunnelSource; p.IsValid() && p.Addr().Is4() == b.Addr.Unmap().Is4() {
			e.Tunnel.Source = p
		}
		if s.Forwarding == datapath.GUE {
			e.Tunnel.GUEPort = cmp.Or(s.GUEPort, datapath.DefaultGUEPort)
		}
		if !e.Tunnel.Source.IsValid() && b.State != datapath.Down {
			return maps.Backend{}, datapath.Refuse(fmt.Errorf("service %s, backend %s: no source address reaches it for %s: give the interface towards it an address, or set tunnel_source", s.Name, b.Addr, s.Forwarding))
		}
	}
	// Every backend has a fullnat source address, whatever its service's
	// mode: the fullnat connections it still has when its service changes
	// mode keep theirs.
	e.SNAT = h.Src
	if s.Forwarding == datapath.FullNAT {
		if s.SNATAddress.IsValid() {
			e.SNAT = s.SNATAddress
		}
		if !e.SNAT.IsValid() && b.State != datapath.Down {
			return maps.Backend{}, datapath.Refuse(fmt.Errorf("service %s, backend %s: no source address reaches it for fullnat: give the interface towards it an address, or set snat_address", s.Name, b.Addr))
		}
	}
	return e, nil
}

// vet refuses a backend that this host cannot send to as one host: an
// address of its own, or the network or broadcast address of a connected
// subnet (whatever its state: a down backend may come up). The
// configuration refuses what it can tell without the host.
func (x *XDP) vet(backends []datapath.Backend) error {
	addrs := make([]netip.Addr, len(backends))
	for i, b := range backends {
		addrs[i] = b.Addr
	}
	return datapath.Refuse(x.vetter.Vet(addrs))
}

// resolve finds the L2 hop of every backend that may take traffic (see
// resolveAddrs); a backend it cannot reach fails the update.
func (x *XDP) resolve(backends []datapath.Backend) error {
	var addrs []netip.Addr
	for _, b := range backends {
		if b.State != datapath.Down {
			addrs = append(addrs, b.Addr)
		}
	}
	var errs []error
	for _, err := range x.resolveAddrs(addrs) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Resolve implements datapath.Resolver.
func (x *XDP) Resolve(addrs []netip.Addr) map[netip.Addr]error {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.resolveAddrs(addrs)
}

// OnResolved implements datapath.Resolver.
func (x *XDP) OnResolved(fn func(netip.Addr)) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.onResolved = fn
}

// resolveAddrs finds the hop of every address of addrs that has none yet,
// waiting for the kernel's neighbour resolution up to ResolveTimeout (for
// all at once), and returns those it cannot reach with why. An address
// that did not answer before fails at once: the neighbour follower probes
// it again, and it has a hop once it answers. x.mu must be held.
func (x *XDP) resolveAddrs(addrs []netip.Addr) map[netip.Addr]error {
	failed := make(map[netip.Addr]error)
	todo := make(map[netip.Addr]hop)
	now := time.Now()
	for _, a := range addrs {
		if _, ok := x.hops[a]; ok {
			x.asked[a] = now
			continue
		}
		if _, ok := todo[a]; ok {
			continue
		}
		if _, ok := failed[a]; ok {
			continue
		}
		if u, ok := x.unresolved[a]; ok {
			failed[a] = u.err
			u.asked = now
			x.unresolved[a] = u
			continue
		}
		if err := x.vetter.Vet([]netip.Addr{a}); err != nil {
			failed[a] = datapath.Refuse(err)
			continue
		}
		h, err := routeHop(a)
		if err != nil {
			failed[a] = err
			continue
		}
		todo[a] = h
	}
	left := awaitNeighbours(todo, now.Add(ResolveTimeout),
		func(a netip.Addr, h hop) {
			x.hops[a], x.asked[a] = h, now
			x.routed = x.routed || h.Via.IsValid()
			x.log.Debug("resolved backend", "backend", a, "mac", h.DstMAC.String(), "ifindex", h.Ifindex)
		},
		func(a netip.Addr, err error) { failed[a] = err })
	for a, h := range left {
		err := fmt.Errorf("backend %s does not answer ARP/ND on %s: is it up and on that network?", a, h.ifname)
		if h.Via.IsValid() {
			err = fmt.Errorf("gateway %s of backend %s does not answer ARP/ND on %s: is it up?", h.Via, a, h.ifname)
		}
		failed[a] = err
		x.unresolved[a] = unresolved{hop: h, err: err, asked: now}
		x.routed = x.routed || h.Via.IsValid()
		x.log.Warn("backend does not answer ARP/ND; probing it again in the background", "backend", a, "interface", h.ifname)
	}
	return failed
}

// DeleteService implements datapath.Datapath.
func (x *XDP) DeleteService(s datapath.Service) error {
	x.mu.Lock()
	defer x.mu.Unlock()
	m := x.objs.Maps
	if err := m.DeleteService(s.VIP, s.Port, s.Proto); err != nil {
		return err
	}
	if err := m.DeleteRing(s.ID); err != nil {
		return err
	}
	old := x.services[s.ID]
	for _, b := range old.Backends {
		if err := m.ClearBackend(b.ID); err != nil {
			return err
		}
	}
	delete(x.services, s.ID)
	if old.EchoReply {
		x.echoing[old.VIP]--
	}
	return x.syncVIP(s.VIP)
}

// Counters implements datapath.Datapath.
func (x *XDP) Counters() (datapath.Counters, error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	m := x.objs.Maps
	c := datapath.Counters{
		Services: make(map[uint32]datapath.ServiceCounters),
		Backends: make(map[uint32]datapath.BackendCounters),
	}
	for id, s := range x.services {
		sc, err := m.ServiceCounters(id)
		if err != nil {
			return c, err
		}
		c.Services[id] = sc
		for _, b := range s.Backends {
			bc, err := m.BackendCounters(b.ID)
			if err != nil {
				return c, err
			}
			c.Backends[b.ID] = bc
		}
	}
	var err error
	c.Reasons, err = m.Reasons()
	c.Unrecorded = c.Reasons[maps.ReasonUnrecorded]
	delete(c.Reasons, maps.ReasonUnrecorded)
	return c, err
}

// Flows implements datapath.Datapath.
func (x *XDP) Flows() ([]datapath.Flow, error) { return x.objs.Maps.Flows() }

// CloseFlows implements datapath.Closer (see maps.Maps.CloseFlows).
func (x *XDP) CloseFlows(flows []datapath.Flow) ([]datapath.Flow, error) {
	return x.objs.Maps.CloseFlows(flows)
}

// Tables implements datapath.TableReader: the connection tables and the
// affinity table, counted in batches (see maps.Maps.Tables).
func (x *XDP) Tables() ([]datapath.Table, error) { return x.objs.Maps.Tables() }

// Close stops following neighbours and releases the program and maps.
// With a pin directory the program stays attached and forwarding with the
// pinned maps, for the next run to adopt; without one it is detached.
func (x *XDP) Close() error {
	x.cancel()
	x.wg.Wait()
	if err := x.objs.Close(); err != nil {
		return err
	}
	if dir := x.objs.PinDir(); dir != "" {
		x.log.Info("XDP program left attached and forwarding with the pinned state", "pin_dir", dir)
	} else {
		x.log.Info("XDP program detached")
	}
	return nil
}

// Remove stops following neighbours, detaches the program from every
// interface and removes the pinned state: every tracked connection is
// forgotten.
func (x *XDP) Remove() error {
	x.cancel()
	x.wg.Wait()
	if err := errors.Join(x.objs.Remove(), RemoveProbePath()); err != nil {
		return err
	}
	x.log.Info("XDP program detached and pinned state removed")
	return nil
}

// followNeighbours keeps backend MACs in step with the kernel's neighbour
// table: it re-probes backend entries every refreshInterval (the kernel
// never uses them itself, XDP bypasses it) and rewrites the backends of an
// address whose MAC changed. A subscription that fails is made again, and
// the table re-read, so that no change is missed for good.
func (x *XDP) followNeighbours(ctx context.Context) {
	tick := time.NewTicker(refreshInterval)
	defer tick.Stop()
	for ctx.Err() == nil {
		updates := make(chan netlink.NeighUpdate, 256)
		done := make(chan struct{})
		err := netlink.NeighSubscribeWithOptions(updates, done, netlink.NeighSubscribeOptions{
			ErrorCallback: func(err error) {
				if ctx.Err() == nil {
					x.log.Warn("neighbour updates interrupted; subscribing again", "err", err)
				}
			},
		})
		if err != nil {
			x.log.Warn("cannot follow neighbour changes; retrying", "err", err)
			updates = nil
		}
		x.recheckNeighbours()
		x.followUpdates(ctx, updates, tick.C)
		close(done)
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

// followUpdates handles neighbour updates until ctx ends or the
// subscription closes.
func (x *XDP) followUpdates(ctx context.Context, updates <-chan netlink.NeighUpdate, tick <-chan time.Time) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick:
			x.probeHops()
			if updates == nil {
				return // retry the subscription
			}
		case u, ok := <-updates:
			if !ok {
				return
			}
			if u.Type == unix.RTM_NEWNEIGH && usableNeigh(u.Neigh) {
				x.neighbourChanged(u.Neigh)
			}
		}
	}
}

// hopsNow is a copy of the backend addresses' hops, and of the partial
// hops of those that did not answer. It forgets the addresses that no
// service has and nobody asked for lately.
func (x *XDP) hopsNow() (hops, pending map[netip.Addr]hop) {
	x.mu.Lock()
	defer x.mu.Unlock()
	used := make(map[netip.Addr]bool)
	for _, s := range x.services {
		for _, b := range s.Backends {
			used[b.Addr] = true
		}
	}
	for a, u := range x.unresolved {
		if !used[a] && time.Since(u.asked) > forgetUnresolved {
			delete(x.unresolved, a)
		}
	}
	for a := range x.hops {
		if !used[a] && time.Since(x.asked[a]) > forgetUnresolved {
			delete(x.hops, a)
			delete(x.asked, a)
		}
	}
	hops = make(map[netip.Addr]hop, len(x.hops))
	for a, h := range x.hops {
		hops[a] = h
	}
	pending = make(map[netip.Addr]hop, len(x.unresolved))
	for a, u := range x.unresolved {
		pending[a] = u.hop
	}
	return hops, pending
}

// probeHops asks the kernel to confirm the neighbour entry of every
// backend address, except the entries it keeps as they are (permanent,
// or of a device without ARP), which need no confirming, and to resolve
// again the addresses that did not answer, unless it has meanwhile.
func (x *XDP) probeHops() {
	var t neighTables
	hops, pending := x.hopsNow()
	for a, h := range hops {
		if n, ok := t.lookup(h.Ifindex, h.next(a)); ok && staticNeigh(n) {
			continue
		}
		_ = probeNeigh(h.Ifindex, h.next(a))
	}
	for a, h := range pending {
		if now, err := routeHop(a); err == nil && (now.Ifindex != h.Ifindex || now.Via != h.Via) {
			// Its route moved: follow it there.
			x.mu.Lock()
			if u, ok := x.unresolved[a]; ok {
				u.hop = now
				x.unresolved[a] = u
				x.routed = x.routed || now.Via.IsValid()
			}
			x.mu.Unlock()
			h = now
		}
		if n, ok := t.lookup(h.Ifindex, h.next(a)); ok && usableNeigh(n) {
			x.neighbourChanged(n)
			continue
		}
		_ = probeNeigh(h.Ifindex, h.next(a))
	}
}

// recheckNeighbours compares every known backend MAC with the kernel's
// table, and looks for the addresses that did not answer, for changes
// made while no subscription was listening.
func (x *XDP) recheckNeighbours() {
	var t neighTables
	hops, pending := x.hopsNow()
	for _, m := range []map[netip.Addr]hop{hops, pending} {
		for a, h := range m {
			if n, ok := t.lookup(h.Ifindex, h.next(a)); ok && usableNeigh(n) {
				x.neighbourChanged(n)
			}
		}
	}
}

// neighbourChanged takes a usable neighbour entry: the first MAC of a
// backend (or of the gateway of backends) that did not answer before, or
// a new MAC of one's. A backend on a directly connected network is its own
// neighbour, found at once; the backends behind a gateway are looked for
// only once some was seen.
func (x *XDP) neighbourChanged(n netlink.Neigh) {
	nb, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return
	}
	nb = nb.Unmap()
	x.mu.Lock()
	var backends []netip.Addr // the backend addresses whose next hop nb is
	if _, ok := x.unresolved[nb]; ok {
		backends = append(backends, nb)
	} else if _, ok := x.hops[nb]; ok {
		backends = append(backends, nb)
	}
	if x.routed {
		for a, u := range x.unresolved {
			if u.hop.Via == nb && a != nb {
				backends = append(backends, a)
			}
		}
		for a, h := range x.hops {
			if h.Via == nb && a != nb {
				backends = append(backends, a)
			}
		}
	}
	var tell []netip.Addr
	var fn func(netip.Addr)
	for _, a := range backends {
		if u, ok := x.unresolved[a]; ok {
			if u.hop.Ifindex == n.LinkIndex && u.hop.next(a) == nb {
				if f := x.resolved(a, u.hop, n.HardwareAddr); f != nil {
					fn, tell = f, append(tell, a)
				}
			}
			continue
		}
		x.macChanged(a, n)
	}
	x.mu.Unlock()
	for _, a := range tell {
		fn(a)
	}
}

// macChanged takes the neighbour entry n of backend addr's next hop, and
// rewrites the backend's entries if its MAC changed. x.mu must be held.
func (x *XDP) macChanged(addr netip.Addr, n netlink.Neigh) {
	h, ok := x.hops[addr]
	if !ok || h.Ifindex != n.LinkIndex || slices.Equal(h.DstMAC, n.HardwareAddr) {
		return
	}
	if err := unicastMAC(addr, n.HardwareAddr); err != nil {
		x.log.Error("backend MAC changed to one tether refuses; its packets keep the old one", "backend", addr, "err", err)
		return
	}
	h.DstMAC = net.HardwareAddr(slices.Clone(n.HardwareAddr))
	x.hops[addr] = h
	args := []any{"backend", addr, "mac", h.DstMAC.String()}
	if h.Via.IsValid() {
		args = append(args, "via", h.Via)
	}
	x.log.Info("backend MAC changed", args...)
	x.rewriteHop(addr)
}

// rewriteHop writes the hop of addr into the entries of every backend at
// that address, whatever their state. x.mu must be held.
func (x *XDP) rewriteHop(addr netip.Addr) {
	for _, s := range x.services {
		for _, b := range s.Backends {
			if b.Addr != addr {
				continue
			}
			e, err := x.entry(s, b)
			if err == nil {
				err = x.objs.Maps.PutBackend(b.ID, e)
			}
			if err != nil {
				x.log.Error("update backend's next hop", "backend", addr, "err", err)
			}
		}
	}
}

// resolved records the MAC of an address that had not answered, and
// returns the function to tell (nil when there is none to call, or the MAC
// is refused). x.mu must be held.
func (x *XDP) resolved(addr netip.Addr, h hop, mac net.HardwareAddr) func(netip.Addr) {
	if err := unicastMAC(addr, mac); err != nil {
		// Not a refusal now: the configuration that has it was accepted.
		// It stays down (unreachable) until it answers with its own MAC.
		u := x.unresolved[addr]
		err = fmt.Errorf("%w; down until it answers with its own", errors.Unwrap(err))
		if u.err == nil || u.err.Error() != err.Error() {
			x.log.Error("backend answers with a MAC address tether refuses", "backend", addr, "err", err)
		}
		u.hop, u.err = h, err
		x.unresolved[addr] = u
		return nil
	}
	delete(x.unresolved, addr)
	h.DstMAC = net.HardwareAddr(slices.Clone(mac))
	x.hops[addr], x.asked[addr] = h, time.Now()
	x.log.Info("backend answers ARP/ND now", "backend", addr, "mac", h.DstMAC.String())
	// Its entries have the hop now, whatever the control plane plans: a
	// backend down by its health check is probed through them (probe.go).
	x.rewriteHop(addr)
	return x.onResolved
}
