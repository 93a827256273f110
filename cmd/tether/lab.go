package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/internal/lab/scenario"
)

var labCommand = &cli.Command{
	Name:  "lab",
	Usage: "watch tether do its job on a throwaway lab of network namespaces (root)",
	Description: `lab builds a lab of network namespaces on this machine (a client, a
balancer, backends, joined by a bridge; documentation addresses only, the
machine's own interfaces untouched), starts a WebSocket echo backend on each
backend, "tether run" on the balancer (source affinity, health checks every
500ms) and WebSocket clients that echo every 200ms and reconnect when their
connection breaks. It then plays scenarios, each for --duration:

  steady    nothing happens: no connection is lost, no client moves
  kill      backend 2's process is killed, then started again: its clients
            (about 1/N) reconnect elsewhere, the others stay
  drain     backend 1 is drained through the API, then undrained: no
            connection is lost, new clients go elsewhere
  scaleout  a backend is added: existing connections stay, about 1/(N+1)
            of new clients' choices move to it
  hostkill  with --hosts 2 or more: balancer host 1 dies as a machine does
            (link down, daemon SIGKILL, XDP detached); the router withdraws
            it within the BGP hold time (3s) and its flows reach the other
            hosts on the backends they had; half-way it comes back

With --hosts N (2 to 4) the lab has N balancer hosts behind a router
namespace running BIRD 2 (install bird2), each host's daemon announcing
the VIP by BGP, the router spreading the clients' flows over them by a
layer-4 hash (ECMP). The default order is then steady, hostkill, kill,
drain, scaleout: a host dies while the backends are those the
connections began with (after a backend change, hosts do not share
connection state yet, and some flows of a dead host would change
backend). The view and the plain lines show what each host carries:
whether it announces the VIP and the packets per second it forwards.

On a terminal it shows the live view of "tether top", redrawn every second
from the daemon's API (per backend its state, health, active connections,
share as a bar, packets/s and bytes/s; per service new connections/s and
affinity hits and misses; packets not forwarded by reason; the datapath
mode), with the lab's lines below it. Without a terminal, or with --no-tty,
it prints every second one plain line per scenario with each backend's
state, active connections from the daemon's status and share. After each
scenario it prints one line with the connections lost, the clients that
changed backend, and what theory expects.

Everything is removed at the end, or on Ctrl-C; --keep leaves the lab up
until Ctrl-C and prints how to reach it. It needs root.`,
	Flags: []cli.Flag{
		&cli.IntFlag{Name: "backends", Value: lab.DefaultBackends, Usage: "backends at the start (scaleout adds one)"},
		&cli.IntFlag{Name: "hosts", Value: 1, Usage: "balancer hosts; 2 or more run behind a BIRD router that spreads flows over them (ECMP, BGP)"},
		&cli.IntFlag{Name: "clients", Value: 30, Usage: "WebSocket clients, each from an address of its own"},
		&cli.DurationFlag{Name: "duration", Value: 10 * time.Second, Usage: "how long each scenario runs"},
		&cli.StringFlag{Name: "datapath", Value: config.DatapathAuto, Usage: "the daemon's datapath: auto (XDP when possible, else splice), xdp, xdp-generic or splice"},
		&cli.StringFlag{Name: "scenario", Usage: "play only `NAMES`, comma-separated, in that order: steady, kill, drain, scaleout, and hostkill with --hosts 2 or more (default: all)"},
		&cli.BoolFlag{Name: "keep", Usage: "leave the lab up at the end, print how to reach it, and wait for Ctrl-C"},
		&cli.BoolFlag{Name: "no-tty", Usage: "plain periodic lines instead of the live view, even on a terminal"},
	},
	Action: func(c *cli.Context) error {
		if _, done, err := args(c, 0, 0, ""); done || err != nil {
			return err
		}
		o := scenario.Options{
			Backends: c.Int("backends"), Hosts: c.Int("hosts"), Clients: c.Int("clients"), Duration: c.Duration("duration"),
			Datapath: c.String("datapath"), Keep: c.Bool("keep"), Scenarios: scenario.Names,
		}
		if o.Hosts > 1 {
			o.Scenarios = scenario.HostNames
		}
		if tty, _ := terminal(c.App.Writer); tty && !c.Bool("no-tty") {
			o.View = liveView(c.App.Writer)
		}
		switch {
		case o.Backends < 2 || o.Backends > lab.MaxBackends-1:
			return usagef("lab: --backends must be 2 to %d, got %d", lab.MaxBackends-1, o.Backends)
		case o.Hosts < 1 || o.Hosts > scenario.MaxHosts:
			return usagef("lab: --hosts must be 1 to %d, got %d", scenario.MaxHosts, o.Hosts)
		case o.Clients < 1 || o.Clients > scenario.MaxClients:
			return usagef("lab: --clients must be 1 to %d, got %d", scenario.MaxClients, o.Clients)
		case o.Duration < time.Second:
			return usagef("lab: --duration must be at least 1s, got %v", o.Duration)
		}
		if err := config.CheckDatapath(o.Datapath); err != nil {
			return usagef("lab: --datapath: %v", err)
		}
		if list := c.String("scenario"); list != "" {
			var names []string
			for _, s := range strings.Split(list, ",") {
				s = strings.TrimSpace(s)
				switch {
				case slices.Contains(o.Scenarios, s):
					names = append(names, s)
				case slices.Contains(scenario.HostNames, s):
					return usagef("lab: --scenario %s needs --hosts 2 or more", s)
				default:
					return usagef("lab: --scenario %q is not one of %s", s, strings.Join(o.Scenarios, ", "))
				}
			}
			o.Scenarios = names
		}
		if os.Geteuid() != 0 {
			return errors.New("tether lab needs root: run sudo tether lab")
		}
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("lab: the tether binary to run in the lab: %w", err)
		}
		o.Exe = exe
		ctx, stop := signal.NotifyContext(c.Context, syscall.SIGINT, syscall.SIGTERM)
		defer stop()
		return scenario.Run(ctx, c.App.Writer, o)
	},
}

// liveView renders the view of "tether top" for the lab, from the daemon's
// API, as wide as the terminal w.
func liveView(w io.Writer) func(context.Context, *control.Client) (string, error) {
	var prev viewSnapshot
	return func(ctx context.Context, api *control.Client) (string, error) {
		cur, err := takeSnapshot(ctx, api)
		if err != nil {
			return "", err
		}
		var elapsed time.Duration
		if !prev.At.IsZero() {
			elapsed = cur.At.Sub(prev.At)
		}
		_, width := terminal(w)
		view := renderView(prev, cur, elapsed, width)
		prev = cur
		return view, nil
	}
}
