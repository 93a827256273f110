package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/test/bench/benchrun"
)

// affinity records which backends each client address reached.
type affinity struct {
	mu   sync.Mutex
	seen map[netip.Addr]map[string]int
}

func newAffinity() *affinity { return &affinity{seen: map[netip.Addr]map[string]int{}} }

func (a *affinity) add(client netip.Addr, backend string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	m := a.seen[client]
	if m == nil {
		m = map[string]int{}
		a.seen[client] = m
	}
	m[backend]++
}

// split returns how many client addresses were seen and how many of them
// reached more than one backend.
func (a *affinity) split() (clients, moved int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, m := range a.seen {
		clients++
		if len(m) > 1 {
			moved++
		}
	}
	return clients, moved
}

// spread returns the connections per backend, by backend name.
func (a *affinity) spread() map[string]int {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := map[string]int{}
	for _, m := range a.seen {
		for be, n := range m {
			out[be] += n
		}
	}
	return out
}

func (e *Env) wsURL(p Peer) string {
	return fmt.Sprintf("ws://%s/", p.target(e, portWS))
}

// connRate opens n WebSocket connections over workers workers, each from
// the next client address: handshake, one echo, close. It returns
// connections per second (those that succeeded) and the number that
// failed.
func connRate(e *Env, p Peer, aff *affinity, n, workers int) (rate float64, failed int) {
	rate, failed, err := benchrun.WSConnRate(e.Lab.Client, e.Lab.ClientAddrs4, e.wsURL(p), n, workers, opLimit, aff.add)
	if err != nil {
		logf("%s: a connection failed: %v", p.Name, err)
	}
	return rate, failed
}

// openHeld opens n WebSocket connections over 16 dialers, each from the
// next client address counting down, and returns them (nil where one
// failed) and how many failed.
func openHeld(e *Env, p Peer, aff *affinity, n int) (conns []*lab.WSClient, failed int) {
	url := e.wsURL(p)
	addrs := e.Lab.ClientAddrs4
	conns = make([]*lab.WSClient, n)
	var bad atomic.Int64
	var wg sync.WaitGroup
	var next atomic.Int64
	for range 16 {
		wg.Go(func() {
			for {
				k := int(next.Add(1)) - 1
				if k >= n {
					return
				}
				// Reverse order from connRate's, so that the addresses
				// reconnect with other ports.
				src := addrs[len(addrs)-1-k%len(addrs)]
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				c, err := lab.DialWS(ctx, e.Lab.Client, src, url)
				cancel()
				if err != nil {
					if bad.Add(1) == 1 {
						logf("%s: holding connection %d: %v", p.Name, k, err)
					}
					continue
				}
				aff.add(src, c.Backend())
				conns[k] = c
			}
		})
	}
	wg.Wait()
	return conns, int(bad.Load())
}

// heavyConnRate is connRate with workers workers while held other
// connections stay open (idle): the load of a WebSocket service whose
// clients come and go while most stay. Its failures include the held
// connections that could not be opened.
func heavyConnRate(e *Env, p Peer, pid int, aff *affinity, n, workers, held int) (rate float64, failed int, cost heavyCost) {
	before, err := heavySnapshot(e, pid)
	if err != nil {
		fail(err.Error())
	}
	defer func() {
		after, err := heavySnapshot(e, pid)
		if err != nil {
			fail(err.Error())
		}
		cost = heavyCost{cpu: after.cpu - before.cpu, retrans: after.retrans - before.retrans, ipIn: after.ipIn - before.ipIn}
	}()
	conns, bad := openHeld(e, p, aff, held)
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	rate, failed = connRate(e, p, aff, n, workers)
	return rate, failed + bad, cost
}

// heavyCost is what the heavy profile cost outside the clients and
// servers: the balancer process's CPU, the segments TCP retransmitted
// (clients and backends) and the packets the balancer host's IP stack
// received (a forwarder that passes them to the kernel).
type heavyCost struct {
	cpu     float64 // seconds of the balancer's process (and its children)
	retrans uint64
	ipIn    uint64
}

// heavySnapshot reads the counters heavyCost is the difference of.
func heavySnapshot(e *Env, pid int) (c heavyCost, err error) {
	c.cpu = cpuSeconds(processTree(pid))
	for _, h := range append([]*lab.Host{e.Lab.Client}, e.Lab.Backends...) {
		n, err := snmp(h, "Tcp", "RetransSegs")
		if err != nil {
			return c, err
		}
		c.retrans += n
	}
	c.ipIn, err = snmp(e.Lab.Balancer, "Ip", "InReceives")
	return c, err
}

// snmp reads one counter of /proc/net/snmp in h's namespace.
func snmp(h *lab.Host, group, name string) (uint64, error) {
	var v uint64
	err := h.Do(func() error {
		b, err := os.ReadFile("/proc/thread-self/net/snmp")
		if err != nil {
			return err
		}
		v, err = benchrun.SNMPField(string(b), group+":", name)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("%s: %w", h.Name, err)
	}
	return v, nil
}

// holdEcho opens hold WebSocket connections and keeps them open for secs
// seconds, each echoing a message once a second at its own offset, like
// the clients of a chat service. It returns the round-trip times and the
// number of connections or echoes that failed.
func holdEcho(e *Env, p Peer, aff *affinity, hold, secs int) (rtts []time.Duration, failed int) {
	conns, failed := openHeld(e, p, aff, hold)
	var bad atomic.Int64
	bad.Store(int64(failed))
	var wg sync.WaitGroup
	var mu sync.Mutex
	start := time.Now().Add(100 * time.Millisecond)
	period := time.Second
	for k, c := range conns {
		if c == nil {
			continue
		}
		offset := period * time.Duration(k) / time.Duration(hold)
		wg.Go(func() {
			defer c.Close()
			var mine []time.Duration
			// A failed echo ends the connection's series, not the
			// round trips it measured before.
			defer func() {
				mu.Lock()
				rtts = append(rtts, mine...)
				mu.Unlock()
			}()
			for i := range secs {
				time.Sleep(time.Until(start.Add(offset + time.Duration(i)*period)))
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				t0 := time.Now()
				_, err := c.Echo(ctx, "ping "+strconv.Itoa(i))
				rtt := time.Since(t0)
				cancel()
				if err != nil {
					bad.Add(1)
					return
				}
				mine = append(mine, rtt)
			}
		})
	}
	wg.Wait()
	slices.Sort(rtts)
	return rtts, int(bad.Load())
}

// percentile returns the q-quantile (0..1) of sorted durations.
func percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q * float64(len(sorted)-1))
	return sorted[i]
}

// iperf3 runs an iperf3 client from the client host for secs seconds with
// streams parallel streams and returns the received throughput in Gbit/s.
func iperf3(e *Env, p Peer, streams, secs int) (float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs+30)*time.Second)
	defer cancel()
	t := p.target(e, portBulk)
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", e.Lab.Client.NS, "iperf3", "-J",
		"-c", t.Addr().String(), "-p", strconv.Itoa(int(t.Port())), "-B", e.Lab.ClientAddrs4[0].String(),
		"-t", strconv.Itoa(secs), "-P", strconv.Itoa(streams), "--connect-timeout", "5000")
	out, err := cmd.Output()
	var r struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if jerr := json.Unmarshal(out, &r); jerr != nil {
		return 0, fmt.Errorf("iperf3 through %s: %v (output %q): %v", p.Name, err, out, jerr)
	}
	if r.Error != "" || err != nil {
		return 0, fmt.Errorf("iperf3 through %s: %v %s", p.Name, err, r.Error)
	}
	return r.End.SumReceived.BitsPerSecond / 1e9, nil
}
