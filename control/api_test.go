package control

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
)

// flowDP is the fake datapath with a connection table and counters the
// test sets.
type flowDP struct {
	*fakeDP
	mu       sync.Mutex
	flows    []datapath.Flow
	counters datapath.Counters
	closedAt []time.Time // when CloseFlows closed each flow
}

func (f *flowDP) Flows() ([]datapath.Flow, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]datapath.Flow(nil), f.flows...), nil
}

// CloseFlows implements datapath.Closer: it marks the flows it holds
// closing and notes when.
func (f *flowDP) CloseFlows(flows []datapath.Flow) ([]datapath.Flow, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []datapath.Flow
	for _, g := range flows {
		for i := range f.flows {
			h := &f.flows[i]
			if h.Client == g.Client && h.VIP == g.VIP && h.Backend == g.Backend && !h.Closing {
				h.Closing = true
				f.closedAt = append(f.closedAt, time.Now())
				out = append(out, *h)
			}
		}
	}
	return out, nil
}

func (f *flowDP) Counters() (datapath.Counters, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.counters, nil
}

// apiEnv is a daemon serving its API on a socket in a temporary
// directory, over the fake datapath.
type apiEnv struct {
	dir, path string
	dp        *flowDP
	ctl       *Controller
	d         *Daemon
	cl        *Client
}

func newAPIEnv(t *testing.T, cfgText string) *apiEnv {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "tether.yaml")
	if err := os.WriteFile(path, []byte(cfgText), 0o640); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	e := &apiEnv{dir: dir, path: path, dp: &flowDP{fakeDP: newFakeDP()}}
	e.ctl = newController(e.dp, cfg)
	mustApply(t, e.ctl, cfg)
	e.dp.take()
	e.d = NewDaemon(path, cfg, e.ctl, e.dp, discard())
	ln, err := Listen(filepath.Join(dir, "api.sock"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, ln, e.d.Handler(), discard()) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	e.cl = NewClient(filepath.Join(dir, "api.sock"))
	return e
}

func (e *apiEnv) file(t *testing.T) []byte {
	t.Helper()
	data, err := os.ReadFile(e.path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// onDisk loads the configuration file.
func (e *apiEnv) onDisk(t *testing.T) *config.Config {
	t.Helper()
	c, err := config.Load(e.path)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestAPIChanges(t *testing.T) {
	e := newAPIEnv(t, conf(8, 32, web4))
	ctx := context.Background()

	if _, err := e.cl.AddService(ctx, ServiceSpec{VIP: "[2001:db8::10]:8765", Name: "chat6", AffinityTimeout: "1h"}); err != nil {
		t.Fatal(err)
	}
	for _, b := range []string{"2001:db8::11", "[2001:db8::12]", "[2001:db8::13]:8765"} {
		if _, err := e.cl.AddBackend(ctx, BackendSpec{Service: "[2001:db8::10]:8765", Backend: b}); err != nil {
			t.Fatal(err)
		}
	}
	two := 2
	if _, err := e.cl.AddBackend(ctx, BackendSpec{Service: "203.0.113.10:80/tcp", Backend: "192.0.2.14:80", Weight: &two}); err != nil {
		t.Fatal(err)
	}
	if r, err := e.cl.SetBackendState(ctx, BackendStateSpec{Service: "203.0.113.10:80", Backend: "192.0.2.12", State: config.StateDraining}); err != nil {
		t.Fatal(err)
	} else if !strings.Contains(r.Message, "draining") {
		t.Errorf("drain said %q", r.Message)
	}
	if _, err := e.cl.RemoveBackend(ctx, "[2001:db8::10]:8765", "2001:db8::12"); err != nil {
		t.Fatal(err)
	}
	e.dp.checkConflicts(t)

	// The file holds the changes and the controller applied them.
	got := e.onDisk(t)
	if !reflect.DeepEqual(got, e.ctl.Config()) {
		t.Fatalf("file and running configuration differ:\n%+v\n%+v", got, e.ctl.Config())
	}
	if fi, err := os.Stat(e.path); err != nil || fi.Mode().Perm() != 0o640 {
		t.Errorf("file mode after a change: %v %v, want 0640", fi.Mode(), err)
	}
	if len(got.Services) != 2 {
		t.Fatalf("services %+v", got.Services)
	}
	chat6 := got.Services[1]
	if chat6.Name != "chat6" || chat6.Port != 8765 || chat6.AffinityTimeout.String() != "1h0m0s" || chat6.Protocol != "tcp" {
		t.Errorf("added service %+v", chat6)
	}
	var keys []string
	for _, b := range chat6.Backends {
		keys = append(keys, b.Key())
	}
	if want := []string{"[2001:db8::11]:8765", "[2001:db8::13]:8765"}; !reflect.DeepEqual(keys, want) {
		t.Errorf("chat6 backends %v, want %v", keys, want)
	}
	web := byName(t, e.ctl, "web4")
	states := map[string]datapath.State{}
	for _, b := range web.Backends {
		states[b.Addr.String()] = b.State
	}
	if states["192.0.2.12"] != datapath.Draining || states["192.0.2.11"] != datapath.Active || states["192.0.2.14"] != datapath.Active {
		t.Errorf("web4 backend states %v", states)
	}

	// Status counts active connections per backend from the flows.
	d12, d11 := web.Backends[1], web.Backends[0]
	e.dp.mu.Lock()
	e.dp.flows = []datapath.Flow{
		{Service: web.ID, Backend: d12.ID},
		{Service: web.ID, Backend: d12.ID},
		{Service: web.ID, Backend: d12.ID, Closing: true},
		{Service: web.ID, Backend: d11.ID},
	}
	e.dp.mu.Unlock()
	st, err := e.cl.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Config != e.path || st.Interfaces["eth0"] != "fake" || len(st.Services) != 2 {
		t.Fatalf("status %+v", st)
	}
	bs := st.Services[0].Backends
	if bs[0].ActiveConnections != 1 || bs[1].ActiveConnections != 2 || bs[1].State != "draining" || bs[3].Weight != 2 {
		t.Errorf("web4 backends in status: %+v", bs)
	}

	// Removing the service removes it from the datapath and the file.
	if _, err := e.cl.RemoveService(ctx, "203.0.113.10:80"); err != nil {
		t.Fatal(err)
	}
	if c := e.onDisk(t); len(c.Services) != 1 || c.Services[0].Name != "chat6" {
		t.Errorf("after vip rm the file holds %+v", c.Services)
	}
	if svcs := e.ctl.Services(); len(svcs) != 1 {
		t.Errorf("after vip rm the controller holds %v", names(svcs))
	}
	leftovers, _ := filepath.Glob(filepath.Join(e.dir, ".tether.yaml.tmp-*"))
	if len(leftovers) != 0 {
		t.Errorf("temporary files left: %v", leftovers)
	}
}

// TestAPIRefused sends bad requests: each is refused with status 400 and
// the field named, and neither the datapath nor the file changes.
func TestAPIRefused(t *testing.T) {
	e := newAPIEnv(t, conf(2, 8, web4))
	ctx := context.Background()
	// Cases that need more services or backends add them and take them
	// away again, which rewrites the file: compare what it says.
	before, _ := e.onDisk(t).Marshal()
	neg, big := -1, 10001
	for _, tc := range []struct {
		desc  string
		call  func() error
		field string
		msg   string
	}{
		{"vip without port", func() error { _, err := e.cl.AddService(ctx, ServiceSpec{VIP: "203.0.113.20"}); return err }, "vip", "not a service address"},
		{"vip port 0", func() error { _, err := e.cl.AddService(ctx, ServiceSpec{VIP: "203.0.113.20:0"}); return err }, "vip", "out of range"},
		{"vip port 65536", func() error { _, err := e.cl.AddService(ctx, ServiceSpec{VIP: "203.0.113.20:65536"}); return err }, "vip", "out of range"},
		{"vip not an address", func() error { _, err := e.cl.AddService(ctx, ServiceSpec{VIP: "chat.example:80"}); return err }, "vip", "not an IP address"},
		{"duplicate vip", func() error { _, err := e.cl.AddService(ctx, ServiceSpec{VIP: "203.0.113.10:80"}); return err }, "vip", "already the service web4"},
		{"duplicate name", func() error {
			_, err := e.cl.AddService(ctx, ServiceSpec{VIP: "203.0.113.20:80", Name: "web4"})
			return err
		}, "name", "already the name"},
		{"unknown protocol", func() error {
			_, err := e.cl.AddService(ctx, ServiceSpec{VIP: "203.0.113.20:80", Protocol: "sctp"})
			return err
		}, "protocol", "unknown protocol"},
		{"unknown affinity", func() error {
			_, err := e.cl.AddService(ctx, ServiceSpec{VIP: "203.0.113.20:80", Affinity: "sticky"})
			return err
		}, "affinity", "unknown mode"},
		{"bad timeout", func() error {
			_, err := e.cl.AddService(ctx, ServiceSpec{VIP: "203.0.113.20:80", AffinityTimeout: "3 hours"})
			return err
		}, "affinity_timeout", "not a duration"},
		{"unknown forwarding", func() error {
			_, err := e.cl.AddService(ctx, ServiceSpec{VIP: "203.0.113.20:80", Forwarding: "vxlan"})
			return err
		}, "forwarding", "unknown mode"},
		{"tunnel_source not a prefix", func() error {
			_, err := e.cl.AddService(ctx, ServiceSpec{VIP: "203.0.113.20:80", Forwarding: "gue", TunnelSource: "198.51.100.1/24"})
			return err
		}, "tunnel_source", "has host bits set"},
		{"gue_port without gue", func() error {
			_, err := e.cl.AddService(ctx, ServiceSpec{VIP: "203.0.113.20:80", Forwarding: "ipip", GUEPort: 5555})
			return err
		}, "gue_port", "only forwarding gue"},
		{"snat_address not an address", func() error {
			_, err := e.cl.AddService(ctx, ServiceSpec{VIP: "203.0.113.20:80", Forwarding: "fullnat", SNATAddress: "balancer"})
			return err
		}, "snat_address", `"balancer" is not an IP address`},
		{"snat_address without fullnat", func() error {
			_, err := e.cl.AddService(ctx, ServiceSpec{VIP: "203.0.113.20:80", Forwarding: "nat", SNATAddress: "198.51.100.2"})
			return err
		}, "snat_address", "only forwarding fullnat"},
		{"too many services", func() error {
			if _, err := e.cl.AddService(ctx, ServiceSpec{VIP: "203.0.113.20:80"}); err != nil {
				return err
			}
			defer e.cl.RemoveService(ctx, "203.0.113.20:80")
			_, err := e.cl.AddService(ctx, ServiceSpec{VIP: "203.0.113.21:80"})
			return err
		}, "services", "more than tables.max_services"},
		{"negative weight", func() error {
			_, err := e.cl.AddBackend(ctx, BackendSpec{Service: "203.0.113.10:80", Backend: "192.0.2.20", Weight: &neg})
			return err
		}, "weight", "out of range"},
		{"weight too big", func() error {
			_, err := e.cl.AddBackend(ctx, BackendSpec{Service: "203.0.113.10:80", Backend: "192.0.2.20", Weight: &big})
			return err
		}, "weight", "out of range"},
		{"backend of a missing service", func() error {
			_, err := e.cl.AddBackend(ctx, BackendSpec{Service: "203.0.113.99:80", Backend: "192.0.2.20"})
			return err
		}, "service", "no service 203.0.113.99:80"},
		{"duplicate backend", func() error {
			_, err := e.cl.AddBackend(ctx, BackendSpec{Service: "203.0.113.10:80", Backend: "192.0.2.11"})
			return err
		}, "backend", "already a backend"},
		{"backend of the wrong family", func() error {
			_, err := e.cl.AddBackend(ctx, BackendSpec{Service: "203.0.113.10:80", Backend: "2001:db8::20"})
			return err
		}, "services[0].backends[3].address", "is IPv6"},
		{"backend port differs in dsr", func() error {
			_, err := e.cl.AddBackend(ctx, BackendSpec{Service: "203.0.113.10:80", Backend: "192.0.2.20:8080"})
			return err
		}, "services[0].backends[3].port", "dsr"},
		{"too many backends", func() error {
			for _, a := range []string{"192.0.2.20", "192.0.2.21", "192.0.2.22", "192.0.2.23", "192.0.2.24"} {
				if _, err := e.cl.AddBackend(ctx, BackendSpec{Service: "203.0.113.10:80", Backend: a}); err != nil {
					return err
				}
				defer e.cl.RemoveBackend(ctx, "203.0.113.10:80", a)
			}
			_, err := e.cl.AddBackend(ctx, BackendSpec{Service: "203.0.113.10:80", Backend: "192.0.2.25"})
			return err
		}, "services[0].backends[8]", "more than tables.max_backends"},
		{"remove a backend that does not exist", func() error {
			_, err := e.cl.RemoveBackend(ctx, "203.0.113.10:80", "192.0.2.99")
			return err
		}, "backend", "not a backend of web4"},
		{"drain a backend that does not exist", func() error {
			_, err := e.cl.SetBackendState(ctx, BackendStateSpec{Service: "203.0.113.10:80", Backend: "192.0.2.99", State: "draining"})
			return err
		}, "backend", "not a backend"},
		{"unknown state", func() error {
			_, err := e.cl.SetBackendState(ctx, BackendStateSpec{Service: "203.0.113.10:80", Backend: "192.0.2.11", State: "down"})
			return err
		}, "state", "unknown state"},
		{"remove a missing service", func() error { _, err := e.cl.RemoveService(ctx, "203.0.113.99:80"); return err }, "service", "no service"},
		{"unknown field", func() error {
			return e.cl.Call(ctx, http.MethodPost, "/v1/services", nil, map[string]any{"vip": "203.0.113.20:80", "colour": "blue"}, nil)
		}, "colour", "unknown field"},
		{"wrong type", func() error {
			return e.cl.Call(ctx, http.MethodPost, "/v1/backends", nil, map[string]any{"service": "203.0.113.10:80", "backend": "192.0.2.20", "weight": "3"}, nil)
		}, "weight", "not a JSON int"},
		{"unknown parameter", func() error {
			return e.cl.Call(ctx, http.MethodGet, "/v1/flows", url.Values{"srvice": {"x"}}, nil, nil)
		}, "srvice", "unknown parameter"},
		{"bad flows filter", func() error { _, err := e.cl.Flows(ctx, "203.0.113.10"); return err }, "service", "not a service address"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			e.dp.take()
			err := tc.call()
			var ae *APIError
			if !errors.As(err, &ae) {
				t.Fatalf("error %v (%T), want an *APIError", err, err)
			}
			if ae.Code != http.StatusBadRequest || !ae.Refused() || ae.Field != tc.field || !strings.Contains(ae.Msg, tc.msg) {
				t.Errorf("got %d field %q: %s\nwant 400, field %q and %q", ae.Code, ae.Field, ae.Msg, tc.field, tc.msg)
			}
			if got, _ := e.onDisk(t).Marshal(); string(got) != string(before) {
				t.Errorf("the file changed:\n%s", got)
			}
		})
	}
	if c := e.ctl.Config(); len(c.Services) != 1 || len(c.Services[0].Backends) != 3 {
		t.Errorf("running configuration changed: %+v", c.Services)
	}
}

// TestAPIApplyFailureUndone makes the datapath fail a change: the error
// is a 500, the file stays, no temporary file is left and the running
// configuration is the old one.
func TestAPIApplyFailureUndone(t *testing.T) {
	e := newAPIEnv(t, conf(8, 32, web4))
	ctx := context.Background()
	before := e.file(t)
	running := e.ctl.Config()
	e.dp.mu.Lock()
	e.dp.failUpsert["web4"] = errors.New("no route to 192.0.2.99")
	e.dp.mu.Unlock()
	_, err := e.cl.AddBackend(ctx, BackendSpec{Service: "203.0.113.10:80", Backend: "192.0.2.99"})
	var ae *APIError
	if !errors.As(err, &ae) || ae.Code != http.StatusInternalServerError || !strings.Contains(ae.Msg, "no route") || ae.Refused() {
		t.Fatalf("error %v, want a 500 naming the datapath's error", err)
	}
	if string(e.file(t)) != string(before) {
		t.Error("the file changed")
	}
	if e.ctl.Config() != running {
		t.Error("the running configuration changed")
	}
	if leftovers, _ := filepath.Glob(filepath.Join(e.dir, ".tether.yaml.tmp-*")); len(leftovers) != 0 {
		t.Errorf("temporary files left: %v", leftovers)
	}
}

// TestAPIFileEditedRefused: a change through the API is refused while the
// file holds an edit not reloaded yet; after a reload it goes through.
func TestAPIFileEditedRefused(t *testing.T) {
	e := newAPIEnv(t, conf(8, 32, web4))
	ctx := context.Background()
	edited := conf(8, 32, web4Plus)
	if err := os.WriteFile(e.path, []byte(edited), 0o640); err != nil {
		t.Fatal(err)
	}
	_, err := e.cl.SetBackendState(ctx, BackendStateSpec{Service: "203.0.113.10:80", Backend: "192.0.2.11", State: "draining"})
	var ae *APIError
	if !errors.As(err, &ae) || ae.Field != "config" || !strings.Contains(ae.Msg, "tether reload") {
		t.Fatalf("error %v, want a refusal that says to reload", err)
	}
	if string(e.file(t)) != edited {
		t.Fatal("the edited file was overwritten")
	}
	if _, err := e.cl.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	if n := len(byName(t, e.ctl, "web4").Backends); n != 4 {
		t.Fatalf("after reload web4 has %d backends, want 4", n)
	}
	if _, err := e.cl.SetBackendState(ctx, BackendStateSpec{Service: "203.0.113.10:80", Backend: "192.0.2.11", State: "draining"}); err != nil {
		t.Fatal(err)
	}
}

// TestAPIReloadRefusesFixedSettings: tables, hash seed, interfaces,
// datapath and the splice settings take effect only at start.
func TestAPIReloadRefusesFixedSettings(t *testing.T) {
	good := conf(8, 32, web4)
	e := newAPIEnv(t, good)
	ctx := context.Background()
	for _, tc := range []struct{ desc, file, field string }{
		{"tables", conf(9, 32, web4), "tables.max_services"},
		{"hash seed", good + "hash_seed: 7\n", "hash_seed"},
		{"interfaces", strings.Replace(good, "[eth0]", "[eth0, eth1]", 1), "interfaces"},
		{"datapath", strings.Replace(good, "datapath: xdp", "datapath: xdp-generic", 1), "datapath"},
		{"splice loops", good + "splice: {loops: 2}\n", "splice.loops"},
		{"splice connection cap", good + "splice: {max_connections: 10}\n", "splice.max_connections"},
		{"bad field", strings.Replace(good, "port: 80", "port: 70000", 1), "services[0].port"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			if err := os.WriteFile(e.path, []byte(tc.file), 0o640); err != nil {
				t.Fatal(err)
			}
			e.dp.take()
			_, err := e.cl.Reload(ctx)
			var ae *APIError
			if !errors.As(err, &ae) || ae.Code != http.StatusBadRequest || ae.Field != tc.field {
				t.Fatalf("reload: %v, want a refusal naming %s", err, tc.field)
			}
			if calls := e.dp.take(); len(calls) != 0 {
				t.Errorf("the datapath was called: %v", calls)
			}
		})
	}
}

func TestListen(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "sub", "t.sock")
	ln, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v (%v), want 0600", fi.Mode(), err)
	}
	if fi, err := os.Stat(filepath.Dir(sock)); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("socket directory mode %v (%v), want 0700", fi.Mode(), err)
	}
	// Someone answers: refused.
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	if _, err := Listen(sock); err == nil || !strings.Contains(err.Error(), "another tether daemon") {
		t.Errorf("second Listen: %v, want a refusal", err)
	}
	// A stale socket (nobody listening) is replaced.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	ln2, err := Listen(sock)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	ln2.Close()
	// A file that is not a socket is left alone.
	plain := filepath.Join(dir, "plain")
	if err := os.WriteFile(plain, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(plain); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("Listen on a plain file: %v", err)
	}
}

func TestClientUnreachable(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	_, err := NewClient(sock).Status(context.Background())
	want := "no socket at " + sock + ": is the daemon running? start it with: tether run --config FILE (or give the --socket it serves)"
	if err == nil || err.Error() != want {
		t.Fatalf("error %v\nwant %s", err, want)
	}
}

func TestParseRefs(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want string // serviceRef.String(), or "error"
	}{
		{"203.0.113.10:8765", "203.0.113.10:8765"},
		{"203.0.113.10:8765/udp", "203.0.113.10:8765/udp"},
		{"[2001:db8::10]:8765/tcp", "[2001:db8::10]:8765/tcp"},
		{"2001:db8::10:8765", "error"},
		{"203.0.113.10:8765/sctp", "error"},
		{"203.0.113.10", "error"},
		{"203.0.113.10:", "error"},
		{"203.0.113.10:99999", "error"},
		{"", "error"},
	} {
		r, err := parseServiceRef(tc.in, "vip")
		got := r.String()
		if err != nil {
			got = "error"
		}
		if got != tc.want {
			t.Errorf("parseServiceRef(%q) = %s (%v), want %s", tc.in, got, err, tc.want)
		}
	}
	for _, tc := range []struct {
		in   string
		want string
	}{
		{"192.0.2.11", "192.0.2.11:80"},
		{"192.0.2.11:8080", "192.0.2.11:8080"},
		{"2001:db8::11", "[2001:db8::11]:80"},
		{"[2001:db8::11]", "[2001:db8::11]:80"},
		{"[2001:db8::11]:81", "[2001:db8::11]:81"},
		{"[2001:db8::11", "error"},
		{"192.0.2.11:0", "error"},
		{"host:80", "error"},
	} {
		a, p, err := parseBackendRef(tc.in, 80, "backend")
		got := netip.AddrPortFrom(a, p).String()
		if err != nil {
			got = "error"
		}
		if got != tc.want {
			t.Errorf("parseBackendRef(%q) = %s (%v), want %s", tc.in, got, err, tc.want)
		}
	}
}

// TestAPIDurationsAsFile gives affinity_timeout values to the API and to the
// configuration file: each is accepted by both, with the same duration, or
// refused by both, with the same words.
func TestAPIDurationsAsFile(t *testing.T) {
	e := newAPIEnv(t, conf(2, 8, web4))
	ctx := context.Background()
	for _, v := range []string{"3h", "90m", "1h30m", "0.5h", "90", "1.5", "3 hours", "-1h", "0s", "721h", "720h", "1e3", "h", ""} {
		yaml := "interfaces: [eth0]\nservices:\n  - name: s\n    vip: 203.0.113.30\n    port: 80\n    affinity_timeout: \"" + v + "\"\n    backends: [{address: 192.0.2.11}]\n"
		fromFile, ferr := config.Parse([]byte(yaml))
		_, aerr := e.cl.AddService(ctx, ServiceSpec{VIP: "203.0.113.30:80", AffinityTimeout: v})
		if v == "" {
			// The API's default; in the file an empty string is no duration.
			if aerr != nil {
				t.Errorf("API refused an empty affinity_timeout (the default): %v", aerr)
			}
		} else if (ferr == nil) != (aerr == nil) {
			t.Errorf("affinity_timeout %q: file error %v, API error %v; want the same verdict", v, ferr, aerr)
		} else if ferr != nil && tail(ferr.Error()) != tail(aerr.Error()) {
			t.Errorf("affinity_timeout %q: the file says %q, the API %q", v, ferr, aerr)
		}
		if aerr == nil {
			got := e.onDisk(t).Services[1].AffinityTimeout
			if v != "" && got != fromFile.Services[0].AffinityTimeout {
				t.Errorf("affinity_timeout %q: the API applied %s, the file %s", v, got, fromFile.Services[0].AffinityTimeout)
			}
			if _, err := e.cl.RemoveService(ctx, "203.0.113.30:80"); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// tail is what an error says after the field affinity_timeout.
func tail(msg string) string {
	_, after, _ := strings.Cut(msg, "affinity_timeout: ")
	return after
}
