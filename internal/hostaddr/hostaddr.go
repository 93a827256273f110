// Package hostaddr says whether an address can be a backend as this host
// sees it: not an address of the host, nor the network or broadcast
// address of a subnet the host is connected to. The datapaths check their
// backends with it when they apply a service (the configuration's own
// checks cannot know the host). It reads the addresses of the network
// namespace of the calling thread, with netlink.
package hostaddr

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Host is a snapshot of the host's addresses, by interface.
type Host struct {
	addrs []ifaceAddr
}

type ifaceAddr struct {
	prefix netip.Prefix // the address with its subnet's length
	iface  string
}

// Read takes a snapshot of the addresses of every interface.
func Read() (*Host, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	h := &Host{}
	for _, l := range links {
		addrs, err := netlink.AddrList(l, unix.AF_UNSPEC)
		if err != nil {
			return nil, fmt.Errorf("list the addresses of %s: %w", l.Attrs().Name, err)
		}
		for _, a := range addrs {
			ip, ok := netip.AddrFromSlice(a.IP)
			if !ok {
				continue
			}
			ones, _ := a.Mask.Size()
			h.addrs = append(h.addrs, ifaceAddr{netip.PrefixFrom(ip.Unmap(), ones), l.Attrs().Name})
		}
	}
	return h, nil
}

// Problem says why a cannot be a backend on this host, or "" when it can:
// an address of the host itself (unless local is allowed: a proxy may
// connect to a backend on its own host), or the network or broadcast
// address of a connected IPv4 subnet (of /30 or wider, whose first and
// last addresses are not hosts).
func (h *Host) Problem(a netip.Addr, local bool) string {
	for _, x := range h.addrs {
		if x.prefix.Addr() == a && !local {
			return fmt.Sprintf("%s is an address of this host (on %s)", a, x.iface)
		}
		if !a.Is4() || !x.prefix.Addr().Is4() || x.prefix.Bits() > 30 || !x.prefix.Contains(a) {
			continue
		}
		network := x.prefix.Masked()
		if a == network.Addr() {
			return fmt.Sprintf("%s is the network address of %s, the subnet of %s", a, network, x.iface)
		}
		if a == broadcast(network) {
			return fmt.Sprintf("%s is the broadcast address of %s, the subnet of %s", a, network, x.iface)
		}
	}
	return ""
}

// broadcast is the last address of an IPv4 prefix.
func broadcast(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := (uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// Vetter refuses the backend addresses that cannot be backends on this
// host (see Problem), with a snapshot of the host's addresses at most TTL
// old: an interface that gains an address is seen within it, and a
// thousand services applied at once read the host once. A Vetter is not
// safe for concurrent use: its datapath calls it under its own lock.
type Vetter struct {
	// Local allows an address of the host (a proxy may connect to it).
	Local bool
	// TTL is how long a snapshot serves.
	TTL time.Duration
	// Read takes a snapshot (Read, or Read in another network namespace).
	Read func() (*Host, error)

	host *Host
	at   time.Time
}

// Own says whether a is an address of this host, from a snapshot at most
// TTL old.
func (v *Vetter) Own(a netip.Addr) (bool, error) {
	if err := v.refresh(); err != nil {
		return false, err
	}
	for _, x := range v.host.addrs {
		if x.prefix.Addr() == a {
			return true, nil
		}
	}
	return false, nil
}

func (v *Vetter) refresh() error {
	if v.host == nil || time.Since(v.at) > v.TTL {
		h, err := v.Read()
		if err != nil {
			return err
		}
		v.host, v.at = h, time.Now()
	}
	return nil
}

// Vet returns the problem of every address that cannot be a backend,
// joined; nil when all can.
func (v *Vetter) Vet(addrs []netip.Addr) error {
	if err := v.refresh(); err != nil {
		return err
	}
	var errs []error
	for _, a := range addrs {
		if p := v.host.Problem(a, v.Local); p != "" {
			errs = append(errs, fmt.Errorf("backend %s", p))
		}
	}
	return errors.Join(errs...)
}
