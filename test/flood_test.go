package test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/bpftest"
	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/maglev"
	"github.com/tetherlb/tether/test/bench/pktgen"
)

// Flood parameters: a connection table of floodTable entries a family, an
// insertion guard of floodRate new flows a CPU a second, and spoofed
// sources 192.0.2.200 and up (no client of the lab uses them; the
// backends answer them on-link, where nobody replies to ARP).
const (
	floodTable   = 4096
	floodRate    = 500
	floodSources = 50
	floodPorts   = 4000
)

// floodConfig is an IPv4 WebSocket service by connection (so that a flow
// without its entry follows the ring) on backends, with a small table and
// the insertion guard.
func floodConfig(l *lab.Lab, backends []*lab.Host) string {
	cfg := fmt.Sprintf("interfaces: [eth0]\ndatapath: xdp\ntables:\n  connections: %d\n  affinity: %d\n  ring_size: %d\n  insert_rate: %d\nservices:\n"+
		"  - name: chat\n    vip: %s\n    port: %d\n    affinity: connection\n    backends:\n", floodTable, floodTable, testRing, floodRate, l.VIP4, chatPort)
	for _, be := range backends {
		cfg += fmt.Sprintf("      - address: %s\n", be.Addr4)
	}
	return cfg
}

// TestFloods holds 1,000 WebSocket connections through the XDP datapath
// and floods the balancer with spoofed packets from the packet generator
// at its highest rate:
//
//   - 2,000,000 SYNs from 200,000 spoofed 5-tuples: a bare SYN is never
//     recorded, so the table keeps all 1,000 flows, and every connection
//     keeps echoing from its backend while the flood runs;
//   - ACKs from 163,840 spoofed 5-tuples, in bursts of 1,024 a
//     millisecond apart, of which the balancer must receive at least ten
//     times the table's 4,096 entries (the lab's veth queues drop some),
//     with the connections quiet:
//     the insertion guard records at most 500 a second per CPU, the rest
//     are forwarded unrecorded, and all 1,000 established flows keep
//     their entry.
//
// Then a fourth backend changes the ring: a third or so of the flows'
// slots now name another backend, and every connection still echoes from
// its own, which only their entries can give them. The echo round trips
// before and during the SYN flood are logged; the bound on them is a
// benchmark's (make soak), not this test's.
func TestFloods(t *testing.T) {
	const perClient = 10
	l := lab.NewT(t, lab.Options{Backends: 4, Clients: 100})
	for _, be := range l.Backends {
		serveEcho(t, l, be)
	}
	d := startDaemon(t, l, floodConfig(l, l.Backends[:3]))
	api := control.NewClient(d.socket)
	conns := dialAll(t, l, l.ClientAddrs4, l.VIP4, perClient)
	recordedAll(t, api, conns)
	_, base := echoTimed(conns, "before the floods")
	t.Logf("%d connections, every one recorded; echo round trip before the floods: %s", len(conns), quantiles(base))

	if err := l.SetPortXDP(l.Client, true); err != nil { // XDP_TX from the client's veth
		t.Fatal(err)
	}
	gen, err := pktgen.NewGenerator(floodSources, floodPorts)
	if err != nil {
		t.Fatal(err)
	}
	defer gen.Close()
	first := netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, 200}), 1024)
	vip := netip.AddrPortFrom(l.VIP4, chatPort)
	// flood sends count spoofed packets with flags; with echo, the held
	// connections echo in rounds while it runs.
	flood := func(flags uint8, count uint32, echo bool) (time.Duration, []time.Duration, []error) {
		frame := pktgen.TCPFrame(l.Client.MAC, l.Balancer.MAC, first, vip, flags)
		var elapsed time.Duration
		var ferr error
		done := make(chan struct{})
		go func() {
			defer close(done)
			ferr = l.Client.Do(func() error {
				var err error
				elapsed, err = gen.Send(l.Client.Ifindex, frame, count)
				return err
			})
		}()
		var rtts []time.Duration
		var errs []error
		if !echo {
			<-done
			if ferr != nil {
				t.Fatal(ferr)
			}
			return elapsed, nil, nil
		}
		// Echo rounds while the flood runs (at least one).
		for round := 0; ; round++ {
			e, r := echoTimed(conns, fmt.Sprintf("flood round %d", round))
			errs = append(errs, slices.DeleteFunc(e, func(err error) bool { return err == nil })...)
			rtts = append(rtts, r...)
			select {
			case <-done:
				if ferr != nil {
					t.Fatal(ferr)
				}
				return elapsed, rtts, errs
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	unrecordedNow := func() uint64 {
		st, err := api.Stats(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		return st.Unrecorded
	}

	const syns = 2_000_000
	elapsed, rtts, errs := flood(bpftest.SYN, syns, true)
	for _, err := range errs {
		t.Error(err)
	}
	t.Logf("SYN flood: %d spoofed SYNs in %v (%.0f a second); echo round trip meanwhile: %s",
		syns, elapsed.Round(time.Millisecond), syns/elapsed.Seconds(), quantiles(rtts))
	echoAll(t, conns, "after the SYN flood")
	recordedAll(t, api, conns)

	u0 := unrecordedNow()
	// 40 × 4,096 spoofed flows, each once, in bursts of 1,024 a
	// millisecond apart: a generator that sends live frames outruns the
	// veth's queues by far, and they would drop most of one long burst.
	// No echo meanwhile: a connection's packet would enter its entry
	// again if the flood had pushed it out.
	const burst, acks = 1024, 40 * floodTable
	start := time.Now()
	elapsed = 0
	for k := range acks / burst {
		src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(200 + k/4)}), uint16(1024+(k%4)*burst))
		frame := pktgen.TCPFrame(l.Client.MAC, l.Balancer.MAC, src, vip, bpftest.ACK)
		if err := l.Client.Do(func() error {
			e, err := gen.Send(l.Client.Ifindex, frame, burst)
			elapsed += e
			return err
		}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
	took := time.Since(start)
	unrecorded := unrecordedNow() - u0
	flows, err := api.Flows(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	// Every spoofed ACK that reached the program was recorded (an entry
	// more) or not (guard_unrecorded).
	recorded := len(flows) - len(conns)
	arrived := int(unrecorded) + recorded
	t.Logf("ACK flood: %d spoofed ACKs sent in %v (%v with the pauses), %d reached the program: %d recorded, %d forwarded unrecorded (guard_unrecorded)",
		acks, elapsed.Round(time.Millisecond), took.Round(time.Millisecond), arrived, recorded, unrecorded)
	if arrived < 10*floodTable {
		t.Fatalf("only %d spoofed ACKs reached the balancer, less than ten times the table's %d entries", arrived, floodTable)
	}
	cpus := lab.OnlineCPUs(t) // the program's windows are per CPU
	// The flood may straddle window edges: one more window than it spans.
	if windows := int(took/time.Second) + 2; recorded > floodRate*cpus*windows {
		t.Errorf("%d flood flows recorded in %v, more than %d a second on each of %d CPUs", recorded, took, floodRate, cpus)
	}
	if missing := missingEntries(t, api, conns); len(missing) > 0 {
		t.Fatalf("the ACK flood pushed out the entries of %d of %d connections, such as %v", len(missing), len(conns), missing[:min(5, len(missing))])
	}

	// A fourth backend: the slots that change would move flows without
	// an entry.
	m := daemonMaps(t, l, testRing)
	id := serviceID(t, m, l.VIP4)
	ring0, err := m.Ring(id)
	if err != nil {
		t.Fatal(err)
	}
	d.reload(floodConfig(l, l.Backends))
	ring1, err := m.Ring(id)
	if err != nil {
		t.Fatal(err)
	}
	moved := 0
	for _, c := range conns {
		local := c.ws.LocalAddr().(*net.TCPAddr).AddrPort()
		h := maglev.ConnHash(maglev.DefaultSeed, local.Addr().Unmap(), local.Port(), chatPort, 6) % uint32(len(ring0))
		if ring0[h] != ring1[h] {
			moved++
		}
	}
	if moved == 0 {
		t.Fatal("no flow's ring slot changed with the fourth backend: the check below proves nothing")
	}
	echoAll(t, conns, "after the floods and a fourth backend")
	t.Logf("a fourth backend changed the ring slot of %d of %d flows; all %d kept their backend", moved, len(conns), len(conns))
}

// recordedAll waits (10 s at most, with echo rounds: a flow past the guard
// is recorded by a later packet) until every connection has its entry.
func recordedAll(t *testing.T, api *control.Client, conns []*conn) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		missing := missingEntries(t, api, conns)
		if len(missing) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d connections have no entry, such as %v", len(missing), len(conns), missing[:min(5, len(missing))])
		}
		echoAll(t, conns, "recording")
	}
}

// missingEntries are the client ends of the connections that have no
// entry in the connection table.
func missingEntries(t *testing.T, api *control.Client, conns []*conn) []string {
	t.Helper()
	flows, err := api.Flows(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, f := range flows {
		have[f.Client] = true
	}
	var missing []string
	for _, c := range conns {
		local := c.ws.LocalAddr().(*net.TCPAddr).AddrPort()
		key := netip.AddrPortFrom(local.Addr().Unmap(), local.Port()).String()
		if !have[key] {
			missing = append(missing, key)
		}
	}
	return missing
}

// quantiles formats the median, 99th percentile and maximum of ds,
// leaving out zeros (connections that broke).
func quantiles(ds []time.Duration) string {
	ds = slices.DeleteFunc(slices.Clone(ds), func(d time.Duration) bool { return d == 0 })
	if len(ds) == 0 {
		return "none"
	}
	slices.Sort(ds)
	q := func(p float64) time.Duration { return ds[int(p*float64(len(ds)-1))] }
	return fmt.Sprintf("p50 %v, p99 %v, max %v over %d", q(0.5).Round(time.Microsecond), q(0.99).Round(time.Microsecond), ds[len(ds)-1].Round(time.Microsecond), len(ds))
}
