package control

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"

	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/maglev"
)

// hostsConfig is a configuration of three services (two IPv4, one IPv6)
// with backends of several weights, its services listed in the order
// order gives and each one's backends in the order perm gives.
func hostsConfig(order []int, perm func(n int) []int) string {
	var b strings.Builder
	b.WriteString("interfaces: [eth0]\ntables: {ring_size: 4099}\nservices:\n")
	svcs := []struct {
		vip, affinity string
		backends      []string
	}{
		{"203.0.113.10", "source", []string{"198.51.100.11", "198.51.100.12", "198.51.100.13", "198.51.100.14", "198.51.100.15"}},
		{"203.0.113.11", "connection", []string{"198.51.100.21", "198.51.100.22", "198.51.100.23", "198.51.100.24", "198.51.100.25", "198.51.100.26", "198.51.100.27"}},
		{"2001:db8:f::10", "source", []string{"2001:db8:100::b", "2001:db8:100::c", "2001:db8:100::d", "2001:db8:100::e"}},
	}
	for _, i := range order {
		s := svcs[i]
		fmt.Fprintf(&b, "  - name: s%d\n    vip: %s\n    port: 8765\n    affinity: %s\n    backends:\n", i, s.vip, s.affinity)
		for _, j := range perm(len(s.backends)) {
			fmt.Fprintf(&b, "      - {address: %s, weight: %d}\n", s.backends[j], 1+j%3)
		}
	}
	return b.String()
}

// TestSameBackendOnEveryHost: hosts that serve the same services with the
// same backends choose the same backend for every flow, however each
// learned them: configurations listed in different orders, backends added
// one reload at a time, removed and added again (so that each host gave
// its backends other ids). Their rings, read as backend addresses, are
// equal slot for slot, and 100,000 clients of each service reach the same
// backend on every host.
func TestSameBackendOnEveryHost(t *testing.T) {
	identity := func(n int) []int {
		out := make([]int, n)
		for i := range out {
			out[i] = i
		}
		return out
	}
	reversed := func(n int) []int {
		out := identity(n)
		for i, j := 0, n-1; i < j; i, j = i+1, j-1 {
			out[i], out[j] = out[j], out[i]
		}
		return out
	}
	r := rand.New(rand.NewPCG(1, 2))
	shuffled := func(n int) []int { return r.Perm(n) }
	firstN := func(k int) func(int) []int {
		return func(n int) []int { return identity(n)[:min(k, n)] }
	}
	type host struct {
		name string
		dp   *fakeDP
	}
	apply := func(name string, steps ...string) host {
		t.Helper()
		dp := newFakeDP()
		var c *Controller
		for _, data := range steps {
			cfg := parse(t, data)
			if c == nil {
				c = newController(dp, cfg)
			}
			if err := c.Apply(cfg); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
		}
		return host{name, dp}
	}
	full := hostsConfig([]int{0, 1, 2}, identity)
	hosts := []host{
		apply("in file order", full),
		apply("reversed", hostsConfig([]int{2, 1, 0}, reversed)),
		apply("shuffled", hostsConfig([]int{1, 2, 0}, shuffled)),
		// Backends added one at a time, in another order than the file's.
		apply("grown", hostsConfig([]int{2}, firstN(1)), hostsConfig([]int{2, 0}, firstN(2)),
			hostsConfig([]int{2, 0, 1}, firstN(4)), hostsConfig([]int{1, 0, 2}, shuffled)),
		// Every backend removed and the services added back.
		apply("re-added", full, hostsConfig([]int{0}, firstN(1)), hostsConfig([]int{2, 0, 1}, reversed)),
	}

	// A service's ring as the backends' addresses, by VIP.
	rings := func(h host) map[netip.Addr][]netip.AddrPort {
		out := make(map[netip.Addr][]netip.AddrPort)
		for _, s := range h.dp.installed {
			addr := make(map[uint32]netip.AddrPort, len(s.Backends))
			for _, b := range s.Backends {
				addr[b.ID] = netip.AddrPortFrom(b.Addr, b.Port)
			}
			ring := make([]netip.AddrPort, len(s.Ring))
			for i, id := range s.Ring {
				ring[i] = addr[id]
			}
			out[s.VIP] = ring
		}
		return out
	}
	ids := func(h host) map[netip.Addr]uint32 {
		out := make(map[netip.Addr]uint32)
		for _, s := range h.dp.installed {
			for _, b := range s.Backends {
				out[b.Addr] = b.ID
			}
		}
		return out
	}
	want := rings(hosts[0])
	if len(want) != 3 {
		t.Fatalf("host %s serves %d services, want 3", hosts[0].name, len(want))
	}
	differentIDs := 0
	for _, h := range hosts[1:] {
		got := rings(h)
		for vip, ring := range want {
			if len(got[vip]) != len(ring) {
				t.Fatalf("%s: ring of %s has %d slots, want %d", h.name, vip, len(got[vip]), len(ring))
			}
			for i := range ring {
				if got[vip][i] != ring[i] {
					t.Fatalf("%s: slot %d of %s's ring is %s, %s has %s", h.name, i, vip, got[vip][i], hosts[0].name, ring[i])
				}
			}
		}
		a, b := ids(hosts[0]), ids(h)
		for addr, id := range a {
			if b[addr] != id {
				differentIDs++
			}
		}
	}
	if differentIDs == 0 {
		t.Fatal("every host gave every backend the same id: the test shows nothing about ids")
	}
	t.Logf("%d backend ids differ between hosts; every ring is the same slot for slot", differentIDs)

	// 100,000 clients per service, through each host's ring and the
	// datapath's hash (the BPF program's, as bpf's tests check).
	seed := parse(t, full).HashSeed
	for _, s := range hosts[0].dp.installed {
		chosen := make([][]netip.AddrPort, len(hosts))
		for hi, h := range hosts {
			var svc datapath.Service
			for _, o := range h.dp.installed {
				if o.VIP == s.VIP {
					svc = o
				}
			}
			addr := make(map[uint32]netip.AddrPort)
			for _, b := range svc.Backends {
				addr[b.ID] = netip.AddrPortFrom(b.Addr, b.Port)
			}
			cr := rand.New(rand.NewPCG(7, 7))
			for range 100_000 {
				client := randomClient(cr, s.VIP.Is4())
				var hash uint32
				if svc.SourceAffinity {
					hash = maglev.SourceHash(seed, client)
				} else {
					hash = maglev.ConnHash(seed, client, uint16(cr.IntN(64512)+1024), svc.Port, svc.Proto)
				}
				chosen[hi] = append(chosen[hi], addr[maglev.Lookup(svc.Ring, hash)])
			}
		}
		for hi := 1; hi < len(hosts); hi++ {
			for i := range chosen[0] {
				if chosen[hi][i] != chosen[0][i] || !chosen[0][i].IsValid() {
					t.Fatalf("service %s, client %d: %s chose %s, %s chose %s", s.VIP, i, hosts[hi].name, chosen[hi][i], hosts[0].name, chosen[0][i])
				}
			}
		}
	}
}

// randomClient is a random client address of the family: only hashed,
// never sent to (IPv6 ones are in 2001:db8::/32).
func randomClient(r *rand.Rand, v4 bool) netip.Addr {
	if v4 {
		return netip.AddrFrom4([4]byte{byte(r.IntN(224)), byte(r.IntN(256)), byte(r.IntN(256)), byte(r.IntN(256))})
	}
	var a [16]byte
	a[0], a[1], a[2], a[3] = 0x20, 0x01, 0x0d, 0xb8
	for i := 4; i < 16; i++ {
		a[i] = byte(r.IntN(256))
	}
	return netip.AddrFrom16(a)
}
