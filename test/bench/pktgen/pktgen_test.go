package pktgen

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/vishvananda/netlink"

	"github.com/tetherlb/tether/internal/bpftest"
	"github.com/tetherlb/tether/internal/lab"
)

var (
	testSrcMAC = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x01}
	testDstMAC = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x02}
	testSrc    = netip.MustParseAddrPort("192.0.2.10:1024")
	testSrc6   = netip.MustParseAddrPort("[2001:db8::ffff:fffe]:1024")
	testDst6   = netip.MustParseAddrPort("[2001:db8:1::1]:9999")
	testDst    = netip.MustParseAddrPort("203.0.113.10:9999")
)

const testDport = 9999

// checkIPv4Checksum fails t unless the IPv4 header of frame (no options)
// sums to 0xffff, checksum included.
func checkIPv4Checksum(t *testing.T, frame []byte) {
	t.Helper()
	if got := bpftest.Fold(bpftest.OnesSum(frame[offIPv4:offUDP], 0)); got != 0xffff {
		t.Errorf("IPv4 header sums to %#04x, want 0xffff (checksum %#04x)", got, binary.BigEndian.Uint16(frame[offIPCsum:]))
	}
}

func TestUDPFrame(t *testing.T) {
	for _, size := range []int{0, 59, 60, 64, 1500} {
		f := UDPFrame(testSrcMAC, testDstMAC, testSrc, testDst, size)
		want := max(size, 60)
		if len(f) != want {
			t.Fatalf("size %d: frame of %d bytes, want %d", size, len(f), want)
		}
		hdr := []byte{
			0x02, 0, 0, 0, 0, 0x02, // destination MAC
			0x02, 0, 0, 0, 0, 0x01, // source MAC
			0x08, 0x00, // IPv4
			0x45, 0x00, // version 4, IHL 5, TOS 0
			byte((want - 14) >> 8), byte(want - 14), // total length
			0x00, 0x00, 0x40, 0x00, // ID 0, DF
			64, 17, // TTL, UDP
			f[24], f[25], // checksum, checked below
			192, 0, 2, 10,
			203, 0, 113, 10,
			0x04, 0x00, // 1024
			0x27, 0x0f, // 9999
			byte((want - 34) >> 8), byte(want - 34), // UDP length
			0x00, 0x00, // no UDP checksum
		}
		if !bytes.Equal(f[:hdrLen], hdr) {
			t.Errorf("size %d: headers\n% x\nwant\n% x", size, f[:hdrLen], hdr)
		}
		if !bytes.Equal(f[hdrLen:], make([]byte, want-hdrLen)) {
			t.Errorf("size %d: payload not zeros", size)
		}
		checkIPv4Checksum(t, f)
	}
	// A known checksum: the 64-byte frame's header, summed by hand:
	// 4500+0032+0000+4000+4011+c000+020a+cb00+710a = 0x2c357, folded
	// 0xc359, complemented 0x3ca6.
	f := UDPFrame(testSrcMAC, testDstMAC, testSrc, testDst, 64)
	if got := binary.BigEndian.Uint16(f[offIPCsum:]); got != 0x3ca6 {
		t.Errorf("checksum %#04x, want 0x3ca6", got)
	}
}

// TestGeneratorSequence runs the generator's program once per frame in the
// ordinary (copying) test-run mode and checks the source port and address
// it writes into each frame, its checksum, and the drop past the limit.
func TestGeneratorSequence(t *testing.T) {
	lab.RequirePrivileged(t)
	const sources, ports = 3, 5
	g, err := NewGenerator(sources, ports)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	for _, tc := range []struct {
		name  string
		src   netip.AddrPort
		build func(src netip.AddrPort) []byte
		prog  *ebpf.Program
	}{
		{"udp", testSrc, func(src netip.AddrPort) []byte { return UDPFrame(testSrcMAC, testDstMAC, src, testDst, 64) }, g.prog},
		{"tcp", testSrc, func(src netip.AddrPort) []byte { return TCPFrame(testSrcMAC, testDstMAC, src, testDst, bpftest.SYN) }, g.tcpProg},
		// From ...ffff:fffe, whose last 32 bits would overflow at the
		// third source: prepare refuses it, and the sequence then starts
		// at ...7fff:fffe, carrying from one 16-bit half to the other.
		{"udp6", testSrc6, func(src netip.AddrPort) []byte { return UDPFrame6(testSrcMAC, testDstMAC, src, testDst6, 80) }, g.udp6Prog},
	} {
		t.Run(tc.name, func(t *testing.T) { checkSequence(t, g, tc.prog, tc.src, tc.build) })
	}

	// Ranges that run past the end of the address or port space.
	if _, err := g.prepare(UDPFrame(testSrcMAC, testDstMAC, netip.MustParseAddrPort("192.0.2.10:65534"), testDst, 64), 1); err == nil {
		t.Error("ports past 65535 accepted")
	}
	if _, err := NewGenerator(0, 1); err == nil {
		t.Error("0 sources accepted")
	}
}

// checkSequence runs prog over the frames build makes, one at a time, and
// checks each against the frame of its flow: source address and port, both
// checksums, nothing else changed, and the AF_PACKET sender's frame.
func checkSequence(t *testing.T, g *Generator, prog *ebpf.Program, src netip.AddrPort, build func(src netip.AddrPort) []byte) {
	sources, ports := g.sources, g.ports
	frame := build(src)
	if src.Addr().Is6() {
		// The last 32 bits of ffff:fffe run past ffff:ffff at the third
		// source: prepare refuses that, so start the sequence lower.
		if _, err := g.prepare(frame, 1); err == nil {
			t.Errorf("sources past the last 32 bits of %v accepted", src.Addr())
		}
		b := src.Addr().As16()
		b[12] = 0x7f
		src = netip.AddrPortFrom(netip.AddrFrom16(b), src.Port())
		frame = build(src)
	}
	count := uint32(2*sources*ports + 3)
	st, err := g.prepare(frame, count)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, len(frame)+256)
	for k := range int(count) + 2 {
		ret, err := prog.Run(&ebpf.RunOptions{Data: frame, DataOut: out, Repeat: 1})
		if err != nil {
			t.Fatalf("frame %d: %v", k, err)
		}
		if k >= int(count) {
			if ret != bpftest.XDPDrop {
				t.Errorf("frame %d past the limit %d: verdict %d, want XDP_DROP", k, count, ret)
			}
			continue
		}
		if ret != bpftest.XDPTx {
			t.Fatalf("frame %d: verdict %d, want XDP_TX", k, ret)
		}
		got := make([]byte, len(frame))
		copy(got, out)
		f := k % (sources * ports)
		wantPort := uint16(1024 + f%ports)
		wantAddr := src.Addr()
		for range f / ports {
			wantAddr = wantAddr.Next()
		}
		lay := layoutOf(got)
		if p := binary.BigEndian.Uint16(got[lay.sport:]); p != wantPort {
			t.Errorf("frame %d: source port %d, want %d", k, p, wantPort)
		}
		if wantAddr.Is4() {
			if a := netip.AddrFrom4([4]byte(got[offIPSrc:offIPDst])); a != wantAddr {
				t.Errorf("frame %d: source address %v, want %v", k, a, wantAddr)
			}
			checkIPv4Checksum(t, got)
		} else if a := netip.AddrFrom16([16]byte(got[offIP6Src:offIP6Dst])); a != wantAddr {
			t.Errorf("frame %d: source address %v, want %v", k, a, wantAddr)
		}
		if lay.l4Csum != 0 {
			if err := bpftest.VerifyChecksums(got); err != nil {
				t.Errorf("frame %d: %v", k, err)
			}
		}
		// Nothing else changed.
		want := build(netip.AddrPortFrom(wantAddr, wantPort))
		if !bytes.Equal(got, want) {
			t.Errorf("frame %d:\n% x\nwant\n% x", k, got, want)
		}
		// The AF_PACKET sender builds the same frame.
		b := bytes.Clone(frame)
		writeFlow(b, st, uint64(f), uint64(ports))
		if !bytes.Equal(b, want) {
			t.Errorf("frame %d as the AF_PACKET sender builds it:\n% x\nwant\n% x", k, b, want)
		}
	}
	if n, err := g.sent(); err != nil || n != uint64(count) {
		t.Errorf("state seq %d, %v; want %d", n, err, count)
	}
}

// learnMACs has the balancer resolve be1 with ARP, so that the wire's bridge
// has learnt both MACs and delivers frames to either of them to that port
// alone, not flooded to every port (where be1 would count the client's
// frames to lb too).
func learnMACs(l *lab.Lab, be *lab.Host) error {
	lb := l.Balancer
	return lb.Do(func() error {
		c, err := net.Dial("udp4", netip.AddrPortFrom(be.Addr4, 9).String())
		if err != nil {
			return err
		}
		defer c.Close()
		if _, err := c.Write([]byte("arp")); err != nil {
			return err
		}
		nh, err := netlink.NewHandle()
		if err != nil {
			return err
		}
		defer nh.Close()
		deadline := time.Now().Add(5 * time.Second)
		for {
			neighs, err := nh.NeighList(lb.Ifindex, netlink.FAMILY_V4)
			if err != nil {
				return err
			}
			for _, n := range neighs {
				if n.IP.Equal(be.Addr4.AsSlice()) && n.State&(netlink.NUD_REACHABLE|netlink.NUD_STALE|netlink.NUD_DELAY|netlink.NUD_PROBE) != 0 {
					return nil
				}
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s did not resolve %s: %v", lb.Name, be.Addr4, neighs)
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

// sendFrom sends count frames of g's flows from frame's template out of
// host h's interface, failing the test on an error.
func sendFrom(t *testing.T, h *lab.Host, g *Generator, frame []byte, count uint32) {
	t.Helper()
	if err := h.Do(func() error {
		_, err := g.Send(h.Ifindex, frame, count)
		return err
	}); err != nil {
		t.Fatal(err)
	}
}

// settle waits until n stops changing (frames still in flight in the kernel
// after Send returns), at most 3 s, and returns its last value.
func settle(n func() (uint64, error)) (uint64, error) {
	last, err := n()
	if err != nil {
		return 0, err
	}
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
		cur, err := n()
		if err != nil {
			return 0, err
		}
		if cur == last {
			break
		}
		last = cur
	}
	return last, nil
}

// TestForwardThroughBalancer sends frames from the client through the
// Forwarder on the balancer to a Counter on be1.
func TestForwardThroughBalancer(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 1, Clients: 4})
	client, lb, be1 := l.Client, l.Balancer, l.Backends[0]
	if err := learnMACs(l, be1); err != nil {
		t.Fatal(err)
	}

	var ctr *Counter
	if err := be1.Do(func() (err error) {
		ctr, err = AttachCounter(be1.Ifindex, testDport)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ctr.Close()
	var fwd *Forwarder
	if err := lb.Do(func() (err error) {
		fwd, err = AttachForwarder(lb.Ifindex, testDport, lb.MAC, be1.MAC)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer fwd.Close()
	fwdID, err := fwd.ProgramID()
	if err != nil {
		t.Fatal(err)
	}
	var attached ebpf.ProgramID
	if err := lb.Do(func() (err error) {
		attached, err = XDPProgramID(lb.Ifindex)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if attached != fwdID {
		t.Errorf("XDPProgramID(lb eth0) = %d, forwarder is %d", attached, fwdID)
	}
	// No program on the client's eth0: the error names the interface.
	if err := client.Do(func() error {
		_, err := XDPProgramID(client.Ifindex)
		if !errors.Is(err, ErrNoXDP) {
			return fmt.Errorf("XDPProgramID(client eth0) error %v, want ErrNoXDP", err)
		}
		t.Logf("as expected: %v", err)
		return nil
	}); err != nil {
		t.Error(err)
	}

	if err := l.SetPortXDP(client, true); err != nil {
		t.Fatal(err)
	}
	g, err := NewGenerator(4, 64)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	stats, err := EnableRunStats()
	if err != nil {
		t.Fatal(err)
	}
	defer stats.Close()

	const sent = 200_000
	frame := UDPFrame(client.MAC, lb.MAC, netip.AddrPortFrom(l.ClientAddrs4[0], 1024), netip.AddrPortFrom(l.VIP4, testDport), 64)
	var elapsed time.Duration
	if err := client.Do(func() (err error) {
		elapsed, err = g.Send(client.Ifindex, frame, sent)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	got, err := settle(ctr.Count)
	if err != nil {
		t.Fatal(err)
	}
	runtime, runs, err := RunStats(fwdID)
	if err != nil {
		t.Fatal(err)
	}
	mpps := func(n uint64) float64 { return float64(n) / elapsed.Seconds() / 1e6 }
	t.Logf("generator: %s", g.Method())
	t.Logf("sent %d frames of %d bytes in %v: %.2f Mpps offered", sent, len(frame), elapsed, mpps(sent))
	t.Logf("be1 counted %d (%.1f%%): %.2f Mpps delivered over the send time", got, 100*float64(got)/sent, mpps(got))
	if runs > 0 {
		t.Logf("forwarder: %d runs, %v, %.1f ns/run", runs, runtime, float64(runtime.Nanoseconds())/float64(runs))
	}
	if got == 0 || got > sent {
		t.Errorf("be1 counted %d frames, want 1..%d", got, sent)
	}
	// The forwarder also runs for what else reaches lb's eth0 meanwhile
	// (next to nothing in a lab: no DAD, static neighbours): some slack.
	const slack = 100
	if runs == 0 || runtime <= 0 || runs > sent+slack {
		t.Errorf("forwarder run stats: %d runs, %v; want 1..%d runs and a positive time", runs, runtime, sent+slack)
	}
	if runs < got {
		t.Errorf("forwarder ran %d times but be1 counted %d", runs, got)
	}
}

// attachRecorder attaches to ifindex an XDP program that records the IPv4
// source address and UDP source port of each frame to dport in a hash map,
// key address (4 bytes, network order) then port (2 bytes, network order)
// then 2 zero bytes, value the number of frames; it drops what it records.
// Call it in the interface's namespace; the closer detaches and releases
// it all.
func attachRecorder(ifindex int, dport uint16) (*ebpf.Map, io.Closer, error) {
	seen, err := ebpf.NewMap(&ebpf.MapSpec{
		Name:       "pktgen_seen",
		Type:       ebpf.Hash,
		KeySize:    8,
		ValueSize:  8,
		MaxEntries: 4096,
	})
	if err != nil {
		return nil, nil, err
	}
	insns := append(matchUDP(dport, "pass"),
		// Key at fp-8: source address, source port, 0.
		asm.LoadMem(asm.R5, asm.R2, offIPSrc, asm.Word),
		asm.StoreMem(asm.RFP, -8, asm.R5, asm.Word),
		asm.LoadMem(asm.R5, asm.R4, 0, asm.Half),
		asm.StoreMem(asm.RFP, -4, asm.R5, asm.Half),
		asm.StoreImm(asm.RFP, -2, 0, asm.Half),
		// Value 1 at fp-16, for a new key.
		asm.Mov.Imm(asm.R1, 1),
		asm.StoreMem(asm.RFP, -16, asm.R1, asm.DWord),
		// seen[key]++ if there, else seen[key] = 1.
		asm.LoadMapPtr(asm.R1, seen.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -8),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "new"),
		asm.Mov.Imm(asm.R1, 1),
		asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
		asm.Ja.Label("drop"),
		asm.LoadMapPtr(asm.R1, seen.FD()).WithSymbol("new"),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -8),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, -16),
		asm.Mov.Imm(asm.R4, 0), // BPF_ANY
		asm.FnMapUpdateElem.Call(),
		asm.Mov.Imm(asm.R0, bpftest.XDPDrop).WithSymbol("drop"),
		asm.Return(),
		asm.Mov.Imm(asm.R0, bpftest.XDPPass).WithSymbol("pass"),
		asm.Return(),
	)
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "pktgen_seen",
		Type:         ebpf.XDP,
		Instructions: insns,
		License:      "GPL",
	})
	if err != nil {
		seen.Close()
		return nil, nil, fmt.Errorf("load recorder: %w", err)
	}
	lk, err := attach(prog, ifindex)
	if err != nil {
		return nil, nil, errors.Join(err, closeAll(prog, seen))
	}
	return seen, closers{lk, prog, seen}, nil
}

// closers closes its members in order.
type closers []io.Closer

func (cs closers) Close() error { return closeAll(cs...) }

// TestGeneratorVariesOnWire sends frames straight from the client to be1
// and checks, at be1, that they came from every source address and port of
// the generator's ranges and from nothing else.
func TestGeneratorVariesOnWire(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 1, Clients: 4})
	client, be1 := l.Client, l.Backends[0]
	if err := l.SetPortXDP(client, true); err != nil {
		t.Fatal(err)
	}
	var seen *ebpf.Map
	var rec io.Closer
	if err := be1.Do(func() (err error) {
		seen, rec, err = attachRecorder(be1.Ifindex, testDport)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer rec.Close()

	const sources, ports, rounds = 4, 16, 4
	g, err := NewGenerator(sources, ports)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	frame := UDPFrame(client.MAC, be1.MAC, netip.AddrPortFrom(l.ClientAddrs4[0], 40000), netip.AddrPortFrom(l.VIP4, testDport), 64)
	const sent = sources * ports * rounds
	sendFrom(t, client, g, frame, sent)
	total := func() (uint64, error) {
		var n uint64
		var key [8]byte
		var v uint64
		it := seen.Iterate()
		for it.Next(&key, &v) {
			n += v
		}
		return n, it.Err()
	}
	n, err := settle(total)
	if err != nil {
		t.Fatal(err)
	}
	addrs, portSet := map[netip.Addr]bool{}, map[uint16]bool{}
	pairs := 0
	var key [8]byte
	var v uint64
	for it := seen.Iterate(); it.Next(&key, &v); {
		a := netip.AddrFrom4([4]byte(key[0:4]))
		p := binary.BigEndian.Uint16(key[4:6])
		if a4 := a.As4(); [3]byte(a4[:3]) != [3]byte{192, 0, 2} || a4[3] < 10 || a4[3] >= 10+sources {
			t.Errorf("frame from address %v, outside the %d from %v", a, sources, l.ClientAddrs4[0])
		}
		if p < 40000 || p >= 40000+ports {
			t.Errorf("frame from port %d, outside 40000..%d", p, 40000+ports-1)
		}
		addrs[a], portSet[p] = true, true
		pairs++
	}
	t.Logf("be1 saw %d of %d frames: %d addresses, %d ports, %d pairs", n, sent, len(addrs), len(portSet), pairs)
	if n == 0 || n > sent {
		t.Errorf("be1 saw %d frames, want 1..%d", n, sent)
	}
	// Each pair was sent rounds times: a pair missing means all its
	// frames were lost, not a plausible loss at this rate.
	if len(addrs) != sources || len(portSet) != ports || pairs != sources*ports {
		t.Errorf("saw %d addresses, %d ports, %d pairs; want %d, %d, %d", len(addrs), len(portSet), pairs, sources, ports, sources*ports)
	}
}

// TestTableForwarders sends 256 flows through each flow-table forwarder
// (the floors of flowcost, and its chunked array) and the trivial one,
// twice, IPv4 and IPv6:
// every frame reaches be1, and the LRU ones (common and per-CPU lists)
// enter each flow once, on its first frame.
func TestTableForwarders(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 1, Clients: 1})
	client, lb, be1 := l.Client, l.Balancer, l.Backends[0]
	if err := learnMACs(l, be1); err != nil {
		t.Fatal(err)
	}
	if err := l.SetPortXDP(client, true); err != nil {
		t.Fatal(err)
	}
	var ctr *Counter
	if err := be1.Do(func() (err error) {
		ctr, err = AttachCounter(be1.Ifindex, testDport)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ctr.Close()
	const sources, ports = 4, 64
	g, err := NewGenerator(1, ports)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	for _, v6 := range []bool{false, true} {
		vip, count := l.VIP4, ctr
		if v6 {
			vip = l.VIP6
		}
		// pass sends every flow once: a burst of ports frames per
		// source, few enough for the veth queues.
		pass := func() {
			t.Helper()
			for s := range sources {
				var frame []byte
				if v6 {
					src := netip.AddrPortFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(s)}), 1024)
					frame = UDPFrame6(client.MAC, lb.MAC, src, netip.AddrPortFrom(vip, testDport), 64)
				} else {
					src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(s)}), 1024)
					frame = UDPFrame(client.MAC, lb.MAC, src, netip.AddrPortFrom(vip, testDport), 64)
				}
				sendFrom(t, client, g, frame, ports)
				time.Sleep(5 * time.Millisecond)
			}
		}
		for _, kind := range []string{"trivial", "hash", "percpu", "array", "chunked"} {
			lru := kind == "hash" || kind == "percpu"
			name := fmt.Sprintf("%s, %v", kind, vip)
			var fwd *Forwarder
			if err := lb.Do(func() (err error) {
				switch kind {
				case "hash":
					fwd, err = AttachTableForwarder(lb.Ifindex, vip, lb.MAC, be1.MAC, 1024)
				case "percpu":
					// Each possible CPU holds its share of the entries,
					// and the frames may all arrive on one.
					var cpus int
					if cpus, err = ebpf.PossibleCPU(); err == nil {
						fwd, err = AttachPerCPUTableForwarder(lb.Ifindex, vip, lb.MAC, be1.MAC, uint32(1024*cpus))
					}
				case "array":
					fwd, err = AttachArrayForwarder(lb.Ifindex, vip, lb.MAC, be1.MAC, 1024)
				case "chunked":
					fwd, err = AttachChunkedForwarder(lb.Ifindex, vip, lb.MAC, be1.MAC, 2*chunkSlots)
				default:
					fwd, err = AttachVIPForwarder(lb.Ifindex, vip, lb.MAC, be1.MAC)
				}
				return err
			}); err != nil {
				t.Fatal(err)
			}
			before, err := count.Count()
			if err != nil {
				t.Fatal(err)
			}
			entries := func() int {
				n := 0
				k, v := make([]byte, fwd.table.KeySize()), make([]byte, fwd.table.ValueSize())
				it := fwd.table.Iterate()
				for it.Next(&k, &v) {
					n++
				}
				if err := it.Err(); err != nil {
					t.Fatal(err)
				}
				return n
			}
			pass()
			first := 0
			if lru {
				// The last frames may still be on their way.
				for deadline := time.Now().Add(time.Second); ; time.Sleep(10 * time.Millisecond) {
					if first = entries(); first >= sources*ports || time.Now().After(deadline) {
						break
					}
				}
			}
			pass()
			got, err := settle(count.Count)
			if err != nil {
				t.Fatal(err)
			}
			if got-before != 2*sources*ports {
				t.Errorf("%s: be1 counted %d frames, want %d", name, got-before, 2*sources*ports)
			}
			if lru {
				if n := entries(); first != sources*ports || n != sources*ports {
					t.Errorf("%s: %d entries after the first pass and %d after the second, want %d", name, first, n, sources*ports)
				}
			}
			if err := fwd.Close(); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := lb.Do(func() error {
		f, err := AttachArrayForwarder(lb.Ifindex, l.VIP4, lb.MAC, be1.MAC, 1000)
		if err == nil {
			f.Close()
			return errors.New("an array of 1000 slots (not a power of two) was accepted")
		}
		f, err = AttachChunkedForwarder(lb.Ifindex, l.VIP4, lb.MAC, be1.MAC, chunkSlots/2)
		if err == nil {
			f.Close()
			return errors.New("a chunked array smaller than one chunk was accepted")
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
}

// TestSpreadForwarder sends 4 client addresses' frames through the
// stateless forwarder: each backend counts the frames of the addresses
// that fall on it, and only those.
func TestSpreadForwarder(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 3, Clients: 1})
	client, lb := l.Client, l.Balancer
	var macs []net.HardwareAddr
	counters := make([]*Counter, len(l.Backends))
	for i, be := range l.Backends {
		if err := learnMACs(l, be); err != nil {
			t.Fatal(err)
		}
		macs = append(macs, be.MAC)
		if err := be.Do(func() (err error) {
			counters[i], err = AttachCounter(be.Ifindex, testDport)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer counters[i].Close()
	}
	if err := l.SetPortXDP(client, true); err != nil {
		t.Fatal(err)
	}
	var fwd *Forwarder
	if err := lb.Do(func() (err error) {
		fwd, err = AttachSpreadForwarder(lb.Ifindex, l.VIP4, lb.MAC, macs)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer fwd.Close()
	const sources, ports = 4, 64
	g, err := NewGenerator(1, ports)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	want := make([]uint64, len(macs))
	for s := range sources {
		a := [4]byte{192, 0, 2, byte(10 + s)}
		want[binary.NativeEndian.Uint32(a[:])%uint32(len(macs))] += ports
		frame := UDPFrame(client.MAC, lb.MAC, netip.AddrPortFrom(netip.AddrFrom4(a), 1024), netip.AddrPortFrom(l.VIP4, testDport), 64)
		sendFrom(t, client, g, frame, ports)
		time.Sleep(5 * time.Millisecond)
	}
	for i, c := range counters {
		got, err := settle(c.Count)
		if err != nil {
			t.Fatal(err)
		}
		if got != want[i] {
			t.Errorf("%s counted %d frames, want %d", l.Backends[i].Name, got, want[i])
		}
	}
}
