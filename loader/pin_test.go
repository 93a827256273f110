package loader

import (
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/bpf"
	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/maglev"
	"github.com/tetherlb/tether/maps"
)

var (
	pinVIP     = netip.MustParseAddr("203.0.113.10")
	pinClient  = netip.MustParseAddr("192.0.2.10")
	pinBackend = netip.MustParseAddr("198.51.100.11")
)

const pinRing = 251

// pinOpts are small tables pinned in dir.
func pinOpts(dir string) Options {
	return Options{Connections: 8192, Affinity: 1024, RingSize: pinRing, MaxServices: 8, MaxBackends: 16, PinDir: dir}
}

// xdpProgID returns the id of the XDP program on h's eth0, 0 if none.
func xdpProgID(t *testing.T, h *lab.Host) uint32 {
	t.Helper()
	nh, err := h.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	lk, err := nh.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	if x := lk.Attrs().Xdp; x != nil && x.Attached {
		return x.ProgId
	}
	return 0
}

func progID(t *testing.T, p *ebpf.Program) uint32 {
	t.Helper()
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	return uint32(id)
}

// attach attaches o to h's eth0, from h's namespace.
func attach(t *testing.T, h *lab.Host, o *Objects, mode Mode) Attached {
	t.Helper()
	var how Attached
	if err := h.Do(func() (err error) { how, err = o.Attach("eth0", mode); return err }); err != nil {
		t.Fatal(err)
	}
	return how
}

// The datapath outlives its Objects: a second load adopts the pinned maps
// with every entry, replaces the program of the pinned link in place, and
// reads back the services; other sizes, layouts and versions are refused;
// Remove and RemovePinned leave nothing.
func TestPinAndAdopt(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 1, Clients: 1})
	dir := filepath.Join(l.BPFFS, "tether")
	opts := pinOpts(dir)

	first, err := Load(opts)
	if err != nil {
		t.Fatal(err)
	}
	if first.Adopted() {
		t.Fatal("first load reports adopted maps")
	}
	if how := attach(t, l.Balancer, first, ModeNative); how != AttachedNew {
		t.Errorf("first attach: %v", how)
	}
	for _, p := range []string{"v1/meta", "v1/maps/conns4", "v1/maps/rings", "v1/maps/reasons", "v1/links/eth0"} {
		if _, err := os.Stat(filepath.Join(dir, p)); err != nil {
			t.Errorf("pinned layout: %v", err)
		}
	}
	if _, err := Load(opts); err == nil || !strings.Contains(err.Error(), "in use by another tether") {
		t.Errorf("a second load while the first runs: %v, want a refusal", err)
	}

	// State as a daemon leaves it: a service, its backend and ring, a flow,
	// an affinity entry, and a backend of no service.
	m := first.Maps
	ring, err := maglev.Build([]maglev.Backend{{ID: 3, Key: "b", Weight: 1}}, pinRing, maglev.DefaultSeed)
	if err != nil {
		t.Fatal(err)
	}
	must(t, m.PutBackend(3, maps.Backend{Service: 2, Addr: pinBackend, Port: 8765, State: maps.StateActive}))
	must(t, m.PutBackend(9, maps.Backend{Service: 5, Addr: pinBackend, Port: 9000, State: maps.StateActive}))
	must(t, m.PublishRing(2, ring))
	must(t, m.PutService(pinVIP, 8765, 6, maps.Service{ID: 2, SourceAffinity: true, AffinityTimeout: time.Hour}))
	must(t, m.PutAffinity(2, pinClient, 3, time.Minute))
	k := bpf.TetherFlowKey4{Src: maglev.AddrWords(pinClient)[0], Dst: maglev.AddrWords(pinVIP)[0], Sport: maps.Port(40000), Dport: maps.Port(8765), Proto: 6}
	must(t, m.Raw().Conns4.Put(&k, &bpf.TetherConn{Backend: 3, Service: 2}))
	// More flows than one batch of Entries counts.
	var keys []bpf.TetherFlowKey4
	var vals []bpf.TetherConn
	for i := range 5000 {
		keys = append(keys, bpf.TetherFlowKey4{Src: uint32(i + 1), Dst: k.Dst, Sport: 1, Dport: k.Dport, Proto: 6})
		vals = append(vals, bpf.TetherConn{Backend: 3, Service: 2})
	}
	if _, err := m.Raw().Conns4.BatchUpdate(keys, vals, nil); err != nil {
		t.Fatal(err)
	}
	firstProg := progID(t, first.TetherXdp)
	must(t, first.Close())
	if got := xdpProgID(t, l.Balancer); got != firstProg {
		t.Fatalf("after Close the interface runs program %d, want %d still attached", got, firstProg)
	}

	// Adoption, through the datapath.
	var x *XDP
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if err := l.Balancer.Do(func() (err error) { x, err = NewXDP(opts, []string{"eth0"}, ModeNative, log); return err }); err != nil {
		t.Fatal(err)
	}
	if !x.Adopted() {
		t.Fatal("second load did not adopt the pinned maps")
	}
	if got, want := xdpProgID(t, l.Balancer), progID(t, x.objs.TetherXdp); got != want || got == firstProg {
		t.Errorf("interface runs program %d, want the new one %d (old %d)", got, want, firstProg)
	}
	m = x.Maps()
	if f, ok, err := m.LookupFlow(netip.AddrPortFrom(pinClient, 40000), netip.AddrPortFrom(pinVIP, 8765), 6); err != nil || !ok || f.Backend != 3 {
		t.Errorf("flow after adoption: %+v %v %v", f, ok, err)
	}
	if a, ok, err := m.LookupAffinity(2, pinClient); err != nil || !ok || a.Backend != 3 {
		t.Errorf("affinity after adoption: %+v %v %v", a, ok, err)
	}
	if c, a, err := m.Entries(); err != nil || c != 5001 || a != 1 {
		t.Errorf("after adoption the tables hold %d flows and %d affinity entries (%v), want 5001 and 1", c, a, err)
	}
	if got, err := m.Ring(2); err != nil || !reflect.DeepEqual(got, ring) {
		t.Errorf("ring after adoption differs (%v)", err)
	}
	want := []datapath.Service{{
		ID: 2, VIP: pinVIP, Port: 8765, Proto: 6, SourceAffinity: true, AffinityTimeout: time.Hour, Forwarding: datapath.DSR,
		Backends: []datapath.Backend{{ID: 3, Addr: pinBackend, Port: 8765, State: datapath.Active}},
		Ring:     ring,
	}}
	if got := x.AdoptedServices(); !reflect.DeepEqual(got, want) {
		t.Errorf("AdoptedServices() = %+v\nwant %+v", got, want)
	}
	if b, err := m.LookupBackend(9); err != nil || b.State != maps.StateUnused {
		t.Errorf("backend of no service after adoption: %+v %v, want cleared", b, err)
	}
	// A ring stored with its signature is handed over by its signature
	// alone: the next daemon does not read it back.
	signed := want[0]
	signed.Name, signed.Ring, signed.KeepRing, signed.RingSignature = "signed", nil, true, 77
	// Down: nothing to resolve (resolution runs on threads outside the
	// lab's namespace).
	signed.Backends = []datapath.Backend{{ID: 3, Addr: pinBackend, Port: 8765, State: datapath.Down}}
	must(t, l.Balancer.Do(func() error { return x.UpsertService(signed) }))
	must(t, x.Close())
	if err := l.Balancer.Do(func() (err error) { x, err = NewXDP(opts, []string{"eth0"}, ModeNative, log); return err }); err != nil {
		t.Fatal(err)
	}
	if got := x.AdoptedServices(); len(got) != 1 || got[0].RingSignature != 77 || got[0].Ring != nil {
		t.Errorf("AdoptedServices() of a signed ring = %+v, want signature 77 and no ring", got)
	}
	if got, err := x.Maps().Ring(2); err != nil || !reflect.DeepEqual(got, ring) {
		t.Errorf("signed ring after adoption differs (%v)", err)
	}
	must(t, x.Close())

	// Other table sizes, another layout: refused with how to proceed.
	bigger := opts
	bigger.Connections = 16384
	bigger.RingSize = 257
	_, err = Load(bigger)
	var ie *IncompatibleError
	if !errors.As(err, &ie) || !ie.Sizes {
		t.Fatalf("load with other sizes: %v, want an IncompatibleError about sizes", err)
	}
	for _, s := range []string{"tables.connections is 8192 there, 16384 here", "tables.ring_size is 251 there, 257 here", "tether detach --pin-dir " + dir} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("refusal %q lacks %q", err, s)
		}
	}
	meta, err := ebpf.LoadPinnedMap(filepath.Join(dir, "v1", "meta"), nil)
	if err != nil {
		t.Fatal(err)
	}
	var mv metaValue
	must(t, meta.Lookup(uint32(0), &mv))
	orig := mv
	mv.Fingerprint++
	must(t, meta.Put(uint32(0), mv))
	_, err = Load(opts)
	if !errors.As(err, &ie) || ie.Sizes || !strings.Contains(err.Error(), "incompatible layout") {
		t.Errorf("load with another layout: %v, want an incompatible layout", err)
	}
	must(t, meta.Put(uint32(0), orig))
	meta.Close()
	// A pinned map unlike the program's (what ErrMapIncompatible reports).
	reasons := filepath.Join(dir, "v1", "maps", bpf.TetherMapReasons)
	saved := filepath.Join(l.BPFFS, "saved")
	must(t, os.Rename(reasons, saved))
	bogus, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 4, ValueSize: 8, MaxEntries: uint32(bpf.TetherReasonR_MAX)})
	if err != nil {
		t.Fatal(err)
	}
	must(t, bogus.Pin(reasons))
	bogus.Close()
	_, err = Load(opts)
	if !errors.As(err, &ie) || ie.Sizes || !strings.Contains(err.Error(), "incompatible layout (map reasons: ") {
		t.Errorf("load over a map of another type: %v, want an incompatible layout naming the map", err)
	}
	must(t, os.Remove(reasons))
	must(t, os.Rename(saved, reasons))
	other := filepath.Join(l.BPFFS, "other")
	must(t, os.MkdirAll(filepath.Join(other, "v2"), 0o700))
	_, err = Load(pinOpts(other))
	if !errors.As(err, &ie) || !strings.Contains(err.Error(), "v2, this tether reads layout v1") {
		t.Errorf("load over layout v2: %v, want a refusal", err)
	}
	if _, err := RemovePinned(other); err != nil {
		t.Error(err)
	}

	// An interface no longer listed is detached and unpinned.
	third, err := Load(opts)
	if err != nil {
		t.Fatal(err)
	}
	gone, err := third.DetachUnlisted(nil)
	if err != nil || !reflect.DeepEqual(gone, []string{"eth0"}) {
		t.Errorf("DetachUnlisted = %v, %v; want [eth0]", gone, err)
	}
	if id := xdpProgID(t, l.Balancer); id != 0 {
		t.Errorf("program %d still attached to an interface no longer listed", id)
	}
	if how := attach(t, l.Balancer, third, ModeGeneric); how != AttachedNew {
		t.Errorf("attach after detach: %v", how)
	}
	must(t, third.Close())

	// The mode changed: the pinned link is replaced by a new one.
	fourth, err := Load(opts)
	if err != nil {
		t.Fatal(err)
	}
	if how := attach(t, l.Balancer, fourth, ModeNative); how != AttachedAgain {
		t.Errorf("attach in another mode: %v, want %v", how, AttachedAgain)
	}
	must(t, fourth.Close())

	detached, err := RemovePinned(dir)
	if err != nil || !reflect.DeepEqual(detached, []string{"eth0"}) {
		t.Errorf("RemovePinned = %v, %v; want [eth0]", detached, err)
	}
	if id := xdpProgID(t, l.Balancer); id != 0 {
		t.Errorf("program %d still attached after RemovePinned", id)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin directory after RemovePinned: %v", err)
	}
}

// A first start that fails leaves nothing attached or pinned.
func TestFailedFirstStartLeavesNothing(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 1, Clients: 1})
	dir := filepath.Join(l.BPFFS, "tether")
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	err := l.Balancer.Do(func() error {
		x, err := NewXDP(pinOpts(dir), []string{"eth0", "eth9"}, ModeNative, log)
		if err == nil {
			x.Close()
		}
		return err
	})
	if err == nil || !strings.Contains(err.Error(), "eth9") {
		t.Fatalf("NewXDP with a missing interface: %v", err)
	}
	if id := xdpProgID(t, l.Balancer); id != 0 {
		t.Errorf("program %d attached after a failed start", id)
	}
	if entries, err := os.ReadDir(dir); err == nil && len(entries) > 0 {
		t.Errorf("pin directory holds %v after a failed first start", entries)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// The fingerprint of the maps' definitions ignores the sizes a
// configuration sets and catches any other change.
func TestFingerprint(t *testing.T) {
	load := func() *ebpf.CollectionSpec {
		spec, err := bpf.LoadTether()
		if err != nil {
			t.Fatal(err)
		}
		return spec
	}
	base := fingerprint(load())
	for _, tc := range []struct {
		desc   string
		change func(*ebpf.CollectionSpec)
		same   bool
	}{
		{"connection table size", func(s *ebpf.CollectionSpec) { s.Maps[bpf.TetherMapConns4].MaxEntries *= 2 }, true},
		{"ring size", func(s *ebpf.CollectionSpec) { s.Maps[bpf.TetherMapRings].InnerMap.MaxEntries++ }, true},
		{"reason count", func(s *ebpf.CollectionSpec) { s.Maps[bpf.TetherMapReasons].MaxEntries++ }, false},
		{"map type", func(s *ebpf.CollectionSpec) { s.Maps[bpf.TetherMapConns4].Type = ebpf.Hash }, false},
		{"a map more", func(s *ebpf.CollectionSpec) { s.Maps["extra"] = s.Maps[bpf.TetherMapReasons].Copy() }, false},
		{"a map less", func(s *ebpf.CollectionSpec) { delete(s.Maps, bpf.TetherMapSvcStats) }, false},
		{"global variables", func(s *ebpf.CollectionSpec) { delete(s.Maps, ".rodata") }, true},
		{"value layout", func(s *ebpf.CollectionSpec) {
			ms := s.Maps[bpf.TetherMapConns4]
			st := btf.Copy(ms.Value).(*btf.Struct)
			st.Members[0], st.Members[1] = st.Members[1], st.Members[0]
			st.Members[0].Offset, st.Members[1].Offset = st.Members[1].Offset, st.Members[0].Offset
			st.Members[0].Type = &btf.Int{Size: 2}
			ms.Value = st
		}, false},
	} {
		spec := load()
		tc.change(spec)
		if got := fingerprint(spec) == base; got != tc.same {
			t.Errorf("%s: fingerprint unchanged = %v, want %v", tc.desc, got, tc.same)
		}
	}
}

// labSpec makes a pin directory on a lab's bpffs and the program's spec
// sized by pinOpts there.
func labSpec(t *testing.T) (dir string, opts Options, spec *ebpf.CollectionSpec, ringSize uint32) {
	t.Helper()
	l := lab.NewT(t, lab.Options{Backends: 1, Clients: 1})
	dir = filepath.Join(l.BPFFS, "tether")
	opts = pinOpts(dir)
	spec, ringSize, err := sizedSpec(opts)
	if err != nil {
		t.Fatal(err)
	}
	return dir, opts, spec, ringSize
}

// TestAdoptFewerReasons adopts state pinned by a tether that counted fewer
// drop and pass reasons (enum reason grows at its end): the reasons map is
// lengthened with its counters kept, and every other map is adopted. A
// stop between the new map's pin and the meta map is completed by the next
// start.
func TestAdoptFewerReasons(t *testing.T) {
	dir, opts, spec, ringSize := labSpec(t)
	full := spec.Maps[bpf.TetherMapReasons].MaxEntries
	const older = 14 // the count before the L4 length reasons
	spec.Maps[bpf.TetherMapReasons].MaxEntries = older
	old := &Objects{}
	must(t, old.loadPinned(spec, ringSize, dir))
	for r := uint32(1); r < older; r++ {
		per := make([]uint64, mustCPUs(t))
		per[0] = uint64(100 + r)
		must(t, old.TetherMaps.Reasons.Put(r, per))
	}
	k := bpf.TetherFlowKey4{Src: 1, Dst: 2, Sport: 3, Dport: 4, Proto: 6}
	must(t, old.TetherMaps.Conns4.Put(&k, &bpf.TetherConn{Backend: 3, Service: 2}))
	must(t, old.Close())

	check := func(o *Objects) {
		t.Helper()
		if !o.Adopted() {
			t.Fatal("state not adopted")
		}
		if n := o.TetherMaps.Reasons.MaxEntries(); n != full {
			t.Fatalf("reasons map has %d entries, want %d", n, full)
		}
		got, err := o.Maps.Reasons()
		must(t, err)
		for r := bpf.TetherReason(1); r < bpf.TetherReasonR_MAX; r++ {
			want := uint64(0)
			if r < older {
				want = uint64(100 + r)
			}
			if n := got[maps.ReasonName(r)]; n != want {
				t.Errorf("reason %s: %d, want %d", maps.ReasonName(r), n, want)
			}
		}
		var c bpf.TetherConn
		if err := o.TetherMaps.Conns4.Lookup(&k, &c); err != nil || c.Backend != 3 {
			t.Errorf("connection entry after the upgrade: %+v, %v", c, err)
		}
	}
	o, err := Load(opts)
	if err != nil {
		t.Fatalf("adopt state with fewer reasons: %v", err)
	}
	check(o)
	// As if that start had stopped before writing the meta map: the long
	// map is pinned under the old fingerprint.
	meta, err := ebpf.LoadPinnedMap(filepath.Join(dir, "v1", "meta"), nil)
	must(t, err)
	defer meta.Close()
	var mv metaValue
	must(t, meta.Lookup(uint32(0), &mv))
	newFP := mv.Fingerprint
	mv.Fingerprint = fingerprint(spec)
	must(t, meta.Put(uint32(0), mv))
	must(t, o.Close())
	o, err = Load(opts)
	if err != nil {
		t.Fatalf("adopt after a stopped upgrade: %v", err)
	}
	check(o)
	must(t, meta.Lookup(uint32(0), &mv))
	if mv.Fingerprint != newFP {
		t.Errorf("meta fingerprint %#x after the second start, want %#x", mv.Fingerprint, newFP)
	}
	must(t, o.Remove())
}

func mustCPUs(t *testing.T) int {
	t.Helper()
	n, err := ebpf.PossibleCPU()
	must(t, err)
	return n
}

// TestAdoptUnmappedRings: rings pinned by a tether whose rings were not
// memory-mappable are adopted, and new rings are made like them (the
// kernel refuses an inner map whose flags differ from the template's).
func TestAdoptUnmappedRings(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 1, Clients: 1})
	dir := filepath.Join(l.BPFFS, "tether")
	opts := pinOpts(dir)
	spec, ringSize, err := sizedSpec(opts)
	must(t, err)
	if spec.Maps[bpf.TetherMapRings].InnerMap.Flags&unix.BPF_F_MMAPABLE == 0 {
		t.Fatal("the rings' template is not memory-mappable: nothing to test")
	}
	spec.Maps[bpf.TetherMapRings].InnerMap.Flags &^= unix.BPF_F_MMAPABLE
	old := &Objects{}
	must(t, old.loadPinned(spec, ringSize, dir))
	old.Maps = maps.New(&old.TetherMaps, ringSize)
	ring := func(a, b uint32) []uint32 {
		r := make([]uint32, ringSize)
		for i := range r {
			r[i] = []uint32{a, b}[i%2]
		}
		return r
	}
	must(t, old.Maps.PublishRing(1, ring(1, 2)))
	must(t, old.Close())

	o, err := Load(opts)
	if err != nil {
		t.Fatalf("adopt unmapped rings: %v", err)
	}
	defer o.Remove()
	if !o.Adopted() {
		t.Fatal("state not adopted")
	}
	got, err := o.Maps.Ring(1)
	must(t, err)
	if !slices.Equal(got, ring(1, 2)) {
		t.Fatal("the adopted ring reads back otherwise")
	}
	must(t, o.Maps.PublishRing(1, ring(3, 4)))
	must(t, o.Maps.PublishRing(2, ring(5, 6)))
	var inner *ebpf.Map
	must(t, o.TetherMaps.Rings.Lookup(uint32(2), &inner))
	defer inner.Close()
	if inner.Flags()&unix.BPF_F_MMAPABLE != 0 {
		t.Errorf("ring flags %#x: mapped although the template is not", inner.Flags())
	}
	for id, want := range map[uint32][]uint32{1: ring(3, 4), 2: ring(5, 6)} {
		got, err := o.Maps.Ring(id)
		must(t, err)
		if !slices.Equal(got, want) {
			t.Fatalf("ring %d reads back otherwise after publishing on adopted state", id)
		}
	}
}

// TestRingsMapped: rings of a fresh start are memory-mapped, and read back
// as published.
func TestRingsMapped(t *testing.T) {
	o, err := Load(Options{Connections: 8192, Affinity: 1024, RingSize: pinRing, MaxServices: 8, MaxBackends: 16})
	must(t, err)
	defer o.Close()
	r := make([]uint32, pinRing)
	for i := range r {
		r[i] = uint32(1 + i%5)
	}
	must(t, o.Maps.PublishRing(3, r))
	var inner *ebpf.Map
	must(t, o.TetherMaps.Rings.Lookup(uint32(3), &inner))
	defer inner.Close()
	if inner.Flags()&unix.BPF_F_MMAPABLE == 0 {
		t.Errorf("ring flags %#x: not memory-mapped", inner.Flags())
	}
	got, err := o.Maps.Ring(3)
	must(t, err)
	if !slices.Equal(got, r) {
		t.Fatal("the ring reads back otherwise")
	}
}

// TestAdoptWithoutNATMaps adopts state pinned by a tether that had no NAT
// maps and counted fewer reasons: its maps and their entries are kept, the
// NAT maps are made and pinned, and the meta map gets the new fingerprint.
func TestAdoptWithoutNATMaps(t *testing.T) {
	dir, opts, spec, ringSize := labSpec(t)
	old := &Objects{}
	must(t, old.loadPinned(spec, ringSize, dir))
	k := bpf.TetherFlowKey4{Src: 1, Dst: 2, Sport: 3, Dport: 4, Proto: 6}
	must(t, old.TetherMaps.Conns4.Put(&k, &bpf.TetherConn{Backend: 3, Service: 2}))
	newFP := fingerprint(spec)
	must(t, old.Close())
	// What that tether pinned: no NAT maps, 18 reasons, its fingerprint.
	for _, name := range allAdded() {
		must(t, os.Remove(filepath.Join(dir, "v1", "maps", name)))
	}
	older := *spec
	older.Maps = map[string]*ebpf.MapSpec{}
	for name, ms := range spec.Maps {
		if !slices.Contains(allAdded(), name) {
			older.Maps[name] = ms.Copy()
		}
	}
	older.Maps[bpf.TetherMapReasons].MaxEntries = uint32(bpf.TetherReasonR_RESET_NAT_PORTS)
	meta, err := ebpf.LoadPinnedMap(filepath.Join(dir, "v1", "meta"), nil)
	must(t, err)
	defer meta.Close()
	var mv metaValue
	must(t, meta.Lookup(uint32(0), &mv))
	mv.Fingerprint = fingerprint(&older)
	must(t, meta.Put(uint32(0), mv))

	// That is the layout tether pinned before NAT (fingerprint of the
	// object of commit b3380f7, the last without it).
	const beforeNAT = 0x4ada32ecf6e9e31f
	if missing, ok := earlierLayout(spec, beforeNAT); !ok || !sameSet(missing, allAdded()) {
		t.Fatalf("the layout before NAT is not adopted: missing %v, %v", missing, ok)
	}
	// Nor is the layout of the tether that had NAT but no tunnels (commit
	// 86406d6), which lacks only the tunnels and VIP maps.
	const beforeTunnels = 0xb98473f5ea29357
	if missing, ok := earlierLayout(spec, beforeTunnels); !ok || !sameSet(missing, []string{bpf.TetherMapTunnels, bpf.TetherMapVips, bpf.TetherMapSyncEvents, bpf.TetherMapSyncLost, bpf.TetherMapInsertGuard, bpf.TetherMapTraceEvents}) {
		t.Fatalf("the layout before tunnels is not adopted: missing %v, %v", missing, ok)
	}
	// Nor is the layout of the tether that had tunnels and VIPs but did
	// not share entries (commit b220464), which lacks only the sync maps.
	const beforeSync = 0x43c6e2299270864a
	if missing, ok := earlierLayout(spec, beforeSync); !ok || !sameSet(missing, []string{bpf.TetherMapSyncEvents, bpf.TetherMapSyncLost, bpf.TetherMapInsertGuard, bpf.TetherMapTraceEvents}) {
		t.Fatalf("the layout before sync is not adopted: missing %v, %v", missing, ok)
	}
	// Nor is the layout of the tether that shared entries but had no
	// insertion guard (commit c81b59c), which lacks only its map.
	const beforeGuard = 0xc9ea466fd2e7506
	if missing, ok := earlierLayout(spec, beforeGuard); !ok || !sameSet(missing, []string{bpf.TetherMapInsertGuard, bpf.TetherMapTraceEvents}) {
		t.Fatalf("the layout before the insertion guard is not adopted: missing %v, %v", missing, ok)
	}
	// Nor is the layout of the tether that had the guard but no trace
	// (commit 697d59b), which lacks only its ring and counted fewer
	// reasons.
	const beforeTrace = 0x850b4d9398cd341
	if missing, ok := earlierLayout(spec, beforeTrace); !ok || !sameSet(missing, []string{bpf.TetherMapTraceEvents}) {
		t.Fatalf("the layout before trace is not adopted: missing %v, %v", missing, ok)
	}
	o, err := Load(opts)
	if err != nil {
		t.Fatalf("adopt state without NAT maps: %v", err)
	}
	if !o.Adopted() {
		t.Fatal("state not adopted")
	}
	var c bpf.TetherConn
	if err := o.TetherMaps.Conns4.Lookup(&k, &c); err != nil || c.Backend != 3 {
		t.Errorf("connection entry after the upgrade: %+v, %v", c, err)
	}
	for _, name := range allAdded() {
		if !pinnedAt(MapsByName(&o.TetherMaps)[name], filepath.Join(dir, "v1", "maps", name)) {
			t.Errorf("map %s is not pinned after the upgrade", name)
		}
	}
	must(t, meta.Lookup(uint32(0), &mv))
	if mv.Fingerprint != newFP {
		t.Errorf("meta fingerprint %#x after the upgrade, want %#x", mv.Fingerprint, newFP)
	}
	must(t, o.Close())
	// The next start adopts it as its own.
	o, err = Load(opts)
	if err != nil {
		t.Fatalf("adopt the upgraded state: %v", err)
	}
	must(t, o.Remove())
}

// sameSet says whether a and b hold the same strings.
func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}
