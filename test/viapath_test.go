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

// viaHealth is the health block of the services whose checks follow the
// clients' path in these tests.
const viaHealth = "{type: websocket, path: /health, interval: 200ms, timeout: 150ms, rise: 1, fall: 2, via: vip}"

// backendHealthAt returns the status of the backend at addr in the service
// on vip.
func backendHealthAt(t *testing.T, api *control.Client, vip netip.AddrPort, addr netip.Addr) control.BackendStatus {
	t.Helper()
	return backendAt(t, service(t, api, vip.String()), netip.AddrPortFrom(addr, vip.Port()))
}

// awaitHealth waits until the backend at addr of the service on vip has
// health state, and returns its status.
func awaitHealth(t *testing.T, api *control.Client, vip netip.AddrPort, addr netip.Addr, state string) control.BackendStatus {
	t.Helper()
	var b control.BackendStatus
	waitFor(t, fmt.Sprintf("backend %s of %s %s", addr, vip, state), 10*time.Second, func() bool {
		b = backendHealthAt(t, api, vip, addr)
		return b.Health.State == state
	})
	return b
}

// blackHoled is the reason a backend that answers on its own address but
// not on the VIP path is down for.
const blackHoled = "on the VIP path; the backend answers on its own address"

// TestHealthViaVIP: the black hole. A check via the VIP probes each backend
// along the clients' path; a backend that loses the VIP from its loopback
// (dsr) or its decapsulation (ipip, gue) goes down, with a reason that says
// it still answers on its own address, while a plain check of the same
// backend keeps it up; it comes back when the VIP or the decapsulation
// does. IPv4 and IPv6 services, backends routed behind a router for ipip
// and gue, gue's of the other family than their VIP's.
func TestHealthViaVIP(t *testing.T) {
	t.Run(config.ForwardingDSR, testHealthViaVIPDSR)
	for _, mode := range []string{config.ForwardingIPIP, config.ForwardingGUE} {
		t.Run(mode, func(t *testing.T) { testHealthViaVIPEncap(t, mode) })
	}
}

func testHealthViaVIPDSR(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 2, Clients: 4})
	plainPort := uint16(chatPort + 1)
	for _, be := range l.Backends {
		serveEchoOn(t, be, l.VIP4, l.VIP6, be.Addr4, be.Addr6)
		for _, a := range []netip.Addr{l.VIP4, be.Addr4} {
			ln, err := be.Listen("tcp", netip.AddrPortFrom(a, plainPort).String())
			if err != nil {
				t.Fatal(err)
			}
			s := lab.ServeEcho(ln, be.Name)
			t.Cleanup(func() { s.Close() })
		}
	}
	b := labConfig()
	for _, svc := range []struct {
		name   string
		vip    netip.Addr
		port   uint16
		health string
	}{
		{"via", l.VIP4, chatPort, viaHealth},
		{"via6", l.VIP6, chatPort, viaHealth},
		{"plain", l.VIP4, plainPort, strings.Replace(viaHealth, ", via: vip", "", 1)},
	} {
		fmt.Fprintf(b, "  - name: %s\n    vip: %s\n    port: %d\n    health: %s\n    backends:\n", svc.name, svc.vip, svc.port, svc.health)
		for _, be := range l.Backends {
			a := be.Addr4
			if svc.vip.Is6() {
				a = be.Addr6
			}
			fmt.Fprintf(b, "      - {address: %s}\n", a)
		}
	}
	d := startDaemon(t, l, b.String())
	api := control.NewClient(d.socket)
	via4, via6 := netip.AddrPortFrom(l.VIP4, chatPort), netip.AddrPortFrom(l.VIP6, chatPort)
	plain := netip.AddrPortFrom(l.VIP4, plainPort)

	// Every backend passes its checks, those via the VIP included.
	be := l.Backends[0]
	for _, other := range l.Backends {
		for _, c := range []struct {
			vip  netip.AddrPort
			addr netip.Addr
		}{{via4, other.Addr4}, {via6, other.Addr6}, {plain, other.Addr4}} {
			waitFor(t, fmt.Sprintf("backend %s of %s probed ok", c.addr, c.vip), 10*time.Second, func() bool {
				h := backendHealthAt(t, api, c.vip, c.addr).Health
				return h.State == control.HealthUp && h.LastResult == "ok"
			})
		}
	}
	if h := backendHealthAt(t, api, via4, be.Addr4).Health; !strings.Contains(h.Check, "via "+via4.String()) {
		t.Errorf("check %q does not say it goes via %s", h.Check, via4)
	}

	// The VIPs leave backend 1's loopback: its own addresses still answer.
	for _, vip := range []string{l.VIP4.String() + "/32", l.VIP6.String() + "/128"} {
		if err := be.Run("ip", "addr", "del", vip, "dev", "lo"); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		vip  netip.AddrPort
		addr netip.Addr
	}{{via4, be.Addr4}, {via6, be.Addr6}} {
		st := awaitHealth(t, api, c.vip, c.addr, control.HealthDown)
		if !strings.Contains(st.Health.LastResult, blackHoled) {
			t.Errorf("backend %s of %s is down for %q, want a reason ending %q", c.addr, c.vip, st.Health.LastResult, blackHoled)
		}
		// The verdict first, then the datapath takes the backend out of
		// the ring.
		waitFor(t, fmt.Sprintf("backend %s of %s out of the ring", c.addr, c.vip), 2*time.Second, func() bool {
			return backendHealthAt(t, api, c.vip, c.addr).State == "down"
		})
		t.Logf("backend %s of %s: down: %s", c.addr, c.vip, st.Health.LastResult)
	}
	// The plain check of the same backend saw nothing.
	time.Sleep(time.Second)
	if h := backendHealthAt(t, api, plain, be.Addr4).Health; h.State != control.HealthUp || h.Transitions != 0 || h.Failures != 0 {
		t.Errorf("plain check of the backend without the VIP: %+v, want up with no failure", h)
	}
	// The other backend is up, and takes the VIP's new connections.
	if h := backendHealthAt(t, api, via4, l.Backends[1].Addr4).Health; h.State != control.HealthUp {
		t.Errorf("the other backend: %+v, want up", h)
	}
	for _, c := range dialAllAt(t, l, l.ClientAddrs4[:4], via4, 1) {
		if c.backend != l.Backends[1].Name {
			t.Errorf("client %s reached %s, want the backend that holds the VIP", c.src, c.backend)
		}
		c.ws.Close()
	}

	// The VIPs come back: so does the backend.
	for _, vip := range []string{l.VIP4.String() + "/32", l.VIP6.String() + "/128"} {
		if err := be.Run("ip", "addr", "add", vip, "dev", "lo"); err != nil {
			t.Fatal(err)
		}
	}
	awaitHealth(t, api, via4, be.Addr4, control.HealthUp)
	awaitHealth(t, api, via6, be.Addr6, control.HealthUp)

	// Reverse-path filtering would drop the replies from the VIP, to
	// which the lab's balancer has no route: the IPv4 checks via the VIP
	// say so, and what to do.
	if err := l.Balancer.Sysctl("net/ipv4/conf/all/rp_filter", "1"); err != nil {
		t.Fatal(err)
	}
	// The kernel drops them (the probes time out); within the few seconds
	// tether keeps its verdict on a VIP, the reason names the filter.
	awaitHealth(t, api, via4, be.Addr4, control.HealthDown)
	var st control.BackendStatus
	waitFor(t, "the reason names rp_filter", 10*time.Second, func() bool {
		st = backendHealthAt(t, api, via4, be.Addr4)
		return strings.Contains(st.Health.LastResult, "rp_filter")
	})
	if r := st.Health.LastResult; !strings.Contains(r, "rp_filter on eth0 drops the backends' replies") || !strings.Contains(r, "ip route add") {
		t.Errorf("down for %q, want the reverse-path filter named with a way out", r)
	}
	t.Logf("with rp_filter: %s", st.Health.LastResult)
	if err := l.Balancer.Sysctl("net/ipv4/conf/all/rp_filter", "0"); err != nil {
		t.Fatal(err)
	}
	awaitHealth(t, api, via4, be.Addr4, control.HealthUp)

	// The probe device and rules stay after the daemon, as the XDP
	// program does; detach removes them.
	d.proc.Stop()
	probeSetup := func() string {
		var out strings.Builder
		for _, args := range [][]string{{"-o", "link", "show", "dev", "tether-probe"}, {"rule"}, {"-6", "rule"}} {
			o, _ := l.Balancer.Command("ip", args...).CombinedOutput()
			out.Write(o)
		}
		return out.String()
	}
	if s := probeSetup(); !strings.Contains(s, "tether-probe") || strings.Count(s, "fwmark 0x54480000/0xffff0000 lookup 21576") != 2 {
		t.Errorf("after the daemon stopped, the probe device and rules are not all there:\n%s", s)
	}
	if out, code := runTether(t, l, "detach", "--pin-dir", labPinDir(l)); code != 0 {
		t.Fatalf("detach: exit %d: %s", code, out)
	}
	if s := probeSetup(); strings.Contains(s, "tether-probe:") || strings.Contains(s, "0x54480000") {
		t.Errorf("after detach, the probe device or rules remain:\n%s", s)
	}
}

// testHealthViaVIPEncap runs ipip with each VIP's backends of its family,
// and gue with those of the other family.
func testHealthViaVIPEncap(t *testing.T, mode string) {
	l, _, _ := encapLab(t, mode, 1)
	mixed := mode == config.ForwardingGUE
	d := startDaemon(t, l, encapConfig(l, mode, viaHealth, mixed))
	api := control.NewClient(d.socket)
	vip4, vip6 := netip.AddrPortFrom(l.VIP4, chatPort), netip.AddrPortFrom(l.VIP6, chatPort)
	routed := func(i int) (netip.Addr, netip.Addr) {
		r4, r6 := routedAddrs(i)
		if mixed {
			return r6, r4
		}
		return r4, r6
	}
	for i := range l.Backends {
		r4, r6 := routed(i)
		for _, c := range []struct {
			vip  netip.AddrPort
			addr netip.Addr
		}{{vip4, r4}, {vip6, r6}} {
			waitFor(t, fmt.Sprintf("backend %s of %s probed ok via the VIP", c.addr, c.vip), 10*time.Second, func() bool {
				h := backendHealthAt(t, api, c.vip, c.addr).Health
				return h.State == control.HealthUp && h.LastResult == "ok" && strings.Contains(h.Check, " via ")
			})
		}
	}

	// Backend 1 stops decapsulating.
	be := l.Backends[0]
	r4, r6 := routed(0)
	if err := be.Run("ip", "link", "set", "dev", "eth0", "xdp", "off"); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		vip  netip.AddrPort
		addr netip.Addr
	}{{vip4, r4}, {vip6, r6}} {
		st := awaitHealth(t, api, c.vip, c.addr, control.HealthDown)
		if !strings.Contains(st.Health.LastResult, blackHoled) {
			t.Errorf("backend %s of %s is down for %q, want a reason ending %q", c.addr, c.vip, st.Health.LastResult, blackHoled)
		}
		t.Logf("backend %s of %s: down: %s", c.addr, c.vip, st.Health.LastResult)
	}
	// The others stay up.
	for i := 1; i < len(l.Backends); i++ {
		o4, _ := routed(i)
		if h := backendHealthAt(t, api, vip4, o4).Health; h.State != control.HealthUp {
			t.Errorf("backend %s: %+v, want up", o4, h)
		}
	}

	// Decapsulation set up again: the backend comes back.
	decapSetup(t, be, mode, l.VIP4, l.VIP6)
	awaitHealth(t, api, vip4, r4, control.HealthUp)
	awaitHealth(t, api, vip6, r6, control.HealthUp)
}
