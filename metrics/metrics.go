// Package metrics exposes a tether daemon's state in the Prometheus text
// format: a prometheus.Collector that, on every scrape, reads the
// datapath's counters, the health of every backend and the fill of the
// tables, and an HTTP handler serving it at /metrics (see Handler).
//
// Nothing is polled in the background: a scrape reads the counters from
// the datapath (the per-CPU BPF maps with XDP) at that moment and turns
// them into constant metrics, so a metric is never staler than its scrape.
// A scrape also walks the connection tables twice (once for the active
// connections per backend, once to count the tables' entries, in batches
// of 4096), which with a million entries takes tens of milliseconds.
//
// Only tether_ metrics are exported: the registry holds no Go runtime or
// process collectors, which say nothing of the traffic.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sort"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/datapath"
)

// Source is what the collector reads on each scrape; *control.Daemon is
// one.
type Source interface {
	Status() (control.Status, error)
	Stats() (control.Stats, error)
	Tables() ([]datapath.Table, error)
}

// BackendStates are the values of the state label of tether_backend_state,
// as control.BackendStatus.State says them.
var BackendStates = []string{"active", "draining", "down"}

var (
	backendLabels = []string{"service", "vip", "backend"}
	serviceLabels = []string{"service", "vip", "protocol"}
)

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, labels, nil)
}

// The metrics, by name. Names lists them for the dashboard's test and the
// README.
var (
	backendPackets = desc("tether_backend_packets_total",
		"Packets forwarded to the backend (client to backend; with XDP dsr the replies bypass tether).", backendLabels...)
	backendBytes = desc("tether_backend_bytes_total",
		"Bytes forwarded to the backend.", backendLabels...)
	backendConns = desc("tether_backend_connections_total",
		"New connections sent to the backend.", backendLabels...)
	backendActive = desc("tether_backend_active_connections",
		"Open connections to the backend (no FIN or RST seen) that sent within the service's idle_after.", backendLabels...)
	backendIdle = desc("tether_backend_idle_connections",
		"Open connections to a backend that is not down, quiet for the service's idle_after or longer.", backendLabels...)
	backendLost = desc("tether_backend_lost_connections",
		"Open connections to a down backend whose clients went quiet or since sent to another backend.", backendLabels...)
	backendUp = desc("tether_backend_up",
		"1 while the backend's health check passes (or it is not probed), 0 while it fails.", backendLabels...)
	backendState = desc("tether_backend_state",
		"1 for the state the datapath applies to the backend (active, draining or down), 0 for the others.", append(backendLabels, "state")...)
	backendWeight = desc("tether_backend_weight",
		"The backend's weight in its service's ring.", backendLabels...)
	probeLatency = desc("tether_backend_probe_latency_seconds",
		"How long the backend's last health probe took; absent before the first probe completes.", backendLabels...)
	probes = desc("tether_backend_health_probes_total",
		"Health probes of the backend since its probing began.", backendLabels...)
	probeFailures = desc("tether_backend_health_failures_total",
		"Failed health probes of the backend since its probing began.", backendLabels...)
	transitions = desc("tether_backend_health_transitions_total",
		"Changes of the backend between up and down since its probing began.", backendLabels...)
	serviceConns = desc("tether_service_connections_total",
		"New connections to the service.", serviceLabels...)
	affinityHits = desc("tether_service_affinity_hits_total",
		"New connections the service sent to a backend by its affinity entry.", serviceLabels...)
	affinityMisses = desc("tether_service_affinity_misses_total",
		"New connections the service sent by its ring, having no usable affinity entry.", serviceLabels...)
	serviceUp = desc("tether_service_up",
		"1 while a backend of the service takes new connections, 0 when none does (new TCP connections are reset).", serviceLabels...)
	notForwarded = desc("tether_packets_not_forwarded_total",
		"Packets the datapath did not forward, by reason: pass_* went to the kernel, drop_* were dropped, reset_* were answered with a TCP reset.", "reason")
	unrecorded = desc("tether_packets_unrecorded_total",
		"Packets of new flows forwarded without their flow being recorded: the CPU had recorded tables.insert_rate new flows in that second (the insertion guard).")
	datapathInfo = desc("tether_datapath_info",
		"1 for each interface with the mode the datapath runs in there (xdp, xdp-generic or splice; interface * when splice runs without one).", "datapath", "interface", "mode")
	tableEntries = desc("tether_table_entries",
		"Entries in the datapath's table.", "table")
	tableCapacity = desc("tether_table_capacity",
		"Most entries the datapath's table holds (tables of no fixed size have none).", "table")
	bgpSessionUp = desc("tether_bgp_session_up",
		"1 while the BGP session with the peer is established, 0 otherwise (with a bgp block only).", "peer")
	bgpAnnounced = desc("tether_bgp_vip_announced",
		"1 while the VIP is announced to the BGP peers, 0 while it is withdrawn (with a bgp block only).", "vip")
	bgpDrained = desc("tether_bgp_drained",
		"1 while the host is drained (tether host drain: every VIP withdrawn), 0 otherwise (with a bgp block only).")
	syncDatagrams = desc("tether_sync_datagrams_total",
		"Sync datagrams sent to the peers, and received from them that verified (with a sync block only).", "direction")
	syncEntries = desc("tether_sync_entries_total",
		"Shared entries sent (new flows, to each peer, and answers to requests) and received (with a sync block only).", "direction")
	syncSentBytes = desc("tether_sync_sent_bytes_total",
		"Bytes of the sync datagrams sent (with a sync block only).")
	syncRefused = desc("tether_sync_refused_total",
		"Sync datagrams refused, by reason: bad_mac, truncated, replayed, stale, unknown_peer, malformed, version, not_sync (with a sync block only).", "reason")
	syncLearned = desc("tether_sync_learned_total",
		"Shared entries this host entered; known: it had them already; unknown: of a service or backend it does not serve (with a sync block only).", "result")
	syncLost = desc("tether_sync_lost_total",
		"New flows not shared: the datapath had no room to hand them out, or more were waiting to be sent than the daemon holds (with a sync block only).", "where")
	syncReady = desc("tether_sync_ready",
		"1 once this host learned its peers' entries (or waited start_wait) and may announce its VIPs, 0 before (with a sync block only).")
	scrapeErrors = desc("tether_scrape_errors",
		"Parts of this scrape that could not be read (status, stats or tables), logged by the daemon.")
)

// Names are the names of every metric the collector exports.
var Names = []string{
	"tether_backend_packets_total",
	"tether_backend_bytes_total",
	"tether_backend_connections_total",
	"tether_backend_active_connections",
	"tether_backend_idle_connections",
	"tether_backend_lost_connections",
	"tether_backend_up",
	"tether_backend_state",
	"tether_backend_weight",
	"tether_backend_probe_latency_seconds",
	"tether_backend_health_probes_total",
	"tether_backend_health_failures_total",
	"tether_backend_health_transitions_total",
	"tether_service_connections_total",
	"tether_service_affinity_hits_total",
	"tether_service_affinity_misses_total",
	"tether_service_up",
	"tether_packets_not_forwarded_total",
	"tether_packets_unrecorded_total",
	"tether_datapath_info",
	"tether_table_entries",
	"tether_table_capacity",
	"tether_bgp_session_up",
	"tether_bgp_vip_announced",
	"tether_bgp_drained",
	"tether_sync_datagrams_total",
	"tether_sync_entries_total",
	"tether_sync_sent_bytes_total",
	"tether_sync_refused_total",
	"tether_sync_learned_total",
	"tether_sync_lost_total",
	"tether_sync_ready",
	"tether_scrape_errors",
}

// Collector is a prometheus.Collector of a tether daemon. It is safe for
// concurrent scrapes, each of which reads the source afresh.
type Collector struct {
	src Source
	log *slog.Logger
}

// NewCollector returns the collector of src; failures to read it are
// logged to log.
func NewCollector(src Source, log *slog.Logger) *Collector {
	return &Collector{src: src, log: log}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		backendPackets, backendBytes, backendConns, backendActive, backendIdle, backendLost, backendUp, backendState,
		backendWeight, probeLatency, probes, probeFailures, transitions,
		serviceConns, affinityHits, affinityMisses, serviceUp,
		notForwarded, unrecorded, datapathInfo, tableEntries, tableCapacity,
		bgpSessionUp, bgpAnnounced, bgpDrained,
		syncDatagrams, syncEntries, syncSentBytes, syncRefused, syncLearned, syncLost, syncReady, scrapeErrors,
	} {
		ch <- d
	}
}

// backendKey identifies a backend of a service across Status and Stats,
// which are read one after the other.
type backendKey struct{ vip, proto, backend string }

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	errs := 0
	failed := func(what string, err error) {
		errs++
		c.log.Error("metrics: read "+what, "err", err)
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}

	status, err := c.src.Status()
	if err != nil {
		failed("status", err)
		status = control.Status{}
	}
	backends := map[backendKey]control.BackendStatus{}
	for _, s := range status.Services {
		up := 0.0
		if s.State == control.ServiceUp {
			up = 1
		}
		gauge(serviceUp, up, s.Name, s.VIP, s.Protocol)
		for _, b := range s.Backends {
			backends[backendKey{s.VIP, s.Protocol, b.Address}] = b
			l := []string{s.Name, s.VIP, b.Address}
			gauge(backendActive, float64(b.ActiveConnections), l...)
			gauge(backendIdle, float64(b.IdleConnections), l...)
			gauge(backendLost, float64(b.LostConnections), l...)
			gauge(backendWeight, float64(b.Weight), l...)
			up := 1.0
			if b.Health.State == control.HealthDown {
				up = 0
			}
			gauge(backendUp, up, l...)
			for _, st := range BackendStates {
				v := 0.0
				if b.State == st {
					v = 1
				}
				gauge(backendState, v, append(l, st)...)
			}
			if lat, err := time.ParseDuration(b.Health.LastLatency); err == nil {
				gauge(probeLatency, lat.Seconds(), l...)
			}
		}
	}
	ifaces := make([]string, 0, len(status.Interfaces))
	for name := range status.Interfaces {
		ifaces = append(ifaces, name)
	}
	sort.Strings(ifaces)
	for _, name := range ifaces {
		gauge(datapathInfo, 1, status.Datapath, name, status.Interfaces[name])
	}
	if b := status.BGP; b != nil {
		for _, p := range b.Peers {
			gauge(bgpSessionUp, boolValue(p.State == "established"), p.Address)
		}
		for _, v := range b.VIPs {
			gauge(bgpAnnounced, boolValue(v.Announced), v.VIP.String())
		}
		gauge(bgpDrained, boolValue(b.Drained))
	}
	if s := status.Sync; s != nil {
		counter(syncDatagrams, s.SentDatagrams, "sent")
		counter(syncDatagrams, s.ReceivedDatagrams, "received")
		counter(syncEntries, s.SentEntries, "sent")
		counter(syncEntries, s.ReceivedEntries, "received")
		counter(syncSentBytes, s.SentBytes)
		for _, r := range slices.Sorted(maps.Keys(s.Refused)) {
			counter(syncRefused, s.Refused[r], r)
		}
		counter(syncLearned, s.Learned, "learned")
		counter(syncLearned, s.Known, "known")
		counter(syncLearned, s.Unknown, "unknown")
		counter(syncLost, s.Lost, "datapath")
		counter(syncLost, s.Dropped, "daemon")
		gauge(syncReady, boolValue(s.Ready))
	}

	stats, err := c.src.Stats()
	if err != nil {
		failed("counters", err)
		stats = control.Stats{}
	}
	for _, s := range stats.Services {
		l := []string{s.Name, s.VIP, s.Protocol}
		counter(serviceConns, s.NewConns, l...)
		counter(affinityHits, s.AffinityHits, l...)
		counter(affinityMisses, s.AffinityMisses, l...)
		for _, b := range s.Backends {
			l := []string{s.Name, s.VIP, b.Address}
			counter(backendPackets, b.Packets, l...)
			counter(backendBytes, b.Bytes, l...)
			counter(backendConns, b.NewConns, l...)
			// Health counters only for a probed backend that status saw.
			if bs, ok := backends[backendKey{s.VIP, s.Protocol, b.Address}]; ok && bs.Health.State != control.HealthUnchecked {
				counter(probes, b.HealthProbes, l...)
				counter(probeFailures, b.HealthFailures, l...)
				counter(transitions, b.HealthTransitions, l...)
			}
		}
	}
	counter(unrecorded, stats.Unrecorded)
	reasons := make([]string, 0, len(stats.Reasons))
	for r := range stats.Reasons {
		reasons = append(reasons, r)
	}
	sort.Strings(reasons)
	for _, r := range reasons {
		counter(notForwarded, stats.Reasons[r], r)
	}

	tables, err := c.src.Tables()
	if err != nil {
		failed("table fill", err)
		tables = nil
	}
	for _, t := range tables {
		gauge(tableEntries, float64(t.Entries), t.Name)
		if t.Capacity > 0 {
			gauge(tableCapacity, float64(t.Capacity), t.Name)
		}
	}
	gauge(scrapeErrors, float64(errs))
}

// boolValue is 1 for true, 0 for false.
func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// Registry returns a registry holding only the collector of src.
func Registry(src Source, log *slog.Logger) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCollector(src, log))
	return reg
}

// Handler returns the HTTP handler of the metrics of src: GET /metrics
// serves them (in the text format, or OpenMetrics and protobuf when the
// scraper asks), anything else is 404.
func Handler(src Source, log *slog.Logger) http.Handler {
	reg := Registry(src, log)
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog:      slog.NewLogLogger(log.Handler(), slog.LevelError),
		ErrorHandling: promhttp.ContinueOnError,
	}))
	return mux
}

// IsLoopback says whether addr (HOST:PORT) listens on loopback only; a
// host name other than localhost, or none, is taken as not.
func IsLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	a, err := netip.ParseAddr(host)
	return err == nil && a.IsLoopback()
}

// Serve serves h over HTTP on ln until ctx ends, then shuts the server
// down, giving scrapes in progress a second to finish.
func Serve(ctx context.Context, ln net.Listener, h http.Handler) error {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	select {
	case err := <-done:
		return fmt.Errorf("serve metrics: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
	}
	if err := <-done; !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve metrics: %w", err)
	}
	return nil
}
