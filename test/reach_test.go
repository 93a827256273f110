package test

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/lab"
)

// TestBackendThatDoesNotAnswer starts tether with a backend whose host is
// not there yet (nothing answers ARP for its address): the daemon starts,
// plans that backend down as unreachable, and serves every client on the
// others. When the host comes up, the backend takes new clients without a
// reload, and the connections made before it are not disturbed.
func TestBackendThatDoesNotAnswer(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 2, Clients: 60})
	for _, be := range l.Backends {
		serveEcho(t, l, be)
	}
	absent := netip.AddrFrom4([4]byte{198, 51, 100, 13}) // the lab's third backend, not added yet
	health := fmt.Sprintf("{type: tcp, interval: %s, timeout: %s, rise: %d, fall: %d}", hcInterval, hcTimeout, hcRise, hcFall)
	cfg := healthConfig(l, l.Backends, health)
	cfg = strings.Replace(cfg, "    backends:\n", "    backends:\n      - address: "+absent.String()+"\n", 1)
	d := startDaemon(t, l, cfg)
	api := control.NewClient(d.socket)
	vip := netip.AddrPortFrom(l.VIP4, chatPort).String()
	addr := netip.AddrPortFrom(absent, chatPort).String()
	backend := func() control.BackendStatus {
		for _, b := range service(t, api, vip).Backends {
			if b.Address == addr {
				return b
			}
		}
		t.Fatalf("%s has no backend %s", vip, addr)
		return control.BackendStatus{}
	}
	s := service(t, api, vip)
	if s.State != control.ServiceUp {
		t.Fatalf("service %s is %s, want up on its other backends", vip, s.State)
	}
	for _, b := range s.Backends {
		want := "active"
		if b.Address == addr {
			want = "down"
			if !strings.Contains(b.Unreachable, "does not answer ARP/ND") {
				t.Errorf("absent backend: unreachable %q, want why", b.Unreachable)
			}
		}
		if b.State != want {
			t.Errorf("backend %s is %s, want %s", b.Address, b.State, want)
		}
	}
	if out := d.mustCLI("status"); !strings.Contains(out, "down (unreachable)") {
		t.Errorf("tether status does not say the backend is unreachable:\n%s", out)
	}
	before := dialAll(t, l, l.ClientAddrs4[:30], l.VIP4, 1)
	for _, c := range before {
		if c.backend != l.Backends[0].Name && c.backend != l.Backends[1].Name {
			t.Fatalf("client %s reached %q", c.src, c.backend)
		}
	}

	be3, err := l.AddBackend()
	if err != nil {
		t.Fatal(err)
	}
	if be3.Addr4 != absent {
		t.Fatalf("the lab's third backend is %s, want %s", be3.Addr4, absent)
	}
	serveEcho(t, l, be3)
	took := waitFor(t, "the backend active once its host is up", 30*time.Second, func() bool {
		b := backend()
		return b.State == "active" && b.Unreachable == ""
	})
	t.Logf("active %v after its host came up", took.Round(10*time.Millisecond))
	if !strings.Contains(d.proc.Output(), "backend answers ARP/ND now") {
		t.Errorf("the daemon did not log the backend answering:\n%s", d.proc.Output())
	}
	echoAll(t, before, "after the backend came up")
	after := dialAll(t, l, l.ClientAddrs4[30:], l.VIP4, 1)
	n := 0
	for _, c := range after {
		if c.backend == be3.Name {
			n++
		}
	}
	if n == 0 {
		t.Errorf("none of %d new clients reached %s", len(after), be3.Name)
	}
	t.Logf("%d of %d new clients on %s", n, len(after), be3.Name)
}
