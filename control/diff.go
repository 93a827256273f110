package control

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/tetherlb/tether/config"
)

// Changes is what a reload or a change did to the services, or would do
// (tether reload --dry-run). Services are named "name (VIP:PORT/proto)",
// backends "ADDR:PORT".
type Changes struct {
	ServicesAdded   []string        `json:"services_added,omitempty"`
	ServicesRemoved []string        `json:"services_removed,omitempty"`
	ServicesChanged []ServiceChange `json:"services_changed,omitempty"`
}

// ServiceChange is what changed in one service that stays.
type ServiceChange struct {
	Service string `json:"service"`
	// Settings are the service's fields that changed, as the file names
	// them: "affinity_timeout", "health", "name"...
	Settings        []string `json:"settings,omitempty"`
	BackendsAdded   []string `json:"backends_added,omitempty"`
	BackendsRemoved []string `json:"backends_removed,omitempty"`
	// BackendsChanged are backends whose weight or state changed, with
	// what changed: "192.0.2.11:8765 weight 1→3".
	BackendsChanged []string `json:"backends_changed,omitempty"`
}

// Empty says whether nothing changed.
func (c *Changes) Empty() bool {
	return c == nil || len(c.ServicesAdded)+len(c.ServicesRemoved)+len(c.ServicesChanged) == 0
}

// String says what changed, in one line.
func (c *Changes) String() string {
	if c.Empty() {
		return "nothing changed"
	}
	var parts []string
	count := func(n int, what string, list []string) {
		if n == 0 {
			return
		}
		noun := what
		if n > 1 {
			noun += "s"
		}
		parts = append(parts, fmt.Sprintf("%d %s (%s)", n, noun, strings.Join(list, ", ")))
	}
	count(len(c.ServicesAdded), "service added", c.ServicesAdded)
	count(len(c.ServicesRemoved), "service removed", c.ServicesRemoved)
	for _, s := range c.ServicesChanged {
		var what []string
		if len(s.Settings) > 0 {
			what = append(what, strings.Join(s.Settings, ", ")+" changed")
		}
		for _, b := range []struct {
			verb string
			list []string
		}{{"added", s.BackendsAdded}, {"removed", s.BackendsRemoved}, {"changed", s.BackendsChanged}} {
			if len(b.list) > 0 {
				what = append(what, fmt.Sprintf("backends %s: %s", b.verb, strings.Join(b.list, ", ")))
			}
		}
		parts = append(parts, s.Service+": "+strings.Join(what, "; "))
	}
	return strings.Join(parts, "; ")
}

func serviceLabel(s config.Service) string { return s.Name + " (" + s.Key() + ")" }

// diff is what replacing the services cur by next changes. Services are
// matched by VIP, port and protocol, backends by address and port.
func diff(cur, next []config.Service) *Changes {
	c := &Changes{}
	old := map[string]config.Service{}
	for _, s := range cur {
		old[s.Key()] = s
	}
	seen := map[string]bool{}
	for _, n := range next {
		seen[n.Key()] = true
		o, ok := old[n.Key()]
		if !ok {
			c.ServicesAdded = append(c.ServicesAdded, serviceLabel(n))
			continue
		}
		if sc := serviceDiff(o, n); sc != nil {
			c.ServicesChanged = append(c.ServicesChanged, *sc)
		}
	}
	for _, o := range cur {
		if !seen[o.Key()] {
			c.ServicesRemoved = append(c.ServicesRemoved, serviceLabel(o))
		}
	}
	return c
}

// serviceDiff is what changed between two versions of a service, nil when
// nothing did.
func serviceDiff(o, n config.Service) *ServiceChange {
	sc := &ServiceChange{Service: serviceLabel(n)}
	for _, f := range []struct {
		name    string
		changed bool
	}{
		{"name", o.Name != n.Name},
		{"affinity", o.Affinity != n.Affinity},
		{"affinity_timeout", o.AffinityTimeout != n.AffinityTimeout},
		{"forwarding", o.Forwarding != n.Forwarding},
		{"snat_address", o.SNATAddress != n.SNATAddress},
		{"tunnel_source", o.TunnelSource != n.TunnelSource},
		{"gue_port", o.GUEPort != n.GUEPort},
		{"health", o.Health != n.Health},
		{"on_down", o.OnDown != n.OnDown},
		{"icmp_echo", o.ICMPEcho != n.ICMPEcho},
		{"idle_timeout", o.IdleTimeout != n.IdleTimeout},
		{"idle_after", o.IdleAfter != n.IdleAfter},
		{"proxy_protocol", o.ProxyProtocol != n.ProxyProtocol},
	} {
		if f.changed {
			sc.Settings = append(sc.Settings, f.name)
		}
	}
	ob := map[string]config.Backend{}
	for _, b := range o.Backends {
		ob[b.Key()] = b
	}
	nb := map[string]bool{}
	for _, b := range n.Backends {
		nb[b.Key()] = true
		p, ok := ob[b.Key()]
		if !ok {
			sc.BackendsAdded = append(sc.BackendsAdded, b.Key())
			continue
		}
		var what []string
		if p.Weight != b.Weight {
			what = append(what, fmt.Sprintf("weight %d→%d", p.Weight, b.Weight))
		}
		if p.State != b.State {
			what = append(what, fmt.Sprintf("%s→%s", p.State, b.State))
		}
		if !p.CloseAt.Equal(b.CloseAt) || p.CloseRate != b.CloseRate {
			what = append(what, fmt.Sprintf("close_at %s→%s", closeAtText(p), closeAtText(b)))
		}
		if len(what) > 0 {
			sc.BackendsChanged = append(sc.BackendsChanged, b.Key()+" "+strings.Join(what, ", "))
		}
	}
	for _, b := range o.Backends {
		if !nb[b.Key()] {
			sc.BackendsRemoved = append(sc.BackendsRemoved, b.Key())
		}
	}
	// The order of backends changes nothing the datapath does.
	if len(sc.Settings)+len(sc.BackendsAdded)+len(sc.BackendsRemoved)+len(sc.BackendsChanged) == 0 {
		return nil
	}
	slices.Sort(sc.BackendsAdded)
	slices.Sort(sc.BackendsRemoved)
	return sc
}

// closeAtText is a backend's paced drain as a change lists it.
func closeAtText(b config.Backend) string {
	if b.CloseAt.IsZero() {
		return "none"
	}
	return fmt.Sprintf("%s at %d/s", b.CloseAt.UTC().Format(time.RFC3339), b.CloseRate)
}
