package config

import (
	"fmt"
	"math"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// BGP is the bgp block: tether's BGP speaker, which announces each VIP as
// a /32 or /128 to the peers while this host can serve it (see
// Service.MinHealthy), so that routers spread the VIPs' flows over every
// tether host that announces them (ECMP).
type BGP struct {
	// ASN is this host's autonomous system number.
	ASN uint32
	// RouterID is this host's BGP identifier, an IPv4 address.
	RouterID netip.Addr
	// ListenPort is the TCP port tether accepts sessions on; 0 (the
	// default) listens on none: tether opens every session itself.
	ListenPort uint16
	// NextHops are the next hops of the announced routes, at most one per
	// family; a family without one announces this host's address of the
	// session (next hop self).
	NextHops []netip.Addr
	// Communities are attached to every announced route: "ASN:VALUE"
	// (two 16-bit numbers) or no-export, no-advertise,
	// no-export-subconfed.
	Communities []string
	// ReannounceDelay is how long a withdrawn VIP must be servable again
	// before it is announced again, so that a flapping backend does not
	// flap the route. Withdrawal is immediate.
	ReannounceDelay time.Duration
	// GracefulRestart is the restart time tether asks its peers for (BGP
	// graceful restart, RFC 4724): when the daemon stops, its sessions
	// close without a notification and the routers keep its routes this
	// long, while the XDP program goes on forwarding, until the next
	// daemon has announced them again. 0 turns it off: a stop withdraws
	// the routes.
	GracefulRestart time.Duration
	// Peers are the routers tether opens sessions to. IPv4 VIPs are
	// announced to IPv4 peers, IPv6 VIPs to IPv6 peers.
	Peers []BGPPeer
}

// BGPPeer is one BGP neighbour.
type BGPPeer struct {
	// Address is the peer's address.
	Address netip.Addr
	// ASN is the peer's autonomous system number (the same as BGP.ASN for
	// iBGP).
	ASN uint32
	// Port is the peer's TCP port, 179 by default.
	Port uint16
	// Password turns on TCP MD5 signatures (RFC 2385) with this key.
	Password string
	// HoldTime is the hold time tether proposes; keepalives go every third
	// of it. 9s by default: a peer that hears nothing for that long closes
	// the session. With graceful restart, a router that supports it may
	// keep the routes of a session closed that way for the restart time
	// (BIRD drops them when the hold timer expires).
	HoldTime time.Duration
}

// Defaults and bounds of the bgp block.
const (
	DefaultBGPPort         = 179
	DefaultHoldTime        = 9 * time.Second
	minHoldTime            = 3 * time.Second
	maxHoldTime            = 65535 * time.Second
	DefaultReannounceDelay = 5 * time.Second
	maxReannounceDelay     = time.Hour
	DefaultGracefulRestart = 120 * time.Second
	maxGracefulRestart     = 4095 * time.Second // a 12-bit field
	// DefaultMinHealthy is a service's min_healthy by default: its VIP is
	// announced while it has one usable backend.
	DefaultMinHealthy = 1
)

var (
	bgpFields  = []string{"asn", "router_id", "listen_port", "next_hops", "communities", "reannounce_delay", "graceful_restart", "peers"}
	peerFields = []string{"address", "asn", "port", "password", "hold_time"}
)

// wellKnownCommunities are the community names the bgp block takes (RFC
// 1997). BLACKHOLE (RFC 7999) is not one: on a VIP's own route it would
// ask the routers to drop its traffic.
var wellKnownCommunities = map[string]uint32{
	"no-export":           0xffffff01,
	"no-advertise":        0xffffff02,
	"no-export-subconfed": 0xffffff03,
}

// ParseCommunity reads a community as the bgp block writes it:
// "ASN:VALUE" or a well-known name.
func ParseCommunity(s string) (uint32, error) {
	if v, ok := wellKnownCommunities[s]; ok {
		return v, nil
	}
	hi, lo, ok := strings.Cut(s, ":")
	a, err1 := strconv.ParseUint(hi, 10, 16)
	b, err2 := strconv.ParseUint(lo, 10, 16)
	if !ok || err1 != nil || err2 != nil {
		return 0, fmt.Errorf("%q is not a community: want ASN:VALUE (each 0-65535) or no-export, no-advertise, no-export-subconfed", s)
	}
	return uint32(a)<<16 | uint32(b), nil
}

// Clone returns a deep copy of b.
func (b *BGP) Clone() *BGP {
	if b == nil {
		return nil
	}
	out := *b
	out.NextHops = slices.Clone(b.NextHops)
	out.Communities = slices.Clone(b.Communities)
	out.Peers = slices.Clone(b.Peers)
	return &out
}

// bgp decodes the bgp block, defaults applied.
func (d *decoder) bgp(n *yaml.Node, path string) *BGP {
	b := &BGP{ReannounceDelay: DefaultReannounceDelay, GracefulRestart: DefaultGracefulRestart}
	d.mapping(n, path, "the bgp block", bgpFields, func(name string, v *yaml.Node, p string) {
		switch name {
		case "asn":
			b.ASN = uint32(d.integer(v, p, 1, math.MaxUint32))
		case "router_id":
			b.RouterID = d.addr(v, p)
		case "listen_port":
			b.ListenPort = uint16(d.integer(v, p, 0, math.MaxUint16))
		case "next_hops":
			for i, it := range d.list(v, p, "addresses") {
				b.NextHops = append(b.NextHops, d.addr(it, index(p, i)))
			}
		case "communities":
			for i, it := range d.list(v, p, "communities") {
				b.Communities = append(b.Communities, d.str(it, index(p, i)))
			}
		case "reannounce_delay":
			b.ReannounceDelay = d.duration(v, p)
		case "graceful_restart":
			b.GracefulRestart = d.duration(v, p)
		case "peers":
			for i, it := range d.list(v, p, "peers") {
				b.Peers = append(b.Peers, d.peer(it, index(p, i)))
			}
		}
	})
	return b
}

func (d *decoder) peer(n *yaml.Node, path string) BGPPeer {
	peer := BGPPeer{Port: DefaultBGPPort, HoldTime: DefaultHoldTime}
	d.mapping(n, path, "a peer", peerFields, func(name string, v *yaml.Node, p string) {
		switch name {
		case "address":
			peer.Address = d.addr(v, p)
		case "asn":
			peer.ASN = uint32(d.integer(v, p, 1, math.MaxUint32))
		case "port":
			peer.Port = d.port(v, p)
		case "password":
			peer.Password = d.str(v, p)
		case "hold_time":
			peer.HoldTime = d.duration(v, p)
		}
	})
	return peer
}

// validateBGP checks the bgp block and the services' min_healthy.
func (c *Config) validateBGP(v *validator) {
	b := c.BGP
	if b == nil {
		return
	}
	if b.ASN == 0 {
		v.add("bgp.asn", "required: this host's AS number (1-4294967295)")
	}
	switch {
	case !b.RouterID.IsValid():
		v.add("bgp.router_id", "required: an IPv4 address that identifies this host, usually one of its own")
	case !b.RouterID.Is4() || b.RouterID.IsUnspecified():
		v.add("bgp.router_id", "%s: want a non-zero IPv4 address", b.RouterID)
	}
	var has4, has6 bool
	for i, a := range b.NextHops {
		p := index("bgp.next_hops", i)
		switch {
		case !a.IsGlobalUnicast():
			v.add(p, "%s is not a unicast address", a)
		case a.Is4() && has4, a.Is6() && has6:
			v.add(p, "a second next hop of the same family: give at most one IPv4 and one IPv6")
		}
		has4, has6 = has4 || a.Is4(), has6 || a.Is6()
	}
	for i, s := range b.Communities {
		if _, err := ParseCommunity(s); err != nil {
			v.add(index("bgp.communities", i), "%v", err)
		}
	}
	if b.ReannounceDelay < 0 || b.ReannounceDelay > maxReannounceDelay {
		v.add("bgp.reannounce_delay", "%v is out of range 0..%v", b.ReannounceDelay, maxReannounceDelay)
	}
	if g := b.GracefulRestart; g < 0 || g > maxGracefulRestart || g%time.Second != 0 {
		v.add("bgp.graceful_restart", "%v: want whole seconds within 0 (off)..%v", g, maxGracefulRestart)
	}
	if len(b.Peers) == 0 {
		v.add("bgp.peers", "at least one peer is required: the routers to announce the VIPs to")
	}
	for i, peer := range b.Peers {
		p := index("bgp.peers", i)
		switch {
		case !peer.Address.IsValid():
			v.add(field(p, "address"), "required")
		case !peer.Address.IsGlobalUnicast() && !peer.Address.IsLinkLocalUnicast():
			v.add(field(p, "address"), "%s is not a unicast address", peer.Address)
		case peer.Address.IsLinkLocalUnicast() && peer.Address.Zone() == "":
			v.add(field(p, "address"), "%s is link-local: name its interface, as in %s%%eth0", peer.Address, peer.Address)
		}
		if j := slices.IndexFunc(b.Peers[:i], func(o BGPPeer) bool { return o.Address == peer.Address }); j >= 0 && peer.Address.IsValid() {
			v.add(field(p, "address"), "%s is already bgp.peers[%d]", peer.Address, j)
		}
		if peer.ASN == 0 {
			v.add(field(p, "asn"), "required: the peer's AS number")
		}
		if peer.Port == 0 {
			v.add(field(p, "port"), "must not be 0")
		}
		if peer.HoldTime < minHoldTime || peer.HoldTime > maxHoldTime || peer.HoldTime%time.Second != 0 {
			v.add(field(p, "hold_time"), "%v: want whole seconds within %v..%v", peer.HoldTime, minHoldTime, maxHoldTime)
		}
		if len(peer.Password) > 80 {
			v.add(field(p, "password"), "at most 80 characters (the TCP MD5 key limit)")
		}
	}
}

// bgpNode writes the bgp block.
func bgpNode(b *BGP) *yaml.Node {
	kv := []any{"asn", integer(b.ASN), "router_id", str(b.RouterID.String())}
	if b.ListenPort != 0 {
		kv = append(kv, "listen_port", integer(b.ListenPort))
	}
	if len(b.NextHops) > 0 {
		hops := &yaml.Node{Kind: yaml.SequenceNode, Style: yaml.FlowStyle}
		for _, a := range b.NextHops {
			hops.Content = append(hops.Content, str(a.String()))
		}
		kv = append(kv, "next_hops", hops)
	}
	if len(b.Communities) > 0 {
		cs := &yaml.Node{Kind: yaml.SequenceNode, Style: yaml.FlowStyle}
		for _, s := range b.Communities {
			cs.Content = append(cs.Content, str(s))
		}
		kv = append(kv, "communities", cs)
	}
	kv = append(kv, "reannounce_delay", str(b.ReannounceDelay.String()), "graceful_restart", str(b.GracefulRestart.String()))
	peers := &yaml.Node{Kind: yaml.SequenceNode}
	for _, p := range b.Peers {
		pkv := []any{"address", str(p.Address.String()), "asn", integer(p.ASN)}
		if p.Port != DefaultBGPPort {
			pkv = append(pkv, "port", integer(p.Port))
		}
		if p.Password != "" {
			pkv = append(pkv, "password", str(p.Password))
		}
		pkv = append(pkv, "hold_time", str(p.HoldTime.String()))
		peers.Content = append(peers.Content, mapping(pkv...))
	}
	kv = append(kv, "peers", peers)
	return mapping(kv...)
}
