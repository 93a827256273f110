package control

import (
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/health"
)

// Daemon is what `tether run` serves its API from: the configuration file,
// the Controller that applies it and the datapath that forwards. The file
// stays the source of truth: every change made through the API is written
// back to it (atomically, by renaming a complete new file over it), and
// Reload re-reads it.
//
// A change is refused whole when its input is wrong (a *RefusedError, or
// a *config.FieldError naming the field), and undone when the datapath
// fails to apply it; either way the running state and the file stay as
// they were. Its methods are safe for concurrent use; changes are applied
// one at a time. A Daemon lives as long as its datapath.
//
// After StartHealth the daemon also probes every backend of every service
// with its service's check (a health.Monitor, whose targets follow every
// change and reload; a backend shared by services with equal checks is
// probed once) and feeds the verdicts to the Controller, which takes down
// backends out of their rings. Close stops the probing.
type Daemon struct {
	path   string
	ctl    *Controller
	dp     datapath.Datapath
	log    *slog.Logger
	remove bool // Stop removes a datapath that outlives Close (see Start)
	// drainMark records a host drain across restarts (see
	// StartOptions.DrainMark).
	drainMark string
	share     sharer // the sync block's
	// adopted: the datapath was adopted from an earlier daemon, which
	// stopped (gracefully, for BGP).
	adopted bool
	lock    io.Closer // the pin directory's lock a splice datapath holds, released by Stop
	// handedOver: the splice proxy's connections went to a successor
	// (Release), which serves them on; bgpLater: a daemon that took
	// over starts BGP at Resume.
	handedOver atomic.Bool
	bgpLater   bool

	// fixed holds the settings that take effect only at start (interfaces,
	// datapath, hash seed, tables); its services are unused.
	fixed *config.Config

	mu sync.Mutex // serialises changes and reloads
	// file is the configuration file as the daemon last read or wrote it
	// with the running configuration applied from it in full, nil when
	// unknown (see sameFile).
	file *config.File

	// Health checking, from StartHealth to Close.
	mon       atomic.Pointer[health.Monitor]
	pendingMu sync.Mutex
	pending   map[health.Target]bool // transitions not yet applied
	answered  map[netip.Addr]bool    // backends the datapath reaches now, not yet applied
	wake      chan struct{}          // a transition is pending (capacity 1)
	stop      chan struct{}          // closed by Close
	loopDone  chan struct{}          // closed when the health loop returns
	closeOnce sync.Once

	// BGP, from startBGP to Close (daemon_bgp.go).
	bgpMu      sync.Mutex
	ann        announcer
	bgpStop    chan struct{}
	bgpDone    chan struct{}
	syncStop   chan struct{}
	syncDone   chan struct{}
	keepStop   chan struct{}
	keepDone   chan struct{}
	pace       *pacer // paced drains (daemon_drain.go), from start to Close
	bgpLastErr string
}

// NewDaemon returns the daemon of the configuration file at path. cfg is
// the configuration the datapath was created with and ctl has applied:
// its interfaces, datapath, hash seed and table sizes stay fixed for the
// life of the daemon.
func NewDaemon(path string, cfg *config.Config, ctl *Controller, dp datapath.Datapath, log *slog.Logger) *Daemon {
	d := &Daemon{path: path, ctl: ctl, dp: dp, log: log, fixed: cfg.Clone(),
		pending: make(map[health.Target]bool), answered: make(map[netip.Addr]bool), wake: make(chan struct{}, 1)}
	if r, ok := dp.(datapath.Resolver); ok {
		// From now on, so that no answer is missed: the health loop,
		// once started, applies those that came before.
		r.OnResolved(d.backendAnswered)
	}
	return d
}

// ConfigPath returns the configuration file the daemon serves.
func (d *Daemon) ConfigPath() string { return d.path }

// Close stops the BGP speaker (its peers withdraw this host's routes), the
// sharing of entries and the health checks, if they run, and waits for
// them. The
// datapath stays as it is. Later calls do nothing.
func (d *Daemon) Close() {
	d.closeOnce.Do(func() {
		if d.bgpStop != nil {
			close(d.bgpStop)
			<-d.bgpDone
		}
		if d.keepStop != nil {
			close(d.keepStop)
			<-d.keepDone
		}
		d.stopPacer()
		if d.syncStop != nil {
			close(d.syncStop)
			<-d.syncDone
		}
		d.mu.Lock()
		mon := d.mon.Load()
		d.mu.Unlock()
		if mon == nil {
			return
		}
		mon.Close() // no callback runs after this
		close(d.stop)
		<-d.loopDone
	})
}

// snapshot returns the configuration and the services as applied, taken
// together.
func (d *Daemon) snapshot() (*config.Config, []datapath.Service) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.ctl.Config(), d.ctl.Services()
}

// Tables says how full the datapath's tables are: the XDP connection and
// affinity tables, or the splice proxy's connections and affinity table,
// with their capacities; for a datapath that cannot say, its connections
// counted from its flows, without a capacity. Counting walks the tables
// (in batches for XDP), so it costs tens of milliseconds with a million
// entries.
func (d *Daemon) Tables() ([]datapath.Table, error) {
	if tr, ok := d.dp.(datapath.TableReader); ok {
		t, err := tr.Tables()
		if err != nil {
			return nil, fmt.Errorf("count table entries: %w", err)
		}
		return t, nil
	}
	flows, err := d.dp.Flows()
	if err != nil {
		return nil, fmt.Errorf("read the connection table: %w", err)
	}
	return []datapath.Table{{Name: "connections", Entries: len(flows)}}, nil
}

// Modes says how the datapath runs, per interface (datapath.Datapath.Modes).
func (d *Daemon) Modes() map[string]string { return d.dp.Modes() }
