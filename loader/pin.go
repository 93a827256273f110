package loader

// Pinning: the maps and the XDP links live in a bpffs directory, so that
// the datapath outlives the daemon. A stopped daemon leaves the program
// attached and forwarding with its last state; the next one loads its
// program with the pinned maps in place of new ones and swaps it into the
// pinned links (link update: the interface never goes without XDP).
//
// Layout under the pin directory DIR (default /sys/fs/bpf/tether):
//
//	DIR/v1/                the layout of LayoutVersion 1
//	DIR/v1/meta            array map of one entry: layout version, ring size,
//	                       fingerprint of the maps' definitions (metaValue)
//	DIR/v1/maps/<map>      every map of the program, by its name in bpf/maps.h
//	DIR/v1/links/<ifname>  the XDP link of each interface
//
// DIR/v1 appears whole: a first start pins the maps in DIR/v1-new and
// renames it (bpffs refuses names with dots). Any change of a map's type,
// key or value layout, of the map set, or of what an entry means must bump
// LayoutVersion; the fingerprint refuses layout changes that forgot to. One
// change needs no new version: reasons appended to enum reason lengthen the
// reasons map, and adopting a shorter one copies its counters into a map of
// the new length (see grown). A daemon holds an flock on DIR while it runs,
// so that two daemons never drive the same maps.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/bpf"
)

// DefaultPinDir is where tether pins its maps and links by default.
const DefaultPinDir = "/sys/fs/bpf/tether"

// LayoutVersion is the version of the pinned layout this tether reads and
// writes, the name of its directory under the pin directory ("v1").
const LayoutVersion = 1

// bpffsMount is where bpffs is mounted on a usual system.
const bpffsMount = "/sys/fs/bpf"

// IncompatibleError refuses pinned state this tether cannot adopt. Adopting
// it is impossible without dropping the tracked connections, so tether
// leaves that decision to the operator.
type IncompatibleError struct {
	Dir    string // the pin directory
	Reason string // what differs
	Sizes  bool   // only table sizes differ from the configuration's
}

func (e *IncompatibleError) Error() string {
	if e.Sizes {
		return fmt.Sprintf("pinned state in %s has other table sizes than the configuration (%s): "+
			"table sizes change only after `tether detach --pin-dir %s` (or `tether run --clean`), "+
			"which drops every tracked connection; or set the configured sizes back", e.Dir, e.Reason, e.Dir)
	}
	return fmt.Sprintf("pinned state in %s has an incompatible layout (%s): run the tether that created it, "+
		"or remove it with `tether detach --pin-dir %s` (or start with `tether run --clean`), "+
		"which drops every tracked connection", e.Dir, e.Reason, e.Dir)
}

// EnsureBPFFS makes sure that dir can live on a bpffs: its nearest existing
// ancestor must be one. If it is not and dir lies under /sys/fs/bpf, bpffs
// is mounted there and mounted is "/sys/fs/bpf". private says that the
// mount was made in a mount namespace other than init's, or one that could
// not be compared with it (as under `ip netns exec`, which mounts a /sys
// of its own): the mount may then disappear with this process, and the
// pins with it.
func EnsureBPFFS(dir string) (mounted string, private bool, err error) {
	dir = filepath.Clean(dir)
	if onBPFFS(existingAncestor(dir)) {
		return "", false, nil
	}
	if dir != bpffsMount && !strings.HasPrefix(dir, bpffsMount+"/") {
		return "", false, fmt.Errorf("pin directory %s is not on a bpffs: mount one (mount -t bpf bpf DIR) or use a directory under %s", dir, bpffsMount)
	}
	if err := unix.Mount("bpf", bpffsMount, "bpf", 0, "mode=0700"); err != nil {
		return "", false, fmt.Errorf("mount bpffs at %s: %w", bpffsMount, err)
	}
	self, err1 := os.Readlink("/proc/self/ns/mnt")
	initNS, err2 := os.Readlink("/proc/1/ns/mnt")
	// When init's namespace cannot be read, assume the worst.
	return bpffsMount, err1 != nil || err2 != nil || self != initNS, nil
}

func existingAncestor(dir string) string {
	for {
		if _, err := os.Stat(dir); err == nil || dir == "/" || dir == "." {
			return dir
		}
		dir = filepath.Dir(dir)
	}
}

func onBPFFS(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && st.Type == unix.BPF_FS_MAGIC
}

// LockPinDir takes the lock a daemon holds on its pin directory (see
// lockPinDir) without loading anything: the splice datapath takes it too,
// so that two daemons never drive one balancer's state. Closing the
// returned file releases it.
func LockPinDir(dir string) (*os.File, error) { return lockPinDir(filepath.Clean(dir)) }

// lockPinDir creates dir and takes an exclusive flock on it, refusing if
// another process holds one.
func lockPinDir(dir string) (*os.File, error) {
	if !onBPFFS(existingAncestor(dir)) {
		return nil, fmt.Errorf("pin directory %s is not on a bpffs", dir)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create pin directory: %w", err)
	}
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("open pin directory: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("pin directory %s is in use by another tether (stop it first)", dir)
		}
		return nil, fmt.Errorf("lock pin directory %s: %w", dir, err)
	}
	return f, nil
}

// metaValue is the entry of the meta map.
type metaValue struct {
	Version     uint32
	RingSize    uint32
	Fingerprint uint64
}

var metaSpec = &ebpf.MapSpec{
	Name:       "tether_meta",
	Type:       ebpf.Array,
	KeySize:    4,
	ValueSize:  uint32(binary.Size(metaValue{})),
	MaxEntries: 1,
}

// configField names the configuration field that sizes each map sized at
// load; the sizes of the other maps are part of the layout.
var configField = map[string]string{
	bpf.TetherMapConns4:     "tables.connections",
	bpf.TetherMapConns6:     "tables.connections",
	bpf.TetherMapNat4:       "tables.nat",
	bpf.TetherMapNat6:       "tables.nat",
	bpf.TetherMapSnatAddrs:  "tables.max_backends",
	bpf.TetherMapTunnels:    "tables.max_backends",
	bpf.TetherMapAffinities: "tables.affinity",
	bpf.TetherMapServices4:  "tables.max_services",
	bpf.TetherMapServices6:  "tables.max_services",
	bpf.TetherMapVips:       "tables.max_services",
	bpf.TetherMapRings:      "tables.max_services",
	bpf.TetherMapSvcStats:   "tables.max_services",
	bpf.TetherMapBackends:   "tables.max_backends",
	bpf.TetherMapBeStats:    "tables.max_backends",
}

// pinnedMaps returns the program's maps by name: every map but the
// sections of global variables (.rodata), which are set per load.
func MapsByName(objs *bpf.TetherMaps) map[string]*ebpf.Map {
	out := map[string]*ebpf.Map{}
	v := reflect.ValueOf(objs).Elem()
	for i := 0; i < v.NumField(); i++ {
		if m, ok := v.Field(i).Interface().(*ebpf.Map); ok {
			out[v.Type().Field(i).Tag.Get("ebpf")] = m
		}
	}
	return out
}

// pinnedSpecs returns the specs of the maps that are pinned, by name.
func pinnedSpecs(spec *ebpf.CollectionSpec) map[string]*ebpf.MapSpec {
	out := map[string]*ebpf.MapSpec{}
	for name, ms := range spec.Maps {
		if !strings.HasPrefix(name, ".") {
			out[name] = ms
		}
	}
	return out
}

// fingerprint hashes what must not change while maps are adopted: the map
// set, each map's type, flags and key and value layout (member offsets and
// sizes, from BTF), and the size of the maps that no configuration sizes.
func fingerprint(spec *ebpf.CollectionSpec) uint64 {
	specs := pinnedSpecs(spec)
	names := make([]string, 0, len(specs))
	for name := range specs {
		names = append(names, name)
	}
	sort.Strings(names)
	var b strings.Builder
	for _, name := range names {
		describeMap(&b, name, specs[name], configField[name] == "")
	}
	h := fnv.New64a()
	h.Write([]byte(b.String()))
	return h.Sum64()
}

func describeMap(b *strings.Builder, name string, ms *ebpf.MapSpec, size bool) {
	fmt.Fprintf(b, "%s %s k%d v%d f%#x ", name, ms.Type, ms.KeySize, ms.ValueSize, ms.Flags)
	if size {
		fmt.Fprintf(b, "n%d ", ms.MaxEntries)
	}
	describeType(b, ms.Key)
	b.WriteString(" ")
	describeType(b, ms.Value)
	if ms.InnerMap != nil {
		// The inner map's size is the ring size, in meta. Whether rings
		// are memory-mappable is left out: rings pinned before they were
		// are adopted, and maps.PublishRing makes rings like them.
		inner := ms.InnerMap.Copy()
		inner.Flags &^= unix.BPF_F_MMAPABLE
		b.WriteString(" inner(")
		describeMap(b, "", inner, false)
		b.WriteString(")")
	}
	b.WriteString("\n")
}

// describeType writes a type's memory layout, without names.
func describeType(b *strings.Builder, t btf.Type) {
	switch t := btf.UnderlyingType(t).(type) {
	case nil:
		b.WriteString("-")
	case *btf.Int:
		fmt.Fprintf(b, "i%d", t.Size)
	case *btf.Enum:
		fmt.Fprintf(b, "e%d", t.Size)
	case *btf.Pointer:
		b.WriteString("p")
	case *btf.Array:
		fmt.Fprintf(b, "[%d]", t.Nelems)
		describeType(b, t.Type)
	case *btf.Struct:
		describeMembers(b, "s", t.Size, t.Members)
	case *btf.Union:
		describeMembers(b, "u", t.Size, t.Members)
	default:
		fmt.Fprintf(b, "%T", t)
	}
}

func describeMembers(b *strings.Builder, kind string, size uint32, members []btf.Member) {
	fmt.Fprintf(b, "%s%d{", kind, size)
	for _, m := range members {
		fmt.Fprintf(b, "%d", m.Offset)
		if m.BitfieldSize != 0 {
			fmt.Fprintf(b, ":%d", m.BitfieldSize)
		}
		b.WriteString("=")
		describeType(b, m.Type)
		b.WriteString(";")
	}
	b.WriteString("}")
}

func (o *Objects) linkPin(ifname string) string {
	return filepath.Join(o.layout, "links", ifname)
}

// loadPinned loads spec with the maps pinned in dir, or pins new ones.
func (o *Objects) loadPinned(spec *ebpf.CollectionSpec, ringSize uint32, dir string) (err error) {
	dir = filepath.Clean(dir)
	lock, err := lockPinDir(dir)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			lock.Close()
		}
	}()
	o.pinDir, o.layout, o.lock = dir, filepath.Join(dir, fmt.Sprintf("v%d", LayoutVersion)), lock

	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("read pin directory: %w", err)
	}
	var (
		others []string
		found  bool
	)
	for _, e := range entries {
		switch name := e.Name(); {
		case name == filepath.Base(o.layout):
			found = true
		case strings.HasSuffix(name, "-new"):
			// A first start that did not finish: it never served.
			if err := removePinned(filepath.Join(dir, name), nil); err != nil {
				return err
			}
		default:
			others = append(others, name)
		}
	}
	if len(others) > 0 {
		// Another layout, beside ours or not: which one forwards is unknown.
		return &IncompatibleError{Dir: dir, Reason: fmt.Sprintf("it holds %s, this tether reads layout v%d", strings.Join(others, ", "), LayoutVersion)}
	}
	if found {
		return o.adopt(spec, ringSize)
	}
	return o.pinNew(spec, ringSize)
}

// pinNew loads spec with new maps and pins them, with the meta map, as
// the layout directory.
func (o *Objects) pinNew(spec *ebpf.CollectionSpec, ringSize uint32) error {
	if err := loadSpec(spec, &o.TetherObjects, nil); err != nil {
		return err
	}
	meta, err := ebpf.NewMap(metaSpec)
	if err != nil {
		o.TetherObjects.Close()
		return fmt.Errorf("create meta map: %w", err)
	}
	defer meta.Close()
	stage := filepath.Join(o.pinDir, fmt.Sprintf("v%d-new", LayoutVersion))
	err = func() error {
		if err := meta.Put(uint32(0), metaValue{Version: LayoutVersion, RingSize: ringSize, Fingerprint: fingerprint(spec)}); err != nil {
			return fmt.Errorf("write meta map: %w", err)
		}
		for _, sub := range []string{"maps", "links"} {
			if err := os.MkdirAll(filepath.Join(stage, sub), 0o700); err != nil {
				return err
			}
		}
		if err := meta.Pin(filepath.Join(stage, "meta")); err != nil {
			return err
		}
		for name, m := range MapsByName(&o.TetherMaps) {
			if err := m.Pin(filepath.Join(stage, "maps", name)); err != nil {
				return err
			}
		}
		return os.Rename(stage, o.layout)
	}()
	if err != nil {
		os.RemoveAll(stage)
		o.TetherObjects.Close()
		return fmt.Errorf("pin maps in %s: %w", o.pinDir, err)
	}
	return nil
}

// adopt loads spec with the maps pinned in the layout directory in place
// of new ones, once it has checked that they are what spec describes.
func (o *Objects) adopt(spec *ebpf.CollectionSpec, ringSize uint32) error {
	incompatible := func(format string, args ...any) error {
		return &IncompatibleError{Dir: o.pinDir, Reason: fmt.Sprintf(format, args...)}
	}
	meta, err := ebpf.LoadPinnedMap(filepath.Join(o.layout, "meta"), nil)
	if err != nil {
		return incompatible("no meta map: %v", err)
	}
	defer meta.Close()
	var mv metaValue
	if err := metaSpec.Compatible(meta); err != nil {
		return incompatible("meta map: %v", err)
	}
	if err := meta.Lookup(uint32(0), &mv); err != nil {
		return fmt.Errorf("read meta map: %w", err)
	}
	if mv.Version != LayoutVersion {
		return incompatible("its meta map says layout v%d", mv.Version)
	}
	fp := fingerprint(spec)
	var missing []string
	if mv.Fingerprint != fp {
		var ok bool
		if missing, ok = earlierLayout(spec, mv.Fingerprint); !ok {
			return incompatible("its maps were defined by a tether with other map definitions")
		}
	}

	specs := pinnedSpecs(spec)
	names := make([]string, 0, len(specs))
	for name := range specs {
		names = append(names, name)
	}
	sort.Strings(names)
	replacements := map[string]*ebpf.Map{}
	defer func() {
		for _, m := range replacements {
			m.Close() // the collection holds clones
		}
	}()
	var sizes, layout []string
	if mv.RingSize != ringSize {
		sizes = append(sizes, fmt.Sprintf("tables.ring_size is %d there, %d here", mv.RingSize, ringSize))
	}
	for _, name := range names {
		ms := specs[name]
		path := filepath.Join(o.layout, "maps", name)
		if slices.Contains(missing, name) {
			if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
				continue // created empty, pinned by upgradeLayout
			}
		}
		m, err := ebpf.LoadPinnedMap(path, nil)
		if err != nil {
			return incompatible("map %s: %v", name, err)
		}
		replacements[name] = m
		if name == bpf.TetherMapReasons && m.MaxEntries() < ms.MaxEntries && mv.Fingerprint != fp {
			g, err := grown(m, ms)
			if err != nil {
				return err
			}
			m.Close()
			replacements[name] = g
			continue
		}
		if m.MaxEntries() != ms.MaxEntries {
			field := configField[name]
			if field == "" {
				layout = append(layout, fmt.Sprintf("map %s has %d entries, not %d", name, m.MaxEntries(), ms.MaxEntries))
				continue
			}
			have, want := m.MaxEntries(), ms.MaxEntries
			if field == "tables.max_backends" {
				have, want = have-1, want-1 // id 0 is never used
			}
			s := fmt.Sprintf("%s is %d there, %d here", field, have, want)
			if !slices.Contains(sizes, s) {
				sizes = append(sizes, s)
			}
			continue
		}
		if err := ms.Compatible(m); err != nil {
			layout = append(layout, fmt.Sprintf("map %s: %v", name, err))
		}
	}
	if len(layout) > 0 {
		return incompatible("%s", strings.Join(layout, "; "))
	}
	if len(sizes) > 0 {
		return &IncompatibleError{Dir: o.pinDir, Reason: strings.Join(sizes, ", "), Sizes: true}
	}
	err = loadSpec(spec, &o.TetherObjects, &ebpf.CollectionOptions{MapReplacements: replacements})
	if errors.Is(err, ebpf.ErrMapIncompatible) {
		return incompatible("%v", err)
	}
	if err != nil {
		return err
	}
	if mv.Fingerprint != fp {
		if err := o.upgradeLayout(meta, mv, fp); err != nil {
			o.TetherObjects.Close()
			return err
		}
	}
	o.adopted = true
	return nil
}

// addedMaps are the maps added to layout v1 after its first release, by
// release: state pinned by a tether without the last ones is adopted with
// new, empty ones (nothing it tracked needs them).
var addedMaps = [][]string{
	{bpf.TetherMapNat4, bpf.TetherMapNat6, bpf.TetherMapNatSyn4, bpf.TetherMapNatSyn6, bpf.TetherMapSnatAddrs}, // nat, fullnat
	{bpf.TetherMapTunnels},                           // ipip, gue
	{bpf.TetherMapVips},                              // ICMP echo
	{bpf.TetherMapSyncEvents, bpf.TetherMapSyncLost}, // entries shared between hosts
	{bpf.TetherMapInsertGuard},                       // the insertion guard
	{bpf.TetherMapTraceEvents},                       // tether trace
}

// allAdded is every map of addedMaps.
func allAdded() []string { return slices.Concat(addedMaps...) }

// earlierLayout says whether fp is the fingerprint of state an earlier
// tether pinned in this layout, which this one adopts: spec without the
// maps some last releases added, or with fewer reasons, or both. missing
// are the maps that state lacks.
func earlierLayout(spec *ebpf.CollectionSpec, fp uint64) (missing []string, ok bool) {
	if fewerReasons(spec, fp) {
		return nil, true
	}
	for k := len(addedMaps) - 1; k >= 0; k-- {
		missing = append(missing, addedMaps[k]...)
		older := *spec
		older.Maps = make(map[string]*ebpf.MapSpec, len(spec.Maps))
		for name, ms := range spec.Maps {
			if !slices.Contains(missing, name) {
				older.Maps[name] = ms
			}
		}
		if fingerprint(&older) == fp || fewerReasons(&older, fp) {
			return missing, true
		}
	}
	return nil, false
}

// fewerReasons says whether fp is the fingerprint of spec, or of spec with
// fewer entries in the reasons map: state pinned by a tether that counted
// fewer reasons, which this one adopts by lengthening the map.
func fewerReasons(spec *ebpf.CollectionSpec, fp uint64) bool {
	if fingerprint(spec) == fp {
		return true
	}
	ms := spec.Maps[bpf.TetherMapReasons]
	want := ms.MaxEntries
	defer func() { ms.MaxEntries = want }()
	for n := uint32(1); n < want; n++ {
		ms.MaxEntries = n
		if fingerprint(spec) == fp {
			return true
		}
	}
	return false
}

// grown returns a new reasons map of spec's length holding the counters of
// the shorter pinned one (reasons keep their values: enum reason is append
// only).
func grown(old *ebpf.Map, ms *ebpf.MapSpec) (*ebpf.Map, error) {
	m, err := ebpf.NewMap(ms)
	if err != nil {
		return nil, fmt.Errorf("lengthen the reasons map: %w", err)
	}
	for k := uint32(0); k < old.MaxEntries(); k++ {
		var per []uint64
		if err := old.Lookup(k, &per); err != nil {
			m.Close()
			return nil, fmt.Errorf("copy reason %d into the lengthened reasons map: %w", k, err)
		}
		if err := m.Put(k, per); err != nil {
			m.Close()
			return nil, fmt.Errorf("copy reason %d into the lengthened reasons map: %w", k, err)
		}
	}
	return m, nil
}

// upgradeLayout pins the maps that adopted state lacked and the lengthened
// reasons map in place of the pinned one (each a rename: a path always
// names a whole map), then records the new fingerprint. A stop before that
// leaves new maps under the old fingerprint, which earlierLayout accepts
// and the next start completes. The old program counts into the old
// reasons map until its links take the new program: those few counts are
// not carried over.
func (o *Objects) upgradeLayout(meta *ebpf.Map, mv metaValue, fp uint64) error {
	all := MapsByName(&o.TetherMaps)
	for _, name := range allAdded() {
		path := filepath.Join(o.layout, "maps", name)
		if pinnedAt(all[name], path) {
			continue
		}
		if err := all[name].Pin(path + "-new"); err != nil {
			return fmt.Errorf("pin the new map %s: %w", name, err)
		}
		if err := os.Rename(path+"-new", path); err != nil {
			os.Remove(path + "-new")
			return fmt.Errorf("pin the new map %s: %w", name, err)
		}
	}
	path := filepath.Join(o.layout, "maps", bpf.TetherMapReasons)
	if !pinnedAt(o.TetherMaps.Reasons, path) { // else an earlier start stopped before the meta map
		if err := o.TetherMaps.Reasons.Pin(path + "-grown"); err != nil {
			return fmt.Errorf("pin the lengthened reasons map: %w", err)
		}
		if err := os.Rename(path+"-grown", path); err != nil {
			os.Remove(path + "-grown")
			return fmt.Errorf("pin the lengthened reasons map: %w", err)
		}
	}
	mv.Fingerprint = fp
	if err := meta.Put(uint32(0), mv); err != nil {
		return fmt.Errorf("write meta map: %w", err)
	}
	return nil
}

// pinnedAt says whether the map pinned at path is m.
func pinnedAt(m *ebpf.Map, path string) bool {
	pinned, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		return false
	}
	defer pinned.Close()
	a, err1 := m.Info()
	b, err2 := pinned.Info()
	if err1 != nil || err2 != nil {
		return false
	}
	ida, ok1 := a.ID()
	idb, ok2 := b.ID()
	return ok1 && ok2 && ida == idb
}

// Adopted says whether the maps were pinned by an earlier run, with the
// state it left in them.
func (o *Objects) Adopted() bool { return o.adopted }

// PinDir is the pin directory, or "" when nothing is pinned.
func (o *Objects) PinDir() string { return o.pinDir }

// sameAttachment says whether pinned link l is an XDP link on interface
// ifindex in the given mode, the one Attach would make.
func sameAttachment(l link.Link, ifindex int, mode Mode) bool {
	info, err := l.Info()
	if err != nil || info.XDP() == nil || int(info.XDP().Ifindex) != ifindex {
		return false
	}
	nl, err := netlink.LinkByIndex(ifindex)
	if err != nil || nl.Attrs().Xdp == nil {
		return false
	}
	want := uint32(xdpAttachedDrv)
	if mode == ModeGeneric {
		want = xdpAttachedSkb
	}
	return nl.Attrs().Xdp.AttachMode == want
}

// IFLA_XDP_ATTACHED values.
const (
	xdpAttachedDrv = 1
	xdpAttachedSkb = 2
)

// removeLink detaches a pinned link, removes its pin and closes it. A link
// whose interface is gone is already detached.
func removeLink(l link.Link) error {
	defer l.Close()
	if err := l.Detach(); err != nil && !errors.Is(err, unix.ENOLINK) && !errors.Is(err, unix.ENODEV) {
		return err
	}
	return l.Unpin()
}

// DetachUnlisted detaches and unpins the pinned links of interfaces that
// are not in keep, and returns their names.
func (o *Objects) DetachUnlisted(keep []string) ([]string, error) {
	if o.layout == "" {
		return nil, nil
	}
	entries, err := os.ReadDir(filepath.Join(o.layout, "links"))
	if err != nil {
		return nil, fmt.Errorf("read pinned links: %w", err)
	}
	var gone []string
	for _, e := range entries {
		if slices.Contains(keep, e.Name()) {
			continue
		}
		l, err := link.LoadPinnedLink(filepath.Join(o.layout, "links", e.Name()), nil)
		if err != nil {
			return gone, fmt.Errorf("load pinned link of %s: %w", e.Name(), err)
		}
		if err := removeLink(l); err != nil {
			return gone, fmt.Errorf("detach %s: %w", e.Name(), err)
		}
		gone = append(gone, e.Name())
	}
	return gone, nil
}

// Abort undoes a start that failed: after a first start it detaches and
// removes everything; after an adoption it detaches only the links it
// attached itself and leaves the adopted state forwarding. It closes the
// Objects.
func (o *Objects) Abort() error {
	if o.layout == "" || !o.adopted {
		return o.Remove()
	}
	var errs []error
	for name := range o.fresh {
		if l, ok := o.links[name]; ok {
			if err := removeLink(l); err != nil {
				errs = append(errs, fmt.Errorf("detach %s: %w", name, err))
			}
			delete(o.links, name)
		}
	}
	return errors.Join(append(errs, o.Close())...)
}

// Remove detaches the program from every interface, removes everything
// pinned in the pin directory and closes the Objects. Every tracked
// connection is forgotten.
func (o *Objects) Remove() error {
	var errs []error
	for name, l := range o.links {
		if err := l.Detach(); err != nil && !errors.Is(err, unix.ENOLINK) {
			errs = append(errs, fmt.Errorf("detach %s: %w", name, err))
		}
	}
	if o.pinDir != "" {
		if err := removePinned(o.pinDir, nil); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(append(errs, o.Close())...)
}

// RemovePinned detaches every XDP link pinned under dir, whatever its
// layout version, and removes dir. It returns the names of the interfaces
// it detached the program from. It refuses while a daemon holds dir; a
// missing dir is not an error.
func RemovePinned(dir string) ([]string, error) {
	dir = filepath.Clean(dir)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	lock, err := lockPinDir(dir)
	if err != nil {
		return nil, err
	}
	defer lock.Close()
	var detached []string
	err = errors.Join(removePinned(dir, &detached), RemoveProbePath())
	return detached, err
}

// removePinned detaches the links pinned in any "links" directory under
// dir and removes dir; removing the pins releases the maps.
func removePinned(dir string, detached *[]string) error {
	var errs []error
	err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || filepath.Base(filepath.Dir(path)) != "links" {
			return err
		}
		l, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("load pinned link %s: %w", path, err))
			return nil
		}
		name := d.Name() // the interface's name when it was attached
		if err := removeLink(l); err != nil {
			errs = append(errs, fmt.Errorf("detach %s: %w", name, err))
			return nil
		}
		if detached != nil {
			*detached = append(*detached, name)
		}
		return nil
	})
	if err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, fmt.Errorf("remove %s: %w", dir, err))
	}
	return errors.Join(errs...)
}
