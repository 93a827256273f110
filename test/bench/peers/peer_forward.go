package main

import (
	"net"

	"github.com/tetherlb/tether/test/bench/pktgen"
)

// Packet-rate references: what the lab's wire carries through the
// balancer host with the least work (a trivial XDP program forwarding to
// one backend), and through the kernel's own IP forwarding.
func init() {
	register(Peer{
		Name:  "trivial XDP forwarder (lab limit)",
		Order: 1,
		Rows:  RowPackets | RowStreams,
		XDP:   true,
		Role:  RoleTrivial,
		Note:  "an XDP program that rewrites the Ethernet addresses of every frame to the VIP toward backend 1 and returns XDP_TX: the floor of any XDP balancer in this lab, and what XDP on a veth costs the stream rows",
		Start: func(e *Env) (Running, error) { return noProcess(startTrivialXDP(e)) },
	})
	register(Peer{
		Name:           "stateless XDP forwarder (3 backends)",
		Order:          3,
		Rows:           RowPackets | RowStreams,
		XDP:            true,
		SourceAffinity: true,
		Role:           RoleStateless,
		Note:           "the trivial forwarder over every backend: the backend is the client's IPv4 address modulo their number, and nothing is remembered: the floor of a balancer that spreads clients as tether does, where the trivial forwarder loads one backend only",
		Start:          func(e *Env) (Running, error) { return noProcess(startStatelessXDP(e)) },
	})
	register(Peer{
		Name:  "kernel IP forwarding",
		Order: 2,
		Rows:  RowPackets,
		Role:  RoleKernel,
		Note:  "`ip_forward=1`, a /32 route for the VIP via backend 1: no balancing",
		Start: func(e *Env) (Running, error) { return noProcess(startKernelForwarding(e)) },
	})
}

func startTrivialXDP(e *Env) (func() error, error) {
	return startForwarder(e, "the trivial forwarder", func() (*pktgen.Forwarder, error) {
		return pktgen.AttachVIPForwarder(e.Lab.Balancer.Ifindex, e.VIP, e.Lab.Balancer.MAC, e.Lab.Backends[0].MAC)
	})
}

func startStatelessXDP(e *Env) (func() error, error) {
	var macs []net.HardwareAddr
	for _, be := range e.Lab.Backends {
		macs = append(macs, be.MAC)
	}
	return startForwarder(e, "the stateless forwarder", func() (*pktgen.Forwarder, error) {
		return pktgen.AttachSpreadForwarder(e.Lab.Balancer.Ifindex, e.VIP, e.Lab.Balancer.MAC, macs)
	})
}

// startForwarder attaches a forwarder in the balancer's namespace and
// waits until the VIP answers through it.
func startForwarder(e *Env, name string, attach func() (*pktgen.Forwarder, error)) (func() error, error) {
	var fw *pktgen.Forwarder
	err := e.Lab.Balancer.Do(func() error {
		var err error
		fw, err = attach()
		return err
	})
	if err != nil {
		return nil, err
	}
	if err := e.WaitServing(nil, name); err != nil {
		return nil, joinErr(err, fw.Close())
	}
	return fw.Close, nil
}

func startKernelForwarding(e *Env) (func() error, error) {
	return startKernelPeer(e, false, func() (func() error, error) {
		fwd, err := e.Forwarding()
		if err != nil {
			return nil, err
		}
		route := []string{"route", "add", e.VIP.String() + "/32", "via", e.Lab.Backends[0].Addr4.String(), "dev", "eth0"}
		if err := e.Lab.Balancer.Run("ip", route...); err != nil {
			return nil, joinErr(err, fwd())
		}
		return undo(fwd, func() error {
			route[0], route[1] = "route", "del"
			return e.Lab.Balancer.Run("ip", route...)
		}), nil
	})
}
