package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/tetherlb/tether/control"
)

var statsCommand = &cli.Command{
	Name:  "stats",
	Usage: "show packets, bytes and new connections per service and backend",
	Description: `stats shows the XDP program's counters: per service and backend the packets
and bytes forwarded and the new connections, per backend its health
transitions (changes between up and down), and the packets not forwarded
by reason (pass_*: handed to the kernel, drop_*: dropped, reset_*: answered
with a TCP reset).

With --watch it redraws every --interval until Ctrl-C: on a terminal, the
live view of "tether top" (per backend its state, health, connections,
share, packets/s and bytes/s; per service new connections/s and affinity
hits and misses; packets not forwarded by reason; the datapath mode),
otherwise the tables above with rates. With -o json --watch it prints one
JSON object per line and interval.`,
	Flags: []cli.Flag{
		outputFlag,
		&cli.BoolFlag{Name: "watch", Aliases: []string{"w"}, Usage: "redraw periodically until interrupted"},
		&cli.DurationFlag{Name: "interval", Value: time.Second, Usage: "with --watch, the `DURATION` between redraws"},
	},
	Action: listing(0, 0, "", func(c *cli.Context, _ []string, format string) error {
		if !c.Bool("watch") {
			if c.IsSet("interval") {
				return usagef("stats: --interval goes with --watch")
			}
			return stats(c.Context, client(c), c.App.Writer, format)
		}
		if c.Duration("interval") < 100*time.Millisecond {
			return usagef("stats: --interval %s is shorter than 100ms", c.Duration("interval"))
		}
		ctx, stop := signal.NotifyContext(c.Context, syscall.SIGINT, syscall.SIGTERM)
		defer stop()
		if tty, _ := terminal(c.App.Writer); tty && format == "text" {
			return viewWatch(ctx, client(c), c.App.Writer, c.Duration("interval"))
		}
		return statsWatch(ctx, client(c), c.App.Writer, format, c.Duration("interval"))
	}),
}

var topCommand = &cli.Command{
	Name:  "top",
	Usage: "live view of backends and services, refreshed every second",
	Description: `top shows the live view of "tether stats --watch" on a terminal, whatever
its output: the datapath mode; per service its state, new connections,
affinity hits and misses (totals and per second); per backend its state,
health, active connections, share of the service's active connections (as
a percentage and a bar), packets and bytes (totals and per second); and the
packets not forwarded, by reason. It redraws every --interval until Ctrl-C,
clearing the screen when the output is a terminal.`,
	Flags: []cli.Flag{
		&cli.DurationFlag{Name: "interval", Value: time.Second, Usage: "the `DURATION` between redraws"},
	},
	Action: func(c *cli.Context) error {
		if _, done, err := args(c, 0, 0, ""); done || err != nil {
			return err
		}
		if c.Duration("interval") < 100*time.Millisecond {
			return usagef("top: --interval %s is shorter than 100ms", c.Duration("interval"))
		}
		ctx, stop := signal.NotifyContext(c.Context, syscall.SIGINT, syscall.SIGTERM)
		defer stop()
		return viewWatch(ctx, client(c), c.App.Writer, c.Duration("interval"))
	},
}

// stats prints the counters once.
func stats(ctx context.Context, cl *control.Client, w io.Writer, format string) error {
	s, err := cl.Stats(ctx)
	if err != nil {
		return err
	}
	if format == "json" {
		return printJSON(w, s)
	}
	return printStats(w, s, nil, 0)
}

// statsWatch prints the counters every interval until ctx ends.
func statsWatch(ctx context.Context, cl *control.Client, w io.Writer, format string, interval time.Duration) error {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	var prev *control.Stats
	var prevAt time.Time
	for {
		s, err := cl.Stats(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		now := time.Now()
		if format == "json" {
			line := struct {
				Time time.Time `json:"time"`
				control.Stats
			}{now, s}
			if err := json.NewEncoder(w).Encode(line); err != nil {
				return err
			}
		} else {
			// Not a terminal (which gets the live view): no escape codes,
			// one block of tables per interval.
			fmt.Fprintf(w, "tether stats every %s, %s (Ctrl-C to stop)\n\n", interval, now.Format(time.TimeOnly))
			if err := printStats(w, s, prev, now.Sub(prevAt)); err != nil {
				return err
			}
		}
		prev, prevAt = &s, now
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

// printStats writes the counters as tables; with prev, also the rates
// since prev, taken dt earlier.
func printStats(w io.Writer, s control.Stats, prev *control.Stats, dt time.Duration) error {
	type rate struct{ packets, bytes uint64 }
	before := map[string]rate{}
	if prev != nil {
		for _, ps := range prev.Services {
			before[ps.VIP+"/"+ps.Protocol] = rate{ps.Packets, ps.Bytes}
			for _, pb := range ps.Backends {
				before[ps.VIP+"/"+ps.Protocol+" "+pb.Address] = rate{pb.Packets, pb.Bytes}
			}
		}
	}
	perSecond := func(key string, packets, bytes uint64) []string {
		if prev == nil {
			return nil
		}
		b, ok := before[key]
		if !ok || dt <= 0 || packets < b.packets || bytes < b.bytes {
			return []string{"-", "-"}
		}
		sec := dt.Seconds()
		return []string{fmt.Sprintf("%.0f", float64(packets-b.packets)/sec), bytesIEC(uint64(float64(bytes-b.bytes)/sec)) + "/s"}
	}

	if len(s.Services) == 0 {
		fmt.Fprintln(w, "no services")
	} else {
		header := []string{"SERVICE", "BACKEND", "NEW CONNS", "PACKETS", "BYTES", "TRANSITIONS"}
		if prev != nil {
			header = append(header, "PACKETS/S", "BYTES/S")
		}
		t := newTable(w, header...)
		for _, sv := range s.Services {
			key := sv.VIP + "/" + sv.Protocol
			row := []string{sv.Name, key, count(sv.NewConns), count(sv.Packets), bytesIEC(sv.Bytes), ""}
			t.row(append(row, perSecond(key, sv.Packets, sv.Bytes)...)...)
			for _, b := range sv.Backends {
				row := []string{"", "  " + b.Address, count(b.NewConns), count(b.Packets), bytesIEC(b.Bytes), count(b.HealthTransitions)}
				t.row(append(row, perSecond(key+" "+b.Address, b.Packets, b.Bytes)...)...)
			}
		}
		if err := t.flush(); err != nil {
			return err
		}
	}

	reasons := withPackets(s.Reasons)
	fmt.Fprintln(w)
	if s.Unrecorded > 0 {
		fmt.Fprintf(w, "%s packets of new flows forwarded unrecorded (a CPU had recorded tables.insert_rate new flows that second)\n", count(s.Unrecorded))
	}
	if len(reasons) == 0 {
		fmt.Fprintln(w, "no packet passed to the kernel or dropped")
		return nil
	}
	t := newTable(w, "NOT FORWARDED", "PACKETS")
	for _, r := range reasons {
		t.row(r, count(s.Reasons[r]))
	}
	return t.flush()
}

// withPackets returns the reasons that counted packets, passes first,
// then drops, then resets, each by name.
func withPackets(counts map[string]uint64) (reasons []string) {
	for r, n := range counts {
		if n > 0 {
			reasons = append(reasons, r)
		}
	}
	slices.SortFunc(reasons, func(a, b string) int { return strings.Compare(reasonOrder(a), reasonOrder(b)) })
	return reasons
}

func reasonOrder(r string) string {
	switch {
	case strings.HasPrefix(r, "pass_"):
		return "0" + r
	case strings.HasPrefix(r, "drop_"):
		return "1" + r
	}
	return "2" + r
}
