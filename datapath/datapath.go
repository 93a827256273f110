// Package datapath is the contract between tether's control plane and the
// datapaths that forward packets: the XDP program (loader.XDP) and the
// userspace splice proxy. The control plane computes everything (ids,
// Maglev rings, backend states) and hands a datapath whole services; a
// datapath applies a service all at once or not at all.
package datapath

import (
	"errors"
	"net/netip"
	"time"
)

// State is a backend's state as a datapath applies it.
type State uint8

// Backend states.
const (
	// Active backends are in the ring and take new connections.
	Active State = 1
	// Draining backends are out of the ring; their established connections
	// keep flowing, and affinity no longer sends new connections to them.
	Draining State = 2
	// Down backends are out of the ring and affinity entries to them are
	// ignored; established connections keep flowing.
	Down State = 3
)

func (s State) String() string {
	switch s {
	case Active:
		return "active"
	case Draining:
		return "draining"
	case Down:
		return "down"
	}
	return "unknown"
}

// Forwarding is how a datapath sends a service's packets to its backends
// (the configuration's names).
type Forwarding string

// Forwarding modes.
const (
	// DSR: the frame goes to the backend as it came, with new MAC
	// addresses; the backend holds the VIP and answers the client itself.
	DSR Forwarding = "dsr"
	// NAT: the destination becomes the backend's address and port; the
	// backend's replies come back through the balancer, which translates
	// them.
	NAT Forwarding = "nat"
	// FullNAT: the source becomes the balancer's address and a port of
	// the connection's, too.
	FullNAT Forwarding = "fullnat"
	// IPIP: the packet goes to the backend whole, inside an outer IP
	// header addressed to it; the backend decapsulates it, holds the VIP
	// and answers the client itself.
	IPIP Forwarding = "ipip"
	// GUE: as IPIP, inside an outer IP and UDP header (GUE variant 1,
	// direct IP encapsulation), which a backend's fou socket takes.
	GUE Forwarding = "gue"
)

// DefaultGUEPort is the outer UDP destination port of GUE packets when a
// service sets none.
const DefaultGUEPort = 6080

// Encapsulates says whether forwarding mode f wraps packets in an outer
// header (IPIP, GUE).
func (f Forwarding) Encapsulates() bool { return f == IPIP || f == GUE }

// Backend is a backend of one service. Its ID is unique over all services.
type Backend struct {
	ID     uint32
	Addr   netip.Addr
	Port   uint16
	Weight uint32
	State  State
}

// Service is a service with everything a datapath needs to serve it.
type Service struct {
	ID              uint32
	Name            string
	VIP             netip.Addr
	Port            uint16
	Proto           uint8 // 6 (TCP) or 17 (UDP)
	SourceAffinity  bool
	AffinityTimeout time.Duration
	// OnDownReset makes the datapath answer the packets of established
	// connections to a Down backend with a TCP reset, so that clients
	// reconnect at once instead of waiting for their own timeouts.
	OnDownReset bool
	// Forwarding is the service's forwarding mode ("" means DSR). A
	// proxy (the splice datapath) connects to the backends whatever it is.
	Forwarding Forwarding
	// SNATAddress is where FullNAT connections come from; unset, the
	// datapath uses each backend's preferred source address.
	SNATAddress netip.Addr
	// TunnelSource is where IPIP and GUE packets come from: per flow, the
	// prefix's low bits (at most 32) vary, so that a backend's NIC spreads
	// flows over its queues. Unset, the datapath uses each backend's
	// preferred source address, the same for every flow.
	TunnelSource netip.Prefix
	// GUEPort is the outer UDP destination port of GUE packets (0:
	// DefaultGUEPort).
	GUEPort uint16
	// Share hands the service's new flows to the datapath's reader of
	// new flows (Sharer), for the other hosts (package flowsync). The
	// control plane sets it for dsr, ipip and gue services while the
	// configuration has a sync block.
	Share bool
	// EchoReply makes the datapath answer ICMP echo requests to the VIP
	// (any service of the VIP that says so does); the kernel gets them
	// otherwise. A proxy leaves them to the kernel whatever it says.
	EchoReply bool
	// IdleTimeout, if positive, closes a connection idle either way for
	// that long, and ProxyProtocol sends the backend a PROXY protocol v2
	// header first. Only the splice datapath has connections of its own
	// to close or headers to send; the XDP datapath ignores both.
	IdleTimeout   time.Duration
	ProxyProtocol bool
	Backends      []Backend
	// Ring is the Maglev ring of backend IDs (0: no backend). The control
	// plane sends a service's ring when it changes and keeps no copy: with
	// KeepRing set, Ring is nil and the datapath keeps the ring it has for
	// the service (which it must have), while the other fields change.
	Ring     []uint32
	KeepRing bool
	// RingSignature is the control plane's signature of what Ring is
	// built from (0: none). A datapath whose state outlives the daemon
	// stores it with the service and gives it back with the adopted
	// service, so that the next daemon keeps a ring it would build alike
	// instead of building it to compare.
	RingSignature uint64
}

// BackendCounters are a backend's counters since its ID was assigned.
type BackendCounters struct {
	Packets  uint64 `json:"packets"`
	Bytes    uint64 `json:"bytes"`
	NewConns uint64 `json:"new_connections"`
}

// ServiceCounters are a service's counters.
type ServiceCounters struct {
	NewConns       uint64 `json:"new_connections"`
	AffinityHits   uint64 `json:"affinity_hits"`
	AffinityMisses uint64 `json:"affinity_misses"`
}

// Counters is a snapshot of a datapath's counters.
type Counters struct {
	Services map[uint32]ServiceCounters `json:"services"`
	Backends map[uint32]BackendCounters `json:"backends"`
	// Reasons counts packets passed to the kernel or dropped, by reason.
	Reasons map[string]uint64 `json:"reasons"`
	// Unrecorded counts packets of new flows forwarded without their flow
	// being recorded (XDP's insertion guard, tables.insert_rate).
	Unrecorded uint64 `json:"unrecorded,omitempty"`
}

// Flow is one tracked connection.
type Flow struct {
	Client  netip.AddrPort `json:"client"`
	VIP     netip.AddrPort `json:"vip"`
	Proto   uint8          `json:"proto"`
	Service uint32         `json:"service"`
	Backend uint32         `json:"backend"`
	// Closing is set once a FIN or RST was seen: the flow is ending and no
	// longer counts as an active connection.
	Closing bool `json:"closing"`
	// Learned is set on an entry another host made (sync) until the
	// flow's first packet here: it is that host's connection, not counted
	// active here.
	Learned bool `json:"learned,omitempty"`
	// Idle is how long ago the flow's last packet came (XDP: to about a
	// second; 0 within the last second, or when the datapath does not
	// know: an entry an earlier tether or another host made).
	Idle time.Duration `json:"idle,omitempty"`
}

// Datapath forwards the traffic of services to their backends. What a
// datapath needs at start and stop beyond Close is said by the optional
// interfaces Adopter and Remover, as TableReader says it counts its tables.
type Datapath interface {
	// Modes says how the datapath runs, per interface ("eth0" → "xdp").
	Modes() map[string]string
	// UpsertService creates or replaces a service whole.
	UpsertService(Service) error
	// DeleteService stops serving a service.
	DeleteService(Service) error
	// Counters reads the counters of every service and backend.
	Counters() (Counters, error)
	// Flows lists the tracked connections.
	Flows() ([]Flow, error)
	// Close stops forwarding and releases the datapath.
	Close() error
}

// Table is how full one of a datapath's tables is.
type Table struct {
	// Name is the table's name, such as "connections_ipv4" or "affinity".
	Name string `json:"name"`
	// Entries is the number of entries now; Capacity the most the table
	// holds, 0 when it has no fixed size.
	Entries  int `json:"entries"`
	Capacity int `json:"capacity"`
}

// TableReader is a Datapath that can say how full its tables are. A
// datapath that is not one has its connection table counted from Flows.
type TableReader interface {
	// Tables counts the entries of every table. Counting walks each table,
	// which for a million entries takes tens of milliseconds.
	Tables() ([]Table, error)
}

// RefusedError is a service a datapath refuses because of what it was
// given, not because it failed: a backend it cannot send to as one host
// (an address of its own, a broadcast address...). The control plane
// reports it as refused input, with nothing changed.
type RefusedError struct{ Err error }

func (e *RefusedError) Error() string { return e.Err.Error() }
func (e *RefusedError) Unwrap() error { return e.Err }

// Refuse marks err as a refusal of the input (see RefusedError).
func Refuse(err error) error {
	if err == nil {
		return nil
	}
	return &RefusedError{Err: err}
}

// Adopter is a Datapath that may start with the state an earlier daemon
// left behind (the XDP datapath's pinned maps, with their connections).
// The control plane gives the adopted services their ids again before it
// applies anything, so that no table entry points at an id given to
// another backend.
type Adopter interface {
	// Adopted says whether the datapath started with an earlier daemon's
	// state.
	Adopted() bool
	// AdoptedServices hands over the services of that state, sorted by
	// id, with their rings but without names or weights; none when it
	// started afresh. The datapath keeps no copy: a second call returns
	// none.
	AdoptedServices() []Service
}

// Resumer is a Datapath that inherited live connections from a
// predecessor process (the splice proxy handed over): it serves them only
// once Resume is called, after the configuration is applied and the
// predecessor has let go of them.
type Resumer interface {
	Resume() error
}

// Remover is a Datapath whose forwarding outlives Close: the XDP datapath
// with a pin directory stays attached with its last state, for the next
// daemon to adopt. Remove stops it for good: it detaches it and removes
// that state, which forgets every tracked connection. A Datapath that is no
// Remover stops whole at Close.
type Remover interface {
	Remove() error
}

// Resolver is a Datapath that must find each backend's link-layer address
// itself, as the XDP datapath does (direct server return sends frames to
// the backend's MAC address). The control plane asks it about every
// backend before it plans, and plans a backend it cannot reach as down,
// as a failed health check would: one host that is off does not stop a
// start or a reload, nor take its services with it.
type Resolver interface {
	// Resolve finds what it does not know yet of addrs, in parallel and
	// within a bounded time, and returns the addresses it cannot reach,
	// each with why. An error that is a RefusedError refuses the address
	// for good (no host can be reached there as a backend); any other
	// says that no host answers for it yet. An address that did not
	// answer before is not waited for again: it is retried in the
	// background, and reported to the function given to OnResolved once
	// it answers.
	Resolve(addrs []netip.Addr) map[netip.Addr]error
	// OnResolved sets fn to be called, on a goroutine of the datapath's,
	// with each address that Resolve could not reach once it answers. fn
	// must not call the datapath.
	OnResolved(fn func(netip.Addr))
}

// Sharer is a Datapath whose connection entries other hosts can share
// (package flowsync): the XDP datapath. It hands out the flows it enters
// for services with Share set, and enters the flows other hosts entered.
type Sharer interface {
	// NewFlows opens the reader of the flows entered for services with
	// Share set, in the order entered. Closing it stops the reading.
	NewFlows() (FlowReader, error)
	// Learn enters flows other hosts entered, named by this host's ids:
	// each connection entry where the table has none for the flow (this
	// host's own entries win), and with Affinity the client's affinity
	// entry for the service too. It returns how many connection entries
	// it entered.
	Learn(flows []LearnedFlow) (int, error)
	// SharedLost counts the new flows the datapath had no room to hand
	// out (the reader fell behind).
	SharedLost() (uint64, error)
}

// Closer is a Datapath that closes established connections one by one, as
// a drain with a deadline does once it has passed: the XDP datapath marks
// their entries, and its program answers each one's next TCP packet with
// a reset (a UDP flow chooses again); the splice proxy resets both of its
// sockets at once.
type Closer interface {
	// CloseFlows closes the flows it still holds as given (same client,
	// VIP, protocol, service and backend, not closing) and returns those
	// it closed.
	CloseFlows(flows []Flow) ([]Flow, error)
}

// Tracer is a Datapath that reports its decisions as they happen (tether
// trace): the XDP program each packet's, the splice proxy each
// connection's.
type Tracer interface {
	// Trace starts reporting the decisions about what filter takes, until
	// the reader is closed. One trace runs at a time: another is refused
	// with ErrTraceBusy.
	Trace(filter TraceFilter) (TraceReader, error)
}

// ErrTraceBusy refuses a trace while another runs.
var ErrTraceBusy = errors.New("a trace is running already (one at a time)")

// TraceFilter says what a trace reports.
type TraceFilter struct {
	// VIP and Proto: the packets to that address, port and protocol, or
	// from them; Service is the service's id. A zero VIP: every packet.
	Service uint32
	VIP     netip.AddrPort
	Proto   uint8
	// Client: only the packets from this address or to it. Invalid: any.
	Client netip.Addr
}

// TraceEvent is one decision of a datapath.
type TraceEvent struct {
	Time     time.Time
	Src, Dst netip.AddrPort // as the packet came (splice: client and VIP)
	Proto    uint8
	// Service and Backend are the ids of the service and backend chosen,
	// when By says what chose them.
	Service, Backend uint32
	// Verdict is what became of it: XDP "tx", "redirect", "pass", "drop"
	// or "aborted"; splice "proxy" (connected to Backend) or "reset".
	Verdict string
	// Reason is why it was not forwarded (the counters' reason names), or
	// another note ("guard_unrecorded"); empty when it was forwarded.
	Reason string
	// By is what chose the backend: "conn" (its connection entry),
	// "affinity" (its client's affinity entry), "ring" (the Maglev ring),
	// or empty.
	By string
	// Len is the frame's length as it left the XDP program, Frame its
	// first bytes (none from the splice proxy).
	Len   int
	Frame []byte
}

// TraceReader reads a trace's events.
type TraceReader interface {
	// Read waits for the next event until the deadline set, if any.
	Read() (TraceEvent, error)
	// SetDeadline makes Read return os.ErrDeadlineExceeded from t on.
	SetDeadline(t time.Time)
	// Lost counts the events the datapath had no room for.
	Lost() uint64
	// Close ends the trace; a blocked Read returns an error that is
	// os.ErrClosed.
	Close() error
}

// AffinityKeeper is a Datapath whose affinity entries the control plane
// renews for clients that hold connections: the XDP datapath, whose
// program renews a client's entry only when it makes a new connection.
type AffinityKeeper interface {
	// KeepAffinity renews, as of now, the affinity entry of each flow's
	// client for its service where the entry names the flow's backend or
	// there is none (it expired and was evicted), and returns the flows
	// whose entries it renewed. An entry that names another backend (the
	// client's newer choice) is left alone.
	KeepAffinity(flows []Flow) ([]Flow, error)
}

// FlowReader reads the new flows of a Sharer.
type FlowReader interface {
	// Read waits for the next flow until the deadline set, if any.
	Read() (Flow, error)
	// SetDeadline makes Read return os.ErrDeadlineExceeded from t on.
	SetDeadline(t time.Time)
	// Close ends the reading; a blocked Read returns an error that is
	// os.ErrClosed.
	Close() error
}

// LearnedFlow is a flow another host entered, in this host's ids.
type LearnedFlow struct {
	Flow Flow
	// Conn enters the connection entry; Encap marks it encapsulated
	// (ipip, gue), as the service's own entries are.
	Conn, Encap bool
	// Affinity enters the client's affinity entry, last used Age ago,
	// where this host has none or an older one; Dumped (an entry that
	// answers a request, whose last use is unknown) only where it has
	// none; Renewal (the other host's client still uses that backend)
	// where it has none or one naming the same backend.
	Affinity, Dumped, Renewal bool
	Age                       time.Duration
}

// Prober is a datapath that can send health probes the way its clients'
// packets go: to the service's VIP and port, rewritten or encapsulated to
// one backend as its forwarding mode says, so that a backend that answers
// on its own address but not on the VIP (VIP missing from its loopback,
// decapsulation not set up) fails them. A datapath without it serves its
// clients from the backends' own addresses (the splice proxy): a plain
// probe follows their path.
type Prober interface {
	// ProbePath returns how a probe to backend id (at addr) of a service
	// on vip that forwards with dsr, ipip or gue follows the clients'
	// path: the probe connects to the service's VIP and port from Source
	// with socket mark Mark. An error says why it cannot.
	ProbePath(id uint32, addr, vip netip.Addr) (ProbePath, error)
}

// ProbePath is how one probe follows the clients' path (see Prober).
type ProbePath struct {
	Mark   uint32
	Source netip.Addr
}
