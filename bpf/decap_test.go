package bpf_test

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/tetherlb/tether/bpf"
	"github.com/tetherlb/tether/internal/bpftest"
	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/maps"
)

// loadDecap loads the backends' decapsulation program for gue port port
// (0: ipip only).
func loadDecap(t *testing.T, port uint16) *ebpf.Program {
	t.Helper()
	spec, err := bpf.LoadDecap()
	must(t, err)
	must(t, spec.Variables[bpf.DecapVarGuePort].Set(maps.Port(port)))
	var objs bpf.DecapObjects
	must(t, spec.LoadAndAssign(&objs, nil))
	t.Cleanup(func() { objs.Close() })
	return objs.TetherDecap
}

// runDecap runs frame through prog as if it came in on h's eth0.
func runDecap(t *testing.T, h *lab.Host, prog *ebpf.Program, frame []byte) (uint32, []byte) {
	t.Helper()
	var verdict uint32
	out := make([]byte, len(frame)+64)
	must(t, h.Do(func() error {
		opts := ebpf.RunOptions{Data: frame, DataOut: out,
			Context: xdpContext{DataEnd: uint32(len(frame)), IngressIfindex: uint32(h.Ifindex)}}
		var err error
		verdict, err = prog.Run(&opts)
		out = opts.DataOut
		return err
	}))
	return verdict, out
}

// xdpContext is struct xdp_md as BPF_PROG_TEST_RUN takes it.
type xdpContext struct {
	Data, DataEnd, DataMeta              uint32
	IngressIfindex, RxQueueIndex, Egress uint32
}

// TestDecap: what the balancer encapsulates (ipip and gue, every family
// mix), the backends' decapsulation program turns back into the client's
// packet, byte for byte behind the outer frame's MACs; what it must not
// take (another UDP port, GUE with a header, a mismatched inner version,
// plain traffic, and on a forwarding host a packet for another host) it
// passes untouched.
func TestDecap(t *testing.T) {
	for _, mode := range []uint8{maps.ForwardIPIP, maps.ForwardGUE} {
		for _, other := range []bool{false, true} {
			e := newEncapLab(t, mode, other)
			prog := loadDecap(t, guePort)
			// The frames go to the lab's backend, whose eth0 does not
			// forward: the backend addresses count as its own.
			be := e.lab.Backends[0]
			for _, tc := range forwardCases(e.svcs) {
				in := bpftest.Frame{Src: tc.cli, Dst: tc.svc.VIP, Proto: tc.svc.Proto, VLAN: tc.vlan, Payload: chatPayload, Checksum: true}.Bytes()
				verdict, enc := e.run(t, in)
				if verdict != bpftest.XDPTx {
					t.Fatalf("%s: the balancer's verdict %d", tc.desc, verdict)
				}
				verdict, out := runDecap(t, be, prog, enc)
				l3 := 14
				if tc.vlan != 0 {
					l3 = 18
				}
				if verdict != bpftest.XDPPass || !bytes.Equal(out[14:], in[l3:]) || !bytes.Equal(out[:12], enc[:12]) || !bytes.Equal(out[12:14], in[l3-2:l3]) {
					t.Fatalf("mode %d other family %v, %s: verdict %d, decapsulated\n%x\nwant the client's packet\n%x", mode, other, tc.desc, verdict, out, in[l3:])
				}
			}
		}
	}

	l := lab.NewT(t, lab.Options{Backends: 1, Clients: 1})
	be := l.Backends[0]
	prog := loadDecap(t, guePort)
	inner := bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.TCP, Payload: chatPayload, Checksum: true}.Bytes()[14:]
	outer := func(proto uint8, dst netip.Addr, payload []byte) []byte {
		ip := make([]byte, 20)
		ip[0], ip[8], ip[9] = 0x45, 64, proto
		binary.BigEndian.PutUint16(ip[2:], uint16(20+len(payload)))
		s, d := netip.MustParseAddr("198.51.100.2").As4(), dst.As4()
		copy(ip[12:], s[:])
		copy(ip[16:], d[:])
		binary.BigEndian.PutUint16(ip[10:], ^bpftest.Fold(bpftest.OnesSum(ip, 0)))
		eth := append(append(append([]byte{}, be.MAC...), bpftest.LBMAC...), 0x08, 0x00)
		return append(append(eth, ip...), payload...)
	}
	udp := func(port uint16, payload []byte) []byte {
		h := make([]byte, 8)
		binary.BigEndian.PutUint16(h, 49152)
		binary.BigEndian.PutUint16(h[2:], port)
		binary.BigEndian.PutUint16(h[4:], uint16(8+len(payload)))
		return append(h, payload...)
	}
	gueHeader := append([]byte{0, 6, 0, 0}, inner...) // variant 0: a header, then the packet
	ipv6Inner := bpftest.Frame{Src: cli6, Dst: vip6, Proto: bpftest.TCP, Checksum: true}.Bytes()[14:]
	if v, out := runDecap(t, be, prog, outer(4, be.Addr4, inner)); v != bpftest.XDPPass || !bytes.Equal(out[14:], inner) {
		t.Fatalf("ipip to the backend: verdict %d, not decapsulated", v)
	}
	for _, tc := range []struct {
		desc  string
		frame []byte
	}{
		{"UDP to another port", outer(17, be.Addr4, udp(guePort+1, inner))},
		{"GUE variant 0", outer(17, be.Addr4, udp(guePort, gueHeader))},
		{"IPv6 inside protocol 4", outer(4, be.Addr4, ipv6Inner)},
		{"plain TCP", bpftest.Frame{Src: cli4, Dst: netip.AddrPortFrom(be.Addr4, 80), Proto: bpftest.TCP, Checksum: true}.Bytes()},
	} {
		if v, out := runDecap(t, be, prog, tc.frame); v != bpftest.XDPPass || !bytes.Equal(out, tc.frame) {
			t.Errorf("%s: verdict %d, frame changed %v; want it passed untouched", tc.desc, v, !bytes.Equal(out, tc.frame))
		}
	}
	// A forwarding host decapsulates only what is addressed to it.
	must(t, be.Sysctl("net/ipv4/conf/all/forwarding", "1"))
	transit := outer(4, netip.MustParseAddr("198.51.100.200"), inner)
	if v, out := runDecap(t, be, prog, transit); v != bpftest.XDPPass || !bytes.Equal(out, transit) {
		t.Errorf("ipip in transit: verdict %d, frame changed %v; want it passed untouched", v, !bytes.Equal(out, transit))
	}
	if v, out := runDecap(t, be, prog, outer(4, be.Addr4, inner)); v != bpftest.XDPPass || !bytes.Equal(out[14:], inner) {
		t.Errorf("ipip to the forwarding backend itself: verdict %d, not decapsulated", v)
	}
}
