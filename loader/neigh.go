package loader

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/datapath"
)

// hop is how a backend is reached on L2: out of which interface, from which
// MAC, to which MAC.
type hop struct {
	Ifindex int
	SrcMAC  net.HardwareAddr
	DstMAC  net.HardwareAddr
	Src     netip.Addr // the kernel's preferred source address towards it (fullnat's default)
	// Via is the gateway a route to it names, whose MAC its frames go
	// to; unset for a backend on a directly connected network.
	Via    netip.Addr
	ifname string // for messages
}

// next is the neighbour whose MAC frames to backend addr go to: its
// gateway, or itself.
func (h hop) next(addr netip.Addr) netip.Addr {
	if h.Via.IsValid() {
		return h.Via
	}
	return addr
}

// usableNeigh tells whether a neighbour entry holds a MAC worth using.
func usableNeigh(n netlink.Neigh) bool {
	const ok = netlink.NUD_REACHABLE | netlink.NUD_STALE | netlink.NUD_DELAY | netlink.NUD_PROBE |
		netlink.NUD_PERMANENT | netlink.NUD_NOARP
	return n.State&ok != 0 && len(n.HardwareAddr) == 6
}

// routeHop finds the interface, source MAC and gateway (if a route names
// one) that reach addr, from the kernel's routes, without the neighbour's
// MAC. A backend with no route is refused, as is one of this host's own
// or broadcast addresses and one reached through a device without ARP;
// one behind a gateway is refused by the services that forward with dsr
// (XDP.entry). A failure to ask the kernel is an error, not a refusal.
func routeHop(addr netip.Addr) (hop, error) {
	routes, err := netlink.RouteGet(net.IP(addr.AsSlice()))
	switch {
	case errors.Is(err, unix.ENETUNREACH), errors.Is(err, unix.EHOSTUNREACH), err == nil && len(routes) == 0:
		return hop{}, datapath.Refuse(fmt.Errorf("no route to backend %s", addr))
	case err != nil:
		return hop{}, fmt.Errorf("look up the route to backend %s: %w", addr, err)
	}
	r := routes[0]
	switch r.Type {
	case unix.RTN_LOCAL:
		return hop{}, datapath.Refuse(fmt.Errorf("backend %s is an address of this host: the XDP datapath sends packets to other hosts", addr))
	case unix.RTN_BROADCAST, unix.RTN_MULTICAST:
		return hop{}, datapath.Refuse(fmt.Errorf("backend %s is a broadcast or multicast address of this host's networks: a backend is one host", addr))
	case unix.RTN_UNREACHABLE, unix.RTN_BLACKHOLE, unix.RTN_PROHIBIT:
		return hop{}, datapath.Refuse(fmt.Errorf("no route to backend %s", addr))
	}
	var via netip.Addr
	if r.Gw != nil {
		gw, ok := netip.AddrFromSlice(r.Gw)
		if !ok {
			return hop{}, fmt.Errorf("route to backend %s: gateway %v", addr, r.Gw)
		}
		via = gw.Unmap()
	}
	link, err := netlink.LinkByIndex(r.LinkIndex)
	if err != nil {
		return hop{}, fmt.Errorf("interface of backend %s: %w", addr, err)
	}
	if link.Attrs().RawFlags&unix.IFF_NOARP != 0 {
		return hop{}, datapath.Refuse(fmt.Errorf("backend %s is reached through %s, which does no ARP or neighbour discovery: dsr forwarding needs a backend's own MAC address", addr, link.Attrs().Name))
	}
	h := hop{Ifindex: r.LinkIndex, SrcMAC: link.Attrs().HardwareAddr, Via: via, ifname: link.Attrs().Name}
	if src, ok := netip.AddrFromSlice(r.Src); ok {
		h.Src = src.Unmap()
	}
	if len(h.SrcMAC) != 6 {
		return hop{}, datapath.Refuse(fmt.Errorf("backend %s is reached through %s, which has no Ethernet address", addr, link.Attrs().Name))
	}
	return h, nil
}

// awaitNeighbours asks the kernel to resolve the neighbours of todo (their
// partial hops, from routeHop) and waits for them until the deadline,
// reading each interface's table once a round: resolved gets each hop
// found, refused each MAC that is not one host's. It returns those still
// unresolved.
func awaitNeighbours(todo map[netip.Addr]hop, deadline time.Time, resolved func(netip.Addr, hop), refused func(netip.Addr, error)) map[netip.Addr]hop {
	for round := 0; len(todo) > 0; round++ {
		var t neighTables
		for a, h := range todo {
			n, ok := t.lookup(h.Ifindex, h.next(a))
			switch {
			case ok && usableNeigh(n):
				delete(todo, a)
				if err := unicastMAC(a, n.HardwareAddr); err != nil {
					refused(a, err)
					continue
				}
				h.DstMAC = net.HardwareAddr(slices.Clone(n.HardwareAddr))
				resolved(a, h)
			case round%25 == 0: // every half second
				_ = probeNeigh(h.Ifindex, h.next(a))
			}
		}
		if len(todo) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	return todo
}

// unicastMAC refuses a neighbour entry that would send a backend's packets
// to more than one host: a broadcast or multicast MAC address.
func unicastMAC(addr netip.Addr, mac net.HardwareAddr) error {
	if mac[0]&1 != 0 { // the group bit; the broadcast address has it too
		return datapath.Refuse(fmt.Errorf("backend %s resolves to %s, a broadcast or multicast MAC address: its packets would reach every host of the segment (see ip neigh show %s)", addr, mac, addr))
	}
	return nil
}

// staticNeigh tells whether the kernel keeps an entry as it is, never
// resolving it again: one made permanent (an operator's static entry), or
// one of a device without ARP. Such an entry must not be probed: since
// Linux 5.16 an NTF_USE request clears NUD_PERMANENT, and the kernel then
// resolves the address like any other, which fails for a host that does
// not answer ARP (the reason for a static entry, often).
func staticNeigh(n netlink.Neigh) bool {
	return n.State&(netlink.NUD_PERMANENT|netlink.NUD_NOARP) != 0
}

// neighTables reads the kernel's neighbour table of each interface once,
// when first asked, for one pass over many addresses.
type neighTables map[int]map[netip.Addr]netlink.Neigh

// lookup is the entry of addr on ifindex, if the kernel has one.
func (t *neighTables) lookup(ifindex int, addr netip.Addr) (netlink.Neigh, bool) {
	if *t == nil {
		*t = make(neighTables)
	}
	table, ok := (*t)[ifindex]
	if !ok {
		table = make(map[netip.Addr]netlink.Neigh)
		neighs, _ := netlink.NeighList(ifindex, unix.AF_UNSPEC) // both families
		for _, n := range neighs {
			if a, ok := netip.AddrFromSlice(n.IP); ok {
				table[a.Unmap()] = n
			}
		}
		(*t)[ifindex] = table
	}
	n, ok := table[addr]
	return n, ok
}

// probeNeigh asks the kernel to resolve addr on ifindex, or to confirm an
// entry it already has: NTF_USE acts as if the kernel were about to send
// to it. tether's packets bypass the kernel's neighbour
// code, which therefore never refreshes backend entries by itself.
func probeNeigh(ifindex int, addr netip.Addr) error {
	fam := unix.AF_INET
	if addr.Is6() {
		fam = unix.AF_INET6
	}
	return netlink.NeighSet(&netlink.Neigh{
		LinkIndex: ifindex,
		Family:    fam,
		State:     netlink.NUD_NONE,
		Flags:     netlink.NTF_USE,
		IP:        net.IP(addr.AsSlice()),
	})
}
