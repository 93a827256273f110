package main

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/tetherlb/tether/control"
)

var statusCommand = &cli.Command{
	Name:  "status",
	Usage: "show the datapath and every service with its backends",
	Description: `status shows the configuration file the daemon serves, the datapath mode in
force on each interface (native or generic XDP, or splice when the proxy
serves: "*" with datapath splice), and every service with its health check and its backends:
state, weight, active connections (flows in the connection table not seen
closing), and what the health check found: up or down, the last probe's
result and latency, and how many times the backend changed state.

A service is "up" while a backend takes new connections and "down" when
none does (no backend, or all of them down, draining or of weight 0): new
TCP connections are then refused with a reset and UDP packets dropped,
until a backend comes back. A backend's STATE is what the datapath applies:
active (in the ring), draining (drained or weight 0, whatever its health)
or down (its health check failed); HEALTH is the check's own verdict.`,
	Flags: []cli.Flag{outputFlag},
	Action: listing(0, 0, "", func(c *cli.Context, _ []string, format string) error {
		return status(c.Context, client(c), c.App.Writer, format)
	}),
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
		fmt.Fprintf(w, "  %s; %s, on_down %s\n", serviceState(s), healthSummary(s.Health), s.OnDown)
		if len(s.Backends) == 0 {
			continue
		}
		if err := backendTable(w, "  ", s.Backends); err != nil {
			return err
		}
	}
	if st.BGP != nil {
		if err := bgpStatus(w, st.BGP); err != nil {
			return err
		}
	}
	if st.Sync != nil {
		syncStatus(w, st.Sync)
	}
	return nil
}

// syncStatus prints the sharing of entries with the other hosts.
func syncStatus(w io.Writer, s *control.SyncStatus) {
	state := "learning the peers' entries"
	if s.Ready {
		state = "ready"
	}
	fmt.Fprintf(w, "\nsync: on %s with %s, %s\n", s.Listen, strings.Join(s.Peers, ", "), state)
	if s.Error != "" {
		fmt.Fprintf(w, "  error: %s\n", s.Error)
	}
	fmt.Fprintf(w, "  sent %d entries in %d datagrams (%d bytes), %d send errors, %d dropped; received %d entries in %d datagrams\n",
		s.SentEntries, s.SentDatagrams, s.SentBytes, s.SendErrors, s.Dropped, s.ReceivedEntries, s.ReceivedDatagrams)
	fmt.Fprintf(w, "  learned %d, already known %d, of no service or backend here %d; sent %d answering requests; %d new flows not handed out\n",
		s.Learned, s.Known, s.Unknown, s.Dumped, s.Lost)
	var refused []string
	for _, k := range slices.Sorted(maps.Keys(s.Refused)) {
		refused = append(refused, fmt.Sprintf("%s %d", k, s.Refused[k]))
	}
	if len(refused) > 0 {
		fmt.Fprintf(w, "  refused datagrams: %s\n", strings.Join(refused, ", "))
	}
}

// bgpStatus prints the BGP speaker's sessions and announcements.
func bgpStatus(w io.Writer, b *control.BGPStatus) error {
	head := fmt.Sprintf("\nbgp: AS %d, router id %s", b.ASN, b.RouterID)
	if b.Drained {
		head += ", DRAINED: every VIP withdrawn (tether host undrain)"
	}
	fmt.Fprintln(w, head)
	if b.Error != "" {
		fmt.Fprintf(w, "  error: %s\n", b.Error)
	}
	t := newTable(w, "  PEER", "ASN", "STATE", "UP FOR", "ROUTES IN", "LAST ERROR")
	for _, p := range b.Peers {
		up := "-"
		if !p.Since.IsZero() {
			up = time.Since(p.Since).Round(time.Second).String()
		}
		t.row("  "+p.Address, fmt.Sprint(p.ASN), p.State, up, fmt.Sprintf("%d (%d accepted)", p.Received, p.Accepted), cmp.Or(p.LastError, "-"))
	}
	if err := t.flush(); err != nil {
		return err
	}
	t = newTable(w, "  VIP", "ANNOUNCED", "WHY")
	for _, v := range b.VIPs {
		yes := "no"
		if v.Announced {
			yes = "yes"
		}
		t.row("  "+v.VIP.String(), yes, v.Reason)
	}
	return t.flush()
}

// serviceState says whether s takes new connections, and what becomes of
// them when it does not.
func serviceState(s control.ServiceStatus) string {
	if s.State == control.ServiceUp {
		return "up"
	}
	why := "no usable backend"
	if len(s.Backends) == 0 {
		why = "no backends"
	}
	drop := "new connections are refused (TCP reset)"
	if s.Protocol == "udp" {
		drop = "its packets are dropped"
	}
	return fmt.Sprintf("DOWN: %s, %s", why, drop)
}

// healthSummary describes a service's health check, as it runs, in a few
// words.
func healthSummary(h control.HealthSpec) string {
	if h.Type == "none" {
		return "no health check (backends taken as up)"
	}
	var b strings.Builder
	b.WriteString(h.Type + " check")
	if h.Path != "" {
		b.WriteString(" of " + h.Path)
	}
	if len(h.ExpectStatus) == 2 {
		fmt.Fprintf(&b, " expecting %d-%d", h.ExpectStatus[0], h.ExpectStatus[1])
	}
	if h.Send != "" {
		fmt.Fprintf(&b, " echoing %q", h.Send)
	}
	if h.Via == "vip" {
		b.WriteString(" via the VIP (the clients' path)")
	}
	fmt.Fprintf(&b, " every %s (timeout %s, rise %d, fall %d)", h.Interval, h.Timeout, h.Rise, h.Fall)
	return b.String()
}

// backendTable writes backends as a table, each line starting with
// indent.
func backendTable(w io.Writer, indent string, backends []control.BackendStatus) error {
	t := newTable(w, indent+"BACKEND", "STATE", "WEIGHT", "CONNECTIONS", "IDLE", "LOST", "HEALTH", "LAST PROBE", "TRANSITIONS")
	for _, b := range backends {
		probe, transitions := "-", "-"
		if b.Health.LastResult != "" {
			probe = b.Health.LastResult + " in " + b.Health.LastLatency
		}
		if b.Health.State != control.HealthUnchecked {
			transitions = fmt.Sprint(b.Health.Transitions)
		}
		state := b.State
		if b.Unreachable != "" {
			state += " (unreachable)"
		}
		t.row(indent+b.Address, state, fmt.Sprint(b.Weight), fmt.Sprint(b.ActiveConnections), fmt.Sprint(b.IdleConnections),
			fmt.Sprint(b.LostConnections), b.Health.State, probe, transitions)
	}
	if err := t.flush(); err != nil {
		return err
	}
	for _, b := range backends {
		if dr := b.Drain; dr != nil {
			fmt.Fprintf(w, "%s%s\n", indent, drainLine(b.Address, b.ActiveConnections+b.IdleConnections+b.LostConnections, dr, time.Now()))
		}
	}
	return nil
}

// drainLine tells where a paced drain of backend addr stands at now.
func drainLine(addr string, left int, dr *control.DrainStatus, now time.Time) string {
	at := dr.CloseAt.Local().Format(time.DateTime)
	if now.Before(dr.CloseAt) {
		return fmt.Sprintf("%s: %d connections left; the rest close from %s (in %s), %d a second",
			addr, left, at, dr.CloseAt.Sub(now).Round(time.Second), dr.Rate)
	}
	if left == 0 {
		return fmt.Sprintf("%s: drained, no connections left (%d closed since %s)", addr, dr.Closed, at)
	}
	return fmt.Sprintf("%s: closing %d a second since %s: %d closed, %d left", addr, dr.Rate, at, dr.Closed, left)
}
