package bpf_test

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/netip"
	"testing"

	"github.com/tetherlb/tether/internal/bpftest"
)

// The services of the malformed-packet tests: TCP port 8765 and UDP port
// 5000 on an IPv4 and an IPv6 VIP, as the fuzzer that found the L4 length
// defects used them.
var (
	udp4 = netip.MustParseAddrPort("203.0.113.10:5000")
	udp6 = netip.MustParseAddrPort("[2001:db8:f::10]:5000")
)

// l4Fixture loads the program with those four services, with three
// backends each, or with none (every TCP packet of a new flow is then
// answered with a RST).
func l4Fixture(t *testing.T, backends bool) *bpftest.Fixture {
	f := bpftest.NewFixture(t, loaderOpts())
	be := func(ids ...uint32) []uint32 {
		if backends {
			return ids
		}
		return nil
	}
	f.AddService(bpftest.Service{ID: 1, VIP: vip4, Proto: bpftest.TCP, Source: true, Backends: be(1, 2, 3)})
	f.AddService(bpftest.Service{ID: 2, VIP: udp4, Proto: bpftest.UDP, Backends: be(4, 5, 6)})
	f.AddService(bpftest.Service{ID: 3, VIP: vip6, Proto: bpftest.TCP, Source: true, Backends: be(7, 8, 9)})
	f.AddService(bpftest.Service{ID: 4, VIP: udp6, Proto: bpftest.UDP, Backends: be(10, 11, 12)})
	return f
}

// l3 returns the offset of a frame's IP header and whether it is IPv4.
func l3(frame []byte) (int, bool) {
	off := 14
	if binary.BigEndian.Uint16(frame[12:]) == 0x8100 {
		off = 18
	}
	return off, frame[off]>>4 == 4
}

// l4Offset is where the L4 header of a frame built by bpftest starts.
func l4Offset(frame []byte) int {
	off, v4 := l3(frame)
	if v4 {
		return off + 20
	}
	return off + 40
}

// setL4Len makes the IP header say the datagram's L4 part is n bytes long
// (IPv4 total length, with the header checksum made right again; IPv6
// payload length), whatever the frame holds.
func setL4Len(frame []byte, n int) []byte {
	off, v4 := l3(frame)
	if v4 {
		binary.BigEndian.PutUint16(frame[off+2:], uint16(20+n))
		fixIPv4Checksum(frame)
	} else {
		binary.BigEndian.PutUint16(frame[off+4:], uint16(n))
	}
	return frame
}

func fixIPv4Checksum(frame []byte) {
	off, _ := l3(frame)
	frame[off+10], frame[off+11] = 0, 0
	binary.BigEndian.PutUint16(frame[off+10:], ^bpftest.Fold(bpftest.OnesSum(frame[off:off+20], 0)))
}

// padded appends n zero bytes after the IP datagram, as Ethernet padding.
func padded(frame []byte, n int) []byte {
	return append(frame, make([]byte, n)...)
}

type malformed struct {
	desc   string
	frame  []byte
	reason string
}

// l4Corpus builds the four classes of L4 headers that the IP length does
// not hold, for IPv4 and IPv6, with and without a VLAN tag, for a SYN and
// a non-SYN segment. Every frame holds 40 bytes of padding beyond the
// datagram, so that only the IP length can tell the defect.
func l4Corpus() []malformed {
	var out []malformed
	for _, fam := range []struct {
		name     string
		cli      netip.AddrPort
		tcp, udp netip.AddrPort
	}{{"IPv4", cli4, vip4, udp4}, {"IPv6", cli6, vip6, udp6}} {
		for _, vlan := range []uint16{0, 42} {
			tag := ""
			if vlan != 0 {
				tag = " with a VLAN tag"
			}
			for _, flags := range []uint8{bpftest.SYN, bpftest.ACK} {
				name := fmt.Sprintf("%s%s, TCP flags %#02x: ", fam.name, tag, flags)
				tcp := func() []byte {
					return padded(bpftest.Frame{Src: fam.cli, Dst: fam.tcp, Proto: bpftest.TCP, VLAN: vlan, Flags: flags, Seq: 100}.Bytes(), 40)
				}
				doff := func(words int) []byte {
					b := tcp()
					b[l4Offset(b)+12] = byte(words << 4)
					return b
				}
				out = append(out,
					malformed{name + "TCP header past the IP datagram (12 of 20 bytes)", setL4Len(tcp(), 12), "drop_l4_truncated"},
					malformed{name + "TCP header past the IP datagram (IP length 0)", setL4Len(tcp(), 0), "drop_l4_truncated"},
					malformed{name + "TCP data offset 14 in a 20-byte segment", doff(14), "drop_tcp_offset"},
					malformed{name + "TCP data offset 6 in a 20-byte segment", doff(6), "drop_tcp_offset"},
					malformed{name + "TCP data offset 4", doff(4), "drop_tcp_offset"},
				)
			}
			name := fmt.Sprintf("%s%s: ", fam.name, tag)
			udp := func(ulen int) []byte {
				b := padded(bpftest.Frame{Src: fam.cli, Dst: fam.udp, Proto: bpftest.UDP, VLAN: vlan, Payload: []byte("hello")}.Bytes(), 40)
				if ulen >= 0 {
					binary.BigEndian.PutUint16(b[l4Offset(b)+4:], uint16(ulen))
				}
				return b
			}
			out = append(out,
				malformed{name + "UDP header past the IP datagram (2 of 8 bytes)", setL4Len(udp(-1), 2), "drop_l4_truncated"},
				malformed{name + "UDP length 0x3db3 in a 13-byte datagram", udp(0x3db3), "drop_udp_length"},
				malformed{name + "UDP length 4, below the header", udp(4), "drop_udp_length"},
				malformed{name + "UDP length 8 in a 13-byte datagram", udp(8), "drop_udp_length"},
				malformed{name + "UDP length 14 in a 13-byte datagram", udp(14), "drop_udp_length"},
			)
		}
	}
	return out
}

// reportedFrames are the frames of the report that found the defects
// (issue 22), byte for byte: every one was forwarded, and the last was
// answered with a RST acknowledging a length that wrapped below zero.
var reportedFrames = []struct {
	desc, hex, reason string
}{
	{"IPv4 total length 38 for a 20-byte TCP header", "02000000000202000000000108004500002675f64000fe06bddc943478bfcb00710a1881223df5e458dbaf2328b950edfaf00a820000", "drop_l4_truncated"},
	{"IPv6 payload length 0, next header TCP", "02000000000202000000000186dd600248f4000006802dc5abafeab6ae30bb96f4b0004b352620010db8000f00000000000000000010438b223dcdcf7336a6db9d115060faf0443b0000", "drop_l4_truncated"},
	{"IPv4 total length 22 for a UDP header", "0200000000020200000000010800450000165f020000cb111af5695ad07acb00710a7e7613880008f7ff", "drop_l4_truncated"},
	{"UDP length 0x3db3 in an 8-byte datagram", "02000000000202000000000108004548001c7cd34000cc1131385d516721cb00710af66d13883db3f56a", "drop_udp_length"},
	{"TCP data offset 14 in a 20-byte segment", "020000000002020000000001080045000028c60800003606f7fd4a8a4035cb00710a25e0223d3ad4ebf6a47a23d9e010faf0b6dd0000", "drop_tcp_offset"},
	{"IPv4 total length 36 for a 20-byte TCP header, once answered with a RST", "0200000000020200000000010800450000243ecb4000cc06ed8f6ab0dbbdcb00710a4c9a223dc672b23df3356ce65011faf0eac50000", "drop_l4_truncated"},
}

// TestL4BoundedByIPLength runs every malformed L4 frame through the program,
// with backends and without: each is dropped and counted under its reason,
// creates no connection or affinity entry, and is never answered with a
// RST.
func TestL4BoundedByIPLength(t *testing.T) {
	corpus := l4Corpus()
	for _, r := range reportedFrames {
		b, err := hex.DecodeString(r.hex)
		if err != nil {
			t.Fatal(err)
		}
		corpus = append(corpus, malformed{"reported: " + r.desc, b, r.reason})
	}
	for _, backends := range []bool{true, false} {
		f := l4Fixture(t, backends)
		for _, tc := range corpus {
			before := reasons(t, f)
			conns, affs, err := f.Maps.Entries()
			if err != nil {
				t.Fatal(err)
			}
			verdict, _ := f.Run(tc.frame)
			if verdict != bpftest.XDPDrop {
				t.Errorf("backends %v: %s: verdict %d, want XDP_DROP", backends, tc.desc, verdict)
			}
			after := reasons(t, f)
			if d := after[tc.reason] - before[tc.reason]; d != 1 {
				t.Errorf("backends %v: %s: counter %s moved by %d, want 1 (%v)", backends, tc.desc, tc.reason, d, diff(before, after))
			}
			c2, a2, err := f.Maps.Entries()
			if err != nil {
				t.Fatal(err)
			}
			if c2 != conns || a2 != affs {
				t.Errorf("backends %v: %s: entries went from %d connections, %d affinities to %d, %d", backends, tc.desc, conns, affs, c2, a2)
			}
		}
	}
	t.Logf("%d malformed L4 frames, each dropped with and without backends", len(corpus))
}

// TestResetAcknowledgesData checks the acknowledgement of the RST that
// refuses a well-formed segment without ACK that carries data: it counts
// the data the IP length gives, not the frame's padding.
func TestResetAcknowledgesData(t *testing.T) {
	f := l4Fixture(t, false)
	for _, tc := range []struct {
		desc  string
		frame bpftest.Frame
		ack   uint32
	}{
		{"SYN with 10 bytes of data over IPv4", bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.TCP, Flags: bpftest.SYN, Seq: 1000, Payload: make([]byte, 10)}, 1011},
		{"SYN with 10 bytes of data over IPv6 with a VLAN tag", bpftest.Frame{Src: cli6, Dst: vip6, Proto: bpftest.TCP, VLAN: 3, Flags: bpftest.SYN, Seq: 1000, Payload: make([]byte, 10)}, 1011},
		{"PSH with 3 bytes over IPv4", bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.TCP, Flags: bpftest.PSH, Seq: 0xfffffffe, Payload: []byte("abc")}, 1},
		{"FIN with 1 byte over IPv6", bpftest.Frame{Src: cli6, Dst: vip6, Proto: bpftest.TCP, Flags: bpftest.FIN, Seq: 50, Payload: []byte("x")}, 52},
	} {
		for _, pad := range []int{0, 30} {
			in := padded(tc.frame.Bytes(), pad)
			verdict, out := f.Run(in)
			if verdict != bpftest.XDPTx {
				t.Fatalf("%s, %d bytes of padding: verdict %d, want a RST", tc.desc, pad, verdict)
			}
			rst, err := bpftest.ParseTCP(out)
			if err != nil {
				t.Fatalf("%s: %v", tc.desc, err)
			}
			if err := bpftest.VerifyChecksums(out); err != nil {
				t.Fatalf("%s: %v", tc.desc, err)
			}
			if rst.Flags != bpftest.RST|bpftest.ACK || rst.Ack != tc.ack || rst.Seq != 0 {
				t.Errorf("%s, %d bytes of padding: RST flags %#x seq %d ack %d, want RST+ACK seq 0 ack %d", tc.desc, pad, rst.Flags, rst.Seq, rst.Ack, tc.ack)
			}
		}
	}
}

// TestIPv4HeaderChecksum checks what the program does with an IPv4 header
// whose checksum is wrong: a packet that would start a flow, or be answered
// with a RST, is dropped and counted before it touches a table; a packet of
// a tracked flow is forwarded as it came (the backend's kernel drops it);
// a packet for no VIP goes to the kernel untouched.
func TestIPv4HeaderChecksum(t *testing.T) {
	bad := func(fr bpftest.Frame) []byte {
		b := fr.Bytes()
		off, _ := l3(b)
		b[off+10] ^= 0x5a
		return b
	}
	for _, backends := range []bool{true, false} {
		f := l4Fixture(t, backends)
		for _, fr := range []bpftest.Frame{
			{Src: cli4, Dst: vip4, Proto: bpftest.TCP, Flags: bpftest.SYN},
			{Src: cli4, Dst: vip4, Proto: bpftest.TCP, Flags: bpftest.ACK},
			{Src: cli4, Dst: udp4, Proto: bpftest.UDP, VLAN: 5, Payload: []byte("hi")},
		} {
			before := reasons(t, f)
			verdict, _ := f.Run(bad(fr))
			if verdict != bpftest.XDPDrop {
				t.Errorf("backends %v: %+v with a bad checksum: verdict %d, want XDP_DROP", backends, fr, verdict)
			}
			if d := reasons(t, f)["drop_ip_checksum"] - before["drop_ip_checksum"]; d != 1 {
				t.Errorf("backends %v: drop_ip_checksum moved by %d, want 1", backends, d)
			}
			if c, a, _ := f.Maps.Entries(); c != 0 || a != 0 {
				t.Errorf("backends %v: %d connection and %d affinity entries, want none", backends, c, a)
			}
		}
	}
	f := l4Fixture(t, true)
	fr := bpftest.Frame{Src: cli4, Dst: vip4, Proto: bpftest.TCP, Payload: []byte("data")}
	if verdict, _ := f.Run(fr.Bytes()); verdict != bpftest.XDPTx {
		t.Fatalf("good packet: verdict %d", verdict)
	}
	in := bad(fr)
	verdict, out := f.Run(in)
	if verdict != bpftest.XDPTx || !bytes.Equal(out[12:], in[12:]) {
		t.Errorf("tracked flow's packet with a bad checksum: verdict %d, changed %v; want forwarded as it came", verdict, !bytes.Equal(out[12:], in[12:]))
	}
	other := bad(bpftest.Frame{Src: cli4, Dst: netip.MustParseAddrPort("203.0.113.99:80"), Proto: bpftest.TCP})
	if verdict, out := f.Run(other); verdict != bpftest.XDPPass || !bytes.Equal(out, other) {
		t.Errorf("packet for no VIP with a bad checksum: verdict %d, want XDP_PASS untouched", verdict)
	}
}
