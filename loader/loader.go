// Package loader owns the lifecycle of tether's XDP datapath: it sizes and
// loads the program and its maps, attaches it to interfaces (native or
// generic XDP) and detaches it. It needs a kernel with BPF links for XDP
// (5.9+) and BTF; the objects live until Close.
package loader

import (
	"errors"
	"fmt"
	"net"

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
	Affinity    uint32 // affinity-table entries
	RingSize    uint32 // slots per Maglev ring, prime
	MaxServices uint32
	MaxBackends uint32 // backends over all services; ids are 1..MaxBackends
	HashSeed    uint32 // 0 means maglev.DefaultSeed
}

// Objects is a loaded program with its maps.
type Objects struct {
	bpf.TetherObjects
	Maps  *maps.Maps
	links map[string]link.Link
}

// Load removes the memlock limit (kernels before 5.11 account BPF memory
// there), sizes the maps from opts and loads the program into the kernel.
func Load(opts Options) (*Objects, error) {
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("remove memlock limit: %w", err)
	}
	spec, err := bpf.LoadTether()
	if err != nil {
		return nil, fmt.Errorf("read embedded program: %w", err)
	}
	ringSize := opts.RingSize
	if ringSize == 0 {
		ringSize = maglev.DefaultSize
	}
	if !maglev.IsPrime(ringSize) {
		return nil, fmt.Errorf("ring size %d is not prime", ringSize)
	}
	seed := opts.HashSeed
	if seed == 0 {
		seed = maglev.DefaultSeed
	}
	setSize(spec, bpf.TetherMapConns4, opts.Connections)
	setSize(spec, bpf.TetherMapConns6, opts.Connections)
	setSize(spec, bpf.TetherMapAffinities, opts.Affinity)
	setSize(spec, bpf.TetherMapServices4, opts.MaxServices)
	setSize(spec, bpf.TetherMapServices6, opts.MaxServices)
	setSize(spec, bpf.TetherMapRings, opts.MaxServices)
	setSize(spec, bpf.TetherMapSvcStats, opts.MaxServices)
	if opts.MaxBackends != 0 {
		// Backend ids run from 1 to MaxBackends; 0 means "none".
		setSize(spec, bpf.TetherMapBackends, opts.MaxBackends+1)
		setSize(spec, bpf.TetherMapBeStats, opts.MaxBackends+1)
	}
	if opts.MaxBackends > maps.MaxBackendID {
		return nil, fmt.Errorf("max backends %d: rings hold backend ids up to %d", opts.MaxBackends, maps.MaxBackendID)
	}
	spec.Maps[bpf.TetherMapRings].InnerMap.MaxEntries = maps.RingEntries(ringSize)
	if err := spec.Variables[bpf.TetherVarRingSize].Set(ringSize); err != nil {
		return nil, fmt.Errorf("set ring size: %w", err)
	}
	if err := spec.Variables[bpf.TetherVarHashSeed].Set(seed); err != nil {
		return nil, fmt.Errorf("set hash seed: %w", err)
	}

	o := &Objects{links: make(map[string]link.Link)}
	if err := spec.LoadAndAssign(&o.TetherObjects, nil); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("load XDP program: verifier refused it:\n%+v", verr)
		}
		return nil, fmt.Errorf("load XDP program: %w", err)
	}
	o.Maps = maps.New(&o.TetherMaps, ringSize)
	return o, nil
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

// Attach attaches the program to the interface ifname in the given mode.
func (o *Objects) Attach(ifname string, mode Mode) error {
	if _, ok := o.links[ifname]; ok {
		return fmt.Errorf("attach to %s: already attached", ifname)
	}
	iface, err := net.InterfaceByName(ifname)
	if err != nil {
		return fmt.Errorf("attach to %s: %w", ifname, err)
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
		return fmt.Errorf("attach %s XDP to %s: %w%s", mode, ifname, err, hint)
	}
	o.links[ifname] = l
	return nil
}

// Close detaches the program from every interface and releases the
// program and maps.
func (o *Objects) Close() error {
	var errs []error
	for name, l := range o.links {
		if err := l.Close(); err != nil {
			errs = append(errs, fmt.Errorf("detach from %s: %w", name, err))
		}
		delete(o.links, name)
	}
	if err := o.TetherObjects.Close(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
