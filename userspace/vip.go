package userspace

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/datapath"
)

// vipRoute is the local route that makes a VIP deliverable to the proxy's
// listeners, and the number of services that use the VIP.
type vipRoute struct {
	users int
	route *netlink.Route // nil: the VIP was local already, or the operator routes it
	// inherited: the route came with a predecessor's state (Options.Inherit),
	// which serves with it until Resume: not the proxy's to remove before.
	inherited bool
}

// acquireVIP takes a reference on vip for a service. A VIP that the kernel
// does not deliver to this host yet (no address, no local route) gets a
// local route (`ip route add local VIP dev lo`), added in the proxy's
// network namespace and removed with the last reference; a VIP the host
// delivers already is left as it is. p.mu is held.
func (p *Proxy) acquireVIP(vip netip.Addr) error {
	if r, ok := p.vips[vip]; ok {
		r.users++
		return nil
	}
	r := &vipRoute{users: 1}
	if p.inherit != nil && p.inherit.routes[vip] {
		// The predecessor added it and handed it over with its VIP.
		delete(p.inherit.routes, vip)
		if route, err := p.localRoute(vip); err == nil {
			r.route, r.inherited = route, true
			p.vips[vip] = r
			return nil
		}
	}
	err := p.opts.Netns(func() error {
		if isLocal(vip) {
			return nil
		}
		route, err := localRouteHere(vip)
		if err != nil {
			return fmt.Errorf("make the VIP %s local: %w", vip, err)
		}
		switch err := netlink.RouteAdd(route); {
		case err == nil:
			r.route = route
			p.log.Info("made the VIP local for the splice proxy", "vip", vip, "route", "local "+vip.String()+" dev lo table local")
		case errors.Is(err, unix.EEXIST):
		default:
			return fmt.Errorf("make the VIP %s local (ip route add local %s dev lo): %w", vip, vip, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	p.vips[vip] = r
	return nil
}

// localRoute is the local route of vip that acquireVIP adds, in the
// proxy's namespace.
func (p *Proxy) localRoute(vip netip.Addr) (r *netlink.Route, err error) {
	err = p.opts.Netns(func() error {
		r, err = localRouteHere(vip)
		return err
	})
	return r, err
}

// localRouteHere is the local route of vip in the calling thread's
// namespace: `local VIP dev lo table local`.
func localRouteHere(vip netip.Addr) (*netlink.Route, error) {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return nil, err
	}
	return &netlink.Route{
		LinkIndex: lo.Attrs().Index,
		Dst:       &net.IPNet{IP: vip.AsSlice(), Mask: net.CIDRMask(vip.BitLen(), vip.BitLen())},
		Type:      unix.RTN_LOCAL,
		Table:     unix.RT_TABLE_LOCAL,
		Scope:     netlink.SCOPE_HOST,
		Protocol:  unix.RTPROT_STATIC,
	}, nil
}

// releaseVIP drops a reference on vip, removing its local route with the
// last one. p.mu is held.
func (p *Proxy) releaseVIP(vip netip.Addr) {
	r, ok := p.vips[vip]
	if !ok {
		return
	}
	if r.users--; r.users > 0 {
		return
	}
	delete(p.vips, vip)
	if r.route == nil || !p.mayRemove(r) {
		return
	}
	if err := p.delRoute(r.route); err != nil {
		p.log.Error("remove the local route of a VIP", "vip", vip, "err", err)
		return
	}
	p.log.Info("removed the local route of a VIP no service uses", "vip", vip)
}

// releaseVIPs removes every local route the proxy added. p.mu is held.
func (p *Proxy) releaseVIPs() error {
	var errs []error
	for vip, r := range p.vips {
		if r.route != nil && p.mayRemove(r) {
			if err := p.delRoute(r.route); err != nil {
				errs = append(errs, fmt.Errorf("remove the local route of %s: %w", vip, err))
			}
		}
		delete(p.vips, vip)
	}
	clear(p.svcVIP)
	return errors.Join(errs...)
}

// mayRemove says whether the proxy may remove r's route: not an inherited
// one before Resume, while the predecessor may still serve with it. p.mu
// is held.
func (p *Proxy) mayRemove(r *vipRoute) bool {
	return !r.inherited || p.inherit == nil || p.inherit.resumed
}

func (p *Proxy) delRoute(r *netlink.Route) error {
	return p.opts.Netns(func() error {
		if err := netlink.RouteDel(r); err != nil && !errors.Is(err, unix.ESRCH) {
			return err
		}
		return nil
	})
}

// vet refuses a backend the proxy cannot connect to as one host: the
// network or broadcast address of a connected subnet. A backend on this
// host (an address of its own, loopback) is fine for a proxy. p.mu is
// held.
func (p *Proxy) vet(backends []datapath.Backend) error {
	addrs := make([]netip.Addr, len(backends))
	for i, b := range backends {
		addrs[i] = b.Addr
	}
	return datapath.Refuse(p.vetter.Vet(addrs))
}

// isLocal reports whether the kernel of the calling thread's network
// namespace delivers packets for vip to this host already (an address of
// the host, or a local route covering it).
func isLocal(vip netip.Addr) bool {
	routes, err := netlink.RouteGet(vip.AsSlice())
	return err == nil && len(routes) > 0 && routes[0].Type == unix.RTN_LOCAL
}
