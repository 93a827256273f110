package test

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/lab"
)

// withDatapath returns a configuration of chatConfig's (or healthConfig's)
// served by datapath dp instead of xdp.
func withDatapath(cfg, dp string) string {
	return strings.Replace(cfg, "datapath: xdp\n", "datapath: "+dp+"\n", 1)
}

// localRoutes lists the balancer's local routes to the lab's VIPs.
func localRoutes(t testing.TB, l *lab.Lab) []string {
	t.Helper()
	nh, err := l.Balancer.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	var out []string
	for _, vip := range []netip.Addr{l.VIP4, l.VIP6} {
		routes, err := nh.RouteGet(vip.AsSlice())
		if err == nil && len(routes) > 0 && routes[0].Type == 2 { // RTN_LOCAL
			out = append(out, vip.String())
		}
	}
	return out
}

// TestSpliceFallback runs `datapath: auto` on an interface where native
// XDP cannot attach (a bridge device has no XDP support in its driver): the
// daemon says why it serves through the splice proxy, `tether status`
// shows splice on that interface, and WebSocket clients from many source
// addresses keep their backend across reconnects, their echoes intact.
// When the daemon stops, the VIPs' local routes it added are gone.
func TestSpliceFallback(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 3, Clients: 150})
	for _, be := range l.Backends {
		serveEcho(t, l, be)
	}
	nh, err := l.Balancer.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	// A bridge without ports: its driver has no native XDP (no ndo_bpf),
	// and the lab needs bridges anyway (dummy may not be built).
	dummy := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "nox0"}}
	if err := nh.LinkAdd(dummy); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nh.LinkDel(dummy) })
	if err := nh.LinkSetUp(dummy); err != nil {
		t.Fatal(err)
	}

	cfg := strings.Replace(chatConfig(l, l.Backends), "interfaces: [eth0]\ndatapath: xdp\n", "interfaces: [nox0]\ndatapath: auto\n", 1)
	d := startDaemon(t, l, cfg)
	out := d.proc.Output()
	line := ""
	for _, s := range strings.Split(out, "\n") {
		if strings.Contains(s, "native XDP unavailable, serving through the splice proxy") {
			line = s
		}
	}
	if !strings.Contains(line, "level=WARN") || !strings.Contains(line, "nox0") || !strings.Contains(line, "err=") {
		t.Fatalf("no WARN naming the interface and the error of the fallback:\n%s", out)
	}
	t.Logf("fallback: %s", line)

	var st control.Status
	d.cliJSON(&st, "status")
	if st.Datapath != config.DatapathAuto || len(st.Interfaces) != 1 || st.Interfaces["nox0"] != "splice" {
		t.Fatalf("status: datapath %q, interfaces %v; want auto with nox0: splice", st.Datapath, st.Interfaces)
	}
	if got := localRoutes(t, l); len(got) != 2 {
		t.Fatalf("local routes of the VIPs on the balancer: %v, want both", got)
	}

	conns := dialAll(t, l, l.ClientAddrs4, l.VIP4, connsPerC)
	conns6 := dialAll(t, l, l.ClientAddrs6[:40], l.VIP6, 1)
	owner := backendsByClient(t, conns)
	spread := map[string]int{}
	for _, b := range owner {
		spread[b]++
	}
	t.Logf("%d IPv4 and %d IPv6 connections through the proxy; clients per backend: %v", len(conns), len(conns6), spread)
	if len(spread) != len(l.Backends) {
		t.Fatalf("clients reached only %v", spread)
	}
	for i := 0; i < len(conns); i += connsPerC {
		conns[i].ws.Close()
	}
	again := dialAll(t, l, l.ClientAddrs4, l.VIP4, 1)
	for _, c := range again {
		if owner[c.src] != c.backend {
			t.Fatalf("client %s reconnected to %s, it was on %s", c.src, c.backend, owner[c.src])
		}
	}
	open := append([]*conn{}, again...)
	for i := 1; i < len(conns); i += connsPerC {
		open = append(open, conns[i])
	}
	echoAll(t, append(open, conns6...), "after reconnect")

	d.proc.Stop()
	if got := localRoutes(t, l); len(got) != 0 {
		t.Fatalf("local routes left after the daemon stopped: %v", got)
	}
}

// TestSameChoiceSpliceXDP serves the same backends with the same seed
// through the XDP datapath, then through the splice proxy, in one lab:
// every client address, IPv4 and IPv6, reaches the same backend both ways.
func TestSameChoiceSpliceXDP(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 3, Clients: 150})
	for _, be := range l.Backends {
		serveEcho(t, l, be)
	}
	cfg := healthConfig(l, l.Backends, "{type: none}")

	choose := func(dp string) (v4, v6 map[netip.Addr]string) {
		d := startDaemon(t, l, withDatapath(cfg, dp))
		c4 := dialAll(t, l, l.ClientAddrs4, l.VIP4, 1)
		c6 := dialAll(t, l, l.ClientAddrs6, l.VIP6, 1)
		v4, v6 = backendsByClient(t, c4), backendsByClient(t, c6)
		// Close the connections while the datapath still carries them.
		closeAll(append(c4, c6...))
		d.proc.Stop()
		return v4, v6
	}
	x4, x6 := choose(config.DatapathXDP)
	// The XDP program stays attached when its daemon stops: detach it, or
	// it would go on forwarding the VIPs ahead of the proxy.
	if out, code := runTether(t, l, "detach", "--pin-dir", labPinDir(l)); code != 0 {
		t.Fatalf("tether detach: exit %d\n%s", code, out)
	}
	s4, s6 := choose(config.DatapathSplice)
	for _, fam := range []struct {
		name     string
		xdp, spl map[netip.Addr]string
		addrs    []netip.Addr
	}{{"IPv4", x4, s4, l.ClientAddrs4}, {"IPv6", x6, s6, l.ClientAddrs6}} {
		if len(fam.xdp) != len(fam.addrs) || len(fam.spl) != len(fam.addrs) {
			t.Fatalf("%s: %d clients through XDP, %d through splice, want %d", fam.name, len(fam.xdp), len(fam.spl), len(fam.addrs))
		}
		spread := map[string]int{}
		for _, a := range fam.addrs {
			if fam.xdp[a] != fam.spl[a] {
				t.Errorf("%s: client %s reached %s through XDP and %s through splice", fam.name, a, fam.xdp[a], fam.spl[a])
			}
			spread[fam.xdp[a]]++
		}
		t.Logf("%s: %d clients on the same backend through both datapaths, spread %v", fam.name, len(fam.addrs), spread)
	}
}

// TestSpliceSettings runs the proxy with `splice: {loops: 3,
// max_connections: 4}`: each VIP:port has one listening socket per loop,
// and a fifth connection at once is reset and counted (the metrics show
// the connections table full, the cap as its capacity), while a client
// that comes after one of the four left is served.
func TestSpliceSettings(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 2, Clients: 6})
	for _, be := range l.Backends {
		serveEcho(t, l, be)
	}
	cfg := withDatapath(chatConfig(l, l.Backends), "splice")
	cfg = strings.Replace(cfg, "services:\n", "splice: {loops: 3, max_connections: 4}\nservices:\n", 1)
	d := startDaemon(t, l, cfg, "--metrics", "127.0.0.1:0")

	out, err := l.Balancer.Command("ss", "-Hltn").CombinedOutput()
	if err != nil {
		t.Fatalf("ss: %v\n%s", err, out)
	}
	for _, vip := range []netip.Addr{l.VIP4, l.VIP6} {
		want := netip.AddrPortFrom(vip, chatPort).String()
		n := 0
		for _, line := range strings.Split(string(out), "\n") {
			if f := strings.Fields(line); len(f) >= 4 && f[3] == want {
				n++
			}
		}
		if n != 3 {
			t.Errorf("%d listening sockets on %s, want one per loop (3):\n%s", n, want, out)
		}
	}

	conns := dialAll(t, l, l.ClientAddrs4[:4], l.VIP4, 1)
	// The fifth: accepted by the kernel, reset by the proxy.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if c, err := dial(ctx, l, l.ClientAddrs4[4], "ws://"+netip.AddrPortFrom(l.VIP4, chatPort).String()+"/chat"); err == nil {
		c.ws.Close()
		t.Fatalf("a fifth connection reached %s past max_connections 4", c.backend)
	} else {
		t.Logf("fifth connection, as expected: %v", err)
	}
	var st control.Stats
	d.cliJSON(&st, "stats")
	if n := st.Reasons["reset_conn_limit"]; n < 1 {
		t.Errorf("reset_conn_limit = %d, want at least 1 (reasons %v)", n, st.Reasons)
	}
	// The metrics show the table full, the cap as its capacity.
	fams := scrapeMetrics(t, l.Balancer, metricsAddr(t, d))
	conns4 := map[string]string{"table": "connections"}
	if got, capacity := sample(t, fams, "tether_table_entries", conns4), sample(t, fams, "tether_table_capacity", conns4); got != 4 || capacity != 4 {
		t.Errorf("connections table: %v entries of %v, want 4 of 4", got, capacity)
	}

	// One leaves; the proxy counts it out once both directions closed.
	conns[0].ws.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := dial(context.Background(), l, l.ClientAddrs4[5], "ws://"+netip.AddrPortFrom(l.VIP4, chatPort).String()+"/chat")
		if err == nil {
			c.ws.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no connection served 10s after one of four closed: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	echoAll(t, conns[1:], "after the cap")
}

// TestSplicePortMapping serves the setup users come from (an nginx or
// HAProxy "listen 80" in front of backends on 8765) with the splice
// datapath: the service listens on port 80, three backends listen on 8765
// only, on their own addresses, with no VIP and no ARP settings. Every
// client reaches one backend, and the same one when it reconnects.
func TestSplicePortMapping(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 3, Clients: 40, Plain: true})
	var b strings.Builder
	fmt.Fprintf(&b, "datapath: splice\nservices:\n")
	for _, svc := range []struct {
		name string
		vip  netip.Addr
		v6   bool
	}{{"web", l.VIP4, false}, {"web6", l.VIP6, true}} {
		fmt.Fprintf(&b, "  - name: %s\n    vip: %s\n    port: 80\n    backends:\n", svc.name, svc.vip)
		for _, be := range l.Backends {
			addr := be.Addr4
			if svc.v6 {
				addr = be.Addr6
			}
			fmt.Fprintf(&b, "      - {address: %s, port: %d}\n", addr, chatPort)
		}
	}
	for _, be := range l.Backends {
		serveEchoOn(t, be, be.Addr4, be.Addr6)
	}
	startDaemon(t, l, b.String())
	for _, vip := range []netip.Addr{l.VIP4, l.VIP6} {
		srcs := l.ClientAddrs4
		if vip.Is6() {
			srcs = l.ClientAddrs6
		}
		url := "ws://" + netip.AddrPortFrom(vip, 80).String() + "/chat"
		var conns []*conn
		for round := range 2 { // the second: every client reconnects
			for _, src := range srcs {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				c, err := dial(ctx, l, src, url)
				cancel()
				if err != nil {
					t.Fatalf("%s, round %d: %v", url, round, err)
				}
				conns = append(conns, c)
				if round == 1 {
					c.ws.Close()
				}
			}
		}
		byClient := backendsByClient(t, conns)
		spread := map[string]int{}
		for _, be := range byClient {
			spread[be]++
		}
		if len(spread) != len(l.Backends) {
			t.Errorf("%s: clients on %v, want on all %d backends", url, spread, len(l.Backends))
		}
		echoAll(t, conns[:len(srcs)], "port-mapped "+url)
		for _, c := range conns[:len(srcs)] {
			c.ws.Close()
		}
		t.Logf("%s: %d clients on backends at port %d: %v", url, len(byClient), chatPort, spread)
	}
}

// TestSpliceHoldsPinDir: a splice daemon holds its balancer's pin
// directory as an XDP one does, so that a second daemon, of either
// datapath, cannot start on the same balancer's state by accident.
func TestSpliceHoldsPinDir(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 1, Clients: 1})
	cfg := withDatapath(chatConfig(l, l.Backends), "splice")
	d := startDaemon(t, l, cfg)
	for _, dp := range []string{"splice", "xdp"} {
		path := filepath.Join(t.TempDir(), "tether.yaml")
		if err := os.WriteFile(path, []byte(withDatapath(chatConfig(l, l.Backends), dp)), 0o600); err != nil {
			t.Fatal(err)
		}
		// timeout ends a second daemon that would run (exit 124).
		out, err := l.Balancer.Command("timeout", "20", tetherBin, "run", "--config", path,
			"--socket", filepath.Join(t.TempDir(), "second.sock"), "--pin-dir", labPinDir(l)).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "in use by another tether") {
			t.Errorf("a second %s daemon on the pin directory of a splice one: %v, want a refusal:\n%s", dp, err, out)
		}
	}
	// The first one still serves.
	if _, _, code := d.cli("status"); code != 0 {
		t.Errorf("tether status exits %d after the refused starts", code)
	}
}
