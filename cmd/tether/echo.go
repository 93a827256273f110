package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/tetherlb/tether/internal/lab"
)

var echoCommand = &cli.Command{
	Name:   "echo",
	Usage:  "serve a WebSocket echo backend (for tests and labs)",
	Hidden: true, // a tool of the test suite and the lab, not of operators
	Description: `echo serves the lab's WebSocket echo backend on every --listen address until
SIGTERM or SIGINT: every HTTP request is upgraded to a WebSocket (a plain GET
gets 200 and the name), each text message m is answered with "NAME m", and
every response carries the header X-Tether-Backend: NAME. It prints one line
"ready" once it listens on every address.

It is a real backend process that end-to-end tests and "tether lab" start
in a backend's namespace and can kill, to see tether's health checks at
work. It is not listed in tether --help.

Example: tether echo --name be1 --listen 203.0.113.10:8765 --listen 198.51.100.11:8765`,
	Flags: []cli.Flag{
		&cli.StringSliceFlag{Name: "listen", Usage: "serve on `ADDR:PORT` (an IP literal; repeat for several)"},
		&cli.StringFlag{Name: "name", Usage: "the `NAME` the backend answers with (required)"},
	},
	Action: func(c *cli.Context) error {
		if _, done, err := args(c, 0, 0, ""); done || err != nil {
			return err
		}
		ctx, stop := signal.NotifyContext(c.Context, syscall.SIGINT, syscall.SIGTERM)
		defer stop()
		return echo(ctx, c.App.Writer, c.String("name"), c.StringSlice("listen"))
	},
}

// echo serves the echo backend called name on every address in listen
// until ctx ends.
func echo(ctx context.Context, w io.Writer, name string, listen []string) error {
	if name == "" {
		return usagef("echo needs --name NAME")
	}
	if len(listen) == 0 {
		return usagef("echo needs at least one --listen ADDR:PORT")
	}
	var servers []*lab.EchoServer
	defer func() {
		for _, s := range servers {
			s.Close()
		}
	}()
	for _, a := range listen {
		ap, err := netip.ParseAddrPort(a)
		if err != nil {
			return usagef("echo: --listen %q is not ADDR:PORT with an IP literal", a)
		}
		ln, err := net.Listen("tcp", ap.String())
		if err != nil {
			return fmt.Errorf("echo: %w", err)
		}
		servers = append(servers, lab.ServeEcho(ln, name))
	}
	fmt.Fprintln(w, "ready")
	<-ctx.Done()
	var errs []error
	for _, s := range servers {
		errs = append(errs, s.Close())
	}
	servers = nil
	return errors.Join(errs...)
}
