package test

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/lab"
)

// natServicePort is the port of the translated services; their backends
// listen on chatPort, as in `listen 80 → upstream { server be:8765; }`.
const natServicePort = 80

// natLab builds a lab of plain backends (no VIP, no ARP settings) that
// serve WebSocket echo on their own addresses' chatPort, for forwarding
// mode: with nat their route to the clients goes through the balancer,
// with fullnat they have none. The balancer forwards IP (nat and fullnat
// need it). It returns each backend's echo servers (IPv4, IPv6).
func natLab(t *testing.T, mode string, clients int) (*lab.Lab, map[string][]*lab.EchoServer) {
	t.Helper()
	l := lab.NewT(t, lab.Options{Backends: 3, Clients: clients, Plain: true})
	for _, k := range []string{"net/ipv4/conf/all/forwarding", "net/ipv6/conf/all/forwarding"} {
		if err := l.Balancer.Sysctl(k, "1"); err != nil {
			t.Fatal(err)
		}
	}
	servers := map[string][]*lab.EchoServer{}
	for _, be := range l.Backends {
		servers[be.Name] = natBackend(t, l, mode, be)
	}
	return l, servers
}

// natBackend readies a plain backend for forwarding mode and serves echo
// on its addresses.
func natBackend(t *testing.T, l *lab.Lab, mode string, be *lab.Host) []*lab.EchoServer {
	t.Helper()
	if mode == config.ForwardingNAT {
		if err := l.RouteClientsVia(be, l.Balancer); err != nil {
			t.Fatal(err)
		}
	}
	return serveEchoOn(t, be, be.Addr4, be.Addr6)
}

// natConfig is the configuration of services web (VIP4:80) and web6
// (VIP6:80) in forwarding mode over backends (drained: those listed in
// draining), with WebSocket health checks on the backends' port.
func natConfig(l *lab.Lab, mode string, backends []*lab.Host, draining ...*lab.Host) string {
	b := labConfig()
	for _, svc := range labVIPs(l, "web") {
		fmt.Fprintf(b, "  - name: %s\n    vip: %s\n    port: %d\n    forwarding: %s\n    affinity_timeout: 1h\n", svc.name, svc.vip, natServicePort, mode)
		fmt.Fprintf(b, "    health: {type: websocket, path: /health, interval: 500ms, timeout: 400ms, rise: 1, fall: 2}\n    backends:\n")
		for _, be := range backends {
			state := "active"
			if slices.Contains(draining, be) {
				state = "draining"
			}
			fmt.Fprintf(b, "      - {address: %s, port: %d, state: %s}\n", svc.addrOf(be), chatPort, state)
		}
	}
	return b.String()
}

// TestNATForwarding serves the setup users come from, `listen 80` in front
// of backends on 8765 that nobody reconfigured, from XDP in both
// translating modes: 300 WebSocket connections from 150 client addresses
// (and 40 over IPv6) echo; source affinity holds across reconnects; the
// spread is within ±30%; backends see the clients' addresses (nat) or the
// balancer's (fullnat); while 200 connections echo every 100 ms, a backend
// added by reload, one drained, two daemon restarts and an upgrade lose
// no connection and no echo; a killed backend goes down and its clients
// reconnect elsewhere; with every backend down new connections are
// refused at once.
func TestNATForwarding(t *testing.T) {
	v2 := buildVersion(t, "nat-test-v2")
	for _, mode := range []string{config.ForwardingNAT, config.ForwardingFullNAT} {
		t.Run(mode, func(t *testing.T) { testNATForwarding(t, mode, v2) })
	}
}

func testNATForwarding(t *testing.T, mode, upgrade string) {
	l, servers := natLab(t, mode, 150)
	d := startDaemon(t, l, natConfig(l, mode, l.Backends))
	api := control.NewClient(d.socket)
	vip4, vip6 := netip.AddrPortFrom(l.VIP4, natServicePort), netip.AddrPortFrom(l.VIP6, natServicePort)
	conns, conns6, owner := connectSpread(t, l, api, vip4, vip6, mode)

	// Who the backends see: the clients (nat) or the balancer (fullnat),
	// besides the balancer's health probes.
	lbAddrs := map[string]bool{l.Balancer.Addr4.String(): true, l.Balancer.Addr6.String(): true}
	peers := map[string]int{}
	for _, ss := range servers {
		for _, s := range ss {
			for peer, n := range s.Stats().Clients {
				peers[peer] += n
			}
		}
	}
	if mode == config.ForwardingNAT {
		for _, c := range append(append([]*conn{}, conns...), conns6...) {
			if peers[c.src.String()] == 0 {
				t.Errorf("no backend saw client %s", c.src)
			}
		}
		for peer := range peers {
			if !lbAddrs[peer] && !slices.Contains(l.ClientAddrs4, netip.MustParseAddr(peer)) && !slices.Contains(l.ClientAddrs6, netip.MustParseAddr(peer)) {
				t.Errorf("a backend saw connections from %s, neither a client nor the balancer", peer)
			}
		}
	} else {
		for peer, n := range peers {
			if !lbAddrs[peer] {
				t.Errorf("backends saw %d connections from %s, want only the balancer's addresses with fullnat", n, peer)
			}
		}
		if n := peers[l.Balancer.Addr4.String()]; n < len(conns) {
			t.Errorf("backends saw %d connections from %s, want at least %d", n, l.Balancer.Addr4, len(conns))
		}
	}

	// The program translated the replies itself: only those that came
	// before the kernel had resolved the client's next hop went through
	// the kernel's forwarding.
	m := daemonMaps(t, l, testRing)
	reasons, err := m.Reasons()
	if err != nil {
		t.Fatal(err)
	}
	if reasons["pass_nat_kernel"] > 20 || reasons["drop_nat_no_route"] != 0 || reasons["reset_nat_ports"] != 0 || reasons["reset_nat_clash"] != 0 {
		t.Errorf("reasons after %d connections: %v", len(conns)+len(conns6), reasons)
	}
	tables, err := m.Tables()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("tables: %+v; replies the kernel sent: %d", tables, reasons["pass_nat_kernel"])
	for _, tb := range tables {
		if tb.Name == "nat_ipv4" && tb.Entries < len(conns) || tb.Name == "nat_ipv6" && tb.Entries < len(conns6) {
			t.Errorf("table %s holds %d entries, fewer than the connections", tb.Name, tb.Entries)
		}
	}

	again := reconnectSame(t, l, conns, owner, vip4)

	// 200 connections echo every 100 ms through the changes below.
	open := append(append([]*conn{}, again...), conns6...)
	for i := 1; len(open) < 200; i += connsPerC {
		open = append(open, conns[i])
	}
	settle := func() { time.Sleep(time.Second) }
	be1 := l.Backends[0]
	var all []*lab.Host
	total := echoWhile(t, open, func() {
		be4, err := l.AddBackend()
		if err != nil {
			t.Fatal(err)
		}
		servers[be4.Name] = natBackend(t, l, mode, be4)
		all = append(append([]*lab.Host{}, l.Backends[:3]...), be4)
		d.reload(natConfig(l, mode, all))
		settle()
		d.reload(natConfig(l, mode, all, be1))
		settle()
		for i := range 2 {
			gap, _ := d.restart(l, tetherBin)
			t.Logf("restart %d: %v without a daemon", i+1, gap.Round(time.Millisecond))
			settle()
		}
		gap, _ := d.restart(l, upgrade)
		t.Logf("upgrade: %v without a daemon", gap.Round(time.Millisecond))
	})
	t.Logf("%d connections echoed %d messages through a backend added, one drained, two restarts and an upgrade: none lost", len(open), total)

	// A client of the drained backend that comes back goes elsewhere.
	var drainedClient netip.Addr
	for src, b := range owner {
		if b == be1.Name {
			drainedClient = src
			break
		}
	}
	fresh := dialAllAt(t, l, []netip.Addr{drainedClient}, vip4, 1)
	if fresh[0].backend == be1.Name {
		t.Errorf("client %s came back to the drained %s", drainedClient, be1.Name)
	}

	// Kill backend 2: it goes down, its clients reconnect to others.
	be2 := l.Backends[1]
	for _, s := range servers[be2.Name] {
		s.Close()
	}
	waitFor(t, be2.Name+" down", 10*time.Second, func() bool {
		return backendOf(t, service(t, api, vip4.String()), be2).State == "down"
	})
	for src, b := range owner {
		if b != be2.Name {
			continue
		}
		c := dialAllAt(t, l, []netip.Addr{src}, vip4, 1)[0]
		if c.backend == be2.Name || c.backend == be1.Name {
			t.Fatalf("client %s of the killed %s reconnected to %s", src, be2.Name, c.backend)
		}
	}

	// Every backend down: new connections are refused at once.
	for _, be := range all {
		for _, s := range servers[be.Name] {
			s.Close()
		}
	}
	waitFor(t, "the service down", 10*time.Second, func() bool {
		return service(t, api, vip4.String()).State == control.ServiceDown
	})
	start := time.Now()
	_, err = l.Client.Dial(t.Context(), "tcp", l.ClientAddrs4[0], vip4.String())
	if err == nil || !strings.Contains(err.Error(), "refused") || time.Since(start) > time.Second {
		t.Fatalf("with every backend down, a connection: %v after %v, want refused at once", err, time.Since(start))
	}
}

// TestNATRoutedBackend: with nat and fullnat a backend may sit behind a
// router: the balancer sends its frames to the gateway the kernel's route
// names (here be1, which holds the backend's address 203.0.113.200 on its
// loopback), and the clients' WebSockets echo through it. A dsr service
// refuses such a backend, and says why.
func TestNATRoutedBackend(t *testing.T) {
	for _, mode := range []string{config.ForwardingNAT, config.ForwardingFullNAT} {
		t.Run(mode, func(t *testing.T) {
			l := lab.NewT(t, lab.Options{Backends: 1, Clients: 20, Plain: true})
			for _, k := range []string{"net/ipv4/conf/all/forwarding", "net/ipv6/conf/all/forwarding"} {
				if err := l.Balancer.Sysctl(k, "1"); err != nil {
					t.Fatal(err)
				}
			}
			router := l.Backends[0]
			if mode == config.ForwardingNAT {
				if err := l.RouteClientsVia(router, l.Balancer); err != nil {
					t.Fatal(err)
				}
			}
			routed := netip.MustParseAddr("203.0.113.200")
			for _, cmd := range [][]string{
				{"ip", "addr", "add", routed.String() + "/32", "dev", "lo"},
			} {
				if err := router.Run(cmd[0], cmd[1:]...); err != nil {
					t.Fatal(err)
				}
			}
			if err := l.Balancer.Run("ip", "route", "add", routed.String()+"/32", "via", router.Addr4.String()); err != nil {
				t.Fatal(err)
			}
			serveEchoOn(t, router, routed)
			b := labConfig()
			fmt.Fprintf(b, "  - name: web\n    vip: %s\n    port: %d\n    forwarding: %s\n    backends: [{address: %s, port: %d}]\n", l.VIP4, natServicePort, mode, routed, chatPort)
			d := startDaemon(t, l, b.String())
			vip := netip.AddrPortFrom(l.VIP4, natServicePort)
			waitFor(t, "the routed backend up", 10*time.Second, func() bool {
				s := service(t, control.NewClient(d.socket), vip.String())
				return s.State == control.ServiceUp && len(s.Backends) == 1 && s.Backends[0].Health.State == control.HealthUp
			})
			conns := dialAllAt(t, l, l.ClientAddrs4, vip, 1)
			echoAll(t, conns, "through the router")
			t.Logf("%d WebSockets echo through %s to %s behind %s", len(conns), mode, routed, router.Name)

			// dsr cannot reach it.
			d.mustCLI("vip", "add", netip.AddrPortFrom(l.VIP4, 81).String())
			_, stderr, code := d.cli("backend", "add", netip.AddrPortFrom(l.VIP4, 81).String(), netip.AddrPortFrom(routed, 81).String())
			if code == 0 || !strings.Contains(stderr, "reached through gateway "+router.Addr4.String()) || !strings.Contains(stderr, "dsr forwarding needs backends on a directly connected network") {
				t.Fatalf("a dsr backend behind a gateway: exit %d, %s", code, stderr)
			}
		})
	}
}

// connectSpread waits until the services of vip4 and vip6 have their three
// backends up, opens connsPerC connections from every IPv4 client address
// and one from 40 IPv6 ones, each checked with an echo, and checks that the
// IPv4 ones spread within ±30%. It returns the connections and each IPv4
// client's backend.
func connectSpread(t *testing.T, l *lab.Lab, api *control.Client, vip4, vip6 netip.AddrPort, mode string) (conns, conns6 []*conn, owner map[netip.Addr]string) {
	t.Helper()
	waitFor(t, "every backend up", 10*time.Second, func() bool {
		for _, v := range []netip.AddrPort{vip4, vip6} {
			s := service(t, api, v.String())
			if s.State != control.ServiceUp || len(s.Backends) != 3 {
				return false
			}
			for _, b := range s.Backends {
				if b.Health.State != control.HealthUp {
					return false
				}
			}
		}
		return true
	})

	conns = dialAllAt(t, l, l.ClientAddrs4, vip4, connsPerC)
	conns6 = dialAllAt(t, l, l.ClientAddrs6[:40], vip6, 1)
	owner = backendsByClient(t, conns)
	backendsByClient(t, conns6)
	perBackend := map[string]int{}
	for _, c := range conns {
		perBackend[c.backend]++
	}
	t.Logf("%d IPv4 and %d IPv6 WebSocket connections echo through %s; per backend: %v", len(conns), len(conns6), mode, perBackend)
	even := float64(len(conns)) / float64(len(l.Backends))
	for _, be := range l.Backends {
		if n := float64(perBackend[be.Name]); n < 0.7*even || n > 1.3*even {
			t.Errorf("backend %s holds %v connections, want %.0f±30%%", be.Name, n, even)
		}
	}
	return conns, conns6, owner
}

// reconnectSame closes one connection of every IPv4 client of conns and
// opens a new one: each must reach the client's backend in owner.
func reconnectSame(t *testing.T, l *lab.Lab, conns []*conn, owner map[netip.Addr]string, vip4 netip.AddrPort) []*conn {
	t.Helper()
	for i := 0; i < len(conns); i += connsPerC {
		conns[i].ws.Close()
	}
	again := dialAllAt(t, l, l.ClientAddrs4, vip4, 1)
	for _, c := range again {
		if owner[c.src] != c.backend {
			t.Fatalf("client %s reconnected to %s, it was on %s", c.src, c.backend, owner[c.src])
		}
	}
	return again
}
