package control

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/maglev"
)

// call is one call the controller made on the fake datapath.
type call struct {
	op       string // "upsert" or "delete"
	svc      datapath.Service
	err      error // what the fake returned
	keptRing bool  // the upsert kept the datapath's ring (KeepRing)
}

func (c call) String() string {
	return fmt.Sprintf("%s %s (id %d)", c.op, c.svc.Name, c.svc.ID)
}

// fakeDP is a datapath.Datapath that records every call, fails on demand,
// and keeps the services it holds by id, the way loader.XDP does, so that
// it can tell when the controller hands it an id that another service it
// still holds is using.
type fakeDP struct {
	mu         sync.Mutex
	calls      []call
	failUpsert map[string]error // by service name
	failDelete map[string]error // by service name
	installed  map[uint32]datapath.Service
	conflicts  []string // ids the controller reused while still held
}

var _ datapath.Datapath = (*fakeDP)(nil)

func newFakeDP() *fakeDP {
	return &fakeDP{
		failUpsert: map[string]error{},
		failDelete: map[string]error{},
		installed:  map[uint32]datapath.Service{},
	}
}

func (f *fakeDP) Modes() map[string]string { return map[string]string{"eth0": "fake"} }

func (f *fakeDP) UpsertService(s datapath.Service) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	// As a datapath does, keep the ring of a service asked to: the calls
	// show the ring the datapath serves.
	kept := s.KeepRing
	if s.KeepRing {
		old, ok := f.installed[s.ID]
		if !ok {
			return fmt.Errorf("fake: no ring to keep for service %d", s.ID)
		}
		s.Ring, s.KeepRing = old.Ring, false
	}
	err := f.failUpsert[s.Name]
	f.calls = append(f.calls, call{"upsert", s, err, kept})
	if err != nil {
		return err
	}
	if old, ok := f.installed[s.ID]; ok && !sameVIP(old, s) {
		f.conflicts = append(f.conflicts, fmt.Sprintf("service id %d of %s given to %s", s.ID, old.Name, s.Name))
	}
	for id, other := range f.installed {
		if id == s.ID {
			continue
		}
		for _, ob := range other.Backends {
			for _, b := range s.Backends {
				if b.ID == ob.ID {
					f.conflicts = append(f.conflicts, fmt.Sprintf("backend id %d of %s (%s) given to %s (%s)", b.ID, other.Name, ob.Addr, s.Name, b.Addr))
				}
			}
		}
	}
	f.installed[s.ID] = s
	return nil
}

func (f *fakeDP) DeleteService(s datapath.Service) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if s.Ring == nil { // the calls show the ring the datapath served
		s.Ring = f.installed[s.ID].Ring
	}
	err := f.failDelete[s.Name]
	f.calls = append(f.calls, call{"delete", s, err, false})
	if err != nil {
		return err
	}
	old, ok := f.installed[s.ID]
	if !ok || !sameVIP(old, s) {
		f.conflicts = append(f.conflicts, fmt.Sprintf("delete of %s (id %d), which is not what the datapath holds at that id", s.Name, s.ID))
	}
	delete(f.installed, s.ID)
	return nil
}

func (f *fakeDP) Counters() (datapath.Counters, error) { return datapath.Counters{}, nil }
func (f *fakeDP) Flows() ([]datapath.Flow, error)      { return nil, nil }
func (f *fakeDP) Close() error                         { return nil }

// take returns the calls made since the last take and forgets them.
func (f *fakeDP) take() []call {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.calls
	f.calls = nil
	return c
}

func (f *fakeDP) checkConflicts(t *testing.T) {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.conflicts {
		t.Errorf("datapath conflict: %s", c)
	}
}

func sameVIP(a, b datapath.Service) bool {
	return a.VIP == b.VIP && a.Port == b.Port && a.Proto == b.Proto
}

// conf returns a configuration file with the given table sizes and
// services (see svc).
func conf(maxServices, maxBackends int, services ...string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "interfaces: [eth0]\ndatapath: xdp\ntables:\n  ring_size: %d\n  max_services: %d\n  max_backends: %d\n",
		ringSize, maxServices, maxBackends)
	if len(services) == 0 {
		b.WriteString("services: []\n")
		return b.String()
	}
	b.WriteString("services:\n")
	for _, s := range services {
		b.WriteString(s)
	}
	return b.String()
}

// svc returns a TCP service with source affinity; each backend is an
// address, optionally followed by YAML flow-mapping fields
// ("192.0.2.1, weight: 0").
func svc(name, vip string, port int, backends ...string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "  - name: %s\n    vip: %s\n    port: %d\n    backends:\n", name, vip, port)
	for _, be := range backends {
		addr, rest, _ := strings.Cut(be, ",")
		if rest != "" {
			rest = "," + rest
		}
		fmt.Fprintf(&b, "      - {address: %q%s}\n", addr, rest)
	}
	if len(backends) == 0 {
		b.WriteString("      []\n")
	}
	return b.String()
}

const ringSize = 251

// web4 is an IPv4 TCP service with source affinity.
const web4 = `  - name: web4
    vip: 203.0.113.10
    port: 80
    protocol: tcp
    affinity: source
    affinity_timeout: 30m
    backends:
      - address: 192.0.2.11
      - address: 192.0.2.12
      - address: 192.0.2.13
`

// dns6 is an IPv6 UDP service with connection affinity.
const dns6 = `  - name: dns6
    vip: 2001:db8::10
    port: 53
    protocol: udp
    affinity: connection
    affinity_timeout: 1m
    backends:
      - address: 2001:db8::11
      - address: 2001:db8::12
      - address: 2001:db8::13
`

// web4Plus is web4 with a fourth backend.
var web4Plus = web4 + "      - address: 192.0.2.14\n"

func parse(t *testing.T, data string) *config.Config {
	t.Helper()
	c, err := config.Parse([]byte(data))
	if err != nil {
		t.Fatalf("config.Parse: %v\n%s", err, data)
	}
	return c
}

// clone returns a deep copy of c.
func clone(t *testing.T, c *config.Config) *config.Config {
	t.Helper()
	data, err := c.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return parse(t, string(data))
}

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// newController returns a controller sized like cfg's tables.
func newController(dp datapath.Datapath, cfg *config.Config) *Controller {
	t := cfg.Tables
	return New(dp, cfg.HashSeed, t.RingSize, t.MaxServices, t.MaxBackends, discard())
}

func mustApply(t *testing.T, c *Controller, cfg *config.Config) {
	t.Helper()
	if err := c.Apply(cfg); err != nil {
		t.Fatalf("Apply: %v", err)
	}
}

// byName returns the applied service called name.
func byName(t *testing.T, c *Controller, name string) datapath.Service {
	t.Helper()
	for _, s := range services(c) {
		if s.Name == name {
			return s
		}
	}
	t.Fatalf("service %s not applied; have %v", name, names(c.Services()))
	return datapath.Service{}
}

// services is services(c) with the rings the fake datapath serves: the
// controller keeps none.
func services(c *Controller) []datapath.Service {
	out := c.Services()
	f, ok := c.dp.(*fakeDP)
	if fl, isFlow := c.dp.(*flowDP); isFlow {
		f, ok = fl.fakeDP, true
	}
	if ok {
		f.mu.Lock()
		for i := range out {
			out[i].Ring = f.installed[out[i].ID].Ring
		}
		f.mu.Unlock()
	}
	return out
}

func names(ss []datapath.Service) []string {
	var out []string
	for _, s := range ss {
		out = append(out, s.Name)
	}
	return out
}

// wantCalls checks that calls are exactly the given "op name" strings, in
// any order, and returns them by name.
func wantCalls(t *testing.T, calls []call, want ...string) map[string]call {
	t.Helper()
	var got []string
	out := map[string]call{}
	for _, c := range calls {
		got = append(got, c.op+" "+c.svc.Name)
		out[c.svc.Name] = c
	}
	if !sameSet(got, want) {
		t.Errorf("datapath calls = %v, want %v", got, want)
	}
	return out
}

func sameSet(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	n := map[string]int{}
	for _, s := range a {
		n[s]++
	}
	for _, s := range b {
		n[s]--
	}
	for _, v := range n {
		if v != 0 {
			return false
		}
	}
	return true
}

// checkRing checks that s's ring has ringSize slots, that its non-zero
// slots are exactly the ids of its active backends, that with any active
// backend every slot is taken, and, when equalShare, that each active
// backend owns ⌊M/N⌋ or ⌈M/N⌉ slots.
func checkRing(t *testing.T, s datapath.Service, equalShare bool) {
	t.Helper()
	if len(s.Ring) != ringSize {
		t.Fatalf("%s: ring has %d slots, want %d", s.Name, len(s.Ring), ringSize)
	}
	active := map[uint32]bool{}
	for _, b := range s.Backends {
		if b.State == datapath.Active {
			active[b.ID] = true
		}
	}
	count := map[uint32]int{}
	for i, id := range s.Ring {
		if id == 0 {
			if len(active) > 0 {
				t.Errorf("%s: ring slot %d is empty with %d active backends", s.Name, i, len(active))
			}
			continue
		}
		if !active[id] {
			t.Errorf("%s: ring slot %d holds %d, not an active backend id", s.Name, i, id)
		}
		count[id]++
	}
	for id := range active {
		if count[id] == 0 {
			t.Errorf("%s: active backend %d has no ring slot", s.Name, id)
		}
	}
	if equalShare && len(active) > 0 {
		lo := ringSize / len(active)
		hi := (ringSize + len(active) - 1) / len(active)
		for id, n := range count {
			if n < lo || n > hi {
				t.Errorf("%s: backend %d owns %d slots, want %d..%d", s.Name, id, n, lo, hi)
			}
		}
	}
}

func addrs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

// 1. A configuration of two services is upserted whole and right.
func TestApplyTwoServices(t *testing.T) {
	dp := newFakeDP()
	cfg := parse(t, conf(8, 32, web4, dns6))
	c := newController(dp, cfg)
	mustApply(t, c, cfg)

	got := wantCalls(t, dp.take(), "upsert web4", "upsert dns6")
	type want struct {
		vip      string
		port     uint16
		proto    uint8
		source   bool
		timeout  time.Duration
		backends []netip.Addr
	}
	wants := map[string]want{
		"web4": {"203.0.113.10", 80, 6, true, 30 * time.Minute, addrs("192.0.2.11", "192.0.2.12", "192.0.2.13")},
		"dns6": {"2001:db8::10", 53, 17, false, time.Minute, addrs("2001:db8::11", "2001:db8::12", "2001:db8::13")},
	}
	seen := map[uint32]string{} // backend ids over all services
	for name, w := range wants {
		s := got[name].svc
		if s.VIP != netip.MustParseAddr(w.vip) || s.Port != w.port || s.Proto != w.proto {
			t.Errorf("%s: VIP %s port %d proto %d, want %s %d %d", name, s.VIP, s.Port, s.Proto, w.vip, w.port, w.proto)
		}
		if s.SourceAffinity != w.source || s.AffinityTimeout != w.timeout {
			t.Errorf("%s: SourceAffinity %v AffinityTimeout %s, want %v %s", name, s.SourceAffinity, s.AffinityTimeout, w.source, w.timeout)
		}
		if len(s.Backends) != len(w.backends) {
			t.Fatalf("%s: %d backends, want %d", name, len(s.Backends), len(w.backends))
		}
		var mb []maglev.Backend
		for i, b := range s.Backends {
			if b.Addr != w.backends[i] || b.Port != w.port || b.Weight != 1 || b.State != datapath.Active {
				t.Errorf("%s: backend %d = %+v, want %s:%d weight 1 active", name, i, b, w.backends[i], w.port)
			}
			if b.ID == 0 {
				t.Errorf("%s: backend %s has id 0", name, b.Addr)
			}
			if other, dup := seen[b.ID]; dup {
				t.Errorf("%s: backend %s has id %d, already that of %s", name, b.Addr, b.ID, other)
			}
			seen[b.ID] = name + " " + b.Addr.String()
			mb = append(mb, maglev.Backend{ID: b.ID, Key: netip.AddrPortFrom(b.Addr, b.Port).String(), Weight: b.Weight})
		}
		checkRing(t, s, true)
		// Every host with the same backends and seed must build the same
		// ring: it is the Maglev table of the backend keys.
		ref, err := maglev.Build(mb, ringSize, cfg.HashSeed)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(s.Ring, ref) {
			t.Errorf("%s: ring differs from maglev.Build of its backends with the configured seed", name)
		}
	}
	if a, b := got["web4"].svc.ID, got["dns6"].svc.ID; a == b {
		t.Errorf("both services have id %d", a)
	}
	if !reflect.DeepEqual(services(c), []datapath.Service{got["web4"].svc, got["dns6"].svc}) &&
		!reflect.DeepEqual(services(c), []datapath.Service{got["dns6"].svc, got["web4"].svc}) {
		t.Errorf("Services() = %v, not what was upserted", names(services(c)))
	}
	dp.checkConflicts(t)
}

// 2. Applying the same configuration again touches nothing.
func TestApplySameConfigIsNoop(t *testing.T) {
	dp := newFakeDP()
	cfg := parse(t, conf(8, 32, web4, dns6))
	c := newController(dp, cfg)
	mustApply(t, c, cfg)
	before := services(c)
	dp.take()

	mustApply(t, c, cfg)
	wantCalls(t, dp.take())
	// An equal configuration decoded afresh is no change either.
	again := parse(t, conf(8, 32, web4, dns6))
	mustApply(t, c, again)
	wantCalls(t, dp.take())
	if !reflect.DeepEqual(services(c), before) {
		t.Errorf("Services() changed by a no-op Apply")
	}
	if c.Config() != again {
		t.Errorf("Config() is not the configuration last applied")
	}
}

// TestSpliceOptions: a service's idle timeout and PROXY protocol reach the
// datapath; applying them again is no change, changing one upserts that
// service only.
func TestSpliceOptions(t *testing.T) {
	splice := func(idle, pp string) string {
		return strings.Replace(conf(8, 32, web4, strings.Replace(web4, "web4\n    vip: 203.0.113.10", "web4b\n    vip: 203.0.113.11", 1)),
			"    affinity_timeout: 30m\n", "    affinity_timeout: 30m\n    idle_timeout: "+idle+"\n    proxy_protocol: "+pp+"\n", 1)
	}
	spliceConf := func(idle, pp string) *config.Config {
		return parse(t, strings.Replace(splice(idle, pp), "interfaces: [eth0]\ndatapath: xdp\n", "datapath: splice\n", 1))
	}
	dp := newFakeDP()
	cfg := spliceConf("10m", "v2")
	c := newController(dp, cfg)
	mustApply(t, c, cfg)
	calls := wantCalls(t, dp.take(), "upsert web4", "upsert web4b")
	if s := calls["web4"].svc; s.IdleTimeout != 10*time.Minute || !s.ProxyProtocol {
		t.Errorf("web4: IdleTimeout %v, ProxyProtocol %v; want 10m and true", s.IdleTimeout, s.ProxyProtocol)
	}
	if s := calls["web4b"].svc; s.IdleTimeout != 0 || s.ProxyProtocol {
		t.Errorf("web4b: IdleTimeout %v, ProxyProtocol %v; want none", s.IdleTimeout, s.ProxyProtocol)
	}
	mustApply(t, c, spliceConf("10m", "v2"))
	wantCalls(t, dp.take())
	mustApply(t, c, spliceConf("10m", "none"))
	if s := wantCalls(t, dp.take(), "upsert web4")["web4"].svc; s.ProxyProtocol || s.IdleTimeout != 10*time.Minute {
		t.Errorf("after proxy_protocol none: %+v", s)
	}
	mustApply(t, c, spliceConf("0s", "none"))
	if s := wantCalls(t, dp.take(), "upsert web4")["web4"].svc; s.IdleTimeout != 0 {
		t.Errorf("after idle_timeout 0s: IdleTimeout %v", s.IdleTimeout)
	}
}

// 3. Adding a backend to one service upserts that service only, keeps the
// ids of the other backends and moves about 1/N of the ring.
func TestApplyAddBackend(t *testing.T) {
	dp := newFakeDP()
	cfg := parse(t, conf(8, 32, web4, dns6))
	c := newController(dp, cfg)
	mustApply(t, c, cfg)
	old := byName(t, c, "web4")
	dp.take()

	mustApply(t, c, parse(t, conf(8, 32, web4Plus, dns6)))
	got := wantCalls(t, dp.take(), "upsert web4")
	s := got["web4"].svc
	if s.ID != old.ID {
		t.Errorf("service id changed from %d to %d", old.ID, s.ID)
	}
	if len(s.Backends) != 4 {
		t.Fatalf("%d backends, want 4", len(s.Backends))
	}
	used := map[uint32]bool{}
	for _, b := range byName(t, c, "dns6").Backends {
		used[b.ID] = true
	}
	for i, b := range old.Backends {
		if s.Backends[i].Addr != b.Addr || s.Backends[i].ID != b.ID {
			t.Errorf("backend %s: id %d, was %d", b.Addr, s.Backends[i].ID, b.ID)
		}
		used[b.ID] = true
	}
	nb := s.Backends[3]
	if nb.Addr != netip.MustParseAddr("192.0.2.14") || nb.ID == 0 || used[nb.ID] {
		t.Errorf("new backend %s has id %d, want a fresh non-zero id", nb.Addr, nb.ID)
	}
	checkRing(t, s, true)
	moved, shuffled := 0, 0 // slots that changed; of those, not to the new backend
	for i := range s.Ring {
		if s.Ring[i] != old.Ring[i] {
			moved++
			if s.Ring[i] != nb.ID {
				shuffled++
			}
		}
	}
	if frac := float64(moved) / ringSize; frac >= 0.40 || moved == 0 {
		t.Errorf("%d of %d slots (%.0f%%) moved adding a 4th backend, want about 25%%", moved, ringSize, 100*frac)
	}
	// Maglev moves a few slots between the old backends too, but few.
	if shuffled > ringSize/10 {
		t.Errorf("%d slots moved between the old backends, want few", shuffled)
	}
	dp.checkConflicts(t)
}

// 4. Draining backends, by state or by weight 0, stay in the service and
// leave the ring.
func TestDrainingBackends(t *testing.T) {
	dp := newFakeDP()
	cfg := parse(t, conf(8, 32, web4))
	c := newController(dp, cfg)
	mustApply(t, c, cfg)
	old := byName(t, c, "web4")
	dp.take()

	w := strings.NewReplacer(
		"address: 192.0.2.12\n", "{address: 192.0.2.12, state: draining}\n",
		"address: 192.0.2.13\n", "{address: 192.0.2.13, weight: 0}\n",
	).Replace(web4)
	drained := parse(t, conf(8, 32, w))
	mustApply(t, c, drained)
	s := wantCalls(t, dp.take(), "upsert web4")["web4"].svc
	if len(s.Backends) != 3 {
		t.Fatalf("%d backends, want 3 (draining ones stay)", len(s.Backends))
	}
	wantState := []datapath.State{datapath.Active, datapath.Draining, datapath.Draining}
	wantWeight := []uint32{1, 1, 0}
	for i, b := range s.Backends {
		if b.State != wantState[i] || b.Weight != wantWeight[i] {
			t.Errorf("backend %s: state %s weight %d, want %s %d", b.Addr, b.State, b.Weight, wantState[i], wantWeight[i])
		}
		if b.ID != old.Backends[i].ID {
			t.Errorf("backend %s: id %d, was %d", b.Addr, b.ID, old.Backends[i].ID)
		}
	}
	checkRing(t, s, true)
	for i, id := range s.Ring {
		if id != s.Backends[0].ID {
			t.Fatalf("slot %d holds %d, want the only active backend %d", i, id, s.Backends[0].ID)
		}
	}

	// With every backend draining the ring is empty.
	all := clone(t, drained)
	all.Services[0].Backends[0].State = config.StateDraining
	mustApply(t, c, all)
	s = wantCalls(t, dp.take(), "upsert web4")["web4"].svc
	for _, b := range s.Backends {
		if b.State != datapath.Draining {
			t.Errorf("backend %s: state %s, want draining", b.Addr, b.State)
		}
	}
	for i, id := range s.Ring {
		if id != 0 {
			t.Fatalf("slot %d holds %d with every backend draining", i, id)
		}
	}
	checkRing(t, s, false)
	dp.checkConflicts(t)
}

// 5. A removed service is deleted from the datapath; a service added later
// gets a fresh id, not the one just released.
func TestRemoveAndReAddService(t *testing.T) {
	dp := newFakeDP()
	both := parse(t, conf(8, 32, web4, dns6))
	c := newController(dp, both)
	mustApply(t, c, both)
	old := byName(t, c, "dns6")
	web := byName(t, c, "web4")
	dp.take()

	mustApply(t, c, parse(t, conf(8, 32, web4)))
	got := wantCalls(t, dp.take(), "delete dns6")
	if !reflect.DeepEqual(got["dns6"].svc, old) {
		t.Errorf("DeleteService got %+v, want the service as applied %+v", got["dns6"].svc, old)
	}
	if n := names(services(c)); !reflect.DeepEqual(n, []string{"web4"}) {
		t.Errorf("Services() = %v, want [web4]", n)
	}

	mustApply(t, c, both)
	s := wantCalls(t, dp.take(), "upsert dns6")["dns6"].svc
	if s.ID == old.ID || s.ID == web.ID {
		t.Errorf("re-added service got id %d; released id %d, web4 has %d: a released id must not come back at once", s.ID, old.ID, web.ID)
	}
	inUse := map[uint32]bool{}
	for _, b := range append(old.Backends, web.Backends...) {
		inUse[b.ID] = true
	}
	for _, b := range s.Backends {
		if b.ID == 0 || inUse[b.ID] {
			t.Errorf("re-added backend %s got id %d, released or in use", b.Addr, b.ID)
		}
		inUse[b.ID] = true
	}
	checkRing(t, s, true)
	dp.checkConflicts(t)
}

// 6. An invalid configuration changes nothing.
func TestInvalidConfigRefused(t *testing.T) {
	dp := newFakeDP()
	cfg := parse(t, conf(8, 32, web4, dns6))
	c := newController(dp, cfg)
	mustApply(t, c, cfg)
	before := services(c)
	dp.take()

	portZero := clone(t, cfg)
	portZero.Services[0].Backends[1].Port = 0
	portZero.Services[0].Backends = append(portZero.Services[0].Backends, config.Backend{
		Address: netip.MustParseAddr("192.0.2.99"), Port: 80, Weight: 1, State: config.StateActive,
	})

	dupVIP := clone(t, cfg)
	dup := dupVIP.Services[0]
	dup.Name = "web4-again"
	dupVIP.Services = append(dupVIP.Services, dup)

	for _, tc := range []struct {
		name string
		cfg  *config.Config
		path string
	}{
		{"backend port 0", portZero, "services[0].backends[1].port"},
		{"duplicate vip", dupVIP, "services[2]"},
		{"nil", nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := c.Apply(tc.cfg)
			if err == nil {
				t.Fatal("Apply accepted an invalid configuration")
			}
			var fe *config.FieldError
			if !errors.As(err, &fe) {
				t.Errorf("error %q is not a *config.FieldError", err)
			} else if fe.Path != tc.path {
				t.Errorf("error names %q, want %q: %v", fe.Path, tc.path, err)
			}
			if !strings.Contains(err.Error(), tc.path) {
				t.Errorf("error %q does not name %s", err, tc.path)
			}
			wantCalls(t, dp.take())
			if !reflect.DeepEqual(services(c), before) {
				t.Errorf("Services() changed by a refused configuration")
			}
			if c.Config() != cfg {
				t.Errorf("Config() changed by a refused configuration")
			}
		})
	}

	// The refused configurations left nothing behind: the next valid one
	// is applied as if they had never been.
	mustApply(t, c, parse(t, conf(8, 32, web4Plus, dns6)))
	s := wantCalls(t, dp.take(), "upsert web4")["web4"].svc
	if len(s.Backends) != 4 {
		t.Errorf("%d backends, want 4", len(s.Backends))
	}
	dp.checkConflicts(t)
}

// 7. A datapath error on one service is reported, the others are applied,
// and the failed one is retried by the next Apply.
func TestDatapathErrorRetried(t *testing.T) {
	dp := newFakeDP()
	cfg := parse(t, conf(8, 32, web4, dns6))
	c := newController(dp, cfg)
	boom := errors.New("boom")
	dp.failUpsert["web4"] = boom

	err := c.Apply(cfg)
	if !errors.Is(err, boom) {
		t.Fatalf("Apply = %v, want the datapath error", err)
	}
	failed := wantCalls(t, dp.take(), "upsert web4", "upsert dns6")["web4"].svc
	if n := names(services(c)); !reflect.DeepEqual(n, []string{"dns6"}) {
		t.Errorf("Services() = %v, want [dns6]", n)
	}
	if c.Config() != nil {
		t.Errorf("Config() = %p after a partial Apply, want nil (never applied in full)", c.Config())
	}

	delete(dp.failUpsert, "web4")
	mustApply(t, c, cfg)
	s := wantCalls(t, dp.take(), "upsert web4")["web4"].svc
	if !reflect.DeepEqual(s, failed) {
		t.Errorf("retried service differs from the one that failed:\n%+v\n%+v", s, failed)
	}
	if c.Config() != cfg {
		t.Errorf("Config() is not the configuration applied in full")
	}
	mustApply(t, c, cfg)
	wantCalls(t, dp.take())

	// A failed change leaves the old service in place and is retried.
	dp.failUpsert["web4"] = boom
	if err := c.Apply(parse(t, conf(8, 32, web4Plus, dns6))); !errors.Is(err, boom) {
		t.Fatalf("Apply = %v, want the datapath error", err)
	}
	wantCalls(t, dp.take(), "upsert web4")
	if got := byName(t, c, "web4"); !reflect.DeepEqual(got, s) {
		t.Errorf("Services() shows the change that failed")
	}
	if c.Config() != cfg {
		t.Errorf("Config() changed by a partial Apply")
	}
	dp.checkConflicts(t)
}

// 7b. While the datapath still holds a service whose change failed, the
// ids of its backends are not handed to anyone else.
func TestFailedChangeKeepsBackendIDs(t *testing.T) {
	dp := newFakeDP()
	a := func(backends ...string) string { return svc("a", "203.0.113.1", 80, backends...) }
	b := func(backends ...string) string { return svc("b", "203.0.113.2", 80, backends...) }
	steps := []string{
		conf(2, 6, a("192.0.2.1", "192.0.2.2")),
		conf(2, 6, a("192.0.2.1"), b("192.0.2.11", "192.0.2.12", "192.0.2.13")),
		conf(2, 6, a("192.0.2.1"), b("192.0.2.12", "192.0.2.13", "192.0.2.14")),
		conf(2, 6, a("192.0.2.1"), b("192.0.2.12", "192.0.2.13", "192.0.2.14", "192.0.2.15")),
	}
	c := newController(dp, parse(t, steps[0]))
	mustApply(t, c, parse(t, steps[0]))
	held := byName(t, c, "a").Backends[1] // 192.0.2.2, which the failing change drops

	dp.failUpsert["a"] = errors.New("boom")
	for i, step := range steps[1:] {
		if err := c.Apply(parse(t, step)); err == nil {
			t.Fatalf("step %d: Apply succeeded with service a failing", i+1)
		}
		for _, s := range services(c) {
			if s.Name == "a" {
				continue
			}
			for _, be := range s.Backends {
				if be.ID == held.ID {
					t.Errorf("step %d: backend %s of %s got id %d, still that of a's backend %s in the datapath", i+1, be.Addr, s.Name, be.ID, held.Addr)
				}
			}
		}
	}
	dp.checkConflicts(t)

	delete(dp.failUpsert, "a")
	mustApply(t, c, parse(t, steps[3]))
	if got := byName(t, c, "a"); len(got.Backends) != 1 {
		t.Errorf("a has %d backends after the retry, want 1", len(got.Backends))
	}
	dp.checkConflicts(t)
}

// 7c. A service whose deletion failed keeps its id until it is gone, and
// the deletion is retried.
func TestFailedDeleteKeepsServiceID(t *testing.T) {
	dp := newFakeDP()
	a := svc("a", "203.0.113.1", 80, "192.0.2.1")
	b := svc("b", "203.0.113.2", 80, "192.0.2.2")
	cc := svc("c", "203.0.113.3", 80, "192.0.2.3")
	d := svc("d", "203.0.113.4", 80, "192.0.2.4")
	first := parse(t, conf(3, 8, a, b))
	c := newController(dp, first)
	mustApply(t, c, first)
	old := byName(t, c, "b")
	dp.take()

	boom := errors.New("boom")
	dp.failDelete["b"] = boom
	withoutB := parse(t, conf(3, 8, a))
	if err := c.Apply(withoutB); !errors.Is(err, boom) {
		t.Fatalf("Apply = %v, want the datapath error", err)
	}
	wantCalls(t, dp.take(), "delete b")
	if n := names(services(c)); !sameSet(n, []string{"a", "b"}) {
		t.Errorf("Services() = %v, want b still there", n)
	}
	if c.Config() != first {
		t.Errorf("Config() changed by a partial Apply")
	}

	// While b is still in the datapath no other service gets its id (here
	// the pool has no other free id and says so).
	for _, step := range []*config.Config{parse(t, conf(3, 8, a, cc)), parse(t, conf(3, 8, a, cc, d))} {
		err := c.Apply(step)
		if err == nil {
			t.Fatal("Apply succeeded while b's deletion fails")
		}
		for _, s := range services(c) {
			if s.Name != "b" && s.ID == old.ID {
				t.Errorf("service %s got id %d, still b's in the datapath", s.Name, s.ID)
			}
		}
		dp.checkConflicts(t)
	}
	dp.take()

	delete(dp.failDelete, "b")
	mustApply(t, c, parse(t, conf(3, 8, a, cc)))
	got := wantCalls(t, dp.take(), "delete b")
	if !reflect.DeepEqual(got["b"].svc, old) {
		t.Errorf("retried DeleteService got %+v, want %+v", got["b"].svc, old)
	}
	// Once b is gone its id is free again: the pool has gone round.
	mustApply(t, c, parse(t, conf(3, 8, a, cc, d)))
	s := wantCalls(t, dp.take(), "upsert d")["d"].svc
	if s.ID != old.ID {
		t.Errorf("d got id %d, want %d, the only free one", s.ID, old.ID)
	}
	dp.checkConflicts(t)
}

// 8. The id pool: stable ids, exhaustion, and reuse only after going round.
func TestIDPool(t *testing.T) {
	p := newIDPool(1, 4) // ids 1..3
	for i, key := range []string{"a", "b", "c"} {
		id, err := p.get(key)
		if err != nil || id != uint32(i+1) {
			t.Fatalf("get(%s) = %d, %v; want %d", key, id, err, i+1)
		}
	}
	if id, err := p.get("b"); err != nil || id != 2 {
		t.Errorf("get(b) again = %d, %v; want 2", id, err)
	}
	_, err := p.get("d")
	if err == nil || !strings.Contains(err.Error(), "tables section") {
		t.Fatalf("get on a full pool = %v, want an error pointing at the tables section", err)
	}
	p.release("b")
	p.release("nonexistent")
	if id, err := p.get("d"); err != nil || id != 2 {
		t.Errorf("get(d) after release(b) = %d, %v; want 2 (the only free id)", id, err)
	}
	if id, _ := p.get("a"); id != 1 {
		t.Errorf("get(a) = %d, want 1", id)
	}

	// A released id waits for the pool to go round.
	q := newIDPool(0, 4)
	q.get("x")
	q.release("x")
	for i, key := range []string{"y", "z", "w"} {
		if id, _ := q.get(key); id != uint32(i+1) {
			t.Errorf("get(%s) = %d, want %d: id 0 released too early", key, id, i+1)
		}
	}
	if id, err := q.get("v"); err != nil || id != 0 {
		t.Errorf("get(v) after wrap-around = %d, %v; want 0", id, err)
	}

	q.retain(func(id uint32) bool { return id == 0 }) // v's
	if len(q.byKey) != 1 || len(q.used) != 1 || q.byKey["v"] != 0 {
		t.Errorf("retain kept %v", q.byKey)
	}

	if _, err := newIDPool(0, 0).get("k"); err == nil {
		t.Error("get on an empty pool succeeded")
	}
}

// 8b. The controller reports an exhausted pool without touching the
// datapath, and a refused configuration leaves no id behind.
func TestControllerPoolExhausted(t *testing.T) {
	cfg := parse(t, conf(8, 32, web4, dns6))

	dp := newFakeDP()
	c := New(dp, cfg.HashSeed, ringSize, 1, 32, discard())
	err := c.Apply(cfg)
	if err == nil || !strings.Contains(err.Error(), "tables section") {
		t.Errorf("Apply of 2 services with room for 1 = %v, want an error pointing at the tables section", err)
	}
	wantCalls(t, dp.take())

	dp = newFakeDP()
	c = New(dp, cfg.HashSeed, ringSize, 8, 5, discard()) // backend ids 1..5
	err = c.Apply(cfg)
	if err == nil || !strings.Contains(err.Error(), "tables section") || !strings.Contains(err.Error(), "dns6") {
		t.Errorf("Apply of 6 backends with room for 5 = %v, want an error naming dns6 and the tables section", err)
	}
	wantCalls(t, dp.take())
	if len(services(c)) != 0 || c.Config() != nil {
		t.Errorf("a refused Apply changed the state")
	}
	// Three backends fit, whatever the refused Apply allocated.
	mustApply(t, c, parse(t, conf(8, 32, dns6)))
	wantCalls(t, dp.take(), "upsert dns6")
	dp.checkConflicts(t)

	// Every id 1..maxBackends is usable.
	dp = newFakeDP()
	c = New(dp, cfg.HashSeed, ringSize, 8, 3, discard())
	mustApply(t, c, parse(t, conf(8, 32, web4)))
	ids := map[uint32]bool{}
	for _, b := range byName(t, c, "web4").Backends {
		ids[b.ID] = true
	}
	if !reflect.DeepEqual(ids, map[uint32]bool{1: true, 2: true, 3: true}) {
		t.Errorf("backend ids %v, want 1..3", ids)
	}
}

// 9. Services() is sorted by id; Config() is the last configuration
// applied in full.
func TestServicesSortedAndConfig(t *testing.T) {
	dp := newFakeDP()
	x := svc("x", "203.0.113.1", 80, "192.0.2.1")
	y := svc("y", "203.0.113.2", 80, "192.0.2.2")
	z := svc("z", "203.0.113.3", 80, "192.0.2.3")
	if c := New(dp, 0, ringSize, 8, 8, discard()); c.Config() != nil || len(services(c)) != 0 {
		t.Fatal("a new controller has state")
	}
	first := parse(t, conf(8, 8, z, y, x)) // z gets the lowest id
	c := newController(dp, first)
	mustApply(t, c, first)
	mustApply(t, c, parse(t, conf(8, 8, y, x)))
	last := parse(t, conf(8, 8, y, z, x)) // z comes back with the highest id
	mustApply(t, c, last)

	ss := services(c)
	if n := names(ss); !reflect.DeepEqual(n, []string{"y", "x", "z"}) {
		t.Errorf("Services() = %v, want [y x z] (by id)", n)
	}
	for i := 1; i < len(ss); i++ {
		if ss[i-1].ID >= ss[i].ID {
			t.Errorf("Services() not sorted by id: %d before %d", ss[i-1].ID, ss[i].ID)
		}
	}
	if c.Config() != last {
		t.Errorf("Config() is not the last configuration applied")
	}

	dp.failUpsert["w"] = errors.New("boom")
	if err := c.Apply(parse(t, conf(8, 8, y, z, x, svc("w", "203.0.113.4", 80, "192.0.2.4")))); err == nil {
		t.Fatal("Apply succeeded with a failing service")
	}
	if c.Config() != last {
		t.Errorf("Config() changed by an Apply that failed in part")
	}
	dp.checkConflicts(t)
}

// The controller is safe for concurrent use.
func TestConcurrentApply(t *testing.T) {
	dp := newFakeDP()
	cfgs := []*config.Config{parse(t, conf(8, 32, web4, dns6)), parse(t, conf(8, 32, web4Plus)), parse(t, conf(8, 32, dns6))}
	c := newController(dp, cfgs[0])
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			for j := range 20 {
				if err := c.Apply(cfgs[(i+j)%len(cfgs)]); err != nil {
					t.Error(err)
				}
				services(c)
				c.Config()
			}
		})
	}
	wg.Wait()
	mustApply(t, c, cfgs[0])
	if n := names(services(c)); !sameSet(n, []string{"web4", "dns6"}) {
		t.Errorf("Services() = %v", n)
	}
	dp.checkConflicts(t)
}

// TestRingsOnceAndOnlyWhenChanged checks what the controller does with
// rings: it keeps none; a change that leaves a service's ring inputs alone
// (its affinity timeout) sends the service with KeepRing, without building
// its ring; a change of its backends sends a new ring; a reload of the same
// configuration sends nothing.
func TestRingsOnceAndOnlyWhenChanged(t *testing.T) {
	dp := newFakeDP()
	cfg := parse(t, conf(8, 32, web4, dns6))
	c := newController(dp, cfg)
	mustApply(t, c, cfg)
	for _, call := range dp.take() {
		if call.keptRing || len(call.svc.Ring) != ringSize {
			t.Errorf("first apply of %s: kept %v, ring of %d slots", call.svc.Name, call.keptRing, len(call.svc.Ring))
		}
	}
	for _, s := range c.Services() {
		if s.Ring != nil {
			t.Errorf("the controller keeps the ring of %s", s.Name)
		}
	}
	ring := byName(t, c, "web4").Ring
	mustApply(t, c, parse(t, conf(8, 32, strings.Replace(web4, "affinity_timeout: 30m", "affinity_timeout: 1h", 1), dns6)))
	call := wantCalls(t, dp.take(), "upsert web4")["web4"]
	if !call.keptRing || call.svc.AffinityTimeout != time.Hour || !reflect.DeepEqual(call.svc.Ring, ring) {
		t.Errorf("affinity timeout changed: kept %v, timeout %v", call.keptRing, call.svc.AffinityTimeout)
	}
	mustApply(t, c, parse(t, conf(8, 32, strings.Replace(web4Plus, "affinity_timeout: 30m", "affinity_timeout: 1h", 1), dns6)))
	if call := wantCalls(t, dp.take(), "upsert web4")["web4"]; call.keptRing || reflect.DeepEqual(call.svc.Ring, ring) {
		t.Errorf("a backend added: kept %v, same ring %v", call.keptRing, reflect.DeepEqual(call.svc.Ring, ring))
	}
	mustApply(t, c, parse(t, conf(8, 32, strings.Replace(web4Plus, "affinity_timeout: 30m", "affinity_timeout: 1h", 1), dns6)))
	wantCalls(t, dp.take())
}
