package main

import (
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/health"
)

// tether in its two datapaths, with the same services: WebSocket, iperf3
// and the proxy rows' raw TCP and HTTP over TCP, and (XDP only) the UDP
// packet service, all with source affinity and no health checks (the other
// balancers run none either).
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
		Start:          func(e *Env) (Running, error) { return startTether(e, e.Tether, "xdp", config.ForwardingDSR) },
	})
	register(Peer{
		Name:           "tether (XDP nat)",
		Order:          13,
		Role:           RoleTetherNAT,
		Rows:           RowPackets | RowStreams,
		XDP:            true,
		SourceAffinity: true,
		Tether:         true,
		Note:           "`datapath: xdp`, `forwarding: nat`: destination rewritten to the backend's address, forwarding on, backends route replies through the balancer, which translates them",
		Start:          func(e *Env) (Running, error) { return startTether(e, e.Tether, "xdp", config.ForwardingNAT) },
	})
	register(Peer{
		Name:           "tether (XDP fullnat)",
		Order:          14,
		Role:           RoleTetherFullNAT,
		Rows:           RowPackets | RowStreams,
		XDP:            true,
		SourceAffinity: true,
		Tether:         true,
		Note:           "`datapath: xdp`, `forwarding: fullnat`: source rewritten to the balancer's address and a port of the connection's too; backends need no route or VIP",
		Start:          func(e *Env) (Running, error) { return startTether(e, e.Tether, "xdp", config.ForwardingFullNAT) },
	})
	for i, mode := range []string{config.ForwardingIPIP, config.ForwardingGUE} {
		register(Peer{
			Name:           "tether (XDP " + mode + ")",
			Order:          15 + i,
			Role:           RoleTetherEncap,
			Rows:           RowPackets | RowStreams,
			XDP:            true,
			SourceAffinity: true,
			Tether:         true,
			Encap:          mode,
			Note:           "`datapath: xdp`, `forwarding: " + mode + "`: each packet encapsulated to its backend, forwarding on; backends decapsulate with tether's XDP program (`tether backend-setup --decap xdp`, this kernel has no tunnel devices) and answer clients directly",
			Start:          func(e *Env) (Running, error) { return startTether(e, e.Tether, "xdp", mode) },
		})
	}
	register(Peer{
		Name:           "tether (splice)",
		Order:          11,
		Role:           RoleTetherSplice,
		Rows:           RowStreams | RowProxy,
		SourceAffinity: true,
		Tether:         true,
		Note:           "`datapath: splice`, `affinity: source`: the userspace proxy",
		Start:          func(e *Env) (Running, error) { return startTether(e, e.Tether, "splice", config.ForwardingDSR) },
	})
}

// registerCompare adds another tether build as one more peer, with the
// splice datapath, for the proxy rows (-compare): the drift between runs
// is larger than most changes, the drift within a run falls on all alike.
func registerCompare(bin string) {
	register(Peer{
		Name:           "tether (splice), -compare " + filepath.Base(bin),
		Order:          12,
		Role:           RoleCompare,
		Rows:           RowProxy,
		SourceAffinity: true,
		Tether:         true,
		Note:           "`datapath: splice` as tether (splice), from the build " + bin,
		Start:          func(e *Env) (Running, error) { return startTether(e, bin, "splice", config.ForwardingDSR) },
	})
}

func startTether(e *Env, bin, datapath, forwarding string) (Running, error) {
	var undos []func() error
	fail := func(err error) (Running, error) { return Running{}, joinErr(err, undo(undos...)()) }
	if forwarding != config.ForwardingDSR {
		// The program asks the kernel's FIB for the clients' next hop,
		// which answers on a forwarding host only.
		fwd, err := e.Forwarding()
		if err != nil {
			return fail(err)
		}
		undos = append(undos, fwd)
	}
	if forwarding == config.ForwardingNAT {
		via, err := e.ClientsViaBalancer()
		if err != nil {
			return fail(err)
		}
		undos = append(undos, via)
	}
	if forwarding == config.ForwardingIPIP || forwarding == config.ForwardingGUE {
		undos = append(undos, e.undecap)
		if err := e.decap(bin, forwarding); err != nil {
			return fail(err)
		}
	}
	cfg := config.Default()
	cfg.Interfaces = []string{"eth0"}
	cfg.Datapath = datapath
	cfg.Tables.Connections, cfg.Tables.Affinity = 262144, 65536
	service := func(name string, port int, proto string) {
		s := config.DefaultService()
		s.Name, s.VIP, s.Port, s.Protocol = name, e.VIP, uint16(port), proto
		s.AffinityTimeout = time.Hour
		s.Forwarding = forwarding
		s.Health = health.Check{Type: config.HealthNone}
		for _, a := range e.BackendAddrs {
			s.Backends = append(s.Backends, config.Backend{Address: a, Port: uint16(port), Weight: 1, State: config.StateActive})
		}
		cfg.Services = append(cfg.Services, s)
	}
	for _, svc := range proxiedPorts {
		service(svc.name, svc.port, config.ProtocolTCP)
	}
	if datapath == config.DatapathXDP {
		service("packets", portUDP, config.ProtocolUDP)
	}
	data, err := cfg.Marshal()
	if err != nil {
		return fail(err)
	}
	path, err := e.File("tether-"+datapath+"-"+forwarding+".yaml", string(data))
	if err != nil {
		return fail(err)
	}
	sock := filepath.Join(filepath.Dir(path), fmt.Sprintf("tether-%s-%s-%d.sock", datapath, forwarding, e.round))
	p, err := e.Lab.Balancer.Start(bin, "run", "--config", path, "--socket", sock, "--pin-dir", e.Pins, "--log-level", "warn")
	if err != nil {
		return fail(err)
	}
	stop := undo(append(undos,
		// SIGTERM leaves the XDP program forwarding (that is how tether
		// restarts without dropping connections); detach it for the
		// next peer.
		func() error { return e.Lab.Balancer.Run(e.Tether, "detach", "--pin-dir", e.Pins) },
		p.Stop,
	)...)
	if err := e.WaitServing(p, "tether"); err != nil {
		return Running{}, joinErr(err, stop())
	}
	return Running{Stop: stop, PID: p.Cmd.Process.Pid}, nil
}

// decap readies the backends for an encapsulating tether's packets, as an
// operator would: tether backend-setup with its XDP decapsulation.
func (e *Env) decap(bin, forwarding string) error {
	for _, be := range e.Lab.Backends {
		if err := be.Run(bin, "backend-setup", "--forwarding", forwarding, "--decap", "xdp", "--interface", "eth0", "--apply", e.VIP.String()); err != nil {
			return err
		}
	}
	return nil
}

// undecap removes the backends' decapsulation program.
func (e *Env) undecap() error {
	var errs []error
	for _, be := range e.Lab.Backends {
		errs = append(errs, be.Run("ip", "link", "set", "dev", "eth0", "xdp", "off"))
	}
	return errors.Join(errs...)
}
