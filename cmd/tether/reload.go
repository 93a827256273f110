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
and the reason is printed, with the field named. It prints what it changed:
the services added, removed and changed, and in each the settings and
backends that changed.

--dry-run prints what a reload would change, and changes nothing; a
backend the datapath cannot reach shows only when the change is applied.`,
	Flags: []cli.Flag{
		&cli.BoolFlag{Name: "dry-run", Usage: "print what a reload would change, and change nothing"},
		outputFlag,
	},
	Action: func(c *cli.Context) error {
		if _, done, err := args(c, 0, 0, ""); done || err != nil {
			return err
		}
		format, err := outputFormat(c)
		if err != nil {
			return err
		}
		return reload(c.Context, client(c), c.App.Writer, c.Bool("dry-run"), format)
	},
}

// reload asks the daemon to reload its file, or what a reload would do,
// and says it.
func reload(ctx context.Context, cl *control.Client, w io.Writer, dry bool, format string) error {
	call := cl.Reload
	if dry {
		call = cl.ReloadPlan
	}
	return reportAs(w, format)(call(ctx))
}
