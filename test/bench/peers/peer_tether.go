package main

import (
	"fmt"
	"path/filepath"
	"strings"
)

// tether in its two datapaths, with the same services: WebSocket and
// iperf3 over TCP, and (XDP only) the UDP packet service, all with source
// affinity and no health checks (the other balancers run none either).
func init() {
	register(Peer{
		Name:           "tether (XDP)",
		Order:          10,
		Role:           RoleTetherXDP,
		Rows:           RowPackets | RowStreams,
		XDP:            true,
		SourceAffinity: true,
		Tether:         true,
		Note:           "`datapath: xdp` on the balancer's eth0, `affinity: source`; backends answer clients directly (DSR)",
		Start:          func(e *Env) (func() error, error) { return startTether(e, "xdp") },
	})
	register(Peer{
		Name:           "tether (splice)",
		Order:          11,
		Role:           RoleTetherSplice,
		Rows:           RowStreams,
		SourceAffinity: true,
		Tether:         true,
		Note:           "`datapath: splice`, `affinity: source`: the userspace proxy",
		Start:          func(e *Env) (func() error, error) { return startTether(e, "splice") },
	})
}

func startTether(e *Env, datapath string) (func() error, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "interfaces: [eth0]\ndatapath: %s\ntables:\n  connections: 262144\n  affinity: 65536\nservices:\n", datapath)
	service := func(name string, port int, proto string) {
		fmt.Fprintf(&b, "  - name: %s\n    vip: %s\n    port: %d\n    protocol: %s\n    affinity: source\n    affinity_timeout: 1h\n    health: {type: none}\n    backends:\n", name, e.VIP, port, proto)
		for _, a := range e.BackendAddrs {
			fmt.Fprintf(&b, "      - address: %s\n", a)
		}
	}
	service("ws", portWS, "tcp")
	service("bulk", portBulk, "tcp")
	if datapath == "xdp" {
		service("packets", portUDP, "udp")
	}
	cfg, err := e.File("tether-"+datapath+".yaml", b.String())
	if err != nil {
		return nil, err
	}
	dir := filepath.Dir(cfg)
	sock := filepath.Join(dir, fmt.Sprintf("tether-%s-%d.sock", datapath, e.round))
	p, err := e.Lab.Balancer.Start(e.Tether, "run", "--config", cfg, "--socket", sock, "--pin-dir", e.Pins, "--log-level", "warn")
	if err != nil {
		return nil, err
	}
	stop := undo(
		// SIGTERM leaves the XDP program forwarding (that is how tether
		// restarts without dropping connections); detach it for the
		// next peer.
		func() error { return e.Lab.Balancer.Run(e.Tether, "detach", "--pin-dir", e.Pins) },
		p.Stop,
	)
	if err := e.WaitServing(p, "tether"); err != nil {
		return nil, joinErr(err, stop())
	}
	return stop, nil
}
