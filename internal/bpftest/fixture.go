package bpftest

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tetherlb/tether/loader"
	"github.com/tetherlb/tether/maglev"
	"github.com/tetherlb/tether/maps"
)

// TB is the part of testing.TB a fixture uses, so that benchmark programs
// outside `go test` can use fixtures too.
type TB interface {
	Helper()
	Fatal(args ...any)
	Fatalf(format string, args ...any)
	Skip(args ...any)
	Cleanup(func())
}

// Fixture is a loaded tether program with helpers to describe services and
// run frames through it. Nothing is attached to any interface.
type Fixture struct {
	TB   TB
	Objs *loader.Objects
	Maps *maps.Maps
	Seed uint32
}

// RequireBPF skips (or, with TETHER_REQUIRE_PRIVILEGED=1, fails) a test
// that cannot load BPF programs here.
func RequireBPF(tb TB) {
	tb.Helper()
	if os.Geteuid() == 0 {
		return
	}
	msg := "loading BPF programs needs root (run: sudo make test)"
	if os.Getenv("TETHER_REQUIRE_PRIVILEGED") == "1" {
		tb.Fatal(msg)
	}
	tb.Skip(msg)
}

// NewFixture loads the program with small tables; it is closed when the
// test ends.
func NewFixture(tb TB, opts loader.Options) *Fixture {
	tb.Helper()
	RequireBPF(tb)
	if opts.Connections == 0 {
		opts.Connections = 1 << 14
	}
	if opts.Affinity == 0 {
		opts.Affinity = 1 << 14
	}
	if opts.RingSize == 0 {
		opts.RingSize = 4099
	}
	if opts.HashSeed == 0 {
		opts.HashSeed = maglev.DefaultSeed
	}
	objs, err := loader.Load(opts)
	if err != nil {
		tb.Fatalf("load: %v", err)
	}
	tb.Cleanup(func() { objs.Close() })
	return &Fixture{TB: tb, Objs: objs, Maps: objs.Maps, Seed: opts.HashSeed}
}

// BackendMAC is the MAC fixtures give backend id.
func BackendMAC(id uint32) net.HardwareAddr {
	return net.HardwareAddr{0x02, 0xbe, 0, 0, byte(id >> 8), byte(id)}
}

// Service describes a service for a fixture.
type Service struct {
	ID       uint32
	VIP      netip.AddrPort
	Proto    uint8
	Source   bool          // source affinity
	Timeout  time.Duration // affinity timeout; default 1h
	Backends []uint32      // backend ids, active and in the ring
	// Forwarding is maps.ForwardDSR (default), ForwardNAT, ForwardFullNAT,
	// ForwardIPIP or ForwardGUE; BackendPort the backends' port (default the VIP's)
	// and SNAT fullnat's source address.
	Forwarding  uint8
	BackendPort uint16
	SNAT        netip.Addr
	// Tunnel is the backends' outer header with ForwardIPIP and
	// ForwardGUE; OtherFamily gives the backends the other family than
	// the VIP's (IPv4 in IPv6, IPv6 in IPv4).
	Tunnel      maps.Tunnel
	OtherFamily bool
	// Ifindex is the interface the backends are reached by (0: unknown,
	// as for a backend the control plane has not resolved).
	Ifindex uint32
	// Share hands the service's new flows to sync_events.
	Share bool
}

// Backend is the address of the service's backend id.
func (s Service) Backend(id uint32) netip.Addr {
	vip := s.VIP.Addr()
	if s.OtherFamily {
		if vip.Is4() {
			return BackendAddr(netip.IPv6Unspecified(), id)
		}
		return BackendAddr(netip.IPv4Unspecified(), id)
	}
	return BackendAddr(vip, id)
}

// BackendAddr is the address fixtures give backend id of a service whose
// VIP is vip (same family).
func BackendAddr(vip netip.Addr, id uint32) netip.Addr {
	if vip.Is4() {
		return netip.AddrFrom4([4]byte{192, 0, 2, byte(id)})
	}
	return netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(id)})
}

// AddService writes the backends, the ring and the service.
func (f *Fixture) AddService(s Service) {
	f.TB.Helper()
	if s.Timeout == 0 {
		s.Timeout = time.Hour
	}
	for _, id := range s.Backends {
		f.SetBackend(s, id, maps.StateActive)
	}
	f.PublishRing(s.ID, s.VIP.Addr(), s.Backends...)
	err := f.Maps.PutService(s.VIP.Addr(), s.VIP.Port(), s.Proto, maps.Service{
		ID: s.ID, SourceAffinity: s.Source, AffinityTimeout: s.Timeout, Forwarding: s.Forwarding, Share: s.Share,
	})
	if err != nil {
		f.TB.Fatal(err)
	}
}

// SetBackend writes backend id of s in the given state.
func (f *Fixture) SetBackend(s Service, id uint32, state uint8) {
	f.TB.Helper()
	port := s.BackendPort
	if port == 0 {
		port = s.VIP.Port()
	}
	err := f.Maps.PutBackend(id, maps.Backend{
		Service: s.ID,
		Addr:    s.Backend(id),
		Port:    port,
		State:   state,
		MAC:     BackendMAC(id),
		SrcMAC:  LBMAC,
		Ifindex: s.Ifindex,
		SNAT:    s.SNAT,
		Tunnel:  s.Tunnel,
	})
	if err != nil {
		f.TB.Fatal(err)
	}
}

// Ring builds the Maglev ring of these backends as the control plane would.
func (f *Fixture) Ring(vip netip.Addr, ids ...uint32) []uint32 {
	f.TB.Helper()
	bs := make([]maglev.Backend, len(ids))
	for i, id := range ids {
		bs[i] = maglev.Backend{ID: id, Key: BackendAddr(vip, id).String(), Weight: 1}
	}
	ring, err := maglev.Build(bs, f.Maps.RingSize(), f.Seed)
	if err != nil {
		f.TB.Fatal(err)
	}
	return ring
}

// PublishRing publishes the ring of these backends for service id.
func (f *Fixture) PublishRing(id uint32, vip netip.Addr, backends ...uint32) {
	f.TB.Helper()
	if err := f.Maps.PublishRing(id, f.Ring(vip, backends...)); err != nil {
		f.TB.Fatal(err)
	}
}

// Run runs one frame through the program and returns the verdict and the
// frame as the program left it.
func (f *Fixture) Run(frame []byte) (uint32, []byte) {
	f.TB.Helper()
	out := make([]byte, len(frame)+256)
	opts := ebpf.RunOptions{Data: frame, DataOut: out}
	ret, err := f.Objs.TetherXdp.Run(&opts)
	if err != nil {
		f.TB.Fatalf("run program on %d-byte frame: %v", len(frame), err)
	}
	return ret, opts.DataOut
}

// RunOn runs one frame as if it came in on interface ifindex of the
// calling thread's network namespace (the one the program's FIB lookups
// see), and returns the verdict and the frame as the program left it.
func (f *Fixture) RunOn(frame []byte, ifindex int) (uint32, []byte) {
	f.TB.Helper()
	out := make([]byte, len(frame)+256)
	opts := ebpf.RunOptions{Data: frame, DataOut: out,
		Context: xdpMD{DataEnd: uint32(len(frame)), IngressIfindex: uint32(ifindex)}}
	ret, err := f.Objs.TetherXdp.Run(&opts)
	if err != nil {
		f.TB.Fatalf("run program on %d-byte frame from ifindex %d: %v", len(frame), ifindex, err)
	}
	return ret, opts.DataOut
}

// RunProbe runs one frame through the health probes' TC program as a
// packet of a socket with mark leaving by the probe device, and returns the
// verdict (TC action), the frame as the program left it and the mark it
// left on the packet.
func (f *Fixture) RunProbe(frame []byte, mark uint32) (verdict uint32, out []byte, markOut uint32) {
	f.TB.Helper()
	out = make([]byte, len(frame)+256)
	var ctxOut skbHead
	opts := ebpf.RunOptions{Data: frame, DataOut: out, Context: skbHead{Mark: mark}, ContextOut: &ctxOut}
	ret, err := f.Objs.TetherProbe.Run(&opts)
	if err != nil {
		f.TB.Fatalf("run probe program on %d-byte frame: %v", len(frame), err)
	}
	return ret, opts.DataOut, ctxOut.Mark
}

// skbHead is struct __sk_buff as BPF_PROG_TEST_RUN takes and returns it:
// the fields a test sets, then room for the rest (the kernel refuses an
// output buffer shorter than the struct).
type skbHead struct {
	Len, PktType, Mark uint32
	_                  [61]uint32
}

// TC actions.
const (
	TCActShot     = 2
	TCActRedirect = 7
)

// xdpMD is struct xdp_md, the context BPF_PROG_TEST_RUN takes.
type xdpMD struct {
	Data, DataEnd, DataMeta              uint32
	IngressIfindex, RxQueueIndex, Egress uint32
}

// BackendOf returns the backend id whose MAC a forwarded frame carries.
func BackendOf(frame []byte) (uint32, error) {
	if len(frame) < 6 || frame[0] != 0x02 || frame[1] != 0xbe {
		return 0, fmt.Errorf("destination MAC %x is no fixture backend", frame[:min(6, len(frame))])
	}
	return uint32(frame[4])<<8 | uint32(frame[5]), nil
}

// XDP verdicts.
const (
	XDPAborted  = 0
	XDPDrop     = 1
	XDPPass     = 2
	XDPTx       = 3
	XDPRedirect = 4
)
