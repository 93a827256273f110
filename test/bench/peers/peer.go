package main

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
)

// Rows says which measurements a peer takes part in.
type Rows uint8

const (
	// RowPackets: small UDP packets from the client, counted at the
	// backends (a packet forwarder, not a proxy).
	RowPackets Rows = 1 << iota
	// RowStreams: WebSocket connection rate, echo latency, affinity and
	// iperf3 bulk throughput (TCP).
	RowStreams
	// RowProxy: what a proxy costs (see proxy.go): raw TCP throughput
	// and connection rate with Go clients, the connection rate of wrk
	// against nginx backends, and the balancer process's CPU time,
	// context switches and system calls per connection.
	RowProxy
)

// Role is what the report compares a peer as; most peers are one of a
// kind.
type Role uint8

const (
	RoleOther         Role = iota
	RoleTrivial            // the trivial XDP forwarder: the lab's floor
	RoleTetherXDP          // tether with its XDP datapath
	RoleTetherSplice       // tether with its splice datapath
	RoleHAProxy            // HAProxy, the proxy tether's splice datapath must match
	RoleNginx              // nginx, likewise
	RoleKernel             // the kernel's forwarding and its IPVS stand-ins
	RoleCompare            // another tether build (-compare), against tether (splice)
	RoleTetherNAT          // tether's XDP datapath with forwarding nat
	RoleTetherFullNAT      // tether's XDP datapath with forwarding fullnat
	RoleTetherEncap        // tether's XDP datapath with forwarding ipip or gue
	RoleStateless          // the stateless XDP forwarder over every backend
)

// A Peer is one balancer setup in front of the lab's backends. Each lives
// in a file of its own (peer_*.go) and registers itself in init; adding a
// peer is adding such a file.
type Peer struct {
	// Name is what the results call it.
	Name string
	// Order places it in the tables (the reference first, tether next).
	Order int
	// Rows are the measurements it takes part in.
	Rows Rows
	// XDP is set when it runs an XDP program on the balancer's eth0, which
	// in the lab needs an XDP program on the other end of the veth too (see
	// lab.SetPortXDP). Others get an ordinary port, as on a real NIC.
	XDP bool
	// SourceAffinity is set when every connection of a client address must
	// reach the same backend: the affinity check then requires that none
	// reached two.
	SourceAffinity bool
	// Direct is set for the reference: no balancer, the client connects to
	// one backend's own address.
	Direct bool
	// Tether marks tether's own setups (drawn highlighted).
	Tether bool
	// Encap is the forwarding mode of a tether that encapsulates (ipip,
	// gue): its backends decapsulate with an XDP program, which the packet
	// rows' counter replaces while they run.
	Encap string
	// Role is what the report compares it as (RoleOther: only its rows).
	Role Role
	// Version is the command that prints the version of the program it
	// runs, if any: checked before the run, quoted in the results.
	Version []string
	// Note says how the peer is set up, for the results.
	Note string
	// Start sets the peer up on the balancer host and returns once it
	// serves; its Stop undoes everything Start did. Start must clean up
	// after itself when it fails.
	Start func(e *Env) (Running, error)
}

// Running is a started peer.
type Running struct {
	// Stop undoes everything Start did.
	Stop func() error
	// PID is the balancer's process (its main one, whose children count
	// too), 0 for a peer without one (the kernel's, XDP programs).
	PID int
}

// noProcess is a Running of a peer without a process of its own.
func noProcess(stop func() error, err error) (Running, error) {
	return Running{Stop: stop}, err
}

var peers []Peer

func register(p Peer) {
	if p.Name == "" || p.Start == nil || p.Rows == 0 {
		panic(fmt.Sprintf("peer %q: Name, Start and Rows are required", p.Name))
	}
	if slices.ContainsFunc(peers, func(q Peer) bool { return q.Name == p.Name }) {
		panic("peer registered twice: " + p.Name)
	}
	peers = append(peers, p)
	sort.SliceStable(peers, func(i, j int) bool { return peers[i].Order < peers[j].Order })
}

// target is where a client connects for port: the VIP, or for the direct
// reference the first backend's own address.
func (p Peer) target(e *Env, port uint16) netip.AddrPort {
	if p.Direct {
		return netip.AddrPortFrom(e.Lab.Backends[0].Addr4, port)
	}
	return netip.AddrPortFrom(e.VIP, port)
}
