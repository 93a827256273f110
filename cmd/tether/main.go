// Command tether is an XDP load balancer that keeps long-lived connections
// (WebSockets, gRPC streams, MQTT) on one backend for their whole life and
// sends a returning client back to the backend it had.
//
// main wires the command groups; each lives in a file of its own.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/tetherlb/tether/control"
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

Start the balancer with "tether run --config /etc/tether/tether.yaml", then
look at it and change it with "tether status", "tether vip" and "tether
backend", which talk to the daemon over its unix socket (--socket).`,
		Flags: []cli.Flag{
			&cli.StringFlag{
				Name:    "socket",
				Value:   control.DefaultSocket,
				EnvVars: []string{"TETHER_SOCKET"},
				Usage:   "the daemon's API socket `PATH`",
			},
			&cli.DurationFlag{
				Name:  "timeout",
				Value: control.DefaultTimeout,
				Usage: "how long a request to the daemon may take, a `DURATION` (with top or --watch: each refresh)",
			},
		},
		Commands: []*cli.Command{
			runCommand, statusCommand, vipCommand, backendCommand, statsCommand, topCommand,
			flowsCommand, traceCommand, reloadCommand, hostCommand, detachCommand, backendSetupCommand, labCommand, completionCommand, versionCommand, echoCommand, manCommand,
		},
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
	setUsageError(app.Commands, app.OnUsageError)
	return app
}

// setUsageError makes every command and subcommand report a bad command
// line as a usage error (exit code 2). Commands without subcommands lose
// the "help" subcommand (their -h stays).
func setUsageError(cmds []*cli.Command, fn cli.OnUsageErrorFunc) {
	for _, c := range cmds {
		c.OnUsageError = fn
		if len(c.Subcommands) == 0 {
			c.HideHelpCommand = true // "tether vip rm help" is no help
		}
		setUsageError(c.Subcommands, fn)
	}
}

// args returns the positional arguments of c, between min and max of
// them, and applies the command's flags found among them: urfave/cli stops
// parsing flags at the first argument, while "tether backend add VIP ADDR
// --weight 3" is the natural order. A usage error names what is wrong;
// want is the arguments' synopsis, such as "VIP:PORT ADDR[:PORT]". It
// returns done when -h asked for the command's help, which it printed.
func args(c *cli.Context, min, max int, want string) (a []string, done bool, err error) {
	fs := flag.NewFlagSet(c.Command.Name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	for _, f := range c.Command.Flags {
		if err := f.Apply(fs); err != nil {
			return nil, false, err
		}
	}
	rest := c.Args().Slice()
	for len(rest) > 0 {
		if err := fs.Parse(rest); err != nil {
			return nil, false, usagef("%s: %v", cmdName(c), err)
		}
		rest = fs.Args()
		if len(rest) > 0 {
			a = append(a, rest[0])
			rest = rest[1:]
		}
	}
	var setErr error
	fs.Visit(func(fl *flag.Flag) {
		for _, f := range c.Command.Flags {
			if !slices.Contains(f.Names(), fl.Name) {
				continue
			}
			for _, name := range f.Names() {
				if err := c.Set(name, fl.Value.String()); err != nil && setErr == nil {
					setErr = usagef("%s: --%s: %v", cmdName(c), fl.Name, err)
				}
			}
		}
	})
	if setErr != nil {
		return nil, false, setErr
	}
	if c.Bool("help") {
		return nil, true, cli.ShowSubcommandHelp(c)
	}
	switch {
	case len(a) < min:
		return nil, false, usagef("%s needs %s; see tether %s --help", cmdName(c), want, cmdName(c))
	case len(a) > max:
		return nil, false, usagef("%s takes %s, got %d arguments %q; see tether %s --help", cmdName(c), synopsis(want), len(a), a, cmdName(c))
	}
	return a, false, nil
}

// cmdName is the command's name after "tether", such as "backend add".
func cmdName(c *cli.Context) string {
	if name, ok := strings.CutPrefix(c.Command.HelpName, c.App.Name+" "); ok {
		return name
	}
	return c.Command.Name
}

func synopsis(want string) string {
	if want == "" {
		return "no arguments"
	}
	return want
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
