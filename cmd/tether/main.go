// Command tether is an XDP load balancer that keeps long-lived connections
// (WebSockets, gRPC streams, MQTT) on one backend for their whole life and
// sends a returning client back to the backend it had.
//
// main wires the command groups; each lives in a file of its own.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/urfave/cli/v2"
)

// Exit codes.
const (
	exitFailed = 1 // the command was refused or failed
	exitUsage  = 2 // the command line is wrong
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// usageError marks an error in how the command was called.
type usageError struct{ error }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

func newApp() *cli.App {
	app := &cli.App{
		Name:    "tether",
		Usage:   "connection-affinity load balancer for long-lived connections, in XDP",
		Version: version,
		Description: `tether forwards TCP and UDP services to backends from an XDP program,
keeping every connection on its backend for its whole life and, with source
affinity, every client on the same backend across reconnects. Backends are
chosen with a Maglev consistent hash, so a change of the backend set moves
only the clients it must.

Start the balancer with "tether run --config /etc/tether/tether.yaml".`,
		Commands:             []*cli.Command{runCommand, versionCommand},
		EnableBashCompletion: true,
		OnUsageError: func(_ *cli.Context, err error, _ bool) error {
			return usageError{err}
		},
		ExitErrHandler: func(*cli.Context, error) {}, // main prints and exits
		CommandNotFound: func(c *cli.Context, name string) {
			fmt.Fprintf(c.App.ErrWriter, "tether: no command %q; see tether --help\n", name)
			os.Exit(exitUsage)
		},
	}
	for _, c := range app.Commands {
		c.OnUsageError = app.OnUsageError
	}
	return app
}

func main() {
	err := newApp().Run(os.Args)
	if err == nil {
		return
	}
	fmt.Fprintf(os.Stderr, "tether: %v\n", err)
	var u usageError
	if errors.As(err, &u) {
		os.Exit(exitUsage)
	}
	os.Exit(exitFailed)
}
