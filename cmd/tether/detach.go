package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/tetherlb/tether/control"
)

var detachCommand = &cli.Command{
	Name:  "detach",
	Usage: "detach the XDP program and remove the pinned maps (drops tracked connections)",
	Description: `detach removes everything "tether run" attached or pinned in the pin
directory: it detaches the XDP program from every interface it was left
attached to and removes the pinned maps and links, whatever their layout
version, and the device and policy rules of health checks via the VIP
(tether-probe). Every tracked connection and affinity entry is forgotten,
and the interfaces pass every packet to the kernel until tether runs
again.

Stop the daemon first: detach refuses while a daemon uses the directory.
It is the way to change table sizes, or to go back to a tether whose map
layout differs, and to leave a host without tether.`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "pin-dir", Value: control.DefaultPinDir, Usage: "bpffs `DIR` that tether run pinned its state in"},
	},
	Action: func(c *cli.Context) error {
		if _, done, err := args(c, 0, 0, ""); done || err != nil {
			return err
		}
		return detach(c.App.Writer, c.String("pin-dir"))
	},
}

// detach removes the datapath pinned in dir and says what it removed.
func detach(w io.Writer, dir string) error {
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		fmt.Fprintf(w, "nothing pinned in %s\n", dir)
		return nil
	}
	gone, err := control.Detach(dir)
	for _, name := range gone {
		fmt.Fprintf(w, "detached the XDP program from %s\n", name)
	}
	if err != nil {
		return fmt.Errorf("detach: %w", err)
	}
	fmt.Fprintf(w, "removed %s\n", dir)
	return nil
}
