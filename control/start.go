package control

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/loader"
	"github.com/tetherlb/tether/userspace"
)

// DefaultPinDir is where the XDP datapath pins its maps and links, one
// directory per balancer.
const DefaultPinDir = loader.DefaultPinDir

// StartOptions say where the XDP datapath pins its state and what a start
// and a stop do with it.
type StartOptions struct {
	// PinDir is the bpffs directory of the XDP datapath's pinned state
	// (DefaultPinDir when empty).
	PinDir string
	// Clean removes the pinned state before the start, and everything the
	// daemon attached or pinned at Stop: every tracked connection is
	// forgotten.
	Clean bool
	// File is the file cfg was read from (config.ReadFile): a change
	// through the API while the file still holds it needs no parse to
	// know that it overwrites no edit, and a reload parses what changed
	// since. Without it, the first change or reload parses the file.
	File *config.File
	// DrainMark is the file that records `tether host drain` across
	// restarts (the daemon's API socket with ".drained" appended, beside
	// it, as `tether run` sets it): a daemon that finds it starts drained.
	// Empty, a drain lasts as long as the daemon.
	DrainMark string
	// Inherit is the state a running splice daemon handed over (package
	// handover), and InheritLock its pin directory lock: the datapath is
	// then the splice proxy, whatever cfg says but xdp, and serves the
	// inherited connections once Daemon.Resume is called.
	Inherit     *userspace.State
	InheritLock *os.File
}

// Start opens the datapath cfg names, gives the services an earlier daemon
// left in it their ids again, applies cfg (read from the file at path) and
// starts health checking. The datapath is:
//
//   - xdp, xdp-generic: the XDP program attached to every interface, in
//     that mode, or an error;
//   - splice: the splice proxy;
//   - auto: native XDP, or where a driver or the kernel refuses it, the
//     splice proxy standing in for the interfaces (logged with the reason),
//     unless a UDP service needs XDP.
//
// A start that fails leaves what it found: a first start removes what it
// attached or pinned, and an adoption leaves the earlier state forwarding.
// Stop undoes a Start.
func Start(path string, cfg *config.Config, o StartOptions, log *slog.Logger) (*Daemon, error) {
	if o.PinDir == "" {
		o.PinDir = DefaultPinDir
	}
	if o.Clean {
		gone, err := loader.RemovePinned(o.PinDir)
		if err != nil {
			return nil, fmt.Errorf("--clean: %w", err)
		}
		log.Info("removed pinned state (--clean)", "pin_dir", o.PinDir, "detached", gone)
	}
	removeTemps(path, log)
	t0 := time.Now()
	var (
		dp   datapath.Datapath
		lock io.Closer
		err  error
	)
	if o.Inherit != nil {
		dp, lock, err = inheritProxy(cfg, o, log)
	} else {
		dp, lock, err = openDatapath(cfg, o.PinDir, log)
	}
	if err != nil {
		return nil, err
	}
	log.Info("datapath open", "took", time.Since(t0).Round(time.Millisecond))
	ctl := New(dp, cfg.HashSeed, cfg.Tables.RingSize, cfg.Tables.MaxServices, cfg.Tables.MaxBackends, log)
	d := NewDaemon(path, cfg, ctl, dp, log)
	d.file, d.drainMark = o.File, o.DrainMark
	d.remove, d.lock = o.Clean, lock
	adopted := false
	if a, ok := dp.(datapath.Adopter); ok && a.Adopted() {
		adopted = true
		d.adopted = true
		if err := ctl.Adopt(a.AdoptedServices()); err != nil {
			d.Stop()
			return nil, err
		}
	}
	t1 := time.Now()
	if err := ctl.Apply(cfg); err != nil {
		// A first start that never served leaves nothing behind.
		d.remove = d.remove || !adopted
		d.Stop()
		return nil, fmt.Errorf("apply %s: %w", path, err)
	}
	log.Info("configuration applied", "services", len(cfg.Services), "took", time.Since(t1).Round(time.Millisecond))
	if err := d.StartHealth(); err != nil {
		d.Stop()
		return nil, err
	}
	d.startSync()
	d.startAffinityKeeper()
	d.startPacer()
	if o.Inherit != nil {
		d.bgpLater = true // Resume starts it
	} else {
		d.startBGP()
	}
	return d, nil
}

// Stop stops health checking and the datapath. A datapath whose
// forwarding outlives the daemon (datapath.Remover: the pinned XDP
// program) goes on forwarding with its last state for the next daemon to
// adopt, unless the start was clean or never served, in which case it is
// removed; the splice proxy closes with its connections.
func (d *Daemon) Stop() {
	d.Close()
	var err error
	if r, ok := d.dp.(datapath.Remover); ok && d.remove {
		err = r.Remove()
	} else {
		err = d.dp.Close()
	}
	if err != nil {
		d.log.Error("stop the datapath", "err", err)
	}
	if d.lock != nil {
		d.lock.Close()
	}
}

// removeTemps removes the temporary files a daemon killed while it wrote
// the configuration file left beside it (".tether.yaml.tmp-*", see
// writeTemp).
func removeTemps(path string, log *slog.Logger) {
	target, err := filepath.EvalSymlinks(path)
	if err != nil {
		return
	}
	stale, _ := filepath.Glob(filepath.Join(filepath.Dir(target), tempPattern(target)))
	for _, f := range stale {
		if err := os.Remove(f); err == nil {
			log.Info("removed a temporary file an earlier daemon left while it wrote the configuration", "file", f)
		}
	}
}

// openDatapath opens the datapath cfg names (see Start). The splice proxy
// comes with the lock of the pin directory, which the XDP datapath holds
// itself, so that no XDP daemon drives the same balancer meanwhile.
func openDatapath(cfg *config.Config, pinDir string, log *slog.Logger) (datapath.Datapath, io.Closer, error) {
	proxy := func(ifaces []string) (datapath.Datapath, io.Closer, error) {
		warnPinned(pinDir, log)
		var lock io.Closer
		// Without bpffs (a container without BPF), no XDP daemon can use
		// the directory either.
		if _, _, err := loader.EnsureBPFFS(pinDir); err == nil {
			f, err := loader.LockPinDir(pinDir)
			if err != nil {
				return nil, nil, err
			}
			lock = f
		} else {
			log.Debug("no lock on the pin directory: it is on no bpffs", "pin_dir", pinDir, "err", err)
		}
		return userspace.New(log, cfg.HashSeed, proxyOptions(cfg, ifaces, nil)), lock, nil
	}
	var mode loader.Mode
	switch cfg.Datapath {
	case config.DatapathSplice:
		return proxy(nil)
	case config.DatapathAuto, config.DatapathXDP:
		mode = loader.ModeNative
	case config.DatapathXDPGeneric:
		mode = loader.ModeGeneric
	default:
		return nil, nil, fmt.Errorf("unknown datapath %q: use auto, xdp, xdp-generic or splice", cfg.Datapath)
	}
	opts := loader.Options{
		Connections: cfg.Tables.Connections,
		NAT:         cfg.Tables.NAT,
		Affinity:    cfg.Tables.Affinity,
		RingSize:    cfg.Tables.RingSize,
		MaxServices: cfg.Tables.MaxServices,
		MaxBackends: cfg.Tables.MaxBackends,
		HashSeed:    cfg.HashSeed,
		InsertRate:  cfg.Tables.InsertRate,
		PinDir:      pinDir,
	}
	x, err := loader.NewXDP(opts, cfg.Interfaces, mode, log)
	if err == nil {
		return x, nil, nil
	}
	var incompatible *loader.IncompatibleError
	if cfg.Datapath != config.DatapathAuto || errors.As(err, &incompatible) {
		return nil, nil, err
	}
	for i, s := range cfg.Services {
		if s.Protocol == config.ProtocolUDP {
			return nil, nil, fmt.Errorf("native XDP unavailable (%w), and the splice proxy cannot stand in: services[%d] (%s) is udp, which needs XDP (datapath xdp-generic attaches it on any driver)", err, i, s.Name)
		}
	}
	log.Warn("native XDP unavailable, serving through the splice proxy", "interfaces", cfg.Interfaces, "err", err)
	return proxy(cfg.Interfaces)
}

// inheritProxy is the splice proxy started with a predecessor's state.
func inheritProxy(cfg *config.Config, o StartOptions, log *slog.Logger) (datapath.Datapath, io.Closer, error) {
	if cfg.Datapath == config.DatapathXDP || cfg.Datapath == config.DatapathXDPGeneric {
		return nil, nil, fmt.Errorf("the running daemon handed over splice connections, and this configuration's datapath is %s: set datapath: splice (or auto), or stop the running daemon and start this one (its connections end)", cfg.Datapath)
	}
	var ifaces []string
	if cfg.Datapath == config.DatapathAuto {
		ifaces = cfg.Interfaces // the predecessor stood in for them
	}
	var lock io.Closer
	if o.InheritLock != nil {
		lock = o.InheritLock
	}
	return userspace.New(log, cfg.HashSeed, proxyOptions(cfg, ifaces, o.Inherit)), lock, nil
}

// proxyOptions are the splice proxy's options of cfg.
func proxyOptions(cfg *config.Config, ifaces []string, inherit *userspace.State) userspace.Options {
	return userspace.Options{
		AffinityEntries: int(cfg.Tables.Affinity),
		Loops:           cfg.Splice.Loops,
		MaxConns:        cfg.Splice.MaxConnections,
		Interfaces:      ifaces,
		Inherit:         inherit,
	}
}

// warnPinned warns about an XDP datapath pinned by an earlier daemon: it
// goes on forwarding the VIPs' packets ahead of the splice proxy.
func warnPinned(dir string, log *slog.Logger) {
	if entries, err := os.ReadDir(dir); err == nil && len(entries) > 0 {
		log.Warn("an earlier tether left an XDP datapath pinned, which may still forward the VIPs' packets ahead of the splice proxy: "+
			"`tether detach` (or `tether run --clean`) removes it", "pin_dir", dir)
	}
}

// Detach removes the XDP datapath pinned in dir, whatever its layout: it
// detaches the program from every interface (whose names it returns) and
// removes the pinned maps and links. It refuses while a daemon uses dir.
func Detach(dir string) ([]string, error) { return loader.RemovePinned(dir) }
