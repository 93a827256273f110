package metrics

import (
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/datapath"
)

// fakeSource is a Source with fixed answers.
type fakeSource struct {
	status    control.Status
	stats     control.Stats
	tables    []datapath.Table
	statsErr  error
	tablesErr error
}

func (f *fakeSource) Status() (control.Status, error)   { return f.status, nil }
func (f *fakeSource) Stats() (control.Stats, error)     { return f.stats, f.statsErr }
func (f *fakeSource) Tables() ([]datapath.Table, error) { return f.tables, f.tablesErr }

func newFake() *fakeSource {
	return &fakeSource{
		status: control.Status{
			Datapath:   "xdp",
			Interfaces: map[string]string{"eth0": "native"},
			Services: []control.ServiceStatus{{
				Name: "chat", VIP: "203.0.113.10:8765", Protocol: "tcp", State: control.ServiceUp,
				Backends: []control.BackendStatus{
					{Address: "192.0.2.11:8765", Weight: 1, State: "active", ActiveConnections: 3,
						Health: control.BackendHealth{State: control.HealthUp, LastLatency: "250µs"}},
					{Address: "192.0.2.12:8765", Weight: 2, State: "down", ActiveConnections: 1,
						Health: control.BackendHealth{State: control.HealthDown, LastLatency: "2s"}},
				},
			}, {
				Name: "dns", VIP: "203.0.113.10:53", Protocol: "udp", State: control.ServiceDown,
				Backends: []control.BackendStatus{
					{Address: "192.0.2.13:53", Weight: 1, State: "draining", Health: control.BackendHealth{State: control.HealthUnchecked}},
				},
			}},
		},
		stats: control.Stats{
			Services: []control.ServiceStats{{
				Name: "chat", VIP: "203.0.113.10:8765", Protocol: "tcp",
				ServiceCounters: datapath.ServiceCounters{NewConns: 9, AffinityHits: 4, AffinityMisses: 5},
				Backends: []control.BackendStats{
					{Address: "192.0.2.11:8765", BackendCounters: datapath.BackendCounters{Packets: 100, Bytes: 6400, NewConns: 6},
						HealthProbes: 10, HealthFailures: 1, HealthTransitions: 0},
					{Address: "192.0.2.12:8765", BackendCounters: datapath.BackendCounters{Packets: 50, Bytes: 3200, NewConns: 3},
						HealthProbes: 10, HealthFailures: 4, HealthTransitions: 1},
				},
			}, {
				Name: "dns", VIP: "203.0.113.10:53", Protocol: "udp",
				Backends: []control.BackendStats{{Address: "192.0.2.13:53", BackendCounters: datapath.BackendCounters{Packets: 7}}},
			}},
			Reasons: map[string]uint64{"pass_not_vip": 12, "drop_no_backend": 2},
		},
		tables: []datapath.Table{
			{Name: "connections_ipv4", Entries: 4, Capacity: 65536},
			{Name: "affinity", Entries: 2, Capacity: 65536},
			{Name: "connections"}, // no capacity
		},
	}
}

// scrape serves src's metrics over HTTP, as the daemon does, and parses
// the answer with the Prometheus text parser.
func scrape(t *testing.T, src Source) map[string]*dto.MetricFamily {
	t.Helper()
	srv := httptest.NewServer(Handler(src, slog.New(slog.DiscardHandler)))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("GET /metrics: %s\n%s", resp.Status, b)
	}
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return fams
}

// value returns the value of the sample of family name whose labels
// include want, failing unless exactly one matches.
func value(t *testing.T, fams map[string]*dto.MetricFamily, name string, want map[string]string) float64 {
	t.Helper()
	f, ok := fams[name]
	if !ok {
		t.Fatalf("no metric %s", name)
	}
	var found []float64
	for _, m := range f.GetMetric() {
		labels := map[string]string{}
		for _, lp := range m.GetLabel() {
			labels[lp.GetName()] = lp.GetValue()
		}
		match := true
		for k, v := range want {
			if labels[k] != v {
				match = false
			}
		}
		if !match {
			continue
		}
		switch f.GetType() {
		case dto.MetricType_COUNTER:
			found = append(found, m.GetCounter().GetValue())
		case dto.MetricType_GAUGE:
			found = append(found, m.GetGauge().GetValue())
		default:
			t.Fatalf("%s has type %v", name, f.GetType())
		}
	}
	if len(found) != 1 {
		t.Fatalf("%s%v: %d samples, want 1", name, want, len(found))
	}
	return found[0]
}

func TestCollector(t *testing.T) {
	fams := scrape(t, newFake())
	b1 := map[string]string{"service": "chat", "vip": "203.0.113.10:8765", "backend": "192.0.2.11:8765"}
	b2 := map[string]string{"service": "chat", "vip": "203.0.113.10:8765", "backend": "192.0.2.12:8765"}
	b3 := map[string]string{"service": "dns", "vip": "203.0.113.10:53", "backend": "192.0.2.13:53"}
	with := func(m map[string]string, k, v string) map[string]string {
		out := map[string]string{k: v}
		for k, v := range m {
			out[k] = v
		}
		return out
	}
	for _, tc := range []struct {
		desc   string
		name   string
		labels map[string]string
		want   float64
	}{
		{"packets", "tether_backend_packets_total", b1, 100},
		{"bytes", "tether_backend_bytes_total", b2, 3200},
		{"new connections", "tether_backend_connections_total", b1, 6},
		{"active connections", "tether_backend_active_connections", b1, 3},
		{"healthy backend", "tether_backend_up", b1, 1},
		{"failing backend", "tether_backend_up", b2, 0},
		{"unchecked backend counts as up", "tether_backend_up", b3, 1},
		{"state active", "tether_backend_state", with(b1, "state", "active"), 1},
		{"state not down", "tether_backend_state", with(b1, "state", "down"), 0},
		{"state down", "tether_backend_state", with(b2, "state", "down"), 1},
		{"state draining", "tether_backend_state", with(b3, "state", "draining"), 1},
		{"weight", "tether_backend_weight", b2, 2},
		{"probe latency", "tether_backend_probe_latency_seconds", b1, 0.00025},
		{"probes", "tether_backend_health_probes_total", b2, 10},
		{"probe failures", "tether_backend_health_failures_total", b2, 4},
		{"transitions", "tether_backend_health_transitions_total", b2, 1},
		{"service connections", "tether_service_connections_total", map[string]string{"service": "chat", "protocol": "tcp"}, 9},
		{"affinity hits", "tether_service_affinity_hits_total", map[string]string{"service": "chat"}, 4},
		{"affinity misses", "tether_service_affinity_misses_total", map[string]string{"service": "chat"}, 5},
		{"service up", "tether_service_up", map[string]string{"service": "chat"}, 1},
		{"service down", "tether_service_up", map[string]string{"service": "dns", "protocol": "udp"}, 0},
		{"drops", "tether_packets_not_forwarded_total", map[string]string{"reason": "drop_no_backend"}, 2},
		{"passes", "tether_packets_not_forwarded_total", map[string]string{"reason": "pass_not_vip"}, 12},
		{"datapath", "tether_datapath_info", map[string]string{"datapath": "xdp", "interface": "eth0", "mode": "native"}, 1},
		{"table entries", "tether_table_entries", map[string]string{"table": "connections_ipv4"}, 4},
		{"table capacity", "tether_table_capacity", map[string]string{"table": "affinity"}, 65536},
		{"no errors", "tether_scrape_errors", nil, 0},
	} {
		if got := value(t, fams, tc.name, tc.labels); got != tc.want {
			t.Errorf("%s: %s%v = %v, want %v", tc.desc, tc.name, tc.labels, got, tc.want)
		}
	}
	// An unprobed backend has no health counters nor latency, a table of
	// no fixed size no capacity.
	for _, m := range append(fams["tether_backend_health_probes_total"].GetMetric(), fams["tether_backend_probe_latency_seconds"].GetMetric()...) {
		for _, lp := range m.GetLabel() {
			if lp.GetValue() == "192.0.2.13:53" {
				t.Errorf("unprobed backend has health metrics: %v", m)
			}
		}
	}
	if n := len(fams["tether_table_capacity"].GetMetric()); n != 2 {
		t.Errorf("%d table capacities, want 2 (connections has none)", n)
	}
	checkNames(t, fams)
}

// checkNames checks that every family is one of Names, with the tether_
// prefix, and that counters, and only they, end in _total.
func checkNames(t *testing.T, fams map[string]*dto.MetricFamily) {
	t.Helper()
	for name, f := range fams {
		if !strings.HasPrefix(name, "tether_") {
			t.Errorf("metric %s lacks the tether_ prefix", name)
		}
		if !slices.Contains(Names, name) {
			t.Errorf("metric %s is not in Names", name)
		}
		if counter := f.GetType() == dto.MetricType_COUNTER; counter != strings.HasSuffix(name, "_total") {
			t.Errorf("metric %s is a %v: counters, and only they, end in _total", name, f.GetType())
		}
	}
}

// TestCollectorPartial checks that a part that cannot be read is left out
// and counted, and the rest still served.
func TestCollectorPartial(t *testing.T) {
	src := newFake()
	src.statsErr = errors.New("read counters: boom")
	src.tablesErr = errors.New("count: boom")
	fams := scrape(t, src)
	if got := value(t, fams, "tether_scrape_errors", nil); got != 2 {
		t.Errorf("tether_scrape_errors = %v, want 2", got)
	}
	if _, ok := fams["tether_backend_packets_total"]; ok {
		t.Error("counters served although they could not be read")
	}
	if got := value(t, fams, "tether_backend_active_connections", map[string]string{"backend": "192.0.2.11:8765"}); got != 3 {
		t.Errorf("active connections = %v, want 3", got)
	}
}

func TestIsLoopback(t *testing.T) {
	for addr, want := range map[string]bool{
		"127.0.0.1:9100":   true,
		"[::1]:9100":       true,
		"localhost:9100":   true,
		":9100":            false,
		"0.0.0.0:9100":     false,
		"192.0.2.1:9100":   false,
		"example.org:9100": false,
		"nonsense":         false,
	} {
		if got := IsLoopback(addr); got != want {
			t.Errorf("IsLoopback(%q) = %v, want %v", addr, got, want)
		}
	}
}

// TestDashboard checks that the Grafana dashboard is valid JSON, has the
// panels the README lists, and queries only metrics the collector exports.
func TestDashboard(t *testing.T) {
	data, err := os.ReadFile("../docs/grafana/tether.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string `json:"title"`
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("docs/grafana/tether.json: %v", err)
	}
	ident := regexp.MustCompile(`\btether_[a-z_]+`)
	used := map[string]bool{}
	for _, p := range dash.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			for _, name := range ident.FindAllString(tg.Expr, -1) {
				used[name] = true
				if !slices.Contains(Names, name) {
					t.Errorf("panel %q queries %s, which tether does not export", p.Title, name)
				}
			}
		}
	}
	for _, name := range []string{
		"tether_backend_connections_total", "tether_backend_active_connections", "tether_backend_bytes_total",
		"tether_backend_up", "tether_packets_not_forwarded_total", "tether_table_entries", "tether_table_capacity",
	} {
		if !used[name] {
			t.Errorf("no panel shows %s", name)
		}
	}
}

// TestDescribeNames checks that Names lists exactly the metrics the
// collector describes.
func TestDescribeNames(t *testing.T) {
	ch := make(chan *prometheus.Desc, 64)
	NewCollector(newFake(), slog.New(slog.DiscardHandler)).Describe(ch)
	close(ch)
	var got []string
	for d := range ch {
		name := regexp.MustCompile(`fqName: "([^"]+)"`).FindStringSubmatch(d.String())
		if name == nil {
			t.Fatalf("no name in %s", d)
		}
		got = append(got, name[1])
	}
	if !slices.Equal(got, Names) {
		t.Errorf("described %v, Names lists %v", got, Names)
	}
}
