package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/userspace"
)

// spliceDatapath is the splice proxy as `tether run` serves it. It hands
// each service's splice-only settings (idle timeout, PROXY protocol) to the
// proxy, and makes every VIP local to the host, so that the kernel delivers
// the VIP's connections to the proxy's listeners: a local route (`ip route
// add local VIP dev lo`) is added for a VIP that is not local yet, and
// removed when its last service goes or the proxy closes. A VIP the host
// already delivers (an address of the host, or a local route of the
// operator's) is left alone.
type spliceDatapath struct {
	*userspace.Proxy
	log    *slog.Logger
	ifaces []string // the interfaces the proxy stands in for (auto), or none

	mu    sync.Mutex
	vips  map[netip.Addr]*vipRoute
	svcIP map[uint32]netip.Addr // service ID → the VIP it holds
}

// vipRoute is the local route of a VIP and the services that use it.
type vipRoute struct {
	users int
	route *netlink.Route // nil: the VIP was local already
}

var _ datapath.Datapath = (*spliceDatapath)(nil)

func newSplice(log *slog.Logger, seed uint32, opts userspace.Options, ifaces []string) *spliceDatapath {
	return &spliceDatapath{
		Proxy:  userspace.New(log, seed, opts),
		log:    log,
		ifaces: ifaces,
		vips:   make(map[netip.Addr]*vipRoute),
		svcIP:  make(map[uint32]netip.Addr),
	}
}

// Modes says "splice" for every interface the proxy stands in for, or
// "*" when it was configured without XDP.
func (s *spliceDatapath) Modes() map[string]string {
	if len(s.ifaces) == 0 {
		return s.Proxy.Modes()
	}
	out := make(map[string]string, len(s.ifaces))
	for _, name := range s.ifaces {
		out[name] = "splice"
	}
	return out
}

// UpsertService sets the service's splice options, makes its VIP local and
// has the proxy serve it.
func (s *spliceDatapath) UpsertService(svc datapath.Service) error {
	if err := s.SetServiceOptions(svc.ID, userspace.ServiceOptions{IdleTimeout: svc.IdleTimeout, ProxyProtocol: svc.ProxyProtocol}); err != nil {
		return fmt.Errorf("service %s: %w", svc.Name, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	old, had := s.svcIP[svc.ID]
	if !had || old != svc.VIP {
		if err := s.acquire(svc.VIP); err != nil {
			return fmt.Errorf("service %s: %w", svc.Name, err)
		}
	}
	if err := s.Proxy.UpsertService(svc); err != nil {
		if !had || old != svc.VIP {
			s.release(svc.VIP)
		}
		return err
	}
	if had && old != svc.VIP {
		s.release(old)
	}
	s.svcIP[svc.ID] = svc.VIP
	return nil
}

// DeleteService stops serving the service and drops its VIP's local route
// if no other service uses it.
func (s *spliceDatapath) DeleteService(svc datapath.Service) error {
	err := s.Proxy.DeleteService(svc)
	s.mu.Lock()
	defer s.mu.Unlock()
	if vip, ok := s.svcIP[svc.ID]; ok {
		delete(s.svcIP, svc.ID)
		s.release(vip)
	}
	return err
}

// Close closes the proxy and removes the local routes it added.
func (s *spliceDatapath) Close() error {
	err := s.Proxy.Close()
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for vip, r := range s.vips {
		if r.route != nil {
			if derr := netlink.RouteDel(r.route); derr != nil && !errors.Is(derr, unix.ESRCH) {
				errs = append(errs, fmt.Errorf("remove the local route of %s: %w", vip, derr))
			}
		}
		delete(s.vips, vip)
	}
	clear(s.svcIP)
	return errors.Join(append([]error{err}, errs...)...)
}

// acquire takes a reference on vip's local route, adding the route if the
// VIP is not local yet. s.mu is held.
func (s *spliceDatapath) acquire(vip netip.Addr) error {
	if r, ok := s.vips[vip]; ok {
		r.users++
		return nil
	}
	r := &vipRoute{users: 1}
	if !isLocal(vip) {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return fmt.Errorf("make the VIP %s local: %w", vip, err)
		}
		route := &netlink.Route{
			LinkIndex: lo.Attrs().Index,
			Dst:       &net.IPNet{IP: vip.AsSlice(), Mask: net.CIDRMask(vip.BitLen(), vip.BitLen())},
			Type:      unix.RTN_LOCAL,
			Table:     unix.RT_TABLE_LOCAL,
			Scope:     netlink.SCOPE_HOST,
			Protocol:  unix.RTPROT_STATIC,
		}
		switch err := netlink.RouteAdd(route); {
		case err == nil:
			r.route = route
			s.log.Info("made the VIP local for the splice proxy", "vip", vip, "route", "local "+vip.String()+" dev lo table local")
		case errors.Is(err, unix.EEXIST):
		default:
			return fmt.Errorf("make the VIP %s local (ip route add local %s dev lo): %w", vip, vip, err)
		}
	}
	s.vips[vip] = r
	return nil
}

// release drops a reference on vip's local route, removing the route with
// the last one. s.mu is held.
func (s *spliceDatapath) release(vip netip.Addr) {
	r, ok := s.vips[vip]
	if !ok {
		return
	}
	if r.users--; r.users > 0 {
		return
	}
	delete(s.vips, vip)
	if r.route == nil {
		return
	}
	if err := netlink.RouteDel(r.route); err != nil && !errors.Is(err, unix.ESRCH) {
		s.log.Error("remove the local route of a VIP", "vip", vip, "err", err)
		return
	}
	s.log.Info("removed the local route of a VIP no service uses", "vip", vip)
}

// isLocal reports whether the kernel delivers packets for vip to this host
// already (an address of the host, or a local route covering it).
func isLocal(vip netip.Addr) bool {
	routes, err := netlink.RouteGet(vip.AsSlice())
	return err == nil && len(routes) > 0 && routes[0].Type == unix.RTN_LOCAL
}
