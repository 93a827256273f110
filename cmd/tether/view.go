package main

import (
	"context"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/control"
)

// viewSnapshot is the daemon's status and counters taken at one time: the
// live view of "tether top", "tether stats --watch" and "tether lab" is
// drawn from two of them.
type viewSnapshot struct {
	At     time.Time      `json:"at"`
	Status control.Status `json:"status"`
	Stats  control.Stats  `json:"stats"`
}

// takeSnapshot reads the daemon's status and counters.
func takeSnapshot(ctx context.Context, cl *control.Client) (viewSnapshot, error) {
	st, err := cl.Status(ctx)
	if err != nil {
		return viewSnapshot{}, err
	}
	s, err := cl.Stats(ctx)
	if err != nil {
		return viewSnapshot{}, err
	}
	return viewSnapshot{At: time.Now(), Status: st, Stats: s}, nil
}

// clearScreen moves the cursor home and clears the terminal.
const clearScreen = "\033[H\033[2J"

// Bar widths of the live view, in characters.
const (
	viewBarWidth       = 20
	viewBarWidthNarrow = 10 // below 80 columns
)

// renderView draws the live view of cur as plain text (no escape
// sequences): the datapath modes; per service its state, new connections,
// affinity hits and misses; per backend its state, health, active
// connections, share of the service's active connections as a bar,
// packets and bytes; and the packets not forwarded, by reason. Rates are
// the differences from prev divided by elapsed; with no prev (zero
// value), an elapsed of 0 or less, or a counter that went back, only
// totals are shown.
func renderView(prev, cur viewSnapshot, elapsed time.Duration, width int) string {
	barWidth := viewBarWidth
	if width > 0 && width < 80 {
		barWidth = viewBarWidthNarrow
	}
	sec := elapsed.Seconds()
	rates := sec > 0
	var b strings.Builder

	var modes []string
	for _, k := range slices.Sorted(maps.Keys(cur.Status.Interfaces)) {
		modes = append(modes, k+": "+cur.Status.Interfaces[k])
	}
	fmt.Fprintf(&b, "datapath %s (%s)", orDash(cur.Status.Datapath), strings.Join(modes, ", "))
	if rates {
		fmt.Fprintf(&b, ", rates over %s", elapsed.Round(time.Millisecond))
	}
	b.WriteString("\n")

	// Counters by service key and backend address.
	type key struct{ svc, backend string }
	byKey := func(ss []control.ServiceStats) (map[string]control.ServiceStats, map[key]control.BackendStats) {
		svcs, bes := map[string]control.ServiceStats{}, map[key]control.BackendStats{}
		for _, s := range ss {
			k := s.VIP + "/" + s.Protocol
			svcs[k] = s
			for _, be := range s.Backends {
				bes[key{k, be.Address}] = be
			}
		}
		return svcs, bes
	}
	prevSvc, prevBe := byKey(prev.Stats.Services)
	curSvc, curBe := byKey(cur.Stats.Services)
	// rate formats (now-before)/elapsed, or "" when there is none.
	rate := func(now, before uint64, had bool) string {
		if !rates || !had || now < before {
			return ""
		}
		return perSec(float64(now-before) / sec)
	}

	if len(cur.Status.Services) == 0 {
		b.WriteString("\nno services\n")
	}
	for _, sv := range cur.Status.Services {
		k := sv.VIP + "/" + sv.Protocol
		cs, ps := curSvc[k], prevSvc[k]
		_, had := prevSvc[k]
		fmt.Fprintf(&b, "\n%s %s: %s, %s affinity, %s forwarding\n", sv.Name, k, sv.State, sv.Affinity, sv.Forwarding)
		total := func(label string, now, before uint64) string {
			s := label + " " + count(now)
			if r := rate(now, before, had); r != "" {
				s += " (" + r + "/s)"
			}
			return s
		}
		fmt.Fprintf(&b, "  %s, %s, %s\n",
			total("new conns", cs.NewConns, ps.NewConns),
			total("affinity hits", cs.AffinityHits, ps.AffinityHits),
			total("misses", cs.AffinityMisses, ps.AffinityMisses))
		if len(sv.Backends) == 0 {
			b.WriteString("  no backends\n")
			continue
		}
		active := 0
		for _, be := range sv.Backends {
			active += be.ActiveConnections
		}
		t := newTable(&b, "  BACKEND", "STATE", "HEALTH", "CONNS", "SHARE", "", "PACKETS", "BYTES", "PACKETS/S", "BYTES/S")
		for _, be := range sv.Backends {
			c := curBe[key{k, be.Address}]
			p, hadBe := prevBe[key{k, be.Address}]
			share := 0.0
			if active > 0 {
				share = float64(be.ActiveConnections) / float64(active)
			}
			pps, bps := rate(c.Packets, p.Packets, hadBe), rate(c.Bytes, p.Bytes, hadBe)
			if pps == "" || bps == "" {
				pps, bps = "-", "-"
			} else {
				bps = bytesIEC(uint64(float64(c.Bytes-p.Bytes)/sec)) + "/s"
			}
			t.row("  "+be.Address, be.State, be.Health.State, fmt.Sprint(be.ActiveConnections),
				fmt.Sprintf("%.0f%%", 100*share), shareBar(share, barWidth),
				count(c.Packets), bytesIEC(c.Bytes), pps, bps)
		}
		t.flush()
	}

	reasons := withPackets(cur.Stats.Reasons)
	b.WriteString("\n")
	if u := cur.Stats.Unrecorded; u > 0 {
		fmt.Fprintf(&b, "%s packets of new flows forwarded unrecorded (tables.insert_rate reached)\n", count(u))
	}
	if len(reasons) == 0 {
		b.WriteString("no packet passed to the kernel, dropped or reset\n")
		return b.String()
	}
	hadReasons := prev.Stats.Reasons != nil
	t := newTable(&b, "NOT FORWARDED", "PACKETS", "PACKETS/S")
	for _, r := range reasons {
		before, ok := prev.Stats.Reasons[r]
		if !ok && hadReasons {
			ok = true // absent before: 0
		}
		rt := rate(cur.Stats.Reasons[r], before, ok)
		if rt == "" {
			rt = "-"
		}
		t.row(r, count(cur.Stats.Reasons[r]), rt)
	}
	t.flush()
	return b.String()
}

// shareBar draws share (0 to 1) as width characters: full blocks for the
// share, light shade for the rest.
func shareBar(share float64, width int) string {
	n := int(share*float64(width) + 0.5)
	n = max(0, min(n, width))
	return strings.Repeat("█", n) + strings.Repeat("░", width-n)
}

// perSec formats a rate: whole numbers from 100 up, else one decimal.
func perSec(r float64) string {
	if r >= 100 {
		return count(uint64(r + 0.5))
	}
	return fmt.Sprintf("%.1f", r)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// terminal reports whether w is a terminal, and its width in columns (80
// when unknown).
func terminal(w io.Writer) (bool, int) {
	f, ok := w.(*os.File)
	if !ok {
		return false, 80
	}
	if _, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS); err != nil {
		return false, 80
	}
	ws, err := unix.IoctlGetWinsize(int(f.Fd()), unix.TIOCGWINSZ)
	if err != nil || ws.Col == 0 {
		return true, 80
	}
	return true, int(ws.Col)
}

// viewWatch draws the live view every interval until ctx ends, clearing
// the screen first when w is a terminal.
func viewWatch(ctx context.Context, cl *control.Client, w io.Writer, interval time.Duration) error {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	var prev viewSnapshot
	for {
		cur, err := takeSnapshot(ctx, cl)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		tty, width := terminal(w)
		var elapsed time.Duration
		if !prev.At.IsZero() {
			elapsed = cur.At.Sub(prev.At)
		}
		var b strings.Builder
		if tty {
			b.WriteString(clearScreen)
		}
		fmt.Fprintf(&b, "tether top every %s, %s (Ctrl-C to stop)\n", interval, cur.At.Format(time.TimeOnly))
		b.WriteString(renderView(prev, cur, elapsed, width))
		if !tty {
			b.WriteString("\n")
		}
		if _, err := io.WriteString(w, b.String()); err != nil {
			return err
		}
		prev = cur
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}
