package bpf_test

import (
	"fmt"
	"math/bits"
	"net/netip"
	"testing"
	"time"

	"github.com/tetherlb/tether/internal/bpftest"
	"github.com/tetherlb/tether/maps"
)

// filterWords reads the program's vip_filter.
func filterWords(t *testing.T, f *bpftest.Fixture) [maps.VIPFilterBits / 64]uint64 {
	t.Helper()
	var w [maps.VIPFilterBits / 64]uint64
	if err := f.Objs.TetherVariables.VipFilter.Get(&w); err != nil {
		t.Fatal(err)
	}
	return w
}

func setFilter(t *testing.T, f *bpftest.Fixture, w [maps.VIPFilterBits / 64]uint64) {
	t.Helper()
	if err := f.Objs.TetherVariables.VipFilter.Set(w); err != nil {
		t.Fatal(err)
	}
}

func onlyBit(b uint32) (w [maps.VIPFilterBits / 64]uint64) {
	w[b/64] = 1 << (b % 64)
	return w
}

// putConn enters a connection entry for the TCP flow from src to dst
// (which need not be a VIP), on backend 1 of service 1.
func putConn(t *testing.T, f *bpftest.Fixture, src, dst netip.AddrPort) {
	t.Helper()
	if ok, err := f.Maps.PutFlow(maps.Flow{Client: src, VIP: dst, Proto: bpftest.TCP, Service: 1, Backend: 1}, false); err != nil || !ok {
		t.Fatalf("enter %v → %v: entered %v, %v", src, dst, ok, err)
	}
}

// TestVIPFilter checks the filter that spares packets to other addresses
// the connection table's lookup: the control plane sets the bits of its
// services' VIPs and no other, and clears a VIP's once its last service is
// gone; the program looks up exactly the packets whose bit is set (a
// connection entry for an address that is no VIP is found only while its
// bit is set), with the bit the Go model computes, IPv4 and IPv6.
func TestVIPFilter(t *testing.T) {
	f, svcs := fourServices(t)
	w := filterWords(t, f)
	want := onlyBit(maps.VIPFilterBit(vip4.Addr()))
	want[maps.VIPFilterBit(vip6.Addr())/64] |= 1 << (maps.VIPFilterBit(vip6.Addr()) % 64)
	if w != want {
		t.Fatalf("vip_filter with services on %v and %v is %x, want %x", vip4.Addr(), vip6.Addr(), w, want)
	}

	// Addresses that are no VIP, each with a connection entry: looked up
	// only with their own bit set.
	for i := range 32 {
		for _, dst := range []netip.AddrPort{
			netip.AddrPortFrom(netip.AddrFrom4([4]byte{203, 0, 113, byte(100 + i)}), 443),
			netip.AddrPortFrom(netip.MustParseAddr(fmt.Sprintf("2001:db8:f::%x:%x", i*997, 0x100+i)), 443),
		} {
			src := cli4
			if dst.Addr().Is6() {
				src = cli6
			}
			putConn(t, f, src, dst)
			frame := bpftest.Frame{Src: src, Dst: dst, Proto: bpftest.TCP, Flags: bpftest.ACK}.Bytes()
			b := maps.VIPFilterBit(dst.Addr())
			setFilter(t, f, onlyBit(b))
			if verdict, out := f.Run(frame); verdict != bpftest.XDPTx {
				t.Fatalf("%v with its bit %d set: verdict %d, want XDP_TX by its connection entry", dst, b, verdict)
			} else if id, err := bpftest.BackendOf(out); err != nil || id != 1 {
				t.Fatalf("%v with its bit set went to backend %d (%v), want its entry's 1", dst, id, err)
			}
			var others [maps.VIPFilterBits / 64]uint64
			for j := range others {
				others[j] = ^uint64(0)
			}
			others[b/64] &^= 1 << (b % 64)
			setFilter(t, f, others)
			if verdict, _ := f.Run(frame); verdict != bpftest.XDPPass {
				t.Fatalf("%v with every bit but its own set: verdict %d, want XDP_PASS (not looked up)", dst, verdict)
			}
		}
	}
	setFilter(t, f, w)

	// The last service of vip4 gone: its bit too, after; back with it.
	for _, s := range svcs[:2] {
		if err := f.Maps.DeleteService(s.VIP.Addr(), s.VIP.Port(), s.Proto); err != nil {
			t.Fatal(err)
		}
		got := filterWords(t, f)
		set := got[maps.VIPFilterBit(vip4.Addr())/64]>>(maps.VIPFilterBit(vip4.Addr())%64)&1 == 1
		if last := s.ID == svcs[1].ID; set == last {
			t.Fatalf("after deleting service %d (the last on %v: %v) vip4's bit is %v", s.ID, vip4.Addr(), last, set)
		}
	}
	if got := filterWords(t, f); bits.OnesCount64(got[0])+bits.OnesCount64(got[1])+bits.OnesCount64(got[2])+bits.OnesCount64(got[3]) != 1 {
		t.Fatalf("with services on %v only, vip_filter is %x", vip6.Addr(), got)
	}
	f.AddService(svcs[1])
	if got := filterWords(t, f); got != w {
		t.Fatalf("with vip4's service back, vip_filter is %x, want %x", got, w)
	}
	if got := backendFor(t, f, svcs[1], cli4, 0); got == 0 {
		t.Fatal("no backend for the service put back")
	}

	// A daemon that loads the program again reads the bits from the
	// service entries.
	setFilter(t, f, [maps.VIPFilterBits / 64]uint64{})
	if err := f.Maps.UseVIPFilter(f.Objs.TetherVariables.VipFilter); err != nil {
		t.Fatal(err)
	}
	if got := filterWords(t, f); got != w {
		t.Fatalf("vip_filter read from the service entries is %x, want %x", got, w)
	}

	// A service moved to another VIP keeps its old VIP's bit: the flows
	// established to it go on to their backends.
	s := svcs[3] // UDP on vip6: a connection entry from its first packet
	if err := f.Maps.DeleteService(svcs[2].VIP.Addr(), svcs[2].VIP.Port(), svcs[2].Proto); err != nil {
		t.Fatal(err)
	}
	b := backendFor(t, f, s, cli6, 0)
	moved := netip.MustParseAddr("2001:db8:f::100")
	for maps.VIPFilterBit(moved) == maps.VIPFilterBit(vip6.Addr()) {
		moved = moved.Next()
	}
	if err := f.Maps.PutService(moved, s.VIP.Port(), s.Proto, maps.Service{ID: s.ID, AffinityTimeout: time.Hour}); err != nil {
		t.Fatal(err)
	}
	if err := f.Maps.MoveService(s.VIP.Addr(), s.VIP.Port(), s.Proto); err != nil {
		t.Fatal(err)
	}
	if got := backendFor(t, f, s, cli6, 0); got != b {
		t.Fatalf("a flow to the moved service's old VIP went to %d, its entry says %d", got, b)
	}
	// Another service put on the old key and deleted again leaves the
	// moved service's bit set.
	if err := f.Maps.PutService(s.VIP.Addr(), s.VIP.Port(), s.Proto, maps.Service{ID: 99, AffinityTimeout: time.Hour}); err != nil {
		t.Fatal(err)
	}
	if err := f.Maps.DeleteService(s.VIP.Addr(), s.VIP.Port(), s.Proto); err != nil {
		t.Fatal(err)
	}
	if got := backendFor(t, f, s, cli6, 0); got != b {
		t.Fatalf("after a service came and went on the moved service's old key, its flow went to %d, its entry says %d", got, b)
	}
}
