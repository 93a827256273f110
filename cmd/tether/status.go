package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/tetherlb/tether/control"
)

var statusCommand = &cli.Command{
	Name:  "status",
	Usage: "show the datapath and every service with its backends",
	Description: `status shows the configuration file the daemon serves, the XDP mode in force
on each interface, and every service with its backends: state, weight and
active connections (flows in the connection table not seen closing).`,
	Flags: []cli.Flag{outputFlag},
	Action: func(c *cli.Context) error {
		if _, done, err := args(c, 0, 0, ""); done || err != nil {
			return err
		}
		format, err := outputFormat(c)
		if err != nil {
			return err
		}
		return status(c.Context, client(c), c.App.Writer, format)
	},
}

// status prints the daemon's status as text or JSON.
func status(ctx context.Context, cl *control.Client, w io.Writer, format string) error {
	st, err := cl.Status(ctx)
	if err != nil {
		return err
	}
	if format == "json" {
		return printJSON(w, st)
	}
	var modes []string
	for name, mode := range st.Interfaces {
		modes = append(modes, name+": "+mode)
	}
	slices.Sort(modes)
	t := newTable(w)
	t.row("config:", st.Config)
	t.row("datapath:", fmt.Sprintf("%s (%s)", st.Datapath, strings.Join(modes, ", ")))
	t.row("services:", fmt.Sprint(len(st.Services)))
	if err := t.flush(); err != nil {
		return err
	}
	for _, s := range st.Services {
		fmt.Fprintf(w, "\n%s %s/%s, %s affinity", s.Name, s.VIP, s.Protocol, s.Affinity)
		if s.Affinity == "source" {
			fmt.Fprintf(w, " for %s", s.AffinityTimeout)
		}
		fmt.Fprintf(w, ", %s forwarding\n", s.Forwarding)
		if len(s.Backends) == 0 {
			fmt.Fprintln(w, "  no backends: its traffic is dropped")
			continue
		}
		t := newTable(w, "  BACKEND", "STATE", "WEIGHT", "CONNECTIONS")
		for _, b := range s.Backends {
			t.row("  "+b.Address, b.State, fmt.Sprint(b.Weight), fmt.Sprint(b.ActiveConnections))
		}
		if err := t.flush(); err != nil {
			return err
		}
	}
	return nil
}
