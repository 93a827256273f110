package main

import (
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os/signal"
	"strings"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/daemon"
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
source of truth, but comments are kept only inside the services a change
leaves alone (docs/cli.md says which).

The configuration is YAML; docs/configuration.md explains every field.
The smallest one:

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

With XDP, per service, "forwarding:" says what backends need:
  dsr      (default) the program rewrites MAC addresses only: backends hold
           the VIP on a loopback interface, with arp_ignore=1 and
           arp_announce=2, listen on the service's port, answer clients
           directly, and are on a network directly connected to one of
           the interfaces.
  ipip     the packet goes to the backend whole inside an outer IP header
  gue      (gue: and a UDP header to gue_port, default 6080): backends on
           any network hold the VIP on loopback, decapsulate with the
           kernel's tunnel devices (tether backend-setup prints how) and
           answer clients directly. tunnel_source sets the outer source.
  nat      the program rewrites VIP:PORT to the backend's address and port
           and translates the replies back: backends route their replies
           to the clients through this host; they see the clients'
           addresses.
  fullnat  the client's address and port become this host's (snat_address,
           default the address of the interface towards the backend) and a
           port of 1024-32767: backends need no route and no setting; they
           see this host's address.
ipip, gue, nat and fullnat need IP forwarding on (sysctl
net.ipv4.conf.all.forwarding=1, net.ipv6.conf.all.forwarding=1): the program
asks the kernel's routes and neighbours for next hops. Their backends may be
behind a router: frames go to the gateway of the kernel's route to them.

Health checks: the daemon probes every backend with its service's check (a
TCP connect every 2s by default; http and websocket checks too; "health:
{type: none}" turns them off) and takes a backend that fails fall probes in
a row out of the ring until it passes rise in a row. Established
connections to it keep flowing, or are reset with "on_down: reset". A
service with no usable backend refuses new TCP connections with a reset.
Every transition is logged with the reason of the probe that decided it.

Restarts and upgrades: the maps and the XDP links are pinned in bpffs under
--pin-dir (default ` + control.DefaultPinDir + `; bpffs is mounted at /sys/fs/bpf if
it is not). Stopping the daemon leaves the program attached and forwarding
with its last state. The next "tether run", of this version or of a newer
one with the same map layout, adopts the pinned maps with every connection
and affinity entry, gives unchanged services and backends their ids again
and replaces the program in place; interfaces no longer configured are
detached. Pinned state of another layout or other table sizes is refused:
"tether detach" (or "tether run --clean") removes it, which drops
every tracked connection.

The splice datapath holds its connections in its own sockets: stopping it
ends them. To restart or upgrade it without ending any, start the new
daemon with --takeover while the old one runs: the old one hands over its
listening sockets and every connection, with the bytes in flight, and exits
once the new one serves them (docs/splice.md, "Restarts without loss").
If the new one fails before that, the old one serves on.`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "config", Aliases: []string{"c"}, Usage: "configuration `FILE` (required)"},
		&cli.StringFlag{Name: "pin-dir", Value: control.DefaultPinDir, Usage: "bpffs `DIR` of the pinned maps and links, one per balancer"},
		&cli.BoolFlag{Name: "clean", Usage: "start afresh, removing pinned state first, and detach and remove everything on exit (drops tracked connections)"},
		&cli.StringFlag{Name: "log-format", Value: "text", Usage: "log format: text or json"},
		&cli.StringFlag{Name: "log-level", Value: "info", Usage: "log level: debug, info, warn or error"},
		&cli.StringFlag{Name: "socket", Usage: "serve the API on the unix socket `PATH` (default: tether's --socket, " + control.DefaultSocket + ")"},
		&cli.BoolFlag{Name: "check", Usage: "read and validate the configuration, say what it holds, and exit (0: valid; 1: the first errors, with the fields named) without starting anything"},
		&cli.BoolFlag{Name: "takeover", Usage: "take every connection of the splice daemon running with the same --socket, which exits once this one serves them (restarts and upgrades on the splice datapath)"},
		&cli.StringFlag{Name: "metrics", Usage: "serve Prometheus metrics at http://`ADDR`/metrics, such as 127.0.0.1:9470 (default off; an address other than loopback is warned about: the metrics name every backend)"},
	},
	Action: func(c *cli.Context) error {
		if c.NArg() > 0 {
			return usagef("run takes no arguments, got %q", c.Args().Slice())
		}
		if c.String("config") == "" {
			return usagef("run needs --config FILE")
		}
		if c.Bool("check") {
			return checkConfig(c.App.Writer, c.String("config"))
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
		return daemon.Run(ctx, daemon.Options{
			Config:   c.String("config"),
			Socket:   socket,
			Metrics:  c.String("metrics"),
			PinDir:   c.String("pin-dir"),
			Clean:    c.Bool("clean"),
			Takeover: c.Bool("takeover"),
			Version:  version,
			Log:      log,
		})
	},
}

// checkConfig reads and validates the configuration at path and says
// what it holds.
func checkConfig(w io.Writer, path string) error {
	cfg, err := config.Load(path)
	if err != nil {
		return err
	}
	names := make([]string, len(cfg.Services))
	for i, s := range cfg.Services {
		names[i] = fmt.Sprintf("%s (%s, %d backends)", s.Name, netip.AddrPortFrom(s.VIP, s.Port), len(s.Backends))
	}
	what := "services"
	if len(names) == 1 {
		what = "service"
	}
	_, err = fmt.Fprintf(w, "%s: valid; datapath %s on %v; %d %s: %s\n", path, cfg.Datapath, cfg.Interfaces, len(names), what, strings.Join(names, ", "))
	return err
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
