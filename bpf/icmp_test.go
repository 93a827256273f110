package bpf_test

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/tetherlb/tether/internal/bpftest"
	"github.com/tetherlb/tether/maps"
)

var (
	router4 = netip.MustParseAddr("198.51.100.254")
	router6 = netip.MustParseAddr("2001:db8:100::fe")
)

// icmpError is the frame of an ICMP error a router sends to the VIP
// about reply (an IP packet, from the VIP to a client): "fragmentation
// needed" with MTU 1400 (ICMPv6 "packet too big" with 1280), quoting all
// of reply, checksums right.
func icmpError(reply []byte) []byte {
	v6 := reply[0]>>4 == 6
	msg := make([]byte, 8, 8+len(reply))
	var l3 []byte
	if !v6 {
		msg[0], msg[1] = 3, 4
		binary.BigEndian.PutUint16(msg[6:], 1400)
		msg = append(msg, reply...)
		binary.BigEndian.PutUint16(msg[2:], ^bpftest.Fold(bpftest.OnesSum(msg, 0)))
		l3 = make([]byte, 20)
		l3[0], l3[8], l3[9] = 0x45, 64, 1
		binary.BigEndian.PutUint16(l3[2:], uint16(20+len(msg)))
		s, d := router4.As4(), [4]byte(reply[12:16])
		copy(l3[12:], s[:])
		copy(l3[16:], d[:])
		binary.BigEndian.PutUint16(l3[10:], ^bpftest.Fold(bpftest.OnesSum(l3, 0)))
	} else {
		msg[0] = 2
		binary.BigEndian.PutUint32(msg[4:], 1280)
		msg = append(msg, reply...)
		l3 = make([]byte, 40)
		l3[0], l3[6], l3[7] = 0x60, 58, 64
		binary.BigEndian.PutUint16(l3[4:], uint16(len(msg)))
		s := router6.As16()
		copy(l3[8:], s[:])
		copy(l3[24:], reply[8:24])
		binary.BigEndian.PutUint16(msg[2:], ^bpftest.Fold(bpftest.OnesSum(msg, bpftest.OnesSum(icmp6Pseudo(l3, len(msg)), 0))))
	}
	eth := append(append(append([]byte{}, bpftest.LBMAC...), bpftest.ClientMAC...), 0x08, 0x00)
	if v6 {
		eth[12], eth[13] = 0x86, 0xdd
	}
	return append(append(eth, l3...), msg...)
}

// icmp6Pseudo is the pseudo header of an ICMPv6 message of n bytes in the
// IPv6 packet whose header is ip6.
func icmp6Pseudo(ip6 []byte, n int) []byte {
	return bpftest.PseudoHeader(netip.AddrFrom16([16]byte(ip6[8:24])), netip.AddrFrom16([16]byte(ip6[24:40])), 58, n)
}

// checkICMP verifies an ICMP error frame's checksums: the outer IPv4
// header's, the ICMP message's, the quoted IPv4 header's and a quoted UDP
// checksum (over the whole quoted datagram), and returns the outer
// destination and the quoted source and destination.
func checkICMP(t *testing.T, frame []byte) (dst netip.Addr, qsrc, qdst netip.AddrPort) {
	t.Helper()
	ip := frame[14:]
	var msg, quoted []byte
	if ip[0]>>4 == 4 {
		if bpftest.Fold(bpftest.OnesSum(ip[:20], 0)) != 0xffff {
			t.Fatal("outer IPv4 header checksum wrong")
		}
		dst, msg = netip.AddrFrom4([4]byte(ip[16:20])), ip[20:binary.BigEndian.Uint16(ip[2:])]
		if bpftest.Fold(bpftest.OnesSum(msg, 0)) != 0xffff {
			t.Fatal("ICMP checksum wrong")
		}
		quoted = msg[8:]
		if bpftest.Fold(bpftest.OnesSum(quoted[:20], 0)) != 0xffff {
			t.Fatal("quoted IPv4 header checksum wrong")
		}
		qsrc = netip.AddrPortFrom(netip.AddrFrom4([4]byte(quoted[12:16])), binary.BigEndian.Uint16(quoted[20:]))
		qdst = netip.AddrPortFrom(netip.AddrFrom4([4]byte(quoted[16:20])), binary.BigEndian.Uint16(quoted[22:]))
	} else {
		dst, msg = netip.AddrFrom16([16]byte(ip[24:40])), ip[40:40+int(binary.BigEndian.Uint16(ip[4:]))]
		if bpftest.Fold(bpftest.OnesSum(msg, bpftest.OnesSum(icmp6Pseudo(ip, len(msg)), 0))) != 0xffff {
			t.Fatal("ICMPv6 checksum wrong")
		}
		quoted = msg[8:]
		qsrc = netip.AddrPortFrom(netip.AddrFrom16([16]byte(quoted[8:24])), binary.BigEndian.Uint16(quoted[40:]))
		qdst = netip.AddrPortFrom(netip.AddrFrom16([16]byte(quoted[24:40])), binary.BigEndian.Uint16(quoted[42:]))
	}
	eth := make([]byte, 14, 14+len(quoted))
	eth[12], eth[13] = 0x08, 0x00
	if quoted[0]>>4 == 6 {
		eth[12], eth[13] = 0x86, 0xdd
	}
	if err := bpftest.VerifyChecksums(append(eth, quoted...)); err != nil && (quoted[0]>>4 == 4 && quoted[9] == bpftest.UDP || quoted[0]>>4 == 6 && quoted[6] == bpftest.UDP) {
		t.Fatalf("quoted datagram: %v", err)
	}
	return dst, qsrc, qdst
}

// TestICMPForwarded: an ICMP error a router sends to the VIP about a
// flow's reply goes to the backend that holds the flow, in every
// forwarding mode: as it came (dsr), encapsulated (ipip, gue), or with its
// destination and the quoted reply translated to what the backend sent
// (nat, fullnat), checksums right; one about a flow with no connection
// entry goes where the ring sends the flow.
func TestICMPForwarded(t *testing.T) {
	for _, mode := range []uint8{maps.ForwardDSR, maps.ForwardNAT, maps.ForwardFullNAT, maps.ForwardIPIP, maps.ForwardGUE} {
		name := modeName(mode)
		encap := mode == maps.ForwardIPIP || mode == maps.ForwardGUE
		t.Run(name, func(t *testing.T) {
			var f *bpftest.Fixture
			var svcs []bpftest.Service
			var lbMAC net.HardwareAddr
			run := func(frame []byte) (uint32, []byte) { return f.Run(frame) }
			if encap {
				e := newEncapLab(t, mode, false)
				f, svcs, lbMAC = e.Fixture, e.svcs, e.lab.Balancer.MAC
				run = func(frame []byte) (uint32, []byte) { return e.run(t, frame) }
			} else {
				f, svcs = fourServicesForwarding(t, mode)
			}
			for _, tc := range forwardCases(svcs)[:4] {
				t.Run(tc.desc, func(t *testing.T) {
					first := uint8(bpftest.SYN)
					if tc.svc.Proto == bpftest.UDP {
						first = 0
					}
					var fwd []byte
					for _, fl := range []uint8{first, bpftest.ACK} {
						var v uint32
						v, fwd = run(bpftest.Frame{Src: tc.cli, Dst: tc.svc.VIP, Proto: tc.svc.Proto, Flags: fl, Checksum: true}.Bytes())
						if v != bpftest.XDPTx {
							t.Fatalf("the flow's packet: verdict %d", v)
						}
					}
					id, err := bpftest.BackendOf(fwd)
					must(t, err)
					// The reply as it reached the router: from the VIP.
					reply := bpftest.Frame{Src: tc.svc.VIP, Dst: tc.cli, Proto: tc.svc.Proto, Flags: bpftest.ACK | bpftest.PSH,
						Payload: bytes.Repeat([]byte("x"), 64), Checksum: true}.Bytes()[14:]
					in := icmpError(reply)
					before := reasons(t, f)
					v, out := run(in)
					if v != bpftest.XDPTx {
						t.Fatalf("ICMP error: verdict %d, want XDP_TX (%v)", v, diff(before, reasons(t, f)))
					}
					got, err := bpftest.BackendOf(out)
					must(t, err)
					if got != id {
						t.Fatalf("ICMP error sent to backend %d, the flow is on %d", got, id)
					}
					if encap {
						o := parseOuter(t, out, mode == maps.ForwardGUE, lbMAC)
						if !bytes.Equal(o.inner, in[14:]) {
							t.Fatalf("the ICMP error inside differs from the one sent")
						}
						return
					}
					dst, qsrc, qdst := checkICMP(t, out)
					switch mode {
					case maps.ForwardDSR:
						if !bytes.Equal(out[12:], in[12:]) {
							t.Fatal("dsr changed the ICMP error beyond its MACs")
						}
					case maps.ForwardNAT, maps.ForwardFullNAT:
						fwdT := parseTranslated(t, fwd)
						be := netip.AddrPortFrom(tc.svc.Backend(id), backendPort)
						if dst != be.Addr() || qsrc != be || qdst != fwdT.src {
							t.Fatalf("translated ICMP error to %s quoting %s → %s, want to %s quoting %s → %s", dst, qsrc, qdst, be.Addr(), be, fwdT.src)
						}
						// fullnat: from the balancer, which the backend can reach.
						src := netip.AddrFrom16([16]byte(out[14+8 : 14+24]))
						if tc.svc.VIP.Addr().Is4() {
							src = netip.AddrFrom4([4]byte(out[14+12 : 14+16]))
						}
						want := router4
						if !tc.svc.VIP.Addr().Is4() {
							want = router6
						}
						if mode == maps.ForwardFullNAT {
							want = snatFor(tc.svc.VIP.Addr())
						}
						if src != want {
							t.Fatalf("translated ICMP error from %s, want %s", src, want)
						}
					}
				})
			}
		})
	}
}

// TestICMPNotForwarded: ICMP that is no error about a VIP flow goes to the
// kernel untouched, counted as before (pass_not_tcp_udp): an echo request,
// an error quoting too little, a quoted header with options or of another
// protocol, one not sent by the VIP the error is addressed to, one about
// a port no service has. An error about a flow of no connection entry goes
// where the ring sends the flow.
func TestICMPNotForwarded(t *testing.T) {
	f, svcs := fourServicesForwarding(t, maps.ForwardDSR)
	reply := bpftest.Frame{Src: vip4, Dst: cli4, Proto: bpftest.TCP, Flags: bpftest.ACK, Checksum: true}.Bytes()[14:]
	mutate := func(fn func(q []byte) []byte) []byte {
		q := fn(bytes.Clone(reply))
		binary.BigEndian.PutUint16(q[10:], 0)
		binary.BigEndian.PutUint16(q[10:], ^bpftest.Fold(bpftest.OnesSum(q[:20], 0)))
		return icmpError(q)
	}
	echo := icmpError(reply)
	echo[14+20] = 8               // an echo request
	elsewhere := icmpError(reply) // to another address than the quoted VIP
	elsewhere[14+19]++
	binary.BigEndian.PutUint16(elsewhere[14+10:], 0)
	binary.BigEndian.PutUint16(elsewhere[14+10:], ^bpftest.Fold(bpftest.OnesSum(elsewhere[14:34], 0)))
	for _, tc := range []struct {
		desc  string
		frame []byte
	}{
		{"echo request", echo},
		{"quote of 24 bytes", mutate(func(q []byte) []byte { return q[:24] })},
		{"quoted header with options", mutate(func(q []byte) []byte { q[0] = 0x46; return q })},
		{"quoted ICMP", mutate(func(q []byte) []byte { q[9] = 1; return q })},
		{"sent to another address than the quoted source", elsewhere},
		{"quoted port of no service", mutate(func(q []byte) []byte { binary.BigEndian.PutUint16(q[20:], 9999); return q })},
	} {
		before := reasons(t, f)
		v, out := f.Run(tc.frame)
		if v != bpftest.XDPPass || !bytes.Equal(out, tc.frame) {
			t.Errorf("%s: verdict %d, frame changed %v; want it passed untouched", tc.desc, v, !bytes.Equal(out, tc.frame))
		}
		if d := diff(before, reasons(t, f)); d["pass_not_tcp_udp"] != 1 || len(d) != 1 {
			t.Errorf("%s: reasons moved by %v, want pass_not_tcp_udp 1", tc.desc, d)
		}
	}

	// A flow the balancer never saw: the ring's backend for it.
	for _, svc := range svcs {
		cli := netip.AddrPortFrom(cli4.Addr(), 42424)
		if svc.VIP.Addr().Is6() {
			cli = netip.AddrPortFrom(cli6.Addr(), 42424)
		}
		r := bpftest.Frame{Src: svc.VIP, Dst: cli, Proto: svc.Proto, Checksum: true}.Bytes()[14:]
		v, out := f.Run(icmpError(r))
		if v != bpftest.XDPTx {
			t.Fatalf("%s/%d: ICMP error about an unseen flow: verdict %d", svc.VIP, svc.Proto, v)
		}
		got, err := bpftest.BackendOf(out)
		must(t, err)
		_, fwd := f.Run(bpftest.Frame{Src: cli, Dst: svc.VIP, Proto: svc.Proto, Flags: bpftest.SYN}.Bytes())
		want, err := bpftest.BackendOf(fwd)
		must(t, err)
		if got != want {
			t.Errorf("%s/%d: ICMP error about an unseen flow went to backend %d, the flow goes to %d", svc.VIP, svc.Proto, got, want)
		}
	}
}

// echoRequest is an ICMP echo request frame from the client to vip.
func echoRequest(cli, vip netip.Addr) []byte {
	msg := []byte{8, 0, 0, 0, 0x12, 0x34, 0, 1, 'p', 'i', 'n', 'g'}
	reply := bpftest.Frame{Src: netip.AddrPortFrom(vip, 1), Dst: netip.AddrPortFrom(cli, 1), Proto: bpftest.UDP}.Bytes()[14:]
	f := icmpError(reply) // a frame to vip from router: rewritten below
	ip := f[14:]
	if vip.Is4() {
		ip = ip[:20]
		s := cli.As4()
		copy(ip[12:], s[:])
		binary.BigEndian.PutUint16(ip[2:], uint16(20+len(msg)))
		binary.BigEndian.PutUint16(ip[10:], 0)
		binary.BigEndian.PutUint16(ip[10:], ^bpftest.Fold(bpftest.OnesSum(ip, 0)))
		binary.BigEndian.PutUint16(msg[2:], ^bpftest.Fold(bpftest.OnesSum(msg, 0)))
	} else {
		ip = ip[:40]
		s := cli.As16()
		copy(ip[8:], s[:])
		binary.BigEndian.PutUint16(ip[4:], uint16(len(msg)))
		msg[0] = 128
		binary.BigEndian.PutUint16(msg[2:], ^bpftest.Fold(bpftest.OnesSum(msg, bpftest.OnesSum(icmp6Pseudo(ip, len(msg)), 0))))
	}
	return append(append(f[:14:14], ip...), msg...)
}

// TestICMPEcho: an echo request to a VIP whose entry says so is answered
// from the program: back to its sender's MAC, from the VIP, type echo
// reply, the rest of the message as it came, checksums right; one to a
// VIP without the flag, or to no VIP, goes to the kernel untouched.
func TestICMPEcho(t *testing.T) {
	f, _ := fourServicesForwarding(t, maps.ForwardDSR)
	must(t, f.Maps.PutVIP(vip4.Addr(), maps.VIPEchoReply))
	must(t, f.Maps.PutVIP(vip6.Addr(), maps.VIPEchoReply))
	for _, tc := range []struct{ cli, vip netip.Addr }{{cli4.Addr(), vip4.Addr()}, {cli6.Addr(), vip6.Addr()}} {
		in := echoRequest(tc.cli, tc.vip)
		before := reasons(t, f)
		v, out := f.Run(in)
		if v != bpftest.XDPTx {
			t.Fatalf("echo request to %s: verdict %d, want XDP_TX", tc.vip, v)
		}
		if d := diff(before, reasons(t, f)); d["icmp_echo_reply"] != 1 {
			t.Fatalf("reasons moved by %v, want icmp_echo_reply 1", d)
		}
		if !bytes.Equal(out[0:6], in[6:12]) || !bytes.Equal(out[6:12], in[0:6]) {
			t.Fatal("echo reply not sent back to the request's sender")
		}
		ip := out[14:]
		var src, dst netip.Addr
		var msg []byte
		if tc.vip.Is4() {
			if bpftest.Fold(bpftest.OnesSum(ip[:20], 0)) != 0xffff || ip[8] != 64 {
				t.Fatalf("echo reply IPv4 header %x: checksum wrong or TTL not 64", ip[:20])
			}
			src, dst, msg = netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20])), ip[20:]
			if msg[0] != 0 || bpftest.Fold(bpftest.OnesSum(msg, 0)) != 0xffff {
				t.Fatalf("echo reply %x: type %d, or checksum wrong", msg, msg[0])
			}
		} else {
			src, dst, msg = netip.AddrFrom16([16]byte(ip[8:24])), netip.AddrFrom16([16]byte(ip[24:40])), ip[40:]
			if msg[0] != 129 || bpftest.Fold(bpftest.OnesSum(msg, bpftest.OnesSum(icmp6Pseudo(ip, len(msg)), 0))) != 0xffff {
				t.Fatalf("echo reply %x: type %d, or checksum wrong", msg, msg[0])
			}
		}
		if src != tc.vip || dst != tc.cli || !bytes.Equal(msg[4:], []byte{0x12, 0x34, 0, 1, 'p', 'i', 'n', 'g'}) {
			t.Fatalf("echo reply from %s to %s carrying %x", src, dst, msg[4:])
		}
	}
	must(t, f.Maps.DeleteVIP(vip4.Addr()))
	for _, in := range [][]byte{echoRequest(cli4.Addr(), vip4.Addr()), echoRequest(cli4.Addr(), netip.MustParseAddr("203.0.113.99"))} {
		if v, out := f.Run(in); v != bpftest.XDPPass || !bytes.Equal(out, in) {
			t.Errorf("echo request to a VIP without the flag or to no VIP: verdict %d, changed %v", v, !bytes.Equal(out, in))
		}
	}
}

// TestICMPErrorKinds: every kind of error the program forwards, tagged or
// not: "time exceeded" (IPv4), "destination unreachable" and "time
// exceeded" (ICMPv6) besides the MTU errors, and one in a VLAN-tagged
// frame, which keeps its tag; each reaches the flow's backend unchanged
// but for its MACs (dsr).
func TestICMPErrorKinds(t *testing.T) {
	f, svcs := fourServicesForwarding(t, maps.ForwardDSR)
	for _, tc := range []struct {
		desc      string
		svc       bpftest.Service
		cli       netip.AddrPort
		typ, code uint8
		vlan      uint16
	}{
		{"IPv4 time exceeded", svcs[0], cli4, 11, 0, 0},
		{"IPv4 port unreachable, UDP", svcs[1], cli4, 3, 3, 0},
		{"IPv6 destination unreachable", svcs[2], cli6, 1, 4, 0},
		{"IPv6 time exceeded, UDP", svcs[3], cli6, 3, 0, 0},
		{"IPv4 fragmentation needed, VLAN 7", svcs[0], netip.AddrPortFrom(cli4.Addr(), 40007), 3, 4, 7},
		{"IPv6 packet too big, VLAN 7", svcs[2], netip.AddrPortFrom(cli6.Addr(), 40007), 2, 0, 7},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			v, fwd := f.Run(bpftest.Frame{Src: tc.cli, Dst: tc.svc.VIP, Proto: tc.svc.Proto, VLAN: tc.vlan, Checksum: true}.Bytes())
			if v != bpftest.XDPTx {
				t.Fatalf("the flow's packet: verdict %d", v)
			}
			id, err := bpftest.BackendOf(fwd)
			must(t, err)
			reply := bpftest.Frame{Src: tc.svc.VIP, Dst: tc.cli, Proto: tc.svc.Proto, Checksum: true}.Bytes()[14:]
			in := retype(icmpError(reply), tc.typ, tc.code)
			if tc.vlan != 0 {
				tag := []byte{0x81, 0x00, byte(tc.vlan >> 8), byte(tc.vlan)}
				in = append(append(append([]byte{}, in[:12]...), tag...), in[12:]...)
			}
			v, out := f.Run(in)
			if v != bpftest.XDPTx {
				t.Fatalf("ICMP error: verdict %d, want XDP_TX", v)
			}
			got, err := bpftest.BackendOf(out)
			must(t, err)
			if got != id || !bytes.Equal(out[12:], in[12:]) {
				t.Fatalf("ICMP error sent to backend %d (the flow's: %d), changed beyond its MACs: %v", got, id, !bytes.Equal(out[12:], in[12:]))
			}
		})
	}
}

// retype gives an untagged ICMP error frame (from icmpError) another type
// and code, its checksum updated.
func retype(frame []byte, typ, code uint8) []byte {
	ip := frame[14:]
	if ip[0]>>4 == 4 {
		msg := ip[20:]
		msg[0], msg[1] = typ, code
		binary.BigEndian.PutUint16(msg[2:], 0)
		binary.BigEndian.PutUint16(msg[2:], ^bpftest.Fold(bpftest.OnesSum(msg, 0)))
		return frame
	}
	msg := ip[40:]
	msg[0], msg[1] = typ, code
	binary.BigEndian.PutUint16(msg[2:], 0)
	binary.BigEndian.PutUint16(msg[2:], ^bpftest.Fold(bpftest.OnesSum(msg, bpftest.OnesSum(icmp6Pseudo(ip, len(msg)), 0))))
	return frame
}
