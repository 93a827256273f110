package main

import (
	"context"
	"fmt"
	"io"

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
dropped. The backends hold the VIP on a loopback interface (dsr forwarding:
see tether run --help).

The service gets the default health check (a TCP connect to each backend
every 2s) and on_down keep; change them in the configuration file and run
"tether reload".

Example: tether vip add 203.0.113.10:8765 --name chat --affinity-timeout 1h`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "protocol", Value: "tcp", Usage: "transport `PROTO`: tcp or udp"},
		&cli.StringFlag{Name: "affinity", Value: "source", Usage: "affinity `MODE`: source (all of a client's connections on one backend) or connection (each connection on its own)"},
		&cli.StringFlag{Name: "affinity-timeout", Value: "3h", Usage: "how long a client's backend is remembered, as a `DURATION` (90s, 30m, 3h)"},
		&cli.StringFlag{Name: "forwarding", Value: "dsr", Usage: "forwarding `MODE`: dsr"},
		&cli.StringFlag{Name: "name", Usage: "the service's `NAME`, for listings and metrics (default: VIP-PORT, such as 203.0.113.10-8765)"},
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
			{"name", &spec.Name},
		} {
			if c.IsSet(f.name) {
				*f.dst = c.String(f.name)
			}
		}
		return vipAdd(c.Context, client(c), c.App.Writer, spec)
	},
}

// vipAdd adds a service and says so.
func vipAdd(ctx context.Context, cl *control.Client, w io.Writer, spec control.ServiceSpec) error {
	return report(w)(cl.AddService(ctx, spec))
}

var vipRmCommand = &cli.Command{
	Name:      "rm",
	Usage:     "remove a service and its backends",
	ArgsUsage: "VIP:PORT[/PROTO]",
	Description: `rm removes the service and its backends; its traffic is no longer forwarded
(open connections break). To take a service out gently, drain its backends
first and wait for "tether backend ls" to show no connections.`,
	Action: func(c *cli.Context) error {
		a, done, err := args(c, 1, 1, "VIP:PORT[/PROTO]")
		if done || err != nil {
			return err
		}
		return vipRm(c.Context, client(c), c.App.Writer, a[0])
	},
}

// vipRm removes a service and says so.
func vipRm(ctx context.Context, cl *control.Client, w io.Writer, ref string) error {
	return report(w)(cl.RemoveService(ctx, ref))
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
