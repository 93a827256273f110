package pktgen

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net"
	"net/netip"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/internal/bpftest"
	"github.com/tetherlb/tether/test/bench/percpu"
)

// Offsets of struct xdp_md, the context of XDP programs.
const (
	mdData    = 0
	mdDataEnd = 4
)

// ne16 is the value a 16-bit load from the packet gives for the big-endian
// (network order) field v, on this host: the immediate to compare with.
func ne16(v uint16) int32 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return int32(binary.NativeEndian.Uint16(b[:]))
}

// matchUDP returns instructions that, with R1 = the xdp_md context, jump to
// label pass unless the frame is IPv4 (any header length, first fragment or
// unfragmented) and UDP to destination port dport. Falling through, R2 is
// the frame's start (data) and R3 its end (data_end); R4 and R5 are
// clobbered.
func matchUDP(dport uint16, pass string) asm.Instructions {
	return append(matchIPv4(protoUDP, pass),
		// Fragment offset 0, so that a UDP header follows.
		asm.LoadMem(asm.R5, asm.R2, offIPv4+6, asm.Half),
		asm.And.Imm(asm.R5, ne16(0x1fff)),
		asm.JNE.Imm(asm.R5, 0, pass),
		// R5 = IPv4 header length in bytes (IHL*4, 20 to 60).
		asm.LoadMem(asm.R5, asm.R2, offIPv4, asm.Byte),
		asm.And.Imm(asm.R5, 0x0f),
		asm.LSh.Imm(asm.R5, 2),
		asm.JLT.Imm(asm.R5, ipv4Len, pass),
		// R4 = UDP header, whose 8 bytes must be there.
		asm.Mov.Reg(asm.R4, asm.R2),
		asm.Add.Reg(asm.R4, asm.R5),
		asm.Add.Imm(asm.R4, ethLen),
		asm.Mov.Reg(asm.R5, asm.R4),
		asm.Add.Imm(asm.R5, udpLen),
		asm.JGT.Reg(asm.R5, asm.R3, pass),
		// Destination port.
		asm.LoadMem(asm.R5, asm.R4, 2, asm.Half),
		asm.JNE.Imm(asm.R5, ne16(dport), pass),
	)
}

// matchUDP6 is matchUDP for IPv6 frames without extension headers.
func matchUDP6(dport uint16, pass string) asm.Instructions {
	return asm.Instructions{
		asm.LoadMem(asm.R2, asm.R1, mdData, asm.Word),
		asm.LoadMem(asm.R3, asm.R1, mdDataEnd, asm.Word),
		asm.Mov.Reg(asm.R4, asm.R2),
		asm.Add.Imm(asm.R4, hdrLen6),
		asm.JGT.Reg(asm.R4, asm.R3, pass),
		asm.LoadMem(asm.R5, asm.R2, offEtherType, asm.Half),
		asm.JNE.Imm(asm.R5, ne16(etherTypeIPv6), pass),
		asm.LoadMem(asm.R5, asm.R2, offIP6Next, asm.Byte),
		asm.JNE.Imm(asm.R5, protoUDP, pass),
		asm.LoadMem(asm.R5, asm.R2, offUDP6+2, asm.Half),
		asm.JNE.Imm(asm.R5, ne16(dport), pass),
	}
}

// matchIPv4 returns instructions that jump to label pass unless the frame
// is IPv4 (no VLAN tag, a minimal header there) of protocol proto, with R2
// = data and R3 = data_end; R4 and R5 are clobbered.
func matchIPv4(proto int32, pass string) asm.Instructions {
	return asm.Instructions{
		// R2 = data, R3 = data_end.
		asm.LoadMem(asm.R2, asm.R1, mdData, asm.Word),
		asm.LoadMem(asm.R3, asm.R1, mdDataEnd, asm.Word),
		// The Ethernet header and a minimal IPv4 header must be there.
		asm.Mov.Reg(asm.R4, asm.R2),
		asm.Add.Imm(asm.R4, ethLen+ipv4Len),
		asm.JGT.Reg(asm.R4, asm.R3, pass),
		// EtherType IPv4 (no VLAN tags).
		asm.LoadMem(asm.R5, asm.R2, offEtherType, asm.Half),
		asm.JNE.Imm(asm.R5, ne16(etherTypeIPv4), pass),
		asm.LoadMem(asm.R5, asm.R2, offIPProto, asm.Byte),
		asm.JNE.Imm(asm.R5, proto, pass),
	}
}

// attach attaches prog in driver mode to ifindex, resolved in the calling
// thread's network namespace.
func attach(prog *ebpf.Program, ifindex int) (link.Link, error) {
	lk, err := link.AttachXDP(link.XDPOptions{
		Program:   prog,
		Interface: ifindex,
		Flags:     link.XDPDriverMode,
	})
	if err != nil {
		return nil, fmt.Errorf("attach %s to interface %d: %w", prog, ifindex, err)
	}
	return lk, nil
}

// Counter is an XDP program attached in driver mode to an interface: it
// counts the UDP frames (IPv4, and IPv6 without extension headers) to one
// destination port in a per-CPU array
// (summed by Count) and drops them; all other frames pass.
type Counter struct {
	counts *ebpf.Map
	prog   *ebpf.Program
	link   link.Link
}

// AttachCounter loads a Counter for UDP destination port dport and attaches
// it in driver mode to interface ifindex, in the calling thread's network
// namespace (call it inside lab.Host.Do). The caller closes it.
func AttachCounter(ifindex int, dport uint16) (c *Counter, err error) {
	match := append(matchUDP(dport, "ipv6"), asm.Ja.Label("count"))
	v6 := matchUDP6(dport, "pass")
	v6[0] = v6[0].WithSymbol("ipv6")
	return attachCounter(ifindex, append(match, v6...))
}

// AttachIPIPCounter is AttachCounter for IP-in-IP frames.
func AttachIPIPCounter(ifindex int) (c *Counter, err error) {
	return attachCounter(ifindex, matchIPv4(4, "pass"))
}

func attachCounter(ifindex int, match asm.Instructions) (c *Counter, err error) {
	c = &Counter{}
	defer func() {
		if err != nil {
			c.Close()
			c = nil
		}
	}()
	if c.counts, err = percpu.New("pktgen_count", 1); err != nil {
		return c, err
	}
	insns := match
	insns = append(insns, asm.StoreImm(asm.RFP, -4, 0, asm.Word).WithSymbol("count")) // counts[0]
	insns = append(insns, percpu.Increment(c.counts, "drop")...)
	insns = append(insns,
		// Counted frames go no further.
		asm.Mov.Imm(asm.R0, bpftest.XDPDrop).WithSymbol("drop"),
		asm.Return(),
		asm.Mov.Imm(asm.R0, bpftest.XDPPass).WithSymbol("pass"),
		asm.Return(),
	)
	c.prog, err = ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "pktgen_count",
		Type:         ebpf.XDP,
		Instructions: insns,
		License:      "GPL",
	})
	if err != nil {
		return c, fmt.Errorf("load counter: %w", err)
	}
	c.link, err = attach(c.prog, ifindex)
	return c, err
}

// Count returns the number of frames counted so far, over all CPUs.
func (c *Counter) Count() (uint64, error) {
	var perCPU []uint64
	if err := c.counts.Lookup(uint32(0), &perCPU); err != nil {
		return 0, fmt.Errorf("read counter: %w", err)
	}
	return percpu.Sum(perCPU), nil
}

// Close detaches the program and releases it and its map.
func (c *Counter) Close() error {
	return closeAll(c.link, c.prog, c.counts)
}

// Forwarder is the trivial forwarding XDP program, the floor of an XDP
// balancer: attached in driver mode to an interface, it rewrites every
// frame it takes (to one UDP port, or to one VIP) to a fixed Ethernet
// source and destination and sends it back out with XDP_TX; everything
// else passes. It touches nothing above Ethernet (no TTL, no checksum).
// Its variants choose the destination by client address, or look the flow
// up in a table first.
type Forwarder struct {
	prog  *ebpf.Program
	link  link.Link
	table *ebpf.Map // AttachTableForwarder's connection table
}

// AttachForwarder loads a Forwarder for UDP destination port dport that
// rewrites frames to Ethernet source src and destination dst (6 bytes each)
// and attaches it in driver mode to interface ifindex, in the calling
// thread's network namespace (call it inside lab.Host.Do). The caller
// closes it.
func AttachForwarder(ifindex int, dport uint16, src, dst net.HardwareAddr) (*Forwarder, error) {
	return attachForwarder(ifindex, matchUDP(dport, "pass"), src, dst)
}

// srcMACLabel labels the source MAC's stores of a forwarder.
const srcMACLabel = "src_mac"

// macStores writes mac at offset off of the frame (R2) in three 16-bit
// stores, aligned under the kernel's NET_IP_ALIGN assumption.
func macStores(off int16, mac net.HardwareAddr) asm.Instructions {
	var s asm.Instructions
	for i := int16(0); i < 6; i += 2 {
		v := ne16(binary.BigEndian.Uint16(mac[i:]))
		s = append(s, asm.StoreImm(asm.R2, off+i, int64(v), asm.Half))
	}
	return s
}

// attachForwarder completes a forwarder whose match jumps to "pass" for
// frames to leave alone and falls through, with R2 = data, for frames to
// forward to dst, or with dst nil having written the destination MAC
// itself.
func attachForwarder(ifindex int, match asm.Instructions, src, dst net.HardwareAddr) (f *Forwarder, err error) {
	if len(src) != 6 || (dst != nil && len(dst) != 6) {
		return nil, fmt.Errorf("forwarder: MACs must be 6 bytes, have %v and %v", src, dst)
	}
	insns := append(asm.Instructions{}, match...)
	if dst != nil {
		insns = append(insns, macStores(0, dst)...) // destination MAC
	}
	srcStores := macStores(6, src)
	srcStores[0] = srcStores[0].WithSymbol(srcMACLabel)
	insns = append(insns, srcStores...)
	insns = append(insns,
		// Back out of the interface it came in on.
		asm.Mov.Imm(asm.R0, bpftest.XDPTx),
		asm.Return(),
		asm.Mov.Imm(asm.R0, bpftest.XDPPass).WithSymbol("pass"),
		asm.Return(),
	)
	f = &Forwarder{}
	f.prog, err = ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "pktgen_fwd",
		Type:         ebpf.XDP,
		Instructions: insns,
		License:      "GPL",
	})
	if err != nil {
		return nil, fmt.Errorf("load forwarder: %w", err)
	}
	if f.link, err = attach(f.prog, ifindex); err != nil {
		f.prog.Close()
		return nil, err
	}
	return f, nil
}

// AttachVIPForwarder is AttachForwarder for every frame to destination
// address vip (IPv4 or IPv6), whatever its protocol: the floor of an XDP
// balancer for TCP as well as UDP, sending everything to one backend.
func AttachVIPForwarder(ifindex int, vip netip.Addr, src, dst net.HardwareAddr) (*Forwarder, error) {
	if !vip.IsValid() {
		return nil, errors.New("forwarder: no VIP")
	}
	return attachForwarder(ifindex, vipMatch(vip), src, dst)
}

// AttachSpreadForwarder is AttachVIPForwarder over several backends: the
// frame goes to dsts[h % len(dsts)], h the IPv4 source address as the
// host loads it. Stateless: the floor of a balancer that spreads clients
// over backends by address, as source affinity does, but remembers
// nothing (a backend added or removed moves clients).
func AttachSpreadForwarder(ifindex int, vip netip.Addr, src net.HardwareAddr, dsts []net.HardwareAddr) (*Forwarder, error) {
	if !vip.Is4() {
		return nil, fmt.Errorf("forwarder: %v is not an IPv4 address", vip)
	}
	if len(dsts) == 0 || len(dsts) > 16 {
		return nil, fmt.Errorf("forwarder: %d backends, want 1 to 16", len(dsts))
	}
	match := append(vipMatch(vip),
		asm.LoadMem(asm.R5, asm.R2, offIPSrc, asm.Word),
		asm.Mod.Imm32(asm.R5, int32(len(dsts))),
	)
	for i, mac := range dsts {
		if len(mac) != 6 {
			return nil, fmt.Errorf("forwarder: MACs must be 6 bytes, have %v", mac)
		}
		// Backend i's block: unless it is the last, a check that jumps
		// to the next block; its MAC; a jump past the other blocks.
		last := i == len(dsts)-1
		var block asm.Instructions
		if !last {
			block = append(block, asm.JNE.Imm(asm.R5, int32(i), fmt.Sprintf("be%d", i+1)))
		}
		block = append(block, macStores(0, mac)...)
		if !last {
			block = append(block, asm.Ja.Label(srcMACLabel))
		}
		if i > 0 {
			block[0] = block[0].WithSymbol(fmt.Sprintf("be%d", i))
		}
		match = append(match, block...)
	}
	return attachForwarder(ifindex, match, src, nil)
}

// family is where the forwarders find a frame's fields, IPv4 (a 20-byte
// header) or IPv6 (no extension headers).
type family struct {
	v6        bool
	etherType uint16
	l3Len     int32 // the IP header
	proto     int16 // the protocol (IPv6: next header) byte
	src, dst  int16 // the addresses
	addrLen   int16 // their bytes
	ports     int16 // the source and destination ports, after the IP header
}

var (
	family4 = family{etherType: etherTypeIPv4, l3Len: ipv4Len, proto: offIPProto, src: offIPSrc, dst: offIPDst, addrLen: 4, ports: offUDP}
	family6 = family{v6: true, etherType: etherTypeIPv6, l3Len: ipv6Len, proto: offIP6Next, src: offIP6Src, dst: offIP6Dst, addrLen: 16, ports: offUDP6}
)

func familyOf(a netip.Addr) family {
	if a.Is4() {
		return family4
	}
	return family6
}

// vipMatch jumps to "pass" unless the frame is of vip's family and to
// vip, and falls through with R2 = data and R3 = data_end.
func vipMatch(vip netip.Addr) asm.Instructions {
	vip = vip.Unmap()
	fam := familyOf(vip)
	insns := asm.Instructions{
		asm.LoadMem(asm.R2, asm.R1, mdData, asm.Word),
		asm.LoadMem(asm.R3, asm.R1, mdDataEnd, asm.Word),
		asm.Mov.Reg(asm.R4, asm.R2),
		asm.Add.Imm(asm.R4, ethLen+fam.l3Len),
		asm.JGT.Reg(asm.R4, asm.R3, "pass"),
		asm.LoadMem(asm.R5, asm.R2, offEtherType, asm.Half),
		asm.JNE.Imm(asm.R5, ne16(fam.etherType), "pass"),
	}
	// The destination address, a word at a time, compared as the host
	// loads it.
	a := vip.AsSlice()
	for i := int16(0); i < fam.addrLen; i += 4 {
		insns = append(insns,
			asm.LoadMem(asm.R5, asm.R2, fam.dst+i, asm.Word),
			asm.JNE.Imm32(asm.R5, int32(binary.NativeEndian.Uint32(a[i:])), "pass"))
	}
	return insns
}

// AttachTableForwarder is AttachVIPForwarder with a connection table: it
// looks every frame's 5-tuple up in an LRU hash of entries entries (the
// key and value sizes of tether's connection tables: a 16-byte key for
// IPv4, 40 bytes for IPv6, and 16 bytes of value) and enters it when
// missing, then forwards it to the one backend. Tether's own work aside,
// that is what any balancer that remembers its flows in a kernel hash
// table pays a packet: the floor of a stateful one. The frames must be
// UDP or TCP without IPv4 options or IPv6 extension headers (the
// generator's are); others pass.
func AttachTableForwarder(ifindex int, vip netip.Addr, src, dst net.HardwareAddr, entries uint32) (*Forwarder, error) {
	return attachLRUForwarder(ifindex, vip, src, dst, entries, 0)
}

// AttachPerCPUTableForwarder is AttachTableForwarder with the LRU hash's
// lists kept per CPU (BPF_F_NO_COMMON_LRU), the alternative to the common
// LRU, whose free and active lists and their locks all CPUs share. Its
// entries are split evenly between the CPUs: a CPU can hold only its
// share of them.
func AttachPerCPUTableForwarder(ifindex int, vip netip.Addr, src, dst net.HardwareAddr, entries uint32) (*Forwarder, error) {
	return attachLRUForwarder(ifindex, vip, src, dst, entries, unix.BPF_F_NO_COMMON_LRU)
}

func attachLRUForwarder(ifindex int, vip netip.Addr, src, dst net.HardwareAddr, entries, flags uint32) (*Forwarder, error) {
	fam, err := tableFamily(vip, entries, 0)
	if err != nil {
		return nil, err
	}
	keyLen := 2*int32(fam.addrLen) + 8 // addresses, ports, protocol (a word)
	table, err := ebpf.NewMap(&ebpf.MapSpec{
		Name:       "pktgen_conns",
		Type:       ebpf.LRUHash,
		KeySize:    uint32(keyLen),
		ValueSize:  16,
		MaxEntries: entries,
		Flags:      flags,
	})
	if err != nil {
		return nil, fmt.Errorf("forwarder: connection table: %w", err)
	}
	key := int16(-keyLen)
	value := key - 16
	var lookup asm.Instructions
	// The key: source and destination addresses, ports, protocol.
	for i := int16(0); i < 2*fam.addrLen; i += 4 {
		lookup = append(lookup,
			asm.LoadMem(asm.R5, asm.R2, fam.src+i, asm.Word), // src, then dst, which follows it
			asm.StoreMem(asm.RFP, key+i, asm.R5, asm.Word))
	}
	lookup = append(lookup,
		asm.LoadMem(asm.R5, asm.R2, fam.ports, asm.Word),
		asm.StoreMem(asm.RFP, key+2*fam.addrLen, asm.R5, asm.Word),
		asm.LoadMem(asm.R5, asm.R2, fam.proto, asm.Byte),
		asm.StoreMem(asm.RFP, key+2*fam.addrLen+4, asm.R5, asm.Word),
		asm.LoadMapPtr(asm.R1, table.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, int32(key)),
		asm.FnMapLookupElem.Call(),
		asm.JNE.Imm(asm.R0, 0, "hit"),
		asm.Mov.Imm(asm.R5, 1),
		asm.StoreMem(asm.RFP, value, asm.R5, asm.DWord),
		asm.Mov.Imm(asm.R5, 0),
		asm.StoreMem(asm.RFP, value+8, asm.R5, asm.DWord),
		asm.LoadMapPtr(asm.R1, table.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, int32(key)),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, int32(value)),
		asm.Mov.Imm(asm.R4, 0), // BPF_ANY
		asm.FnMapUpdateElem.Call(),
		asm.Ja.Label("fwd"),
	)
	return attachTableForwarder(ifindex, vip, src, dst, table, lookup)
}

// AttachArrayForwarder is AttachTableForwarder with a table of its own
// making instead of the kernel's hash: an array of entries 16-byte slots
// (a power of two) indexed by a hash of the frame's addresses (their last
// 32 bits) and ports, whose slot it reads. One random memory access a
// packet where the kernel's hash table makes two (its bucket, then the
// element): what a balancer with a flat, open-addressed flow table would
// pay at least.
func AttachArrayForwarder(ifindex int, vip netip.Addr, src, dst net.HardwareAddr, entries uint32) (*Forwarder, error) {
	fam, err := tableFamily(vip, entries, 2)
	if err != nil {
		return nil, err
	}
	table, err := ebpf.NewMap(&ebpf.MapSpec{
		Name:       "pktgen_slots",
		Type:       ebpf.Array,
		KeySize:    4,
		ValueSize:  16,
		MaxEntries: entries,
	})
	if err != nil {
		return nil, fmt.Errorf("forwarder: flow array: %w", err)
	}
	const key = -4
	lookup := append(slotHash(fam, entries),
		asm.StoreMem(asm.RFP, key, asm.R5, asm.Word),
		asm.LoadMapPtr(asm.R1, table.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, key),
		asm.FnMapLookupElem.Call(),
		asm.JNE.Imm(asm.R0, 0, "hit"),
		asm.Ja.Label("fwd"),
	)
	return attachTableForwarder(ifindex, vip, src, dst, table, lookup)
}

// tableFamily checks a table forwarder's VIP and, for one that indexes
// its slots by a hash (least above 0), that entries is a power of two of
// at least least; it returns the VIP's family.
func tableFamily(vip netip.Addr, entries, least uint32) (family, error) {
	if !vip.IsValid() {
		return family{}, errors.New("forwarder: no VIP")
	}
	if least > 0 && (entries < least || entries&(entries-1) != 0) {
		return family{}, fmt.Errorf("forwarder: %d entries is not a power of two of at least %d", entries, least)
	}
	return familyOf(vip.Unmap()), nil
}

// slotHash leaves in R5 the slot of a table of entries slots (a power of
// two) that the frame at R2 falls on: ((src ^ dst ^ ports) * golden
// ratio) >> (32 - log2 entries), over the addresses' last 32 bits.
func slotHash(fam family, entries uint32) asm.Instructions {
	return asm.Instructions{
		asm.LoadMem(asm.R5, asm.R2, fam.src+fam.addrLen-4, asm.Word),
		asm.LoadMem(asm.R4, asm.R2, fam.dst+fam.addrLen-4, asm.Word),
		asm.Xor.Reg32(asm.R5, asm.R4),
		asm.LoadMem(asm.R4, asm.R2, fam.ports, asm.Word),
		asm.Xor.Reg32(asm.R5, asm.R4),
		asm.Mul.Imm32(asm.R5, -1640531535), // 0x9e3779b1
		asm.RSh.Imm32(asm.R5, int32(32-bits.TrailingZeros32(entries))),
	}
}

// chunkSlots is the slots of each of AttachChunkedForwarder's arrays: 16
// KiB of values, small enough that the kernel allocates the array from
// its linear map (kmalloc, up to 32 KiB) rather than vmalloc.
const chunkSlots = 1024

// AttachChunkedForwarder is AttachArrayForwarder with its slots in
// entries/1024 arrays of 1024 slots, found through an array of maps: the
// same slot, reached by two dependent reads (the array's pointer, then the
// slot), but in memory the kernel maps with huge pages (its linear map),
// where a vmalloc'ed map's is mapped in 4 KiB pages. It measures what the
// pages cost a flat flow table.
func AttachChunkedForwarder(ifindex int, vip netip.Addr, src, dst net.HardwareAddr, entries uint32) (*Forwarder, error) {
	fam, err := tableFamily(vip, entries, chunkSlots)
	if err != nil {
		return nil, err
	}
	inner := &ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 16, MaxEntries: chunkSlots}
	table, err := ebpf.NewMap(&ebpf.MapSpec{
		Name:       "pktgen_chunks",
		Type:       ebpf.ArrayOfMaps,
		KeySize:    4,
		ValueSize:  4,
		MaxEntries: entries / chunkSlots,
		InnerMap:   inner,
	})
	if err != nil {
		return nil, fmt.Errorf("forwarder: chunk table: %w", err)
	}
	for i := range entries / chunkSlots {
		m, err := ebpf.NewMap(inner)
		if err == nil {
			err = table.Put(i, m)
			m.Close()
		}
		if err != nil {
			table.Close()
			return nil, fmt.Errorf("forwarder: chunk %d: %w", i, err)
		}
	}
	const outer, slot = -4, -8
	lookup := append(slotHash(fam, entries),
		asm.Mov.Reg(asm.R4, asm.R5),
		asm.And.Imm(asm.R4, chunkSlots-1),
		asm.StoreMem(asm.RFP, slot, asm.R4, asm.Word),
		asm.RSh.Imm32(asm.R5, int32(bits.TrailingZeros32(chunkSlots))),
		asm.StoreMem(asm.RFP, outer, asm.R5, asm.Word),
		asm.LoadMapPtr(asm.R1, table.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, outer),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "fwd"),
		asm.Mov.Reg(asm.R1, asm.R0),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, slot),
		asm.FnMapLookupElem.Call(),
		asm.JNE.Imm(asm.R0, 0, "hit"),
		asm.Ja.Label("fwd"),
	)
	return attachTableForwarder(ifindex, vip, src, dst, table, lookup)
}

// attachTableForwarder completes a table forwarder: lookup runs with R2 =
// data (whose IP header and ports it may read) and jumps to "hit" with R0
// = the frame's entry or to "fwd" without one.
func attachTableForwarder(ifindex int, vip netip.Addr, src, dst net.HardwareAddr, table *ebpf.Map, lookup asm.Instructions) (*Forwarder, error) {
	fam := familyOf(vip.Unmap())
	match := vipMatch(vip)
	if !fam.v6 {
		// A 20-byte IPv4 header.
		match = append(match,
			asm.LoadMem(asm.R5, asm.R2, offIPv4, asm.Byte),
			asm.JNE.Imm(asm.R5, 0x45, "pass"))
	}
	match = append(match,
		// UDP or TCP, and the ports after the IP header.
		asm.LoadMem(asm.R5, asm.R2, fam.proto, asm.Byte),
		asm.JEq.Imm(asm.R5, protoUDP, "ports"),
		asm.JNE.Imm(asm.R5, protoTCP, "pass"),
		asm.Mov.Reg(asm.R4, asm.R2).WithSymbol("ports"),
		asm.Add.Imm(asm.R4, ethLen+fam.l3Len+4),
		asm.JGT.Reg(asm.R4, asm.R3, "pass"),
		asm.Mov.Reg(asm.R6, asm.R2), // data, kept across the calls
	)
	match = append(match, lookup...)
	match = append(match,
		// A hit reads its entry, as a balancer reads the backend in it.
		asm.LoadMem(asm.R5, asm.R0, 0, asm.Word).WithSymbol("hit"),
		asm.Mov.Reg(asm.R2, asm.R6).WithSymbol("fwd"),
	)
	f, err := attachForwarder(ifindex, match, src, dst)
	if err != nil {
		table.Close()
		return nil, err
	}
	f.table = table
	return f, nil
}

// ProgramID returns the kernel's id of the forwarder's program, for
// RunStats and to compare with XDPProgramID.
func (f *Forwarder) ProgramID() (ebpf.ProgramID, error) {
	info, err := f.prog.Info()
	if err != nil {
		return 0, fmt.Errorf("forwarder info: %w", err)
	}
	id, ok := info.ID()
	if !ok {
		return 0, errors.New("forwarder: kernel reports no program id")
	}
	return id, nil
}

// Close detaches the program and releases it.
func (f *Forwarder) Close() error {
	return closeAll(f.link, f.prog, f.table)
}

// closeAll closes the non-nil closers in order and joins their errors.
// (Nil *ebpf.Map and *ebpf.Program close without error.)
func closeAll(cs ...io.Closer) error {
	var errs []error
	for _, c := range cs {
		if c == nil {
			continue
		}
		if err := c.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
