package main

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/test/bench/pktgen"
)

// Generator settings: source addresses and ports the frames cycle over.
const (
	genSources = 64
	genPorts   = 256
	frameSize  = 64
)

// wireResult is one packet-rate measurement.
type wireResult struct {
	sent, received uint64
	elapsed        time.Duration
	// ns per run of the balancer's XDP program under this traffic, from
	// the kernel's BPF run-time statistics (0 for peers without XDP).
	progNs float64
}

func (r wireResult) mpps() float64 {
	if r.elapsed <= 0 {
		return 0
	}
	return float64(r.received) / r.elapsed.Seconds() / 1e6
}

// wire sends count small UDP frames from the client through the balancer
// and counts them at the backends. For peers with XDP it then sends
// another statCount with the kernel's BPF run-time statistics on, and
// reads the balancer program's cost per run (kept apart because the
// statistics slow every program down).
func wire(e *Env, p Peer, gen *pktgen.Generator, count, statCount uint32) (_ wireResult, err error) {
	var res wireResult
	if err := e.Lab.SetPortXDP(e.Lab.Client, true); err != nil {
		return res, err
	}
	defer e.Lab.SetPortXDP(e.Lab.Client, false)

	// Behind an encapsulating tether the counters take the place of the
	// backends' decapsulation and count the encapsulated frames.
	if p.Encap != "" {
		if err := e.undecap(); err != nil {
			return res, err
		}
		// Restored once the counters are gone (deferred before them).
		defer func() {
			if derr := e.decap(e.Tether, p.Encap); derr != nil && err == nil {
				err = derr
			}
		}()
	}
	var counters []*pktgen.Counter
	defer func() {
		for _, c := range counters {
			c.Close()
		}
	}()
	for _, be := range e.Lab.Backends {
		err := be.Do(func() error {
			var c *pktgen.Counter
			var err error
			switch p.Encap {
			case "ipip":
				c, err = pktgen.AttachIPIPCounter(be.Ifindex)
			case "gue":
				c, err = pktgen.AttachCounter(be.Ifindex, datapath.DefaultGUEPort)
			default:
				c, err = pktgen.AttachCounter(be.Ifindex, portUDP)
			}
			if err == nil {
				counters = append(counters, c)
			}
			return err
		})
		if err != nil {
			return res, fmt.Errorf("counter on %s: %w", be.Name, err)
		}
	}
	received := func() (uint64, error) {
		var n uint64
		for _, c := range counters {
			k, err := c.Count()
			if err != nil {
				return 0, err
			}
			n += k
		}
		return n, nil
	}
	frame := pktgen.UDPFrame(e.Lab.Client.MAC, e.Lab.Balancer.MAC,
		netip.AddrPortFrom(e.Lab.ClientAddrs4[0], 1024), netip.AddrPortFrom(e.VIP, portUDP), frameSize)
	send := func(n uint32) (time.Duration, error) {
		var el time.Duration
		err := e.Lab.Client.Do(func() error {
			var err error
			el, err = gen.Send(e.Lab.Client.Ifindex, frame, n)
			return err
		})
		time.Sleep(200 * time.Millisecond) // let the queues drain
		return el, err
	}
	// A short warm-up lets tether and conntrack learn the flows.
	if _, err := send(min(count, 100_000)); err != nil {
		return res, err
	}
	before, err := received()
	if err != nil {
		return res, err
	}
	if res.elapsed, err = send(count); err != nil {
		return res, err
	}
	after, err := received()
	if err != nil {
		return res, err
	}
	res.sent, res.received = uint64(count), after-before

	if !p.XDP || statCount == 0 {
		return res, nil
	}
	var id ebpf.ProgramID
	if err := e.Lab.Balancer.Do(func() error {
		var err error
		id, err = pktgen.XDPProgramID(e.Lab.Balancer.Ifindex)
		return err
	}); err != nil {
		return res, err
	}
	stats, err := pktgen.EnableRunStats()
	if err != nil {
		return res, err
	}
	defer stats.Close()
	res.progNs, _, err = pktgen.TimeRuns(id, func() error {
		_, err := send(statCount)
		return err
	})
	return res, err
}
