package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/urfave/cli/v2"

	"github.com/tetherlb/tether/control"
)

// outputFlag is the -o flag of every listing command.
var outputFlag = &cli.StringFlag{
	Name:    "output",
	Aliases: []string{"o"},
	Value:   "text",
	Usage:   "output `FORMAT`: text (tables) or json",
}

// outputFormat returns the -o value, checked.
func outputFormat(c *cli.Context) (string, error) {
	switch f := c.String("output"); f {
	case "text", "json":
		return f, nil
	default:
		return "", usagef("-o: %q is not text or json", f)
	}
}

// listing is the action of a command that prints in the -o format: it
// checks the arguments (min to max, described by want) and the format,
// then calls fn with them.
func listing(min, max int, want string, fn func(c *cli.Context, a []string, format string) error) cli.ActionFunc {
	return func(c *cli.Context) error {
		a, done, err := args(c, min, max, want)
		if done || err != nil {
			return err
		}
		format, err := outputFormat(c)
		if err != nil {
			return err
		}
		return fn(c, a, format)
	}
}

// client returns a client of the daemon at the --socket path.
func client(c *cli.Context) *control.Client {
	return control.NewClientTimeout(c.String("socket"), c.Duration("timeout"))
}

// printJSON writes v as indented JSON.
func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// table writes aligned columns; rows are tab-separated.
type table struct{ tw *tabwriter.Writer }

func newTable(w io.Writer, header ...string) *table {
	t := &table{tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)}
	if len(header) > 0 {
		t.row(header...)
	}
	return t
}

func (t *table) row(cells ...string) { fmt.Fprintln(t.tw, strings.Join(cells, "\t")) }

func (t *table) flush() error { return t.tw.Flush() }

// backendSummary says how many backends of s are active, down and
// draining.
func backendSummary(s control.ServiceStatus) string {
	n := map[string]int{}
	for _, b := range s.Backends {
		n[b.State]++
	}
	out := fmt.Sprintf("%d active", n["active"])
	for _, state := range []string{"down", "draining"} {
		if n[state] > 0 {
			out += fmt.Sprintf(", %d %s", n[state], state)
		}
	}
	return out
}

// activeConns is the number of active connections of every backend of s.
func activeConns(s control.ServiceStatus) int {
	n := 0
	for _, b := range s.Backends {
		n += b.ActiveConnections
	}
	return n
}

// count formats a counter with thousands separators.
func count(n uint64) string {
	s := fmt.Sprint(n)
	var b strings.Builder
	for i, r := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(r)
	}
	return b.String()
}

// bytesIEC formats a byte count in binary units.
func bytesIEC(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// reportAs writes a change's outcome: its message, or with format json
// the whole result.
func reportAs(w io.Writer, format string) func(control.Result, error) error {
	return func(r control.Result, err error) error {
		if err != nil {
			return err
		}
		if format == "json" {
			return printJSON(w, r)
		}
		fmt.Fprintln(w, r.Message)
		return nil
	}
}
