package bpf_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/tetherlb/tether/internal/bpftest"
	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/maps"
)

// The outer sources of these tests' tunnels: per flow, the low 6 bits (IPv4)
// or 16 bits (IPv6) vary.
var (
	tunnelNet4 = netip.MustParsePrefix("198.51.100.64/26")
	tunnelNet6 = netip.MustParsePrefix("2001:db8:100::1:0/112")
)

const guePort = 5555

// encapLab is a fixture whose FIB lookups see a lab balancer with a host
// route and a permanent neighbour (the fixture's backend MAC) for every
// backend address of fourServices, of both families.
type encapLab struct {
	*bpftest.Fixture
	lab  *lab.Lab
	svcs []bpftest.Service
}

func newEncapLab(t *testing.T, mode uint8, otherFamily bool) *encapLab {
	l := backendRoutes(t, 0)
	f := bpftest.NewFixture(t, loaderOpts())
	svcs := fourServicesWith(f, encapIn(mode, otherFamily))
	return &encapLab{Fixture: f, lab: l, svcs: svcs}
}

// encapIn sets up a service to forward in mode (ipip or gue), carrying
// its packets in the other family's outer header with otherFamily.
func encapIn(mode uint8, otherFamily bool) func(*bpftest.Service) {
	return func(s *bpftest.Service) {
		s.Forwarding, s.OtherFamily = mode, otherFamily
		s.Tunnel.Source = tunnelNet4
		if s.Backend(1).Is6() {
			s.Tunnel.Source = tunnelNet6
		}
		if mode == maps.ForwardGUE {
			s.Tunnel.GUEPort = guePort
		}
	}
}

// backendRoutes is a lab whose balancer forwards and has a host route and
// a permanent neighbour (the fixture's backend MAC) for the addresses of
// backends 1 to 12 of both families; an mtu other than 0 is its eth0's.
func backendRoutes(t testing.TB, mtu int) *lab.Lab {
	l := lab.NewT(t, lab.Options{Backends: 1, Clients: 1})
	must(t, l.Balancer.Sysctl("net/ipv4/conf/all/forwarding", "1"))
	must(t, l.Balancer.Sysctl("net/ipv6/conf/all/forwarding", "1"))
	must(t, l.Balancer.Do(func() error {
		if mtu != 0 {
			link, err := netlink.LinkByIndex(l.Balancer.Ifindex)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetMTU(link, mtu); err != nil {
				return fmt.Errorf("MTU %d: %w", mtu, err)
			}
		}
		for id := uint32(1); id <= 12; id++ {
			for _, a := range []netip.Addr{bpftest.BackendAddr(netip.IPv4Unspecified(), id), bpftest.BackendAddr(netip.IPv6Unspecified(), id)} {
				dst := &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}
				if err := netlink.RouteAdd(&netlink.Route{LinkIndex: l.Balancer.Ifindex, Dst: dst, Scope: netlink.SCOPE_LINK}); err != nil {
					return fmt.Errorf("route to %s: %w", a, err)
				}
				if err := netlink.NeighSet(&netlink.Neigh{LinkIndex: l.Balancer.Ifindex, Family: family(a),
					State: netlink.NUD_PERMANENT, IP: a.AsSlice(), HardwareAddr: bpftest.BackendMAC(id)}); err != nil {
					return fmt.Errorf("neighbour %s: %w", a, err)
				}
			}
		}
		return nil
	}))
	return l
}

// run runs a frame as if it came in on the balancer's eth0.
func (e *encapLab) run(t *testing.T, frame []byte) (verdict uint32, out []byte) {
	t.Helper()
	return runOnBalancer(t, e.Fixture, e.lab, frame)
}

// outer is what a test reads of an encapsulated frame.
type outer struct {
	src, dst    netip.Addr
	label       uint32 // IPv6 flow label
	sport       uint16 // gue
	inner       []byte // the packet inside
	backendID   uint32
	tos, proto  uint8
	df, outerV6 bool
}

// parseOuter checks an encapsulated frame's Ethernet, outer IP and (gue)
// UDP headers field by field, independently of the program, and returns
// what varies.
func parseOuter(t *testing.T, frame []byte, gue bool, balancerMAC net.HardwareAddr) outer {
	t.Helper()
	o, err := outerOf(frame, gue, balancerMAC)
	if err != nil {
		t.Fatal(err)
	}
	return o
}

// outerOf is parseOuter's check, returning what is wrong.
func outerOf(frame []byte, gue bool, balancerMAC net.HardwareAddr) (outer, error) {
	var o outer
	id, err := bpftest.BackendOf(frame)
	if err != nil {
		return o, err
	}
	o.backendID = id
	if !bytes.Equal(frame[6:12], balancerMAC) {
		return o, fmt.Errorf("sent from MAC %s, want the balancer's %s", net.HardwareAddr(frame[6:12]), balancerMAC)
	}
	l3 := 14
	var l4 int
	switch binary.BigEndian.Uint16(frame[12:]) {
	case 0x0800:
		ip := frame[l3 : l3+20]
		df := binary.BigEndian.Uint16(ip[6:]) == 0x4000
		if ip[0] != 0x45 || df && binary.BigEndian.Uint16(ip[4:]) != 0 || ip[8] != 64 {
			return o, fmt.Errorf("outer IPv4 header %x: want version 4, IHL 5, id 0 (with DF), TTL 64", ip)
		}
		if bpftest.Fold(bpftest.OnesSum(ip, 0)) != 0xffff {
			return o, fmt.Errorf("outer IPv4 header checksum wrong: %x", ip)
		}
		if int(binary.BigEndian.Uint16(ip[2:])) != len(frame)-l3 {
			return o, fmt.Errorf("outer total length %d, frame holds %d", binary.BigEndian.Uint16(ip[2:]), len(frame)-l3)
		}
		o.tos, o.df, o.proto = ip[1], binary.BigEndian.Uint16(ip[6:]) == 0x4000, ip[9]
		if f := binary.BigEndian.Uint16(ip[6:]); f != 0 && f != 0x4000 {
			return o, fmt.Errorf("outer fragment field %#x", f)
		}
		o.src, o.dst = netip.AddrFrom4([4]byte(ip[12:])), netip.AddrFrom4([4]byte(ip[16:]))
		l4 = l3 + 20
	case 0x86dd:
		ip := frame[l3 : l3+40]
		w := binary.BigEndian.Uint32(ip)
		if w>>28 != 6 || ip[7] != 64 || int(binary.BigEndian.Uint16(ip[4:])) != len(frame)-l3-40 {
			return o, fmt.Errorf("outer IPv6 header %x: want version 6, hop limit 64, payload length %d", ip, len(frame)-l3-40)
		}
		o.outerV6, o.tos, o.label, o.proto = true, uint8(w>>20), w&0xfffff, ip[6]
		o.src, o.dst = netip.AddrFrom16([16]byte(ip[8:])), netip.AddrFrom16([16]byte(ip[24:]))
		l4 = l3 + 40
	default:
		return o, fmt.Errorf("outer ethertype %#x", binary.BigEndian.Uint16(frame[12:]))
	}
	if gue {
		if o.proto != bpftest.UDP {
			return o, fmt.Errorf("outer protocol %d, want UDP", o.proto)
		}
		udp := frame[l4 : l4+8]
		o.sport = binary.BigEndian.Uint16(udp)
		if binary.BigEndian.Uint16(udp[2:]) != guePort || int(binary.BigEndian.Uint16(udp[4:])) != len(frame)-l4 || binary.BigEndian.Uint16(udp[6:]) != 0 {
			return o, fmt.Errorf("outer UDP header %x: want port %d, length %d, no checksum", udp, guePort, len(frame)-l4)
		}
		if o.sport < 49152 {
			return o, fmt.Errorf("gue source port %d, want 49152-65535", o.sport)
		}
		l4 += 8
	}
	o.inner = frame[l4:]
	return o, nil
}

// TestEncapForward: a client's packets to an ipip or gue service leave for
// a backend inside an outer header to the backend's address, built field
// by field as the test expects, the packet inside byte for byte as it
// came (without its VLAN tag); the outer source is in the tunnel's prefix
// and, with the gue source port and the IPv6 flow label, the same for a
// flow's packets and varies over flows; IPv4 and IPv6 are carried in
// either family.
func TestEncapForward(t *testing.T) {
	for _, mode := range []uint8{maps.ForwardIPIP, maps.ForwardGUE} {
		for _, other := range []bool{false, true} {
			name := modeName(mode)
			if other {
				name += "/other family"
			}
			t.Run(name, func(t *testing.T) {
				e := newEncapLab(t, mode, other)
				gue := mode == maps.ForwardGUE
				for _, tc := range forwardCases(e.svcs) {
					t.Run(tc.desc, func(t *testing.T) {
						var first outer
						flags := []uint8{bpftest.SYN, bpftest.ACK, bpftest.ACK | bpftest.PSH}
						if tc.svc.Proto == bpftest.UDP {
							flags = []uint8{0, 0, 0}
						}
						for i, fl := range flags {
							in := bpftest.Frame{Src: tc.cli, Dst: tc.svc.VIP, Proto: tc.svc.Proto, Flags: fl,
								VLAN: tc.vlan, Payload: chatPayload, Checksum: true}.Bytes()
							verdict, out := e.run(t, in)
							if verdict != bpftest.XDPTx {
								t.Fatalf("packet %d: verdict %d, want XDP_TX", i, verdict)
							}
							o := parseOuter(t, out, gue, e.lab.Balancer.MAC)
							l3 := 14
							if tc.vlan != 0 {
								l3 = 18
							}
							if !bytes.Equal(o.inner, in[l3:]) {
								t.Fatalf("packet %d: the packet inside differs from the one sent:\n got %x\nwant %x", i, o.inner, in[l3:])
							}
							if o.dst != tc.svc.Backend(o.backendID) || !contains(tc.svc.Backends, o.backendID) {
								t.Fatalf("packet %d: sent to %s (MAC of backend %d), want a backend of %v", i, o.dst, o.backendID, tc.svc.Backends)
							}
							if !tc.svc.Tunnel.Source.Contains(o.src) {
								t.Fatalf("packet %d: outer source %s, not in %s", i, o.src, tc.svc.Tunnel.Source)
							}
							wantProto := uint8(4)
							if tc.svc.VIP.Addr().Is6() {
								wantProto = 41
							}
							if !gue && o.proto != wantProto {
								t.Fatalf("packet %d: outer protocol %d, want %d", i, o.proto, wantProto)
							}
							if !o.outerV6 && tc.svc.VIP.Addr().Is4() && !o.df {
								t.Fatalf("packet %d: DF of the packet inside not copied", i)
							}
							if i == 0 {
								first = o
							} else if o.src != first.src || o.sport != first.sport || o.label != first.label || o.backendID != first.backendID {
								t.Fatalf("packet %d: outer %s port %d label %#x backend %d, the flow's first had %s port %d label %#x backend %d",
									i, o.src, o.sport, o.label, o.backendID, first.src, first.sport, first.label, first.backendID)
							}
						}
					})
				}
				// Flows vary the outer source (and the gue port, the flow label).
				srcs, sports, labels := map[netip.Addr]bool{}, map[uint16]bool{}, map[uint32]bool{}
				for p := uint16(0); p < 32; p++ {
					cli := netip.AddrPortFrom(cli4.Addr(), 41000+p)
					in := bpftest.Frame{Src: cli, Dst: vip4, Proto: bpftest.UDP, Payload: chatPayload}.Bytes()
					if verdict, out := e.run(t, in); verdict == bpftest.XDPTx {
						o := parseOuter(t, out, gue, e.lab.Balancer.MAC)
						srcs[o.src], sports[o.sport], labels[o.label] = true, true, true
					}
				}
				if len(srcs) < 8 || gue && len(sports) < 8 || other && len(labels) < 8 {
					t.Errorf("32 flows had %d outer sources, %d gue ports, %d flow labels: they do not vary", len(srcs), len(sports), len(labels))
				}
			})
		}
	}
}

// TestEncapTooBig: a packet that would exceed the egress MTU once
// encapsulated is answered, back where it came from, with ICMP
// "fragmentation needed" or ICMPv6 "packet too big" from the VIP, giving
// the MTU that fits, quoting the start of the packet, checksums right; an
// IPv4 packet without DF is dropped and counted; one that fits is
// forwarded.
func TestEncapTooBig(t *testing.T) {
	const mtu = 1300
	for _, mode := range []uint8{maps.ForwardIPIP, maps.ForwardGUE} {
		e := newEncapLab(t, mode, false)
		// The egress MTU (a route's counts only when locked).
		must(t, e.lab.Balancer.Do(func() error {
			link, err := netlink.LinkByIndex(e.lab.Balancer.Ifindex)
			if err != nil {
				return err
			}
			return netlink.LinkSetMTU(link, mtu)
		}))
		for _, svc := range []bpftest.Service{e.svcs[0], e.svcs[2]} {
			v4 := svc.VIP.Addr().Is4()
			overhead := 20
			if !v4 {
				overhead = 40
			}
			if mode == maps.ForwardGUE {
				overhead += 8
			}
			cli := cli4
			if !v4 {
				cli = cli6
			}
			frame := func(payload int) []byte {
				return bpftest.Frame{Src: cli, Dst: svc.VIP, Proto: bpftest.TCP, Flags: bpftest.ACK, Payload: make([]byte, payload), Checksum: true}.Bytes()
			}
			hdrs := 20 + 20
			if !v4 {
				hdrs = 40 + 20
			}
			fits := mtu - overhead // the largest packet that fits once encapsulated
			t.Run(fmt.Sprintf("%s/%s", modeName(mode), svc.VIP.Addr()), func(t *testing.T) {
				if verdict, _ := e.run(t, frame(fits-hdrs)); verdict != bpftest.XDPTx {
					t.Fatalf("a packet of %d bytes that fits: verdict %d, want XDP_TX", fits, verdict)
				}
				in := frame(fits - hdrs + 1)
				before := reasons(t, e.Fixture)
				verdict, out := e.run(t, in)
				if verdict != bpftest.XDPTx {
					t.Fatalf("a packet of %d bytes: verdict %d, want XDP_TX (%v)", fits+1, verdict, diff(before, reasons(t, e.Fixture)))
				}
				if d := diff(before, reasons(t, e.Fixture)); d["icmp_too_big"] != 1 {
					t.Fatalf("reasons moved by %v, want icmp_too_big 1", d)
				}
				if !bytes.Equal(out[0:6], in[6:12]) || !bytes.Equal(out[6:12], in[0:6]) {
					t.Fatalf("ICMP from %s to %s, want the MACs swapped", net.HardwareAddr(out[6:12]), net.HardwareAddr(out[0:6]))
				}
				checkTooBig(t, out, in[14:], svc.VIP.Addr(), cli.Addr(), fits)
				if v4 {
					noDF := bytes.Clone(in)
					noDF[14+6] = 0
					binary.BigEndian.PutUint16(noDF[14+10:], 0)
					binary.BigEndian.PutUint16(noDF[14+10:], ^bpftest.Fold(bpftest.OnesSum(noDF[14:34], 0)))
					before := reasons(t, e.Fixture)
					if verdict, _ := e.run(t, noDF); verdict != bpftest.XDPDrop {
						t.Fatalf("a packet without DF: verdict %d, want XDP_DROP", verdict)
					}
					if d := diff(before, reasons(t, e.Fixture)); d["drop_encap_mtu"] != 1 {
						t.Fatalf("reasons moved by %v, want drop_encap_mtu 1", d)
					}
				}
			})
		}
	}
}

// checkTooBig checks an ICMP error frame answering packet (from its IP
// header on): from vip to cli, type and code, MTU, quote and checksums.
func checkTooBig(t *testing.T, out, packet []byte, vip, cli netip.Addr, mtu int) {
	t.Helper()
	ip := out[14:]
	if vip.Is4() {
		const quote = 64
		if len(ip) != 20+8+quote || binary.BigEndian.Uint16(ip[2:]) != 20+8+quote || ip[9] != 1 {
			t.Fatalf("ICMP packet of %d bytes, header %x", len(ip), ip[:20])
		}
		if bpftest.Fold(bpftest.OnesSum(ip[:20], 0)) != 0xffff {
			t.Fatal("ICMP packet's IPv4 header checksum wrong")
		}
		if netip.AddrFrom4([4]byte(ip[12:])) != vip || netip.AddrFrom4([4]byte(ip[16:])) != cli {
			t.Fatalf("ICMP from %s to %s, want %s to %s", netip.AddrFrom4([4]byte(ip[12:])), netip.AddrFrom4([4]byte(ip[16:])), vip, cli)
		}
		icmp := ip[20:]
		if icmp[0] != 3 || icmp[1] != 4 || int(binary.BigEndian.Uint16(icmp[6:])) != mtu {
			t.Fatalf("ICMP type %d code %d MTU %d, want 3, 4, %d", icmp[0], icmp[1], binary.BigEndian.Uint16(icmp[6:]), mtu)
		}
		if bpftest.Fold(bpftest.OnesSum(icmp, 0)) != 0xffff {
			t.Fatal("ICMP checksum wrong")
		}
		if !bytes.Equal(icmp[8:], packet[:quote]) {
			t.Fatalf("ICMP quotes %x, want %x", icmp[8:], packet[:quote])
		}
		return
	}
	const quote = 96
	if len(ip) != 40+8+quote || binary.BigEndian.Uint16(ip[4:]) != 8+quote || ip[6] != 58 {
		t.Fatalf("ICMPv6 packet of %d bytes, header %x", len(ip), ip[:40])
	}
	src, dst := netip.AddrFrom16([16]byte(ip[8:])), netip.AddrFrom16([16]byte(ip[24:]))
	if src != vip || dst != cli {
		t.Fatalf("ICMPv6 from %s to %s, want %s to %s", src, dst, vip, cli)
	}
	icmp := ip[40:]
	if icmp[0] != 2 || icmp[1] != 0 || int(binary.BigEndian.Uint32(icmp[4:])) != mtu {
		t.Fatalf("ICMPv6 type %d code %d MTU %d, want 2, 0, %d", icmp[0], icmp[1], binary.BigEndian.Uint32(icmp[4:]), mtu)
	}
	s, d := src.As16(), dst.As16()
	pseudo := binary.BigEndian.AppendUint32(append(s[:], d[:]...), uint32(len(icmp)))
	pseudo = append(pseudo, 0, 0, 0, 58)
	if bpftest.Fold(bpftest.OnesSum(icmp, bpftest.OnesSum(pseudo, 0))) != 0xffff {
		t.Fatal("ICMPv6 checksum wrong")
	}
	if !bytes.Equal(icmp[8:], packet[:quote]) {
		t.Fatalf("ICMPv6 quotes %x, want %x", icmp[8:], packet[:quote])
	}
}
