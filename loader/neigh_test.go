package loader

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/internal/lab"
)

// The periodic probe of backend neighbours leaves static entries alone: an
// operator's permanent entry stays permanent (an NTF_USE request would
// clear NUD_PERMANENT, and the kernel would then try to resolve an address
// that may never answer), while an address without an entry is probed.
func TestProbeKeepsStaticNeighbours(t *testing.T) {
	l := lab.NewT(t, lab.Options{})
	lb := l.Balancer
	static4 := netip.MustParseAddr("198.51.100.200")
	static6 := netip.MustParseAddr("2001:db8:100::200")
	unknown := netip.MustParseAddr("198.51.100.201")
	mac := net.HardwareAddr{0x02, 0, 0, 0, 0x02, 0x00}
	x := &XDP{hops: map[netip.Addr]hop{}, services: map[uint32]datapath.Service{}}
	for i, a := range []netip.Addr{static4, static6, unknown} {
		x.hops[a] = hop{Ifindex: lb.Ifindex}
		x.services[uint32(i)] = datapath.Service{Backends: []datapath.Backend{{Addr: a}}} // in use: not forgotten
	}
	state := func(a netip.Addr) (int, bool) {
		var st int
		var found bool
		err := lb.Do(func() error {
			var t neighTables
			n, ok := t.lookup(lb.Ifindex, a)
			st, found = n.State, ok
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return st, found
	}
	err := lb.Do(func() error {
		for _, a := range []netip.Addr{static4, static6} {
			fam := unix.AF_INET
			if a.Is6() {
				fam = unix.AF_INET6
			}
			if err := netlink.NeighSet(&netlink.Neigh{LinkIndex: lb.Ifindex, Family: fam, IP: a.AsSlice(),
				HardwareAddr: mac, State: netlink.NUD_PERMANENT}); err != nil {
				return fmt.Errorf("static entry for %s: %w", a, err)
			}
		}
		x.probeHops()
		x.probeHops()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range []netip.Addr{static4, static6} {
		if st, ok := state(a); !ok || st != netlink.NUD_PERMANENT {
			t.Errorf("%s after probing: found %v, state %#x, want a permanent entry", a, ok, st)
		}
	}
	if st, ok := state(unknown); !ok || st&(netlink.NUD_INCOMPLETE|netlink.NUD_FAILED) == 0 {
		t.Errorf("%s after probing: found %v, state %#x, want the kernel resolving it", unknown, ok, st)
	}
}

// An address that did not answer and then answers with a MAC that is no
// one host's stays down, as unreachable: the configuration that has it
// was accepted, so the change that touches its service next must not be
// refused for it. Its own MAC later brings it up, and is reported.
func TestLateGroupMACIsUnreachable(t *testing.T) {
	a := netip.MustParseAddr("198.51.100.77")
	var told []netip.Addr
	x := &XDP{
		log:        slog.New(slog.NewTextHandler(io.Discard, nil)),
		hops:       map[netip.Addr]hop{},
		asked:      map[netip.Addr]time.Time{},
		unresolved: map[netip.Addr]unresolved{a: {hop: hop{Ifindex: 2}, err: errors.New("no answer")}},
		onResolved: func(a netip.Addr) { told = append(told, a) },
	}
	x.neighbourChanged(netlink.Neigh{LinkIndex: 2, IP: a.AsSlice(), HardwareAddr: net.HardwareAddr{0x01, 0, 0x5e, 0, 0, 1}})
	u, ok := x.unresolved[a]
	var refused *datapath.RefusedError
	if !ok || errors.As(u.err, &refused) || !strings.Contains(u.err.Error(), "01:00:5e:00:00:01") {
		t.Errorf("after a multicast MAC: unresolved %v, err %v; want unreachable, not refused", ok, u.err)
	}
	if _, ok := x.hops[a]; ok || len(told) > 0 {
		t.Errorf("a multicast MAC was taken as the backend's (told %v)", told)
	}
	x.neighbourChanged(netlink.Neigh{LinkIndex: 2, IP: a.AsSlice(), HardwareAddr: net.HardwareAddr{0x02, 0, 0, 0, 0, 0x77}})
	if h, ok := x.hops[a]; !ok || h.DstMAC.String() != "02:00:00:00:00:77" || len(told) != 1 {
		t.Errorf("after its own MAC: hop %v (%v), told %v", h, ok, told)
	}
}

// Backends behind a gateway take the gateway's MAC: when it answers, every
// backend it leads to is resolved and reported, and a new MAC of the
// gateway moves them all; the neighbour entries of other hosts change
// nothing.
func TestGatewayNeighbour(t *testing.T) {
	gw := netip.MustParseAddr("198.51.100.1")
	a, b := netip.MustParseAddr("203.0.113.200"), netip.MustParseAddr("203.0.113.201")
	var told []netip.Addr
	x := &XDP{
		log:   slog.New(slog.NewTextHandler(io.Discard, nil)),
		hops:  map[netip.Addr]hop{},
		asked: map[netip.Addr]time.Time{},
		unresolved: map[netip.Addr]unresolved{
			a: {hop: hop{Ifindex: 2, Via: gw}, err: errors.New("no answer")},
			b: {hop: hop{Ifindex: 2, Via: gw}, err: errors.New("no answer")},
		},
		routed:     true,
		onResolved: func(a netip.Addr) { told = append(told, a) },
	}
	x.neighbourChanged(netlink.Neigh{LinkIndex: 2, IP: netip.MustParseAddr("198.51.100.9").AsSlice(), HardwareAddr: net.HardwareAddr{2, 0, 0, 0, 0, 9}})
	if len(x.hops) != 0 || len(told) != 0 {
		t.Fatalf("another host's entry resolved %v", x.hops)
	}
	x.neighbourChanged(netlink.Neigh{LinkIndex: 2, IP: gw.AsSlice(), HardwareAddr: net.HardwareAddr{2, 0, 0, 0, 0, 1}})
	for _, addr := range []netip.Addr{a, b} {
		if h, ok := x.hops[addr]; !ok || h.DstMAC.String() != "02:00:00:00:00:01" || h.Via != gw {
			t.Errorf("%s after its gateway answered: %+v (%v)", addr, h, ok)
		}
	}
	if len(told) != 2 || len(x.unresolved) != 0 {
		t.Errorf("told %v, still unresolved %v", told, x.unresolved)
	}
	x.neighbourChanged(netlink.Neigh{LinkIndex: 2, IP: gw.AsSlice(), HardwareAddr: net.HardwareAddr{2, 0, 0, 0, 0, 0x11}})
	for _, addr := range []netip.Addr{a, b} {
		if h := x.hops[addr]; h.DstMAC.String() != "02:00:00:00:00:11" {
			t.Errorf("%s after its gateway's MAC changed: %s", addr, h.DstMAC)
		}
	}
}
