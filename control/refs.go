package control

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/tetherlb/tether/config"
)

// serviceRef names a service on the command line and in the API:
// "VIP:PORT" or "VIP:PORT/PROTO", with IPv6 VIPs in brackets
// ("[2001:db8::10]:8765/udp"). Proto is empty when not given.
type serviceRef struct {
	VIP   netip.Addr
	Port  uint16
	Proto string
}

func (r serviceRef) String() string {
	s := netip.AddrPortFrom(r.VIP, r.Port).String()
	if r.Proto != "" {
		s += "/" + r.Proto
	}
	return s
}

// parseServiceRef parses a service reference; field names the argument
// in the error.
func parseServiceRef(s, field string) (serviceRef, error) {
	const want = "want VIP:PORT or VIP:PORT/PROTO, such as 203.0.113.10:8765 or [2001:db8::10]:8765/udp"
	if s == "" {
		return serviceRef{}, refusef(field, "missing (%s)", want)
	}
	var r serviceRef
	hostport := s
	if i := strings.LastIndexByte(s, '/'); i >= 0 {
		hostport, r.Proto = s[:i], s[i+1:]
		if r.Proto != config.ProtocolTCP && r.Proto != config.ProtocolUDP {
			return serviceRef{}, refusef(field, "%q: unknown protocol %q (want tcp or udp)", s, r.Proto)
		}
	}
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		return serviceRef{}, refusef(field, "%q is not a service address (%s)", s, want)
	}
	if r.VIP, err = parseAddr(host); err != nil {
		return serviceRef{}, refusef(field, "%q: %q is not an IP address (%s)", s, host, want)
	}
	if r.Port, err = parsePort(port); err != nil {
		return serviceRef{}, refusef(field, "%q: %v", s, err)
	}
	return r, nil
}

// parseBackendRef parses "ADDR" or "ADDR:PORT" ("2001:db8::11",
// "[2001:db8::11]" and "[2001:db8::11]:8765" for IPv6); a missing port is
// defPort.
func parseBackendRef(s string, defPort uint16, field string) (netip.Addr, uint16, error) {
	const want = "want ADDR or ADDR:PORT, such as 198.51.100.11 or [2001:db8::11]:8765"
	if s == "" {
		return netip.Addr{}, 0, refusef(field, "missing (%s)", want)
	}
	if a, err := parseAddr(strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")); err == nil {
		if strings.HasPrefix(s, "[") != strings.HasSuffix(s, "]") {
			return netip.Addr{}, 0, refusef(field, "%q is not a backend address (%s)", s, want)
		}
		return a, defPort, nil
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return netip.Addr{}, 0, refusef(field, "%q is not a backend address (%s)", s, want)
	}
	a, err := parseAddr(host)
	if err != nil {
		return netip.Addr{}, 0, refusef(field, "%q: %q is not an IP address (%s)", s, host, want)
	}
	p, err := parsePort(port)
	if err != nil {
		return netip.Addr{}, 0, refusef(field, "%q: %v", s, err)
	}
	return a, p, nil
}

// parseAddr parses an IP address literal; an IPv4 address written as
// IPv4-mapped IPv6 is kept as it is, for validation to refuse by name.
func parseAddr(s string) (netip.Addr, error) {
	if strings.ContainsAny(s, "[]") {
		return netip.Addr{}, fmt.Errorf("brackets")
	}
	return netip.ParseAddr(s)
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("port %q is not a number", s)
	}
	if n < 1 || n > 65535 {
		return 0, fmt.Errorf("port %d is out of range 1..65535", n)
	}
	return uint16(n), nil
}

// findService returns the index of the service ref names in cfg.
func findService(cfg *config.Config, ref serviceRef, field string) (int, error) {
	found := -1
	for i, s := range cfg.Services {
		if s.VIP != ref.VIP || s.Port != ref.Port || (ref.Proto != "" && s.Protocol != ref.Proto) {
			continue
		}
		if found >= 0 {
			return -1, refusef(field, "%s is both a %s and a %s service: say which, as %s/%s",
				ref, cfg.Services[found].Protocol, s.Protocol, ref, s.Protocol)
		}
		found = i
	}
	if found < 0 {
		return -1, refusef(field, "no service %s (tether vip ls lists them)", ref)
	}
	return found, nil
}

// serviceBackend finds the service ref names in cfg, at index i, and
// parses backend as one of its backends (the service's port when backend
// has none). The service's backends are cfg's own copy, to change.
func serviceBackend(cfg *config.Config, ref serviceRef, backend string) (i int, s *config.Service, addr netip.Addr, port uint16, err error) {
	i, err = findService(cfg, ref, "service")
	if err != nil {
		return 0, nil, netip.Addr{}, 0, err
	}
	s = &cfg.Services[i]
	s.Backends = slices.Clone(s.Backends) // shared with the running configuration (see Daemon.change)
	addr, port, err = parseBackendRef(backend, s.Port, "backend")
	return i, s, addr, port, err
}

// findBackend returns the index of the backend at addr:port in s.
func findBackend(s *config.Service, addr netip.Addr, port uint16, field string) (int, error) {
	for i, b := range s.Backends {
		if b.Address == addr && b.Port == port {
			return i, nil
		}
	}
	return -1, refusef(field, "%s is not a backend of %s (%s)", netip.AddrPortFrom(addr, port), s.Name, s.Key())
}

// protoName is the name of IP protocol p as the configuration spells it.
func protoName(p uint8) string {
	switch p {
	case 6:
		return config.ProtocolTCP
	case 17:
		return config.ProtocolUDP
	}
	return strconv.Itoa(int(p))
}
