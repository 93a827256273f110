package main

import (
	"fmt"
	"runtime"

	"github.com/urfave/cli/v2"
)

var versionCommand = &cli.Command{
	Name:  "version",
	Usage: "print the version of tether and of the Go runtime that built it",
	Action: func(c *cli.Context) error {
		if c.NArg() > 0 {
			return usagef("version takes no arguments")
		}
		fmt.Fprintf(c.App.Writer, "tether %s (%s, %s/%s)\n", version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
		return nil
	},
}
