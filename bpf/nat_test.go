package bpf_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/bpf"
	"github.com/tetherlb/tether/internal/bpftest"
	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/maglev"
	"github.com/tetherlb/tether/maps"
)

// The translated services of these tests: VIP port 8765 (vip4, vip6) to
// backends on backendPort, fullnat from snat4 or snat6 (the lab
// balancer's addresses).
const backendPort = 9000

var (
	snat4 = netip.MustParseAddr("198.51.100.2")
	snat6 = netip.MustParseAddr("2001:db8:100::2")
)

func modeName(mode uint8) string {
	return map[uint8]string{maps.ForwardDSR: "dsr", maps.ForwardNAT: "nat", maps.ForwardFullNAT: "fullnat",
		maps.ForwardIPIP: "ipip", maps.ForwardGUE: "gue"}[mode]
}

// translated is what a test checks of a translated frame.
type translated struct {
	src, dst netip.AddrPort
	payload  []byte
}

// parseTranslated reads the addresses, ports and payload of a TCP or UDP
// frame and verifies its checksums independently of the program.
func parseTranslated(t *testing.T, frame []byte) translated {
	t.Helper()
	if err := bpftest.VerifyChecksums(frame); err != nil {
		t.Fatalf("translated frame: %v\n%x", err, frame)
	}
	l3 := 14
	if binary.BigEndian.Uint16(frame[12:]) == 0x8100 {
		l3 = 18
	}
	var src, dst netip.Addr
	var l4 int
	var proto uint8
	if frame[l3]>>4 == 4 {
		src, dst = netip.AddrFrom4([4]byte(frame[l3+12:])), netip.AddrFrom4([4]byte(frame[l3+16:]))
		l4, proto = l3+20, frame[l3+9]
	} else {
		src, dst = netip.AddrFrom16([16]byte(frame[l3+8:])), netip.AddrFrom16([16]byte(frame[l3+24:]))
		l4, proto = l3+40, frame[l3+6]
	}
	hdr := 8
	if proto == bpftest.TCP {
		hdr = int(frame[l4+12]>>4) * 4
	}
	return translated{
		src:     netip.AddrPortFrom(src, binary.BigEndian.Uint16(frame[l4:])),
		dst:     netip.AddrPortFrom(dst, binary.BigEndian.Uint16(frame[l4+2:])),
		payload: frame[l4+hdr:],
	}
}

func snatFor(vip netip.Addr) netip.Addr {
	if vip.Is4() {
		return snat4
	}
	return snat6
}

// TestNATForward: a client's packets to a nat or fullnat service leave for
// a backend with the backend's address and port, the client's address
// (nat) or the balancer's and a port of the flow's (fullnat), checksums
// right, the payload as it came; the handshake's next packet, and the
// flow's later ones, take the same backend and port.
func TestNATForward(t *testing.T) {
	payload := chatPayload
	for _, mode := range []uint8{maps.ForwardNAT, maps.ForwardFullNAT} {
		f, svcs := fourServicesForwarding(t, mode)
		for _, tc := range forwardCases(svcs) {
			if tc.vlan != 0 {
				tc.cli = netip.AddrPortFrom(tc.cli.Addr(), tc.cli.Port()+1) // a flow of its own
			}
			t.Run(modeName(mode)+"/"+tc.desc, func(t *testing.T) {
				first := uint8(bpftest.SYN)
				if tc.svc.Proto == bpftest.UDP {
					first = 0
				}
				var want translated
				for i, flags := range []uint8{first, bpftest.ACK, bpftest.ACK | bpftest.PSH} {
					in := bpftest.Frame{Src: tc.cli, Dst: tc.svc.VIP, Proto: tc.svc.Proto, Flags: flags,
						VLAN: tc.vlan, Payload: payload, Checksum: true}.Bytes()
					verdict, out := f.Run(in)
					if verdict != bpftest.XDPTx {
						t.Fatalf("packet %d: verdict %d, want XDP_TX", i, verdict)
					}
					id, err := bpftest.BackendOf(out)
					if err != nil {
						t.Fatal(err)
					}
					got := parseTranslated(t, out)
					if !bytes.Equal(got.payload, payload) {
						t.Fatalf("packet %d: payload changed: %q", i, got.payload)
					}
					if got.dst != netip.AddrPortFrom(bpftest.BackendAddr(tc.svc.VIP.Addr(), id), backendPort) {
						t.Fatalf("packet %d: sent to %s, backend %d is %s port %d", i, got.dst, id, bpftest.BackendAddr(tc.svc.VIP.Addr(), id), backendPort)
					}
					switch mode {
					case maps.ForwardNAT:
						if got.src != tc.cli {
							t.Fatalf("packet %d: source %s, want the client %s", i, got.src, tc.cli)
						}
					case maps.ForwardFullNAT:
						p := got.src.Port()
						if got.src.Addr() != snatFor(tc.svc.VIP.Addr()) || p < 1024 || p > 32767 {
							t.Fatalf("packet %d: source %s, want %s and a port in 1024-32767", i, got.src, snatFor(tc.svc.VIP.Addr()))
						}
					}
					if i > 0 && got.src != want.src || i > 0 && got.dst != want.dst {
						t.Fatalf("packet %d went %s → %s, the first %s → %s", i, got.src, got.dst, want.src, want.dst)
					}
					want = got
				}
				if _, ok, err := f.Maps.LookupFlow(tc.cli, tc.svc.VIP, tc.svc.Proto); err != nil || !ok {
					t.Fatalf("no connection entry for the flow (%v)", err)
				}
			})
		}
	}
}

// natLab is a fixture run inside the balancer namespace of a lab, whose
// FIB the program's reply path asks: the clients (192.0.2.0/24,
// 2001:db8:c::/64) are reached through the lab client's eth0 addresses.
type natLab struct {
	*bpftest.Fixture
	lab  *lab.Lab
	mode uint8
	svcs []bpftest.Service
}

func newNATLab(t *testing.T, mode uint8) *natLab {
	l := lab.NewT(t, lab.Options{Backends: 1, Clients: 2})
	must(t, l.Balancer.Sysctl("net/ipv4/conf/all/forwarding", "1"))
	must(t, l.Balancer.Sysctl("net/ipv6/conf/all/forwarding", "1"))
	f, svcs := fourServicesForwarding(t, mode)
	return &natLab{Fixture: f, lab: l, mode: mode, svcs: svcs}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// run runs a frame as if it came in on the balancer's eth0.
func (n *natLab) run(t *testing.T, frame []byte) (verdict uint32, out []byte) {
	t.Helper()
	return runOnBalancer(t, n.Fixture, n.lab, frame)
}

// runOnBalancer runs a frame through f as if it came in on l's balancer's
// eth0, whose routes and neighbours the program's FIB lookups then see.
func runOnBalancer(t *testing.T, f *bpftest.Fixture, l *lab.Lab, frame []byte) (verdict uint32, out []byte) {
	t.Helper()
	must(t, l.Balancer.Do(func() error {
		verdict, out = f.RunOn(frame, l.Balancer.Ifindex)
		return nil
	}))
	return verdict, out
}

// TestNATReply: the backend's replies of a translated flow, the SYN-ACK of
// a half-open one included, are translated back (from the VIP and its
// port, to the client and its port) with right checksums and sent to the
// client's next hop as the kernel's FIB and neighbour table give it;
// while that neighbour is unresolved the translated reply goes to the
// kernel, which resolves it. A reply of no flow passes untouched.
func TestNATReply(t *testing.T) {
	for _, mode := range []uint8{maps.ForwardNAT, maps.ForwardFullNAT} {
		t.Run(modeName(mode), func(t *testing.T) {
			n := newNATLab(t, mode)
			l := n.lab
			hopMAC := net.HardwareAddr{0x02, 0x68, 0x6f, 0x70, 0, 1}
			for _, tc := range []struct {
				desc string
				svc  bpftest.Service
				cli  netip.AddrPort
				hop  netip.Addr // the balancer's next hop to the client
			}{
				{"TCP over IPv4", n.svcs[0], netip.AddrPortFrom(l.ClientAddrs4[0], 40000), l.Client.Addr4},
				{"UDP over IPv4", n.svcs[1], netip.AddrPortFrom(l.ClientAddrs4[1], 40001), l.Client.Addr4},
				{"TCP over IPv6", n.svcs[2], netip.AddrPortFrom(l.ClientAddrs6[0], 40000), l.Client.Addr6},
				{"UDP over IPv6", n.svcs[3], netip.AddrPortFrom(l.ClientAddrs6[1], 40001), l.Client.Addr6},
			} {
				t.Run(tc.desc, func(t *testing.T) {
					delHop := func() error {
						err := netlink.NeighDel(&netlink.Neigh{LinkIndex: l.Balancer.Ifindex, Family: family(tc.hop), IP: tc.hop.AsSlice()})
						if errors.Is(err, unix.ENOENT) {
							return nil
						}
						return err
					}
					must(t, l.Balancer.Do(delHop))
					defer func() { must(t, l.Balancer.Do(delHop)) }()
					tcp := tc.svc.Proto == bpftest.TCP
					first := uint8(0)
					if tcp {
						first = bpftest.SYN
					}
					_, out := n.run(t, bpftest.Frame{Src: tc.cli, Dst: tc.svc.VIP, Proto: tc.svc.Proto, Flags: first, Checksum: true}.Bytes())
					fwd := parseTranslated(t, out)
					reply := func(flags uint8, payload string) []byte {
						return bpftest.Frame{SrcMAC: bpftest.BackendMAC(1), DstMAC: l.Balancer.MAC, Src: fwd.dst, Dst: fwd.src,
							Proto: tc.svc.Proto, Flags: flags, Payload: []byte(payload), Checksum: true}.Bytes()
					}
					check := func(frame []byte, wantVerdict uint32, wantMAC net.HardwareAddr) {
						t.Helper()
						before := reasons(t, n.Fixture)
						verdict, out := n.run(t, frame)
						if verdict != wantVerdict {
							t.Fatalf("reply: verdict %d, want %d (%v)", verdict, wantVerdict, diff(before, reasons(t, n.Fixture)))
						}
						got := parseTranslated(t, out)
						if got.src != tc.svc.VIP || got.dst != tc.cli {
							t.Fatalf("reply translated to %s → %s, want %s → %s", got.src, got.dst, tc.svc.VIP, tc.cli)
						}
						if wantMAC != nil && (!bytes.Equal(out[0:6], wantMAC) || !bytes.Equal(out[6:12], l.Balancer.MAC)) {
							t.Fatalf("reply sent from %s to %s, want from %s to %s", net.HardwareAddr(out[6:12]), net.HardwareAddr(out[0:6]), l.Balancer.MAC, wantMAC)
						}
						if wantVerdict == bpftest.XDPPass {
							if d := diff(before, reasons(t, n.Fixture)); d["pass_nat_kernel"] != 1 {
								t.Fatalf("reasons moved by %v, want pass_nat_kernel 1", d)
							}
						}
					}
					// The handshake's reply, before the client's next hop is resolved.
					check(reply(bpftest.SYN|bpftest.ACK, ""), bpftest.XDPPass, nil)
					if tcp {
						n.run(t, bpftest.Frame{Src: tc.cli, Dst: tc.svc.VIP, Proto: tc.svc.Proto, Flags: bpftest.ACK, Checksum: true}.Bytes())
					}
					must(t, l.Balancer.Do(func() error {
						return netlink.NeighSet(&netlink.Neigh{LinkIndex: l.Balancer.Ifindex, Family: family(tc.hop),
							State: netlink.NUD_PERMANENT, IP: tc.hop.AsSlice(), HardwareAddr: hopMAC})
					}))
					check(reply(bpftest.ACK|bpftest.PSH, "hello from the backend"), bpftest.XDPTx, hopMAC)

					// A reply of no flow: another client port.
					stray := bpftest.Frame{SrcMAC: bpftest.BackendMAC(1), DstMAC: l.Balancer.MAC, Src: fwd.dst,
						Dst: netip.AddrPortFrom(fwd.src.Addr(), fwd.src.Port()+1), Proto: tc.svc.Proto, Checksum: true}.Bytes()
					before := reasons(t, n.Fixture)
					verdict, out := n.run(t, stray)
					if verdict != bpftest.XDPPass || !bytes.Equal(out, stray) {
						t.Fatalf("reply of no flow: verdict %d, frame changed %v", verdict, !bytes.Equal(out, stray))
					}
					if d := diff(before, reasons(t, n.Fixture)); d["pass_not_vip"] != 1 {
						t.Fatalf("reply of no flow moved the reasons by %v, want pass_not_vip 1", d)
					}
				})
			}
		})
	}
}

func family(a netip.Addr) int {
	if a.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

// natEntryKey4 is the IPv4 NAT table key of replies from backend id of
// service s to dst.
func natEntryKey4(s bpftest.Service, id uint32, dst netip.AddrPort) bpf.TetherFlowKey4 {
	return bpf.TetherFlowKey4{
		Src:   maglev.AddrWords(bpftest.BackendAddr(s.VIP.Addr(), id))[0],
		Dst:   maglev.AddrWords(dst.Addr())[0],
		Sport: maps.Port(backendPort),
		Dport: maps.Port(dst.Port()),
		Proto: s.Proto,
	}
}

func monotonicNow(t *testing.T) uint64 {
	var ts unix.Timespec
	must(t, unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts))
	return uint64(ts.Nano())
}

// snatCandidates are the source ports, in order, that a fullnat flow from
// cli to s tries (bpf/nat.h snat_port), from the Go hash model.
func snatCandidates(f *bpftest.Fixture, s bpftest.Service, cli netip.AddrPort) []uint16 {
	h := maglev.ConnHash(f.Seed^0x736e6174, cli.Addr(), cli.Port(), s.VIP.Port(), s.Proto)
	out := make([]uint16, 16)
	for i := range out {
		out[i] = uint16(1024 + (h+uint32(i)*4099)%31744)
	}
	return out
}

// TestSNATPortAllocation: fullnat source ports towards one backend never
// collide; a flow whose ports are all held by live flows is refused with a
// RST and counted, and breaks none of them; a port a closed flow left
// long enough ago is taken again.
func TestSNATPortAllocation(t *testing.T) {
	f := bpftest.NewFixture(t, loaderOpts())
	s := bpftest.Service{ID: 1, VIP: vip4, Proto: bpftest.TCP, Source: true, Backends: []uint32{1},
		Forwarding: maps.ForwardFullNAT, BackendPort: backendPort, SNAT: snat4}
	f.AddService(s)

	// 2,000 connections from 40 clients: 2,000 distinct ports.
	seen := map[uint16]netip.AddrPort{}
	for c := range 40 {
		for p := range 50 {
			cli := netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 51, 100, byte(50 + c)}), uint16(30000+p))
			for _, flags := range []uint8{bpftest.SYN, bpftest.ACK} {
				verdict, out := f.Run(bpftest.Frame{Src: cli, Dst: s.VIP, Proto: bpftest.TCP, Flags: flags}.Bytes())
				if verdict != bpftest.XDPTx {
					t.Fatalf("%s: verdict %d", cli, verdict)
				}
				port := parseTranslatedNoSum(out).src.Port()
				if flags == bpftest.ACK {
					if other, ok := seen[port]; ok {
						t.Fatalf("%s and %s both got source port %d", other, cli, port)
					}
					seen[port] = cli
				}
			}
		}
	}

	// Every port a new flow tries is held by a live flow: refused.
	cli := netip.AddrPortFrom(cli4.Addr(), 51000)
	cands := snatCandidates(f, s, cli)
	for i, p := range cands {
		k := natEntryKey4(s, 1, netip.AddrPortFrom(snat4, p))
		v := bpf.TetherNatEntry{Client: [4]uint32{1, 0, 0, 0}, Vip: maglev.AddrWords(vip4.Addr()), Cport: maps.Port(uint16(1000 + i)), Vport: maps.Port(vip4.Port()), Backend: 1}
		must(t, f.Objs.TetherMaps.Nat4.Put(&k, &v))
	}
	before := reasons(t, f)
	verdict, out := f.Run(bpftest.Frame{Src: cli, Dst: s.VIP, Proto: bpftest.TCP, Flags: bpftest.SYN}.Bytes())
	seg, err := bpftest.ParseTCP(out)
	if verdict != bpftest.XDPTx || err != nil || seg.Flags&bpftest.RST == 0 || seg.Dst != cli {
		t.Fatalf("flow with every port taken: verdict %d, %+v (%v), want a RST to the client", verdict, seg, err)
	}
	if d := diff(before, reasons(t, f)); d["reset_nat_ports"] != 1 {
		t.Fatalf("reasons moved by %v, want reset_nat_ports 1", d)
	}
	for i, p := range cands {
		k := natEntryKey4(s, 1, netip.AddrPortFrom(snat4, p))
		var v bpf.TetherNatEntry
		if err := f.Objs.TetherMaps.Nat4.Lookup(&k, &v); err != nil || maps.HostPort(v.Cport) != uint16(1000+i) {
			t.Fatalf("entry of port %d after the refusal: %+v, %v", p, v, err)
		}
	}

	// The fourth candidate's flow closed 20 s ago (longer than its hold):
	// the new flow takes that port.
	k := natEntryKey4(s, 1, netip.AddrPortFrom(snat4, cands[3]))
	v := bpf.TetherNatEntry{Client: [4]uint32{1, 0, 0, 0}, Vip: maglev.AddrWords(vip4.Addr()), Cport: maps.Port(1003), Vport: maps.Port(vip4.Port()),
		Backend: 1, Flags: 3, StampNs: monotonicNow(t) - uint64(20*time.Second)}
	must(t, f.Objs.TetherMaps.Nat4.Put(&k, &v))
	for _, flags := range []uint8{bpftest.SYN, bpftest.ACK} {
		verdict, out := f.Run(bpftest.Frame{Src: cli, Dst: s.VIP, Proto: bpftest.TCP, Flags: flags}.Bytes())
		if got := parseTranslatedNoSum(out).src.Port(); verdict != bpftest.XDPTx || got != cands[3] {
			t.Fatalf("flags %#x: verdict %d, port %d, want XDP_TX from port %d", flags, verdict, got, cands[3])
		}
	}
}

// parseTranslatedNoSum reads a translated frame built without checksums.
func parseTranslatedNoSum(frame []byte) translated {
	src := netip.AddrFrom4([4]byte(frame[14+12:]))
	dst := netip.AddrFrom4([4]byte(frame[14+16:]))
	return translated{
		src: netip.AddrPortFrom(src, binary.BigEndian.Uint16(frame[34:])),
		dst: netip.AddrPortFrom(dst, binary.BigEndian.Uint16(frame[36:])),
	}
}

// TestNATSYNFlood: a flood of spoofed SYNs to a fullnat service, more than
// the half-open table holds, enters no connection and no established NAT
// entry, leaves the established flows translated both ways, and a new
// client still gets a port and its handshake through.
func TestNATSYNFlood(t *testing.T) {
	f := bpftest.NewFixture(t, loaderOpts())
	s := bpftest.Service{ID: 1, VIP: vip4, Proto: bpftest.TCP, Backends: []uint32{1, 2},
		Forwarding: maps.ForwardFullNAT, BackendPort: backendPort, SNAT: snat4}
	f.AddService(s)
	established := netip.AddrPortFrom(cli4.Addr(), 42000)
	var fwd translated
	for _, flags := range []uint8{bpftest.SYN, bpftest.ACK} {
		_, out := f.Run(bpftest.Frame{Src: established, Dst: s.VIP, Proto: bpftest.TCP, Flags: flags}.Bytes())
		fwd = parseTranslatedNoSum(out)
	}
	conns := func() int {
		n, _, err := f.Maps.Entries()
		must(t, err)
		return n
	}
	nat := func() int {
		tables, err := f.Maps.Tables()
		must(t, err)
		for _, tb := range tables {
			if tb.Name == maps.TableNAT4 {
				return tb.Entries
			}
		}
		t.Fatal("no IPv4 NAT table")
		return 0
	}
	c0, n0 := conns(), nat()
	const flood = 40000 // beyond nat_syn4's 16,384 entries
	for i := range flood {
		src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{203, 0, 113, byte(100 + i%100)}), uint16(1024+i/100))
		if verdict, _ := f.Run(bpftest.Frame{Src: src, Dst: s.VIP, Proto: bpftest.TCP, Flags: bpftest.SYN}.Bytes()); verdict != bpftest.XDPTx {
			t.Fatalf("flood SYN %d: verdict %d", i, verdict)
		}
	}
	if c, n := conns(), nat(); c != c0 || n != n0 {
		t.Fatalf("after %d spoofed SYNs: %d connection entries (%d before), %d NAT entries (%d before)", flood, c, c0, n, n0)
	}
	_, out := f.Run(bpftest.Frame{Src: established, Dst: s.VIP, Proto: bpftest.TCP, Flags: bpftest.ACK}.Bytes())
	if got := parseTranslatedNoSum(out); got.src != fwd.src || got.dst != fwd.dst {
		t.Fatalf("established flow after the flood goes %s → %s, before %s → %s", got.src, got.dst, fwd.src, fwd.dst)
	}
	k := natEntryKey4(s, 0, fwd.src)
	k.Src = maglev.AddrWords(fwd.dst.Addr())[0]
	var v bpf.TetherNatEntry
	if err := f.Objs.TetherMaps.Nat4.Lookup(&k, &v); err != nil || maps.HostPort(v.Cport) != established.Port() {
		t.Fatalf("NAT entry of the established flow after the flood: %+v, %v", v, err)
	}
	fresh := netip.AddrPortFrom(cli4.Addr(), 42001)
	for _, flags := range []uint8{bpftest.SYN, bpftest.ACK} {
		if verdict, _ := f.Run(bpftest.Frame{Src: fresh, Dst: s.VIP, Proto: bpftest.TCP, Flags: flags}.Bytes()); verdict != bpftest.XDPTx {
			t.Fatalf("new client after the flood, flags %#x: verdict %d", flags, verdict)
		}
	}
	if c := conns(); c != c0+1 {
		t.Fatalf("%d connection entries after a new client's handshake, want %d", c, c0+1)
	}
}

// TestNATClosing: a FIN each way, or a RST either way, closes a translated
// flow's NAT entry (the time it closed starts its port's hold), and a new
// handshake on the client's 5-tuple opens it again.
func TestNATClosing(t *testing.T) {
	n := newNATLab(t, maps.ForwardFullNAT)
	s := n.svcs[0]
	entry := func(fwd translated) bpf.TetherNatEntry {
		t.Helper()
		k := bpf.TetherFlowKey4{Src: maglev.AddrWords(fwd.dst.Addr())[0], Dst: maglev.AddrWords(fwd.src.Addr())[0],
			Sport: maps.Port(fwd.dst.Port()), Dport: maps.Port(fwd.src.Port()), Proto: bpftest.TCP}
		var v bpf.TetherNatEntry
		must(t, n.Objs.TetherMaps.Nat4.Lookup(&k, &v))
		return v
	}
	const clientFIN, backendFIN, reset, backendFirst = 1, 2, 4, 16
	type step struct {
		fromClient bool
		flags      uint8
	}
	for i, tc := range []struct {
		desc  string
		steps []step
		flags uint32
	}{
		{"FIN both ways", []step{{true, bpftest.FIN | bpftest.ACK}, {false, bpftest.FIN | bpftest.ACK}}, clientFIN | backendFIN},
		{"FIN both ways, the backend's first", []step{{false, bpftest.FIN | bpftest.ACK}, {true, bpftest.FIN | bpftest.ACK}}, clientFIN | backendFIN | backendFirst},
		{"RST from the backend", []step{{false, bpftest.RST}}, reset},
		{"RST from the client", []step{{true, bpftest.RST}}, reset},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			cli := netip.AddrPortFrom(n.lab.ClientAddrs4[0], uint16(41000+i))
			var fwd translated
			for _, flags := range []uint8{bpftest.SYN, bpftest.ACK} {
				_, out := n.run(t, bpftest.Frame{Src: cli, Dst: s.VIP, Proto: bpftest.TCP, Flags: flags, Checksum: true}.Bytes())
				fwd = parseTranslated(t, out)
			}
			if e := entry(fwd); e.Flags != 0 || e.StampNs != 0 {
				t.Fatalf("open flow's entry: flags %#x, closed at %d", e.Flags, e.StampNs)
			}
			for j, st := range tc.steps {
				frame := bpftest.Frame{Src: cli, Dst: s.VIP, Proto: bpftest.TCP, Flags: st.flags, Checksum: true}
				if !st.fromClient {
					frame = bpftest.Frame{Src: fwd.dst, Dst: fwd.src, Proto: bpftest.TCP, Flags: st.flags, Checksum: true}
				}
				n.run(t, frame.Bytes())
				if e := entry(fwd); j < len(tc.steps)-1 && e.StampNs != 0 {
					t.Fatalf("after step %d the entry is closed already (flags %#x)", j, e.Flags)
				}
			}
			now := monotonicNow(t)
			e := entry(fwd)
			if e.Flags != tc.flags || e.StampNs == 0 || e.StampNs > now || now-e.StampNs > uint64(time.Second) {
				t.Fatalf("closed entry: flags %#x (want %#x), closed at %d, now %d", e.Flags, tc.flags, e.StampNs, now)
			}
			// The client opens its 5-tuple again.
			n.run(t, bpftest.Frame{Src: cli, Dst: s.VIP, Proto: bpftest.TCP, Flags: bpftest.SYN, Checksum: true}.Bytes())
			if e := entry(fwd); e.Flags != 0 || e.StampNs != 0 {
				t.Fatalf("reopened flow's entry: flags %#x, closed at %d", e.Flags, e.StampNs)
			}
		})
	}
}

// TestSNATPortReused: a fullnat port whose flow closed long enough ago is
// taken by a new flow, whose SYN-ACK then reaches the new client, not the
// old one; a late packet of the old flow is dropped as stale (its
// connection entry still names the port), and its new handshake gets a
// port of its own.
func TestSNATPortReused(t *testing.T) {
	n := newNATLab(t, maps.ForwardFullNAT)
	s := bpftest.Service{ID: 9, VIP: netip.AddrPortFrom(n.lab.VIP4, 9999), Proto: bpftest.TCP, Backends: []uint32{40},
		Forwarding: maps.ForwardFullNAT, BackendPort: backendPort, SNAT: snat4}
	n.AddService(s)
	old := netip.AddrPortFrom(n.lab.ClientAddrs4[0], 43000)
	fresh := netip.AddrPortFrom(n.lab.ClientAddrs4[1], 43000)
	port := snatCandidates(n.Fixture, s, fresh)[0]
	be := netip.AddrPortFrom(bpftest.BackendAddr(s.VIP.Addr(), 40), backendPort)
	key := natEntryKey4(s, 40, netip.AddrPortFrom(snat4, port))
	// The old flow: its connection entry names the port, and its NAT entry
	// there closed 20 s ago.
	must(t, n.Objs.TetherMaps.Nat4.Put(&key, &bpf.TetherNatEntry{Client: maglev.AddrWords(old.Addr()), Vip: maglev.AddrWords(s.VIP.Addr()),
		Cport: maps.Port(old.Port()), Vport: maps.Port(s.VIP.Port()), Backend: 40, Flags: 3, StampNs: monotonicNow(t) - uint64(20*time.Second)}))
	ck := bpf.TetherFlowKey4{Src: maglev.AddrWords(old.Addr())[0], Dst: maglev.AddrWords(s.VIP.Addr())[0],
		Sport: maps.Port(old.Port()), Dport: maps.Port(s.VIP.Port()), Proto: bpftest.TCP}
	must(t, n.Objs.TetherMaps.Conns4.Put(&ck, &bpf.TetherConn{Backend: 40, Service: 9, Flags: 4 | 1, NatPort: uint32(maps.Port(port))}))

	send := func(src, dst netip.AddrPort, flags uint8) (uint32, translated) {
		t.Helper()
		verdict, out := n.run(t, bpftest.Frame{Src: src, Dst: dst, Proto: bpftest.TCP, Flags: flags, Checksum: true}.Bytes())
		if verdict == bpftest.XDPDrop {
			return verdict, translated{}
		}
		return verdict, parseTranslated(t, out)
	}
	if _, fwd := send(fresh, s.VIP, bpftest.SYN); fwd.src != netip.AddrPortFrom(snat4, port) {
		t.Fatalf("the new flow's SYN left from %s, want %s:%d", fwd.src, snat4, port)
	}
	if _, rep := send(be, netip.AddrPortFrom(snat4, port), bpftest.SYN|bpftest.ACK); rep.dst != fresh {
		t.Fatalf("the backend's SYN-ACK went to %s, want the new client %s", rep.dst, fresh)
	}
	before := reasons(t, n.Fixture)
	if verdict, _ := send(old, s.VIP, bpftest.ACK); verdict != bpftest.XDPDrop {
		t.Fatalf("a late packet of the old flow: verdict %d, want XDP_DROP", verdict)
	}
	if d := diff(before, reasons(t, n.Fixture)); d["drop_nat_stale"] != 1 {
		t.Fatalf("reasons moved by %v, want drop_nat_stale 1", d)
	}
	if _, fwd := send(fresh, s.VIP, bpftest.ACK); fwd.src != netip.AddrPortFrom(snat4, port) {
		t.Fatalf("the new flow's ACK left from %s, want %s:%d", fwd.src, snat4, port)
	}
	if _, rep := send(be, netip.AddrPortFrom(snat4, port), bpftest.ACK|bpftest.PSH); rep.dst != fresh {
		t.Fatalf("the backend's data went to %s, want the new client %s", rep.dst, fresh)
	}
	// The old client opens its 5-tuple again: another port.
	if _, fwd := send(old, s.VIP, bpftest.SYN); fwd.src.Port() == port || fwd.src.Addr() != snat4 {
		t.Fatalf("the old client's new handshake left from %s, not a port of its own", fwd.src)
	}
}

// TestNATUnverified: a TCP flow whose handshake tether did not see (a
// spoofed ACK, say) holds its fullnat port only until the backend answers:
// a reply makes the entry its own for good, a RST from the backend closes
// it and frees the port after the hold.
func TestNATUnverified(t *testing.T) {
	n := newNATLab(t, maps.ForwardFullNAT)
	s := n.svcs[0]
	for i, tc := range []struct {
		desc  string
		reply uint8
		flags uint32
	}{{"the backend answers", bpftest.ACK | bpftest.PSH, 0}, {"the backend resets it", bpftest.RST, 4}} {
		t.Run(tc.desc, func(t *testing.T) {
			cli := netip.AddrPortFrom(n.lab.ClientAddrs4[0], uint16(44000+i))
			_, out := n.run(t, bpftest.Frame{Src: cli, Dst: s.VIP, Proto: bpftest.TCP, Flags: bpftest.ACK, Checksum: true}.Bytes())
			fwd := parseTranslated(t, out)
			k := bpf.TetherFlowKey4{Src: maglev.AddrWords(fwd.dst.Addr())[0], Dst: maglev.AddrWords(fwd.src.Addr())[0],
				Sport: maps.Port(fwd.dst.Port()), Dport: maps.Port(fwd.src.Port()), Proto: bpftest.TCP}
			var e bpf.TetherNatEntry
			must(t, n.Objs.TetherMaps.Nat4.Lookup(&k, &e))
			if e.Flags != 8 || e.StampNs == 0 {
				t.Fatalf("entry of a flow without a handshake: flags %#x, stamp %d; want unverified (0x8) and stamped", e.Flags, e.StampNs)
			}
			n.run(t, bpftest.Frame{Src: fwd.dst, Dst: fwd.src, Proto: bpftest.TCP, Flags: tc.reply, Checksum: true}.Bytes())
			must(t, n.Objs.TetherMaps.Nat4.Lookup(&k, &e))
			if e.Flags != tc.flags || (tc.flags == 0) != (e.StampNs == 0) {
				t.Fatalf("after the backend's reply: flags %#x, stamp %d; want flags %#x", e.Flags, e.StampNs, tc.flags)
			}
		})
	}
}

// TestNATUDPNoChecksum: an IPv4 UDP datagram without a checksum (0) is
// translated both ways with its checksum left 0.
func TestNATUDPNoChecksum(t *testing.T) {
	n := newNATLab(t, maps.ForwardFullNAT)
	s := n.svcs[1]
	cli := netip.AddrPortFrom(n.lab.ClientAddrs4[0], 45000)
	_, out := n.run(t, bpftest.Frame{Src: cli, Dst: s.VIP, Proto: bpftest.UDP, Payload: []byte("ping")}.Bytes())
	fwd := parseTranslated(t, out)
	if c := binary.BigEndian.Uint16(out[14+20+6:]); c != 0 || fwd.dst.Port() != backendPort {
		t.Fatalf("forwarded: checksum %#x, to %s", c, fwd.dst)
	}
	_, out = n.run(t, bpftest.Frame{Src: fwd.dst, Dst: fwd.src, Proto: bpftest.UDP, Payload: []byte("pong")}.Bytes())
	rep := parseTranslated(t, out)
	if c := binary.BigEndian.Uint16(out[14+20+6:]); c != 0 || rep.dst != cli || rep.src != s.VIP {
		t.Fatalf("reply: checksum %#x, %s → %s", c, rep.src, rep.dst)
	}
}
