package loader

import (
	"context"
	"fmt"
	"net"
	"net/netip"
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
}

// usableNeigh tells whether a neighbour entry holds a MAC worth using.
func usableNeigh(n netlink.Neigh) bool {
	const ok = netlink.NUD_REACHABLE | netlink.NUD_STALE | netlink.NUD_DELAY | netlink.NUD_PROBE |
		netlink.NUD_PERMANENT | netlink.NUD_NOARP
	return n.State&ok != 0 && len(n.HardwareAddr) == 6
}

// resolveHop finds the interface and MACs that reach addr, asking the
// kernel to resolve the neighbour (ARP/ND) if it does not know it yet, and
// waiting up to the context's deadline. DSR needs the backend on a
// directly connected network: a backend behind a gateway is refused. When
// no host answers, the hop returned has its interface and source MAC
// address, for probing again.
func resolveHop(ctx context.Context, addr netip.Addr) (hop, error) {
	ip := net.IP(addr.AsSlice())
	routes, err := netlink.RouteGet(ip)
	if err != nil || len(routes) == 0 {
		// Refused: dsr needs a directly connected network.
		return hop{}, datapath.Refuse(fmt.Errorf("no route to backend %s: %v", addr, err))
	}
	r := routes[0]
	switch r.Type {
	case unix.RTN_LOCAL:
		return hop{}, datapath.Refuse(fmt.Errorf("backend %s is an address of this host: the XDP datapath sends packets to other hosts", addr))
	case unix.RTN_BROADCAST, unix.RTN_MULTICAST:
		return hop{}, datapath.Refuse(fmt.Errorf("backend %s is a broadcast or multicast address of this host's networks: a backend is one host", addr))
	}
	if r.Gw != nil {
		return hop{}, datapath.Refuse(fmt.Errorf("backend %s is reached through gateway %s: dsr forwarding needs backends on a directly connected network", addr, r.Gw))
	}
	link, err := netlink.LinkByIndex(r.LinkIndex)
	if err != nil {
		return hop{}, fmt.Errorf("interface of backend %s: %w", addr, err)
	}
	if link.Attrs().RawFlags&unix.IFF_NOARP != 0 {
		return hop{}, datapath.Refuse(fmt.Errorf("backend %s is reached through %s, which does no ARP or neighbour discovery: dsr forwarding needs a backend's own MAC address", addr, link.Attrs().Name))
	}
	h := hop{Ifindex: r.LinkIndex, SrcMAC: link.Attrs().HardwareAddr}
	if len(h.SrcMAC) != 6 {
		return hop{}, datapath.Refuse(fmt.Errorf("backend %s is reached through %s, which has no Ethernet address", addr, link.Attrs().Name))
	}
	for i := 0; ; i++ {
		if mac, ok := lookupNeigh(r.LinkIndex, addr); ok {
			if err := unicastMAC(addr, mac); err != nil {
				return hop{}, err
			}
			h.DstMAC = mac
			return h, nil
		}
		if i%25 == 0 { // every half second
			_ = probeNeigh(r.LinkIndex, addr)
		}
		select {
		case <-ctx.Done():
			return h, fmt.Errorf("backend %s does not answer ARP/ND on %s: is it up and on that network?", addr, link.Attrs().Name)
		case <-time.After(20 * time.Millisecond):
		}
	}
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

func lookupNeigh(ifindex int, addr netip.Addr) (net.HardwareAddr, bool) {
	fam := unix.AF_INET
	if addr.Is6() {
		fam = unix.AF_INET6
	}
	neighs, err := netlink.NeighList(ifindex, fam)
	if err != nil {
		return nil, false
	}
	for _, n := range neighs {
		if a, ok := netip.AddrFromSlice(n.IP); ok && a.Unmap() == addr && usableNeigh(n) {
			return n.HardwareAddr, true
		}
	}
	return nil, false
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
