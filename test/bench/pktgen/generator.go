package pktgen

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/internal/bpftest"
)

// xdpMD is struct xdp_md, the context BPF_PROG_TEST_RUN takes for XDP. The
// kernel (bpf_prog_test_run_xdp) wants data 0 (no metadata), data_meta 0,
// data_end the length of the frame and egress_ifindex 0; ingress_ifindex
// names the device the frames "arrive" on and XDP_TX leaves by, resolved in
// the caller's network namespace; rx_queue_index picks its queue.
type xdpMD struct {
	Data, DataEnd, DataMeta              uint32
	IngressIfindex, RxQueueIndex, Egress uint32
}

// genState is the value of the generator's one-entry state map, shared by
// Send and the program. All fields are host-order numbers.
type genState struct {
	// Seq is the number of frames the program has handled in this Send.
	Seq uint64
	// Limit is the number of frames to transmit; further runs drop (they
	// happen when the kernel's run is interrupted and cilium/ebpf restarts
	// it with the full repeat count).
	Limit uint64
	// Addr and Port are the frame's source address and port, the first
	// of their ranges.
	Addr, Port uint64
	// Sum is the one's complement sum (unfolded) of the frame's IPv4
	// header without its checksum and source address fields.
	Sum uint64
	// Template is the frame's first hdrLen bytes (Ethernet, IPv4 and UDP
	// headers; tcpHdrLen with TCP, hdrLen6 with IPv6), written back into
	// every frame: pages
	// come back to the generator with whatever the path made of them (a
	// forwarder's MAC rewrite, a router's TTL, a NAT's address), so
	// nothing may be taken from the page itself.
	Template [64]byte
	// L4Sum is, for a TCP frame or an IPv6 one, the one's complement sum
	// (unfolded) of its pseudo-header and segment without the source
	// address's varied 32 bits, the source port and the checksum field.
	L4Sum uint64
}

// Offsets of genState's fields, for the program.
const (
	stSeq   = 0
	stLimit = 8
	stAddr  = 16
	stPort  = 24
	stSum   = 32
	stTmpl  = 40
	stL4Sum = 104
)

// layout is where a kind of frame has what the generator writes.
type layout struct {
	hdr    int   // header bytes written back from the template
	src    int16 // the source address's 32 bits that vary (all of IPv4's)
	sport  int16
	ipCsum int16 // the IPv4 header checksum; 0: none (IPv6)
	l4Csum int16 // the TCP or UDP checksum; 0: none (IPv4 UDP sends none)
	udp    bool  // a UDP checksum: one that comes out 0 is sent as 0xffff
}

var (
	layoutUDP4 = layout{hdr: hdrLen, src: offIPSrc, sport: offUDPSport, ipCsum: offIPCsum}
	layoutTCP4 = layout{hdr: tcpHdrLen, src: offIPSrc, sport: offUDPSport, ipCsum: offIPCsum, l4Csum: offTCPCsum}
	layoutUDP6 = layout{hdr: hdrLen6, src: offIP6SrcLow, sport: offUDP6, l4Csum: offUDP6Csum, udp: true}
)

// layoutOf is the layout of a frame prepare accepted.
func layoutOf(frame []byte) layout {
	switch {
	case binary.BigEndian.Uint16(frame[offEtherType:]) == etherTypeIPv6:
		return layoutUDP6
	case frame[offIPProto] == protoTCP:
		return layoutTCP4
	}
	return layoutUDP4
}

// Limits of NewGenerator.
const (
	MaxSources = 1 << 16
	MaxPorts   = 1 << 16
)

// Generator transmits UDP or TCP frames with BPF_PROG_TEST_RUN in live-frame
// mode (BPF_F_TEST_XDP_LIVE_FRAMES, like xdp-trafficgen). Its XDP program
// rewrites, per frame, the source port and the IPv4 source address, fixes
// the IPv4 header checksum (and a TCP frame's checksum) and returns XDP_TX,
// so the kernel sends each frame out of the interface the run names.
//
// Frame k of a Send (k = 0, 1, ...) is flow f = k mod (sources*ports): source
// port srcPort + f mod ports and source address srcAddr + f div ports, where
// srcAddr:srcPort is the frame's own source. So the port counts up by one
// per frame and wraps after ports frames, the address moves on to the next
// at each wrap (and back to the first after sources wraps), and every run of
// sources*ports frames covers each address and port pair once.
//
// Where the kernel refuses live-frame mode, Send falls back to an AF_PACKET
// socket that sends the same frames (Method says which way is in use).
//
// Send calls are serialised; a Generator may be shared.
type Generator struct {
	sources, ports int

	mu       sync.Mutex
	state    *ebpf.Map
	prog     *ebpf.Program // for UDP frames
	tcpProg  *ebpf.Program // for TCP frames
	udp6Prog *ebpf.Program // for IPv6 UDP frames
	refused  error         // why the kernel refused live frames; nil until it does
}

// Method says how Send puts frames on the wire: BPF_PROG_TEST_RUN in
// live-frame mode, or the AF_PACKET socket that stands in where the kernel
// refused it (with the kernel's answer).
func (g *Generator) Method() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.refused != nil {
		return fmt.Sprintf("AF_PACKET sendmmsg (the kernel refused live frames: %v)", g.refused)
	}
	return "BPF_PROG_TEST_RUN live frames"
}

// NewGenerator loads a generator that varies the source address over
// sources consecutive addresses (1 to MaxSources) and the source port over
// ports consecutive ports (1 to MaxPorts), with sources*ports at most
// math.MaxInt32. The caller closes it.
func NewGenerator(sources, ports int) (g *Generator, err error) {
	switch {
	case sources < 1 || sources > MaxSources:
		return nil, fmt.Errorf("generator: sources %d out of range 1..%d", sources, MaxSources)
	case ports < 1 || ports > MaxPorts:
		return nil, fmt.Errorf("generator: ports %d out of range 1..%d", ports, MaxPorts)
	case int64(sources)*int64(ports) > math.MaxInt32:
		return nil, fmt.Errorf("generator: %d sources times %d ports above %d", sources, ports, math.MaxInt32)
	}
	g = &Generator{sources: sources, ports: ports}
	defer func() {
		if err != nil {
			g.Close()
			g = nil
		}
	}()
	g.state, err = ebpf.NewMap(&ebpf.MapSpec{
		Name:       "pktgen_gen",
		Type:       ebpf.Array,
		KeySize:    4,
		ValueSize:  uint32(binary.Size(genState{})),
		MaxEntries: 1,
	})
	if err != nil {
		return g, fmt.Errorf("generator map: %w", err)
	}
	for _, p := range []struct {
		prog **ebpf.Program
		lay  layout
	}{{&g.prog, layoutUDP4}, {&g.tcpProg, layoutTCP4}, {&g.udp6Prog, layoutUDP6}} {
		*p.prog, err = ebpf.NewProgram(&ebpf.ProgramSpec{
			Name:         "pktgen_gen",
			Type:         ebpf.XDP,
			Instructions: generatorInsns(g.state.FD(), sources, ports, p.lay),
			License:      "GPL",
		})
		if err != nil {
			return g, fmt.Errorf("load generator: %w", err)
		}
	}
	return g, nil
}

// generatorInsns is the generator's program for frames of layout lay. In
// live-frame mode the kernel recycles frame pages and
// resets only their length, not their bytes, so the program writes
// absolute values computed from the state map rather than adjusting what
// it finds. It assumes prepare's checks: an IPv4 header without options
// or an IPv6 one without extension headers, and a UDP or TCP header after
// it.
func generatorInsns(stateFD, sources, ports int, lay layout) asm.Instructions {
	n := lay.hdr
	insns := asm.Instructions{
		// R6 = context, kept across the helper call.
		asm.Mov.Reg(asm.R6, asm.R1),
		// R7 = &state[0].
		asm.StoreImm(asm.RFP, -4, 0, asm.Word),
		asm.LoadMapPtr(asm.R1, stateFD),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -4),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "drop"),
		asm.Mov.Reg(asm.R7, asm.R0),
		// R8 = seq; drop once limit frames went out; seq++. A run is
		// on one CPU, so no atomics are needed.
		asm.LoadMem(asm.R8, asm.R7, stSeq, asm.DWord),
		asm.LoadMem(asm.R1, asm.R7, stLimit, asm.DWord),
		asm.JGE.Reg(asm.R8, asm.R1, "drop"),
		asm.Mov.Reg(asm.R1, asm.R8),
		asm.Add.Imm(asm.R1, 1),
		asm.StoreMem(asm.R7, stSeq, asm.R1, asm.DWord),
		// R2 = data; the headers up to the end of the L4 header must be
		// there.
		asm.LoadMem(asm.R2, asm.R6, mdData, asm.Word),
		asm.LoadMem(asm.R3, asm.R6, mdDataEnd, asm.Word),
		asm.Mov.Reg(asm.R1, asm.R2),
		asm.Add.Imm(asm.R1, int32(n)),
		asm.JGT.Reg(asm.R1, asm.R3, "drop"),
	}
	// The headers from the template: 8-byte words, then a 4- and a
	// 2-byte one as n needs (42: five and a 2; 54: six, a 4 and a 2; 62:
	// seven, a 4 and a 2).
	for off := 0; off < n; {
		size, width := asm.DWord, 8
		switch {
		case n-off >= 8:
		case n-off >= 4:
			size, width = asm.Word, 4
		default:
			size, width = asm.Half, 2
		}
		insns = append(insns,
			asm.LoadMem(asm.R1, asm.R7, int16(stTmpl+off), size),
			asm.StoreMem(asm.R2, int16(off), asm.R1, size))
		off += width
	}
	insns = append(insns,
		// R8 = flow f = seq mod (sources*ports); R9 = f mod ports (the
		// port's index), R8 = f div ports (the address's index).
		asm.Mod.Imm(asm.R8, int32(sources*ports)),
		asm.Mov.Reg(asm.R9, asm.R8),
		asm.Mod.Imm(asm.R9, int32(ports)),
		asm.Div.Imm(asm.R8, int32(ports)),
		// R0 = source port = state.port + R9 (host order), stored in
		// network order.
		asm.LoadMem(asm.R0, asm.R7, stPort, asm.DWord),
		asm.Add.Reg(asm.R0, asm.R9),
		asm.Mov.Reg(asm.R1, asm.R0),
		asm.HostTo(asm.BE, asm.R1, asm.Half),
		asm.StoreMem(asm.R2, lay.sport, asm.R1, asm.Half),
		// R4 = source address (its last 32 bits with IPv6) = state.addr +
		// R8 (host order); stored in network order.
		asm.LoadMem(asm.R4, asm.R7, stAddr, asm.DWord),
		asm.Add.Reg(asm.R4, asm.R8),
		asm.Mov.Reg(asm.R1, asm.R4),
		asm.HostTo(asm.BE, asm.R1, asm.Word),
		asm.StoreMem(asm.R2, lay.src, asm.R1, asm.Word),
	)
	if lay.l4Csum != 0 {
		// TCP or UDP checksum: state.l4sum plus the address's halves and
		// the port.
		insns = append(insns, asm.LoadMem(asm.R5, asm.R7, stL4Sum, asm.DWord), asm.Add.Reg(asm.R5, asm.R0))
		insns = append(insns, checksumInsns(lay.l4Csum, lay.udp)...)
	}
	if lay.ipCsum != 0 {
		// IPv4 header checksum, computed whole: state.sum plus the
		// address's halves.
		insns = append(insns, asm.LoadMem(asm.R5, asm.R7, stSum, asm.DWord))
		insns = append(insns, checksumInsns(lay.ipCsum, false)...)
	}
	return append(insns,
		// Out of the interface the frame "arrived" on.
		asm.Mov.Imm(asm.R0, bpftest.XDPTx),
		asm.Return(),
		asm.Mov.Imm(asm.R0, bpftest.XDPDrop).WithSymbol("drop"),
		asm.Return(),
	)
}

// checksumInsns adds the two 16-bit halves of the address in R4 to the
// sum in R5, folds it twice to 16 bits, complements it and stores it in
// network order at offset off of the frame (R2); with udp a result of 0
// is stored as 0xffff (0 means no checksum). R1 is scratch; R4 is kept.
func checksumInsns(off int16, udp bool) asm.Instructions {
	insns := asm.Instructions{
		asm.Mov.Reg(asm.R1, asm.R4),
		asm.RSh.Imm(asm.R1, 16),
		asm.Add.Reg(asm.R5, asm.R1),
		asm.Mov.Reg(asm.R1, asm.R4),
		asm.And.Imm(asm.R1, 0xffff),
		asm.Add.Reg(asm.R5, asm.R1),
		asm.Mov.Reg(asm.R1, asm.R5),
		asm.RSh.Imm(asm.R1, 16),
		asm.And.Imm(asm.R5, 0xffff),
		asm.Add.Reg(asm.R5, asm.R1),
		asm.Mov.Reg(asm.R1, asm.R5),
		asm.RSh.Imm(asm.R1, 16),
		asm.And.Imm(asm.R5, 0xffff),
		asm.Add.Reg(asm.R5, asm.R1),
		asm.Xor.Imm(asm.R5, 0xffff),
	}
	store := asm.HostTo(asm.BE, asm.R5, asm.Half)
	if udp {
		label := fmt.Sprintf("csum_%d", off)
		insns = append(insns, asm.JNE.Imm(asm.R5, 0, label), asm.Mov.Imm(asm.R5, 0xffff))
		store = store.WithSymbol(label)
	}
	return append(insns, store, asm.StoreMem(asm.R2, off, asm.R5, asm.Half))
}

// prepare checks frame and resets the state map for count frames of it;
// it returns the state it wrote.
func (g *Generator) prepare(frame []byte, count uint32) (genState, error) {
	if len(frame) >= hdrLen && binary.BigEndian.Uint16(frame[offEtherType:]) == etherTypeIPv6 {
		return g.prepare6(frame, count)
	}
	switch {
	case len(frame) < hdrLen:
		return genState{}, fmt.Errorf("generator: frame of %d bytes, need at least %d", len(frame), hdrLen)
	case binary.BigEndian.Uint16(frame[offEtherType:]) != etherTypeIPv4:
		return genState{}, errors.New("generator: frame is neither IPv4 nor IPv6")
	case frame[offIPv4] != 0x45:
		return genState{}, fmt.Errorf("generator: IPv4 version/IHL byte %#02x, need 0x45 (no options)", frame[offIPv4])
	case frame[offIPProto] != protoUDP && frame[offIPProto] != protoTCP:
		return genState{}, fmt.Errorf("generator: IP protocol %d, not UDP or TCP", frame[offIPProto])
	case frame[offIPProto] == protoTCP && len(frame) < tcpHdrLen:
		return genState{}, fmt.Errorf("generator: TCP frame of %d bytes, need at least %d", len(frame), tcpHdrLen)
	}
	hdr := frame[offIPv4:offUDP]
	sum := bpftest.OnesSum(hdr, 0) - uint32(binary.BigEndian.Uint16(hdr[10:])) -
		uint32(binary.BigEndian.Uint16(hdr[12:])) - uint32(binary.BigEndian.Uint16(hdr[14:]))
	st := genState{Sum: uint64(sum)}
	if frame[offIPProto] == protoTCP {
		st.L4Sum = uint64(tcpSum(frame))
	}
	return g.reset(frame, count, st)
}

// prepare6 is prepare for an IPv6 frame: UDP, no extension headers.
func (g *Generator) prepare6(frame []byte, count uint32) (genState, error) {
	switch {
	case len(frame) < hdrLen6:
		return genState{}, fmt.Errorf("generator: IPv6 frame of %d bytes, need at least %d", len(frame), hdrLen6)
	case frame[offIP6Next] != protoUDP:
		return genState{}, fmt.Errorf("generator: IPv6 next header %d, not UDP", frame[offIP6Next])
	}
	end := min(len(frame), offUDP6+int(binary.BigEndian.Uint16(frame[offUDP6+4:])))
	seg := frame[offUDP6:end]
	src, dst := netip.AddrFrom16([16]byte(frame[offIP6Src:offIP6Dst])), netip.AddrFrom16([16]byte(frame[offIP6Dst:offUDP6]))
	sum := bpftest.OnesSum(seg, bpftest.OnesSum(bpftest.PseudoHeader(src, dst, protoUDP, len(seg)), 0))
	// Less what varies: the address's last 32 bits, the port, the checksum.
	for _, off := range []int{offIP6SrcLow, offIP6SrcLow + 2, offUDP6, offUDP6Csum} {
		sum -= uint32(binary.BigEndian.Uint16(frame[off:]))
	}
	return g.reset(frame, count, genState{L4Sum: uint64(sum)})
}

// srcAddr is the source address of a frame prepare takes.
func srcAddr(frame []byte) netip.Addr {
	if layoutOf(frame) == layoutUDP6 {
		return netip.AddrFrom16([16]byte(frame[offIP6Src:offIP6Dst]))
	}
	return netip.AddrFrom4([4]byte(frame[offIPSrc:offIPDst]))
}

// reset completes st with frame's source address and port and the
// template, checks their ranges, and writes it for count frames.
func (g *Generator) reset(frame []byte, count uint32, st genState) (genState, error) {
	lay := layoutOf(frame)
	addr := binary.BigEndian.Uint32(frame[lay.src:])
	port := binary.BigEndian.Uint16(frame[lay.sport:])
	if uint64(addr)+uint64(g.sources)-1 > math.MaxUint32 {
		return genState{}, fmt.Errorf("generator: %d sources from %v run past the last 32 bits of the address", g.sources, srcAddr(frame))
	}
	if int(port)+g.ports-1 > math.MaxUint16 {
		return genState{}, fmt.Errorf("generator: %d ports from %d run past 65535", g.ports, port)
	}
	st.Limit, st.Addr, st.Port = uint64(count), uint64(addr), uint64(port)
	copy(st.Template[:], frame[:lay.hdr])
	if err := g.state.Put(uint32(0), &st); err != nil {
		return genState{}, fmt.Errorf("generator: reset state: %w", err)
	}
	return st, nil
}

// tcpSum is the one's complement sum (unfolded) of a TCP frame's
// pseudo-header and segment (as far as the IPv4 total length says, within
// the frame) without the source address, the source port and the checksum
// field: what the generator adds a flow's address and port to.
func tcpSum(frame []byte) uint32 {
	end := min(len(frame), offIPv4+int(binary.BigEndian.Uint16(frame[offIPv4+2:])))
	seg := frame[offUDP:end]
	sum := bpftest.OnesSum(frame[offIPDst:offIPDst+4], 0) + protoTCP + uint32(len(seg))
	return bpftest.OnesSum(seg, sum) - uint32(binary.BigEndian.Uint16(seg[0:])) - uint32(binary.BigEndian.Uint16(seg[16:]))
}

// sent returns how many frames the program handled since prepare
// (transmitted, up to the limit, or dropped beyond it).
func (g *Generator) sent() (uint64, error) {
	var st genState
	if err := g.state.Lookup(uint32(0), &st); err != nil {
		return 0, fmt.Errorf("generator: read state: %w", err)
	}
	return st.Seq, nil
}

// Send transmits count frames built from frame (an Ethernet/IPv4/UDP or TCP
// frame without IPv4 options, such as UDPFrame's and TCPFrame's, or an
// Ethernet/IPv6/UDP frame such as UDPFrame6's; at most about 3.5 KB: one page
// with the kernel's head- and tailroom) out of interface ifindex. The
// ifindex is resolved in the network namespace of the calling thread:
// callers run Send inside lab.Host.Do. It returns the elapsed wall time of
// the run; the last frames may still be in flight in the kernel when it
// returns.
//
// Exactly count frames are transmitted (XDP_TX; the driver may still drop
// some): if the kernel's run is interrupted and restarted, the program drops
// the surplus runs. On a veth, frames sent with XDP_TX reach the peer only if
// the peer has an XDP program (or GRO) enabled (lab.SetPortXDP).
func (g *Generator) Send(ifindex int, frame []byte, count uint32) (time.Duration, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if ifindex <= 0 {
		return 0, fmt.Errorf("generator: bad ifindex %d", ifindex)
	}
	st, err := g.prepare(frame, count)
	if err != nil {
		return 0, err
	}
	if count == 0 {
		return 0, nil
	}
	if g.refused != nil {
		elapsed, _, err := sendPacket(ifindex, frame, count, st, g.sources, g.ports)
		return elapsed, err
	}
	prog := g.prog
	switch layoutOf(frame) {
	case layoutTCP4:
		prog = g.tcpProg
	case layoutUDP6:
		prog = g.udp6Prog
	}
	start := time.Now()
	_, err = prog.Run(&ebpf.RunOptions{
		Data: frame,
		// No DataOut and no ContextOut: live-frame mode rejects them.
		Context: xdpMD{DataEnd: uint32(len(frame)), IngressIfindex: uint32(ifindex)},
		Repeat:  count,
		Flags:   unix.BPF_F_TEST_XDP_LIVE_FRAMES,
	})
	elapsed := time.Since(start)
	if err != nil && liveRefused(err) {
		g.refused = err
		elapsed, _, err := sendPacket(ifindex, frame, count, st, g.sources, g.ports)
		return elapsed, err
	}
	if err != nil {
		return elapsed, fmt.Errorf("generator: live-frame run of %d frames on interface %d: %w", count, ifindex, err)
	}
	if n, err := g.sent(); err != nil {
		return elapsed, err
	} else if n < uint64(count) {
		return elapsed, fmt.Errorf("generator: program ran %d times for %d frames", n, count)
	}
	return elapsed, nil
}

// Close releases the program and its map.
func (g *Generator) Close() error {
	return closeAll(g.prog, g.tcpProg, g.udp6Prog, g.state)
}
