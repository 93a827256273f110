package config

import (
	"fmt"
	"net/netip"
	"slices"
	"time"

	"go.yaml.in/yaml/v3"
)

// Sync is the sync block: the hosts that serve the same VIPs send each
// other their connection and affinity entries (package flowsync), so that
// a flow the routers move to another host finds there the backend it had,
// even after the backend set changed.
type Sync struct {
	// Listen is the address and UDP port this host receives its peers'
	// entries on: its own address on the network the hosts share.
	Listen netip.AddrPort
	// Peers are the other hosts' Listen addresses.
	Peers []netip.AddrPort
	// Key authenticates every datagram (HMAC-SHA256): at least 32
	// characters, the same on every host. A datagram that does not verify
	// is refused and counted.
	Key string
	// StartWait is how long a starting host waits for its peers' entries
	// before it announces its VIPs (BGP), 10s by default; it announces as
	// soon as every peer has answered. 0 does not wait.
	StartWait time.Duration
}

// Bounds and defaults of the sync block.
const (
	DefaultSyncStartWait = 10 * time.Second
	maxSyncStartWait     = 5 * time.Minute
	MinSyncKey           = 32
	maxSyncKey           = 1024
)

var syncFields = []string{"listen", "peers", "key", "start_wait"}

// Clone returns a deep copy of s.
func (s *Sync) Clone() *Sync {
	if s == nil {
		return nil
	}
	out := *s
	out.Peers = slices.Clone(s.Peers)
	return &out
}

// sync decodes the sync block, defaults applied.
func (d *decoder) sync(n *yaml.Node, path string) *Sync {
	s := &Sync{StartWait: DefaultSyncStartWait}
	d.mapping(n, path, "the sync block", syncFields, func(name string, v *yaml.Node, p string) {
		switch name {
		case "listen":
			s.Listen = d.addrPort(v, p)
		case "peers":
			for i, it := range d.list(v, p, "peer addresses (ADDR:PORT)") {
				s.Peers = append(s.Peers, d.addrPort(it, index(p, i)))
			}
		case "key":
			s.Key = d.str(v, p)
		case "start_wait":
			s.StartWait = d.duration(v, p)
		}
	})
	return s
}

// addrPort reads ADDR:PORT (an IPv6 address in brackets).
func (d *decoder) addrPort(n *yaml.Node, path string) netip.AddrPort {
	s := d.str(n, path)
	ap, err := netip.ParseAddrPort(s)
	if err != nil && s != "" {
		d.fail(n, path, "%q is not ADDR:PORT (an IPv6 address in brackets: [2001:db8::1]:7946)", s)
	}
	return ap
}

// validateSync checks the sync block.
func (c *Config) validateSync(v *validator) {
	s := c.Sync
	if s == nil {
		return
	}
	if c.Datapath == DatapathSplice {
		v.add("sync", "the splice datapath shares no entries (its connections end on the host that proxies them): sync needs datapath xdp, xdp-generic or auto")
	}
	if !s.Listen.IsValid() {
		v.add("sync.listen", "required: this host's ADDR:PORT on the network its peers reach it on")
	} else if msg := syncAddrProblem(s.Listen); msg != "" {
		v.add("sync.listen", "%s", msg)
	}
	if len(s.Peers) == 0 {
		v.add("sync.peers", "at least one peer is required: the other hosts' sync.listen")
	}
	for i, p := range s.Peers {
		path := index("sync.peers", i)
		j := slices.IndexFunc(s.Peers, func(o netip.AddrPort) bool { return o.Addr() == p.Addr() })
		problem := syncAddrProblem(p)
		switch {
		case !p.IsValid():
			v.add(path, "required: another host's ADDR:PORT")
		case problem != "":
			v.add(path, "%s", problem)
		case p.Addr() == s.Listen.Addr():
			v.add(path, "%s is this host's sync.listen address", p.Addr())
		case s.Listen.IsValid() && p.Addr().Is4() != s.Listen.Addr().Is4():
			v.add(path, "%s is not of sync.listen's family: the hosts talk over one family", p)
		case j < i:
			v.add(path, "%s is already sync.peers[%d]: a host is known by its address, one port each", p.Addr(), j)
		}
	}
	switch n := len(s.Key); {
	case n == 0:
		v.add("sync.key", "required: a secret of %d to %d bytes, the same on every host (for example: openssl rand -hex 32)", MinSyncKey, maxSyncKey)
	case n < MinSyncKey || n > maxSyncKey:
		v.add("sync.key", "%d bytes: want %d to %d, the same on every host (for example: openssl rand -hex 32)", n, MinSyncKey, maxSyncKey)
	}
	if s.StartWait < 0 || s.StartWait > maxSyncStartWait {
		v.add("sync.start_wait", "%v is out of range 0..%v", s.StartWait, maxSyncStartWait)
	}
}

// syncAddrProblem says what is wrong with a as a host's sync address, or
// "" when nothing is.
func syncAddrProblem(a netip.AddrPort) string {
	ip := a.Addr()
	switch {
	case ip.Is4In6():
		return fmt.Sprintf("%s is an IPv4-mapped address: write it as %s", a, netip.AddrPortFrom(ip.Unmap(), a.Port()))
	case a.Port() == 0:
		return fmt.Sprintf("%s: the port must not be 0", a)
	case !ip.IsGlobalUnicast() || ip.Zone() != "":
		return fmt.Sprintf("%s: want an address of the host that the others reach it by (not unspecified, loopback, link-local or multicast): hosts are known by it", a)
	}
	return ""
}

// syncNode writes the sync block.
func syncNode(s *Sync) *yaml.Node {
	peers := &yaml.Node{Kind: yaml.SequenceNode, Style: yaml.FlowStyle}
	for _, p := range s.Peers {
		peers.Content = append(peers.Content, str(p.String()))
	}
	return mapping("listen", str(s.Listen.String()), "peers", peers, "key", str(s.Key), "start_wait", str(s.StartWait.String()))
}
