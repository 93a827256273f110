package test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/internal/lab"
)

// TestMetrics runs tether with --metrics on the balancer's loopback, once
// per datapath, sends WebSocket traffic through it and scrapes the
// endpoint from inside the balancer's namespace, parsing it with the
// Prometheus text parser: per backend, the new connections equal those
// the backend accepted, the active ones those the clients hold open and,
// with XDP, the packets the TCP segments the backend received.
func TestMetrics(t *testing.T) {
	forEachDatapath(t, testMetrics)
}

func testMetrics(t *testing.T, dp string) {
	const (
		clients  = 30
		perC     = 2 // connections per client address
		messages = 3 // echoes per connection, after dialAll's first
	)
	l, servers, segs0 := echoLab(t, dp, clients)
	splice := dp == config.DatapathSplice
	// No health checks: their probes would add TCP segments that tether
	// does not forward.
	d := startDaemon(t, l, withDatapath(healthConfig(l, l.Backends, "{type: none}"), dp), "--metrics", "127.0.0.1:0")
	addr := metricsAddr(t, d)

	conns := dialAll(t, l, l.ClientAddrs4, l.VIP4, perC)
	for i := range messages {
		echoAll(t, conns, fmt.Sprintf("metrics %d", i))
	}
	perBackend := map[string]int{}
	for _, c := range conns {
		perBackend[c.backend]++
	}
	t.Logf("connections per backend: %v", perBackend)

	fams := scrapeMetrics(t, l.Balancer, addr)
	checkMetricNames(t, fams)
	chat := func(be *lab.Host) map[string]string {
		return map[string]string{"service": "chat", "backend": netip.AddrPortFrom(be.Addr4, chatPort).String()}
	}
	// The echo server clients reach: the one on VIP4 with XDP (dsr keeps
	// the VIP as destination), the one on the backend's address with the
	// proxy, which dials it.
	server := 0
	if splice {
		server = 2
	}
	for _, be := range l.Backends {
		st := servers[be.Name][server].Stats()
		if got := sample(t, fams, "tether_backend_connections_total", chat(be)); int(got) != st.Accepted {
			t.Errorf("%s: tether_backend_connections_total = %v, the backend accepted %d", be.Name, got, st.Accepted)
		}
		if got := sample(t, fams, "tether_backend_active_connections", chat(be)); int(got) != perBackend[be.Name] {
			t.Errorf("%s: tether_backend_active_connections = %v, the clients hold %d", be.Name, got, perBackend[be.Name])
		}
		if got := sample(t, fams, "tether_backend_up", chat(be)); got != 1 {
			t.Errorf("%s: tether_backend_up = %v, want 1", be.Name, got)
		}
		if got := sample(t, fams, "tether_backend_state", map[string]string{"service": "chat", "backend": chat(be)["backend"], "state": "active"}); got != 1 {
			t.Errorf("%s: tether_backend_state{state=active} = %v, want 1", be.Name, got)
		}
		if got, min := sample(t, fams, "tether_backend_packets_total", chat(be)), float64(perBackend[be.Name]*(messages+1)); got < min {
			t.Errorf("%s: tether_backend_packets_total = %v, want at least one per message, %v", be.Name, got, min)
		}
	}
	if got := sample(t, fams, "tether_service_connections_total", map[string]string{"service": "chat"}); int(got) != len(conns) {
		t.Errorf("tether_service_connections_total{service=chat} = %v, want %d", got, len(conns))
	}
	if got := sample(t, fams, "tether_service_up", map[string]string{"service": "chat"}); got != 1 {
		t.Errorf("tether_service_up{service=chat} = %v, want 1", got)
	}

	if splice {
		if got := sample(t, fams, "tether_datapath_info", map[string]string{"datapath": "splice", "interface": "*", "mode": "splice"}); got != 1 {
			t.Errorf("tether_datapath_info = %v, want 1", got)
		}
		if got := sample(t, fams, "tether_table_entries", map[string]string{"table": "connections"}); int(got) != len(conns) {
			t.Errorf("tether_table_entries{table=connections} = %v, want the %d open connections", got, len(conns))
		}
		if got := sample(t, fams, "tether_table_entries", map[string]string{"table": "affinity"}); int(got) != clients {
			t.Errorf("tether_table_entries{table=affinity} = %v, want one per client, %d", got, clients)
		}
		if got := sample(t, fams, "tether_table_capacity", map[string]string{"table": "affinity"}); got != 65536 {
			t.Errorf("tether_table_capacity{table=affinity} = %v, want 65536", got)
		}
		// No splice.max_connections: the connections have no capacity.
		for _, m := range fams["tether_table_capacity"].GetMetric() {
			if labelsOf(m)["table"] == "connections" {
				t.Errorf("tether_table_capacity{table=connections} = %v without a cap", m.GetGauge().GetValue())
			}
		}
		return
	}
	info := fams["tether_datapath_info"].GetMetric()
	if len(info) != 1 || labelsOf(info[0])["interface"] != "eth0" || labelsOf(info[0])["datapath"] != "xdp" {
		t.Errorf("tether_datapath_info: %v, want one sample of datapath xdp on eth0", info)
	} else {
		t.Logf("tether_datapath_info%v", labelsOf(info[0]))
	}
	if got := sample(t, fams, "tether_table_entries", map[string]string{"table": "connections_ipv4"}); int(got) < len(conns) {
		t.Errorf("tether_table_entries{table=connections_ipv4} = %v, want at least the %d open connections", got, len(conns))
	}
	if got := sample(t, fams, "tether_table_capacity", map[string]string{"table": "affinity"}); got != 65536 {
		t.Errorf("tether_table_capacity{table=affinity} = %v, want 65536", got)
	}
	if got := sample(t, fams, "tether_table_entries", map[string]string{"table": "affinity"}); int(got) != clients {
		t.Errorf("tether_table_entries{table=affinity} = %v, want one per client, %d", got, clients)
	}
	// Packets: exactly the TCP segments each backend received, as in
	// checkXDPCounters. Delayed ACKs may still be on their way: scrape
	// again until both sides agree, for a bounded time.
	for _, be := range l.Backends {
		var got, segs uint64
		for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			got = uint64(sample(t, fams, "tether_backend_packets_total", chat(be)) +
				sample(t, fams, "tether_backend_packets_total", map[string]string{"service": "chat6", "backend": netip.AddrPortFrom(be.Addr6, chatPort).String()}))
			segs = snmpCounter(t, be, "Tcp", "InSegs") - segs0[be.Name]
			if got == segs || time.Now().After(deadline) {
				break
			}
			fams = scrapeMetrics(t, l.Balancer, addr)
		}
		if got != segs {
			t.Errorf("%s: tether_backend_packets_total = %d, the backend received %d TCP segments", be.Name, got, segs)
		}
	}
}

// metricsAddr returns the address the daemon serves its metrics on, from
// its log.
func metricsAddr(t *testing.T, d *daemon) string {
	t.Helper()
	d.waitLog(`msg="serving metrics"`, 5*time.Second)
	m := regexp.MustCompile(`msg="serving metrics" addr=(\S+)`).FindStringSubmatch(d.proc.Output())
	if m == nil {
		t.Fatalf("no metrics address in the log:\n%s", d.proc.Output())
	}
	return m[1]
}

// scrapeMetrics gets http://addr/metrics from inside the balancer's
// namespace, where the daemon listens, and parses it.
func scrapeMetrics(t *testing.T, h *lab.Host, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	client := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, network, a string) (net.Conn, error) {
			return h.Dial(ctx, network, netip.Addr{}, a)
		}},
	}
	defer client.CloseIdleConnections()
	resp, err := client.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape: %s", resp.Status)
	}
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse the metrics: %v", err)
	}
	return fams
}

func labelsOf(m *dto.Metric) map[string]string {
	out := map[string]string{}
	for _, lp := range m.GetLabel() {
		out[lp.GetName()] = lp.GetValue()
	}
	return out
}

// sample returns the value of the one sample of family name whose labels
// include want.
func sample(t *testing.T, fams map[string]*dto.MetricFamily, name string, want map[string]string) float64 {
	t.Helper()
	var found []float64
	for _, m := range fams[name].GetMetric() {
		labels := labelsOf(m)
		match := true
		for k, v := range want {
			match = match && labels[k] == v
		}
		if !match {
			continue
		}
		if c := m.GetCounter(); c != nil {
			found = append(found, c.GetValue())
		} else {
			found = append(found, m.GetGauge().GetValue())
		}
	}
	if len(found) != 1 {
		t.Fatalf("%s%v: %d samples, want 1", name, want, len(found))
	}
	return found[0]
}

// checkMetricNames checks the Prometheus conventions: the tether_ prefix,
// and _total on counters only, and that no scrape part failed.
func checkMetricNames(t *testing.T, fams map[string]*dto.MetricFamily) {
	t.Helper()
	for name, f := range fams {
		if !strings.HasPrefix(name, "tether_") {
			t.Errorf("metric %s lacks the tether_ prefix", name)
		}
		if counter := f.GetType() == dto.MetricType_COUNTER; counter != strings.HasSuffix(name, "_total") {
			t.Errorf("metric %s is a %v: counters, and only they, end in _total", name, f.GetType())
		}
	}
	if got := sample(t, fams, "tether_scrape_errors", nil); got != 0 {
		t.Errorf("tether_scrape_errors = %v, want 0", got)
	}
}
