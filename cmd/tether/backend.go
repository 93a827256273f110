package main

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
)

var backendCommand = &cli.Command{
	Name:  "backend",
	Usage: "add, remove, drain and list the backends of a service",
	Description: `Backends are named ADDR or ADDR:PORT ([2001:db8::11]:8765 for IPv6); the port
defaults to the service's; with dsr forwarding it must equal it, nat and
fullnat map the service's port to it. The
service is named VIP:PORT (see tether vip --help).

Draining a backend takes it out of the Maglev ring: its established
connections keep flowing and its clients' next connections go elsewhere
(their affinity no longer holds them to it). Weight 0 does the same.
"tether backend ls VIP:PORT" shows the connections each backend still has,
so that you know when a drained backend is empty and can be removed.

Health checks (the service's health block in the configuration) take a
backend that fails them out of the ring too, and bring it back when it
passes them again; "tether backend ls" shows their verdict. A drained
backend stays drained whatever its health.

Changes are applied at once and written back to the daemon's configuration
file, which stays the source of truth (tether reload re-reads it).`,
	Subcommands: []*cli.Command{backendAddCommand, backendSetCommand, backendRmCommand, backendDrainCommand, backendUndrainCommand, backendLsCommand},
	Action:      groupAction("add, set, rm, drain, undrain or ls"),
}

var backendAddCommand = &cli.Command{
	Name:        "add",
	Usage:       "add an active backend to a service",
	ArgsUsage:   "VIP:PORT ADDR[:PORT]",
	Description: `Example: tether backend add 203.0.113.10:8765 198.51.100.14 --weight 2`,
	Flags: []cli.Flag{
		&cli.IntFlag{Name: "weight", Value: 1, Usage: fmt.Sprintf("the backend's share of new clients, `N` in 0..%d (0 takes none)", config.MaxWeight)},
		outputFlag,
	},
	Action: listing(2, 2, "VIP:PORT ADDR[:PORT]", func(c *cli.Context, a []string, format string) error {
		spec := control.BackendSpec{Service: a[0], Backend: a[1]}
		if c.IsSet("weight") {
			w := c.Int("weight")
			spec.Weight = &w
		}
		return reportAs(c.App.Writer, format)(client(c).AddBackend(c.Context, spec))
	}),
}

var backendSetCommand = &cli.Command{
	Name:      "set",
	Usage:     "change a backend's weight in place",
	ArgsUsage: "VIP:PORT ADDR[:PORT]",
	Description: `set changes the backend's weight without removing it, as ipvsadm -e does:
its share of the Maglev ring, hence of new clients, follows the weight, and
its established connections stay. Weight 0 takes it out of the ring, as
draining does.

Example: tether backend set 203.0.113.10:8765 198.51.100.14 --weight 3`,
	Flags: []cli.Flag{
		&cli.IntFlag{Name: "weight", Usage: fmt.Sprintf("the backend's new share of new clients, `N` in 0..%d (required)", config.MaxWeight)},
		outputFlag,
	},
	Action: func(c *cli.Context) error {
		a, done, err := args(c, 2, 2, "VIP:PORT ADDR[:PORT]")
		if done || err != nil {
			return err
		}
		if !c.IsSet("weight") {
			return usagef("backend set needs --weight N")
		}
		format, err := outputFormat(c)
		if err != nil {
			return err
		}
		w := c.Int("weight")
		return reportAs(c.App.Writer, format)(client(c).SetBackendWeight(c.Context, control.BackendWeightSpec{Service: a[0], Backend: a[1], Weight: &w}))
	},
}

var backendRmCommand = &cli.Command{
	Name:      "rm",
	Usage:     "remove a backend from a service",
	ArgsUsage: "VIP:PORT ADDR[:PORT]",
	Description: `rm removes the backend at once: its open connections choose a backend again
on their next packet, which breaks them. Drain it first and wait until
"tether backend ls" shows no connections left.`,
	Flags: []cli.Flag{outputFlag},
	Action: listing(2, 2, "VIP:PORT ADDR[:PORT]", func(c *cli.Context, a []string, format string) error {
		return reportAs(c.App.Writer, format)(client(c).RemoveBackend(c.Context, a[0], a[1]))
	}),
}

var backendDrainCommand = &cli.Command{
	Name:      "drain",
	Usage:     "stop sending new connections to a backend; its open ones stay, or close by a deadline",
	ArgsUsage: "VIP:PORT ADDR[:PORT]",
	Description: `New connections stop going to the backend at once; its established ones keep
flowing. With --deadline, those still open at the deadline are closed, --rate
of them a second (a paced drain), so that their clients reconnect to the other
backends a few at a time instead of all at once. With the XDP datapath a
closed TCP connection is answered with a reset on its next packet from the
client (the balancer sees only that direction) and a UDP flow chooses another
backend; the splice datapath resets both of its sockets at once. The backend
learns of a connection reset on the XDP datapath when it next sends on it (the
client answers with a reset) or when it stops.

The deadline is kept in the configuration file (close_at, close_rate) and
survives restarts of the daemon. Draining again with another --deadline moves
it; undrain cancels it. "tether backend ls" counts down to it and shows how
many connections are left and closed.

Examples:
  tether backend drain 203.0.113.10:443 198.51.100.12
  tether backend drain 203.0.113.10:443 198.51.100.12 --deadline 30m --rate 50/s`,
	Flags: []cli.Flag{
		&cli.DurationFlag{Name: "deadline", Usage: "close the connections still open this long from now (30m, 2h; 0s: now)"},
		&cli.StringFlag{Name: "rate", Usage: "with --deadline: close at most `N/s` connections a second", DefaultText: fmt.Sprintf("%d/s", config.DefaultCloseRate)},
		outputFlag,
	},
	Action: listing(2, 2, "VIP:PORT ADDR[:PORT]", func(c *cli.Context, a []string, format string) error {
		spec := control.BackendStateSpec{Service: a[0], Backend: a[1], State: config.StateDraining}
		if c.IsSet("rate") {
			r, err := parseRate(c.String("rate"))
			if err != nil {
				return err
			}
			spec.CloseRate = r
		}
		if c.IsSet("deadline") {
			d := c.Duration("deadline")
			if d < 0 {
				return fmt.Errorf("--deadline %s is in the past: give a duration from now, such as 30m or 0s", d)
			}
			spec.CloseIn = d.String()
		} else if c.IsSet("rate") {
			return fmt.Errorf("--rate paces the closes of --deadline: give both, such as --deadline 30m --rate %s", c.String("rate"))
		}
		return reportAs(c.App.Writer, format)(client(c).SetBackendState(c.Context, spec))
	}),
}

// parseRate reads a rate of closes such as "50/s" or "50".
func parseRate(s string) (int, error) {
	n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(s), "/s"))
	if err != nil || n < 1 || n > config.MaxCloseRate {
		return 0, fmt.Errorf("--rate %q: want connections a second from 1 to %d, such as 50/s", s, config.MaxCloseRate)
	}
	return n, nil
}

var backendUndrainCommand = &cli.Command{
	Name:      "undrain",
	Usage:     "make a drained backend active again",
	ArgsUsage: "VIP:PORT ADDR[:PORT]",
	Flags:     []cli.Flag{outputFlag},
	Action: listing(2, 2, "VIP:PORT ADDR[:PORT]", func(c *cli.Context, a []string, format string) error {
		return backendSetState(c.Context, client(c), c.App.Writer, format, a[0], a[1], config.StateActive)
	}),
}

// backendSetState drains or undrains a backend and says so.
func backendSetState(ctx context.Context, cl *control.Client, w io.Writer, format, service, backend, state string) error {
	return reportAs(w, format)(cl.SetBackendState(ctx, control.BackendStateSpec{Service: service, Backend: backend, State: state}))
}

var backendLsCommand = &cli.Command{
	Name:      "ls",
	Usage:     "list a service's backends: state, weight, active connections and health",
	ArgsUsage: "VIP:PORT[/PROTO]",
	Description: `STATE is what the datapath applies: active (in the ring), draining (drained
or weight 0: out of the ring, established connections keep flowing) or down
(the health check failed: out of the ring).

CONNECTIONS counts the backend's open connections in tether's table (not seen
closing with FIN or RST) that sent a packet within the service's idle_after
(default 2m); IDLE counts the open ones quieter than that. On a down backend,
LOST counts the connections whose clients went quiet or have since sent on a
connection to another backend; with source affinity, also an active backend's
connections quiet for 2s whose clients have since sent to another (it died and
came back): with direct server return tether sees only the client's packets,
so a connection that died with its backend never shows a FIN. A drained backend whose CONNECTIONS is 0 has no client left sending; its
IDLE ones are quiet (or gone without FIN). A drain with a deadline (tether backend
drain --deadline) is shown under the table: when it closes what is left, at
what rate, and how many it has closed.

HEALTH is the health check's verdict (up, down, or unchecked with health
type none), LAST PROBE the last probe's result ("ok", "connection refused",
"timeout", "status 503"...) and latency, TRANSITIONS the changes between up
and down since the backend's probing began.`,
	Flags: []cli.Flag{outputFlag},
	Action: listing(1, 1, "VIP:PORT[/PROTO]", func(c *cli.Context, a []string, format string) error {
		return backendLs(c.Context, client(c), c.App.Writer, a[0], format)
	}),
}

// backendLs lists the backends of one service as a table, or the service
// with its backends as JSON.
func backendLs(ctx context.Context, cl *control.Client, w io.Writer, service, format string) error {
	svcs, err := cl.Services(ctx, service)
	if err != nil {
		return err
	}
	if len(svcs) != 1 {
		return fmt.Errorf("the daemon returned %d services for %s", len(svcs), service)
	}
	s := svcs[0]
	if format == "json" {
		return printJSON(w, s)
	}
	fmt.Fprintf(w, "%s %s/%s: %s\n", s.Name, s.VIP, s.Protocol, serviceState(s))
	if len(s.Backends) == 0 {
		fmt.Fprintf(w, "no backends; add one with: tether backend add %s ADDR\n", s.VIP)
		return nil
	}
	return backendTable(w, "", s.Backends)
}
