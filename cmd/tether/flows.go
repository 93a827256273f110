package main

import (
	"context"
	"fmt"
	"io"

	"github.com/urfave/cli/v2"

	"github.com/tetherlb/tether/control"
)

var flowsCommand = &cli.Command{
	Name:      "flows",
	Usage:     "list the connections in tether's connection table",
	ArgsUsage: "[VIP:PORT[/PROTO]]",
	Description: `flows lists every connection the XDP program tracks (client, service and the
backend it is pinned to), or only those of one service. The table is read
while packets change it, so the list is a snapshot at best. STATE is
"closing" once a FIN or RST was seen.`,
	Flags: []cli.Flag{outputFlag},
	Action: listing(0, 1, "[VIP:PORT[/PROTO]]", func(c *cli.Context, a []string, format string) error {
		ref := ""
		if len(a) == 1 {
			ref = a[0]
		}
		return flows(c.Context, client(c), c.App.Writer, ref, format)
	}),
}

// flows lists the connection table as a table or as JSON.
func flows(ctx context.Context, cl *control.Client, w io.Writer, ref, format string) error {
	fl, err := cl.Flows(ctx, ref)
	if err != nil {
		return err
	}
	if format == "json" {
		return printJSON(w, fl)
	}
	if len(fl) == 0 {
		fmt.Fprintln(w, "no flows")
		return nil
	}
	t := newTable(w, "CLIENT", "VIP", "PROTO", "SERVICE", "BACKEND", "STATE", "IDLE")
	closing := 0
	for _, f := range fl {
		state, svc, be := "open", f.Service, f.Backend
		if f.Closing {
			state = "closing"
			closing++
		}
		if be == "" {
			svc, be = "-", "(removed)"
		}
		t.row(f.Client, f.VIP, f.Protocol, svc, be, state, f.Idle)
	}
	if err := t.flush(); err != nil {
		return err
	}
	fmt.Fprintf(w, "%d flows, %d closing\n", len(fl), closing)
	return nil
}
