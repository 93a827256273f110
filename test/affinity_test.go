package test

import (
	"context"
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/maps"
)

const (
	testRing  = 65537
	chatPort  = 8765
	connsPerC = 2 // WebSocket connections per client address
)

// chatConfig is a configuration with a source-affinity WebSocket service on
// both VIPs in front of the lab's backends.
func chatConfig(l *lab.Lab, backends []*lab.Host) string {
	b := labConfig()
	for _, svc := range labVIPs(l, "chat") {
		fmt.Fprintf(b, "  - name: %s\n    vip: %s\n    port: %d\n    affinity: source\n    affinity_timeout: 1h\n    backends:\n", svc.name, svc.vip, chatPort)
		for _, be := range backends {
			fmt.Fprintf(b, "      - address: %s\n", svc.addrOf(be))
		}
	}
	return b.String()
}

// labConfig starts a configuration of the XDP datapath on the lab
// balancer's eth0, up to its services list.
func labConfig() *strings.Builder {
	var b strings.Builder
	fmt.Fprintf(&b, "interfaces: [eth0]\ndatapath: xdp\ntables:\n  connections: 65536\n  nat: 16384\n  affinity: 65536\n  ring_size: %d\nservices:\n", testRing)
	return &b
}

// labVIP is a service of a lab configuration on one of the lab's VIPs.
type labVIP struct {
	name string
	vip  netip.Addr
}

// labVIPs are services name on the IPv4 VIP and name+"6" on the IPv6 one.
func labVIPs(l *lab.Lab, name string) []labVIP {
	return []labVIP{{name, l.VIP4}, {name + "6", l.VIP6}}
}

// addrOf is be's address of the service's family.
func (v labVIP) addrOf(be *lab.Host) netip.Addr {
	if v.vip.Is6() {
		return be.Addr6
	}
	return be.Addr4
}

// serveEcho starts a WebSocket echo server on both VIPs of a backend, for
// clients, and on both of its own addresses, for tether's health checks
// (the default tcp check connects to the backend's address). The servers
// are returned in that order: VIP4, VIP6, then the backend's addresses.
func serveEcho(t testing.TB, l *lab.Lab, be *lab.Host) []*lab.EchoServer {
	t.Helper()
	return serveEchoOn(t, be, l.VIP4, l.VIP6, be.Addr4, be.Addr6)
}

// serveEchoOn starts a WebSocket echo server named after be on each of
// addrs, port chatPort, closed when the test ends.
func serveEchoOn(t testing.TB, be *lab.Host, addrs ...netip.Addr) []*lab.EchoServer {
	t.Helper()
	var out []*lab.EchoServer
	for _, a := range addrs {
		ln, err := be.Listen("tcp", netip.AddrPortFrom(a, chatPort).String())
		if err != nil {
			t.Fatal(err)
		}
		s := lab.ServeEcho(ln, be.Name)
		t.Cleanup(func() { s.Close() })
		out = append(out, s)
	}
	return out
}

// conn is one client WebSocket connection and the backend it reached.
type conn struct {
	src     netip.Addr
	ws      *lab.WSClient
	backend string
}

// dialAll opens n connections from every source address to vip, eight at a
// time, and checks each with one echo.
func dialAll(t *testing.T, l *lab.Lab, srcs []netip.Addr, vip netip.Addr, n int) []*conn {
	t.Helper()
	return dialAllAt(t, l, srcs, netip.AddrPortFrom(vip, chatPort), n)
}

// dialAllAt is dialAll to a service on another port than chatPort.
func dialAllAt(t *testing.T, l *lab.Lab, srcs []netip.Addr, vip netip.AddrPort, n int) []*conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	url := "ws://" + vip.String() + "/chat"
	out := make([]*conn, len(srcs)*n)
	errs := make(chan error, len(out))
	sem := make(chan struct{}, 8)
	var wg sync.WaitGroup
	for i := range out {
		src := srcs[i/n]
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := dial(ctx, l, src, url)
			if err != nil {
				errs <- err
				return
			}
			out[i] = c
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, c := range out {
			c.ws.Close()
		}
	})
	return out
}

func dial(ctx context.Context, l *lab.Lab, src netip.Addr, url string) (*conn, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	ws, err := lab.DialWS(ctx, l.Client, src, url)
	if err != nil {
		return nil, err
	}
	b, err := ws.Echo(ctx, "hello from "+src.String())
	if err != nil {
		ws.Close()
		return nil, fmt.Errorf("%s: %w", src, err)
	}
	return &conn{src: src, ws: ws, backend: b}, nil
}

// echoAll sends one more message on every connection and checks that it
// comes back from the backend the connection started on; it stops the
// test if any does not.
func echoAll(t *testing.T, conns []*conn, round string) {
	t.Helper()
	if echoOnBackends(t, conns, round) > 0 {
		t.FailNow()
	}
}

// echoOnBackends sends one more message on every connection, 16 at a
// time, within 30 s in all (a moved flow may wait for a router), and
// reports and counts those that broke or came back from another backend
// than the one the connection started on.
func echoOnBackends(t *testing.T, conns []*conn, round string) int {
	t.Helper()
	errs := echoFailures(conns, round)
	for _, err := range errs {
		t.Error(err)
	}
	return len(errs)
}

// echoFailures is echoOnBackends without the test: it returns what broke
// or moved.
func echoFailures(conns []*conn, round string) []error {
	var out []error
	for _, err := range echoEach(conns, round) {
		if err != nil {
			out = append(out, err)
		}
	}
	return out
}

// echoEach sends one more message on every connection, 16 at a time,
// within 30 s in all, and returns per connection why it broke or moved
// (nil: it echoed from its backend).
func echoEach(conns []*conn, round string) []error {
	errs, _ := echoTimed(conns, round)
	return errs
}

// echoTimed is echoEach that also returns each connection's round trip
// (0 for one that broke).
func echoTimed(conns []*conn, round string) ([]error, []time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, len(conns))
	rtts := make([]time.Duration, len(conns))
	sem := make(chan struct{}, 16)
	for i, c := range conns {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			start := time.Now()
			b, err := c.ws.Echo(ctx, fmt.Sprintf("%s %d", round, i))
			switch {
			case err != nil:
				errs[i] = fmt.Errorf("%s: connection %d from %s (backend %s) broke: %w", round, i, c.src, c.backend, err)
			case b != c.backend:
				errs[i] = fmt.Errorf("%s: connection %d from %s moved from %s to %s", round, i, c.src, c.backend, b)
			default:
				rtts[i] = time.Since(start)
			}
		}()
	}
	wg.Wait()
	return errs, rtts
}

// backendsByClient checks that every client address reached exactly one
// backend and returns that mapping.
func backendsByClient(t *testing.T, conns []*conn) map[netip.Addr]string {
	t.Helper()
	m := map[netip.Addr]string{}
	for _, c := range conns {
		if b, ok := m[c.src]; ok && b != c.backend {
			t.Fatalf("client %s reached two backends: %s and %s", c.src, b, c.backend)
		}
		m[c.src] = c.backend
	}
	return m
}

// TestWebSocketAffinity runs tether in front of three WebSocket backends,
// once per datapath (xdp, splice), and checks, with 300 connections from
// 150 client addresses (and IPv6 ones): echoes, source affinity across
// reconnects, the spread, counters against what backends saw, a flush of
// the flow tables and a fourth backend, all without breaking a connection.
func TestWebSocketAffinity(t *testing.T) {
	forEachDatapath(t, testWebSocketAffinity)
}

// testWebSocketAffinity is TestWebSocketAffinity on datapath dp. The
// splice datapath skips what only XDP has: the BPF maps (their packet
// counters against the backends' TcpInSegs, and the flush of the flow and
// affinity tables, as a proxied connection is bound to its backend socket
// and never looked up again). It checks the connections each backend holds
// in `tether status` instead. (With splice a backend also sees the
// balancer, not the client, as its peer, so the backends' per-client
// statistics would not apply either, without PROXY protocol v2.)
func testWebSocketAffinity(t *testing.T, dp string) {
	l, servers, segs0 := echoLab(t, dp, 150)
	splice := dp == config.DatapathSplice
	// No health checks: the test compares the packets tether forwards to
	// each backend with the TCP segments the backend receives, to which
	// probes would add theirs. (TestHealthChecks tests them.)
	const noHealth = "{type: none}"
	d := startDaemon(t, l, withDatapath(healthConfig(l, l.Backends, noHealth), dp))

	conns := dialAll(t, l, l.ClientAddrs4, l.VIP4, connsPerC)
	conns6 := dialAll(t, l, l.ClientAddrs6[:40], l.VIP6, 1)
	t.Logf("%d IPv4 and %d IPv6 WebSocket connections echo", len(conns), len(conns6))

	// Source affinity: both connections of a client on one backend.
	owner := backendsByClient(t, conns)
	// Spread over three backends within ±30% of even.
	perBackend := map[string]int{}
	for _, c := range conns {
		perBackend[c.backend]++
	}
	t.Logf("connections per backend: %v", perBackend)
	even := float64(len(conns)) / float64(len(l.Backends))
	for _, be := range l.Backends {
		if n := float64(perBackend[be.Name]); n < 0.7*even || n > 1.3*even {
			t.Errorf("backend %s holds %v connections, want %.0f±30%%", be.Name, n, even)
		}
	}

	// Counters: connections and packets per backend against what each
	// backend saw.
	var m *maps.Maps
	if splice {
		spliceConnections(t, d, l, perBackend)
	} else {
		m = checkXDPCounters(t, l, servers, segs0)
	}

	// Reconnect: close one connection per client and open it again.
	var again []*conn
	for i := 0; i < len(conns); i += connsPerC {
		conns[i].ws.Close()
	}
	again = dialAll(t, l, l.ClientAddrs4, l.VIP4, 1)
	for _, c := range again {
		if owner[c.src] != c.backend {
			t.Fatalf("client %s reconnected to %s, it was on %s", c.src, c.backend, owner[c.src])
		}
	}
	open := append([]*conn{}, again...)
	for i := 1; i < len(conns); i += connsPerC {
		open = append(open, conns[i])
	}
	open = append(open, conns6...)
	echoAll(t, open, "after reconnect")

	// Flush the connection and affinity tables: the ring alone must give
	// every open connection its backend again. (XDP only: the proxy has
	// no table that its established connections depend on.)
	if !splice {
		n, err := m.FlushFlows()
		if err != nil {
			t.Fatal(err)
		}
		na, err := m.FlushAffinities()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("flushed %d flows and %d affinity entries", n, na)
		if n < len(open) {
			t.Errorf("flushed %d flows, want at least the %d open connections", n, len(open))
		}
		echoAll(t, open, "after flush")
	}

	// A fourth backend: no open connection breaks or moves.
	be4, err := l.AddBackend()
	if err != nil {
		t.Fatal(err)
	}
	serveEcho(t, l, be4)
	d.reload(withDatapath(healthConfig(l, l.Backends, noHealth), dp))
	echoAll(t, open, "after adding a backend")
	fresh := dialAll(t, l, l.ClientAddrs4[:60], l.VIP4, 1)
	moved := 0
	for _, c := range fresh {
		if owner[c.src] != c.backend {
			moved++
		}
	}
	t.Logf("with 4 backends, %d of 60 returning clients kept their backend (affinity table)", 60-moved)
	if moved != 0 {
		t.Errorf("%d returning clients changed backend although their affinity entries hold", moved)
	}
}

// checkXDPCounters compares the XDP datapath's counters of each backend
// with what the backend saw: new connections with those it accepted, and
// packets with the TCP segments it received since segs0. It returns the
// daemon's maps.
func checkXDPCounters(t *testing.T, l *lab.Lab, servers map[string][]*lab.EchoServer, segs0 map[string]uint64) *maps.Maps {
	t.Helper()
	m := daemonMaps(t, l, testRing)
	ids := backendIDs(t, m)
	for _, be := range l.Backends {
		c, err := m.BackendCounters(ids[be.Addr4])
		if err != nil {
			t.Fatal(err)
		}
		st := servers[be.Name][0].Stats()
		if int(c.NewConns) != st.Accepted {
			t.Errorf("%s: tether counted %d new connections, the backend accepted %d", be.Name, c.NewConns, st.Accepted)
		}
		// Delayed ACKs may still be on their way: read both sides until
		// they agree, for a bounded time.
		var got, segs uint64
		for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			c4, _ := m.BackendCounters(ids[be.Addr4])
			c6, _ := m.BackendCounters(ids[be.Addr6])
			got, segs = c4.Packets+c6.Packets, snmpCounter(t, be, "Tcp", "InSegs")-segs0[be.Name]
			if got == segs || time.Now().After(deadline) {
				break
			}
		}
		if got != segs {
			t.Errorf("%s: tether forwarded %d packets, the backend received %d TCP segments", be.Name, got, segs)
		}
	}
	return m
}

// spliceConnections checks that `tether status` counts, per backend of
// the IPv4 service, the connections the test holds open through the proxy.
func spliceConnections(t *testing.T, d *daemon, l *lab.Lab, want map[string]int) {
	t.Helper()
	var st control.Status
	d.cliJSON(&st, "status")
	if st.Interfaces["*"] != "splice" {
		t.Errorf("status: interfaces %v, want *: splice", st.Interfaces)
	}
	got := map[string]int{}
	for _, s := range st.Services {
		if s.Name != "chat" {
			continue
		}
		for _, b := range s.Backends {
			for _, be := range l.Backends {
				if b.Address == netip.AddrPortFrom(be.Addr4, chatPort).String() {
					got[be.Name] = b.ActiveConnections
				}
			}
		}
	}
	t.Logf("active connections per backend in tether status: %v", got)
	if !reflect.DeepEqual(got, want) {
		t.Errorf("tether status counts %v active connections, the clients hold %v", got, want)
	}
}

// backendIDs maps backend addresses to their ids in the backends map.
func backendIDs(t *testing.T, m *maps.Maps) map[netip.Addr]uint32 {
	t.Helper()
	out, err := backendTable(m)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// backendTable is backendIDs without the test, for a goroutine.
func backendTable(m *maps.Maps) (map[netip.Addr]uint32, error) {
	out := map[netip.Addr]uint32{}
	for id := uint32(1); id < 64; id++ {
		b, err := m.LookupBackend(id)
		if err != nil {
			return nil, err
		}
		if b.State != maps.StateUnused {
			out[b.Addr] = id
		}
	}
	return out, nil
}

// echoLab builds a lab of three echo backends and the given number of
// client addresses, set up for datapath dp, and returns it with the echo
// servers of each backend and each backend's received TCP segments so far.
func echoLab(t *testing.T, dp string, clients int) (*lab.Lab, map[string][]*lab.EchoServer, map[string]uint64) {
	t.Helper()
	l := lab.NewT(t, lab.Options{Backends: 3, Clients: clients})
	servers := map[string][]*lab.EchoServer{}
	segs0 := map[string]uint64{}
	for _, be := range l.Backends {
		servers[be.Name] = serveEcho(t, l, be)
		segs0[be.Name] = snmpCounter(t, be, "Tcp", "InSegs")
	}
	return l, servers, segs0
}
