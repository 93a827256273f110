package bpf_test

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"testing"

	"github.com/tetherlb/tether/internal/bpftest"
	"github.com/tetherlb/tether/maps"
)

// This file holds the program's invariant on arbitrary frames, checked
// against a reference parser written apart from the C one:
//
//   - nothing is aborted;
//   - a frame that is not a well-formed TCP or UDP packet to a VIP, or
//     that the program does not balance (options, fragments, extension
//     headers, stacked tags, other protocols), is never forwarded: it goes
//     to the kernel untouched or is dropped, counted under the reason the
//     reference gives;
//   - a well-formed packet to a VIP is forwarded to a backend of its
//     service, unless it starts a flow with a wrong IPv4 header checksum
//     (dropped): with dsr, only its Ethernet addresses changed; with nat
//     and fullnat, to the backend's address and port, its payload
//     untouched (an ICMP error about a fullnat flow without an entry goes
//     to the kernel: there is no port to translate it back with); with
//     ipip and gue, inside an outer header to the backend's address, the
//     packet as it came;
//   - the connection and affinity tables hold exactly the flows that were
//     forwarded and recorded, nothing keyed on bytes a dropped frame held.

// refVerdict is what the reference expects of a frame.
type refVerdict struct {
	forward bool
	pass    bool   // to the kernel untouched (else dropped, when !forward)
	reason  string // the counter of a frame not forwarded
	svc     *bpftest.Service
	flow    refFlow
	record  bool // a forwarded frame enters the tables (all but a bare SYN)
}

type refFlow struct {
	src, dst netip.AddrPort
	proto    uint8
}

// reference parses a frame as the program must, from the header formats
// alone: one VLAN tag, IPv4 without options and fragments, IPv6 without
// extension headers, TCP and UDP bounded by the IP length.
func reference(frame []byte, svcs []bpftest.Service, tracked map[refFlow]bool) refVerdict {
	drop := func(r string) refVerdict { return refVerdict{reason: r} }
	pass := func(r string) refVerdict { return refVerdict{pass: true, reason: r} }
	if len(frame) < 14 {
		return drop("drop_truncated")
	}
	l3, et := 14, binary.BigEndian.Uint16(frame[12:])
	if et == 0x8100 || et == 0x88a8 {
		if len(frame) < 18 {
			return drop("drop_truncated")
		}
		l3, et = 18, binary.BigEndian.Uint16(frame[16:])
		if et == 0x8100 || et == 0x88a8 {
			return pass("pass_vlan_stack")
		}
	}
	var (
		src, dst     netip.Addr
		proto        uint8
		l4, l4len    int
		v4, v4csumOK bool
	)
	switch et {
	case 0x0800:
		ip := frame[l3:]
		if len(ip) < 20 {
			return drop("drop_truncated")
		}
		if ip[0]>>4 != 4 || ip[0]&0xf < 5 {
			return drop("drop_bad_header")
		}
		if ip[0]&0xf != 5 {
			return pass("pass_ipv4_options")
		}
		total := int(binary.BigEndian.Uint16(ip[2:]))
		if total < 20 {
			return drop("drop_bad_header")
		}
		if total > len(ip) {
			return drop("drop_truncated")
		}
		if binary.BigEndian.Uint16(ip[6:])&0x3fff != 0 {
			return pass("pass_ipv4_fragment")
		}
		v4, v4csumOK = true, bpftest.Fold(bpftest.OnesSum(ip[:20], 0)) == 0xffff
		src, dst = netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
		proto, l4, l4len = ip[9], l3+20, total-20
	case 0x86dd:
		ip := frame[l3:]
		if len(ip) < 40 {
			return drop("drop_truncated")
		}
		if ip[0]>>4 != 6 {
			return drop("drop_bad_header")
		}
		plen := int(binary.BigEndian.Uint16(ip[4:]))
		if 40+plen > len(ip) {
			return drop("drop_truncated")
		}
		switch ip[6] {
		case 0, 43, 44, 51, 60, 135, 139, 140, 253, 254:
			return pass("pass_ipv6_extension")
		}
		src, dst = netip.AddrFrom16([16]byte(ip[8:24])), netip.AddrFrom16([16]byte(ip[24:40]))
		proto, l4, l4len = ip[6], l3+40, plen
	default:
		return pass("pass_not_ip")
	}
	seg := frame[l4 : l4+l4len]
	syn := false
	switch proto {
	case bpftest.TCP:
		if len(seg) < 20 {
			return drop("drop_l4_truncated")
		}
		if hl := int(seg[12]>>4) * 4; hl < 20 || hl > len(seg) {
			return drop("drop_tcp_offset")
		}
		syn = seg[13]&(bpftest.SYN|bpftest.ACK) == bpftest.SYN
	case bpftest.UDP:
		if len(seg) < 8 {
			return drop("drop_l4_truncated")
		}
		if int(binary.BigEndian.Uint16(seg[4:])) != len(seg) {
			return drop("drop_udp_length")
		}
	case 1, 58:
		if v, ok := icmpReference(seg, v4, proto, dst, svcs, tracked); ok && (!v4 || v4csumOK) {
			return v
		}
		return pass("pass_not_tcp_udp")
	default:
		return pass("pass_not_tcp_udp")
	}
	fl := refFlow{
		src:   netip.AddrPortFrom(src, binary.BigEndian.Uint16(seg)),
		dst:   netip.AddrPortFrom(dst, binary.BigEndian.Uint16(seg[2:])),
		proto: proto,
	}
	fwd := refVerdict{forward: true, flow: fl, record: !syn}
	for i := range svcs {
		if svcs[i].VIP == fl.dst && svcs[i].Proto == proto {
			fwd.svc = &svcs[i]
		}
	}
	if tracked[fl] {
		return fwd
	}
	if fwd.svc == nil {
		return pass("pass_not_vip")
	}
	if v4 && !v4csumOK {
		return drop("drop_ip_checksum")
	}
	return fwd
}

// icmpReference says whether an ICMP message (seg, within its datagram,
// addressed to dst) is an error the program forwards: "destination
// unreachable" or "time exceeded" (ICMPv6: also "packet too big") quoting
// a TCP or UDP packet (IPv4: no options, a first fragment or none) from
// dst, whose reversed 5-tuple is a service's
// flow; it goes to a backend of that service, as it came but for its MACs,
// and enters no table.
func icmpReference(seg []byte, v4 bool, proto uint8, dst netip.Addr, svcs []bpftest.Service, tracked map[refFlow]bool) (refVerdict, bool) {
	if v4 != (proto == 1) || len(seg) < 8 {
		return refVerdict{}, false
	}
	q := seg[8:]
	var fl refFlow
	if v4 {
		if seg[0] != 3 && seg[0] != 11 || len(q) < 28 || q[0] != 0x45 || binary.BigEndian.Uint16(q[6:])&0x1fff != 0 ||
			q[9] != bpftest.TCP && q[9] != bpftest.UDP ||
			netip.AddrFrom4([4]byte(q[12:16])) != dst {
			return refVerdict{}, false
		}
		fl = refFlow{netip.AddrPortFrom(netip.AddrFrom4([4]byte(q[16:20])), binary.BigEndian.Uint16(q[22:])),
			netip.AddrPortFrom(dst, binary.BigEndian.Uint16(q[20:])), q[9]}
	} else {
		if seg[0] < 1 || seg[0] > 3 || len(q) < 48 || q[0]>>4 != 6 || q[6] != bpftest.TCP && q[6] != bpftest.UDP ||
			netip.AddrFrom16([16]byte(q[8:24])) != dst {
			return refVerdict{}, false
		}
		fl = refFlow{netip.AddrPortFrom(netip.AddrFrom16([16]byte(q[24:40])), binary.BigEndian.Uint16(q[42:])),
			netip.AddrPortFrom(dst, binary.BigEndian.Uint16(q[40:])), q[6]}
	}
	for i := range svcs {
		if svcs[i].VIP == fl.dst && svcs[i].Proto == fl.proto {
			if svcs[i].Forwarding == maps.ForwardFullNAT && !tracked[fl] {
				// Translated from a port of the balancer's: without the
				// flow's entry, there is none to translate back.
				return refVerdict{pass: true, reason: "pass_icmp_no_flow"}, true
			}
			return refVerdict{forward: true, flow: fl, svc: &svcs[i]}, true
		}
	}
	return refVerdict{}, false
}

// invariant runs frames through one loaded program and checks each
// against the reference, keeping the flows the tables must hold.
type invariant struct {
	f       *bpftest.Fixture
	run     func(frame []byte) (uint32, []byte) // a frame through the program
	mac     net.HardwareAddr                    // ipip, gue: the balancer's, the encapsulated frames' source
	mode    uint8                               // the services' forwarding
	svcs    []bpftest.Service
	tracked map[refFlow]bool
	counted map[string]uint64
	base    map[string]uint64
	frames  int
}

// newInvariant loads the program with four services forwarding in mode.
// With ipip and gue, whose forwarding asks the kernel's FIB for the next
// hop, frames run on the balancer of a lab that routes to every backend,
// its eth0's MTU above any frame's, so that none needs an ICMP "too big"
// (which encap_test.go checks).
func newInvariant(t testing.TB, mode uint8) *invariant {
	f := bpftest.NewFixture(t, loaderOptsSized(1<<18, 1<<18))
	iv := &invariant{f: f, run: f.Run, mode: mode, tracked: map[refFlow]bool{}, counted: map[string]uint64{}}
	setup := forwardingIn(mode)
	if mode == maps.ForwardIPIP || mode == maps.ForwardGUE {
		l := backendRoutes(t, 2000)
		setup, iv.mac = encapIn(mode, false), l.Balancer.MAC
		iv.run = func(frame []byte) (verdict uint32, out []byte) {
			if err := l.Balancer.Do(func() error {
				verdict, out = f.RunOn(frame, l.Balancer.Ifindex)
				return nil
			}); err != nil {
				f.TB.Fatal(err)
			}
			return verdict, out
		}
	}
	svcs := []bpftest.Service{
		{ID: 1, VIP: vip4, Proto: bpftest.TCP, Source: true, Backends: []uint32{1, 2, 3}},
		{ID: 2, VIP: udp4, Proto: bpftest.UDP, Backends: []uint32{4, 5, 6}},
		{ID: 3, VIP: vip6, Proto: bpftest.TCP, Source: true, Backends: []uint32{7, 8, 9}},
		{ID: 4, VIP: udp6, Proto: bpftest.UDP, Backends: []uint32{10, 11, 12}},
	}
	for i := range svcs {
		setup(&svcs[i])
		f.AddService(svcs[i])
	}
	base, err := f.Maps.Reasons()
	if err != nil {
		t.Fatal(err)
	}
	iv.svcs, iv.base = svcs, base
	return iv
}

// check runs one frame (at least an Ethernet header: the test run refuses
// shorter ones) and returns what broke the invariant.
func (iv *invariant) check(in []byte) error {
	want := reference(in, iv.svcs, iv.tracked)
	verdict, out := iv.run(bytes.Clone(in))
	iv.frames++
	switch {
	case verdict == bpftest.XDPAborted:
		return fmt.Errorf("XDP_ABORTED")
	case want.forward:
		if verdict != bpftest.XDPTx {
			return fmt.Errorf("verdict %d, want XDP_TX to a backend of %s/%d", verdict, want.flow.dst, want.flow.proto)
		}
		id, err := bpftest.BackendOf(out)
		if err != nil {
			return err
		}
		if want.svc == nil || !contains(want.svc.Backends, id) {
			return fmt.Errorf("sent to backend %d, not one of %s/%d's", id, want.flow.dst, want.flow.proto)
		}
		if err := iv.rewritten(in, out, id, want); err != nil {
			return err
		}
		if want.record {
			iv.tracked[want.flow] = true
		}
	case want.pass:
		if verdict != bpftest.XDPPass || !bytes.Equal(out, in) {
			return fmt.Errorf("verdict %d, want XDP_PASS untouched (%s)", verdict, want.reason)
		}
		iv.counted[want.reason]++
	default:
		if verdict != bpftest.XDPDrop {
			return fmt.Errorf("verdict %d, want XDP_DROP (%s)", verdict, want.reason)
		}
		iv.counted[want.reason]++
	}
	return nil
}

// rewritten checks what the program changed in a frame it forwarded to
// backend id: with dsr, the MACs alone; translated (nat, fullnat), a TCP
// or UDP packet goes to the backend's address and port, from the client
// (nat) or from the SNAT address and a port of 1024-32767 (fullnat), with
// its payload as it came (an ICMP error keeps its length; what is
// translated inside it is not checked here). Checksums are not checked:
// a frame that came with a wrong one keeps it wrong, updated
// incrementally.
func (iv *invariant) rewritten(in, out []byte, id uint32, want refVerdict) error {
	if iv.mode == maps.ForwardIPIP || iv.mode == maps.ForwardGUE {
		return iv.encapsulated(in, out, id, want)
	}
	if !bytes.Equal(out[6:12], bpftest.LBMAC) {
		return fmt.Errorf("forwarded from another MAC than the balancer's:\n got %x", out)
	}
	if iv.mode == maps.ForwardDSR {
		if !bytes.Equal(out[12:], in[12:]) {
			return fmt.Errorf("forwarded with more than its MACs changed:\n got %x", out)
		}
		return nil
	}
	if len(out) != len(in) {
		return fmt.Errorf("translated to %d bytes from %d:\n got %x", len(out), len(in), out)
	}
	l3 := 14
	if et := binary.BigEndian.Uint16(in[12:]); et == 0x8100 || et == 0x88a8 {
		l3 = 18
	}
	var src, dst netip.Addr
	var proto uint8
	var l4 int
	if in[l3]>>4 == 4 {
		src, dst, proto, l4 = netip.AddrFrom4([4]byte(out[l3+12:l3+16])), netip.AddrFrom4([4]byte(out[l3+16:l3+20])), out[l3+9], l3+20
	} else {
		src, dst, proto, l4 = netip.AddrFrom16([16]byte(out[l3+8:l3+24])), netip.AddrFrom16([16]byte(out[l3+24:l3+40])), out[l3+6], l3+40
	}
	if proto != bpftest.TCP && proto != bpftest.UDP {
		return nil // an ICMP error, translated inside
	}
	hl := 8
	if proto == bpftest.TCP {
		hl = int(in[l4+12]>>4) * 4
	}
	backend := bpftest.BackendAddr(want.svc.VIP.Addr(), id)
	if dst != backend || binary.BigEndian.Uint16(out[l4+2:]) != backendPort {
		return fmt.Errorf("translated to %s port %d, want backend %d at %s port %d:\n got %x", dst, binary.BigEndian.Uint16(out[l4+2:]), id, backend, backendPort, out)
	}
	sport := binary.BigEndian.Uint16(out[l4:])
	switch iv.mode {
	case maps.ForwardNAT:
		if got := netip.AddrPortFrom(src, sport); got != want.flow.src {
			return fmt.Errorf("nat: sent from %s, want the client %s:\n got %x", got, want.flow.src, out)
		}
	case maps.ForwardFullNAT:
		if src != want.svc.SNAT || sport < 1024 || sport > 32767 {
			return fmt.Errorf("fullnat: sent from %s port %d, want %s and a port in 1024-32767:\n got %x", src, sport, want.svc.SNAT, out)
		}
	}
	if !bytes.Equal(out[l4+hl:], in[l4+hl:]) {
		return fmt.Errorf("translated with its payload changed:\n got %x\nwant %x", out[l4+hl:], in[l4+hl:])
	}
	return nil
}

// encapsulated checks a frame sent to backend id in an outer header (ipip,
// gue): to the backend's address, from the tunnel's prefix, the packet
// inside as it came without its Ethernet header and VLAN tag. Bytes past
// the IP packet in the frame (Ethernet padding) follow the outer packet
// as they came; receivers trim them by the IP length.
func (iv *invariant) encapsulated(in, out []byte, id uint32, want refVerdict) error {
	l3 := 14
	if et := binary.BigEndian.Uint16(in[12:]); et == 0x8100 || et == 0x88a8 {
		l3 = 18
	}
	innerEnd, outerEnd := l3+ipLen(in[l3:]), 14+ipLen(out[14:])
	if outerEnd > len(out) || !bytes.Equal(out[outerEnd:], in[innerEnd:]) {
		return fmt.Errorf("the bytes past the outer packet are not those past the packet sent:\n got %x\nsent %x", out, in)
	}
	o, err := outerOf(out[:outerEnd], iv.mode == maps.ForwardGUE, iv.mac)
	if err != nil {
		return fmt.Errorf("%v:\n got %x", err, out)
	}
	if o.dst != want.svc.Backend(id) || !want.svc.Tunnel.Source.Contains(o.src) {
		return fmt.Errorf("encapsulated from %s to %s, want backend %d at %s from %s:\n got %x", o.src, o.dst, id, want.svc.Backend(id), want.svc.Tunnel.Source, out)
	}
	if !bytes.Equal(o.inner, in[l3:innerEnd]) {
		return fmt.Errorf("the packet inside differs from the one sent:\n got %x\nwant %x", o.inner, in[l3:innerEnd])
	}
	return nil
}

// ipLen is the length an IP packet's header gives it: the IPv4 total
// length, or the IPv6 header and its payload length.
func ipLen(p []byte) int {
	if p[0]>>4 == 4 {
		return int(binary.BigEndian.Uint16(p[2:]))
	}
	return 40 + int(binary.BigEndian.Uint16(p[4:]))
}

// tables checks the reason counters and the tables against what the
// reference expected of every frame so far.
func (iv *invariant) tables() error {
	got, err := iv.f.Maps.Reasons()
	if err != nil {
		return err
	}
	for name, n := range got {
		if d := n - iv.base[name]; d != iv.counted[name] {
			return fmt.Errorf("reason %s counted %d frames, the reference %d", name, d, iv.counted[name])
		}
	}
	flows, err := iv.f.Maps.Flows()
	if err != nil {
		return err
	}
	if len(flows) != len(iv.tracked) {
		return fmt.Errorf("connection table holds %d flows, the reference recorded %d", len(flows), len(iv.tracked))
	}
	clients := map[string]bool{}
	for _, fl := range flows {
		k := refFlow{fl.Client, fl.VIP, fl.Proto}
		if !iv.tracked[k] {
			return fmt.Errorf("connection table holds %s → %s/%d, which no forwarded frame recorded", fl.Client, fl.VIP, fl.Proto)
		}
		for _, s := range iv.svcs {
			if s.Source && s.VIP == fl.VIP && s.Proto == fl.Proto {
				clients[fmt.Sprint(s.ID, fl.Client.Addr())] = true
			}
		}
	}
	if _, affs, err := iv.f.Maps.Entries(); err != nil || affs != len(clients) {
		return fmt.Errorf("affinity table holds %d entries, the recorded flows have %d clients (%v)", affs, len(clients), err)
	}
	return nil
}

// seedFrames are well-formed frames of every kind the program balances,
// the malformed corpus and the reported frames: what mutation starts from.
func seedFrames(t testing.TB) [][]byte {
	var out [][]byte
	for _, c := range []struct{ cli, tcp, udp netip.AddrPort }{{cli4, vip4, udp4}, {cli6, vip6, udp6}} {
		for _, vlan := range []uint16{0, 7} {
			for _, flags := range []uint8{bpftest.SYN, bpftest.ACK, bpftest.ACK | bpftest.PSH, bpftest.FIN | bpftest.ACK, bpftest.RST} {
				out = append(out, bpftest.Frame{Src: c.cli, Dst: c.tcp, Proto: bpftest.TCP, VLAN: vlan, Flags: flags, Payload: []byte("hello")}.Bytes())
			}
			out = append(out, bpftest.Frame{Src: c.cli, Dst: c.udp, Proto: bpftest.UDP, VLAN: vlan, Payload: []byte("hello")}.Bytes())
		}
	}
	for _, m := range l4Corpus() {
		out = append(out, m.frame)
	}
	// ICMP errors about flows of each service.
	for _, c := range []struct{ cli, tcp, udp netip.AddrPort }{{cli4, vip4, udp4}, {cli6, vip6, udp6}} {
		for _, svc := range []netip.AddrPort{c.tcp, c.udp} {
			proto := uint8(bpftest.TCP)
			if svc == c.udp {
				proto = bpftest.UDP
			}
			reply := bpftest.Frame{Src: svc, Dst: c.cli, Proto: proto, Payload: []byte("hello"), Checksum: true}.Bytes()[14:]
			out = append(out, icmpError(reply))
		}
	}
	for _, r := range reportedFrames {
		b, err := hex.DecodeString(r.hex)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b)
	}
	return out
}

// mutate changes a frame as a fuzzer would, favouring the fields that
// decide how it is parsed: lengths, offsets, versions, protocols, tags.
func mutate(rnd *rand.Rand, in []byte) []byte {
	b := bytes.Clone(in)
	off, v4 := 14, true
	if len(b) >= 18 && binary.BigEndian.Uint16(b[12:]) == 0x8100 {
		off = 18
	}
	if len(b) > off {
		v4 = b[off]>>4 == 4
	}
	l4 := off + 40
	if v4 {
		l4 = off + 20
	}
	set16 := func(at int, v uint16) {
		if at+2 <= len(b) {
			binary.BigEndian.PutUint16(b[at:], v)
		}
	}
	near := func(at int) uint16 {
		if at+2 > len(b) {
			return 0
		}
		return binary.BigEndian.Uint16(b[at:]) + uint16(rnd.IntN(41)-20)
	}
	for n := 1 + rnd.IntN(3); n > 0; n-- {
		switch rnd.IntN(10) {
		case 0: // any byte of the headers
			if i := rnd.IntN(min(len(b), l4+20)); i >= 12 {
				b[i] = byte(rnd.UintN(256))
			}
		case 1: // the IP length
			if v4 {
				set16(off+2, near(off+2))
			} else {
				set16(off+4, near(off+4))
			}
		case 2: // the UDP length
			set16(l4+4, near(l4+4))
		case 3: // the TCP data offset
			if l4+12 < len(b) {
				b[l4+12] = byte(rnd.IntN(16)) << 4
			}
		case 4: // version and IHL, or the IPv6 next header
			if !v4 && off+6 < len(b) {
				b[off+6] = []byte{0, 6, 17, 43, 44, 58, 60, 1}[rnd.IntN(8)]
			} else if off < len(b) {
				b[off] = byte(rnd.IntN(16))<<4 | byte(rnd.IntN(16))
			}
		case 5: // the IPv4 protocol or fragment bits
			if v4 && off+9 < len(b) {
				if rnd.IntN(2) == 0 {
					b[off+9] = []byte{6, 17, 1, 0}[rnd.IntN(4)]
				} else {
					b[off+6] = byte(rnd.UintN(256)) & 0xbf
				}
			}
		case 6: // cut the frame
			b = b[:14+rnd.IntN(len(b)-13)]
		case 7: // pad the frame
			b = append(b, make([]byte, rnd.IntN(48))...)
		case 8: // the EtherType or a tag
			et := []uint16{0x0800, 0x86dd, 0x8100, 0x88a8, 0x0806}
			set16(12, et[rnd.IntN(len(et))])
			if off == 18 {
				set16(16, et[rnd.IntN(len(et))])
			}
		case 9: // the ports
			set16(l4+rnd.IntN(2)*2, []uint16{8765, 5000, 80, uint16(rnd.UintN(65536))}[rnd.IntN(4)])
		}
	}
	// Most frames get their IPv4 header checksum right, so that the
	// checksum is not what stops them.
	if v4 && len(b) >= off+20 && rnd.IntN(4) != 0 {
		b[off+10], b[off+11] = 0, 0
		binary.BigEndian.PutUint16(b[off+10:], ^bpftest.Fold(bpftest.OnesSum(b[off:off+20], 0)))
	}
	return b
}

// TestMutatedFrames runs 200,000 frames mutated from the seeds (a fixed
// random sequence, so a failure repeats) through the program with dsr
// services, and 50,000 each with nat, fullnat, ipip and gue services, and checks the
// invariant on each, and on the tables at the end.
func TestMutatedFrames(t *testing.T) {
	for _, mode := range fuzzModes {
		t.Run(modeName(mode), func(t *testing.T) {
			n := 200_000
			if mode != maps.ForwardDSR {
				n = 50_000
			}
			if testing.Short() {
				n /= 10
			}
			mutatedFrames(t, mode, n)
		})
	}
}

func mutatedFrames(t *testing.T, mode uint8, n int) {
	iv := newInvariant(t, mode)
	seeds := seedFrames(t)
	rnd := rand.New(rand.NewPCG(22, 2026))
	kinds := map[string]int{}
	for i := 0; i < n; i++ {
		frame := mutate(rnd, seeds[rnd.IntN(len(seeds))])
		if err := iv.check(frame); err != nil {
			t.Fatalf("frame %d, %x: %v", i, frame, err)
		}
		want := reference(frame, iv.svcs, nil)
		switch {
		case want.forward:
			kinds["forwarded or tracked"]++
		default:
			kinds[want.reason]++
		}
	}
	if err := iv.tables(); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d mutated frames hold the invariant; %d flows recorded; by kind: %v", iv.frames, len(iv.tracked), kinds)
	for _, r := range []string{"drop_l4_truncated", "drop_tcp_offset", "drop_udp_length", "drop_ip_checksum", "drop_truncated", "drop_bad_header"} {
		if iv.counted[r] == 0 {
			t.Errorf("no mutated frame was dropped as %s: the mutations miss a class", r)
		}
	}
}

// fuzzModes are the forwarding modes the invariant is checked in: all.
var fuzzModes = []uint8{maps.ForwardDSR, maps.ForwardNAT, maps.ForwardFullNAT, maps.ForwardIPIP, maps.ForwardGUE}

// FuzzProgram checks the invariant on frames from Go's fuzzer
// (go test -fuzz FuzzProgram ./bpf), with the services in the forwarding
// mode the input's first byte names (modulo 5: dsr, nat, fullnat, ipip,
// gue). Without -fuzz it runs the seeds in every mode.
func FuzzProgram(f *testing.F) {
	modes := fuzzModes
	for _, s := range seedFrames(f) {
		for m := range modes {
			f.Add(byte(m), s)
		}
	}
	ivs := make([]*invariant, len(modes))
	for i, m := range modes {
		ivs[i] = newInvariant(f, m)
	}
	f.Fuzz(func(t *testing.T, mode byte, frame []byte) {
		if len(frame) < 14 || len(frame) > 1500 {
			return // the test run refuses frames shorter than an Ethernet header
		}
		iv := ivs[int(mode)%len(ivs)]
		iv.f.TB = t // a fuzz target may not call f's methods
		if err := iv.check(frame); err != nil {
			t.Fatalf("%s: %x: %v", modeName(iv.mode), frame, err)
		}
		if iv.frames%1024 == 0 {
			if err := iv.tables(); err != nil {
				t.Fatalf("%s: %v", modeName(iv.mode), err)
			}
		}
	})
}
