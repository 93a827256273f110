package main

import (
	"io"

	"github.com/urfave/cli/v2"
)

// manCommand prints tether's man page, made from the commands' own help,
// for the package to install (make deb).
var manCommand = &cli.Command{
	Name:   "man",
	Usage:  "print the man page (roff), made from the commands' help",
	Hidden: true,
	Action: func(c *cli.Context) error {
		if c.NArg() > 0 {
			return usagef("man takes no arguments")
		}
		page, err := c.App.ToMan()
		if err != nil {
			return err
		}
		_, err = io.WriteString(c.App.Writer, page)
		return err
	},
}
