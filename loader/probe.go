package loader

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/datapath"
)

// Health probes that follow the client's path (see bpf/probe.h): a probe to
// backend id connects to its service's VIP from a socket marked ProbeMark |
// id. One policy rule per family sends marked packets to ProbeTable, whose
// default route leads to ProbeDevice, an ifb device (no ARP, no peer)
// whose TC egress program sends each packet on to its backend as the XDP
// program sends clients' packets, and the backend answers from the VIP.
const (
	ProbeMark     uint32 = 0x54480000 // bpf/consts.h: PROBE_MARK
	ProbeMarkMask uint32 = 0xffff0000 // bpf/consts.h: PROBE_MARK_MASK
	ProbeDevice          = "tether-probe"
	ProbeTable           = 0x5448 // 21576
	// ProbeRulePriority puts the rule before the main table's (32766) and
	// the usual policy rules, after the local table's (0).
	ProbeRulePriority = 1000
	// probeMTU keeps probes (and the MSS they advertise) small enough for
	// any outer header on a 1500-byte link, and lets the device have IPv6.
	probeMTU = 1280
)

// ProbePath implements datapath.Prober: it sets up the probe device, its
// program and rules the first time, and returns the mark and source
// address of a probe to backend id at addr of the service on vip.
func (x *XDP) ProbePath(id uint32, addr, vip netip.Addr) (datapath.ProbePath, error) {
	h, err := x.probeHop(addr)
	if err != nil {
		return datapath.ProbePath{}, err
	}
	if !h.Src.IsValid() {
		return datapath.ProbePath{}, fmt.Errorf("no address of this host reaches backend %s", addr)
	}
	if id > ^ProbeMarkMask {
		return datapath.ProbePath{}, fmt.Errorf("backend id %d does not fit in a probe mark", id)
	}
	if err := replyFiltered(vip, h.Ifindex); err != nil {
		return datapath.ProbePath{}, err
	}
	return datapath.ProbePath{Mark: ProbeMark | id, Source: h.Src}, nil
}

// replyFiltered says why this host's reverse-path filter would drop the
// replies of a backend, which come from vip by interface ifindex (the
// one that reaches the backend), or nil when it lets them in: rp_filter
// off, or a route to vip (strict mode: by that interface). IPv6 has no
// reverse-path filter.
func replyFiltered(vip netip.Addr, ifindex int) error {
	if !vip.Is4() {
		return nil
	}
	link, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return err
	}
	name := link.Attrs().Name
	mode := 0
	for _, dev := range []string{"all", name} {
		b, err := os.ReadFile("/proc/sys/net/ipv4/conf/" + dev + "/rp_filter")
		if err != nil {
			return nil // cannot tell: let the probe say
		}
		v, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		mode = max(mode, v)
	}
	if mode == 0 {
		return nil
	}
	routes, err := netlink.RouteGet(net.IP(vip.AsSlice()))
	switch {
	case err != nil || len(routes) == 0:
		return fmt.Errorf("rp_filter on %s drops the backends' replies from %s, to which this host has no route: "+
			"add one (ip route add %s/32 dev %s), or turn it off (sysctl -w net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.%s.rp_filter=0)",
			name, vip, vip, name, name)
	case mode == 1 && routes[0].LinkIndex != ifindex:
		return fmt.Errorf("strict rp_filter on %s drops the backends' replies from %s, which this host routes by another interface: "+
			"route %s by %s, or make rp_filter loose (sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.%s.rp_filter=2)",
			name, vip, vip, name, name)
	}
	return nil
}

// probeHop sets the probes up the first time, and returns the hop of the
// backend at addr. A backend the datapath has not resolved (one down from
// the start is never sent to) is resolved now, and its entries get the hop
// the probe program sends by; one that does not answer fails the probe,
// and is asked for again in the background.
func (x *XDP) probeHop(addr netip.Addr) (hop, error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if !x.probeReady {
		if err := x.setupProbes(); err != nil {
			return hop{}, fmt.Errorf("set up the probe device: %w", err)
		}
		x.probeReady = true
	}
	if h, ok := x.hops[addr]; ok {
		return h, nil
	}
	if err := x.resolveAddrs([]netip.Addr{addr})[addr]; err != nil {
		return hop{}, err
	}
	x.rewriteHop(addr)
	return x.hops[addr], nil
}

// setupProbes creates (or takes over) the probe device, attaches the
// probe program to its egress, and adds the rules and routes that lead
// marked packets there. x.mu must be held.
func (x *XDP) setupProbes() error {
	link, err := netlink.LinkByName(ProbeDevice)
	var notFound netlink.LinkNotFoundError
	switch {
	case errors.As(err, &notFound):
		attrs := netlink.NewLinkAttrs()
		attrs.Name, attrs.MTU = ProbeDevice, probeMTU
		if err := netlink.LinkAdd(&netlink.Ifb{LinkAttrs: attrs}); err != nil {
			return fmt.Errorf("create ifb device %s (is the ifb module available?): %w", ProbeDevice, err)
		}
		if link, err = netlink.LinkByName(ProbeDevice); err != nil {
			return err
		}
	case err != nil:
		return err
	case link.Type() != "ifb":
		return fmt.Errorf("%s exists and is a %s device, not tether's: remove it", ProbeDevice, link.Type())
	}
	idx := link.Attrs().Index
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("set %s up: %w", ProbeDevice, err)
	}
	clsact := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: idx, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
	if err := netlink.QdiscReplace(clsact); err != nil {
		return fmt.Errorf("add the clsact qdisc to %s: %w", ProbeDevice, err)
	}
	filter := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: idx, Parent: netlink.HANDLE_MIN_EGRESS, Handle: 1,
			Protocol: unix.ETH_P_ALL, Priority: 1},
		Fd: x.objs.TetherProbe.FD(), Name: "tether_probe", DirectAction: true,
	}
	if err := netlink.FilterReplace(filter); err != nil {
		return fmt.Errorf("attach the probe program to %s: %w", ProbeDevice, err)
	}
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		bits := 32
		if family == netlink.FAMILY_V6 {
			bits = 128
		}
		route := &netlink.Route{LinkIndex: idx, Table: ProbeTable, Family: family,
			Dst: &net.IPNet{IP: make(net.IP, bits/8), Mask: net.CIDRMask(0, bits)}}
		if err := netlink.RouteReplace(route); err != nil {
			return fmt.Errorf("route table %d to %s: %w", ProbeTable, ProbeDevice, err)
		}
		if err := netlink.RuleAdd(probeRule(family)); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("add the probe rule (fwmark %#x/%#x lookup %d): %w", ProbeMark, ProbeMarkMask, ProbeTable, err)
		}
	}
	x.log.Info("health probes that follow the client path go through "+ProbeDevice,
		"fwmark", fmt.Sprintf("%#x/%#x", ProbeMark, ProbeMarkMask), "table", ProbeTable)
	return nil
}

// probeRule is the policy rule of family that routes probes.
func probeRule(family int) *netlink.Rule {
	r := netlink.NewRule()
	r.Family, r.Priority, r.Table = family, ProbeRulePriority, ProbeTable
	mask := ProbeMarkMask
	r.Mark, r.Mask = ProbeMark, &mask
	return r
}

// RemoveProbePath removes the probe device (its program and routes go with
// it) and the probe rules, if they exist.
func RemoveProbePath() error {
	var errs []error
	if link, err := netlink.LinkByName(ProbeDevice); err == nil && link.Type() == "ifb" {
		if err := netlink.LinkDel(link); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", ProbeDevice, err))
		}
	}
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		for {
			err := netlink.RuleDel(probeRule(family))
			if err == nil {
				continue // a rule added twice is removed twice
			}
			if !errors.Is(err, unix.ENOENT) && !errors.Is(err, os.ErrNotExist) && !strings.Contains(err.Error(), "no such file") {
				errs = append(errs, fmt.Errorf("remove the probe rule: %w", err))
			}
			break
		}
	}
	return errors.Join(errs...)
}
