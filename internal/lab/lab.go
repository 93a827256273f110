// Package lab builds throwaway networks of Linux network namespaces for
// tests and for `tether lab`: a client, a balancer and backends joined by a
// bridge, using documentation addresses only and never touching the
// machine's own interfaces or root-namespace networking.
//
// Topology of a lab with id <id> (namespaces "tether-<id>-<role>"):
//
//	wire     bridge br0 (STP off, forward delay 0, no multicast snooping)
//	         with one veth port per host, named after the host's role
//	client   eth0 198.51.100.1/24 2001:db8:100::1/64, plus the client source
//	         addresses 192.0.2.10.. (/32) and 2001:db8:c::a.. (/128);
//	         routes 203.0.113.0/24 via 198.51.100.2, 2001:db8:f::/64 via
//	         2001:db8:100::2
//	lb       eth0 198.51.100.2/24 2001:db8:100::2/64, routes 192.0.2.0/24
//	         via 198.51.100.1 and 2001:db8:c::/64 via 2001:db8:100::1 (for
//	         balancers that answer clients themselves, proxies and NAT), no
//	         VIP, no forwarding
//	be<i>    eth0 198.51.100.(10+i)/24 2001:db8:100::(10+i)/64, VIPs
//	         203.0.113.10/32 and 2001:db8:f::10/128 on lo, on-link routes to
//	         192.0.2.0/24 and 2001:db8:c::/64, arp_ignore=1, arp_announce=2;
//	         with Options.Plain only eth0 and its addresses
//
// There are no default routes. DAD is off, and the client and backends have
// static neighbour entries for each other (the client also for the
// balancer), so nothing waits on ARP or ND; the balancer resolves backends
// itself. The wire's "lb" port carries an XDP_PASS program, without which
// frames the balancer sends with XDP_TX never reach the bridge (a veth
// quirk, see DESIGN.md "Test hosts"). The lab mounts a bpffs of its own
// (Lab.BPFFS) for the state tether pins.
package lab

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Limits and defaults of Options.
const (
	DefaultBackends = 3
	DefaultClients  = 150
	MaxBackends     = 200
	MaxClients      = 240
)

// readyTimeout bounds the wait for links to come up after configuration.
const readyTimeout = 10 * time.Second

var (
	vip4       = netip.MustParseAddr("203.0.113.10")
	vip6       = netip.MustParseAddr("2001:db8:f::10")
	vipNet4    = netip.MustParsePrefix("203.0.113.0/24")
	vipNet6    = netip.MustParsePrefix("2001:db8:f::/64")
	clientNet4 = netip.MustParsePrefix("192.0.2.0/24")
	clientNet6 = netip.MustParsePrefix("2001:db8:c::/64")
	bridgeMAC  = net.HardwareAddr{0x02, 0x74, 0x68, 0x72, 0x00, 0x00}
)

// Options sizes a lab. Zero values take the defaults.
type Options struct {
	// Backends is the number of backend hosts, 1 to MaxBackends
	// (default DefaultBackends).
	Backends int
	// Clients is the number of client source addresses of each family,
	// 1 to MaxClients (default DefaultClients).
	Clients int
	// Plain leaves the backends as a balancer that translates addresses
	// finds them: no VIP, no ARP settings, no route to the clients (add
	// one through the balancer with RouteClientsVia for nat).
	Plain bool
}

// Lab is a running lab. Its fields are read-only; Backends grows with
// AddBackend, which must not run concurrently with readers of Backends.
type Lab struct {
	// ID is the lab's short unique id ("t" and 5 hex digits).
	ID string
	// Wire holds the bridge; Client, Balancer and Backends are the hosts.
	Wire, Client, Balancer *Host
	Backends               []*Host
	// ClientAddrs4 and ClientAddrs6 are the client's source addresses
	// (192.0.2.10+k and 2001:db8:c::(10+k) for k < Options.Clients).
	ClientAddrs4, ClientAddrs6 []netip.Addr
	// VIP4 and VIP6 are the virtual addresses the backends hold on lo and
	// the client routes to the balancer.
	VIP4, VIP6 netip.Addr
	// Plain is Options.Plain: the backends, AddBackend's too, hold no VIP
	// and have no route to the clients.
	Plain bool
	// BPFFS is a bpffs mounted for this lab alone (at
	// <tmp>/tether-<id>-bpffs-*/fs), for `tether run --pin-dir
	// BPFFS/tether`: the processes started in the hosts see it, whereas `ip
	// netns exec` hides /sys/fs/bpf behind a /sys of the namespace's own.
	// Close unmounts it, which releases whatever is pinned there.
	BPFFS string

	bpffsDir string // the shared mount that holds BPFFS

	mu      sync.Mutex
	closed  bool
	hosts   []*Host // every namespace created, in creation order
	procs   map[*Proc]struct{}
	xdpProg *ebpf.Program
	// portXDP holds the XDP_PASS attachments of wire ports, by host.
	portXDP map[*Host]link.Link
	// balancers counts the balancers AddBalancer added.
	balancers int
}

// New builds a lab. It needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN and
// CAP_BPF). On error everything created so far is removed.
func New(opts Options) (l *Lab, err error) {
	switch {
	case opts.Backends == 0:
		opts.Backends = DefaultBackends
	case opts.Backends < 0 || opts.Backends > MaxBackends:
		return nil, fmt.Errorf("lab: Backends %d out of range 1..%d", opts.Backends, MaxBackends)
	}
	switch {
	case opts.Clients == 0:
		opts.Clients = DefaultClients
	case opts.Clients < 0 || opts.Clients > MaxClients:
		return nil, fmt.Errorf("lab: Clients %d out of range 1..%d", opts.Clients, MaxClients)
	}
	if err := sweepStale(); err != nil {
		return nil, fmt.Errorf("lab: remove labs left by dead processes: %w", err)
	}
	id, err := newID()
	if err != nil {
		return nil, err
	}
	l = &Lab{ID: id, VIP4: vip4, VIP6: vip6, Plain: opts.Plain, procs: map[*Proc]struct{}{}, portXDP: map[*Host]link.Link{}}
	defer func() {
		if err != nil {
			err = errors.Join(fmt.Errorf("lab %s: %w", id, err), l.Close())
			l = nil
		}
	}()
	for k := range opts.Clients {
		l.ClientAddrs4 = append(l.ClientAddrs4, netip.AddrFrom4([4]byte{192, 0, 2, byte(10 + k)}))
		l.ClientAddrs6 = append(l.ClientAddrs6, hostAddr6(clientNet6, 10+k))
	}

	if err := l.mountBPFFS(); err != nil {
		return l, err
	}
	if err := l.recordOwner(); err != nil {
		return l, err
	}
	if err := l.setupWire(); err != nil {
		return l, err
	}
	if l.Client, err = l.addHost("client", 1, false); err != nil {
		return l, err
	}
	if l.Balancer, err = l.addHost("lb", 2, false); err != nil {
		return l, err
	}
	if err := l.SetPortXDP(l.Balancer, true); err != nil {
		return l, err
	}
	if err := l.setupClient(); err != nil {
		return l, err
	}
	for i := 1; i <= opts.Backends; i++ {
		be, err := l.addBackend(i)
		if err != nil {
			return l, err
		}
		l.Backends = append(l.Backends, be)
	}
	if err := l.waitReady(l.Hosts()...); err != nil {
		return l, err
	}
	return l, nil
}

// Hosts returns the client, the balancer and the backends, in that order.
func (l *Lab) Hosts() []*Host {
	return append([]*Host{l.Client, l.Balancer}, l.Backends...)
}

// AddBackend adds backend be<len(Backends)+1>, configured like the others
// (including the static neighbour entries on it and on the client), waits
// until its link is up and appends it to Backends.
func (l *Lab) AddBackend() (*Host, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, errClosed
	}
	i := len(l.Backends) + 1
	if i > MaxBackends {
		return nil, fmt.Errorf("lab: at most %d backends", MaxBackends)
	}
	be, err := l.addBackend(i)
	if err != nil {
		return nil, err
	}
	if err := l.waitReady(be); err != nil {
		return nil, errors.Join(err, l.removeHost(be))
	}
	l.Backends = append(l.Backends, be)
	return be, nil
}

// Close stops the processes started in the lab, unmounts its bpffs,
// detaches the XDP program and removes every namespace (which removes
// their interfaces). It is idempotent; calls after the first return nil.
// Sockets still open in a namespace keep it alive, unnamed, until they are
// closed.
func (l *Lab) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	procs := make([]*Proc, 0, len(l.procs))
	for p := range l.procs {
		procs = append(procs, p)
	}
	l.mu.Unlock()

	var (
		errsMu sync.Mutex
		errs   []error
		wg     sync.WaitGroup
	)
	for _, p := range procs {
		wg.Go(func() {
			if err := p.Stop(); err != nil {
				errsMu.Lock()
				errs = append(errs, err)
				errsMu.Unlock()
			}
		})
	}
	wg.Wait()
	if err := l.unmountBPFFS(); err != nil {
		errs = append(errs, err)
	}
	for h, lk := range l.portXDP {
		if err := lk.Close(); err != nil {
			errs = append(errs, fmt.Errorf("detach xdp from wire port %s: %w", h.Name, err))
		}
	}
	if l.xdpProg != nil {
		if err := l.xdpProg.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close xdp program: %w", err))
		}
	}
	for i := len(l.hosts) - 1; i >= 0; i-- {
		h := l.hosts[i]
		if err := h.close(); err != nil {
			errs = append(errs, err)
		}
		if err := deleteNetns(h.NS); err != nil {
			errs = append(errs, err)
		}
	}
	l.hosts = nil
	if len(errs) == 0 {
		l.forgetOwner()
	}
	return errors.Join(errs...)
}

func newID() (string, error) {
	for range 16 {
		var b [3]byte
		if _, err := rand.Read(b[:]); err != nil {
			return "", err
		}
		id := "t" + hex.EncodeToString(b[:])[:5]
		if _, err := os.Stat(filepath.Join(netnsDir, nsName(id, "wire"))); errors.Is(err, os.ErrNotExist) {
			return id, nil
		}
	}
	return "", errors.New("lab: no free lab id")
}

func nsName(id, role string) string { return "tether-" + id + "-" + role }

// hostAddr6 returns the address of prefix p with host part n.
func hostAddr6(p netip.Prefix, n int) netip.Addr {
	b := p.Addr().As16()
	b[14], b[15] = byte(n>>8), byte(n)
	return netip.AddrFrom16(b)
}

// newHost creates the namespace for role and registers it for Close.
func (l *Lab) newHost(role string) (*Host, error) {
	name := nsName(l.ID, role)
	ns, err := createNetns(name)
	if err != nil {
		return nil, err
	}
	h := &Host{Name: role, NS: name, lab: l, ns: ns}
	l.hosts = append(l.hosts, h)
	return h, nil
}

// removeHost deletes a host's bridge port and namespace and forgets it.
// The port is deleted explicitly because namespace teardown is
// asynchronous and the name may be reused at once.
func (l *Lab) removeHost(h *Host) error {
	for i, x := range l.hosts {
		if x == h {
			l.hosts = append(l.hosts[:i], l.hosts[i+1:]...)
			break
		}
	}
	var errs []error
	if h.PortIfindex != 0 {
		errs = append(errs, l.Wire.withNetlink(func(nh *netlink.Handle) error {
			port, err := nh.LinkByIndex(h.PortIfindex)
			if err != nil {
				return err
			}
			return nh.LinkDel(port)
		}))
	}
	errs = append(errs, h.close(), deleteNetns(h.NS))
	return errors.Join(errs...)
}

func (l *Lab) setupWire() error {
	w, err := l.newHost("wire")
	if err != nil {
		return err
	}
	l.Wire = w
	// The wire only bridges: no IPv6 of its own, so no RS/MLD chatter.
	if err := writeSysctls(w.ns,
		[2]string{"net/ipv6/conf/all/disable_ipv6", "1"},
		[2]string{"net/ipv6/conf/default/disable_ipv6", "1"},
	); err != nil {
		return err
	}
	// netlink.Bridge has no forward delay or STP state, so build the
	// request by hand, on a thread in the wire namespace.
	if err := w.Do(func() error {
		req := nl.NewNetlinkRequest(unix.RTM_NEWLINK, unix.NLM_F_CREATE|unix.NLM_F_EXCL|unix.NLM_F_ACK)
		req.AddData(nl.NewIfInfomsg(unix.AF_UNSPEC))
		req.AddData(nl.NewRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated("br0")))
		req.AddData(nl.NewRtAttr(unix.IFLA_ADDRESS, bridgeMAC))
		info := nl.NewRtAttr(unix.IFLA_LINKINFO, nil)
		info.AddRtAttr(nl.IFLA_INFO_KIND, nl.NonZeroTerminated("bridge"))
		data := info.AddRtAttr(nl.IFLA_INFO_DATA, nil)
		data.AddRtAttr(nl.IFLA_BR_STP_STATE, nl.Uint32Attr(0))
		data.AddRtAttr(nl.IFLA_BR_FORWARD_DELAY, nl.Uint32Attr(0))
		data.AddRtAttr(nl.IFLA_BR_MCAST_SNOOPING, nl.Uint8Attr(0))
		req.AddData(info)
		_, err := req.Execute(unix.NETLINK_ROUTE, 0)
		return err
	}); err != nil {
		return fmt.Errorf("create bridge: %w", err)
	}
	return w.withNetlink(func(nh *netlink.Handle) error {
		br, err := nh.LinkByName("br0")
		if err != nil {
			return err
		}
		if err := nh.LinkSetUp(br); err != nil {
			return fmt.Errorf("bridge up: %w", err)
		}
		w.MAC, w.Ifindex = br.Attrs().HardwareAddr, br.Attrs().Index
		return nil
	})
}

// addHost creates host role with infrastructure host part n: its
// namespace, sysctls, the veth pair to the bridge and eth0's addresses.
// On error the host is removed again.
func (l *Lab) addHost(role string, n int, backend bool) (_ *Host, err error) {
	h, err := l.newHost(role)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, l.removeHost(h))
		}
	}()
	h.Addr4 = netip.AddrFrom4([4]byte{198, 51, 100, byte(n)})
	h.Addr6 = hostAddr6(netip.MustParsePrefix("2001:db8:100::/64"), n)

	arpIgnore, arpAnnounce := "0", "0"
	if backend {
		arpIgnore, arpAnnounce = "1", "2"
	}
	// IPv4 settings of a new namespace are copied from the root one, so
	// set everything that matters rather than trust defaults. "default"
	// is set before eth0 exists so eth0 inherits it.
	conf := func(dev string) [][2]string {
		p := "net/ipv4/conf/" + dev + "/"
		return [][2]string{
			{p + "rp_filter", "0"},
			{p + "arp_ignore", arpIgnore},
			{p + "arp_announce", arpAnnounce},
		}
	}
	sysctls := [][2]string{
		{"net/ipv4/ip_forward", "0"},
		{"net/ipv6/conf/all/forwarding", "0"},
		{"net/ipv6/conf/all/accept_dad", "0"},
		{"net/ipv6/conf/default/accept_dad", "0"},
		{"net/ipv6/conf/all/accept_ra", "0"},
		{"net/ipv6/conf/default/accept_ra", "0"},
	}
	sysctls = append(sysctls, conf("all")...)
	sysctls = append(sysctls, conf("default")...)
	if err := writeSysctls(h.ns, sysctls...); err != nil {
		return nil, fmt.Errorf("%s: %w", role, err)
	}

	// The veth is created by a netlink socket in the wire namespace with
	// its peer placed straight into the host's namespace as eth0, so no
	// end ever exists in the root namespace.
	if err := l.Wire.withNetlink(func(nh *netlink.Handle) error {
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: role, MasterIndex: l.Wire.Ifindex},
			PeerName:      "eth0",
			PeerNamespace: netlink.NsFd(h.ns),
		}
		if err := nh.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth %s: %w", role, err)
		}
		port, err := nh.LinkByName(role)
		if err != nil {
			return err
		}
		h.PortMAC, h.PortIfindex = port.Attrs().HardwareAddr, port.Attrs().Index
		return nh.LinkSetUp(port)
	}); err != nil {
		return nil, err
	}
	if err := writeSysctls(h.ns, conf("eth0")...); err != nil {
		return nil, fmt.Errorf("%s: %w", role, err)
	}
	if err := h.withNetlink(func(nh *netlink.Handle) error {
		lo, err := nh.LinkByName("lo")
		if err != nil {
			return err
		}
		if err := nh.LinkSetUp(lo); err != nil {
			return err
		}
		eth0, err := nh.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := nh.LinkSetUp(eth0); err != nil {
			return err
		}
		h.MAC, h.Ifindex = eth0.Attrs().HardwareAddr, eth0.Attrs().Index
		if err := addAddr(nh, eth0, netip.PrefixFrom(h.Addr4, 24)); err != nil {
			return err
		}
		return addAddr(nh, eth0, netip.PrefixFrom(h.Addr6, 64))
	}); err != nil {
		return nil, fmt.Errorf("%s: %w", role, err)
	}
	if addHostHook != nil {
		if err := addHostHook(role); err != nil {
			return nil, err
		}
	}
	return h, nil
}

// addHostHook, when set by a test, runs at the end of addHost; an error
// fails the host.
var addHostHook func(role string) error

// setupClient adds the client source addresses, the routes to the VIPs via
// the balancer and static neighbour entries for the balancer.
func (l *Lab) setupClient() error {
	c, lb := l.Client, l.Balancer
	err := c.withNetlink(func(nh *netlink.Handle) error {
		eth0, err := nh.LinkByIndex(c.Ifindex)
		if err != nil {
			return err
		}
		for i := range l.ClientAddrs4 {
			if err := addAddr(nh, eth0, netip.PrefixFrom(l.ClientAddrs4[i], 32)); err != nil {
				return err
			}
			if err := addAddr(nh, eth0, netip.PrefixFrom(l.ClientAddrs6[i], 128)); err != nil {
				return err
			}
		}
		if err := addRoute(nh, c.Ifindex, vipNet4, lb.Addr4, c.Addr4); err != nil {
			return err
		}
		if err := addRoute(nh, c.Ifindex, vipNet6, lb.Addr6, c.Addr6); err != nil {
			return err
		}
		if err := addNeigh(nh, c.Ifindex, lb.Addr4, lb.MAC); err != nil {
			return err
		}
		return addNeigh(nh, c.Ifindex, lb.Addr6, lb.MAC)
	})
	if err != nil {
		return err
	}
	// The balancer's way back to the client addresses.
	return lb.withNetlink(func(nh *netlink.Handle) error {
		if err := addRoute(nh, lb.Ifindex, clientNet4, c.Addr4, netip.Addr{}); err != nil {
			return err
		}
		return addRoute(nh, lb.Ifindex, clientNet6, c.Addr6, netip.Addr{})
	})
}

// addBackend creates and configures be<i>. On error its namespace and the
// client's neighbour entries for it are removed again.
func (l *Lab) addBackend(i int) (be *Host, err error) {
	role := fmt.Sprintf("be%d", i)
	be, err = l.addHost(role, 10+i, !l.Plain)
	if err != nil {
		return nil, err
	}
	if l.Plain {
		return be, nil
	}
	c := l.Client
	defer func() {
		if err != nil {
			_ = c.withNetlink(func(nh *netlink.Handle) error {
				for _, a := range []netip.Addr{be.Addr4, be.Addr6} {
					_ = nh.NeighDel(&netlink.Neigh{LinkIndex: c.Ifindex, Family: family(a), IP: a.AsSlice()})
				}
				return nil
			})
			err = errors.Join(fmt.Errorf("%s: %w", role, err), l.removeHost(be))
			be = nil
		}
	}()
	if err := be.withNetlink(func(nh *netlink.Handle) error {
		lo, err := nh.LinkByName("lo")
		if err != nil {
			return err
		}
		if err := addAddr(nh, lo, netip.PrefixFrom(l.VIP4, 32)); err != nil {
			return err
		}
		if err := addAddr(nh, lo, netip.PrefixFrom(l.VIP6, 128)); err != nil {
			return err
		}
		if err := addRoute(nh, be.Ifindex, clientNet4, netip.Addr{}, netip.Addr{}); err != nil {
			return err
		}
		if err := addRoute(nh, be.Ifindex, clientNet6, netip.Addr{}, netip.Addr{}); err != nil {
			return err
		}
		for _, a := range append([]netip.Addr{c.Addr4, c.Addr6}, append(l.ClientAddrs4, l.ClientAddrs6...)...) {
			if err := addNeigh(nh, be.Ifindex, a, c.MAC); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return be, err
	}
	return be, c.withNetlink(func(nh *netlink.Handle) error {
		if err := addNeigh(nh, c.Ifindex, be.Addr4, be.MAC); err != nil {
			return err
		}
		return addNeigh(nh, c.Ifindex, be.Addr6, be.MAC)
	})
}

// RouteClientsVia routes the client networks (192.0.2.0/24,
// 2001:db8:c::/64) of host h through gw's addresses: a nat balancer's
// backends send their replies that way.
func (l *Lab) RouteClientsVia(h, gw *Host) error {
	return h.withNetlink(func(nh *netlink.Handle) error {
		if err := addRoute(nh, h.Ifindex, clientNet4, gw.Addr4, netip.Addr{}); err != nil {
			return err
		}
		return addRoute(nh, h.Ifindex, clientNet6, gw.Addr6, netip.Addr{})
	})
}

// Sysctl writes /proc/sys/<key> in h's namespace ("net/ipv4/ip_forward").
func (h *Host) Sysctl(key, value string) error {
	return writeSysctls(h.ns, [2]string{key, value})
}

// loadXDPPass loads a program that passes every frame.
func loadXDPPass() (*ebpf.Program, error) {
	return ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "tether_lab_pass",
		Type: ebpf.XDP,
		Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R0, 2), // XDP_PASS
			asm.Return(),
		},
		License: "GPL",
	})
}

// SetPortXDP prepares h's bridge port for a host that runs XDP, or undoes
// that. New does it for the balancer.
//
// On, it attaches an XDP_PASS program in driver mode to the port, so that
// frames h sends with XDP_TX (or with BPF_PROG_TEST_RUN live frames) are
// received by the port, and turns off the port's transmit checksum
// offload, so that frames reach h with complete checksums. The price: a
// veth whose peer runs XDP loses its software segmentation offload, so h
// sends TCP in MTU-sized segments, a cost real NICs do not have.
//
// It also pins h's MAC to the port with a static forwarding entry. An XDP
// program on a veth sees every frame the bridge floods to it, whatever its
// destination MAC, where a real NIC drops unicast frames for other
// addresses before any program runs. When a balancer's port goes down the
// bridge forgets what it learned there and floods the frames still sent to
// that balancer's MAC; the other balancers' programs would take them up
// at once, hiding the outage a real network has until the router's
// session times out. With the entry kept, those frames die with the port,
// as they do on real hardware.
//
// Off, it detaches the program and turns the offload back on: the port is
// an ordinary one again, which is right for balancers that do not use XDP.
func (l *Lab) SetPortXDP(h *Host, on bool) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return errClosed
	}
	if _, attached := l.portXDP[h]; attached == on {
		return nil
	}
	if on && l.xdpProg == nil {
		prog, err := loadXDPPass()
		if err != nil {
			return fmt.Errorf("load xdp pass: %w", err)
		}
		l.xdpProg = prog
	}
	// bpf_link_create resolves the ifindex in the caller's namespace.
	return l.Wire.Do(func() error {
		if !on {
			if err := l.portXDP[h].Close(); err != nil {
				return fmt.Errorf("detach xdp from wire port %s: %w", h.Name, err)
			}
			delete(l.portXDP, h)
			if err := netlink.NeighDel(portFDB(h)); err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("remove the forwarding entry of %s: %w", h.Name, err)
			}
			return setTxChecksum(h.Name, true)
		}
		if err := netlink.NeighSet(portFDB(h)); err != nil {
			return fmt.Errorf("pin the MAC of %s to its wire port: %w", h.Name, err)
		}
		// A frame the host sends back with XDP_TX keeps its bytes but
		// loses the skb's "checksum to be filled in" state, so partial
		// checksums from local senders (veth offload) would reach the
		// backend unfinished. Have the port finish them.
		if err := setTxChecksum(h.Name, false); err != nil {
			return err
		}
		lk, err := link.AttachXDP(link.XDPOptions{
			Program:   l.xdpProg,
			Interface: h.PortIfindex,
			Flags:     link.XDPDriverMode,
		})
		if err != nil {
			return fmt.Errorf("attach xdp pass to wire port %s: %w", h.Name, err)
		}
		l.portXDP[h] = lk
		return nil
	})
}

// portFDB is the bridge's static forwarding entry for h's MAC on h's port.
func portFDB(h *Host) *netlink.Neigh {
	return &netlink.Neigh{
		LinkIndex:    h.PortIfindex,
		Family:       unix.AF_BRIDGE,
		State:        netlink.NUD_NOARP,
		Flags:        netlink.NTF_MASTER,
		HardwareAddr: h.MAC,
	}
}

// SetLink takes h's eth0 down, as when a machine dies or its cable is
// pulled (no word to anyone), or up again, and then waits until it is
// ready. h keeps its addresses and routes across: a machine that comes
// back comes back configured.
func (l *Lab) SetLink(h *Host, up bool) error {
	if !up {
		// IPv6 flushes an interface's addresses when it goes down, unless
		// told to keep them.
		if err := h.Sysctl("net/ipv6/conf/eth0/keep_addr_on_down", "1"); err != nil {
			return err
		}
		return h.Run("ip", "link", "set", "dev", "eth0", "down")
	}
	if err := h.Run("ip", "link", "set", "dev", "eth0", "up"); err != nil {
		return err
	}
	return l.waitReady(h)
}

// waitReady waits until each host's eth0 and bridge port are operationally
// up and no IPv6 address is tentative.
func (l *Lab) waitReady(hosts ...*Host) error {
	deadline := time.Now().Add(readyTimeout)
	check := func(h *Host) error {
		if err := l.Wire.withNetlink(func(nh *netlink.Handle) error {
			port, err := nh.LinkByIndex(h.PortIfindex)
			if err != nil {
				return err
			}
			if s := port.Attrs().OperState; s != netlink.OperUp {
				return fmt.Errorf("wire port %s is %s", h.Name, s)
			}
			return nil
		}); err != nil {
			return err
		}
		return h.withNetlink(func(nh *netlink.Handle) error {
			eth0, err := nh.LinkByIndex(h.Ifindex)
			if err != nil {
				return err
			}
			if s := eth0.Attrs().OperState; s != netlink.OperUp {
				return fmt.Errorf("%s eth0 is %s", h.Name, s)
			}
			addrs, err := nh.AddrList(nil, netlink.FAMILY_V6)
			if err != nil {
				return err
			}
			for _, a := range addrs {
				if a.Flags&unix.IFA_F_DADFAILED != 0 {
					return fmt.Errorf("%s: DAD failed for %s", h.Name, a.IP)
				}
				if a.Flags&unix.IFA_F_TENTATIVE != 0 {
					return fmt.Errorf("%s: %s still tentative", h.Name, a.IP)
				}
			}
			return nil
		})
	}
	for _, h := range hosts {
		for {
			err := check(h)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("not ready after %v: %w", readyTimeout, err)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	return nil
}

func family(a netip.Addr) int {
	if a.Is4() {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// addAddr adds p to link; IPv6 addresses skip DAD.
func addAddr(nh *netlink.Handle, lk netlink.Link, p netip.Prefix) error {
	a := &netlink.Addr{IPNet: ipNet(p)}
	if p.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	if err := nh.AddrAdd(lk, a); err != nil {
		return fmt.Errorf("add address %s to %s: %w", p, lk.Attrs().Name, err)
	}
	return nil
}

// addRoute adds a route to dst on link ifindex, via gw if valid (else
// on-link), with preferred source src if valid.
func addRoute(nh *netlink.Handle, ifindex int, dst netip.Prefix, gw, src netip.Addr) error {
	r := &netlink.Route{LinkIndex: ifindex, Dst: ipNet(dst)}
	if gw.IsValid() {
		r.Gw = gw.AsSlice()
	} else if dst.Addr().Is4() {
		r.Scope = netlink.SCOPE_LINK
	}
	if src.IsValid() {
		r.Src = src.AsSlice()
	}
	if err := nh.RouteAdd(r); err != nil {
		return fmt.Errorf("add route %s via %v: %w", dst, gw, err)
	}
	return nil
}

// addNeigh adds a permanent neighbour entry ip → mac on link ifindex.
func addNeigh(nh *netlink.Handle, ifindex int, ip netip.Addr, mac net.HardwareAddr) error {
	err := nh.NeighAdd(&netlink.Neigh{
		LinkIndex:    ifindex,
		Family:       family(ip),
		State:        netlink.NUD_PERMANENT,
		IP:           ip.AsSlice(),
		HardwareAddr: mac,
	})
	if err != nil {
		return fmt.Errorf("add neighbour %s %s: %w", ip, mac, err)
	}
	return nil
}

// FarClientNet is the network of the host AddFarClient adds, which the
// client host routes.
var FarClientNet = netip.MustParsePrefix("203.0.113.64/27")

// AddFarClient adds host "far" (203.0.113.66/27) behind the client host,
// which routes between it and the wire (far0, 203.0.113.65/27) over a link
// of MTU mtu. far's route advertises a full-size MSS (1460) all the same,
// as a host whose own link is wider than the path would: the client host,
// as a router, answers bigger packets to far with ICMP "fragmentation
// needed". The backends route FarClientNet through the client host.
func (l *Lab) AddFarClient(mtu int) (*Host, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, errClosed
	}
	h, err := l.newHost("far")
	if err != nil {
		return nil, err
	}
	h.Addr4 = netip.MustParseAddr("203.0.113.66")
	gw := netip.MustParseAddr("203.0.113.65")
	if err := writeSysctls(h.ns,
		[2]string{"net/ipv4/conf/all/rp_filter", "0"},
		[2]string{"net/ipv4/conf/default/rp_filter", "0"},
		[2]string{"net/ipv6/conf/all/disable_ipv6", "1"},
		[2]string{"net/ipv6/conf/default/disable_ipv6", "1"},
	); err != nil {
		return nil, err
	}
	if err := l.Client.withNetlink(func(nh *netlink.Handle) error {
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: "far0", MTU: mtu},
			PeerName:      "eth0",
			PeerMTU:       uint32(mtu),
			PeerNamespace: netlink.NsFd(h.ns),
		}
		if err := nh.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth far0: %w", err)
		}
		far0, err := nh.LinkByName("far0")
		if err != nil {
			return err
		}
		if err := nh.LinkSetUp(far0); err != nil {
			return err
		}
		return addAddr(nh, far0, netip.PrefixFrom(gw, FarClientNet.Bits()))
	}); err != nil {
		return nil, err
	}
	if err := l.Client.Sysctl("net/ipv4/ip_forward", "1"); err != nil {
		return nil, err
	}
	if err := h.withNetlink(func(nh *netlink.Handle) error {
		for _, name := range []string{"lo", "eth0"} {
			lk, err := nh.LinkByName(name)
			if err != nil {
				return err
			}
			if err := nh.LinkSetUp(lk); err != nil {
				return err
			}
			if name == "eth0" {
				h.MAC, h.Ifindex = lk.Attrs().HardwareAddr, lk.Attrs().Index
				if err := addAddr(nh, lk, netip.PrefixFrom(h.Addr4, FarClientNet.Bits())); err != nil {
					return err
				}
			}
		}
		return nh.RouteAdd(&netlink.Route{Gw: gw.AsSlice(), LinkIndex: h.Ifindex, AdvMSS: 1460})
	}); err != nil {
		return nil, fmt.Errorf("far: %w", err)
	}
	for _, be := range l.Backends {
		if err := be.withNetlink(func(nh *netlink.Handle) error {
			return addRoute(nh, be.Ifindex, FarClientNet, l.Client.Addr4, netip.Addr{})
		}); err != nil {
			return nil, fmt.Errorf("%s: %w", be.Name, err)
		}
	}
	return h, nil
}

// AddBalancer adds another balancer host on the wire, lb<n> for the n-th
// one (198.51.100.<n+1>, 2001:db8:100::<n+1>), prepared for XDP as the
// first one is, with routes back to the client networks: a tether host
// more, for tests of several hosts behind one router. Clients do not
// route to it; route them through a router that learns the VIPs.
func (l *Lab) AddBalancer() (*Host, error) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil, errClosed
	}
	l.balancers++
	n := l.balancers + 1
	h, err := l.addHost(fmt.Sprintf("lb%d", n), n+1, false)
	if err == nil {
		err = h.withNetlink(func(nh *netlink.Handle) error {
			if err := addRoute(nh, h.Ifindex, clientNet4, l.Client.Addr4, netip.Addr{}); err != nil {
				return err
			}
			return addRoute(nh, h.Ifindex, clientNet6, l.Client.Addr6, netip.Addr{})
		})
		if err != nil {
			err = errors.Join(err, l.removeHost(h))
		}
	}
	l.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if err := l.SetPortXDP(h, true); err != nil {
		return nil, err
	}
	if err := l.waitReady(h); err != nil {
		return nil, err
	}
	return h, nil
}

// AddRouter adds host "router" on the wire (198.51.100.250,
// 2001:db8:100::fa), which forwards IPv4 and IPv6: a hop that tests route
// through (add the routes with Host.Run).
func (l *Lab) AddRouter() (*Host, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, errClosed
	}
	r, err := l.addHost("router", 250, false)
	if err != nil {
		return nil, err
	}
	if err := writeSysctls(r.ns,
		[2]string{"net/ipv4/ip_forward", "1"},
		[2]string{"net/ipv6/conf/all/forwarding", "1"},
	); err != nil {
		return nil, errors.Join(err, l.removeHost(r))
	}
	if err := l.waitReady(r); err != nil {
		return nil, errors.Join(err, l.removeHost(r))
	}
	return r, nil
}
