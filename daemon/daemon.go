// Package daemon runs `tether run`: it reads the configuration, takes the
// API socket and the metrics address, starts the datapath through
// control.Start, serves the API and the metrics, reloads on SIGHUP, and
// stops everything when its context ends (SIGINT, SIGTERM). It knows no
// datapath: control opens the one the configuration names.
package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
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
	Log     *slog.Logger
}

// Run serves o.Config until ctx ends. The API socket and the metrics
// address are taken before anything is attached, so that a second daemon
// fails before it touches the first one's datapath. It returns when ctx
// ends (nil) or the API or metrics server fails; the datapath is then
// stopped as control.Daemon.Stop says.
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
	ln, err := control.Listen(o.Socket)
	if err != nil {
		return err
	}
	defer ln.Close()
	var mln net.Listener
	if o.Metrics != "" {
		if mln, err = net.Listen("tcp", o.Metrics); err != nil {
			return fmt.Errorf("--metrics: %w", err)
		}
		defer mln.Close()
		if !metrics.IsLoopback(o.Metrics) {
			log.Warn("metrics served beyond loopback: anyone who reaches the address reads every service and backend", "addr", mln.Addr().String())
		}
	}
	d, err := control.Start(o.Config, cfg, control.StartOptions{PinDir: o.PinDir, Clean: o.Clean, File: file, DrainMark: o.Socket + ".drained"}, log)
	if err != nil {
		return err
	}
	defer func() {
		d.Stop() // after the API and metrics have stopped
		log.Info("stopped")
	}()

	apiCtx, stopAPI := context.WithCancel(ctx)
	apiDone := make(chan error, 1)
	go func() { apiDone <- control.Serve(apiCtx, ln, d.Handler(), log) }()
	defer func() {
		stopAPI()
		<-apiDone
	}()
	metricsDone := make(chan error, 1)
	if mln != nil {
		go func() { metricsDone <- metrics.Serve(apiCtx, mln, metrics.Handler(d, log)) }()
		defer func() {
			stopAPI() // stops the metrics too
			<-metricsDone
		}()
		log.Info("serving metrics", "addr", mln.Addr().String(), "path", "/metrics")
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	log.Info("ready", "version", o.Version, "services", len(cfg.Services), "interfaces", cfg.Interfaces, "datapath", cfg.Datapath, "modes", d.Modes(), "socket", o.Socket,
		"took", time.Since(start).Round(time.Millisecond))
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-apiDone:
			apiDone <- nil // for the deferred wait
			return err
		case err := <-metricsDone:
			metricsDone <- nil // for the deferred wait
			return err
		case <-hup:
			_, _ = d.Reload() // logs the outcome
		}
	}
}
