package loader

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

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
// The device, table, rules and mark are the network namespace's: one
// tether daemon per namespace uses them.
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
	// vipCheckTTL is how long the verdict of vipPathProblem is kept.
	vipCheckTTL = 5 * time.Second
)

// probeState is what the XDP datapath keeps for the probes: whether the
// device and program are set up, each family's rule and route (nil: set
// up; an error: why not), and the recent verdicts of vipPathProblem.
type probeState struct {
	device   bool
	families map[bool]error // by "IPv4"
	checked  map[vipCheck]vipVerdict
}

type vipCheck struct {
	vip     netip.Addr
	ifindex int
}

type vipVerdict struct {
	err error
	at  time.Time
}

// ProbePath implements datapath.Prober: it sets up the probe device, its
// program and rules the first time, and returns the mark and source
// address of a probe to backend id at addr of the service on vip.
func (x *XDP) ProbePath(id uint32, addr, vip netip.Addr) (datapath.ProbePath, error) {
	if id > ^ProbeMarkMask {
		return datapath.ProbePath{}, fmt.Errorf("backend id %d does not fit in a probe mark", id)
	}
	h, err := x.probeHop(addr, vip.Is4())
	if err != nil {
		return datapath.ProbePath{}, err
	}
	// The probe comes from an address of the VIP's family, the backend
	// answers it there: the one towards the backend, or (a backend of the
	// other family) one of the interface that reaches it.
	src := h.Src
	if !src.IsValid() || src.Is4() != vip.Is4() {
		if src, err = familyAddr(h.Ifindex, vip.Is4()); err != nil {
			return datapath.ProbePath{}, err
		}
	}
	if err := x.vipPathProblem(vip, h.Ifindex); err != nil {
		return datapath.ProbePath{}, err
	}
	return datapath.ProbePath{Mark: ProbeMark | id, Source: src}, nil
}

// probeHop sets the probes of the family up the first time, and returns the
// hop of the backend at addr. A backend the datapath has not resolved (one
// down from the start is never sent to) fails the probe, and is resolved in
// the background like one that did not answer: its entries then get the
// hop the probe program sends by.
func (x *XDP) probeHop(addr netip.Addr, v4 bool) (hop, error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	p := &x.probes
	if !p.device {
		if err := x.setupProbeDevice(); err != nil {
			return hop{}, fmt.Errorf("set up the probe device: %w", err)
		}
		p.device = true
		p.families = make(map[bool]error)
		p.checked = make(map[vipCheck]vipVerdict)
	}
	err, done := p.families[v4]
	if !done {
		err = setupProbeFamily(x.probeLink, v4)
		p.families[v4] = err
		if err != nil {
			x.log.Error("health probes via the VIP cannot be routed", "family", family(v4), "err", err)
		}
	}
	if err != nil {
		return hop{}, err
	}
	if h, ok := x.hops[addr]; ok {
		return h, nil
	}
	if u, ok := x.unresolved[addr]; ok {
		u.asked = time.Now() // keep asking for it in the background
		x.unresolved[addr] = u
		return hop{}, u.err
	}
	// Never sent to: hand it to the neighbour follower, which resolves
	// the addresses that did not answer and writes their hop into their
	// entries (resolved) when they do.
	if err := x.vetter.Vet([]netip.Addr{addr}); err != nil {
		return hop{}, err
	}
	h, err := routeHop(addr)
	if err != nil {
		return hop{}, err
	}
	err = fmt.Errorf("backend %s is not resolved yet", addr)
	x.unresolved[addr] = unresolved{hop: h, err: err, asked: time.Now()}
	x.routed = x.routed || h.Via.IsValid()
	_ = probeNeigh(h.Ifindex, h.next(addr))
	return hop{}, err
}

func family(v4 bool) string {
	if v4 {
		return "IPv4"
	}
	return "IPv6"
}

// familyAddr is a global address of the family (v4: IPv4) on interface
// ifindex.
func familyAddr(ifindex int, v4 bool) (netip.Addr, error) {
	link, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return netip.Addr{}, err
	}
	fam := netlink.FAMILY_V6
	if v4 {
		fam = netlink.FAMILY_V4
	}
	addrs, err := netlink.AddrList(link, fam)
	if err != nil {
		return netip.Addr{}, err
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap().IsGlobalUnicast() {
			return ip.Unmap(), nil
		}
	}
	return netip.Addr{}, fmt.Errorf("no %s address on %s to probe the VIP from: give it one", family(v4), link.Attrs().Name)
}

// setupProbeDevice creates (or takes over) the probe device and attaches
// the probe program to its egress. x.mu must be held.
func (x *XDP) setupProbeDevice() error {
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
	x.probeLink = idx
	x.log.Info("health probes via the VIP go through "+ProbeDevice,
		"fwmark", fmt.Sprintf("%#x/%#x", ProbeMark, ProbeMarkMask), "table", ProbeTable)
	return nil
}

// setupProbeFamily adds the rule and the route of one family (v4: IPv4)
// that lead marked packets to the probe device, ifindex.
func setupProbeFamily(ifindex int, v4 bool) error {
	fam, bits := netlink.FAMILY_V6, 128
	if v4 {
		fam, bits = netlink.FAMILY_V4, 32
	}
	route := &netlink.Route{LinkIndex: ifindex, Table: ProbeTable, Family: fam,
		Dst: &net.IPNet{IP: make(net.IP, bits/8), Mask: net.CIDRMask(0, bits)}}
	if err := netlink.RouteReplace(route); err != nil {
		return fmt.Errorf("route table %d to %s: %w", ProbeTable, ProbeDevice, err)
	}
	if err := netlink.RuleAdd(probeRule(fam)); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add the probe rule (fwmark %#x/%#x lookup %d): %w", ProbeMark, ProbeMarkMask, ProbeTable, err)
	}
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

// vipPathProblem says why probes via vip, whose replies come in by
// interface ifindex, cannot work on this host (the verdict is kept for
// vipCheckTTL), or nil.
func (x *XDP) vipPathProblem(vip netip.Addr, ifindex int) error {
	k := vipCheck{vip, ifindex}
	x.mu.Lock()
	v, ok := x.probes.checked[k]
	x.mu.Unlock()
	if ok && time.Since(v.at) < vipCheckTTL {
		return v.err
	}
	err := vipPathCheck(vip, ifindex)
	x.mu.Lock()
	x.probes.checked[k] = vipVerdict{err, time.Now()}
	x.mu.Unlock()
	return err
}

// vipPathCheck finds what would stop probes via vip: vip an address of
// this host (the probes would be delivered here), or this host's
// reverse-path filter dropping the backends' replies from vip, which come
// in by interface ifindex (rp_filter on, and no route to vip, by that
// interface in strict mode). IPv6 has no reverse-path filter.
func vipPathCheck(vip netip.Addr, ifindex int) error {
	routes, err := netlink.RouteGet(net.IP(vip.AsSlice()))
	if err == nil && len(routes) > 0 && routes[0].Type == unix.RTN_LOCAL {
		return fmt.Errorf("%s is an address of this host: probes to it would never leave it", vip)
	}
	if !vip.Is4() {
		return nil
	}
	link, lerr := netlink.LinkByIndex(ifindex)
	if lerr != nil {
		return lerr
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
	switch {
	case mode == 0:
		return nil
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
