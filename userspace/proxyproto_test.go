package userspace

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"
)

func TestProxyHeaderBytes(t *testing.T) {
	for _, tc := range []struct {
		desc        string
		client, vip string
		want        []byte
	}{
		{
			"TCP over IPv4", "192.0.2.10:51000", "203.0.113.10:8765",
			[]byte("\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" +
				"\xc0\x00\x02\x0a" + "\xcb\x00\x71\x0a" + "\xc7\x38" + "\x22\x3d"),
		},
		{
			"TCP over IPv6", "[2001:db8:c::a]:51000", "[2001:db8:f::10]:443",
			[]byte("\r\n\r\n\x00\r\nQUIT\n\x21\x21\x00\x24" +
				"\x20\x01\x0d\xb8\x00\x0c\x00\x00\x00\x00\x00\x00\x00\x00\x00\x0a" +
				"\x20\x01\x0d\xb8\x00\x0f\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10" +
				"\xc7\x38" + "\x01\xbb"),
		},
		{
			"IPv4-mapped addresses are IPv4", "[::ffff:192.0.2.10]:51000", "203.0.113.10:8765",
			[]byte("\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" +
				"\xc0\x00\x02\x0a" + "\xcb\x00\x71\x0a" + "\xc7\x38" + "\x22\x3d"),
		},
	} {
		client, vip := netip.MustParseAddrPort(tc.client), netip.MustParseAddrPort(tc.vip)
		got := appendProxyHeader(nil, client, vip)
		if !bytes.Equal(got, tc.want) {
			t.Errorf("%s: header\n%q\nwant\n%q", tc.desc, got, tc.want)
			continue
		}
		src, dst, err := readProxyHeader(bytes.NewReader(got))
		if err != nil || src != netip.AddrPortFrom(client.Addr().Unmap(), client.Port()) || dst != vip {
			t.Errorf("%s: parsed back as %s %s %v", tc.desc, src, dst, err)
		}
	}
}

// TestProxyProtocolLoopback checks, without privileges, that a backend
// behind a service with ProxyProtocol learns each client's address and
// port, over IPv4 (several loopback sources) and IPv6 (::1), and that the
// client's bytes follow the header.
func TestProxyProtocolLoopback(t *testing.T) {
	for _, tc := range []struct {
		vip, backend string
		srcs         []netip.Addr
	}{
		{loopVIP.String(), "127.0.0.1:0", []netip.Addr{netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("127.0.0.3"), netip.MustParseAddr("127.0.0.4")}},
		{"::1", "[::1]:0", []netip.Addr{netip.MustParseAddr("::1")}},
	} {
		be := listenServe(t, tc.backend, func(c net.Conn) {
			c.SetDeadline(time.Now().Add(5 * time.Second))
			r := bufio.NewReader(c)
			src, dst, err := readProxyHeader(r)
			if err != nil {
				fmt.Fprintf(c, "error: %v\n", err)
				return
			}
			line, _ := r.ReadString('\n')
			fmt.Fprintf(c, "%s %s %s", src, dst, line)
		})
		p := newProxy(t, Options{})
		vip := netip.AddrPortFrom(netip.MustParseAddr(tc.vip), freePort(t, tc.vip))
		s := loopService(t, 1, vip, false, be)
		s.ProxyProtocol = true
		if err := p.UpsertService(s); err != nil {
			t.Fatal(err)
		}
		for _, src := range tc.srcs {
			c := dial(t, src, vip)
			c.SetDeadline(time.Now().Add(5 * time.Second))
			fmt.Fprintf(c, "payload\n")
			line, err := bufio.NewReader(c).ReadString('\n')
			if err != nil {
				t.Fatal(err)
			}
			if want := fmt.Sprintf("%s %s payload\n", c.LocalAddr(), vip); line != want {
				t.Fatalf("backend answered %q, want %q", line, want)
			}
		}
	}
}
