package test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/flowsync"
	"github.com/tetherlb/tether/internal/lab"
)

// syncKey is the tests' shared sync key.
const syncKey = "test key of tether sync, 32+ chars"

// syncBlock is the sync block of host h of hosts, port 7946.
func syncBlock(h *lab.Host, hosts []*lab.Host) string {
	var peers []string
	for _, o := range hosts {
		if o != h {
			peers = append(peers, netip.AddrPortFrom(o.Addr4, 7946).String())
		}
	}
	return fmt.Sprintf("sync:\n  listen: %s\n  peers: [%s]\n  key: %q\n", netip.AddrPortFrom(h.Addr4, 7946), strings.Join(peers, ", "), syncKey)
}

// TestSyncKeepsFlows: two hosts behind the ECMP router, 300 WebSocket
// connections from 150 addresses over both, a fourth backend added by
// reload on both (about a quarter of the ring's slots change), then host
// 1 dies as a machine does. With sync, host 2 holds host 1's connection
// and affinity entries, learned as they were made: every connection goes
// on, on its backend, none lost, and every client that returns reaches the
// backend it had. Without sync, the connections host 1 carried whose
// slot changed reach another backend and break: the test measures them.
func TestSyncKeepsFlows(t *testing.T) {
	for _, on := range []bool{true, false} {
		name := map[bool]string{true: "sync", false: "no sync"}[on]
		t.Run(name, func(t *testing.T) {
			lost, conns, learned := hostDiesAfterScaleOut(t, on)
			t.Logf("%s: %d of %d connections lost after a backend was added and host 1 died; host 2 learned %d entries", name, lost, conns, learned)
			switch {
			case on && lost > 0:
				t.Errorf("with sync, %d connections were lost", lost)
			case !on && lost == 0:
				t.Errorf("without sync no connection was lost: the scenario does not show what sync prevents")
			}
		})
	}
}

// hostDiesAfterScaleOut plays TestSyncKeepsFlows's scenario with sync on
// or off and returns the connections lost (or moved), the connections,
// and the entries host 2 learned.
func hostDiesAfterScaleOut(t *testing.T, on bool) (lost, total int, learned uint64) {
	const hold = 3
	l, router, bird, lbs := bgpLab(t, lab.Options{Backends: 3}, 2, hold)
	for _, be := range l.Backends {
		serveEchoOn(t, be, l.VIP4, l.VIP6, be.Addr4, be.Addr6)
	}
	health := "{type: websocket, path: /health, interval: 200ms, timeout: 150ms, rise: 1, fall: 2}"
	cfgOf := func(h *lab.Host) string {
		c := healthConfig(l, l.Backends, health) + bgpBlock(h, router, time.Second)
		if on {
			c += syncBlock(h, lbs)
		}
		return c
	}
	pinDirs := []string{labPinDir(l), filepath.Join(l.BPFFS, "tether-lb2")}
	var ds []*daemon
	for i, lb := range lbs {
		ds = append(ds, startDaemonOn(t, lb, pinDirs[i], cfgOf(lb), "--metrics", "127.0.0.1:0"))
	}
	api2 := control.NewClient(ds[1].socket)
	vip := netip.AddrPortFrom(l.VIP4, chatPort)
	awaitRoute(t, bird, l.VIP4, lbs[0].Addr4, lbs[1].Addr4)
	routeThrough(t, l, router, lbs...)
	conns := dialAllAt(t, l, l.ClientAddrs4, vip, connsPerC)
	backendsByClient(t, conns)

	be4, err := l.AddBackend()
	if err != nil {
		t.Fatal(err)
	}
	serveEchoOn(t, be4, l.VIP4, l.VIP6, be4.Addr4, be4.Addr6)
	for i, d := range ds {
		d.reload(cfgOf(lbs[i]))
	}
	waitFor(t, "be4 up on both hosts", 10*time.Second, func() bool {
		for _, d := range ds {
			if backendOf(t, service(t, control.NewClient(d.socket), vip.String()), be4).State != "active" {
				return false
			}
		}
		return true
	})
	if on {
		st, err := api2.Status(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if st.Sync == nil || !st.Sync.Ready || st.Sync.Learned == 0 || len(st.Sync.Refused) > 0 {
			t.Fatalf("host 2's sync status: %+v, want ready, entries learned, none refused", st.Sync)
		}
		learned = st.Sync.Learned
		st1, err := control.NewClient(ds[0].socket).Status(context.Background())
		if err != nil || st1.Sync == nil {
			t.Fatalf("host 1's sync status: %+v, %v", st1.Sync, err)
		}
		n1 := newConns(t, control.NewClient(ds[0].socket), vip)
		if n1 > 0 {
			t.Logf("host 1 entered %d flows and sent %d entries in %d datagrams, %d bytes: %.1f bytes and %.3f datagrams per new connection",
				n1, st1.Sync.SentEntries, st1.Sync.SentDatagrams, st1.Sync.SentBytes,
				float64(st1.Sync.SentBytes)/float64(n1), float64(st1.Sync.SentDatagrams)/float64(n1))
		}
		if out := ds[1].mustCLI("status"); !strings.Contains(out, "sync: on "+netip.AddrPortFrom(lbs[1].Addr4, 7946).String()) {
			t.Errorf("tether status shows no sync section:\n%s", out)
		}
	}

	if on {
		forgeSync(t, l, lbs, api2, ds[1])
	}

	hostDies(t, l, ds[0], pinDirs[0])
	awaitRoute(t, bird, l.VIP4, lbs[1].Addr4)
	failures := echoFailures(conns, "host 1 died")
	for i, err := range failures {
		if on || i < 3 {
			t.Log(err)
		}
	}
	if !on {
		return len(failures), len(conns), learned
	}

	// Every client returns (a new connection, through host 2): each
	// reaches the backend it had, by the affinity entries host 2 learned.
	owner := backendsByClient(t, conns)
	back := dialAllAt(t, l, l.ClientAddrs4, vip, 1)
	for _, c := range back {
		if c.backend != owner[c.src] {
			t.Errorf("client %s returned to %s, it was on %s", c.src, c.backend, owner[c.src])
		}
		c.ws.Close()
	}

	// Host 1 comes back with nothing pinned: it asks host 2 for its
	// entries and learns them before it announces the VIP, so that the
	// flows the router gives back to it keep their backends.
	if err := l.SetLink(lbs[0], true); err != nil {
		t.Fatal(err)
	}
	d1 := startDaemonOn(t, lbs[0], pinDirs[0], cfgOf(lbs[0]))
	awaitRoute(t, bird, l.VIP4, lbs[0].Addr4, lbs[1].Addr4)
	routeThrough(t, l, router, lbs...)
	st, err := control.NewClient(d1.socket).Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if st.Sync == nil || st.Sync.Learned == 0 {
		t.Fatalf("host 1 came back and learned nothing: %+v", st.Sync)
	}
	out := d1.proc.Output()
	ready, announced := strings.Index(out, "sync: learned the peers' entries"), strings.Index(out, "bgp: VIP announced")
	if ready < 0 || announced < ready {
		t.Fatalf("host 1 announced before it learned its peers' entries:\n%s", out)
	}
	t.Logf("host 1 came back and learned %d entries from host 2 before it announced", st.Sync.Learned)
	again := echoFailures(conns, "host 1 came back")
	for _, err := range again {
		t.Log(err)
	}
	return len(failures) + len(again), len(conns), learned
}

// forgeSync sends host 2 (api2, d2) sync datagrams that must change
// nothing: signed with another key, cut short (by 5 bytes: its MAC fails;
// to 20 bytes: truncated), from an address that is no peer (the
// client's), from host 1's address naming another sender, and a replay
// of a genuine one; each names a
// client address no connection uses. Host 2 counts each refusal by
// reason and enters none of their entries; the genuine datagram's entry
// is entered once.
func forgeSync(t *testing.T, l *lab.Lab, lbs []*lab.Host, api2 *control.Client, d2 *daemon) {
	t.Helper()
	to := netip.AddrPortFrom(lbs[1].Addr4, 7946)
	vip := netip.AddrPortFrom(l.VIP4, chatPort)
	entry := func(client string) []flowsync.Entry {
		return []flowsync.Entry{{Kind: flowsync.KindConn, Proto: 6, Client: netip.MustParseAddrPort(client), VIP: vip,
			Backend: netip.AddrPortFrom(l.Backends[0].Addr4, chatPort)}}
	}
	send := func(from *lab.Host, d []byte) {
		t.Helper()
		err := from.Do(func() error {
			c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(from.Addr4, 0)))
			if err != nil {
				return err
			}
			defer c.Close()
			_, err = c.WriteToUDPAddrPort(d, to)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	host1 := netip.AddrPortFrom(lbs[0].Addr4, 7946)
	good := flowsync.NewEncoder([]byte(syncKey), host1, 7).Encode(flowsync.TypeEntries, entry("192.0.2.251:1001"), time.Now())[0]
	send(lbs[0], flowsync.NewEncoder([]byte("another key, also 32 characters long"), host1, 7).Encode(flowsync.TypeEntries, entry("192.0.2.252:1002"), time.Now())[0])
	send(lbs[0], good[:len(good)-5]) // its MAC no longer verifies
	send(lbs[0], good[:20])          // shorter than a header and a MAC
	send(l.Client, flowsync.NewEncoder([]byte(syncKey), netip.AddrPortFrom(l.Client.Addr4, 7946), 8).Encode(flowsync.TypeEntries, entry("192.0.2.253:1003"), time.Now())[0])
	// From host 1's address, naming a sender that is no peer.
	send(lbs[0], flowsync.NewEncoder([]byte(syncKey), netip.AddrPortFrom(lbs[0].Addr4, 7947), 9).Encode(flowsync.TypeEntries, entry("192.0.2.254:1004"), time.Now())[0])
	send(lbs[0], good)
	send(lbs[0], good)
	var st control.Status
	deadline := time.Now().Add(5 * time.Second)
	for {
		var err error
		st, err = api2.Status(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		r := st.Sync.Refused
		if r["bad_mac"] >= 2 && r["truncated"] >= 1 && r["unknown_peer"] >= 1 && r["replayed"] >= 1 && r["wrong_sender"] >= 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("host 2 refused %v, want bad_mac, truncated, unknown_peer, wrong_sender and replayed", r)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("host 2 refused: %v", st.Sync.Refused)
	fams := scrapeMetrics(t, d2.host, metricsAddr(t, d2))
	checkMetricNames(t, fams)
	for _, m := range []struct {
		name   string
		labels map[string]string
	}{
		{"tether_sync_refused_total", map[string]string{"reason": "bad_mac"}},
		{"tether_sync_refused_total", map[string]string{"reason": "replayed"}},
		{"tether_sync_learned_total", map[string]string{"result": "learned"}},
		{"tether_sync_entries_total", map[string]string{"direction": "received"}},
		{"tether_sync_ready", nil},
	} {
		if got := sample(t, fams, m.name, m.labels); got < 1 {
			t.Errorf("%s%v = %v, want at least 1", m.name, m.labels, got)
		}
	}
	var flows []control.FlowStatus
	d2.cliJSON(&flows, "flows")
	for _, f := range flows {
		switch f.Client {
		case "192.0.2.252:1002", "192.0.2.253:1003", "192.0.2.254:1004":
			t.Errorf("a forged entry was entered: %+v", f)
		case "192.0.2.251:1001":
			if f.Backend != netip.AddrPortFrom(l.Backends[0].Addr4, chatPort).String() {
				t.Errorf("the genuine entry: %+v", f)
			}
		}
	}
}
