package test

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/maps"
)

// ping sends one ICMP echo request from the lab client to vip and says
// whether an echo reply from vip carrying it came back within a second.
func ping(t *testing.T, l *lab.Lab, seq uint16) bool {
	t.Helper()
	c, err := l.Client.ListenPacket("ip4:icmp", l.ClientAddrs4[0].String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	req := []byte{8, 0, 0, 0, 0x74, 0x65, byte(seq >> 8), byte(seq), 't', 'e', 't', 'h', 'e', 'r'}
	var sum uint32
	for i := 0; i < len(req); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(req[i:]))
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(req[2:], ^uint16(sum))
	if _, err := c.WriteTo(req, &net.IPAddr{IP: l.VIP4.AsSlice()}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1500)
	deadline := time.Now().Add(time.Second)
	for {
		c.SetReadDeadline(deadline)
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return false
		}
		if from.String() == l.VIP4.String() && n == len(req) && buf[0] == 0 && bytes.Equal(buf[4:n], req[4:]) {
			return true
		}
	}
}

// TestVIPAnswersPing: with the default icmp_echo: reply the program
// answers pings to a VIP (the balancer's kernel does not hold it); with
// icmp_echo: pass, applied by a reload, the VIP's entry is gone and the
// kernel, which does not hold the VIP, answers nothing.
func TestVIPAnswersPing(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 1, Clients: 1})
	serveEcho(t, l, l.Backends[0])
	cfg := chatConfig(l, l.Backends)
	d := startDaemon(t, l, cfg)
	if !ping(t, l, 1) {
		t.Fatal("no echo reply from the VIP")
	}
	vips, err := daemonMaps(t, l, testRing).VIPs()
	if err != nil || len(vips) != 2 {
		t.Fatalf("VIP entries %v (%v), want both VIPs", vips, err)
	}
	// An entry of a VIP with no service, as a daemon stopped between a
	// service's removal and its VIP's leaves it, is gone after a restart.
	stale := netip.MustParseAddr("203.0.113.99")
	if err := daemonMaps(t, l, testRing).PutVIP(stale, maps.VIPEchoReply); err != nil {
		t.Fatal(err)
	}
	d.restart(l, tetherBin)
	if vips, err := daemonMaps(t, l, testRing).VIPs(); err != nil || len(vips) != 2 || vips[stale] != 0 {
		t.Fatalf("VIP entries after a restart: %v (%v), want both VIPs and no other", vips, err)
	}
	if !ping(t, l, 3) {
		t.Fatal("no echo reply from the VIP after a restart")
	}
	d.reload(strings.ReplaceAll(cfg, "    affinity: source\n", "    affinity: source\n    icmp_echo: pass\n"))
	if vips, err := daemonMaps(t, l, testRing).VIPs(); err != nil || len(vips) != 0 {
		t.Fatalf("VIP entries after icmp_echo: pass: %v (%v), want none", vips, err)
	}
	if ping(t, l, 2) {
		t.Fatal("an echo reply from the VIP with icmp_echo: pass")
	}
}
