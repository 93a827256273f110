// Package daemon runs `tether run`: it reads the configuration, takes the
// API socket and the metrics address, starts the datapath through
// control.Start, serves the API and the metrics, reloads on SIGHUP, and
// stops everything when its context ends (SIGINT, SIGTERM). It knows no
// datapath: control opens the one the configuration names.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/handover"
	"github.com/tetherlb/tether/metrics"
)

// Options are what `tether run` takes.
type Options struct {
	// Config is the configuration file, the source of truth that API
	// changes are written back to.
	Config string
	// Socket is the path of the API's unix socket (control.DefaultSocket
	// when empty).
	Socket string
	// Metrics, if set, is the TCP address Prometheus metrics are served
	// on (/metrics).
	Metrics string
	// PinDir and Clean: see control.StartOptions.
	PinDir string
	Clean  bool
	// Version is logged when the daemon is ready.
	Version string
	// Takeover has the daemon take the connections of the splice daemon
	// running with the same Socket (package handover) instead of starting
	// afresh: the running one exits once this one serves them.
	Takeover bool
	Log      *slog.Logger
}

// Run serves o.Config until ctx ends. The API socket and the metrics
// address are taken before anything is attached, so that a second daemon
// fails before it touches the first one's datapath; with o.Takeover they
// are taken after the running daemon has handed over and let go of them.
// It returns when ctx ends (nil), the daemon handed everything to a
// successor (nil), or the API or metrics server fails; the datapath is
// then stopped as control.Daemon.Stop says.
func Run(ctx context.Context, o Options) error {
	log := o.Log
	if o.Socket == "" {
		o.Socket = control.DefaultSocket
	}
	start := time.Now()
	file, err := config.ReadFile(o.Config, nil)
	if err != nil {
		return err
	}
	cfg := file.Config()
	log.Info("configuration read", "services", len(cfg.Services), "took", time.Since(start).Round(time.Millisecond))
	so := control.StartOptions{PinDir: o.PinDir, Clean: o.Clean, File: file, DrainMark: o.Socket + ".drained"}
	var (
		taken   *handover.Taken
		ln, mln net.Listener
	)
	if o.Takeover {
		if o.Clean {
			return fmt.Errorf("--takeover keeps the running daemon's connections, --clean would drop them: give one of the two")
		}
		if taken, err = handover.Take(handover.Path(o.Socket), o.Version); err != nil {
			return fmt.Errorf("--takeover: %w", err)
		}
		so.Inherit = taken.Package.Proxy
		if taken.Package.Lock >= 0 {
			so.InheritLock = os.NewFile(uintptr(taken.Package.Lock), "pin-dir-lock")
		}
		log.Info("the running daemon handed over", "its_version", taken.Version, "connections", len(so.Inherit.Conns), "listeners", len(so.Inherit.Listeners))
	} else {
		if ln, mln, err = listen(o, log); err != nil {
			return err
		}
		defer ln.Close()
		if mln != nil {
			defer mln.Close()
		}
	}
	d, err := control.Start(o.Config, cfg, so, log)
	if err != nil {
		if taken != nil {
			taken.Abort(err.Error())
		}
		return err
	}
	defer func() {
		d.Stop() // after the API and metrics have stopped
		log.Info("stopped")
	}()
	if taken != nil {
		if ctx.Err() != nil {
			taken.Abort("the new daemon was stopped")
			return nil // Stop closes what it took without disturbing it
		}
		if err := taken.Commit(handover.Path(o.Socket)); err != nil {
			return fmt.Errorf("--takeover: %w", err)
		}
		// From here on this daemon alone serves the connections: nothing
		// that fails now may end them.
		if err := d.Resume(); err != nil {
			log.Error("cannot serve the connections handed over", "err", err)
		}
		if ln, mln, err = listenAgain(o, log); err != nil {
			log.Error("serving the connections without the API or metrics: once the socket or address is free, take this daemon over again (tether run --takeover)", "err", err)
		}
		if ln != nil {
			defer ln.Close()
		}
		if mln != nil {
			defer mln.Close()
		}
	}

	apiCtx, stopAPI := context.WithCancel(ctx)
	api := serveIn(ln, func(ln net.Listener) error { return control.Serve(apiCtx, ln, d.Handler(), log) })
	mets := serveIn(mln, func(ln net.Listener) error { return metrics.Serve(apiCtx, ln, metrics.Handler(d, log)) })
	defer func() {
		stopAPI() // stops the metrics too
		api.wait()
		mets.wait()
	}()
	if mln != nil {
		log.Info("serving metrics", "addr", mln.Addr().String(), "path", "/metrics")
	}
	var handing atomic.Bool
	handed := make(chan struct{})
	if d.HandsOver() {
		hln, err := handover.Listen(handover.Path(o.Socket))
		if err != nil {
			log.Error("no handover socket: this daemon cannot be taken over", "err", err)
		} else {
			defer hln.Close() // before the datapath stops: no taker then
			g := &giver{d: d, version: o.Version, release: func() {
				// The successor takes the API socket and the metrics
				// address once this daemon has let go of them; the
				// handover socket goes first, the successor makes its own.
				handing.Store(true)
				hln.Close()
				stopAPI()
				api.wait()
				mets.wait()
			}}
			go func() {
				if handover.Serve(hln, g, o.Version, log) == nil {
					close(handed)
				}
			}()
		}
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	log.Info("ready", "version", o.Version, "services", len(cfg.Services), "interfaces", cfg.Interfaces, "datapath", cfg.Datapath, "modes", d.Modes(), "socket", o.Socket,
		"took", time.Since(start).Round(time.Millisecond))
	sayNotify(log, fmt.Sprintf("READY=1\nSTATUS=serving %d services (%s)", len(cfg.Services), cfg.Datapath))
	defer sayNotify(log, "STOPPING=1")
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-handed:
			return nil
		case <-api.done:
			if handing.Load() {
				<-handed
				return nil
			}
			return api.err
		case <-mets.done:
			if handing.Load() {
				<-handed
				return nil
			}
			return mets.err
		case <-hup:
			sayNotify(log, fmt.Sprintf("RELOADING=1\nMONOTONIC_USEC=%d", monotonicUsec()))
			status := "reloaded"
			if _, err := d.Reload(); err != nil { // logs the outcome
				status = "reload refused or failed: the running configuration stays"
			}
			sayNotify(log, "READY=1\nSTATUS="+status)
		}
	}
}

// sayNotify is notify, its failure logged.
func sayNotify(log *slog.Logger, state string) {
	if err := notify(state); err != nil {
		log.Warn("cannot tell the service manager", "state", state, "err", err)
	}
}

// server is a server running in its goroutine, if it has a listener:
// done closes when it returns, with err.
type server struct {
	running bool
	done    chan struct{}
	err     error
}

// serveIn runs serve(ln) in a goroutine; without ln, nothing, and done
// never closes.
func serveIn(ln net.Listener, serve func(net.Listener) error) *server {
	s := &server{done: make(chan struct{}), running: ln != nil}
	if s.running {
		go func() {
			s.err = serve(ln)
			close(s.done)
		}()
	}
	return s
}

// wait waits for the server to return, if it runs.
func (s *server) wait() {
	if s.running {
		<-s.done
	}
}

// listen takes the API socket and the metrics address.
func listen(o Options, log *slog.Logger) (ln, mln net.Listener, err error) {
	if ln, err = control.Listen(o.Socket); err != nil {
		return nil, nil, err
	}
	if o.Metrics != "" {
		if mln, err = net.Listen("tcp", o.Metrics); err != nil {
			ln.Close()
			return nil, nil, fmt.Errorf("--metrics: %w", err)
		}
		if !metrics.IsLoopback(o.Metrics) {
			log.Warn("metrics served beyond loopback: anyone who reaches the address reads every service and backend", "addr", mln.Addr().String())
		}
	}
	return ln, mln, nil
}

// listenAgain takes the API socket and the metrics address after a
// takeover, each as soon as the previous daemon has let go of it (a
// moment at most). It returns what it could take, and why not the rest.
func listenAgain(o Options, log *slog.Logger) (ln, mln net.Listener, err error) {
	deadline := time.Now().Add(5 * time.Second)
	var apiErr, metricsErr error
	for {
		if ln == nil {
			ln, apiErr = control.Listen(o.Socket)
		}
		if mln == nil && o.Metrics != "" {
			if mln, metricsErr = net.Listen("tcp", o.Metrics); metricsErr != nil {
				mln, metricsErr = nil, fmt.Errorf("--metrics: %w", metricsErr)
			}
		}
		if (ln != nil && (mln != nil || o.Metrics == "")) || time.Now().After(deadline) {
			return ln, mln, errors.Join(apiErr, metricsErr)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// giver hands the daemon over (handover.Giver).
type giver struct {
	d       *control.Daemon
	version string
	release func()
}

func (g *giver) Freeze() (*handover.Package, error) {
	st, lock, err := g.d.Freeze()
	if err != nil {
		return nil, err
	}
	return &handover.Package{Version: g.version, Proxy: st, Lock: lock}, nil
}

func (g *giver) Thaw() { g.d.Thaw() }

func (g *giver) Release() {
	g.d.Release()
	g.release()
}
