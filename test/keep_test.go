package test

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tetherlb/tether/internal/lab"
)

// TestAffinityLastsWhileConnected: with an affinity timeout of 3 s, the
// affinity entry of a client that holds a connection, quiet or not, stays
// younger than the timeout for as long as the connection lives (the daemon
// renews it), while that of a client whose connection closed ages past it;
// the held client's next connection, after a fourth backend joined, reaches
// the backend it had.
func TestAffinityLastsWhileConnected(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 3, Clients: 40})
	for _, be := range l.Backends {
		serveEchoOn(t, be, l.VIP4, l.VIP6, be.Addr4, be.Addr6)
	}
	const timeout = 3 * time.Second
	cfgOf := func() string {
		return strings.ReplaceAll(chatConfig(l, l.Backends), "affinity_timeout: 1h", "affinity_timeout: 3s")
	}
	d := startDaemon(t, l, cfgOf())
	vip := netip.AddrPortFrom(l.VIP4, chatPort)
	held := dialAllAt(t, l, l.ClientAddrs4[:20], vip, 1)
	gone := dialAllAt(t, l, l.ClientAddrs4[20:], vip, 1)
	for _, c := range gone {
		c.ws.Close()
	}
	time.Sleep(3 * timeout)
	m := daemonMaps(t, l, testRing)
	svc := serviceID(t, m, l.VIP4)
	for _, c := range held {
		a, ok, err := m.LookupAffinity(svc, c.src)
		if err != nil || !ok || a.Age >= timeout {
			t.Errorf("client %s holds a connection: its affinity entry %+v (present %v, %v), want one younger than %v", c.src, a, ok, err, timeout)
		}
	}
	for _, c := range gone {
		if a, ok, _ := m.LookupAffinity(svc, c.src); ok && a.Age < timeout {
			t.Errorf("client %s closed its connection %v ago: its affinity entry is %v old, want older than the timeout", c.src, 3*timeout, a.Age)
		}
	}

	// A backend joins: a quarter of the ring moves, but the held clients'
	// next connections go where they had.
	be4, err := l.AddBackend()
	if err != nil {
		t.Fatal(err)
	}
	serveEchoOn(t, be4, l.VIP4, l.VIP6, be4.Addr4, be4.Addr6)
	d.reload(cfgOf())
	var srcs []netip.Addr
	for _, c := range held {
		srcs = append(srcs, c.src)
	}
	again := dialAllAt(t, l, srcs, vip, 1)
	for i, c := range again {
		if c.backend != held[i].backend {
			t.Errorf("client %s reconnected to %s, it holds a connection to %s", c.src, c.backend, held[i].backend)
		}
	}
	if _, err := held[0].ws.Echo(context.Background(), "still here"); err != nil {
		t.Errorf("a held connection broke: %v", err)
	}
}
