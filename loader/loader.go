// Package loader owns the lifecycle of tether's XDP datapath: it sizes and
// loads the program and its maps, attaches it to interfaces (native or
// generic XDP), pins maps and links in bpffs so that the datapath outlives
// the daemon, adopts what an earlier daemon pinned (replacing its program
// in place), and detaches it. It needs a kernel with BPF links for XDP
// (5.9+, which also replace a program in place) and BTF. Without a pin
// directory the objects live until Close; with one, until Remove or
// RemovePinned.
package loader

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"

	"github.com/tetherlb/tether/bpf"
	"github.com/tetherlb/tether/maglev"
	"github.com/tetherlb/tether/maps"
)

// Options size the program's maps and set its load-time constants.
// Zero fields take the defaults of bpf/consts.h.
type Options struct {
	Connections uint32 // entries of each connection table (IPv4, IPv6)
	NAT         uint32 // entries of each translation table (IPv4, IPv6)
	Affinity    uint32 // affinity-table entries
	RingSize    uint32 // slots per Maglev ring, prime
	MaxServices uint32
	MaxBackends uint32 // backends over all services; ids are 1..MaxBackends
	HashSeed    uint32 // 0 means maglev.DefaultSeed
	// InsertRate is the most new flows each CPU records a second (the
	// insertion guard, bpf/guard.h); 0 sets no limit.
	InsertRate uint32
	// PinDir is the bpffs directory where the maps and links are pinned
	// (see pin.go for the layout). Maps pinned there by an earlier run are
	// adopted. Empty means nothing is pinned: the datapath lives only as
	// long as the Objects.
	PinDir string
}

// Objects is a loaded program with its maps.
type Objects struct {
	bpf.TetherObjects
	Maps  *maps.Maps
	links map[string]link.Link

	// With a pin directory:
	pinDir  string          // as given in Options
	layout  string          // pinDir/v<LayoutVersion>
	lock    *os.File        // the pin directory, flock'ed while the Objects live
	adopted bool            // the maps were pinned by an earlier run
	fresh   map[string]bool // links attached (not taken over) by these Objects

	tracing atomic.Bool // a trace runs (Trace)

	clockStop, clockDone chan struct{} // keepClock's, until Close
}

// Load removes the memlock limit (kernels before 5.11 account BPF memory
// there), sizes the maps from opts and loads the program into the kernel.
// With opts.PinDir, the maps an earlier run pinned there are adopted (see
// Adopted), or else new maps are created and pinned; pinned state this
// tether cannot adopt is refused with an *IncompatibleError.
func Load(opts Options) (*Objects, error) {
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("remove memlock limit: %w", err)
	}
	spec, ringSize, err := sizedSpec(opts)
	if err != nil {
		return nil, err
	}
	o := &Objects{links: make(map[string]link.Link), fresh: make(map[string]bool)}
	if opts.PinDir != "" {
		err = o.loadPinned(spec, ringSize, opts.PinDir)
	} else {
		err = loadSpec(spec, &o.TetherObjects, nil)
	}
	if err != nil {
		return nil, err
	}
	o.Maps = maps.New(&o.TetherMaps, ringSize)
	// Before any program is attached or swapped in: from the pinned
	// services on, only VIPs' packets look the connection table up.
	if err := o.Maps.UseVIPFilter(o.TetherVariables.VipFilter); err != nil {
		return nil, errors.Join(err, o.Abort())
	}
	o.keepClock()
	return o, nil
}

// clockEvery is how often the loader writes seen_now.
const clockEvery = 100 * time.Millisecond

// keepClock writes seen_now, the time as connection entries hold it, at
// once and then every clockEvery until Close: the program's hit path
// reads it instead of the clock (the honest counts' last-packet time).
func (o *Objects) keepClock() {
	set := func() { o.TetherVariables.SeenNow.Set(maps.SeenNow()) }
	set()
	o.clockStop, o.clockDone = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(o.clockDone)
		t := time.NewTicker(clockEvery)
		defer t.Stop()
		for {
			select {
			case <-o.clockStop:
				return
			case <-t.C:
				set()
			}
		}
	}()
}

// sizedSpec reads the embedded program and sizes it from opts.
func sizedSpec(opts Options) (*ebpf.CollectionSpec, uint32, error) {
	spec, err := bpf.LoadTether()
	if err != nil {
		return nil, 0, fmt.Errorf("read embedded program: %w", err)
	}
	ringSize := opts.RingSize
	if ringSize == 0 {
		ringSize = maglev.DefaultSize
	}
	if !maglev.IsPrime(ringSize) {
		return nil, 0, fmt.Errorf("ring size %d is not prime", ringSize)
	}
	seed := opts.HashSeed
	if seed == 0 {
		seed = maglev.DefaultSeed
	}
	setSize(spec, bpf.TetherMapConns4, opts.Connections)
	setSize(spec, bpf.TetherMapConns6, opts.Connections)
	setSize(spec, bpf.TetherMapNat4, opts.NAT)
	setSize(spec, bpf.TetherMapNat6, opts.NAT)
	setSize(spec, bpf.TetherMapAffinities, opts.Affinity)
	setSize(spec, bpf.TetherMapServices4, opts.MaxServices)
	setSize(spec, bpf.TetherMapServices6, opts.MaxServices)
	setSize(spec, bpf.TetherMapVips, opts.MaxServices)
	setSize(spec, bpf.TetherMapRings, opts.MaxServices)
	setSize(spec, bpf.TetherMapSvcStats, opts.MaxServices)
	if opts.MaxBackends != 0 {
		// Backend ids run from 1 to MaxBackends; 0 means "none".
		setSize(spec, bpf.TetherMapBackends, opts.MaxBackends+1)
		setSize(spec, bpf.TetherMapBeStats, opts.MaxBackends+1)
		setSize(spec, bpf.TetherMapSnatAddrs, opts.MaxBackends+1)
		setSize(spec, bpf.TetherMapTunnels, opts.MaxBackends+1)
	}
	if opts.MaxBackends > maps.MaxBackendID {
		return nil, 0, fmt.Errorf("max backends %d: rings hold backend ids up to %d", opts.MaxBackends, maps.MaxBackendID)
	}
	spec.Maps[bpf.TetherMapRings].InnerMap.MaxEntries = maps.RingEntries(ringSize)
	if err := spec.Variables[bpf.TetherVarRingSize].Set(ringSize); err != nil {
		return nil, 0, fmt.Errorf("set ring size: %w", err)
	}
	if err := spec.Variables[bpf.TetherVarHashSeed].Set(seed); err != nil {
		return nil, 0, fmt.Errorf("set hash seed: %w", err)
	}
	if err := spec.Variables[bpf.TetherVarInsertRate].Set(opts.InsertRate); err != nil {
		return nil, 0, fmt.Errorf("set insert rate: %w", err)
	}
	return spec, ringSize, nil
}

// loadSpec loads spec into objs, printing a verifier refusal whole.
func loadSpec(spec *ebpf.CollectionSpec, objs *bpf.TetherObjects, opts *ebpf.CollectionOptions) error {
	if err := spec.LoadAndAssign(objs, opts); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return fmt.Errorf("load XDP program: verifier refused it:\n%+v", verr)
		}
		return fmt.Errorf("load XDP program: %w", err)
	}
	return nil
}

func setSize(spec *ebpf.CollectionSpec, name string, n uint32) {
	if n != 0 {
		spec.Maps[name].MaxEntries = n
	}
}

// Mode is how the program is attached to an interface.
type Mode string

// Attach modes.
const (
	ModeNative  Mode = "xdp"         // in the driver, before any sk_buff
	ModeGeneric Mode = "xdp-generic" // after the sk_buff is built; works on any device, slower
)

// Attached says how Attach put the program on an interface.
type Attached int

// Ways of attaching.
const (
	// AttachedNew is a new link.
	AttachedNew Attached = iota
	// AttachedReplaced is a link pinned by an earlier run, whose program was
	// replaced in place: the interface never went without XDP.
	AttachedReplaced
	// AttachedAgain is a new link in place of a pinned one that was on
	// another interface of that name or in another mode: the interface went
	// without XDP for a moment.
	AttachedAgain
)

func (a Attached) String() string {
	switch a {
	case AttachedReplaced:
		return "replaced the program of the pinned link in place"
	case AttachedAgain:
		return "detached the pinned link (other interface or mode) and attached a new one"
	}
	return "attached"
}

// Attach attaches the program to the interface ifname in the given mode.
// With a pin directory the link is pinned, and a link an earlier run pinned
// for ifname is taken over: on the same interface in the same mode its
// program is replaced in place (link update, no moment without XDP),
// otherwise it is detached and a new link attached.
func (o *Objects) Attach(ifname string, mode Mode) (Attached, error) {
	if _, ok := o.links[ifname]; ok {
		return 0, fmt.Errorf("attach to %s: already attached", ifname)
	}
	iface, err := net.InterfaceByName(ifname)
	if err != nil {
		return 0, fmt.Errorf("attach to %s: %w", ifname, err)
	}
	how := AttachedNew
	if o.layout != "" {
		old, err := link.LoadPinnedLink(o.linkPin(ifname), nil)
		switch {
		case err == nil:
			if sameAttachment(old, iface.Index, mode) {
				if err := old.Update(o.TetherXdp); err != nil {
					old.Close()
					return 0, fmt.Errorf("replace XDP program on %s: %w", ifname, err)
				}
				o.links[ifname] = old
				return AttachedReplaced, nil
			}
			if err := removeLink(old); err != nil {
				return 0, fmt.Errorf("detach pinned link of %s: %w", ifname, err)
			}
			how = AttachedAgain
		case !errors.Is(err, os.ErrNotExist):
			return 0, fmt.Errorf("load pinned link of %s: %w", ifname, err)
		}
	}
	flags := link.XDPDriverMode
	if mode == ModeGeneric {
		flags = link.XDPGenericMode
	}
	l, err := link.AttachXDP(link.XDPOptions{
		Program:   o.TetherXdp,
		Interface: iface.Index,
		Flags:     flags,
	})
	if err != nil {
		hint := ""
		if mode == ModeNative {
			hint = " (the driver may lack native XDP: try datapath: xdp-generic)"
		}
		return 0, fmt.Errorf("attach %s XDP to %s: %w%s", mode, ifname, err, hint)
	}
	if o.layout != "" {
		if err := l.Pin(o.linkPin(ifname)); err != nil {
			l.Close()
			return 0, fmt.Errorf("pin XDP link of %s: %w", ifname, err)
		}
	}
	o.links[ifname] = l
	o.fresh[ifname] = true
	return how, nil
}

// Close releases the program, the maps and the links. Without a pin
// directory that detaches the program; with one, the program stays attached
// and forwarding with the pinned maps, for the next run to adopt.
func (o *Objects) Close() error {
	var errs []error
	if o.clockStop != nil {
		// Before the variables' memory goes with the program's objects.
		close(o.clockStop)
		<-o.clockDone
		o.clockStop = nil
	}
	// A trace whose reader was not closed would go on in the program,
	// which outlives these Objects when it is pinned: stop it.
	if v := o.TetherVariables.TraceOn; v != nil {
		if err := v.Set(uint32(0)); err != nil {
			errs = append(errs, fmt.Errorf("turn tracing off: %w", err))
		}
	}
	for name, l := range o.links {
		if err := l.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close link of %s: %w", name, err))
		}
		delete(o.links, name)
	}
	if err := o.TetherObjects.Close(); err != nil {
		errs = append(errs, err)
	}
	if o.lock != nil {
		o.lock.Close()
		o.lock = nil
	}
	return errors.Join(errs...)
}
