package main

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/tetherlb/tether/control"
)

var vipCommand = &cli.Command{
	Name:  "vip",
	Usage: "add, remove and list services (a VIP, a port and a protocol)",
	Description: `A service is a virtual IP address and port that clients connect to, balanced
over backends ("tether backend"). Services are named VIP:PORT on the command
line, with IPv6 VIPs in brackets ([2001:db8::10]:8765); where a VIP:PORT has
both a tcp and a udp service, add /tcp or /udp.

Changes are applied at once and written back to the daemon's configuration
file, which stays the source of truth (tether reload re-reads it).`,
	Subcommands: []*cli.Command{vipAddCommand, vipRmCommand, vipLsCommand},
	Action:      groupAction("add, rm or ls"),
}

var vipAddCommand = &cli.Command{
	Name:      "add",
	Usage:     "add a service, with no backends yet",
	ArgsUsage: "VIP:PORT",
	Description: `add creates a service on VIP:PORT. Add backends with "tether backend add";
until then new TCP connections are refused with a reset and UDP packets
dropped. With dsr forwarding, the default, the backends hold the VIP on a
loopback interface; with nat they route their replies to the clients
through this host; with fullnat they need nothing (see tether run --help).

The --health-* flags set the service's health check, as the health block
of the configuration file does; the fields left out take their defaults.
Without them a tcp service gets a TCP connect to each backend every 2s,
and a udp service no check at all (--health-type udp probes with a
datagram: see the configuration's health checks). --health-via vip
probes each backend at the VIP, along the path clients' packets take
(dsr, ipip, gue), so that a backend missing the VIP or its decapsulation
goes down. --on-down reset resets the established connections of a
backend that goes down.

Examples:
  tether vip add 203.0.113.10:8765 --name chat --affinity-timeout 1h
  tether vip add 203.0.113.10:80 --health-type http --health-path /healthz --health-interval 1s
  tether vip add 203.0.113.10:80 --forwarding ipip --health-via vip
  tether vip add 203.0.113.20:9000 --protocol udp --health-type udp --health-send ping
  tether vip add 203.0.113.10:80 --forwarding fullnat   # then: tether backend add 203.0.113.10:80 192.0.2.11:8765
  tether vip add 203.0.113.10:80 --forwarding gue --tunnel-source 198.51.100.0/28   # backends: tether backend-setup --forwarding gue 203.0.113.10`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "protocol", Value: "tcp", Usage: "transport `PROTO`: tcp or udp"},
		&cli.StringFlag{Name: "affinity", Value: "source", Usage: "affinity `MODE`: source (all of a client's connections on one backend) or connection (each connection on its own)"},
		&cli.StringFlag{Name: "affinity-timeout", Value: "3h", Usage: "how long a client's backend is remembered, as a `DURATION` (90s, 30m, 3h)"},
		&cli.StringFlag{Name: "forwarding", Value: "dsr", Usage: "forwarding `MODE`: dsr (MAC rewrite; backends on this network hold the VIP), ipip or gue (encapsulated to backends on any network, which hold the VIP and decapsulate: see tether backend-setup), nat (address and port rewrite; backends route replies through this host) or fullnat (the client's address too; backends need nothing)"},
		&cli.StringFlag{Name: "snat-address", Usage: "fullnat: the `ADDR` connections reach the backends from (default: the address of the interface that reaches each backend)"},
		&cli.StringFlag{Name: "tunnel-source", Usage: "ipip and gue: the outer source `ADDR[/LEN]`; a prefix's low bits vary per flow, so that backends' NICs spread flows (default: the address of the interface that reaches each backend)"},
		&cli.UintFlag{Name: "gue-port", Usage: "gue: the outer UDP destination `PORT`, where backends listen with fou (default 6080)"},
		&cli.StringFlag{Name: "name", Usage: "the service's `NAME`, for listings and metrics (default: VIP-PORT, such as 203.0.113.10-8765)"},
		&cli.StringFlag{Name: "health-type", Usage: "health check `TYPE`: tcp, http, websocket, udp or none (default: tcp for a tcp service, none for udp)"},
		&cli.StringFlag{Name: "health-path", Usage: "http and websocket checks: the request `PATH` (default /)"},
		&cli.StringFlag{Name: "health-host", Usage: "http and websocket checks: the Host header (default the backend's ADDR:PORT)"},
		&cli.StringFlag{Name: "health-send", Usage: "websocket check: a `TEXT` message whose echo must contain it; udp check: the datagram to send, which must be answered"},
		&cli.StringFlag{Name: "health-expect-status", Usage: "http check: the statuses that pass, `LOW[-HIGH]` (default 200-399)"},
		&cli.StringFlag{Name: "health-interval", Usage: "time between two probes, a `DURATION` (default 2s)"},
		&cli.StringFlag{Name: "health-timeout", Usage: "how long a probe may take, a `DURATION` less than the interval (default 1s)"},
		&cli.IntFlag{Name: "health-rise", Usage: "successes in a row that bring a down backend up (default 2)"},
		&cli.IntFlag{Name: "health-fall", Usage: "failures in a row that take an up backend down (default 3)"},
		&cli.StringFlag{Name: "health-via", Usage: "the path probes take: `backend` (its own address, the default) or vip (the VIP and port, along the clients' path: dsr, ipip and gue services; a backend without the VIP or its decapsulation fails)"},
		&cli.StringFlag{Name: "icmp-echo", Usage: "ICMP echo requests to the VIP: reply (default: the program answers them) or pass (the kernel gets them)"},
		&cli.StringFlag{Name: "on-down", Usage: "what happens to the established connections of a backend that goes down: keep (default) or reset"},
		outputFlag,
	},
	Action: func(c *cli.Context) error {
		a, done, err := args(c, 1, 1, "VIP:PORT")
		if done || err != nil {
			return err
		}
		spec := control.ServiceSpec{VIP: a[0]}
		for _, f := range []struct {
			name string
			dst  *string
		}{
			{"protocol", &spec.Protocol},
			{"affinity", &spec.Affinity},
			{"affinity-timeout", &spec.AffinityTimeout},
			{"forwarding", &spec.Forwarding},
			{"snat-address", &spec.SNATAddress},
			{"tunnel-source", &spec.TunnelSource},
			{"name", &spec.Name},
			{"on-down", &spec.OnDown},
			{"icmp-echo", &spec.ICMPEcho},
		} {
			if c.IsSet(f.name) {
				*f.dst = c.String(f.name)
			}
		}
		if c.IsSet("gue-port") {
			p := c.Uint("gue-port")
			if p == 0 || p > 65535 {
				return fmt.Errorf("--gue-port %d is out of range 1..65535", p)
			}
			spec.GUEPort = uint16(p)
		}
		h, err := healthFlags(c)
		if err != nil {
			return err
		}
		spec.Health = h
		format, err := outputFormat(c)
		if err != nil {
			return err
		}
		return reportAs(c.App.Writer, format)(client(c).AddService(c.Context, spec))
	},
}

// healthFlags reads the --health-* flags into a health check, nil when
// none is set (the service takes its protocol's default).
func healthFlags(c *cli.Context) (*control.HealthSpec, error) {
	var h control.HealthSpec
	set := false
	for _, f := range []struct {
		name string
		dst  *string
	}{
		{"health-type", &h.Type}, {"health-path", &h.Path}, {"health-host", &h.Host}, {"health-send", &h.Send},
		{"health-interval", &h.Interval}, {"health-timeout", &h.Timeout}, {"health-via", &h.Via},
	} {
		if c.IsSet(f.name) {
			*f.dst, set = c.String(f.name), true
		}
	}
	for _, f := range []struct {
		name string
		dst  *int
	}{{"health-rise", &h.Rise}, {"health-fall", &h.Fall}} {
		if c.IsSet(f.name) {
			if *f.dst, set = c.Int(f.name), true; *f.dst < 1 {
				return nil, usagef("--%s: %d is not a count (at least 1)", f.name, *f.dst)
			}
		}
	}
	if c.IsSet("health-expect-status") {
		set = true
		lo, hi, _ := strings.Cut(c.String("health-expect-status"), "-")
		for _, s := range []string{lo, hi} {
			if s == "" && hi == "" {
				continue
			}
			n, err := strconv.Atoi(s)
			if err != nil {
				return nil, usagef("--health-expect-status: %q is not a status or a range such as 200-399", c.String("health-expect-status"))
			}
			h.ExpectStatus = append(h.ExpectStatus, n)
		}
	}
	if !set {
		return nil, nil
	}
	return &h, nil
}

var vipRmCommand = &cli.Command{
	Name:      "rm",
	Usage:     "remove a service and its backends",
	ArgsUsage: "VIP:PORT[/PROTO]",
	Description: `rm removes the service and its backends; its traffic is no longer forwarded
(open connections break). To take a service out gently, drain its backends
first and wait for "tether backend ls" to show no connections.`,
	Flags: []cli.Flag{outputFlag},
	Action: listing(1, 1, "VIP:PORT[/PROTO]", func(c *cli.Context, a []string, format string) error {
		return reportAs(c.App.Writer, format)(client(c).RemoveService(c.Context, a[0]))
	}),
}

var vipLsCommand = &cli.Command{
	Name:  "ls",
	Usage: "list the services",
	Flags: []cli.Flag{outputFlag},
	Action: listing(0, 0, "", func(c *cli.Context, _ []string, format string) error {
		return vipLs(c.Context, client(c), c.App.Writer, format)
	}),
}

// vipLs lists the services as a table or as JSON.
func vipLs(ctx context.Context, cl *control.Client, w io.Writer, format string) error {
	svcs, err := cl.Services(ctx, "")
	if err != nil {
		return err
	}
	if format == "json" {
		return printJSON(w, svcs)
	}
	if len(svcs) == 0 {
		fmt.Fprintln(w, "no services; add one with: tether vip add VIP:PORT")
		return nil
	}
	t := newTable(w, "NAME", "VIP", "PROTO", "STATE", "AFFINITY", "TIMEOUT", "FORWARDING", "HEALTH", "BACKENDS", "CONNECTIONS")
	for _, s := range svcs {
		timeout := s.AffinityTimeout
		if s.Affinity != "source" {
			timeout = "-"
		}
		t.row(s.Name, s.VIP, s.Protocol, s.State, s.Affinity, timeout, s.Forwarding, s.Health.Type, backendSummary(s), fmt.Sprint(activeConns(s)))
	}
	return t.flush()
}

// groupAction is the action of a command group called without a
// subcommand, or with one it does not have.
func groupAction(subcommands string) cli.ActionFunc {
	return func(c *cli.Context) error {
		name := cmdName(c)
		if c.NArg() == 0 {
			return usagef("%s needs a subcommand: %s; see tether %s --help", name, subcommands, name)
		}
		return usagef("%s: no subcommand %q (want %s); see tether %s --help", name, c.Args().First(), subcommands, name)
	}
}
