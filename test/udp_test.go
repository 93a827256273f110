package test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/lab"
)

// serveUDP answers every datagram to addr on h with "HOST: payload".
func serveUDP(t *testing.T, h *lab.Host, addr netip.AddrPort) {
	t.Helper()
	pc, err := h.ListenPacket("udp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(append([]byte(h.Name+": "), buf[:n]...), from)
		}
	}()
}

// udpEcho sends one datagram from the client to vip and returns the
// answer's "HOST: " prefix, or an error after a second.
func udpEcho(t *testing.T, l *lab.Lab, src netip.Addr, vip netip.AddrPort) (string, error) {
	t.Helper()
	c, err := l.Client.Dial(context.Background(), "udp4", src, vip.String())
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("hello")); err != nil {
		return "", err
	}
	buf := make([]byte, 2048)
	n, err := c.Read(buf)
	if err != nil {
		return "", err
	}
	host, _, _ := strings.Cut(string(buf[:n]), ":")
	return host, nil
}

// TestUDPServiceHealth is what an operator hit: a UDP service added with
// the CLI got a TCP connect check, so every backend was down and its
// packets dropped. A UDP service now has no check by default, and its
// datagrams reach the backends; a udp check takes a backend whose port is
// closed (ICMP port unreachable) out, and keeps the one that answers.
func TestUDPServiceHealth(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 2, Clients: 4})
	for _, be := range l.Backends {
		serveEcho(t, l, be)
	}
	d := startDaemon(t, l, chatConfig(l, l.Backends))
	vip := netip.AddrPortFrom(l.VIP4, 9000)
	be1, be2 := l.Backends[0], l.Backends[1]
	// be1 serves UDP on the VIP (for clients, dsr) and on its own address
	// (for the udp check); be2 on neither.
	serveUDP(t, be1, vip)
	serveUDP(t, be1, netip.AddrPortFrom(be1.Addr4, 9000))

	for _, args := range [][]string{
		{"vip", "add", vip.String(), "--protocol", "udp"},
		{"backend", "add", vip.String(), be1.Addr4.String()},
	} {
		if out, errOut, code := d.cli(args...); code != 0 {
			t.Fatalf("tether %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
		}
	}
	// Three intervals of the default check, had there been one.
	time.Sleep(2500 * time.Millisecond)
	backends := func(ref string) map[string]control.BackendStatus {
		t.Helper()
		out, errOut, code := d.cli("backend", "ls", "-o", "json", ref)
		if code != 0 {
			t.Fatalf("backend ls: %s", errOut)
		}
		var svc control.ServiceStatus
		if err := json.Unmarshal([]byte(out), &svc); err != nil {
			t.Fatalf("backend ls -o json: %v\n%s", err, out)
		}
		byAddr := map[string]control.BackendStatus{}
		for _, b := range svc.Backends {
			byAddr[b.Address] = b
		}
		if svc.Health.Type == "" {
			t.Fatalf("no health type in %s", out)
		}
		return byAddr
	}
	b := backends(vip.String())[netip.AddrPortFrom(be1.Addr4, 9000).String()]
	if b.State != "active" {
		t.Fatalf("the backend of a udp service without a check is %s (health %+v), want active", b.State, b.Health)
	}
	for _, src := range l.ClientAddrs4 {
		if host, err := udpEcho(t, l, src, vip); err != nil || host != be1.Name {
			t.Fatalf("datagram from %s through %s: %q, %v; want an answer from %s", src, vip, host, err, be1.Name)
		}
	}

	// With a udp check, the closed port of be2 takes it down; be1 stays.
	vipCheck := netip.AddrPortFrom(l.VIP4, 9001)
	serveUDP(t, be1, netip.AddrPortFrom(be1.Addr4, 9001))
	for _, args := range [][]string{
		{"vip", "add", vipCheck.String(), "--protocol", "udp", "--health-type", "udp", "--health-interval", "200ms", "--health-timeout", "100ms"},
		{"backend", "add", vipCheck.String(), be1.Addr4.String()},
		{"backend", "add", vipCheck.String(), be2.Addr4.String()},
	} {
		if out, errOut, code := d.cli(args...); code != 0 {
			t.Fatalf("tether %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		bs := backends(vipCheck.String())
		up, down := bs[netip.AddrPortFrom(be1.Addr4, 9001).String()], bs[netip.AddrPortFrom(be2.Addr4, 9001).String()]
		if up.State == "active" && down.State == "down" {
			if !strings.Contains(fmt.Sprint(down.Health), "port unreachable") {
				t.Errorf("be2 down for %+v, want port unreachable", down.Health)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 5s: be1 %s (%+v), be2 %s (%+v); want active and down", up.State, up.Health, down.State, down.Health)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
