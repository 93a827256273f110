package test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/lab"
)

// TestPathMTUThroughTether: a client behind a router whose link to it has
// a smaller MTU (1200) than the rest of the path, and which advertises a
// full-size MSS, gets large WebSocket echoes from the backends: the
// router's "fragmentation needed", sent to the VIP, reaches the backend
// that holds the connection through tether (as the flow's packets do, in
// dsr and ipip), the backend lowers its path MTU to the client to 1200 and
// resends. Without that the backend's full-size segments vanish and the
// transfer stalls. With nat and fullnat the error's destination and
// quoted reply are translated to what the backend sent.
func TestPathMTUThroughTether(t *testing.T) {
	for _, mode := range []string{config.ForwardingDSR, config.ForwardingIPIP, config.ForwardingNAT, config.ForwardingFullNAT} {
		t.Run(mode, func(t *testing.T) {
			translated := mode == config.ForwardingNAT || mode == config.ForwardingFullNAT
			l := lab.NewT(t, lab.Options{Backends: 2, Clients: 1, Plain: translated})
			far, err := l.AddFarClient(1200)
			if err != nil {
				t.Fatal(err)
			}
			if mode != config.ForwardingDSR {
				if err := l.Balancer.Sysctl("net/ipv4/conf/all/forwarding", "1"); err != nil {
					t.Fatal(err)
				}
				// The program sends translated replies to the client's
				// next hop, the client host.
				if err := l.Balancer.Run("ip", "route", "add", lab.FarClientNet.String(), "via", l.Client.Addr4.String()); err != nil {
					t.Fatal(err)
				}
			}
			for _, be := range l.Backends {
				switch mode {
				case config.ForwardingIPIP:
					decapSetup(t, be, mode, l.VIP4)
				case config.ForwardingNAT:
					if err := be.Run("ip", "route", "replace", lab.FarClientNet.String(), "via", l.Balancer.Addr4.String()); err != nil {
						t.Fatal(err)
					}
				}
				if translated {
					serveEchoOn(t, be, be.Addr4)
				} else {
					serveEcho(t, l, be)
				}
			}
			b := labConfig()
			fmt.Fprintf(b, "  - name: chat\n    vip: %s\n    port: %d\n    forwarding: %s\n    backends:\n", l.VIP4, chatPort, mode)
			for _, be := range l.Backends {
				fmt.Fprintf(b, "      - {address: %s}\n", be.Addr4)
			}
			d := startDaemon(t, l, b.String())
			api := control.NewClient(d.socket)
			waitFor(t, "the service up", 10*time.Second, func() bool {
				return service(t, api, fmt.Sprintf("%s:%d", l.VIP4, chatPort)).State == control.ServiceUp
			})

			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			ws, err := lab.DialWS(ctx, far, far.Addr4, fmt.Sprintf("ws://%s:%d/", l.VIP4, chatPort))
			if err != nil {
				t.Fatal(err)
			}
			defer ws.Close()
			msg := strings.Repeat("0123456789", 3000) // 30,000 bytes: about 21 full-size segments back
			start := time.Now()
			var backend string
			for i := range 20 {
				if backend, err = ws.Echo(ctx, msg); err != nil {
					t.Fatalf("echo %d of 30,000 bytes after %v: %v", i, time.Since(start), err)
				}
			}
			t.Logf("20 echoes of 30,000 bytes from %s to the client behind the 1200-byte link in %v", backend, time.Since(start).Round(time.Millisecond))
			for _, be := range l.Backends {
				if be.Name != backend {
					continue
				}
				// fullnat: the backend's peer is the balancer.
				peer := far.Addr4
				if mode == config.ForwardingFullNAT {
					peer = l.Balancer.Addr4
				}
				out, err := be.Command("ip", "-4", "route", "get", peer.String()).CombinedOutput()
				if err != nil || !strings.Contains(string(out), "mtu 1200") {
					t.Errorf("%s's route to its peer %s: %q (%v), want the learned mtu 1200", be.Name, peer, out, err)
				}
			}
			reasons, err := daemonMaps(t, l, testRing).Reasons()
			if err != nil {
				t.Fatal(err)
			}
			if reasons["pass_icmp_no_flow"] != 0 {
				t.Errorf("ICMP errors the program could not place: %d", reasons["pass_icmp_no_flow"])
			}
		})
	}
}
