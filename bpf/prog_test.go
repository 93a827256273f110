package bpf_test

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/bpf"
	"github.com/tetherlb/tether/internal/bpftest"
	"github.com/tetherlb/tether/maglev"
	"github.com/tetherlb/tether/maps"
)

var (
	vip4 = netip.MustParseAddrPort("203.0.113.10:8765")
	vip6 = netip.MustParseAddrPort("[2001:db8:f::10]:8765")
	cli4 = netip.MustParseAddrPort("198.51.100.7:40000")
	cli6 = netip.MustParseAddrPort("[2001:db8:c::7]:40000")
)

// fourServices sets up TCP and UDP services over IPv4 and IPv6, source
// affinity on TCP and connection affinity on UDP, three backends each.
func fourServices(t *testing.T) (*bpftest.Fixture, []bpftest.Service) {
	return fourServicesForwarding(t, maps.ForwardDSR)
}

// fourServicesForwarding is fourServices in a forwarding mode; translated
// modes map the service port to backendPort, and fullnat comes from snat4
// or snat6.
func fourServicesForwarding(t *testing.T, mode uint8) (*bpftest.Fixture, []bpftest.Service) {
	f := bpftest.NewFixture(t, loaderOpts())
	return f, fourServicesWith(f, forwardingIn(mode))
}

// forwardingIn sets a service up to forward in mode: translated modes to
// backendPort, fullnat from snat4 or snat6.
func forwardingIn(mode uint8) func(*bpftest.Service) {
	return func(s *bpftest.Service) {
		s.Forwarding = mode
		if mode != maps.ForwardDSR {
			s.BackendPort = backendPort
		}
		if mode == maps.ForwardFullNAT {
			s.SNAT = snat4
			if s.VIP.Addr().Is6() {
				s.SNAT = snat6
			}
		}
	}
}

// fourServicesWith adds TCP and UDP services on vip4 and vip6 to f, each
// with three backends, after setup has its say on each.
func fourServicesWith(f *bpftest.Fixture, setup func(*bpftest.Service)) []bpftest.Service {
	svcs := []bpftest.Service{
		{ID: 1, VIP: vip4, Proto: bpftest.TCP, Source: true, Backends: []uint32{1, 2, 3}},
		{ID: 2, VIP: vip4, Proto: bpftest.UDP, Backends: []uint32{4, 5, 6}},
		{ID: 3, VIP: vip6, Proto: bpftest.TCP, Source: true, Backends: []uint32{7, 8, 9}},
		{ID: 4, VIP: vip6, Proto: bpftest.UDP, Backends: []uint32{10, 11, 12}},
	}
	for i := range svcs {
		setup(&svcs[i])
		f.AddService(svcs[i])
	}
	return svcs
}

// forwardCase is a packet of a client to one of fourServices.
type forwardCase struct {
	desc string
	svc  bpftest.Service
	cli  netip.AddrPort
	vlan uint16
}

// forwardCases are TCP and UDP over IPv4 and IPv6 to svcs (fourServices),
// and two with a VLAN tag.
func forwardCases(svcs []bpftest.Service) []forwardCase {
	return []forwardCase{
		{"TCP over IPv4", svcs[0], cli4, 0},
		{"UDP over IPv4", svcs[1], cli4, 0},
		{"TCP over IPv6", svcs[2], cli6, 0},
		{"UDP over IPv6", svcs[3], cli6, 0},
		{"TCP over IPv4 with a VLAN tag", svcs[0], cli4, 42},
		{"UDP over IPv6 with a VLAN tag", svcs[3], cli6, 42},
	}
}

// chatPayload is the payload of forwarded test frames.
var chatPayload = []byte("GET /chat HTTP/1.1\r\nUpgrade: websocket\r\n\r\n")

func TestForwardVIP(t *testing.T) {
	f, svcs := fourServices(t)
	payload := chatPayload
	for _, tc := range forwardCases(svcs) {
		t.Run(tc.desc, func(t *testing.T) {
			in := bpftest.Frame{Src: tc.cli, Dst: tc.svc.VIP, Proto: tc.svc.Proto, VLAN: tc.vlan, Payload: payload}.Bytes()
			verdict, out := f.Run(in)
			if verdict != bpftest.XDPTx {
				t.Fatalf("verdict %d, want XDP_TX", verdict)
			}
			id, err := bpftest.BackendOf(out)
			if err != nil {
				t.Fatal(err)
			}
			if !contains(tc.svc.Backends, id) {
				t.Fatalf("sent to backend %d, not one of the service's %v", id, tc.svc.Backends)
			}
			if !bytes.Equal(out[6:12], bpftest.LBMAC) {
				t.Errorf("source MAC %x, want the balancer's %x", out[6:12], bpftest.LBMAC)
			}
			if !bytes.Equal(out[12:], in[12:]) {
				t.Errorf("bytes after the MACs changed:\n got %x\nwant %x", out[12:], in[12:])
			}
		})
	}
}

func TestPassNotForVIP(t *testing.T) {
	f, _ := fourServices(t)
	arp := append(append(append([]byte{}, bpftest.LBMAC...), bpftest.ClientMAC...), 0x08, 0x06)
	arp = append(arp, make([]byte, 28)...)
	icmp := bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.TCP}.Bytes()
	icmp[14+9] = 1 // ICMP to the VIP
	icmp6 := bpftest.Frame{Src: cli6, Dst: vip6, Proto: bpftest.TCP}.Bytes()
	icmp6[14+6] = 58
	for _, tc := range []struct {
		desc   string
		frame  []byte
		reason string
	}{
		{"TCP to another address", bpftest.Frame{Src: cli4, Dst: netip.MustParseAddrPort("203.0.113.99:8765"), Proto: bpftest.TCP}.Bytes(), "pass_not_vip"},
		{"TCP to the VIP on another port", bpftest.Frame{Src: cli4, Dst: netip.MustParseAddrPort("203.0.113.10:22"), Proto: bpftest.TCP}.Bytes(), "pass_not_vip"},
		{"UDP to another IPv6 address", bpftest.Frame{Src: cli6, Dst: netip.MustParseAddrPort("[2001:db8::1]:53"), Proto: bpftest.UDP}.Bytes(), "pass_not_vip"},
		{"ARP", arp, "pass_not_ip"},
		{"ICMP to the VIP", icmp, "pass_not_tcp_udp"},
		{"ICMPv6 to the VIP", icmp6, "pass_not_tcp_udp"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			before := reasons(t, f)
			verdict, out := f.Run(tc.frame)
			if verdict != bpftest.XDPPass {
				t.Fatalf("verdict %d, want XDP_PASS", verdict)
			}
			if !bytes.Equal(out, tc.frame) {
				t.Fatalf("frame changed:\n got %x\nwant %x", out, tc.frame)
			}
			if d := reasons(t, f)[tc.reason] - before[tc.reason]; d != 1 {
				t.Errorf("counter %s moved by %d, want 1", tc.reason, d)
			}
		})
	}
}

// TestMalformedNeverForwarded runs the malformed corpus through every
// forwarding mode: nothing is forwarded, nor translated.
func TestMalformedNeverForwarded(t *testing.T) {
	for _, mode := range fuzzModes {
		t.Run(modeName(mode), func(t *testing.T) {
			if mode == maps.ForwardIPIP || mode == maps.ForwardGUE {
				// On a balancer with routes to the backends, where a
				// well-formed packet would leave encapsulated.
				e := newEncapLab(t, mode, false)
				malformedNeverForwarded(t, e.Fixture, func(frame []byte) (uint32, []byte) { return e.run(t, frame) })
				return
			}
			f, _ := fourServicesForwarding(t, mode)
			malformedNeverForwarded(t, f, f.Run)
		})
	}
}

func malformedNeverForwarded(t *testing.T, f *bpftest.Fixture, run func([]byte) (uint32, []byte)) {
	type bad struct {
		desc   string
		frame  []byte
		reason string
	}
	var corpus []bad
	valid := map[string][]byte{
		"TCP/IPv4":      bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.TCP, Payload: []byte("hello")}.Bytes(),
		"UDP/IPv4":      bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.UDP, Payload: []byte("hello")}.Bytes(),
		"TCP/IPv6":      bpftest.Frame{Src: cli6, Dst: vip6, Proto: bpftest.TCP, Payload: []byte("hello")}.Bytes(),
		"UDP/IPv6":      bpftest.Frame{Src: cli6, Dst: vip6, Proto: bpftest.UDP, Payload: []byte("hello")}.Bytes(),
		"TCP/IPv4/VLAN": bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.TCP, VLAN: 7, Payload: []byte("hello")}.Bytes(),
	}
	// Cut every valid frame at every length the kernel lets us run (the test
	// run refuses frames shorter than an Ethernet header).
	for name, frame := range valid {
		for n := 14; n < len(frame); n++ {
			corpus = append(corpus, bad{desc: name + " cut", frame: frame[:n], reason: "drop_truncated"})
		}
	}
	mut := func(name string, off int, v byte) []byte {
		b := bytes.Clone(valid[name])
		b[off] = v
		return b
	}
	const ip = bpftest.L3Offset
	withOptions := bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.TCP}.Bytes()
	withOptions = append(withOptions[:ip+20], append([]byte{1, 1, 1, 0}, withOptions[ip+20:]...)...)
	withOptions[ip] = 0x46
	binary.BigEndian.PutUint16(withOptions[ip+2:], uint16(len(withOptions)-ip))
	qinq := bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.TCP, VLAN: 7}.Bytes()
	qinq = append(qinq[:16], append([]byte{0x81, 0x00, 0x00, 0x08}, qinq[16:]...)...)
	corpus = append(corpus,
		bad{"IHL 4", mut("TCP/IPv4", ip, 0x44), "drop_bad_header"},
		bad{"IHL 0", mut("TCP/IPv4", ip, 0x40), "drop_bad_header"},
		bad{"IP version 5 in an IPv4 frame", mut("TCP/IPv4", ip, 0x55), "drop_bad_header"},
		bad{"IP version 4 in an IPv6 frame", mut("TCP/IPv6", ip, 0x40), "drop_bad_header"},
		bad{"IPv4 options", withOptions, "pass_ipv4_options"},
		bad{"IPv4 total length 0", func() []byte { b := mut("TCP/IPv4", ip+2, 0); b[ip+3] = 0; return b }(), "drop_bad_header"},
		bad{"IPv4 total length past the frame", mut("UDP/IPv4", ip+2, 0x40), "drop_truncated"},
		bad{"IPv6 payload length past the frame", mut("UDP/IPv6", ip+4, 0x40), "drop_truncated"},
		bad{"IPv4 fragment with more to come", mut("TCP/IPv4", ip+6, 0x20), "pass_ipv4_fragment"},
		bad{"IPv4 fragment at an offset", func() []byte { b := mut("UDP/IPv4", ip+6, 0); b[ip+7] = 8; return b }(), "pass_ipv4_fragment"},
		bad{"IPv6 hop-by-hop header", mut("TCP/IPv6", ip+6, 0), "pass_ipv6_extension"},
		bad{"IPv6 routing header", mut("TCP/IPv6", ip+6, 43), "pass_ipv6_extension"},
		bad{"IPv6 fragment header", mut("UDP/IPv6", ip+6, 44), "pass_ipv6_extension"},
		bad{"IPv6 destination options", mut("TCP/IPv6", ip+6, 60), "pass_ipv6_extension"},
		bad{"TCP data offset 4", mut("TCP/IPv4", ip+20+12, 0x40), "drop_tcp_offset"},
		bad{"two VLAN tags", qinq, "pass_vlan_stack"},
	)
	for _, tc := range corpus {
		before := reasons(t, f)
		verdict, out := run(tc.frame)
		if verdict == bpftest.XDPTx || verdict == bpftest.XDPRedirect || verdict == bpftest.XDPAborted {
			t.Errorf("%s (%d bytes): verdict %d", tc.desc, len(tc.frame), verdict)
			continue
		}
		if !bytes.Equal(out, tc.frame) {
			t.Errorf("%s (%d bytes): the program changed the frame it did not forward:\n got %x\nwant %x", tc.desc, len(tc.frame), out, tc.frame)
		}
		after := reasons(t, f)
		if d := after[tc.reason] - before[tc.reason]; d != 1 {
			t.Errorf("%s (%d bytes): counter %s moved by %d, want 1 (%v)", tc.desc, len(tc.frame), tc.reason, d, diff(before, after))
		}
	}
	t.Logf("%d malformed or unsupported frames, none forwarded", len(corpus))
}

// TestChoiceMatchesModel checks the program against the Go model: for
// random flows the backend it picks is ring[hash % M] computed in Go.
func TestChoiceMatchesModel(t *testing.T) {
	f, svcs := fourServices(t)
	rnd := rand.New(rand.NewPCG(1, 2))
	const flows = 12000
	for i := 0; i < flows; i++ {
		s := svcs[i%len(svcs)]
		var client netip.Addr
		if s.VIP.Addr().Is4() {
			client = netip.AddrFrom4([4]byte{198, 51, 100, byte(rnd.UintN(256))})
			if i%2 == 0 {
				client = netip.AddrFrom4([4]byte{byte(rnd.UintN(256)), byte(rnd.UintN(256)), byte(rnd.UintN(256)), byte(rnd.UintN(256))})
			}
		} else {
			var b [16]byte
			binary.BigEndian.PutUint64(b[:], 0x20010db8_00000000|rnd.Uint64()&0xffffffff)
			binary.BigEndian.PutUint64(b[8:], rnd.Uint64())
			client = netip.AddrFrom16(b)
		}
		src := netip.AddrPortFrom(client, uint16(1024+rnd.UintN(60000)))
		// A bare SYN is not recorded, so every flow takes the ring.
		verdict, out := f.Run(bpftest.Frame{Src: src, Dst: s.VIP, Proto: s.Proto, Flags: bpftest.SYN}.Bytes())
		if s.Proto == bpftest.UDP {
			verdict, out = f.Run(bpftest.Frame{Src: src, Dst: s.VIP, Proto: s.Proto}.Bytes())
		}
		if verdict != bpftest.XDPTx {
			t.Fatalf("flow %d: verdict %d", i, verdict)
		}
		got, err := bpftest.BackendOf(out)
		if err != nil {
			t.Fatal(err)
		}
		var h uint32
		if s.Source {
			h = maglev.SourceHash(f.Seed, client)
		} else {
			h = maglev.ConnHash(f.Seed, client, src.Port(), s.VIP.Port(), s.Proto)
		}
		ring := f.Ring(s.VIP.Addr(), s.Backends...)
		if want := ring[h%uint32(len(ring))]; got != want {
			t.Fatalf("flow %d %s → %s/%d: program chose backend %d, model %d", i, src, s.VIP, s.Proto, got, want)
		}
		if s.Proto == bpftest.UDP {
			// UDP flows are recorded on their first packet; keep the table clean
			// so the next flow is judged by the ring alone.
			if _, err := f.Maps.FlushFlows(); err != nil {
				t.Fatal(err)
			}
		}
	}
	t.Logf("%d random flows: program and Go model agree", flows)
}

func TestSourceAffinityAllPorts(t *testing.T) {
	f, svcs := fourServices(t)
	for _, tc := range []struct {
		svc bpftest.Service
		cli netip.Addr
	}{{svcs[0], cli4.Addr()}, {svcs[2], cli6.Addr()}} {
		seen := map[uint32]int{}
		for port := uint16(20000); port < 20500; port++ {
			src := netip.AddrPortFrom(tc.cli, port)
			for _, flags := range []uint8{bpftest.SYN, bpftest.ACK} {
				_, out := f.Run(bpftest.Frame{Src: src, Dst: tc.svc.VIP, Proto: bpftest.TCP, Flags: flags}.Bytes())
				id, err := bpftest.BackendOf(out)
				if err != nil {
					t.Fatal(err)
				}
				seen[id]++
			}
		}
		if len(seen) != 1 {
			t.Fatalf("%s: 500 ports of one client reached backends %v, want one", tc.cli, seen)
		}
	}
}

// TestConnectionAffinitySpreads checks that connection affinity does spread
// one client's connections (it keys by the whole 5-tuple).
func TestConnectionAffinitySpreads(t *testing.T) {
	f, _ := fourServices(t)
	seen := map[uint32]int{}
	for port := uint16(20000); port < 20300; port++ {
		_, out := f.Run(bpftest.Frame{Src: netip.AddrPortFrom(cli4.Addr(), port), Dst: vip4, Proto: bpftest.UDP}.Bytes())
		id, _ := bpftest.BackendOf(out)
		seen[id]++
	}
	if len(seen) != 3 {
		t.Fatalf("300 connections of one client reached %v, want all three backends", seen)
	}
	for id, n := range seen {
		if n < 60 {
			t.Errorf("backend %d got %d of 300 connections", id, n)
		}
	}
}

// backendFor sends one packet of flow src→s.VIP and returns the backend.
func backendFor(t *testing.T, f *bpftest.Fixture, s bpftest.Service, src netip.AddrPort, flags uint8) uint32 {
	t.Helper()
	verdict, out := f.Run(bpftest.Frame{Src: src, Dst: s.VIP, Proto: s.Proto, Flags: flags}.Bytes())
	if verdict != bpftest.XDPTx {
		t.Fatalf("%s: verdict %d, want XDP_TX", src, verdict)
	}
	id, err := bpftest.BackendOf(out)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func TestConnEntryOutlivesRingChange(t *testing.T) {
	f, svcs := fourServices(t)
	s := svcs[1] // connection affinity: only the connection table remembers
	src := netip.AddrPortFrom(cli4.Addr(), 33333)
	first := backendFor(t, f, s, src, 0)
	others := without(s.Backends, first)
	f.PublishRing(s.ID, s.VIP.Addr(), others[0]) // every slot → another backend
	if got := backendFor(t, f, s, src, 0); got != first {
		t.Fatalf("established flow moved from backend %d to %d after a ring change", first, got)
	}
	if got := backendFor(t, f, s, netip.AddrPortFrom(cli4.Addr(), 33334), 0); got != others[0] {
		t.Fatalf("new flow went to %d, want the new ring's %d", got, others[0])
	}
	if _, err := f.Maps.FlushFlows(); err != nil {
		t.Fatal(err)
	}
	if got := backendFor(t, f, s, src, 0); got != others[0] {
		t.Fatalf("after a flush the flow went to %d, want the ring's %d", got, others[0])
	}
}

func TestAffinityOutlivesBackendAddedAndExpires(t *testing.T) {
	f, svcs := fourServices(t)
	s := svcs[0]
	first := backendFor(t, f, s, netip.AddrPortFrom(cli4.Addr(), 1000), 0)
	// A fourth backend arrives; pretend the new ring hands every slot to it.
	f.SetBackend(s, 13, maps.StateActive)
	f.PublishRing(s.ID, s.VIP.Addr(), 13)
	if got := backendFor(t, f, s, netip.AddrPortFrom(cli4.Addr(), 1001), 0); got != first {
		t.Fatalf("client's new connection went to %d, want its affinity backend %d", got, first)
	}
	// The SYN of a further connection also follows the affinity entry.
	if got := backendFor(t, f, s, netip.AddrPortFrom(cli4.Addr(), 1002), bpftest.SYN); got != first {
		t.Fatalf("SYN went to %d, want %d", got, first)
	}
	// Age the entry past the service's timeout (1h in the fixture).
	if err := f.Maps.PutAffinity(s.ID, cli4.Addr(), first, time.Hour+time.Second); err != nil {
		t.Fatal(err)
	}
	if got := backendFor(t, f, s, netip.AddrPortFrom(cli4.Addr(), 1003), 0); got != 13 {
		t.Fatalf("after the timeout the client went to %d, want the ring's 13", got)
	}
	a, ok, err := f.Maps.LookupAffinity(s.ID, cli4.Addr())
	if err != nil || !ok || a.Backend != 13 || a.Age > time.Minute {
		t.Fatalf("affinity entry after expiry: %+v ok=%v err=%v, want backend 13, fresh", a, ok, err)
	}
	// The established flow of before keeps its backend.
	if got := backendFor(t, f, s, netip.AddrPortFrom(cli4.Addr(), 1000), 0); got != first {
		t.Fatalf("established flow moved to %d", got)
	}
}

// TestAffinityStampAhead: an affinity entry the daemon writes (a renewal,
// another host's choice) is stamped with CLOCK_MONOTONIC, which runs up to
// a tick ahead of the program's coarse clock. Such an entry is fresh: the
// client's next connection follows it, and does not take the ring's
// choice as if the entry had expired.
func TestAffinityStampAhead(t *testing.T) {
	f, svcs := fourServices(t)
	s := svcs[0] // IPv4, TCP, source affinity
	first := s.Backends[0]
	f.PublishRing(s.ID, s.VIP.Addr(), s.Backends[1]) // the ring chooses another backend
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	k := bpf.TetherAffinityKey{Addr: maglev.AddrWords(cli4.Addr()), Service: s.ID}
	v := bpf.TetherAffinity{Backend: first, LastSeenNs: uint64(ts.Nano()) + uint64(20*time.Millisecond)}
	if err := f.Maps.Raw().Affinities.Put(&k, &v); err != nil {
		t.Fatal(err)
	}
	if got := backendFor(t, f, s, netip.AddrPortFrom(cli4.Addr(), 2000), 0); got != first {
		t.Fatalf("a client whose entry is stamped ahead of the program's clock went to %d, want its affinity backend %d", got, first)
	}
}

// TestAffinityHitRefreshesInPlace: a new connection that its client's
// affinity entry sends marks the entry seen (a bare SYN does not: its
// handshake's next packet does), and takes no element from the LRU: with
// the affinity table full, reconnecting clients push no other client out.
// On one CPU, so that no CPU holds spare elements of the LRU: writing the
// entry again, as the program did before, evicts a client each time.
func TestAffinityHitRefreshesInPlace(t *testing.T) {
	for _, mode := range []uint8{maps.ForwardDSR, maps.ForwardFullNAT} {
		t.Run(modeName(mode), func(t *testing.T) {
			onOneCPU(t)
			const entries = 512
			f := bpftest.NewFixture(t, loaderOptsSized(1<<14, entries))
			s := fourServicesWith(f, forwardingIn(mode))[2] // IPv6, TCP, source affinity
			client := func(i int) netip.Addr {
				return netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0x0a, 14: byte(i >> 8), 15: byte(i)})
			}
			const age = 10 * time.Minute
			for i := range entries {
				if err := f.Maps.PutAffinity(s.ID, client(i), s.Backends[i%3], age); err != nil {
					t.Fatal(err)
				}
			}
			for i := range entries {
				if _, ok, err := f.Maps.LookupAffinity(s.ID, client(i)); err != nil || !ok {
					t.Fatalf("client %d of %d put in the affinity table is not there (%v)", i, entries, err)
				}
			}
			before, err := f.Maps.ServiceCounters(s.ID)
			if err != nil {
				t.Fatal(err)
			}
			// Every other client of the first 128 opens a connection:
			// the SYN, then the handshake's ACK.
			var reconnecting []int
			for i := 0; i < 128; i += 2 {
				reconnecting = append(reconnecting, i)
				src := netip.AddrPortFrom(client(i), 40000)
				want := s.Backends[i%3]
				if got := backendFor(t, f, s, src, bpftest.SYN); got != want {
					t.Fatalf("client %d's SYN went to %d, want its affinity backend %d", i, got, want)
				}
				switch a, ok, err := f.Maps.LookupAffinity(s.ID, client(i)); {
				case err != nil:
					t.Fatal(err)
				case !ok:
					t.Fatalf("client %d's affinity entry is gone after %d clients reconnected", i, len(reconnecting)-1)
				case a.Age < age:
					t.Fatalf("client %d's entry after a bare SYN is %v old, want it untouched (%v)", i, a.Age, age)
				}
				if got := backendFor(t, f, s, src, 0); got != want {
					t.Fatalf("client %d's ACK went to %d, want its affinity backend %d", i, got, want)
				}
			}
			for i := range entries {
				a, ok, err := f.Maps.LookupAffinity(s.ID, client(i))
				switch {
				case err != nil:
					t.Fatal(err)
				case !ok:
					t.Fatalf("client %d's affinity entry is gone after %d clients reconnected", i, len(reconnecting))
				case a.Backend != s.Backends[i%3]:
					t.Fatalf("client %d's entry names backend %d, want %d", i, a.Backend, s.Backends[i%3])
				case slices.Contains(reconnecting, i) && a.Age > time.Minute:
					t.Fatalf("client %d reconnected, but its entry is %v old", i, a.Age)
				case !slices.Contains(reconnecting, i) && a.Age < age:
					t.Fatalf("client %d did not reconnect, but its entry is %v old, want %v", i, a.Age, age)
				}
			}
			after, err := f.Maps.ServiceCounters(s.ID)
			if err != nil {
				t.Fatal(err)
			}
			if hits := after.AffinityHits - before.AffinityHits; hits != uint64(len(reconnecting)) {
				t.Fatalf("%d affinity hits counted, want %d (one a recorded connection)", hits, len(reconnecting))
			}
		})
	}
}

func TestDrainingAndDown(t *testing.T) {
	for _, tc := range []struct {
		desc  string
		state uint8
	}{{"draining", maps.StateDraining}, {"down", maps.StateDown}} {
		t.Run(tc.desc, func(t *testing.T) {
			f, svcs := fourServices(t)
			s := svcs[0]
			est := netip.AddrPortFrom(cli4.Addr(), 5000)
			b := backendFor(t, f, s, est, 0)
			rest := without(s.Backends, b)
			// Out of the ring first, then the state: the control plane's order.
			f.PublishRing(s.ID, s.VIP.Addr(), rest...)
			f.SetBackend(s, b, tc.state)
			if got := backendFor(t, f, s, est, 0); got != b {
				t.Fatalf("established connection moved from %s backend %d to %d", tc.desc, b, got)
			}
			got := backendFor(t, f, s, netip.AddrPortFrom(cli4.Addr(), 5001), 0)
			if got == b || !contains(rest, got) {
				t.Fatalf("new connection of a client with affinity to %s backend %d went to %d", tc.desc, b, got)
			}
			a, _, _ := f.Maps.LookupAffinity(s.ID, cli4.Addr())
			if a.Backend != got {
				t.Fatalf("affinity entry points at %d, want %d", a.Backend, got)
			}
		})
	}
}

// TestSYNReusingTupleOfDrainedOrDown checks a new handshake on the 5-tuple
// of a connection whose backend takes no new connections any more
// (draining, down, down with on_down: reset), as a client that reuses a
// port makes it: the SYN chooses again among the active backends and the
// entry follows it, so that the handshake's next packets reach the same
// backend. Until then the old connection's packets went where its
// backend's state says: on for draining and down, reset for down-reset.
func TestSYNReusingTupleOfDrainedOrDown(t *testing.T) {
	for _, tc := range []struct {
		desc  string
		state uint8
	}{{"draining", maps.StateDraining}, {"down", maps.StateDown}, {"down-reset", maps.StateDownReset}} {
		t.Run(tc.desc, func(t *testing.T) {
			f, svcs := fourServices(t)
			for _, s := range []bpftest.Service{svcs[0], svcs[2]} { // TCP over IPv4, IPv6
				src := netip.AddrPortFrom(cli4.Addr(), 6000)
				if s.VIP.Addr().Is6() {
					src = netip.AddrPortFrom(cli6.Addr(), 6000)
				}
				b := backendFor(t, f, s, src, bpftest.ACK)
				rest := without(s.Backends, b)
				f.PublishRing(s.ID, s.VIP.Addr(), rest...)
				f.SetBackend(s, b, tc.state)
				if tc.state != maps.StateDownReset {
					if got := backendFor(t, f, s, src, bpftest.ACK); got != b {
						t.Fatalf("%s: established flow left %s backend %d for %d", s.VIP, tc.desc, b, got)
					}
				}
				syn := backendFor(t, f, s, src, bpftest.SYN)
				if !contains(rest, syn) {
					t.Fatalf("%s: SYN on the 5-tuple of %s backend %d went to %d, want one of %v", s.VIP, tc.desc, b, syn, rest)
				}
				fl, ok, err := f.Maps.LookupFlow(src, s.VIP, bpftest.TCP)
				if err != nil || !ok || fl.Backend != syn {
					t.Fatalf("%s: entry after the SYN: %+v ok=%v err=%v, want backend %d", s.VIP, fl, ok, err, syn)
				}
				if got := backendFor(t, f, s, src, bpftest.ACK); got != syn {
					t.Fatalf("%s: the handshake's ACK went to %d, its SYN to %d", s.VIP, got, syn)
				}
			}
		})
	}
}

func TestRemovedBackendFlowsChooseAgain(t *testing.T) {
	f, svcs := fourServices(t)
	s := svcs[1]
	src := netip.AddrPortFrom(cli4.Addr(), 7000)
	b := backendFor(t, f, s, src, 0)
	rest := without(s.Backends, b)
	f.PublishRing(s.ID, s.VIP.Addr(), rest...)
	if err := f.Maps.ClearBackend(b); err != nil {
		t.Fatal(err)
	}
	if got := backendFor(t, f, s, src, 0); !contains(rest, got) {
		t.Fatalf("flow of a removed backend went to %d, want one of %v", got, rest)
	}
}

// TestNoBackendResets checks that TCP to a service without a usable backend
// is answered with a well-formed RST back to the client (so that it fails
// at once), and UDP is dropped; both are counted.
func TestNoBackendResets(t *testing.T) {
	f := bpftest.NewFixture(t, loaderOpts())
	f.AddService(bpftest.Service{ID: 1, VIP: vip4, Proto: bpftest.TCP})
	f.AddService(bpftest.Service{ID: 2, VIP: vip6, Proto: bpftest.TCP})
	f.AddService(bpftest.Service{ID: 3, VIP: vip4, Proto: bpftest.UDP})
	for _, tc := range []struct {
		desc  string
		frame bpftest.Frame
		seq   uint32 // of the RST
		ack   uint32 // 0: no ACK flag
	}{
		{"SYN over IPv4", bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.TCP, Flags: bpftest.SYN, Seq: 1000}, 0, 1001},
		{"SYN over IPv6", bpftest.Frame{Src: cli6, Dst: vip6, Proto: bpftest.TCP, Flags: bpftest.SYN, Seq: 7}, 0, 8},
		{"SYN over IPv4 with a VLAN tag", bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.TCP, Flags: bpftest.SYN, VLAN: 9, Seq: 5}, 0, 6},
		{"data with ACK over IPv4", bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.TCP, Flags: bpftest.ACK | bpftest.PSH, Seq: 10, Ack: 777, Payload: []byte("hello")}, 777, 0},
		{"FIN without ACK over IPv6", bpftest.Frame{Src: cli6, Dst: vip6, Proto: bpftest.TCP, Flags: bpftest.FIN, Seq: 50, Payload: []byte("abc")}, 0, 54},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			before := reasons(t, f)
			in := tc.frame.Bytes()
			verdict, out := f.Run(in)
			if verdict != bpftest.XDPTx {
				t.Fatalf("verdict %d, want XDP_TX (a RST back to the client)", verdict)
			}
			rst, err := bpftest.ParseTCP(out)
			if err != nil {
				t.Fatal(err)
			}
			if err := bpftest.VerifyChecksums(out); err != nil {
				t.Fatal(err)
			}
			want := bpftest.TCPSegment{
				SrcMAC: bpftest.LBMAC.String(), DstMAC: bpftest.ClientMAC.String(), VLAN: tc.frame.VLAN,
				Src: tc.frame.Dst, Dst: tc.frame.Src, Seq: tc.seq, Ack: tc.ack, Flags: bpftest.RST, PayloadLen: 0,
			}
			if tc.ack != 0 {
				want.Flags |= bpftest.ACK
			}
			if rst != want {
				t.Fatalf("RST\n got %+v\nwant %+v", rst, want)
			}
			if d := reasons(t, f)["reset_no_backend"] - before["reset_no_backend"]; d != 1 {
				t.Errorf("reset_no_backend moved by %d, want 1", d)
			}
		})
	}
	t.Run("a RST is not answered", func(t *testing.T) {
		verdict, _ := f.Run(bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.TCP, Flags: bpftest.RST}.Bytes())
		if verdict != bpftest.XDPDrop {
			t.Fatalf("verdict %d, want XDP_DROP", verdict)
		}
	})
	t.Run("UDP is dropped", func(t *testing.T) {
		before := reasons(t, f)
		verdict, _ := f.Run(bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.UDP}.Bytes())
		if verdict != bpftest.XDPDrop {
			t.Fatalf("verdict %d, want XDP_DROP", verdict)
		}
		if d := reasons(t, f)["drop_no_backend"] - before["drop_no_backend"]; d != 1 {
			t.Errorf("drop_no_backend moved by %d, want 1", d)
		}
	})
}

// outOfRing takes backend id of s out of its ring and gives it state.
func outOfRing(f *bpftest.Fixture, s bpftest.Service, id uint32, state uint8) {
	f.PublishRing(s.ID, s.VIP.Addr(), without(s.Backends, id)...)
	f.SetBackend(s, id, state)
}

// TestDownReset checks on_down: reset: packets of an established TCP
// connection to a down backend are answered with a RST, a new handshake on
// the same 5-tuple and UDP flows choose again.
func TestDownReset(t *testing.T) {
	f, svcs := fourServices(t)
	tcp, udp := svcs[0], svcs[1]
	src := netip.AddrPortFrom(cli4.Addr(), 4444)
	b := backendFor(t, f, tcp, src, bpftest.ACK)
	ub := backendFor(t, f, udp, src, 0)
	outOfRing(f, tcp, b, maps.StateDownReset)
	outOfRing(f, udp, ub, maps.StateDownReset)
	before := reasons(t, f)
	verdict, out := f.Run(bpftest.Frame{Src: src, Dst: tcp.VIP, Proto: bpftest.TCP, Flags: bpftest.ACK, Seq: 1, Ack: 99}.Bytes())
	if verdict != bpftest.XDPTx {
		t.Fatalf("verdict %d, want a RST", verdict)
	}
	rst, err := bpftest.ParseTCP(out)
	if err != nil || rst.Flags != bpftest.RST || rst.Seq != 99 || rst.Dst != src {
		t.Fatalf("want a RST with seq 99 to %s, got %+v (%v)", src, rst, err)
	}
	if d := reasons(t, f)["reset_backend_down"] - before["reset_backend_down"]; d != 1 {
		t.Errorf("reset_backend_down moved by %d, want 1", d)
	}
	if got := backendFor(t, f, tcp, src, bpftest.SYN); got == b {
		t.Fatalf("new SYN on the 5-tuple went to the down backend %d", b)
	}
	if got := backendFor(t, f, udp, src, 0); got == ub {
		t.Fatalf("UDP flow stayed on the down backend %d", ub)
	}
	// Without on_down: reset (plain down) the connection keeps flowing:
	// TestDrainingAndDown.
}

// TestDrainCloses checks what a paced drain's close does (maps
// CloseFlows): the closed TCP connection's next packet is answered with a
// RST and counted as reset_drained, a new handshake on its 5-tuple chooses
// again among the active backends, a closed UDP flow chooses again, and a
// connection of the same draining backend that was not closed flows on.
// A flow closed already, gone, or on another backend is not closed again.
func TestDrainCloses(t *testing.T) {
	f, svcs := fourServices(t)
	tcp, udp := svcs[0], svcs[1]
	closed := netip.AddrPortFrom(cli4.Addr(), 4444)
	b := backendFor(t, f, tcp, closed, bpftest.ACK)
	// Another connection of the same backend, which stays.
	var kept netip.AddrPort
	for p := uint16(5000); ; p++ {
		kept = netip.AddrPortFrom(cli4.Addr(), p)
		if backendFor(t, f, tcp, kept, bpftest.ACK) == b {
			break
		}
	}
	ub := backendFor(t, f, udp, closed, 0)
	outOfRing(f, tcp, b, maps.StateDraining)
	outOfRing(f, udp, ub, maps.StateDraining)
	flows := []maps.Flow{
		{Client: closed, VIP: tcp.VIP, Proto: bpftest.TCP, Service: tcp.ID, Backend: b},
		{Client: closed, VIP: udp.VIP, Proto: bpftest.UDP, Service: udp.ID, Backend: ub},
		{Client: kept, VIP: tcp.VIP, Proto: bpftest.TCP, Service: tcp.ID, Backend: b + 100},                         // another backend
		{Client: netip.AddrPortFrom(cli4.Addr(), 9), VIP: tcp.VIP, Proto: bpftest.TCP, Service: tcp.ID, Backend: b}, // no entry
	}
	got, err := f.Maps.CloseFlows(flows)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Client != closed || got[1].Proto != bpftest.UDP || !got[0].Closing {
		t.Fatalf("CloseFlows closed %+v, want the TCP and UDP flows of %s", got, closed)
	}
	if again, err := f.Maps.CloseFlows(flows[:1]); err != nil || len(again) != 0 {
		t.Fatalf("closing a closed flow again closed %+v (%v)", again, err)
	}
	if fl, ok, err := f.Maps.LookupFlow(closed, tcp.VIP, bpftest.TCP); err != nil || !ok || !fl.Closing {
		t.Fatalf("entry of the closed flow: %+v ok=%v err=%v, want closing", fl, ok, err)
	}

	if got := backendFor(t, f, tcp, kept, bpftest.ACK); got != b {
		t.Fatalf("the connection not closed left draining backend %d for %d", b, got)
	}
	before := reasons(t, f)
	verdict, out := f.Run(bpftest.Frame{Src: closed, Dst: tcp.VIP, Proto: bpftest.TCP, Flags: bpftest.ACK | bpftest.PSH, Seq: 1, Ack: 99, Payload: []byte("hi")}.Bytes())
	if verdict != bpftest.XDPTx {
		t.Fatalf("verdict %d, want a RST", verdict)
	}
	rst, err := bpftest.ParseTCP(out)
	if err != nil || rst.Flags != bpftest.RST || rst.Seq != 99 || rst.Dst != closed || rst.Src != tcp.VIP {
		t.Fatalf("want a RST with seq 99 from %s to %s, got %+v (%v)", tcp.VIP, closed, rst, err)
	}
	if err := bpftest.VerifyChecksums(out); err != nil {
		t.Fatal(err)
	}
	after := reasons(t, f)
	if d := after["reset_drained"] - before["reset_drained"]; d != 1 {
		t.Errorf("reset_drained moved by %d, want 1", d)
	}
	if d := after["reset_backend_down"] - before["reset_backend_down"]; d != 0 {
		t.Errorf("reset_backend_down moved by %d, want 0", d)
	}
	syn := backendFor(t, f, tcp, closed, bpftest.SYN)
	if syn == b {
		t.Fatalf("a new SYN on the closed 5-tuple went to the draining backend %d", b)
	}
	if got := backendFor(t, f, tcp, closed, bpftest.ACK); got != syn {
		t.Fatalf("the new handshake's ACK went to %d, its SYN to %d", got, syn)
	}
	if got := backendFor(t, f, udp, closed, 0); got == ub {
		t.Fatalf("the closed UDP flow stayed on the draining backend %d", ub)
	}
}

// TestConnSeen checks that a connection entry notes when its flow's last
// packet came (honest counts): a new entry at once, an entry whose time is
// old on its next packet, so that the listing shows how long each flow
// has been idle, to about a second; the low byte of flags is kept.
func TestConnSeen(t *testing.T) {
	f, svcs := fourServices(t)
	s := svcs[0]
	src := netip.AddrPortFrom(cli4.Addr(), 4321)
	b := backendFor(t, f, s, src, bpftest.ACK)
	k := bpf.TetherFlowKey4{Src: maglev.AddrWords(src.Addr())[0], Dst: maglev.AddrWords(s.VIP.Addr())[0],
		Sport: maps.Port(src.Port()), Dport: maps.Port(s.VIP.Port()), Proto: bpftest.TCP}
	read := func() bpf.TetherConn {
		var v bpf.TetherConn
		if err := f.Maps.Raw().Conns4.Lookup(&k, &v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	v := read()
	if v.Flags>>8 == 0 {
		t.Fatalf("a new entry's flags %#x hold no time", v.Flags)
	}
	// Within a unit: the clock may have crossed one since.
	if fl, _, _ := f.Maps.LookupFlow(src, s.VIP, bpftest.TCP); fl.Idle > 1<<30 {
		t.Fatalf("a flow that just sent shows %v idle", fl.Idle)
	}
	// Ten units (of 2^30 ns) earlier, with a flag in the low byte.
	v.Flags = (v.Flags - 10<<8) | 1<<4
	if err := f.Maps.Raw().Conns4.Update(&k, &v, ebpf.UpdateExist); err != nil {
		t.Fatal(err)
	}
	fl, _, _ := f.Maps.LookupFlow(src, s.VIP, bpftest.TCP)
	if fl.Idle < 10<<30 || fl.Idle > 11<<30 {
		t.Fatalf("a flow last seen 10 units ago shows %v idle", fl.Idle)
	}
	if got := backendFor(t, f, s, src, bpftest.ACK); got != b {
		t.Fatalf("the flow went to %d, its entry says %d", got, b)
	}
	if fl, _, _ := f.Maps.LookupFlow(src, s.VIP, bpftest.TCP); fl.Idle > 1<<30 || fl.Learned {
		t.Fatalf("after its next packet the flow shows %v idle, learned %v; want 0 and the learned flag cleared", fl.Idle, fl.Learned)
	}
	if v := read(); v.Flags&0xff != 0 || v.Backend != b {
		t.Fatalf("after its next packet the entry holds %+v", v)
	}
}

// TestSYNFloodKeepsEstablished fills a small connection table with
// established flows, then sends ten times its size in spoofed SYNs.
func TestSYNFloodKeepsEstablished(t *testing.T) {
	f := bpftest.NewFixture(t, loaderOptsSized(4096, 4096))
	s := bpftest.Service{ID: 1, VIP: vip4, Proto: bpftest.TCP, Source: true, Backends: []uint32{1, 2, 3}}
	f.AddService(s)
	const established = 1000
	want := map[netip.AddrPort]uint32{}
	for i := 0; i < established; i++ {
		src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 51, 100, byte(i % 250)}), uint16(10000+i))
		want[src] = backendFor(t, f, s, src, 0)
	}
	rnd := rand.New(rand.NewPCG(3, 4))
	for i := 0; i < 40960; i++ {
		src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{byte(rnd.UintN(223) + 1), byte(rnd.UintN(256)), byte(rnd.UintN(256)), byte(rnd.UintN(256))}), uint16(rnd.UintN(65535)+1))
		backendFor(t, f, s, src, bpftest.SYN)
	}
	for src, b := range want {
		fl, ok, err := f.Maps.LookupFlow(src, vip4, bpftest.TCP)
		if err != nil || !ok {
			t.Fatalf("entry of established flow %s gone after the SYN flood (err %v)", src, err)
		}
		if fl.Backend != b {
			t.Fatalf("flow %s: entry says backend %d, want %d", src, fl.Backend, b)
		}
	}
	flows, err := f.Maps.Flows()
	if err != nil {
		t.Fatal(err)
	}
	if len(flows) != established {
		t.Fatalf("connection table holds %d entries after the flood, want %d", len(flows), established)
	}
}

func TestCounters(t *testing.T) {
	f, svcs := fourServices(t)
	s := svcs[0]
	frame := bpftest.Frame{Src: cli4, Dst: s.VIP, Proto: s.Proto, Payload: make([]byte, 100)}.Bytes()
	var id uint32
	for i := 0; i < 5; i++ {
		_, out := f.Run(frame)
		id, _ = bpftest.BackendOf(out)
	}
	bc, err := f.Maps.BackendCounters(id)
	if err != nil {
		t.Fatal(err)
	}
	if bc.Packets != 5 || bc.Bytes != 5*uint64(len(frame)) || bc.NewConns != 1 {
		t.Fatalf("backend counters %+v, want 5 packets, %d bytes, 1 connection", bc, 5*len(frame))
	}
	sc, err := f.Maps.ServiceCounters(s.ID)
	if err != nil {
		t.Fatal(err)
	}
	if sc.NewConns != 1 || sc.AffinityMisses != 1 || sc.AffinityHits != 0 {
		t.Fatalf("service counters %+v, want 1 new connection through the ring", sc)
	}
	backendFor(t, f, s, netip.AddrPortFrom(cli4.Addr(), 1), 0)
	sc, _ = f.Maps.ServiceCounters(s.ID)
	if sc.NewConns != 2 || sc.AffinityHits != 1 {
		t.Fatalf("service counters %+v, want a second connection by affinity", sc)
	}
	r := reasons(t, f)
	if len(r) != maps.ReasonCount {
		t.Fatalf("reasons %v: want %d reasons", r, maps.ReasonCount)
	}
	for name, n := range r {
		if n != 0 {
			t.Errorf("reason %s counted %d packets, want none", name, n)
		}
	}
}

func reasons(t *testing.T, f *bpftest.Fixture) map[string]uint64 {
	t.Helper()
	r, err := f.Maps.Reasons()
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func diff(a, b map[string]uint64) map[string]uint64 {
	d := map[string]uint64{}
	for k := range b {
		if b[k] != a[k] {
			d[k] = b[k] - a[k]
		}
	}
	return d
}

func contains(s []uint32, v uint32) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func without(s []uint32, v uint32) []uint32 {
	var out []uint32
	for _, x := range s {
		if x != v {
			out = append(out, x)
		}
	}
	return out
}

// TestRedirectToOtherInterface checks the choice between XDP_TX (backend
// behind the interface the packet came in on) and bpf_redirect (behind
// another one). A test run receives on the loopback device, ifindex 1.
func TestRedirectToOtherInterface(t *testing.T) {
	f := bpftest.NewFixture(t, loaderOpts())
	s := bpftest.Service{ID: 1, VIP: vip4, Proto: bpftest.UDP, Backends: []uint32{1}}
	f.AddService(s)
	for _, tc := range []struct {
		ifindex uint32
		want    uint32
	}{{0, bpftest.XDPTx}, {1, bpftest.XDPTx}, {7, bpftest.XDPRedirect}} {
		err := f.Maps.PutBackend(1, maps.Backend{
			Service: 1, Addr: bpftest.BackendAddr(vip4.Addr(), 1), Port: vip4.Port(), State: maps.StateActive,
			MAC: bpftest.BackendMAC(1), SrcMAC: bpftest.LBMAC, Ifindex: tc.ifindex,
		})
		if err != nil {
			t.Fatal(err)
		}
		verdict, out := f.Run(bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.UDP}.Bytes())
		if verdict != tc.want {
			t.Errorf("backend on ifindex %d: verdict %d, want %d", tc.ifindex, verdict, tc.want)
		}
		if id, err := bpftest.BackendOf(out); err != nil || id != 1 {
			t.Errorf("backend on ifindex %d: frame not rewritten for backend 1 (%v)", tc.ifindex, err)
		}
	}
}

// TestClosingFlows checks that a FIN or RST marks the flow's entry closing
// while the flow keeps its backend, and that a new handshake on the same
// 5-tuple reopens it.
func TestClosingFlows(t *testing.T) {
	f, svcs := fourServices(t)
	s := svcs[0]
	for _, flag := range []uint8{bpftest.FIN | bpftest.ACK, bpftest.RST} {
		src := netip.AddrPortFrom(cli4.Addr(), 2000+uint16(flag))
		b := backendFor(t, f, s, src, bpftest.ACK)
		closing := func() bool {
			fl, ok, err := f.Maps.LookupFlow(src, s.VIP, bpftest.TCP)
			if err != nil || !ok {
				t.Fatalf("flow %s not in the table (%v)", src, err)
			}
			return fl.Closing
		}
		if closing() {
			t.Fatalf("flow %s closing before any FIN or RST", src)
		}
		if got := backendFor(t, f, s, src, flag); got != b {
			t.Fatalf("flags %#x: went to %d, want %d", flag, got, b)
		}
		if !closing() {
			t.Fatalf("flags %#x: flow not marked closing", flag)
		}
		if got := backendFor(t, f, s, src, bpftest.ACK); got != b || !closing() {
			t.Fatalf("last ACK went to %d (want %d) or reopened the flow", got, b)
		}
		if got := backendFor(t, f, s, src, bpftest.SYN); got != b || closing() {
			t.Fatalf("new SYN on the same 5-tuple went to %d (want %d) or left the flow closing", got, b)
		}
	}
}
