package config

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"unicode"

	"github.com/tetherlb/tether/health"
	"github.com/tetherlb/tether/maglev"
)

// FieldError is one problem with a configuration, tied to the field it is
// about.
type FieldError struct {
	// File is the configuration file, when the configuration was loaded
	// from one.
	File string
	// Line is the line of the field in the YAML source, 1-based; 0 when the
	// configuration was not decoded from YAML or the field is absent.
	Line int
	// Path names the field, such as "services[0].backends[2].port"; empty
	// for a problem with the file as a whole.
	Path string
	// Msg says what is wrong and, where it helps, what is wanted instead.
	Msg string

	at position // where the problem sorts among the others
}

// position is a place in the YAML source, 1-based.
type position struct{ line, column int }

func (p position) compare(q position) int {
	return cmp.Or(cmp.Compare(p.line, q.line), cmp.Compare(p.column, q.column))
}

// Error formats the problem as "config: FILE: line N: PATH: MSG", leaving
// out the parts that are not known.
func (e *FieldError) Error() string {
	var b strings.Builder
	b.WriteString("config: ")
	if e.File != "" {
		b.WriteString(e.File + ": ")
	}
	if e.Line > 0 {
		fmt.Fprintf(&b, "line %d: ", e.Line)
	}
	if e.Path != "" {
		b.WriteString(e.Path + ": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// maxErrors bounds the problems collected from one configuration, so that
// a broken file of a million backends costs no more than a short one.
const maxErrors = 1000

// maxReported is the number of problems an error message lists.
const maxReported = 20

// joinErrors returns nil for no problem, the *FieldError itself for one, and
// for several an error whose message lists the first maxReported of them,
// one per line, and which unwraps to every *FieldError.
func joinErrors(errs []*FieldError, truncated bool) error {
	switch {
	case len(errs) == 0:
		return nil
	case len(errs) == 1 && !truncated:
		return errs[0]
	}
	list := make([]error, 0, min(len(errs), maxReported)+1)
	for _, e := range errs[:min(len(errs), maxReported)] {
		list = append(list, e)
	}
	if len(errs) > maxReported || truncated {
		more := fmt.Sprintf("%d", len(errs)-maxReported)
		if truncated {
			more = "more than " + fmt.Sprint(maxErrors-maxReported)
		}
		list = append(list, fmt.Errorf("config: %s further problems not shown", more))
	}
	return errors.Join(list...)
}

// validator collects the problems of a Config in the order of its fields.
type validator struct {
	errs      []*FieldError
	truncated bool
}

func (v *validator) add(path, format string, args ...any) {
	if len(v.errs) >= maxErrors {
		v.truncated = true
		return
	}
	v.errs = append(v.errs, &FieldError{Path: path, Msg: fmt.Sprintf(format, args...)})
}

// Validate checks a configuration as Parse would after decoding: every
// field in its range, the cross-field rules (address families, duplicates,
// table capacity), and the modes that are known but not supported yet. It
// does not apply defaults: a zero field is checked as it is. The error
// lists every problem, each a *FieldError (see errors.As).
func (c *Config) Validate() error {
	if c == nil {
		return &FieldError{Msg: "no configuration"}
	}
	var v validator
	c.validate(&v)
	return joinErrors(v.errs, v.truncated)
}

// ValidateEdit is Validate of c, a valid configuration whose services
// [from, to) were replaced or added and which is otherwise unchanged (a
// service removed counts as an empty range where it was). When the edit
// keeps c valid it costs time in proportion to those services (see
// validEdit); otherwise it is Validate, which says what is wrong.
func (c *Config) ValidateEdit(from, to int) error {
	if c != nil && c.validEdit(from, to) {
		return nil
	}
	return c.Validate()
}

// CheckDatapath refuses a datapath name other than auto, xdp, xdp-generic
// and splice.
func CheckDatapath(name string) error {
	switch name {
	case DatapathAuto, DatapathXDP, DatapathXDPGeneric, DatapathSplice:
		return nil
	}
	return fmt.Errorf("unknown datapath %q (want auto, xdp, xdp-generic or splice)", name)
}

func (c *Config) validate(v *validator) {
	datapathErr := CheckDatapath(c.Datapath)
	datapathOK := datapathErr == nil

	if len(c.Interfaces) == 0 && datapathOK && c.Datapath != DatapathSplice {
		v.add("interfaces", "at least one interface is required with datapath %s (only splice runs without)", c.Datapath)
	}
	for i, name := range c.Interfaces {
		p := index("interfaces", i)
		if !validIfname(name) {
			v.add(p, "%q is not an interface name (1-15 characters, none of '/', ':' or whitespace)", name)
		} else if j := slices.Index(c.Interfaces[:i], name); j >= 0 {
			v.add(p, "%q is already listed as interfaces[%d]", name, j)
		}
	}
	if !datapathOK {
		v.add("datapath", "%v", datapathErr)
	}

	if n := c.Splice.Loops; n < 0 || n > maxSpliceLoops {
		v.add("splice.loops", "%d is out of range 0..%d (0: one per CPU)", n, maxSpliceLoops)
	}
	if n := c.Splice.MaxConnections; n < 0 || n > maxSpliceConnections {
		v.add("splice.max_connections", "%d is out of range 0..%d (0: no cap)", n, maxSpliceConnections)
	}

	c.validateBGP(v)
	c.validateSync(v)

	t := c.Tables
	inRange(v, "tables.connections", t.Connections, minTableEntries, maxTableEntries)
	inRange(v, "tables.nat", t.NAT, minTableEntries, maxTableEntries)
	inRange(v, "tables.affinity", t.Affinity, minTableEntries, maxTableEntries)
	if inRange(v, "tables.ring_size", t.RingSize, minRingSize, maxRingSize) && !maglev.IsPrime(t.RingSize) {
		v.add("tables.ring_size", "%d is not prime (the default is %d)", t.RingSize, defaultRingSize)
	}
	maxServicesOK := inRange(v, "tables.max_services", t.MaxServices, 1, limitMaxServices)
	maxBackendsOK := inRange(v, "tables.max_backends", t.MaxBackends, 1, limitMaxBackends)
	if t.InsertRate > maxInsertRate {
		v.add("tables.insert_rate", "%d is out of range 0..%d (0: no limit)", t.InsertRate, maxInsertRate)
	}

	if maxServicesOK && len(c.Services) > int(t.MaxServices) {
		v.add("services", "%d services are more than tables.max_services (%d)", len(c.Services), t.MaxServices)
	}
	names := make(map[string]int, len(c.Services))
	keys := make(map[string]int, len(c.Services))
	backends := 0
	for i := range c.Services {
		s := &c.Services[i]
		p := index("services", i)
		if validName(s.Name) {
			if j, ok := names[s.Name]; ok {
				v.add(field(p, "name"), "%q is already the name of services[%d]", s.Name, j)
			} else {
				names[s.Name] = i
			}
		}
		if c.checkService(v, i, datapathOK) {
			if j, ok := keys[s.Key()]; ok {
				v.add(p, "%s is already defined by services[%d] (%q)", s.Key(), j, c.Services[j].Name)
			} else {
				keys[s.Key()] = i
			}
		}
		for j := range s.Backends {
			backends++
			if maxBackendsOK && backends == int(t.MaxBackends)+1 {
				v.add(index(field(p, "backends"), j), "more than tables.max_backends (%d) backends over all services", t.MaxBackends)
			}
		}
	}
	// A VIP is where clients arrive, never a backend: the datapath would
	// take the packets meant for the backend as the service's.
	vips := map[netip.Addr]string{}
	for _, s := range c.Services {
		if s.VIP.IsValid() {
			vips[s.VIP] = s.Name
		}
	}
	for i, s := range c.Services {
		for j, b := range s.Backends {
			if name, ok := vips[b.Address]; ok && !(b.Address == s.VIP && b.Port == s.Port) {
				v.add(field(index(field(index("services", i), "backends"), j), "address"), "%s is the VIP of the service %s: a VIP is not a backend", b.Address, name)
			}
		}
		// Nor is it where fullnat connections come from: the backends'
		// replies to it would be taken for clients of its services.
		if name, ok := vips[s.SNATAddress]; ok {
			v.add(field(index("services", i), "snat_address"), "%s is the VIP of the service %s: use an address of this host that no service has", s.SNATAddress, name)
		}
	}
}

// checkService checks what service i must be whatever the other services
// are: its fields and backends (Service.validate), and what the datapath
// allows it. It reports whether the service's key is valid.
func (c *Config) checkService(v *validator, i int, datapathOK bool) bool {
	s := &c.Services[i]
	p := index("services", i)
	if s.Protocol == ProtocolUDP && c.Datapath == DatapathSplice {
		v.add(field(p, "protocol"), "udp services need the xdp datapath (the splice datapath proxies TCP only): use datapath auto, xdp or xdp-generic, or protocol tcp")
	}
	if s.ProxyProtocol == ProxyProtocolV2 && datapathOK && c.Datapath != DatapathSplice {
		v.add(field(p, "proxy_protocol"), "v2 needs the splice datapath (datapath %s may forward packets, which cannot carry a header): use datapath splice", c.Datapath)
	}
	ok := s.validate(v, p, c.Datapath == DatapathSplice)
	for j, b := range s.Backends {
		bp := field(index(field(p, "backends"), j), "address")
		if b.Address.IsLoopback() && datapathOK && c.Datapath != DatapathSplice {
			v.add(bp, "%s is a loopback address: only the splice datapath reaches a backend on this host (datapath %s may forward packets, which cannot reach it)", b.Address, c.Datapath)
		}
	}
	return ok
}

// maxEditScan is the most services an edit checks against the others by
// scanning them (validEdit); a larger edit is validated whole.
const maxEditScan = 16

// validEdit says whether c is valid, given that it is a valid
// configuration whose services [from, to) were replaced, and nothing
// else changed: it checks those services, and the rules that join them
// to the others (names, keys, VIPs that are backends, capacities), in time
// proportional to the services changed times a scan of the others.
func (c *Config) validEdit(from, to int) bool {
	var v validator
	if to-from > maxEditScan {
		// Scans per changed service would cost more than the whole.
		c.validate(&v)
		return len(v.errs) == 0
	}
	t := c.Tables
	if len(c.Services) > int(t.MaxServices) {
		return false
	}
	backends := 0
	for _, s := range c.Services {
		backends += len(s.Backends)
	}
	if backends > int(t.MaxBackends) {
		return false
	}
	datapathOK := CheckDatapath(c.Datapath) == nil
	for i := from; i < to; i++ {
		if !c.checkService(&v, i, datapathOK) || len(v.errs) > 0 {
			return false
		}
		a := &c.Services[i]
		for k := range c.Services {
			s := &c.Services[k]
			if k != i && (s.Name == a.Name || s.VIP == a.VIP && s.Port == a.Port && s.Protocol == a.Protocol) {
				return false
			}
			// A VIP is never a backend: a's VIP is none of s's backends,
			// and none of a's backends is s's VIP (the service itself
			// is refused by validate).
			for _, b := range s.Backends {
				if b.Address == a.VIP && !(b.Address == s.VIP && b.Port == s.Port) {
					return false
				}
			}
			for _, b := range a.Backends {
				if b.Address == s.VIP && !(b.Address == a.VIP && b.Port == a.Port) {
					return false
				}
			}
			// No fullnat source address is a VIP.
			if s.SNATAddress == a.VIP || a.SNATAddress == s.VIP {
				return false
			}
		}
	}
	return true
}

// validate checks one service and its backends, and reports whether the
// service's key (VIP, port and protocol) is valid, so that duplicates can
// be looked for. proxied says that a proxy serves it (datapath splice),
// which connects to any backend port.
func (s *Service) validate(v *validator, p string, proxied bool) bool {
	if s.Name == "" {
		v.add(field(p, "name"), "missing")
	} else if !validName(s.Name) {
		v.add(field(p, "name"), "%q is not a service name (lower-case letters, digits, '_', '.' and '-', starting with a letter or digit, at most 63 characters)", s.Name)
	}

	vipOK := checkAddr(v, field(p, "vip"), s.VIP, true)
	portOK := checkPort(v, field(p, "port"), s.Port)
	protoOK := s.ProtoNumber() != 0
	if !protoOK {
		v.add(field(p, "protocol"), "unknown protocol %q (want tcp or udp)", s.Protocol)
	}
	if s.Affinity != AffinitySource && s.Affinity != AffinityConnection {
		v.add(field(p, "affinity"), "unknown mode %q (want source or connection)", s.Affinity)
	}
	if s.AffinityTimeout <= 0 || s.AffinityTimeout > MaxAffinityTimeout {
		v.add(field(p, "affinity_timeout"), "%s is out of range (want more than 0 and at most 720h)", s.AffinityTimeout)
	}
	dsr, encap := false, false
	switch s.Forwarding {
	case ForwardingDSR:
		dsr = true
	case ForwardingIPIP, ForwardingGUE:
		dsr, encap = true, true
	case ForwardingNAT, ForwardingFullNAT:
	default:
		v.add(field(p, "forwarding"), "unknown mode %q (want dsr, ipip, gue, nat or fullnat)", s.Forwarding)
	}
	if t := s.TunnelSource; t.IsValid() {
		switch {
		case !encap:
			v.add(field(p, "tunnel_source"), "only forwarding ipip and gue encapsulate (remove it, or set forwarding: ipip or gue)")
		case !checkAddr(v, field(p, "tunnel_source"), t.Addr(), true) || !checkAddr(v, field(p, "tunnel_source"), lastAddr(t), true):
		case t.Addr().BitLen()-t.Bits() > 32:
			v.add(field(p, "tunnel_source"), "%s varies more than 32 bits per flow: give a prefix of /%d or longer", t, t.Addr().BitLen()-32)
		case !slices.ContainsFunc(s.Backends, func(b Backend) bool { return b.Address.Is4() == t.Addr().Is4() }) && len(s.Backends) > 0:
			v.add(field(p, "tunnel_source"), "%s is %s but no backend is: outer headers take the backend's family", t, family(t.Addr()))
		}
	}
	if s.GUEPort != 0 && s.Forwarding != ForwardingGUE {
		v.add(field(p, "gue_port"), "only forwarding gue sends to a UDP port (remove it, or set forwarding: gue)")
	}
	if s.SNATAddress.IsValid() {
		switch {
		case s.Forwarding != ForwardingFullNAT:
			v.add(field(p, "snat_address"), "only forwarding fullnat rewrites the client's address (remove it, or set forwarding: fullnat)")
		case checkAddr(v, field(p, "snat_address"), s.SNATAddress, true) && vipOK && s.SNATAddress.Is4() != s.VIP.Is4():
			v.add(field(p, "snat_address"), "%s is %s but the vip %s is %s", s.SNATAddress, family(s.SNATAddress), s.VIP, family(s.VIP))
		}
	}
	validateHealth(v, field(p, "health"), s.Health)
	if s.Protocol == ProtocolTCP && s.Health.Type == health.TypeUDP {
		v.add(field(field(p, "health"), "type"), "a udp check probes over UDP, which a tcp service does not answer: use tcp, http or websocket")
	}
	if s.OnDown != OnDownKeep && s.OnDown != OnDownReset {
		v.add(field(p, "on_down"), "unknown mode %q (want keep or reset)", s.OnDown)
	}
	if s.ICMPEcho != ICMPEchoReply && s.ICMPEcho != ICMPEchoPass {
		v.add(field(p, "icmp_echo"), "unknown mode %q (want reply or pass)", s.ICMPEcho)
	}

	if s.MinHealthy < 0 || s.MinHealthy > limitMaxBackends {
		v.add(field(p, "min_healthy"), "%d is out of range 0..%d", s.MinHealthy, limitMaxBackends)
	}
	if s.IdleAfter < 0 || s.IdleAfter > MaxIdleTimeout {
		v.add(field(p, "idle_after"), "%s is out of range (want more than 0, up to 720h)", s.IdleAfter)
	}
	if s.IdleTimeout < 0 || s.IdleTimeout > MaxIdleTimeout {
		v.add(field(p, "idle_timeout"), "%s is out of range (want 0, for none, up to 720h)", s.IdleTimeout)
	}
	switch s.ProxyProtocol {
	case ProxyProtocolNone, ProxyProtocolV2:
	default:
		v.add(field(p, "proxy_protocol"), "unknown version %q (want v2 or none)", s.ProxyProtocol)
	}

	keys := make(map[string]int, len(s.Backends))
	for j, b := range s.Backends {
		bp := index(field(p, "backends"), j)
		addrOK := checkAddr(v, field(bp, "address"), b.Address, false)
		// An encapsulated packet's outer family is its backend's, whatever
		// the VIP's.
		if addrOK && vipOK && !encap && b.Address.Is4() != s.VIP.Is4() {
			v.add(field(bp, "address"), "%s is %s but the vip %s is %s", b.Address, family(b.Address), s.VIP, family(s.VIP))
			addrOK = false
		}
		bportOK := checkPort(v, field(bp, "port"), b.Port)
		if bportOK && portOK && dsr && !proxied && b.Port != s.Port {
			v.add(field(bp, "port"), "%d differs from the service port %d: %s forwarding sends the packet as the client sent it, it cannot change the port (leave the port out or make it %d; forwarding nat or fullnat, and datapath splice, map ports)", b.Port, s.Port, s.Forwarding, s.Port)
			bportOK = false
		}
		if addrOK && vipOK && bportOK && portOK && b.Address == s.VIP && b.Port == s.Port {
			v.add(bp, "%s is the service itself", b.Key())
			addrOK = false
		}
		if b.Weight > MaxWeight {
			v.add(field(bp, "weight"), "%d is out of range 0..%d", b.Weight, MaxWeight)
		}
		if b.State != StateActive && b.State != StateDraining {
			v.add(field(bp, "state"), "unknown state %q (want active or draining)", b.State)
		}
		if !b.CloseAt.IsZero() && b.State != StateDraining {
			v.add(field(bp, "close_at"), "only a draining backend closes its connections (set state: draining, or remove close_at)")
		}
		if b.CloseRate != 0 && b.CloseAt.IsZero() {
			v.add(field(bp, "close_rate"), "close_rate paces the closes of close_at, which is not set")
		}
		if b.CloseRate < 0 || b.CloseRate > MaxCloseRate {
			v.add(field(bp, "close_rate"), "%d is out of range 1..%d", b.CloseRate, MaxCloseRate)
		}
		if addrOK && bportOK {
			if k, ok := keys[b.Key()]; ok {
				v.add(bp, "%s is already listed as backends[%d]", b.Key(), k)
			} else {
				keys[b.Key()] = j
			}
		}
	}
	return vipOK && portOK && protoOK
}

// validateHealth checks a service's health check, at path p: type none
// with no other field, or a check the health package accepts, each of its
// problems named by its field (services[0].health.timeout).
func validateHealth(v *validator, p string, c health.Check) {
	switch c.Type {
	case HealthNone:
		for _, f := range []struct {
			name string
			set  bool
		}{
			{"path", c.Path != ""},
			{"host", c.Host != ""},
			{"expect_status", c.ExpectStatus != [2]int{}},
			{"send", c.Send != ""},
			{"interval", c.Interval != 0},
			{"timeout", c.Timeout != 0},
			{"rise", c.Rise != 0},
			{"fall", c.Fall != 0},
			{"via", c.Via != ""},
		} {
			if f.set {
				v.add(field(p, f.name), "type none probes nothing: leave %s out, or choose a type (tcp, http, websocket or udp)", f.name)
			}
		}
		return
	case health.TypeTCP, health.TypeHTTP, health.TypeWebSocket, health.TypeUDP:
	default:
		v.add(field(p, "type"), "unknown type %q (want tcp, http, websocket, udp or none)", c.Type)
		return
	}
	for _, err := range unjoin(c.Validate()) {
		var fe *health.FieldError
		if errors.As(err, &fe) {
			v.add(field(p, fe.Field), "%s", fe.Msg)
		} else {
			v.add(p, "%v", err)
		}
	}
	if c.Rise > MaxRiseFall {
		v.add(field(p, "rise"), "%d is out of range 1..%d", c.Rise, MaxRiseFall)
	}
	if c.Fall > MaxRiseFall {
		v.add(field(p, "fall"), "%d is out of range 1..%d", c.Fall, MaxRiseFall)
	}
}

// unjoin returns the errors that errors.Join joined into err, or err
// alone.
func unjoin(err error) []error {
	if err == nil {
		return nil
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// inRange reports whether n lies in lo..hi, and adds a problem if not.
func inRange(v *validator, path string, n, lo, hi uint32) bool {
	if n < lo || n > hi {
		v.add(path, "%d is out of range %d..%d", n, lo, hi)
		return false
	}
	return true
}

func checkPort(v *validator, path string, port uint16) bool {
	if port == 0 {
		v.add(path, "missing (want 1..65535)")
		return false
	}
	return true
}

// checkAddr reports whether a is usable as a VIP (vip) or as a backend
// address, and adds a problem if not.
func checkAddr(v *validator, path string, a netip.Addr, vip bool) bool {
	var problem string
	switch {
	case !a.IsValid():
		v.add(path, "missing")
		return false
	case a.Zone() != "":
		problem = "has a zone; zones are not supported"
	case a.Is4In6():
		problem = fmt.Sprintf("is an IPv4-mapped IPv6 address; write it as %s", a.Unmap())
	case a.IsUnspecified():
		problem = "is the unspecified address"
	case a.IsMulticast():
		problem = "is a multicast address"
	case a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		problem = "is the broadcast address"
	case a.Is4() && a.As4()[0] == 0:
		problem = "is in 0.0.0.0/8, which names no host"
	case a.Is6() && a.IsLinkLocalUnicast():
		problem = "is an IPv6 link-local address, which needs a zone (an interface); zones are not supported"
	case vip && a.IsLoopback():
		problem = "is a loopback address"
	default:
		return true
	}
	v.add(path, "%s %s", a, problem)
	return false
}

// lastAddr is the last address of prefix p.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

func family(a netip.Addr) string {
	if a.Is4() {
		return "IPv4"
	}
	return "IPv6"
}

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_.-]{0,62}$`)

func validName(s string) bool { return nameRE.MatchString(s) }

// validIfname follows the kernel's dev_valid_name: 1 to 15 bytes (IFNAMSIZ
// less the NUL), not "." or "..", no '/', ':' or whitespace. Control
// characters are refused too.
func validIfname(s string) bool {
	if len(s) == 0 || len(s) > 15 || s == "." || s == ".." {
		return false
	}
	for _, r := range s {
		if r == '/' || r == ':' || unicode.IsSpace(r) || !unicode.IsPrint(r) {
			return false
		}
	}
	return true
}
