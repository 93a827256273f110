package test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tetherlb/tether/bpf"
	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/maps"
)

// cli runs the tether CLI against the daemon's socket and returns its
// stdout, stderr and exit code. It runs in the test's own namespace: the
// CLI only talks to the socket.
func (d *daemon) cli(args ...string) (stdout, stderr string, code int) {
	d.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, tetherBin, append([]string{"--socket", d.socket}, args...)...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		code = exit.ExitCode()
	case err != nil:
		d.t.Fatalf("tether %s: %v", strings.Join(args, " "), err)
	}
	return out.String(), errOut.String(), code
}

// mustCLI runs the CLI and fails the test unless it exits 0.
func (d *daemon) mustCLI(args ...string) string {
	d.t.Helper()
	out, errOut, code := d.cli(args...)
	if code != 0 {
		d.t.Fatalf("tether %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

// cliJSON runs a listing command with -o json and decodes its output.
func (d *daemon) cliJSON(v any, args ...string) {
	d.t.Helper()
	out := d.mustCLI(append(args, "-o", "json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		d.t.Fatalf("tether %s -o json: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// mapsSnapshot dumps the services, backends and rings the XDP program
// reads, so that two snapshots compare equal exactly when the running
// state is the same.
func mapsSnapshot(t *testing.T, m *maps.Maps) string {
	t.Helper()
	var lines []string
	var ids []uint32
	raw := m.Raw()
	for name, mp := range map[string]*ebpf.Map{"services4": raw.Services4, "services6": raw.Services6} {
		var k []byte
		var v bpf.TetherService
		it := mp.Iterate()
		for it.Next(&k, &v) {
			lines = append(lines, fmt.Sprintf("%s %x: id %d flags %d timeout %d ring signature %08x%08x", name, k, v.Id, v.Flags, v.AffinityTimeoutNs, v.RingSigHi, v.RingSigLo))
			ids = append(ids, v.Id)
		}
		if err := it.Err(); err != nil {
			t.Fatal(err)
		}
	}
	var id uint32
	var b bpf.TetherBackend
	it := raw.Backends.Iterate()
	for it.Next(&id, &b) {
		if b.State != maps.StateUnused {
			lines = append(lines, fmt.Sprintf("backend %d: %+v", id, b))
		}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		ring, err := m.Ring(id)
		if err != nil {
			t.Fatal(err)
		}
		lines = append(lines, fmt.Sprintf("ring %d: %s", id, ringSummary(ring)))
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// ringSummary is the slots per backend id and a digest of the ring.
func ringSummary(ring []uint32) string {
	per := map[uint32]int{}
	h := sha256.New()
	for _, id := range ring {
		per[id]++
		fmt.Fprintf(h, "%d,", id)
	}
	return fmt.Sprintf("slots per backend %v, sha256 %x", per, h.Sum(nil)[:8])
}

// checkRingHoldsBackends checks that service s's ring holds exactly the
// ids of its backends in status (those that take new connections).
func checkRingHoldsBackends(t *testing.T, m *maps.Maps, s control.ServiceStatus, when string) {
	t.Helper()
	var ids []uint32
	for _, b := range s.Backends {
		ids = append(ids, b.ID)
	}
	slices.Sort(ids)
	if ring := ringIDs(t, m, s.ID); !slices.Equal(ring, ids) {
		t.Errorf("service %s %s: the ring holds %v, want the backends %v", s.Name, when, ring, ids)
	}
}

// ringIDs is the set of backend ids a ring holds, sorted.
func ringIDs(t *testing.T, m *maps.Maps, service uint32) []uint32 {
	t.Helper()
	ring, err := m.Ring(service)
	if err != nil {
		t.Fatal(err)
	}
	var ids []uint32
	for _, id := range ring {
		if id != 0 && !slices.Contains(ids, id) {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids
}

// TestCLIRefusesBadInput sends bad commands and requests to a running
// daemon: each is refused with exit code 1 (2 for a bad command line) and
// the field or argument named, and afterwards the BPF maps (services,
// backends, rings) and the configuration file are exactly as before.
func TestCLIRefusesBadInput(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 2, Clients: 1})
	for _, be := range l.Backends {
		serveEcho(t, l, be) // up by their health checks, which then change nothing
	}
	cfg := chatConfig(l, l.Backends)
	d := startDaemon(t, l, cfg)
	m := daemonMaps(t, l, testRing)
	state := mapsSnapshot(t, m)
	file, err := os.ReadFile(d.config)
	if err != nil {
		t.Fatal(err)
	}
	writeFile := func(data []byte) {
		t.Helper()
		if err := os.WriteFile(d.config, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// holding returns a setup that writes data to the file, and puts the
	// original back afterwards.
	holding := func(data string) func() func() {
		return func() func() {
			writeFile([]byte(data))
			return func() { writeFile(file) }
		}
	}
	api := control.NewClient(d.socket)
	ctx := context.Background()
	const vip, be1 = "203.0.113.10:8765", "198.51.100.11"

	for _, tc := range []struct {
		desc  string
		setup func() (undo func()) // optional
		args  []string             // the CLI command
		api   func() error         // or an API call
		code  int
		want  []string // in stderr, or in the API error's message and field
	}{
		// Bad command lines: usage errors.
		{desc: "vip add without VIP", args: []string{"vip", "add"}, code: 2, want: []string{"vip add needs VIP:PORT"}},
		{desc: "vip add with two VIPs", args: []string{"vip", "add", vip, "203.0.113.11:80"}, code: 2, want: []string{"vip add takes VIP:PORT"}},
		{desc: "unknown flag", args: []string{"vip", "add", "203.0.113.20:80", "--colour", "blue"}, code: 2, want: []string{"colour"}},
		{desc: "unknown output format", args: []string{"vip", "ls", "-o", "yaml"}, code: 2, want: []string{`-o: "yaml"`}},
		{desc: "backend add without backend", args: []string{"backend", "add", vip}, code: 2, want: []string{"backend add needs VIP:PORT ADDR[:PORT]"}},
		{desc: "weight that is not a number", args: []string{"backend", "add", vip, "198.51.100.13", "--weight", "three"}, code: 2, want: []string{"weight"}},
		{desc: "unknown subcommand", args: []string{"backend", "evict", vip, be1}, code: 2, want: []string{`no subcommand "evict"`}},
		{desc: "interval without watch", args: []string{"stats", "--interval", "2s"}, code: 2, want: []string{"--interval goes with --watch"}},

		// Refused by the daemon: exit 1, the field named.
		{desc: "VIP without port", args: []string{"vip", "add", "203.0.113.20"}, code: 1, want: []string{"vip:", "not a service address"}},
		{desc: "port 0", args: []string{"vip", "add", "203.0.113.20:0"}, code: 1, want: []string{"vip:", "port 0 is out of range 1..65535"}},
		{desc: "port above 65535", args: []string{"vip", "add", "203.0.113.20:65536"}, code: 1, want: []string{"vip:", "port 65536 is out of range"}},
		{desc: "bad VIP address", args: []string{"vip", "add", "203.0.113.300:80"}, code: 1, want: []string{"vip:", `"203.0.113.300" is not an IP address`}},
		{desc: "loopback VIP", args: []string{"vip", "add", "127.0.0.1:80"}, code: 1, want: []string{"vip:", "loopback"}},
		{desc: "duplicate VIP", args: []string{"vip", "add", vip}, code: 1, want: []string{"vip:", "already the service chat"}},
		{desc: "duplicate name", args: []string{"vip", "add", "203.0.113.20:80", "--name", "chat6"}, code: 1, want: []string{"name:", "already the name"}},
		{desc: "bad name", args: []string{"vip", "add", "203.0.113.20:80", "--name", "Chat!"}, code: 1, want: []string{"name:", "not a service name"}},
		{desc: "unknown protocol", args: []string{"vip", "add", "203.0.113.20:80", "--protocol", "sctp"}, code: 1, want: []string{"protocol:", "unknown protocol"}},
		{desc: "unknown affinity", args: []string{"vip", "add", "203.0.113.20:80", "--affinity", "sticky"}, code: 1, want: []string{"affinity:", "unknown mode"}},
		{desc: "affinity timeout that does not parse", args: []string{"vip", "add", "203.0.113.20:80", "--affinity-timeout", "3 hours"}, code: 1, want: []string{"affinity_timeout:", "not a duration"}},
		{desc: "affinity timeout out of range", args: []string{"vip", "add", "203.0.113.20:80", "--affinity-timeout", "800h"}, code: 1, want: []string{"affinity_timeout:", "out of range"}},
		{desc: "ipip on a host that does not forward", args: []string{"vip", "add", "203.0.113.20:80", "--forwarding", "ipip"}, code: 1, want: []string{"forwarding ipip needs IP forwarding", "sysctl -w net.ipv4.conf.all.forwarding=1", "the running state is unchanged"}},
		{desc: "tunnel source with host bits", args: []string{"vip", "add", "203.0.113.20:80", "--forwarding", "gue", "--tunnel-source", "198.51.100.1/24"}, code: 1, want: []string{"tunnel_source:", "has host bits set"}},
		{desc: "gue port of an ipip service", args: []string{"vip", "add", "203.0.113.20:80", "--forwarding", "ipip", "--gue-port", "5555"}, code: 1, want: []string{"gue_port:", "only forwarding gue"}},
		{desc: "nat on a host that does not forward", args: []string{"vip", "add", "203.0.113.20:80", "--forwarding", "nat"}, code: 1, want: []string{"forwarding nat needs IP forwarding", "sysctl -w net.ipv4.conf.all.forwarding=1", "the running state is unchanged"}},
		{desc: "snat address not of this host", args: []string{"vip", "add", "203.0.113.20:80", "--forwarding", "fullnat", "--snat-address", "198.51.100.99"}, code: 1, want: []string{"snat_address 198.51.100.99 is not an address of this host", "the running state is unchanged"}},
		{desc: "snat address of a nat service", args: []string{"vip", "add", "203.0.113.20:80", "--forwarding", "nat", "--snat-address", "198.51.100.2"}, code: 1, want: []string{"snat_address:", "only forwarding fullnat"}},
		{desc: "unknown forwarding", args: []string{"vip", "add", "203.0.113.20:80", "--forwarding", "magic"}, code: 1, want: []string{"forwarding:", "unknown mode"}},
		{desc: "upper-case protocol", args: []string{"vip", "add", "203.0.113.20:80", "--protocol", "UDP"}, code: 1, want: []string{"protocol:", `unknown protocol "UDP"`}},
		{desc: "udp check of a tcp service", args: []string{"vip", "add", "203.0.113.20:80", "--health-type", "udp"}, code: 1, want: []string{"health.type:", "a tcp service does not answer"}},
		{desc: "remove a VIP that does not exist", args: []string{"vip", "rm", "203.0.113.99:80"}, code: 1, want: []string{"service:", "no service 203.0.113.99:80"}},
		{desc: "backend for a missing VIP", args: []string{"backend", "add", "203.0.113.99:8765", "198.51.100.13"}, code: 1, want: []string{"service:", "no service 203.0.113.99:8765"}},
		{desc: "duplicate backend", args: []string{"backend", "add", vip, be1}, code: 1, want: []string{"backend:", "already a backend of chat"}},
		{desc: "negative weight", args: []string{"backend", "add", vip, "198.51.100.13", "--weight", "-1"}, code: 1, want: []string{"weight:", "-1 is out of range 0..10000"}},
		{desc: "weight too big", args: []string{"backend", "add", vip, "198.51.100.13", "--weight", "10001"}, code: 1, want: []string{"weight:", "out of range"}},
		{desc: "dsr port mismatch", args: []string{"backend", "add", vip, "198.51.100.13:9000"}, code: 1, want: []string{"services[0].backends[2].port", "dsr"}},
		{desc: "backend port above 65535", args: []string{"backend", "add", vip, "198.51.100.13:70000"}, code: 1, want: []string{"backend:", "port 70000 is out of range"}},
		{desc: "backend of the other family", args: []string{"backend", "add", vip, "2001:db8:100::13"}, code: 1, want: []string{"services[0].backends[2].address", "IPv6"}},
		{desc: "multicast backend", args: []string{"backend", "add", vip, "224.0.0.1"}, code: 1, want: []string{"services[0].backends[2].address", "multicast"}},
		{desc: "the service as its own backend", args: []string{"backend", "add", vip, "203.0.113.10"}, code: 1, want: []string{"services[0].backends[2]", "the service itself"}},
		{desc: "backend without a route (the datapath fails)", args: []string{"backend", "add", vip, "203.0.113.77"}, code: 1, want: []string{"203.0.113.77", "running state is unchanged"}},

		// Backends the configuration cannot tell apart from hosts: the
		// datapath refuses them as it applies them (issue 14).
		{desc: "broadcast address of the backends' subnet", args: []string{"backend", "add", vip, "198.51.100.255"}, code: 1, want: []string{"198.51.100.255 is the broadcast address of 198.51.100.0/24", "running state is unchanged"}},
		{desc: "network address of the backends' subnet", args: []string{"backend", "add", vip, "198.51.100.0"}, code: 1, want: []string{"198.51.100.0 is the network address of 198.51.100.0/24"}},
		{desc: "the balancer's own address", args: []string{"backend", "add", vip, "198.51.100.2"}, code: 1, want: []string{"198.51.100.2 is an address of this host"}},
		{desc: "API: the balancer's own address", api: func() error {
			_, err := api.AddBackend(ctx, control.BackendSpec{Service: vip, Backend: "198.51.100.2"})
			return err
		}, code: 1, want: []string{"198.51.100.2 is an address of this host"}},
		{desc: "a neighbour with a broadcast MAC", setup: func() func() {
			neigh := []string{"neigh", "replace", "198.51.100.50", "lladdr", "ff:ff:ff:ff:ff:ff", "dev", "eth0", "nud", "permanent"}
			if err := l.Balancer.Run("ip", neigh...); err != nil {
				t.Fatal(err)
			}
			return func() { l.Balancer.Run("ip", "neigh", "del", "198.51.100.50", "dev", "eth0") }
		}, args: []string{"backend", "add", vip, "198.51.100.50"}, code: 1, want: []string{"resolves to ff:ff:ff:ff:ff:ff, a broadcast or multicast MAC address"}},
		{desc: "a neighbour with a multicast MAC", setup: func() func() {
			neigh := []string{"neigh", "replace", "198.51.100.51", "lladdr", "01:00:5e:00:00:01", "dev", "eth0", "nud", "permanent"}
			if err := l.Balancer.Run("ip", neigh...); err != nil {
				t.Fatal(err)
			}
			return func() { l.Balancer.Run("ip", "neigh", "del", "198.51.100.51", "dev", "eth0") }
		}, args: []string{"backend", "add", vip, "198.51.100.51"}, code: 1, want: []string{"resolves to 01:00:5e:00:00:01"}},
		{desc: "a backend behind a NOARP device", setup: func() func() {
			for _, args := range [][]string{
				{"link", "add", "noarp0", "type", "veth", "peer", "name", "noarp1"}, {"link", "set", "noarp0", "arp", "off", "up"},
				{"route", "add", "203.0.113.99/32", "dev", "noarp0"},
			} {
				if err := l.Balancer.Run("ip", args...); err != nil {
					t.Fatal(err)
				}
			}
			return func() { l.Balancer.Run("ip", "link", "del", "noarp0") }
		}, args: []string{"backend", "add", vip, "203.0.113.99"}, code: 1, want: []string{"noarp0, which does no ARP"}},
		{desc: "a loopback backend with XDP", args: []string{"backend", "add", vip, "127.0.0.1"}, code: 1, want: []string{"127.0.0.1 is a loopback address"}},
		{desc: "reload of a file with the broadcast address as a backend", setup: holding(strings.Replace(cfg, "- address: 198.51.100.12", "- address: 198.51.100.255", 1)),
			args: []string{"reload"}, code: 1, want: []string{"198.51.100.255 is the broadcast address", "running state is unchanged"}},
		{desc: "reload of a file with the balancer as a backend", setup: holding(strings.Replace(cfg, "- address: 198.51.100.12", "- address: 198.51.100.2", 1)),
			args: []string{"reload"}, code: 1, want: []string{"198.51.100.2 is an address of this host"}},
		{desc: "remove a backend that does not exist", args: []string{"backend", "rm", vip, "198.51.100.99"}, code: 1, want: []string{"backend:", "198.51.100.99:8765 is not a backend of chat"}},
		{desc: "drain a backend that does not exist", args: []string{"backend", "drain", vip, "198.51.100.99"}, code: 1, want: []string{"backend:", "not a backend of chat"}},
		{desc: "list the backends of a missing VIP", args: []string{"backend", "ls", "203.0.113.99:80"}, code: 1, want: []string{"service:", "no service"}},
		{desc: "flows of a VIP without port", args: []string{"flows", "203.0.113.10"}, code: 1, want: []string{"service:", "not a service address"}},

		// The API's own checks.
		{desc: "API: unknown field", api: func() error {
			return api.Call(ctx, http.MethodPost, "/v1/services", nil, map[string]any{"vip": "203.0.113.20:80", "colour": "blue"}, nil)
		}, code: 1, want: []string{"colour", "unknown field"}},
		{desc: "API: weight of the wrong type", api: func() error {
			return api.Call(ctx, http.MethodPost, "/v1/backends", nil, map[string]any{"service": vip, "backend": "198.51.100.13", "weight": "3"}, nil)
		}, code: 1, want: []string{"weight", "not a JSON int"}},
		{desc: "API: unknown query parameter", api: func() error {
			return api.Call(ctx, http.MethodDelete, "/v1/backends", map[string][]string{"service": {vip}, "backend": {be1}, "force": {"1"}}, nil, nil)
		}, code: 1, want: []string{"force", "unknown parameter"}},

		// Reloads of a bad file.
		{desc: "reload of an unreadable file", setup: func() func() {
			if err := os.Remove(d.config); err != nil {
				t.Fatal(err)
			}
			if err := os.Mkdir(d.config, 0o700); err != nil {
				t.Fatal(err)
			}
			return func() {
				os.Remove(d.config)
				writeFile(file)
			}
		}, args: []string{"reload"}, code: 1, want: []string{d.config, "is a directory"}},
		{desc: "reload of a file with a bad field", setup: holding(strings.Replace(cfg, "port: 8765", "port: 70000", 1)),
			args: []string{"reload"}, code: 1, want: []string{"services[0].port", "70000 is out of range"}},
		{desc: "reload of a file with an unknown field", setup: holding(cfg + "colour: blue\n"),
			args: []string{"reload"}, code: 1, want: []string{"colour"}},
		{desc: "reload of a file with a duplicate backend", setup: holding(strings.Replace(cfg, "- address: 198.51.100.12", "- address: 198.51.100.11", 1)),
			args: []string{"reload"}, code: 1, want: []string{"services[0].backends[1]", "already listed"}},
		{desc: "reload that changes a table size", setup: holding(strings.Replace(cfg, "connections: 65536", "connections: 131072", 1)),
			args: []string{"reload"}, code: 1, want: []string{"tables.connections: 131072 differs from the running 65536", "restart tether"}},
		{desc: "reload that changes the hash seed", setup: holding(cfg + "hash_seed: 42\n"),
			args: []string{"reload"}, code: 1, want: []string{"hash_seed:", "restart tether"}},
		{desc: "change while the file holds an edit not reloaded", setup: holding(strings.Replace(cfg, "affinity_timeout: 1h", "affinity_timeout: 2h", 1)),
			args: []string{"backend", "drain", vip, be1}, code: 1, want: []string{"config:", "tether reload"}},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			// After the case and its undo: nothing changed.
			defer func() {
				if got := mapsSnapshot(t, m); got != state {
					t.Errorf("the maps changed:\nbefore:\n%s\nafter:\n%s", state, got)
				}
				if got, _ := os.ReadFile(d.config); !bytes.Equal(got, file) {
					t.Errorf("the configuration file changed:\n%s", got)
				}
			}()
			var stderr string
			if tc.setup != nil {
				undo := tc.setup()
				defer undo()
			}
			if tc.api != nil {
				err := tc.api()
				var ae *control.APIError
				if !errors.As(err, &ae) || !ae.Refused() {
					t.Fatalf("API error %v, want a refusal", err)
				}
				stderr = ae.Field + ": " + ae.Msg
			} else {
				var stdout string
				var code int
				stdout, stderr, code = d.cli(tc.args...)
				if code != tc.code {
					t.Errorf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, stdout, stderr)
				}
			}
			t.Log(strings.TrimSpace(stderr))
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("the error does not say %q:\n%s", w, stderr)
				}
			}
		})
	}
	if t.Failed() {
		return
	}
	// The daemon still serves, with what it started with.
	var st control.Status
	d.cliJSON(&st, "status")
	if len(st.Services) != 2 || len(st.Services[0].Backends) != 2 || len(st.Services[1].Backends) != 2 {
		t.Fatalf("status after the refusals: %+v", st)
	}
	if n := strings.Count(d.proc.Output(), "msg=reloaded"); n != 0 {
		t.Errorf("%d reloads went through", n)
	}
}

// emptyConfig is a configuration without services.
func emptyConfig() string {
	return fmt.Sprintf("interfaces: [eth0]\ndatapath: xdp\ntables:\n  connections: 65536\n  affinity: 65536\n  ring_size: %d\nservices: []\n", testRing)
}

// TestCLIManagesServices starts tether without services and builds one
// with the CLI: a VIP, three backends, one drained, one removed. The maps,
// `tether status -o json` and the file agree with what was asked at every
// step; WebSocket clients reach only the active backends, connections
// opened before the drain keep echoing on the drained backend, whose
// active connections `tether backend ls` shows dropping to 0 once they
// close; `tether reload` keeps everything.
//
// It runs once per datapath. The BPF maps are the XDP datapath's: with
// splice the checks read `tether status -o json` alone (states, and the
// active connections per backend), and the traffic checks are the same.
func TestCLIManagesServices(t *testing.T) {
	forEachDatapath(t, testCLIManagesServices)
}

func testCLIManagesServices(t *testing.T, dp string) {
	l := lab.NewT(t, lab.Options{Backends: 3, Clients: 60})
	for _, be := range l.Backends {
		serveEcho(t, l, be)
	}
	d := startDaemon(t, l, withDatapath(emptyConfig(), dp))
	m := xdpMaps(t, l, dp)
	be1, be2, be3 := l.Backends[0], l.Backends[1], l.Backends[2]
	vip := netip.AddrPortFrom(l.VIP4, chatPort).String()

	if out := d.mustCLI("vip", "ls"); !strings.Contains(out, "no services") {
		t.Errorf("vip ls without services:\n%s", out)
	}
	out := d.mustCLI("vip", "add", vip, "--name", "chat", "--affinity-timeout", "1h")
	t.Logf("tether vip add %s --name chat --affinity-timeout 1h\n%s", vip, out)
	for _, be := range l.Backends {
		out := d.mustCLI("backend", "add", vip, be.Addr4.String())
		t.Logf("tether backend add %s %s\n%s", vip, be.Addr4, out)
	}
	status := checkAgree(t, d, m, map[string]string{be1.Name: "active", be2.Name: "active", be3.Name: "active"}, l)

	// Clients spread over the three backends.
	conns := dialAll(t, l, l.ClientAddrs4[:40], l.VIP4, 1)
	var onBe2 []*conn
	for _, c := range conns {
		if c.backend == be2.Name {
			onBe2 = append(onBe2, c)
		}
	}
	if len(onBe2) == 0 {
		t.Fatalf("no connection reached %s", be2.Name)
	}
	if n := activeOf(t, d, vip, be2); n != len(onBe2) {
		t.Errorf("backend ls shows %d active connections on %s, want %d", n, be2.Name, len(onBe2))
	}

	// Drain be2: its connections stay, new ones go to be1 and be3.
	out = d.mustCLI("backend", "drain", vip, be2.Addr4.String())
	t.Logf("tether backend drain %s %s\n%s", vip, be2.Addr4, out)
	status = checkAgree(t, d, m, map[string]string{be1.Name: "active", be2.Name: "draining", be3.Name: "active"}, l)
	echoAll(t, conns, "after the drain")
	fresh := dialAll(t, l, l.ClientAddrs4, l.VIP4, 1)
	for _, c := range fresh {
		if c.backend == be2.Name {
			t.Fatalf("a new connection from %s reached the drained %s", c.src, be2.Name)
		}
	}
	for _, c := range fresh {
		c.ws.Close()
	}
	out = d.mustCLI("backend", "ls", vip)
	t.Logf("tether backend ls %s\n%s", vip, out)
	if n := activeOf(t, d, vip, be2); n != len(onBe2) {
		t.Errorf("backend ls shows %d active connections on the drained %s, want %d", n, be2.Name, len(onBe2))
	}

	// The drained backend empties as its clients leave.
	for _, c := range onBe2 {
		c.ws.Close()
	}
	deadline := time.Now().Add(10 * time.Second)
	for activeOf(t, d, vip, be2) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%s still shows active connections 10s after its clients closed:\n%s", be2.Name, d.mustCLI("backend", "ls", vip))
		}
		time.Sleep(100 * time.Millisecond)
	}

	// Remove be3: the ring holds be1 only.
	out = d.mustCLI("backend", "rm", vip, be3.Addr4.String())
	t.Logf("tether backend rm %s %s\n%s", vip, be3.Addr4, out)
	status = checkAgree(t, d, m, map[string]string{be1.Name: "active", be2.Name: "draining"}, l)
	for _, c := range dialAll(t, l, l.ClientAddrs4[:20], l.VIP4, 1) {
		if c.backend != be1.Name {
			t.Fatalf("a new connection from %s reached %s, want %s (the only active backend)", c.src, c.backend, be1.Name)
		}
	}

	// Listings, in text and JSON.
	out = d.mustCLI("vip", "ls")
	t.Logf("tether vip ls\n%s", out)
	if !strings.Contains(out, "chat") || !strings.Contains(out, vip) || !strings.Contains(out, "1 active, 1 draining") {
		t.Errorf("vip ls:\n%s", out)
	}
	var svcs []control.ServiceStatus
	d.cliJSON(&svcs, "vip", "ls")
	if len(svcs) != 1 || svcs[0].Name != "chat" || svcs[0].VIP != vip || svcs[0].AffinityTimeout != "1h0m0s" || len(svcs[0].Backends) != 2 {
		t.Errorf("vip ls -o json: %+v", svcs)
	}
	t.Logf("tether status\n%s", d.mustCLI("status"))
	t.Logf("tether stats\n%s", d.mustCLI("stats"))
	t.Logf("tether flows %s (first lines)\n%s", vip, firstLines(d.mustCLI("flows", vip), 4))

	// The file holds the change, keeps its mode, and a reload keeps the
	// running state.
	onDisk, err := config.Load(d.config)
	if err != nil {
		t.Fatal(err)
	}
	if len(onDisk.Services) != 1 {
		t.Fatalf("the file holds %d services", len(onDisk.Services))
	}
	s := onDisk.Services[0]
	var got []string
	for _, b := range s.Backends {
		got = append(got, b.Address.String()+" "+b.State)
	}
	want := []string{be1.Addr4.String() + " active", be2.Addr4.String() + " draining"}
	if s.Name != "chat" || s.VIP != l.VIP4 || s.Port != chatPort || s.AffinityTimeout != time.Hour || !slices.Equal(got, want) {
		t.Errorf("the file holds %+v with backends %v, want chat on %s with %v", s, got, vip, want)
	}
	if fi, err := os.Stat(d.config); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("the file's mode is %v (%v), want 0600 as it was", fi.Mode(), err)
	}
	var before string
	if m != nil {
		before = mapsSnapshot(t, m)
	}
	out = d.mustCLI("reload")
	t.Logf("tether reload\n%s", out)
	d.waitLog("msg=reloaded", 5*time.Second)
	if m != nil {
		if after := mapsSnapshot(t, m); after != before {
			t.Errorf("reload changed the maps:\nbefore:\n%s\nafter:\n%s", before, after)
		}
	}
	if again := checkAgree(t, d, m, map[string]string{be1.Name: "active", be2.Name: "draining"}, l); again.Services[0].ID != status.Services[0].ID {
		t.Errorf("the service id changed over the reload: %d, then %d", status.Services[0].ID, again.Services[0].ID)
	}
}

// xdpMaps returns the maps of the daemon's XDP program, or nil on the
// splice datapath, which has none.
func xdpMaps(t *testing.T, l *lab.Lab, dp string) *maps.Maps {
	t.Helper()
	if dp == config.DatapathSplice {
		return nil
	}
	return daemonMaps(t, l, testRing)
}

// checkAgree checks that `tether status -o json` lists the one service on
// the lab's IPv4 VIP with the backends in want (lab host name → state),
// and, with the XDP datapath (m not nil), that the maps agree: each
// backend's entry with its address and state, and the ring holding exactly
// the active backends. With splice (m nil) it checks that status shows
// the proxy serving.
func checkAgree(t *testing.T, d *daemon, m *maps.Maps, want map[string]string, l *lab.Lab) control.Status {
	t.Helper()
	var st control.Status
	d.cliJSON(&st, "status")
	if len(st.Services) != 1 || st.Services[0].VIP != netip.AddrPortFrom(l.VIP4, chatPort).String() {
		t.Fatalf("status: %+v", st)
	}
	switch {
	case m == nil && st.Interfaces["*"] != config.DatapathSplice:
		t.Errorf("status: interfaces %v, want *: splice", st.Interfaces)
	case m != nil && st.Interfaces["eth0"] == "":
		t.Errorf("status names no XDP mode for eth0: %v", st.Interfaces)
	}
	svc := st.Services[0]
	byAddr := map[string]string{}
	for _, be := range l.Backends {
		byAddr[netip.AddrPortFrom(be.Addr4, chatPort).String()] = be.Name
	}
	got := map[string]string{}
	var active []uint32
	for _, b := range svc.Backends {
		got[byAddr[b.Address]] = b.State
		if m == nil {
			continue
		}
		e, err := m.LookupBackend(b.ID)
		if err != nil {
			t.Fatal(err)
		}
		wantState := map[string]uint8{"active": maps.StateActive, "draining": maps.StateDraining}[b.State]
		if netip.AddrPortFrom(e.Addr, e.Port).String() != b.Address || e.State != wantState || e.Service != svc.ID {
			t.Errorf("backend %d: the map holds %s state %d of service %d, status says %s %s of service %d",
				b.ID, netip.AddrPortFrom(e.Addr, e.Port), e.State, e.Service, b.Address, b.State, svc.ID)
		}
		if b.State == "active" {
			active = append(active, b.ID)
		}
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("status shows backends %v, want %v", got, want)
	}
	if m == nil {
		return st
	}
	slices.Sort(active)
	if ring := ringIDs(t, m, svc.ID); !slices.Equal(ring, active) {
		t.Fatalf("the ring holds backends %v, want the active ones %v", ring, active)
	}
	return st
}

// activeOf reads a backend's active connections from `tether backend ls
// -o json`.
func activeOf(t *testing.T, d *daemon, vip string, be *lab.Host) int {
	t.Helper()
	var s control.ServiceStatus
	d.cliJSON(&s, "backend", "ls", vip)
	addr := netip.AddrPortFrom(be.Addr4, chatPort).String()
	for _, b := range s.Backends {
		if b.Address == addr {
			return b.ActiveConnections
		}
	}
	t.Fatalf("backend ls shows no %s (%s): %+v", be.Name, addr, s)
	return 0
}

// TestCLIReloadKeepsConnections adds a backend to the file and runs
// `tether reload`: every open connection keeps echoing from its backend,
// and the new backend enters the ring.
//
// It runs once per datapath; the ring is checked in the BPF maps with XDP,
// and with splice by `tether status -o json` and new connections reaching
// the new backend.
func TestCLIReloadKeepsConnections(t *testing.T) {
	forEachDatapath(t, testCLIReloadKeepsConnections)
}

func testCLIReloadKeepsConnections(t *testing.T, dp string) {
	l := lab.NewT(t, lab.Options{Backends: 3, Clients: 60})
	for _, be := range l.Backends {
		serveEcho(t, l, be)
	}
	d := startDaemon(t, l, withDatapath(chatConfig(l, l.Backends[:2]), dp))
	conns := dialAll(t, l, l.ClientAddrs4, l.VIP4, 1)
	conns = append(conns, dialAll(t, l, l.ClientAddrs6[:20], l.VIP6, 1)...)
	echoAll(t, conns, "before the reload")

	if err := os.WriteFile(d.config, []byte(withDatapath(chatConfig(l, l.Backends), dp)), 0o600); err != nil {
		t.Fatal(err)
	}
	out := d.mustCLI("reload")
	t.Logf("tether reload\n%s", out)
	if !strings.Contains(out, "reloaded") {
		t.Errorf("reload said %q", out)
	}
	echoAll(t, conns, "after the reload")

	var st control.Status
	d.cliJSON(&st, "status")
	m := xdpMaps(t, l, dp)
	for _, s := range st.Services {
		if len(s.Backends) != 3 {
			t.Errorf("%s has %d backends after the reload, want 3", s.Name, len(s.Backends))
		}
		for _, b := range s.Backends {
			if b.State != "active" {
				t.Errorf("%s: backend %s is %s after the reload, want active", s.Name, b.Address, b.State)
			}
		}
		if m == nil {
			// Splice: no ring map to read; the new backend takes new
			// client addresses instead (below).
			continue
		}
		checkRingHoldsBackends(t, m, s, "after the reload")
	}
	// Client addresses without affinity entries reach the new backend.
	fresh := map[string]int{}
	for _, c := range dialAll(t, l, l.ClientAddrs6[20:], l.VIP6, 1) {
		fresh[c.backend]++
		c.ws.Close()
	}
	t.Logf("40 new IPv6 client addresses after the reload: %v", fresh)
	if fresh[l.Backends[2].Name] == 0 {
		t.Errorf("no new client address reached the added %s", l.Backends[2].Name)
	}
}

func firstLines(s string, n int) string {
	lines := strings.SplitAfter(s, "\n")
	if len(lines) > n {
		lines = append(lines[:n], "...\n", lines[len(lines)-2])
	}
	return strings.Join(lines, "")
}

// TestRunRefusesBusySocket starts a second daemon on the first one's
// socket: it is refused before attaching anything, and the first one
// keeps its program and keeps serving.
func TestRunRefusesBusySocket(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 1, Clients: 1})
	d := startDaemon(t, l, chatConfig(l, l.Backends))
	before := balancerXDP(t, l)
	out, code := runTether(t, l, "run", "--config", d.config, "--socket", d.socket)
	if code != 1 || !strings.Contains(out, "another tether daemon is serving") || !strings.Contains(out, d.socket) {
		t.Fatalf("second daemon: exit %d\n%s", code, out)
	}
	if after := balancerXDP(t, l); after != before || before == 0 {
		t.Errorf("XDP program id %d before the second daemon, %d after", before, after)
	}
	if out := d.mustCLI("vip", "ls"); !strings.Contains(out, "chat6") {
		t.Errorf("the first daemon no longer serves:\n%s", out)
	}
}
