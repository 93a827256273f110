package test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/maps"
)

// TestBackendMACChange checks that backend MACs come from the kernel's
// neighbour table and are kept fresh when a backend's MAC changes: be1
// takes a new MAC and announces it the way a real host does (a gratuitous
// ARP and an unsolicited neighbour advertisement); the balancer's kernel
// updates its neighbour entries, tether rewrites be1's backend entries,
// and every open connection keeps echoing from its backend.
func TestBackendMACChange(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 3, Clients: 150})
	for _, be := range l.Backends {
		serveEcho(t, l, be)
	}
	d := startDaemon(t, l, chatConfig(l, l.Backends))

	conns := dialAll(t, l, l.ClientAddrs4, l.VIP4, connsPerC)
	conns6 := dialAll(t, l, l.ClientAddrs6, l.VIP6, 1)
	be1 := l.Backends[0]
	var on4, on6 []netip.Addr
	for src, b := range backendsByClient(t, conns) {
		if b == be1.Name {
			on4 = append(on4, src)
		}
	}
	for src, b := range backendsByClient(t, conns6) {
		if b == be1.Name {
			on6 = append(on6, src)
		}
	}
	t.Logf("%d IPv4 and %d IPv6 connections open; %d IPv4 and %d IPv6 client addresses on %s",
		len(conns), len(conns6), len(on4), len(on6), be1.Name)
	if len(on4) == 0 || len(on6) == 0 {
		t.Fatalf("no client on %s (IPv4 %d, IPv6 %d): the test needs some", be1.Name, len(on4), len(on6))
	}

	// Before the change every backend entry holds its backend's current
	// MAC, be1's included.
	m := daemonMaps(t, l, testRing)
	ids := backendIDs(t, m)
	before := map[netip.Addr]maps.Backend{}
	for _, be := range l.Backends {
		for _, a := range []netip.Addr{be.Addr4, be.Addr6} {
			id, ok := ids[a]
			if !ok {
				t.Fatalf("no backend entry for %s (%s)", a, be.Name)
			}
			e, err := m.LookupBackend(id)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(e.MAC, be.MAC) {
				t.Fatalf("backend %s (%s) entry holds MAC %s before the change, want %s", a, be.Name, e.MAC, be.MAC)
			}
			before[a] = e
		}
	}

	// be1's eth0 takes a new locally administered unicast MAC.
	oldMAC := be1.MAC
	newMAC := net.HardwareAddr{0x02, 0x00, 0x5e, 0x7e, 0x7e, 0x11}
	if bytes.Equal(newMAC, oldMAC) {
		newMAC[5]++
	}
	ifindex := setMAC(t, be1, "eth0", newMAC)
	t.Logf("%s eth0: MAC %s -> %s", be1.Name, oldMAC, newMAC)

	// Not vacuous: at the old MAC, be1 no longer takes tether's frames, so
	// a new connection from one of its clients cannot be made before be1
	// announces itself (within 1s; tether's own refresh probes the
	// neighbour only every 10s and would get no answer at the old MAC).
	func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		url := "ws://" + netip.AddrPortFrom(l.VIP4, chatPort).String() + "/chat"
		if c, err := dial(ctx, l, on4[0], url); err == nil {
			c.ws.Close()
			t.Fatalf("a connection from %s reached %s before it announced its new MAC: the MAC change has no effect", on4[0], c.backend)
		}
	}()
	if strings.Contains(d.proc.Output(), "backend MAC changed") {
		t.Fatalf("tether logged a MAC change before %s announced it:\n%s", be1.Name, d.proc.Output())
	}

	// be1 announces its new MAC like a real host: a gratuitous ARP request
	// (sender = target = its address, like arp_notify or arping -U) and an
	// unsolicited neighbour advertisement with the override flag (like
	// ndisc_notify), both from be1's namespace.
	garp := gratuitousARP(newMAC, be1.Addr4)
	na := unsolicitedNA(newMAC, be1.Addr6)
	if err := sendFrames(be1, ifindex, garp, na); err != nil {
		t.Fatal(err)
	}

	// Within 5s, tether's backend entries for be1 hold the new MAC, and
	// nothing else in them or in the other backends' entries changed.
	want := map[netip.Addr]net.HardwareAddr{}
	for a := range before {
		want[a] = before[a].MAC
	}
	want[be1.Addr4], want[be1.Addr6] = newMAC, newMAC
	start := time.Now()
	deadline := start.Add(5 * time.Second)
	for {
		var stale []string
		for a, mac := range want {
			e, err := m.LookupBackend(ids[a])
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(e.MAC, mac) {
				stale = append(stale, fmt.Sprintf("%s holds %s, want %s", a, e.MAC, mac))
				continue
			}
			e.MAC = before[a].MAC
			if !sameBackend(e, before[a]) {
				t.Fatalf("backend %s entry changed beyond its MAC: %+v, was %+v", a, e, before[a])
			}
		}
		if len(stale) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("tether's backend entries did not follow %s's new MAC within 5s: %s\nbalancer's neighbour table: %s\ntether output:\n%s",
				be1.Name, strings.Join(stale, "; "), balancerNeighs(l, be1), d.proc.Output())
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("tether's entries for %s hold %s after %v", be1.Name, newMAC, time.Since(start).Round(time.Millisecond))
	for _, a := range []netip.Addr{be1.Addr4, be1.Addr6} {
		line := fmt.Sprintf("msg=\"backend MAC changed\" backend=%s mac=%s", a, newMAC)
		d.waitLog(line, 2*time.Second)
	}

	// Every open connection still echoes from its backend, be1's now at its
	// new MAC, and be1's clients still connect, to be1.
	all := append(append([]*conn{}, conns...), conns6...)
	echoAll(t, all, "after MAC change")
	fresh := dialAll(t, l, on4, l.VIP4, 1)
	fresh = append(fresh, dialAll(t, l, on6, l.VIP6, 1)...)
	for _, c := range fresh {
		if c.backend != be1.Name {
			t.Errorf("client %s reconnected to %s, it was on %s", c.src, c.backend, be1.Name)
		}
	}
	t.Logf("%d open connections echo, %d new connections from %s's clients reach it", len(all), len(fresh), be1.Name)
}

// sameBackend compares two backend entries field by field.
func sameBackend(a, b maps.Backend) bool {
	return a.Service == b.Service && a.Addr == b.Addr && a.Port == b.Port && a.State == b.State &&
		bytes.Equal(a.MAC, b.MAC) && bytes.Equal(a.SrcMAC, b.SrcMAC) && a.Ifindex == b.Ifindex
}

// setMAC sets the hardware address of h's interface name and returns its
// ifindex in h's namespace.
func setMAC(t *testing.T, h *lab.Host, name string, mac net.HardwareAddr) int {
	t.Helper()
	nh, err := h.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	link, err := nh.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := nh.LinkSetHardwareAddr(link, mac); err != nil {
		t.Fatalf("%s %s: set MAC %s: %v", h.Name, name, mac, err)
	}
	link, err = nh.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	if got := link.Attrs().HardwareAddr; !bytes.Equal(got, mac) {
		t.Fatalf("%s %s: MAC is %s after setting %s", h.Name, name, got, mac)
	}
	return link.Attrs().Index
}

// balancerNeighs describes the balancer's neighbour entries for be, for
// failure messages.
func balancerNeighs(l *lab.Lab, be *lab.Host) string {
	nh, err := l.Balancer.Netlink()
	if err != nil {
		return err.Error()
	}
	defer nh.Close()
	var out []string
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		ns, err := nh.NeighList(0, fam)
		if err != nil {
			return err.Error()
		}
		for _, n := range ns {
			if a, ok := netip.AddrFromSlice(n.IP); ok && (a.Unmap() == be.Addr4 || a == be.Addr6) {
				out = append(out, fmt.Sprintf("%s lladdr %s state %#x", a.Unmap(), n.HardwareAddr, n.State))
			}
		}
	}
	return strings.Join(out, "; ")
}

var broadcastMAC = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

// ethernet is an Ethernet header.
func ethernet(dst, src net.HardwareAddr, etherType uint16) []byte {
	b := append(append(make([]byte, 0, 14), dst...), src...)
	return binary.BigEndian.AppendUint16(b, etherType)
}

// gratuitousARP is a broadcast ARP request in which mac announces ip:
// sender and target protocol addresses both ip, target hardware address
// zero (as Linux's arp_notify and arping -U send it).
func gratuitousARP(mac net.HardwareAddr, ip netip.Addr) []byte {
	b := ethernet(broadcastMAC, mac, unix.ETH_P_ARP)
	b = binary.BigEndian.AppendUint16(b, 1)             // hardware type Ethernet
	b = binary.BigEndian.AppendUint16(b, unix.ETH_P_IP) // protocol type
	b = append(b, 6, 4)                                 // address lengths
	b = binary.BigEndian.AppendUint16(b, 1)             // request
	b = append(b, mac...)
	b = append(b, ip.AsSlice()...)
	b = append(b, make([]byte, 6)...)
	return append(b, ip.AsSlice()...)
}

// unsolicitedNA is an unsolicited IPv6 neighbour advertisement to all
// nodes (ff02::1) from ip for ip, with the override flag and mac as the
// target link-layer address, as Linux's ndisc_notify sends it.
func unsolicitedNA(mac net.HardwareAddr, ip netip.Addr) []byte {
	src, dst := ip.As16(), netip.MustParseAddr("ff02::1").As16()
	icmp := []byte{136, 0, 0, 0, 0x20, 0, 0, 0} // type NA, code 0, checksum, flags: O
	icmp = append(icmp, src[:]...)              // target address
	icmp = append(icmp, 2, 1)                   // option: target link-layer address, 8 bytes
	icmp = append(icmp, mac...)
	binary.BigEndian.PutUint16(icmp[2:], icmp6Checksum(src, dst, icmp))

	b := ethernet(net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1}, mac, unix.ETH_P_IPV6)
	b = append(b, 0x60, 0, 0, 0) // version 6, traffic class and flow label 0
	b = binary.BigEndian.AppendUint16(b, uint16(len(icmp)))
	b = append(b, unix.IPPROTO_ICMPV6, 255) // next header, hop limit 255 (ND requires it)
	b = append(b, src[:]...)
	b = append(b, dst[:]...)
	return append(b, icmp...)
}

// icmp6Checksum is the ICMPv6 checksum of msg (with its checksum field
// zero) from src to dst: the one's complement of the one's complement sum
// over the IPv6 pseudo-header and msg.
func icmp6Checksum(src, dst [16]byte, msg []byte) uint16 {
	pseudo := append(append(make([]byte, 0, 40+len(msg)), src[:]...), dst[:]...)
	pseudo = binary.BigEndian.AppendUint32(pseudo, uint32(len(msg)))
	pseudo = append(pseudo, 0, 0, 0, unix.IPPROTO_ICMPV6)
	pseudo = append(pseudo, msg...)
	if len(pseudo)%2 == 1 {
		pseudo = append(pseudo, 0)
	}
	var sum uint32
	for i := 0; i < len(pseudo); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(pseudo[i:]))
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// sendFrames sends whole Ethernet frames out of interface ifindex of h
// through an AF_PACKET socket opened (and so living) in h's namespace.
func sendFrames(h *lab.Host, ifindex int, frames ...[]byte) error {
	return h.Do(func() error {
		// Protocol 0: the socket sends only, it receives nothing.
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("%s: packet socket: %w", h.Name, err)
		}
		defer unix.Close(fd)
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Ifindex: ifindex}); err != nil {
			return fmt.Errorf("%s: bind packet socket to ifindex %d: %w", h.Name, ifindex, err)
		}
		for _, f := range frames {
			sa := &unix.SockaddrLinklayer{
				Protocol: htons(binary.BigEndian.Uint16(f[12:14])),
				Ifindex:  ifindex,
				Halen:    6,
			}
			copy(sa.Addr[:], f[:6])
			if err := unix.Sendto(fd, f, 0, sa); err != nil {
				return fmt.Errorf("%s: send frame: %w", h.Name, err)
			}
		}
		return nil
	})
}

// htons converts a 16-bit value to network byte order as the kernel reads
// it from sockaddr_ll.
func htons(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}
