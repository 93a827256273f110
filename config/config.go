// Package config is the tether configuration: the YAML schema operators write,
// the defaults of every optional field, and the validation that refuses a bad
// configuration as a whole.
//
// Parse and Load decode strictly (unknown fields, repeated keys and values of
// the wrong type are errors), apply the defaults and call Validate. Validate
// also serves on its own for a Config built in Go, as the control plane does
// for changes made through its API.
//
// Every problem is reported as a *FieldError naming the field by its path in
// the file (services[0].backends[2].port) and, when decoding, its line. All
// problems are collected and sorted by their position in the file, so the
// first line of an error always names the earliest bad field; a file with
// many problems reports the first twenty.
package config

import (
	"net/netip"
	"slices"
	"strconv"
	"time"

	"github.com/tetherlb/tether/health"
	"github.com/tetherlb/tether/maglev"
)

// Datapaths: where packets are forwarded.
const (
	// DatapathAuto attaches native XDP to every interface and, when a driver
	// or the kernel refuses it (or the program cannot be loaded), serves
	// every service through the splice proxy instead, saying why in the log.
	// Generic XDP is used only when asked for (DatapathXDPGeneric).
	DatapathAuto = "auto"
	// DatapathXDP requires native (driver) XDP on every interface.
	DatapathXDP = "xdp"
	// DatapathXDPGeneric attaches XDP in generic (skb) mode, which every
	// driver supports at a higher cost per packet.
	DatapathXDPGeneric = "xdp-generic"
	// DatapathSplice serves every service from the userspace splice(2)
	// proxy; it needs no interfaces.
	DatapathSplice = "splice"
)

// Transport protocols of a service.
const (
	ProtocolTCP = "tcp" // IP protocol 6
	ProtocolUDP = "udp" // IP protocol 17
)

// Affinity modes: what keeps a client on its backend.
const (
	// AffinitySource hashes the client address, so every connection of a
	// client lands on the same backend, and remembers the choice for the
	// service's affinity timeout.
	AffinitySource = "source"
	// AffinityConnection hashes the whole 5-tuple: each connection stays on
	// its backend, a new connection may go elsewhere.
	AffinityConnection = "connection"
)

// Forwarding modes: how a packet reaches the backend.
const (
	// ForwardingDSR rewrites the destination MAC address only (direct server
	// return): backends share the L2 segment and hold the VIP on loopback.
	ForwardingDSR = "dsr"
	// ForwardingNAT rewrites the destination address and port to the
	// backend's (destination NAT, as IPVS masquerading): backends see the
	// client's address and route their replies through the balancer, which
	// translates them back.
	ForwardingNAT = "nat"
	// ForwardingFullNAT also rewrites the client's address and port to the
	// balancer's (SNATAddress and a port it allocates per connection), as a
	// proxy does: backends need no route, no VIP and no setting.
	ForwardingFullNAT = "fullnat"
	// ForwardingIPIP sends the packet to the backend whole inside an outer
	// IP header (IP in IP): direct server return to backends on any
	// network, which decapsulate it (tether backend-setup says how) and
	// hold the VIP on loopback.
	ForwardingIPIP = "ipip"
	// ForwardingGUE does the same inside an outer IP and UDP header (GUE,
	// direct IP encapsulation) to GUEPort, which backends take with a fou
	// socket; NICs spread UDP flows over their queues by port.
	ForwardingGUE = "gue"
)

// What the XDP datapath does with ICMP echo requests to a service's VIP.
const (
	// ICMPEchoReply answers them from the program (a VIP answers ping
	// when any of its services says so).
	ICMPEchoReply = "reply"
	// ICMPEchoPass leaves them to the balancer's kernel.
	ICMPEchoPass = "pass"
)

// Backend states.
const (
	// StateActive takes new clients in proportion to the backend's weight.
	StateActive = "active"
	// StateDraining keeps the clients a backend already has but takes no
	// new ones.
	StateDraining = "draining"
)

// HealthNone is the health check type that turns probing off: the
// service's backends are always taken as up. The probed types are those of
// the health package: health.TypeTCP, health.TypeHTTP,
// health.TypeWebSocket and health.TypeUDP.
const HealthNone = "none"

// What happens to the established connections of a backend that its
// health check marks down.
const (
	// OnDownKeep keeps forwarding them: the backend may still be serving
	// them, and a client of a dead one sees its connection break (or time
	// out) by itself.
	OnDownKeep = "keep"
	// OnDownReset stops forwarding them: the datapath answers their TCP
	// packets with a reset, so that clients reconnect at once to a
	// healthy backend, and UDP flows choose a backend again.
	OnDownReset = "reset"
)

// PROXY protocol settings of a service (splice datapath only).
const (
	// ProxyProtocolNone, the default, sends the client's bytes to the
	// backend as they are: the backend sees the balancer as the client.
	// The file may say "none"; it is kept as "".
	ProxyProtocolNone = ""
	// ProxyProtocolV2 sends a PROXY protocol version 2 header first, with
	// the client's address and port and the VIP.
	ProxyProtocolV2 = "v2"
)

// MaxRiseFall bounds a health check's rise and fall.
const MaxRiseFall = 1000

// Limits and defaults that callers building a Config in Go may need.
const (
	// DefaultAffinityTimeout is how long a client's backend is remembered
	// with source affinity unless the service says otherwise.
	DefaultAffinityTimeout = 3 * time.Hour
	// MaxAffinityTimeout is the longest affinity timeout accepted (30 days).
	MaxAffinityTimeout = 720 * time.Hour
	// DefaultIdleAfter is how long a connection may be quiet and count as
	// active when the service does not say.
	DefaultIdleAfter = 2 * time.Minute
	// MaxIdleTimeout is the longest idle timeout accepted (30 days).
	MaxIdleTimeout = 720 * time.Hour
	// MaxWeight is the largest backend weight accepted.
	MaxWeight = 10000
)

// Table sizes: defaults and the bounds Validate enforces.
const (
	defaultTableEntries = 1 << 20
	defaultNATEntries   = 1 << 18
	minTableEntries     = 1024
	maxTableEntries     = 1 << 27

	defaultRingSize = 65537
	minRingSize     = 251
	maxRingSize     = 1048573

	defaultMaxServices = 1024
	limitMaxServices   = 65536

	defaultMaxBackends = 4096
	limitMaxBackends   = 1<<16 - 1 // rings hold 16-bit backend ids

	defaultInsertRate = 10000 // new flows a CPU records a second
	maxInsertRate     = 1 << 24
)

// Bounds of the splice settings.
const (
	maxSpliceLoops       = 1024
	maxSpliceConnections = 1 << 24
)

// Config is a whole tether configuration, as read from its YAML file.
// A Config returned by Parse or Load has its defaults applied and is valid.
type Config struct {
	// Interfaces are the network interfaces the XDP program attaches to.
	// Required unless Datapath is DatapathSplice.
	Interfaces []string
	// Datapath is one of DatapathAuto, DatapathXDP, DatapathXDPGeneric or
	// DatapathSplice.
	Datapath string
	// HashSeed seeds the flow hash. Hosts sharing a VIP through ECMP must use
	// the same seed; the default is maglev.DefaultSeed.
	HashSeed uint32
	// Tables sizes the BPF maps.
	Tables Tables
	// Splice tunes the userspace proxy (datapath splice, or auto's
	// fallback to it).
	Splice Splice
	// Services are the load-balanced services, in file order.
	Services []Service
	// BGP is the BGP speaker that announces the VIPs; nil runs none.
	BGP *BGP
	// Sync shares connection and affinity entries with the other hosts;
	// nil shares none.
	Sync *Sync
}

// Tables sizes the BPF maps. The sizes are fixed when the maps are created:
// changing them needs the maps recreated, which drops the connection state.
type Tables struct {
	// Connections is the number of entries of the LRU connection table.
	Connections uint32
	// NAT is the number of entries of the LRU translation table of each
	// family: the nat and fullnat connections it keeps at once (beyond
	// them the least recently used lose their translation).
	NAT uint32
	// Affinity is the number of entries of the LRU source-affinity table.
	Affinity uint32
	// RingSize is the size of each service's Maglev ring; it must be prime
	// and should be well above 100 times the largest backend count.
	RingSize uint32
	// MaxServices is the number of services the maps hold.
	MaxServices uint32
	// MaxBackends is the number of backends the maps hold, over all services.
	MaxBackends uint32
	// InsertRate is the most new flows each CPU records a second in the
	// connection, affinity and translation tables (the insertion guard:
	// a flood of spoofed packets cannot evict established entries faster);
	// 0 sets no limit. Past it dsr, ipip and gue flows are forwarded by the
	// ring unrecorded and nat and fullnat flows are dropped.
	InsertRate uint32
}

// Splice tunes the userspace proxy. Its settings take effect at start.
type Splice struct {
	// Loops is the number of event loops, each with its own epoll set and
	// listening sockets; 0 (the default) runs one per CPU (GOMAXPROCS), as
	// HAProxy runs a thread per CPU.
	Loops int
	// MaxConnections caps the connections proxied at once, over all
	// services: a client beyond it is reset and counted
	// (reset_conn_limit). 0 (the default) sets no cap but the process's
	// file descriptor limit (two per connection).
	MaxConnections int
}

// Service is one virtual service: a VIP, port and protocol balanced over a
// set of backends.
type Service struct {
	// Name identifies the service in the CLI, the API and the metrics.
	Name string
	// VIP is the virtual IP address clients connect to, IPv4 or IPv6.
	VIP netip.Addr
	// Port is the service's TCP or UDP port.
	Port uint16
	// Protocol is ProtocolTCP or ProtocolUDP.
	Protocol string
	// Affinity is AffinitySource or AffinityConnection.
	Affinity string
	// AffinityTimeout is how long an idle client keeps its backend with
	// source affinity; unused with connection affinity.
	AffinityTimeout time.Duration
	// Forwarding is the forwarding mode: ForwardingDSR, ForwardingNAT,
	// ForwardingFullNAT, ForwardingIPIP or ForwardingGUE.
	Forwarding string
	// SNATAddress is the address fullnat connections reach the backends
	// from; unset, the address of the interface that reaches each backend
	// (the kernel's preferred source towards it). Only with
	// ForwardingFullNAT.
	SNATAddress netip.Addr
	// TunnelSource is where ipip and gue packets come from, an address or
	// a prefix whose low bits (at most 32) vary per flow, so that backends'
	// NICs spread flows over their queues; it must be routed back to this
	// host (or at least not dropped by the network). Unset, the address of
	// the interface that reaches each backend. Only with ForwardingIPIP and
	// ForwardingGUE.
	TunnelSource netip.Prefix
	// GUEPort is the outer UDP destination port of gue packets: 0 means
	// DefaultGUEPort. Only with ForwardingGUE.
	GUEPort uint16
	// Health is how the service's backends are probed: a health.Check with
	// its defaults applied (DefaultHealth when the file has no health
	// block), or one of Type HealthNone and no other field set, which
	// probes nothing and takes every backend as up.
	Health health.Check
	// ICMPEcho is ICMPEchoReply or ICMPEchoPass.
	ICMPEcho string
	// MinHealthy is how many usable backends (up, not drained) the
	// service needs for BGP to announce its VIP from this host (a VIP is
	// announced while one of its services has them); 0 announces it
	// whatever its backends.
	MinHealthy int
	// OnDown is OnDownKeep or OnDownReset: what becomes of the established
	// connections of a backend marked down.
	OnDown string
	// IdleTimeout, if positive, closes a connection through which nothing
	// moved either way for that long. Only the splice datapath honours it
	// (the XDP datapath tracks flows, it does not end them); 0, the
	// default, never closes a connection for being idle.
	IdleTimeout time.Duration
	// IdleAfter is how long a connection may send nothing and still count
	// as active: one quieter is counted idle (and, on a down backend, lost).
	// It changes counts only, never a connection. 0 is DefaultIdleAfter.
	IdleAfter time.Duration
	// ProxyProtocol is ProxyProtocolNone ("", written none) or ProxyProtocolV2: whether the
	// splice datapath tells the backend the client's address with a PROXY
	// protocol v2 header. Only the splice datapath supports v2.
	ProxyProtocol string
	// Backends are the servers behind the VIP, in file order. A service may
	// have none, or none usable: new TCP connections are then refused with
	// a reset and UDP packets dropped.
	Backends []Backend
}

// DefaultHealth is the check of a TCP service whose file has no health
// block: a TCP connect every 2s with a timeout of 1s, rise 2 and fall 3
// (see health.Check.Defaults).
func DefaultHealth() health.Check { return health.Check{}.Defaults() }

// DefaultHealthFor is the check of a service of the protocol whose file (or
// API request) has no health block: DefaultHealth for tcp, none for udp.
// A UDP service answers no probe that would mean the same for every UDP
// protocol, and an arbitrary datagram may be taken for a bad request by
// the backend: a udp check (health.TypeUDP) is offered, not imposed.
func DefaultHealthFor(protocol string) health.Check {
	if protocol == ProtocolUDP {
		return health.Check{Type: HealthNone}
	}
	return DefaultHealth()
}

// Target returns the health target that probes backend b of s, or false
// when s probes nothing (health type none). A check via vip of a dsr,
// ipip or gue service probes the VIP along the clients' path; nat and
// fullnat clients reach the backend's own address, which it probes.
func (s Service) Target(b Backend) (health.Target, bool) {
	if s.Health.Type == HealthNone {
		return health.Target{}, false
	}
	t := health.Target{Addr: netip.AddrPortFrom(b.Address, b.Port), Check: s.Check()}
	if t.Check.Via == health.ViaVIP {
		t.VIP, t.Protocol = netip.AddrPortFrom(s.VIP, s.Port), s.Protocol
	}
	return t, true
}

// Check is the check s probes its backends with, as it runs: its health
// block with the defaults applied, and a check via vip of a nat or
// fullnat service the plain one, since their clients' packets reach the
// backend at its own address and port.
func (s Service) Check() health.Check {
	c := s.Health
	if c.Type != HealthNone {
		c = c.Defaults()
	}
	if c.Via == health.ViaVIP && (s.Forwarding == ForwardingNAT || s.Forwarding == ForwardingFullNAT) {
		c.Via = ""
	}
	return c
}

// Key returns the identity of the service on the wire, "vip:port/protocol",
// such as "203.0.113.10:8765/tcp" or "[2001:db8::10]:8765/tcp".
func (s Service) Key() string {
	return netip.AddrPortFrom(s.VIP, s.Port).String() + "/" + s.Protocol
}

// ProtoNumber returns the IP protocol number of the service: 6 for TCP, 17
// for UDP and 0 for an unknown protocol.
func (s Service) ProtoNumber() uint8 {
	switch s.Protocol {
	case ProtocolTCP:
		return 6
	case ProtocolUDP:
		return 17
	}
	return 0
}

// Backend is one server behind a service.
type Backend struct {
	// Address is the backend's IP address, of the same family as the VIP.
	Address netip.Addr
	// Port is the backend's port; with dsr forwarding on the XDP
	// datapath it equals the service port; nat, fullnat and the splice
	// datapath map the service port to any.
	Port uint16
	// Weight is the backend's share of new clients, 0..MaxWeight; 0 means
	// drained: it keeps its clients but takes no new ones.
	Weight uint32
	// State is StateActive or StateDraining.
	State string
	// CloseAt, on a draining backend, is when its remaining connections
	// are closed, CloseRate of them a second (a paced drain): each client
	// reconnects to another backend, a few at a time instead of all at
	// once. Zero: the drain waits for the clients to leave.
	CloseAt   time.Time
	CloseRate int
}

// DefaultCloseRate is how many connections a second a paced drain closes
// when it is not told.
const DefaultCloseRate = 50

// MaxCloseRate bounds a paced drain's rate.
const MaxCloseRate = 1000000

// Key returns the identity of the backend, "address:port", such as
// "192.0.2.11:8765" or "[2001:db8::11]:8765".
func (b Backend) Key() string {
	return netip.AddrPortFrom(b.Address, b.Port).String()
}

// Default returns a configuration with every default applied and no
// services. It does not validate as it is: it needs interfaces, or the
// splice datapath.
func Default() *Config {
	return &Config{
		Datapath: DatapathAuto,
		HashSeed: maglev.DefaultSeed,
		Tables: Tables{
			Connections: defaultTableEntries,
			NAT:         defaultNATEntries,
			Affinity:    defaultTableEntries,
			RingSize:    defaultRingSize,
			MaxServices: defaultMaxServices,
			MaxBackends: defaultMaxBackends,
			InsertRate:  defaultInsertRate,
		},
	}
}

// Clone returns a deep copy of c, which the caller may change without
// touching c.
func (c *Config) Clone() *Config {
	if c == nil {
		return nil
	}
	out := *c
	out.Interfaces = slices.Clone(c.Interfaces)
	out.Services = slices.Clone(c.Services)
	out.BGP = c.BGP.Clone()
	out.Sync = c.Sync.Clone()
	for i := range out.Services {
		out.Services[i].Backends = slices.Clone(out.Services[i].Backends)
	}
	return &out
}

// QuietAfter is IdleAfter, or DefaultIdleAfter when it is 0.
func (s Service) QuietAfter() time.Duration {
	if s.IdleAfter > 0 {
		return s.IdleAfter
	}
	return DefaultIdleAfter
}

// DefaultService returns a service with the defaults of its optional
// fields, as the file and the API give them.
func DefaultService() Service {
	return Service{
		Protocol:        ProtocolTCP,
		Affinity:        AffinitySource,
		AffinityTimeout: DefaultAffinityTimeout,
		Forwarding:      ForwardingDSR,
		Health:          DefaultHealth(),
		OnDown:          OnDownKeep,
		ICMPEcho:        ICMPEchoReply,
		MinHealthy:      DefaultMinHealthy,
	}
}

// defaultBackend returns a backend with the defaults of its optional fields;
// its port, which defaults to the service port, is filled in later.
func defaultBackend() Backend {
	return Backend{Weight: 1, State: StateActive}
}

// index returns the path of the i-th element of the list at path.
func index(path string, i int) string {
	return path + "[" + strconv.Itoa(i) + "]"
}

// field returns the path of the field name of the mapping at path.
func field(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}
