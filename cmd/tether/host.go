package main

import (
	"github.com/urfave/cli/v2"
)

var hostCommand = &cli.Command{
	Name:  "host",
	Usage: "take this balancer host out of the BGP announcements, or put it back",
	Description: `With a bgp block in the configuration, tether announces each VIP this
host can serve to its BGP peers, and the routers spread the VIPs' flows over
every host that announces them.

drain withdraws every VIP: the routers send new flows to the other hosts,
while this host goes on forwarding whatever still reaches it (established
connections whose routers have not moved them). undrain announces again, at
once, the VIPs this host can serve. tether status shows the sessions, what
is announced and why. A drained host stays drained until undrain, also
across restarts of the daemon (the drain is recorded beside the API socket,
in SOCKET.drained), but not across a reboot.`,
	Subcommands: []*cli.Command{
		{
			Name:   "drain",
			Usage:  "withdraw every VIP from the BGP peers; keep forwarding what arrives",
			Flags:  []cli.Flag{outputFlag},
			Action: hostDrain(true),
		},
		{
			Name:   "undrain",
			Usage:  "announce again the VIPs this host can serve",
			Flags:  []cli.Flag{outputFlag},
			Action: hostDrain(false),
		},
	},
}

// hostDrain is the action of host drain (drained) and host undrain.
func hostDrain(drained bool) cli.ActionFunc {
	return func(c *cli.Context) error {
		if _, done, err := args(c, 0, 0, ""); done || err != nil {
			return err
		}
		format, err := outputFormat(c)
		if err != nil {
			return err
		}
		return reportAs(c.App.Writer, format)(client(c).SetDrained(c.Context, drained))
	}
}
