package test

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/maglev"
)

// TestTablePressure runs more connections than the connection table
// holds: 1,200 WebSocket connections over IPv4 (source affinity) and 1,200
// over IPv6 (connection affinity), with tables.connections at its
// minimum, 1,024 a family. The LRU table evicts the entries of live flows
// all the time, and their next packets find their backend again: through
// the affinity table (source affinity) or the ring (connection affinity).
// Every connection echoes from its backend.
//
// Then a fourth backend is added, which changes the rings. A connection
// whose entry was evicted and whose ring slot now names another backend
// moves (its new backend resets it): none may with source affinity (the
// affinity table decides), and with connection affinity only those whose
// slot changed may break. The test reports how many did, against how
// many flows had no entry just before the change and how many slots
// changed: the share a backend change costs when the table is too small
// (nearly every changed slot, as the table churns with every flow that
// comes back).
func TestTablePressure(t *testing.T) {
	const perClient = 10
	l := lab.NewT(t, lab.Options{Backends: 4, Clients: 120})
	for _, be := range l.Backends {
		serveEcho(t, l, be)
	}
	small := func(cfg string) string {
		cfg = strings.Replace(cfg, "connections: 65536", "connections: 1024", 1)
		// chat6 (the second service) picks by connection.
		i := strings.Index(cfg, "  - name: chat6")
		return cfg[:i] + strings.Replace(cfg[i:], "affinity: source", "affinity: connection", 1)
	}
	cfg3 := small(chatConfig(l, l.Backends[:3]))
	d := startDaemon(t, l, cfg3)
	conns4 := dialAll(t, l, l.ClientAddrs4, l.VIP4, perClient)
	conns6 := dialAll(t, l, l.ClientAddrs6, l.VIP6, perClient)
	all := append(append([]*conn{}, conns4...), conns6...)
	for round := range 3 {
		echoAll(t, all, "under pressure "+string(rune('1'+round)))
	}
	m := daemonMaps(t, l, testRing)
	entries, _ := tables(t, l)
	t.Logf("%d live flows (%d IPv4, %d IPv6), the tables hold %d entries (1024 a family); every connection echoed three times from its backend",
		len(all), len(conns4), len(conns6), entries)
	if entries >= len(all) {
		t.Fatalf("the tables hold %d entries for %d flows: no pressure", entries, len(all))
	}

	// Which flows have an entry, and the rings, just before the change.
	flows, err := control.NewClient(d.socket).Flows(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	tracked := map[string]bool{}
	for _, f := range flows {
		tracked[f.Client] = true
	}
	id6 := serviceID(t, m, l.VIP6)
	ring0, err := m.Ring(id6)
	if err != nil {
		t.Fatal(err)
	}
	ids0 := backendIDs(t, m)
	d.reload(small(chatConfig(l, l.Backends)))
	ring1, err := m.Ring(id6)
	if err != nil {
		t.Fatal(err)
	}

	for _, err := range echoFailures(conns4, "after a backend was added") {
		t.Errorf("source affinity: %v", err)
	}
	// With connection affinity, only a connection whose ring slot moved
	// may break.
	results := echoEach(conns6, "after a backend was added")
	moved, untracked, movedUntracked, broke, brokeStill := 0, 0, 0, 0, 0
	for i, c := range conns6 {
		local := c.ws.LocalAddr().(*net.TCPAddr).AddrPort()
		key := netip.AddrPortFrom(local.Addr().Unmap(), local.Port()).String()
		h := maglev.ConnHash(maglev.DefaultSeed, local.Addr().Unmap(), local.Port(), chatPort, 6) % uint32(len(ring0))
		slotMoved := ring0[h] != ring1[h]
		if slotMoved {
			moved++
		}
		if !tracked[key] {
			untracked++
			if slotMoved {
				movedUntracked++
			}
		}
		if results[i] == nil {
			continue
		}
		broke++
		if !slotMoved {
			brokeStill++
			t.Errorf("connection %s broke though its ring slot still names backend %d: %v", key, ring1[h], results[i])
		}
	}
	t.Logf("backend %s added (ids before %v): with connection affinity, %d of %d ring slots of the live flows changed; %d flows had no entry at the change, %d of them with a changed slot; %d connections broke (%.1f%%), %d of them with an unchanged slot; with source affinity 0 of %d broke",
		l.Backends[3].Name, ids0, moved, len(conns6), untracked, movedUntracked, broke, 100*float64(broke)/float64(len(conns6)), brokeStill, len(conns4))
}
