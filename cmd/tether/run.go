package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/loader"
	"github.com/tetherlb/tether/metrics"
	"github.com/tetherlb/tether/userspace"
)

var runCommand = &cli.Command{
	Name:  "run",
	Usage: "run the balancer: attach the XDP program (or start the splice proxy) and serve the configured services",
	Description: `run loads the configuration file, attaches tether's XDP program to the
interfaces it names, fills the maps and forwards until SIGINT or SIGTERM,
which leave the program attached and forwarding (see below). SIGHUP (or
"tether reload") re-reads the file and applies what changed; a file that
does not validate is refused whole and the running state stays.

The other tether commands (vip, backend, status, stats, flows, reload) talk
to the daemon over a unix socket, mode 0600 (--socket, default
/run/tether/tether.sock). Changes made with them are applied at once and
written back to the configuration file, atomically; the file stays the
source of truth, but its comments are not kept.

The configuration is YAML; see the README for every field. The smallest one:

    interfaces: [eth0]
    services:
      - name: chat
        vip: 203.0.113.10
        port: 8765
        backends:
          - address: 192.0.2.11
          - address: 192.0.2.12

Datapaths: "datapath: xdp" (native XDP) and "xdp-generic" attach the program
to every interface or fail. "auto", the default, attaches native XDP and,
where a driver or the kernel refuses it, serves every service through the
splice proxy instead, logging why ("native XDP unavailable, serving through
the splice proxy"). "splice" always does: a userspace TCP proxy that moves
bytes with splice(2), needs no interface, and makes each VIP local to the
host with a route (ip route add local VIP dev lo) that it removes when it
stops. "tether status" shows the mode in force per interface.

With XDP, backends must be on a network directly connected to one of the interfaces
(dsr forwarding rewrites MAC addresses only) and hold the VIP on a loopback
interface, with arp_ignore=1 and arp_announce=2.

Health checks: the daemon probes every backend with its service's check (a
TCP connect every 2s by default; http and websocket checks too; "health:
{type: none}" turns them off) and takes a backend that fails fall probes in
a row out of the ring until it passes rise in a row. Established
connections to it keep flowing, or are reset with "on_down: reset". A
service with no usable backend refuses new TCP connections with a reset.
Every transition is logged with the reason of the probe that decided it.

Restarts and upgrades: the maps and the XDP links are pinned in bpffs under
--pin-dir (default ` + loader.DefaultPinDir + `; bpffs is mounted at /sys/fs/bpf if
it is not). Stopping the daemon leaves the program attached and forwarding
with its last state. The next "tether run", of this version or of a newer
one with the same map layout, adopts the pinned maps with every connection
and affinity entry, gives unchanged services and backends their ids again
and replaces the program in place; interfaces no longer configured are
detached. Pinned state of another layout or other table sizes is refused:
"tether detach" (or "tether run --clean") removes it, which drops
every tracked connection.`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "config", Aliases: []string{"c"}, Usage: "configuration `FILE` (required)"},
		&cli.StringFlag{Name: "pin-dir", Value: loader.DefaultPinDir, Usage: "bpffs `DIR` of the pinned maps and links, one per balancer"},
		&cli.BoolFlag{Name: "clean", Usage: "start afresh, removing pinned state first, and detach and remove everything on exit (drops tracked connections)"},
		&cli.StringFlag{Name: "log-format", Value: "text", Usage: "log format: text or json"},
		&cli.StringFlag{Name: "log-level", Value: "info", Usage: "log level: debug, info, warn or error"},
		&cli.StringFlag{Name: "socket", Usage: "serve the API on the unix socket `PATH` (default: tether's --socket, " + control.DefaultSocket + ")"},
		&cli.StringFlag{Name: "metrics", Usage: "serve Prometheus metrics at http://`ADDR`/metrics, such as 127.0.0.1:9470 (default off; an address other than loopback is warned about: the metrics name every backend)"},
	},
	Action: func(c *cli.Context) error {
		if c.NArg() > 0 {
			return usagef("run takes no arguments, got %q", c.Args().Slice())
		}
		if c.String("config") == "" {
			return usagef("run needs --config FILE")
		}
		log, err := newLogger(c.App.ErrWriter, c.String("log-format"), c.String("log-level"))
		if err != nil {
			return err
		}
		ctx, stop := signal.NotifyContext(c.Context, syscall.SIGINT, syscall.SIGTERM)
		defer stop()
		socket := c.String("socket")
		for _, parent := range c.Lineage()[1:] { // else the global --socket
			if socket == "" {
				socket = parent.String("socket")
			}
		}
		return runDaemon(ctx, c.String("config"), socket, c.String("metrics"), pins{c.String("pin-dir"), c.Bool("clean")}, log)
	},
}

func newLogger(w interface{ Write([]byte) (int, error) }, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, usagef("--log-level: %q is not one of debug, info, warn, error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, usagef("--log-format: %q is not text or json", format)
}

// datapathMode maps the configured datapath to an XDP attach mode; splice
// has none.
func datapathMode(dp string) (loader.Mode, error) {
	switch dp {
	case config.DatapathAuto, config.DatapathXDP:
		return loader.ModeNative, nil
	case config.DatapathXDPGeneric:
		return loader.ModeGeneric, nil
	case config.DatapathSplice:
		return "", nil
	}
	return "", fmt.Errorf("unknown datapath %q: use auto, xdp, xdp-generic or splice", dp)
}

// openDatapath starts the configured datapath: the XDP program (xdp is
// set), or the splice proxy. With datapath auto, an XDP program that
// cannot be loaded or attached natively to every interface gives way to
// the proxy, which is logged with the reason.
func openDatapath(cfg *config.Config, mode loader.Mode, opts loader.Options, log *slog.Logger) (dp datapath.Datapath, xdp *loader.XDP, err error) {
	proxyOpts := userspace.Options{
		AffinityEntries: int(cfg.Tables.Affinity),
		Loops:           cfg.Splice.Loops,
		MaxConns:        cfg.Splice.MaxConnections,
	}
	if cfg.Datapath == config.DatapathSplice {
		warnPinned(opts.PinDir, log)
		return newSplice(log, cfg.HashSeed, proxyOpts, nil), nil, nil
	}
	x, err := loader.NewXDP(opts, cfg.Interfaces, mode, log)
	if err == nil {
		return x, x, nil
	}
	if cfg.Datapath != config.DatapathAuto {
		return nil, nil, err
	}
	for i, s := range cfg.Services {
		if s.Protocol == config.ProtocolUDP {
			return nil, nil, fmt.Errorf("native XDP unavailable (%w), and the splice proxy cannot stand in: services[%d] (%s) is udp, which needs XDP (datapath xdp-generic attaches it on any driver)", err, i, s.Name)
		}
	}
	log.Warn("native XDP unavailable, serving through the splice proxy", "interfaces", cfg.Interfaces, "err", err)
	warnPinned(opts.PinDir, log)
	return newSplice(log, cfg.HashSeed, proxyOpts, cfg.Interfaces), nil, nil
}

// warnPinned warns about an XDP datapath pinned by an earlier daemon: it
// goes on forwarding the VIPs' packets ahead of the splice proxy.
func warnPinned(dir string, log *slog.Logger) {
	if entries, err := os.ReadDir(dir); err == nil && len(entries) > 0 {
		log.Warn("an earlier tether left an XDP datapath pinned, which may still forward the VIPs' packets ahead of the splice proxy: "+
			"`tether detach` (or `tether run --clean`) removes it", "pin_dir", dir)
	}
}

// pins says where the daemon pins its state and whether that state
// outlives it.
type pins struct {
	dir   string
	clean bool // remove pinned state at start and at exit
}

// runDaemon serves path's configuration, the API on socket and, if
// metricsAddr is not empty, Prometheus metrics on it, until ctx ends. The
// datapath stays attached and pinned in pins.dir when it returns, unless
// pins.clean or a first start failed.
func runDaemon(ctx context.Context, path, socket, metricsAddr string, pins pins, log *slog.Logger) error {
	cfg, err := config.Load(path)
	if err != nil {
		return err
	}
	mode, err := datapathMode(cfg.Datapath)
	if err != nil {
		return err
	}
	// Take the socket before attaching anything: a second daemon must not
	// replace the first one's program.
	ln, err := control.Listen(socket)
	if err != nil {
		return err
	}
	defer ln.Close()
	// And the metrics address: a taken port fails the start, not later.
	var mln net.Listener
	if metricsAddr != "" {
		if mln, err = net.Listen("tcp", metricsAddr); err != nil {
			return fmt.Errorf("--metrics: %w", err)
		}
		defer mln.Close()
		if !metrics.IsLoopback(metricsAddr) {
			log.Warn("metrics served beyond loopback: anyone who reaches the address reads every service and backend", "addr", mln.Addr().String())
		}
	}
	opts := loader.Options{
		Connections: cfg.Tables.Connections,
		Affinity:    cfg.Tables.Affinity,
		RingSize:    cfg.Tables.RingSize,
		MaxServices: cfg.Tables.MaxServices,
		MaxBackends: cfg.Tables.MaxBackends,
		HashSeed:    cfg.HashSeed,
		PinDir:      pins.dir,
	}
	if pins.clean {
		gone, err := loader.RemovePinned(pins.dir)
		if err != nil {
			return fmt.Errorf("--clean: %w", err)
		}
		log.Info("removed pinned state (--clean)", "pin_dir", pins.dir, "detached", gone)
	}
	dp, xdp, err := openDatapath(cfg, mode, opts, log)
	if err != nil {
		return err
	}
	remove := pins.clean
	defer func() {
		if xdp == nil {
			if err := dp.Close(); err != nil {
				log.Error("close datapath", "err", err)
			}
			log.Info("stopped; splice proxy closed with its connections")
			return
		}
		if remove {
			if err := xdp.Remove(); err != nil {
				log.Error("detach and remove pinned state", "err", err)
			}
			log.Info("stopped; XDP program detached and pinned state removed")
			return
		}
		if err := dp.Close(); err != nil {
			log.Error("close datapath", "err", err)
		}
		log.Info("stopped; XDP program left attached and forwarding", "pin_dir", pins.dir)
	}()
	ctl := control.New(dp, cfg.HashSeed, cfg.Tables.RingSize, cfg.Tables.MaxServices, cfg.Tables.MaxBackends, log)
	// Services the previous daemon left keep their ids before anything is
	// applied, so that no connection or affinity entry points at a
	// backend id given to another backend.
	if xdp != nil {
		if err := ctl.Adopt(xdp.AdoptedServices()); err != nil {
			return err
		}
	}
	if err := ctl.Apply(cfg); err != nil {
		remove = remove || (xdp != nil && !xdp.Adopted()) // a first start that never served leaves nothing
		return fmt.Errorf("apply %s: %w", path, err)
	}
	d := control.NewDaemon(path, cfg, ctl, dp, log)
	if err := d.StartHealth(); err != nil {
		return err
	}
	defer d.Close() // after the API has stopped
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
	log.Info("ready", "version", version, "services", len(cfg.Services), "interfaces", cfg.Interfaces, "datapath", cfg.Datapath, "modes", dp.Modes(), "socket", socket)
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
