package test

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/lab"
)

// routedAddrs are backend i's addresses on another network than the
// balancer's, which the balancer reaches through a router: 203.0.113.200+i
// and 2001:db8:b::(i+1), held on the backend's loopback.
func routedAddrs(i int) (netip.Addr, netip.Addr) {
	return netip.AddrFrom4([4]byte{203, 0, 113, byte(200 + i)}),
		netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0x0b, 15: byte(i + 1)})
}

// encapLab builds a lab whose backends hold the VIPs (as for dsr) and
// addresses on another network (routedAddrs), which the balancer reaches
// through a router namespace (whose kernel forwards the encapsulated
// packets), readied for forwarding mode with `tether
// backend-setup --decap xdp --apply` (this kernel has no ipip or fou
// devices), and serving WebSocket echo on the VIPs and their routed
// addresses. The balancer forwards IP (the program asks its FIB).
func encapLab(t *testing.T, mode string, clients int) (*lab.Lab, *lab.Host, map[string][]*lab.EchoServer) {
	t.Helper()
	l := lab.NewT(t, lab.Options{Backends: 3, Clients: clients})
	for _, k := range []string{"net/ipv4/conf/all/forwarding", "net/ipv6/conf/all/forwarding"} {
		if err := l.Balancer.Sysctl(k, "1"); err != nil {
			t.Fatal(err)
		}
	}
	router, err := l.AddRouter()
	if err != nil {
		t.Fatal(err)
	}
	servers := map[string][]*lab.EchoServer{}
	for i, be := range l.Backends {
		r4, r6 := routedAddrs(i)
		for _, cmd := range [][]string{
			{"ip", "addr", "add", r4.String() + "/32", "dev", "lo"},
			{"ip", "addr", "add", r6.String() + "/128", "dev", "lo"},
		} {
			if err := be.Run(cmd[0], cmd[1:]...); err != nil {
				t.Fatal(err)
			}
		}
		for _, hop := range []struct {
			h      *lab.Host
			v4, v6 netip.Addr
		}{{l.Balancer, router.Addr4, router.Addr6}, {router, be.Addr4, be.Addr6}} {
			for _, cmd := range [][]string{
				{"ip", "route", "add", r4.String() + "/32", "via", hop.v4.String()},
				{"ip", "-6", "route", "add", r6.String() + "/128", "via", hop.v6.String()},
			} {
				if err := hop.h.Run(cmd[0], cmd[1:]...); err != nil {
					t.Fatal(err)
				}
			}
		}
		decapSetup(t, be, mode, l.VIP4, l.VIP6)
		servers[be.Name] = serveEchoOn(t, be, l.VIP4, l.VIP6, r4, r6)
	}
	return l, router, servers
}

// decapSetup readies backend be for forwarding mode (ipip, gue) to the
// VIPs with `tether backend-setup --decap xdp --apply` (this kernel has no
// ipip or fou devices).
func decapSetup(t *testing.T, be *lab.Host, mode string, vips ...netip.Addr) {
	t.Helper()
	args := []string{"backend-setup", "--forwarding", mode, "--decap", "xdp", "--interface", "eth0", "--apply"}
	for _, v := range vips {
		args = append(args, v.String())
	}
	if out, code := runIn(t, be, args...); code != 0 {
		t.Fatalf("backend-setup on %s: exit %d: %s", be.Name, code, out)
	}
}

// encapHealth is the health block of encapConfig's services.
const encapHealth = "{type: websocket, path: /health, interval: 500ms, timeout: 400ms, rise: 1, fall: 2}"

// encapConfig is the configuration of services web (VIP4) and web6 (VIP6)
// on chatPort in forwarding mode over the backends' routed addresses,
// checked with health, with outer sources varied over a prefix per
// family; mixed gives each VIP the backends' addresses of the other
// family.
func encapConfig(l *lab.Lab, mode, health string, mixed bool) string {
	b := labConfig()
	for _, svc := range []struct {
		name string
		vip  netip.Addr
	}{{"web", l.VIP4}, {"web6", l.VIP6}} {
		v6 := svc.vip.Is6() != mixed // the backends' family
		source := "198.51.100.64/26"
		if v6 {
			source = "2001:db8:100::1:0/112"
		}
		fmt.Fprintf(b, "  - name: %s\n    vip: %s\n    port: %d\n    forwarding: %s\n    tunnel_source: %s\n    affinity_timeout: 1h\n    health: %s\n    backends:\n",
			svc.name, svc.vip, chatPort, mode, source, health)
		for i := range l.Backends {
			r4, r6 := routedAddrs(i)
			a := r4
			if v6 {
				a = r6
			}
			fmt.Fprintf(b, "      - {address: %s}\n", a)
		}
	}
	return b.String()
}

// TestEncapForwarding serves WebSocket echo from backends on another
// network, behind a router, keeping direct server return, in ipip and
// gue: 300 connections from 150 client addresses (and 40 over IPv6) echo;
// the spread is within ±30%; source affinity holds across reconnects;
// while 200 connections echo every 100 ms, two daemon restarts lose no
// connection and no echo; a killed backend goes down and its clients
// reconnect elsewhere.
func TestEncapForwarding(t *testing.T) {
	for _, mode := range []string{config.ForwardingIPIP, config.ForwardingGUE} {
		t.Run(mode, func(t *testing.T) { testEncapForwarding(t, mode) })
	}
}

func testEncapForwarding(t *testing.T, mode string) {
	l, router, servers := encapLab(t, mode, 150)
	d := startDaemon(t, l, encapConfig(l, mode, encapHealth, false))
	api := control.NewClient(d.socket)
	vip4, vip6 := netip.AddrPortFrom(l.VIP4, chatPort), netip.AddrPortFrom(l.VIP6, chatPort)
	conns, conns6, owner := connectSpread(t, l, api, vip4, vip6, mode)
	// The encapsulated packets crossed the router.
	if n := snmpCounter(t, router, "Ip", "ForwDatagrams"); n < uint64(len(conns)) {
		t.Errorf("the router forwarded %d IPv4 datagrams, fewer than the %d connections", n, len(conns))
	}
	// The backends saw the clients themselves (the packets came whole).
	peers := map[string]int{}
	for _, ss := range servers {
		for _, s := range ss[:2] {
			for peer, n := range s.Stats().Clients {
				peers[peer] += n
			}
		}
	}
	for _, c := range append(append([]*conn{}, conns...), conns6...) {
		if peers[c.src.String()] == 0 {
			t.Errorf("no backend saw client %s", c.src)
		}
	}
	m := daemonMaps(t, l, testRing)
	reasons, err := m.Reasons()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []string{"drop_encap_no_route", "drop_encap_mtu", "icmp_too_big", "drop_no_backend", "drop_tx_failed"} {
		if reasons[r] != 0 {
			t.Errorf("reasons after %d connections: %v", len(conns)+len(conns6), reasons)
			break
		}
	}

	again := reconnectSame(t, l, conns, owner, vip4)

	// 200 connections echo every 100 ms through two restarts.
	open := append(append([]*conn{}, again...), conns6...)
	for i := 1; len(open) < 200; i += connsPerC {
		open = append(open, conns[i])
	}
	total := echoWhile(t, open, func() {
		for i := range 2 {
			if i > 0 {
				time.Sleep(time.Second)
			}
			gap, _ := d.restart(l, tetherBin)
			t.Logf("restart %d: %v without a daemon", i+1, gap.Round(time.Millisecond))
		}
	})
	t.Logf("%d connections echoed %d messages through two restarts: none lost", len(open), total)

	// Kill backend 2: it goes down, its clients reconnect to others.
	be2 := l.Backends[1]
	for _, s := range servers[be2.Name] {
		s.Close()
	}
	r4, _ := routedAddrs(1)
	waitFor(t, be2.Name+" down", 10*time.Second, func() bool {
		return backendHealthAt(t, api, vip4, r4).State == "down"
	})
	for src, b := range owner {
		if b != be2.Name {
			continue
		}
		c := dialAllAt(t, l, []netip.Addr{src}, vip4, 1)[0]
		if c.backend == be2.Name {
			t.Fatalf("client %s of the killed %s reconnected to it", src, be2.Name)
		}
	}
}

// TestBackendSetupPrints: backend-setup prints what a backend needs for
// each mode, and refuses what it cannot do with a message that says why.
func TestBackendSetupPrints(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 1, Clients: 1})
	be := l.Backends[0]
	out, code := runIn(t, be, "backend-setup", "--forwarding", "gue", "--gue-port", "5555", "203.0.113.10", "2001:db8:f::10")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, out)
	}
	for _, want := range []string{
		"ip addr add 203.0.113.10/32 dev lo", "ip addr add 2001:db8:f::10/128 dev lo",
		"sysctl -w net.ipv4.conf.all.arp_ignore=1", "ip link add tether-ipip type ipip external",
		"ip link add tether-ip6tnl type ip6tnl mode any external", "ip fou add port 5555 gue", "ip fou add port 5555 gue -6",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--forwarding", "nat", "203.0.113.10"}, "needs nothing on the backends"},
		{[]string{"--forwarding", "ipip", "--decap", "xdp", "203.0.113.10"}, "--decap xdp needs --interface"},
		{[]string{"--forwarding", "ipip", "vip"}, `"vip" is not an IP address`},
	} {
		out, code := runIn(t, be, append([]string{"backend-setup"}, tc.args...)...)
		if code != 2 || !strings.Contains(out, tc.want) {
			t.Errorf("backend-setup %v: exit %d, %q; want exit 2 and %q", tc.args, code, out, tc.want)
		}
	}
}
