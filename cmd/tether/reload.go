package main

import (
	"context"
	"io"

	"github.com/urfave/cli/v2"

	"github.com/tetherlb/tether/control"
)

var reloadCommand = &cli.Command{
	Name:  "reload",
	Usage: "make the daemon re-read its configuration file and apply what changed",
	Description: `reload does what SIGHUP does: the daemon re-reads its configuration file and
applies what changed, touching only the services that changed. A file that
does not validate, or that changes interfaces, datapath, hash_seed or tables
(which take effect only at start), is refused whole: the running state stays
and the reason is printed, with the field named.`,
	Action: func(c *cli.Context) error {
		if _, done, err := args(c, 0, 0, ""); done || err != nil {
			return err
		}
		return reload(c.Context, client(c), c.App.Writer)
	},
}

// reload asks the daemon to reload its file and says what it did.
func reload(ctx context.Context, cl *control.Client, w io.Writer) error {
	return report(w)(cl.Reload(ctx))
}
