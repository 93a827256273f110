package userspace

import (
	"encoding/binary"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/internal/bpftest"
	"github.com/tetherlb/tether/loader"
	"github.com/tetherlb/tether/maglev"
	"github.com/tetherlb/tether/maps"
)

const ringSize = 4099

var (
	vip4 = netip.MustParseAddrPort("203.0.113.10:8765")
	vip6 = netip.MustParseAddrPort("[2001:db8:f::10]:8765")
)

func loaderOpts() loader.Options {
	return loader.Options{Connections: 1 << 14, Affinity: 1 << 14, RingSize: ringSize, HashSeed: maglev.DefaultSeed}
}

// clock is a fake Proxy.now for tests that age affinity entries.
type clock struct{ t int64 }

func (c *clock) now() int64          { return c.t }
func (c *clock) add(d time.Duration) { c.t += int64(d) }

// choiceProxy is a proxy with a fake clock whose choice function is
// called directly; it listens nowhere.
func choiceProxy(t *testing.T) (*Proxy, *clock) {
	p := New(slog.New(slog.NewTextHandler(io.Discard, nil)), maglev.DefaultSeed, Options{})
	t.Cleanup(func() { p.Close() })
	c := &clock{t: int64(time.Hour)}
	p.now = c.now
	return p, c
}

// testService is a datapath service with backends ids, all active and in
// the ring, addressed as the bpftest fixtures address them.
func testService(t *testing.T, id uint32, vip netip.AddrPort, source bool, ids ...uint32) datapath.Service {
	t.Helper()
	s := datapath.Service{ID: id, Name: vip.String(), VIP: vip.Addr(), Port: vip.Port(), Proto: 6, SourceAffinity: source, AffinityTimeout: time.Hour}
	for _, b := range ids {
		s.Backends = append(s.Backends, datapath.Backend{ID: b, Addr: bpftest.BackendAddr(vip.Addr(), b), Port: vip.Port(), Weight: 1, State: datapath.Active})
	}
	s.Ring = ring(t, s)
	return s
}

// ring is the Maglev ring of s's active backends, as the control plane
// builds it.
func ring(t *testing.T, s datapath.Service) []uint32 {
	t.Helper()
	var bs []maglev.Backend
	for _, b := range s.Backends {
		if b.State == datapath.Active {
			bs = append(bs, maglev.Backend{ID: b.ID, Key: b.Addr.String(), Weight: 1})
		}
	}
	r, err := maglev.Build(bs, ringSize, maglev.DefaultSeed)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// withState returns s with backend id in state, out of the ring unless
// active.
func withState(t *testing.T, s datapath.Service, id uint32, st datapath.State) datapath.Service {
	t.Helper()
	s.Backends = append([]datapath.Backend(nil), s.Backends...)
	for i := range s.Backends {
		if s.Backends[i].ID == id {
			s.Backends[i].State = st
		}
	}
	s.Ring = ring(t, s)
	return s
}

// connect is what the proxy does for a new connection of client: choose
// and record. It returns the backend ID (0: none).
func connect(p *Proxy, s *service, client netip.AddrPort) uint32 {
	now := p.now()
	b, hit := p.choose(s, client, now)
	if b == nil {
		return 0
	}
	p.record(s, client, b, hit, now)
	return b.ID
}

func randomClient(rnd *rand.Rand, v6 bool) netip.AddrPort {
	var a netip.Addr
	if v6 {
		var b [16]byte
		binary.BigEndian.PutUint64(b[:], 0x20010db8_00000000|rnd.Uint64()&0xffffffff)
		binary.BigEndian.PutUint64(b[8:], rnd.Uint64())
		a = netip.AddrFrom16(b)
	} else {
		a = netip.AddrFrom4([4]byte{byte(rnd.UintN(256)), byte(rnd.UintN(256)), byte(rnd.UintN(256)), byte(rnd.UintN(256))})
	}
	return netip.AddrPortFrom(a, uint16(1024+rnd.UintN(60000)))
}

// TestChoiceMatchesModel checks the proxy's choice against the Go model
// that the XDP program matches bit for bit (bpf.TestChoiceMatchesModel):
// for random new clients, ring[SourceHash or ConnHash % M].
func TestChoiceMatchesModel(t *testing.T) {
	p, _ := choiceProxy(t)
	svcs := []datapath.Service{
		testService(t, 1, vip4, true, 1, 2, 3),
		testService(t, 2, netip.AddrPortFrom(vip4.Addr(), 443), false, 4, 5, 6, 7),
		testService(t, 3, vip6, true, 8, 9, 10),
		testService(t, 4, netip.AddrPortFrom(vip6.Addr(), 443), false, 11, 12),
	}
	rnd := rand.New(rand.NewPCG(1, 2))
	const clients = 4000
	for i := range clients {
		ds := svcs[i%len(svcs)]
		s := newService(ds, nil)
		client := randomClient(rnd, ds.VIP.Is6())
		var h uint32
		if ds.SourceAffinity {
			h = maglev.SourceHash(maglev.DefaultSeed, client.Addr())
		} else {
			h = maglev.ConnHash(maglev.DefaultSeed, client.Addr(), client.Port(), ds.Port, 6)
		}
		want := ds.Ring[h%uint32(len(ds.Ring))]
		// A fresh service each time: no affinity entry, the ring decides.
		if got := connect(p, s, client); got != want {
			t.Fatalf("client %d %s → %s: proxy chose backend %d, model %d", i, client, netip.AddrPortFrom(ds.VIP, ds.Port), got, want)
		}
	}
	t.Logf("%d random clients: proxy and Go model agree", clients)
}

// TestSameChoiceAsXDP runs the same connections through the loaded XDP
// program (BPF_PROG_TEST_RUN) and through the proxy's choice, with the same
// services, and requires the same backend every time: first choices by the
// ring, returning clients by the affinity table, a backend added (affinity
// holds), a backend drained (affinity to it ignored), and a backend down.
func TestSameChoiceAsXDP(t *testing.T) {
	f := bpftest.NewFixture(t, loaderOpts())
	p, _ := choiceProxy(t)
	fx := []bpftest.Service{
		{ID: 1, VIP: vip4, Proto: bpftest.TCP, Source: true, Backends: []uint32{1, 2, 3}},
		{ID: 2, VIP: netip.AddrPortFrom(vip4.Addr(), 443), Proto: bpftest.TCP, Backends: []uint32{4, 5, 6}},
		{ID: 3, VIP: vip6, Proto: bpftest.TCP, Source: true, Backends: []uint32{7, 8, 9}},
		{ID: 4, VIP: netip.AddrPortFrom(vip6.Addr(), 443), Proto: bpftest.TCP, Backends: []uint32{10, 11, 12}},
	}
	svcs := make([]*service, len(fx))
	for i, s := range fx {
		f.AddService(s)
		svcs[i] = newService(testService(t, s.ID, s.VIP, s.Source, s.Backends...), nil)
	}
	// Clients come back: 400 addresses of each family for 1,500
	// connections a phase.
	rnd := rand.New(rand.NewPCG(3, 4))
	var pool4, pool6 []netip.Addr
	for range 400 {
		pool4 = append(pool4, randomClient(rnd, false).Addr())
		pool6 = append(pool6, randomClient(rnd, true).Addr())
	}
	port := uint16(1024)
	phase := func(desc string) {
		t.Helper()
		const conns = 1500
		hits := 0
		for i := range conns {
			s := svcs[i%len(svcs)]
			pool := pool4
			if s.VIP.Is6() {
				pool = pool6
			}
			port++ // a new 5-tuple every time: never a connection-table hit
			client := netip.AddrPortFrom(pool[rnd.IntN(len(pool))], port)
			vip := netip.AddrPortFrom(s.VIP, s.Port)
			// An ACK, the handshake's last packet: the program records it.
			verdict, out := f.Run(bpftest.Frame{Src: client, Dst: vip, Proto: bpftest.TCP, Flags: bpftest.ACK}.Bytes())
			if verdict != bpftest.XDPTx {
				t.Fatalf("%s: %s → %s: verdict %d", desc, client, vip, verdict)
			}
			want, err := bpftest.BackendOf(out)
			if err != nil {
				t.Fatal(err)
			}
			before := s.stats.affinityHits.Load()
			if got := connect(p, s, client); got != want {
				t.Fatalf("%s: connection %d %s → %s: proxy chose backend %d, XDP program %d", desc, i, client, vip, got, want)
			}
			hits += int(s.stats.affinityHits.Load() - before)
		}
		t.Logf("%s: %d connections, same backend in both datapaths (%d by affinity)", desc, conns, hits)
	}
	phase("first connections")

	// A backend joins service 1; its new ring would move some clients, but
	// affinity keeps them.
	f.SetBackend(fx[0], 13, maps.StateActive)
	f.PublishRing(1, vip4.Addr(), 1, 2, 3, 13)
	ds := testService(t, 1, vip4, true, 1, 2, 3, 13)
	svcs[0] = newService(ds, svcs[0])
	phase("backend added")

	// Backend 2 drains: out of the ring, then the state.
	f.PublishRing(1, vip4.Addr(), 1, 3, 13)
	f.SetBackend(fx[0], 2, maps.StateDraining)
	svcs[0] = newService(withState(t, ds, 2, datapath.Draining), svcs[0])
	// Backend 8 of the IPv6 source-affinity service goes down.
	f.PublishRing(3, vip6.Addr(), 7, 9)
	f.SetBackend(fx[2], 8, maps.StateDown)
	svcs[2] = newService(withState(t, testService(t, 3, vip6, true, 7, 8, 9), 8, datapath.Down), svcs[2])
	phase("backend drained and backend down")
}

// TestAffinityOutlivesBackendAddedAndExpires is the proxy's version of the
// XDP program's test of the same name.
func TestAffinityOutlivesBackendAddedAndExpires(t *testing.T) {
	p, clk := choiceProxy(t)
	ds := testService(t, 1, vip4, true, 1, 2, 3)
	s := newService(ds, nil)
	cli := netip.MustParseAddr("198.51.100.7")
	first := connect(p, s, netip.AddrPortFrom(cli, 1000))
	// A fourth backend arrives; pretend the new ring hands every slot to it.
	ds.Backends = append(ds.Backends, datapath.Backend{ID: 13, Addr: bpftest.BackendAddr(vip4.Addr(), 13), Port: 8765, Weight: 1, State: datapath.Active})
	ds.Ring = fill(13)
	s = newService(ds, s)
	clk.add(30 * time.Minute)
	if got := connect(p, s, netip.AddrPortFrom(cli, 1001)); got != first {
		t.Fatalf("client's new connection went to %d, want its affinity backend %d", got, first)
	}
	// That connection refreshed the entry: an hour after the first one it
	// is still alive.
	clk.add(45 * time.Minute)
	if got := connect(p, s, netip.AddrPortFrom(cli, 1002)); got != first {
		t.Fatalf("connection 75 minutes after the first went to %d, want %d (entry refreshed at 30)", got, first)
	}
	// More than the timeout (1h) without a new connection: the ring decides.
	clk.add(time.Hour + time.Second)
	if got := connect(p, s, netip.AddrPortFrom(cli, 1003)); got != 13 {
		t.Fatalf("after the timeout the client went to %d, want the ring's 13", got)
	}
	e, ok := p.affinity.get(1, cli)
	if !ok || e.backend != 13 || e.lastSeen != clk.now() {
		t.Fatalf("affinity entry after expiry: %+v ok=%v, want backend 13, fresh", e, ok)
	}
	c := s.stats
	if c.newConns.Load() != 4 || c.affinityHits.Load() != 2 || c.affinityMisses.Load() != 2 {
		t.Fatalf("counters: %d new, %d hits, %d misses; want 4, 2, 2", c.newConns.Load(), c.affinityHits.Load(), c.affinityMisses.Load())
	}
}

// fill is a ring whose every slot holds id.
func fill(id uint32) []uint32 {
	r := make([]uint32, ringSize)
	for i := range r {
		r[i] = id
	}
	return r
}

// TestDrainingAndDown is the proxy's version of the XDP program's test of
// the same name, for the choice (established connections are in
// TestDrainDownThroughConnections).
func TestDrainingAndDown(t *testing.T) {
	for _, st := range []datapath.State{datapath.Draining, datapath.Down} {
		t.Run(st.String(), func(t *testing.T) {
			p, _ := choiceProxy(t)
			ds := testService(t, 1, vip4, true, 1, 2, 3)
			s := newService(ds, nil)
			cli := netip.MustParseAddr("198.51.100.7")
			b := connect(p, s, netip.AddrPortFrom(cli, 5000))
			s = newService(withState(t, ds, b, st), s)
			got := connect(p, s, netip.AddrPortFrom(cli, 5001))
			if got == b || got == 0 {
				t.Fatalf("new connection of a client with affinity to %s backend %d went to %d", st, b, got)
			}
			if e, _ := p.affinity.get(1, cli); e.backend != got {
				t.Fatalf("affinity entry points at %d, want %d", e.backend, got)
			}
			// Undrained (or up again): the client stays where it went.
			s = newService(ds, s)
			if again := connect(p, s, netip.AddrPortFrom(cli, 5002)); again != got {
				t.Fatalf("after %s backend %d is active again the client went to %d, want its affinity %d", st, b, again, got)
			}
		})
	}
}

// TestConnectionAffinityIgnoresTable checks that a connection-affinity
// service keeps no affinity entries and spreads a client's connections.
func TestConnectionAffinityIgnoresTable(t *testing.T) {
	p, _ := choiceProxy(t)
	s := newService(testService(t, 2, vip4, false, 1, 2, 3), nil)
	seen := map[uint32]int{}
	cli := netip.MustParseAddr("198.51.100.7")
	for port := uint16(2000); port < 2300; port++ {
		seen[connect(p, s, netip.AddrPortFrom(cli, port))]++
	}
	if len(seen) != 3 || seen[0] != 0 {
		t.Fatalf("300 connections of one client went to %v, want all three backends", seen)
	}
	if n := p.affinity.len(); n != 0 {
		t.Fatalf("affinity table has %d entries for a connection-affinity service", n)
	}
}

func TestAffinityTableBounded(t *testing.T) {
	tab := newAffinityTable(100)
	for i := range 1000 {
		tab.put(1, netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 1, int64(i))
	}
	if n := tab.len(); n != 100 {
		t.Fatalf("table of 100 holds %d entries", n)
	}
	// The last one in is there; most survivors are recent.
	if _, ok := tab.get(1, netip.AddrFrom4([4]byte{10, 0, 3, 231})); !ok {
		t.Fatal("newest entry evicted")
	}
	tab.deleteService(1)
	if n := tab.len(); n != 0 {
		t.Fatalf("%d entries left after deleting the service", n)
	}
}
