package userspace

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/maglev"
)

const (
	labEchoPort  = 8765
	labProxyPort = 8766
	labClients   = 100
)

// TestLab runs the proxy in a lab's balancer namespace, which does not hold
// the VIPs, in front of three backends, and connects from the client
// namespace's many source addresses: every client reaches the backend the
// model (and so the XDP program) picks, over IPv4 with source affinity and
// IPv6 with connection affinity, and a PROXY v2 backend learns each
// client's real address.
func TestLab(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 3, Clients: labClients})
	ctx := withTimeout(t, 50*time.Second)

	nameOf := map[uint32]string{} // backend ID → host
	var echoV4, echoV6, ppV4, ppV6 []datapath.Backend
	for i, h := range l.Backends {
		ln, err := h.Listen("tcp", fmt.Sprintf("[::]:%d", labEchoPort))
		if err != nil {
			t.Fatal(err)
		}
		es := lab.ServeEcho(ln, h.Name)
		t.Cleanup(func() { es.Close() })
		pln, err := h.Listen("tcp", fmt.Sprintf("[::]:%d", labProxyPort))
		if err != nil {
			t.Fatal(err)
		}
		serve(t, pln, tellProxyHeader)
		id := uint32(i + 1)
		for _, k := range []uint32{0, 10, 20, 30} {
			nameOf[k+id] = h.Name
		}
		echoV4 = append(echoV4, labBackend(id, h.Addr4, labEchoPort))
		echoV6 = append(echoV6, labBackend(10+id, h.Addr6, labEchoPort))
		ppV4 = append(ppV4, labBackend(20+id, h.Addr4, labProxyPort))
		ppV6 = append(ppV6, labBackend(30+id, h.Addr6, labProxyPort))
	}
	svcs := []datapath.Service{
		labService(t, 1, netip.AddrPortFrom(l.VIP4, labEchoPort), true, echoV4),
		labService(t, 2, netip.AddrPortFrom(l.VIP6, labEchoPort), false, echoV6),
		labService(t, 3, netip.AddrPortFrom(l.VIP4, labProxyPort), false, ppV4),
		labService(t, 4, netip.AddrPortFrom(l.VIP6, labProxyPort), false, ppV6),
	}

	for i := range svcs[2:] {
		svcs[2+i].ProxyProtocol = true
	}
	p := newProxy(t, Options{Netns: l.Balancer.Do})
	// The VIPs are no address of the balancer: the listeners bind them
	// with IP_FREEBIND / IPV6_FREEBIND...
	for _, s := range svcs {
		if err := p.UpsertService(s); err != nil {
			t.Fatal(err)
		}
	}
	// ...and the proxy made them local with a route (AnyIP); the lab
	// already routes the balancer back to the clients.
	for _, vip := range []netip.Addr{l.VIP4, l.VIP6} {
		if !localRoute(t, l, vip) {
			t.Fatalf("no local route for %s after its services started", vip)
		}
	}

	t.Run("same choice as the model", func(t *testing.T) {
		for _, s := range svcs[:2] {
			addrs := l.ClientAddrs4
			if s.VIP.Is6() {
				addrs = l.ClientAddrs6
			}
			url := fmt.Sprintf("ws://%s/", netip.AddrPortFrom(s.VIP, s.Port))
			spread := map[string]int{}
			for _, src := range addrs {
				ws, err := lab.DialWS(ctx, l.Client, src, url)
				if err != nil {
					t.Fatal(err)
				}
				local := ws.LocalAddr().(*net.TCPAddr).AddrPort()
				var h uint32
				if s.SourceAffinity {
					h = maglev.SourceHash(maglev.DefaultSeed, src)
				} else {
					h = maglev.ConnHash(maglev.DefaultSeed, src, local.Port(), s.Port, 6)
				}
				want := maglev.Lookup(s.Ring, h)
				if ws.Backend() != nameOf[want] {
					t.Fatalf("%s → %s reached %s, the model says backend %d (%s)", local, url, ws.Backend(), want, nameOf[want])
				}
				if name, err := ws.Echo(ctx, "hello"); err != nil || name != ws.Backend() {
					t.Fatalf("echo through %s: %q, %v", url, name, err)
				}
				spread[ws.Backend()]++
				ws.Close()
			}
			t.Logf("%s: %d clients, each on the model's backend (%s affinity): %v", url, len(addrs), map[bool]string{true: "source", false: "connection"}[s.SourceAffinity], spread)
			if len(spread) != len(l.Backends) {
				t.Fatalf("clients reached only %v", spread)
			}
		}
		c, _ := p.Counters()
		if n := c.Services[1].NewConns + c.Services[2].NewConns; n != 2*labClients {
			t.Fatalf("%d new connections counted, want %d", n, 2*labClients)
		}
	})

	t.Run("PROXY v2 tells the client address", func(t *testing.T) {
		for _, s := range svcs[2:] {
			vip := netip.AddrPortFrom(s.VIP, s.Port)
			network, addrs := "tcp4", l.ClientAddrs4[:20]
			if s.VIP.Is6() {
				network, addrs = "tcp6", l.ClientAddrs6[:20]
			}
			for _, src := range addrs {
				c, err := l.Client.Dial(ctx, network, src, vip.String())
				if err != nil {
					t.Fatal(err)
				}
				c.SetDeadline(time.Now().Add(5 * time.Second))
				line, err := bufio.NewReader(c).ReadString('\n')
				c.Close()
				if err != nil {
					t.Fatalf("%s → %s: %v", src, vip, err)
				}
				want := fmt.Sprintf("%s %s\n", c.LocalAddr(), vip)
				if line != want {
					t.Fatalf("backend saw PROXY header %q, want %q", line, want)
				}
			}
			t.Logf("%s: %d clients, each seen by its backend with its own address", vip, len(addrs))
		}
	})
	t.Run("local routes go with the VIP's last service", func(t *testing.T) {
		// Services 1 and 3 hold the IPv4 VIP, 2 and 4 the IPv6 one.
		if err := p.DeleteService(svcs[0]); err != nil {
			t.Fatal(err)
		}
		if !localRoute(t, l, l.VIP4) {
			t.Fatal("the IPv4 VIP lost its route while service 3 still uses it")
		}
		if err := p.DeleteService(svcs[2]); err != nil {
			t.Fatal(err)
		}
		if localRoute(t, l, l.VIP4) {
			t.Fatal("the IPv4 VIP kept its route after its last service went")
		}
		if err := p.Close(); err != nil {
			t.Fatal(err)
		}
		if localRoute(t, l, l.VIP6) {
			t.Fatal("the IPv6 VIP kept its route after the proxy closed")
		}
	})
}

// tellProxyHeader reads the PROXY v2 header and answers with the client
// and VIP it names.
func tellProxyHeader(c net.Conn) {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	src, dst, err := readProxyHeader(c)
	if err != nil {
		fmt.Fprintf(c, "error: %v\n", err)
		return
	}
	fmt.Fprintf(c, "%s %s\n", src, dst)
}

func labBackend(id uint32, a netip.Addr, port uint16) datapath.Backend {
	return datapath.Backend{ID: id, Addr: a, Port: port, Weight: 1, State: datapath.Active}
}

func labService(t *testing.T, id uint32, vip netip.AddrPort, source bool, bs []datapath.Backend) datapath.Service {
	s := datapath.Service{ID: id, Name: vip.String(), VIP: vip.Addr(), Port: vip.Port(), Proto: 6, SourceAffinity: source, AffinityTimeout: time.Hour, Backends: bs}
	return rebuild(t, s)
}

// localRoute says whether the balancer has a local route (the proxy's,
// `local VIP dev lo`) for vip.
func localRoute(t *testing.T, l *lab.Lab, vip netip.Addr) bool {
	t.Helper()
	nh, err := l.Balancer.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	routes, err := nh.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{
		Table: unix.RT_TABLE_LOCAL,
		Dst:   prefixNet(netip.PrefixFrom(vip, vip.BitLen())),
	}, netlink.RT_FILTER_TABLE|netlink.RT_FILTER_DST)
	if err != nil {
		t.Fatal(err)
	}
	return slices.ContainsFunc(routes, func(r netlink.Route) bool { return r.Type == unix.RTN_LOCAL })
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
