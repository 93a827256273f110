package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/loader"
)

var runCommand = &cli.Command{
	Name:  "run",
	Usage: "run the balancer: attach the XDP program and serve the configured services",
	Description: `run loads the configuration file, attaches tether's XDP program to the
interfaces it names, fills the maps and forwards until SIGINT or SIGTERM,
which detach the program. SIGHUP re-reads the file and applies what changed;
a file that does not validate is refused whole and the running state stays.

The configuration is YAML; see the README for every field. The smallest one:

    interfaces: [eth0]
    services:
      - name: chat
        vip: 203.0.113.10
        port: 8765
        backends:
          - address: 192.0.2.11
          - address: 192.0.2.12

Backends must be on a network directly connected to one of the interfaces
(dsr forwarding rewrites MAC addresses only) and hold the VIP on a loopback
interface, with arp_ignore=1 and arp_announce=2.`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "config", Aliases: []string{"c"}, Usage: "configuration `FILE` (required)"},
		&cli.StringFlag{Name: "log-format", Value: "text", Usage: "log format: text or json"},
		&cli.StringFlag{Name: "log-level", Value: "info", Usage: "log level: debug, info, warn or error"},
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
		return runDaemon(ctx, c.String("config"), log)
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

// datapathMode maps the configured datapath to an XDP attach mode.
func datapathMode(dp string) (loader.Mode, error) {
	switch dp {
	case config.DatapathAuto, config.DatapathXDP:
		return loader.ModeNative, nil
	case config.DatapathXDPGeneric:
		return loader.ModeGeneric, nil
	}
	return "", fmt.Errorf("datapath %q is not available in this version of tether: use xdp or xdp-generic", dp)
}

// runDaemon serves path's configuration until ctx ends.
func runDaemon(ctx context.Context, path string, log *slog.Logger) error {
	cfg, err := config.Load(path)
	if err != nil {
		return err
	}
	mode, err := datapathMode(cfg.Datapath)
	if err != nil {
		return err
	}
	opts := loader.Options{
		Connections: cfg.Tables.Connections,
		Affinity:    cfg.Tables.Affinity,
		RingSize:    cfg.Tables.RingSize,
		MaxServices: cfg.Tables.MaxServices,
		MaxBackends: cfg.Tables.MaxBackends,
		HashSeed:    cfg.HashSeed,
	}
	dp, err := loader.NewXDP(opts, cfg.Interfaces, mode, log)
	if err != nil {
		return err
	}
	defer func() {
		if err := dp.Close(); err != nil {
			log.Error("close datapath", "err", err)
		}
		log.Info("stopped; XDP program detached")
	}()
	ctl := control.New(dp, cfg.HashSeed, cfg.Tables.RingSize, cfg.Tables.MaxServices, cfg.Tables.MaxBackends, log)
	if err := ctl.Apply(cfg); err != nil {
		return fmt.Errorf("apply %s: %w", path, err)
	}
	log.Info("ready", "services", len(cfg.Services), "interfaces", cfg.Interfaces, "datapath", cfg.Datapath)

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-hup:
			reload(ctl, path, cfg.Tables, cfg.HashSeed, log)
		}
	}
}

// reload re-reads the configuration and applies it. Table sizes and the
// hash seed are fixed when the program is loaded; a change of them needs a
// restart and is refused.
func reload(ctl *control.Controller, path string, tables config.Tables, seed uint32, log *slog.Logger) {
	cfg, err := config.Load(path)
	if err != nil {
		log.Error("reload refused; running state unchanged", "err", err)
		return
	}
	if cfg.Tables != tables || cfg.HashSeed != seed {
		log.Error("reload refused: tables and hash_seed take effect only at start; restart tether to change them")
		return
	}
	if err := ctl.Apply(cfg); err != nil {
		log.Error("reload failed", "err", err)
		return
	}
	log.Info("reloaded", "services", len(cfg.Services))
}
