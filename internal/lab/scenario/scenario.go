// Package scenario plays the scenarios of `tether lab` on a lab of network
// namespaces (package lab): a WebSocket echo backend on each backend host,
// `tether run` on the balancer (or on several, behind a BIRD router that
// spreads flows over them by ECMP), WebSocket clients that echo and
// reconnect, and the scenarios steady, kill, drain, scaleout and
// hostkill, each with one line of what happened and what theory expects. The CLI parses the flags and
// draws the live view; everything else is here.
package scenario

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/health"
	"github.com/tetherlb/tether/internal/lab"
)

// The lab's service and how its clients behave.
const (
	Port        = 8765
	ServiceName = "chat"
	echoEvery   = 200 * time.Millisecond // one echo per client and period
	// echoTimeout is how long an echo may take before the client calls
	// its connection broken: longer than a dead balancer host takes to
	// leave the router's routes (the hold time) plus TCP's next
	// retransmission, which delay its flows without losing them.
	echoTimeout = 10 * time.Second
	// HoldTime is the BGP hold time of the hosts' sessions with the
	// router, in seconds: how long the router takes at most to notice a
	// dead host.
	HoldTime = 3
	// MaxHosts is the most balancer hosts a lab runs.
	MaxHosts    = 4
	dialTimeout = 2 * time.Second
	// Probes is how many fresh client addresses a scenario that probes new
	// connections uses.
	Probes = 20
	// MaxClients is the most clients a lab holds beside its probes.
	MaxClients = lab.MaxClients - 2*Probes
	// clearScreen moves the cursor home and clears a terminal.
	clearScreen = "\033[H\033[2J"
)

// Names are the scenarios, in the order Run plays them by default with
// one balancer host.
var Names = []string{"steady", "kill", "drain", "scaleout"}

// HostNames are the scenarios, in the order Run plays them by default
// with several hosts: a host dies while the backends are as they were
// when the connections began. After a backend change, the flows a dead
// host carried and whose ring slot changed would land on another backend
// (no host shares its connection table yet).
var HostNames = []string{"steady", "hostkill", "kill", "drain", "scaleout"}

// Options say what to play. Run checks none of them: the CLI does.
type Options struct {
	Backends  int           // backends at the start (2..lab.MaxBackends-1; scaleout adds one)
	Hosts     int           // balancer hosts (1..MaxHosts); 2 or more run a BIRD router with ECMP
	Clients   int           // WebSocket clients, each from an address of its own (1..MaxClients)
	Duration  time.Duration // how long each scenario runs (1s or more)
	Datapath  string        // the daemon's datapath (config.Datapath*)
	Scenarios []string      // among Names (HostNames with Hosts > 1), in order
	Keep      bool          // leave the lab up at the end, until ctx ends
	Exe       string        // the tether binary the hosts run (tether run, tether echo)
	// View, if set, is the live view drawn every second above the lab's
	// last lines (the CLI's "tether top", from the daemon's API); without
	// it each scenario prints one plain line per second.
	View func(ctx context.Context, api *control.Client) (string, error)
}

// liveLog passes the lab's lines through to the terminal and keeps the
// last ones, to redraw them under the live view.
type liveLog struct {
	mu    sync.Mutex
	w     io.Writer
	lines []string
	part  string // an unfinished line
}

const logLines = 12

func (l *liveLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	text := l.part + string(p)
	parts := strings.Split(text, "\n")
	l.part = parts[len(parts)-1]
	l.lines = append(l.lines, parts[:len(parts)-1]...)
	if len(l.lines) > logLines {
		l.lines = l.lines[len(l.lines)-logLines:]
	}
	return l.w.Write(p)
}

// redraw clears the screen and draws view, then the last lines.
func (l *liveLog) redraw(view string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var b strings.Builder
	b.WriteString(clearScreen + view + "\n")
	for _, line := range l.lines {
		b.WriteString(line + "\n")
	}
	io.WriteString(l.w, b.String())
}

// run is a running lab with its daemons and clients.
type run struct {
	w        io.Writer
	o        Options
	l        *lab.Lab
	dir      string // the daemons' files
	hosts    []*balancer
	router   *lab.Host // with Hosts > 1
	bird     *lab.Bird
	backends []*lab.Host          // our copy: the lab's grows with AddBackend
	echoes   map[string]*lab.Proc // by backend name
	mu       sync.Mutex
	names    map[string]string // backend ADDR:PORT -> name, under mu
	clients  []*client
	probes   []netip.Addr // fresh client addresses, consumed by probe
	url      string
	svc      string   // the service's VIP:PORT, as the API names it
	proxied  bool     // the daemons proxy (splice): connections end on a host
	log      *liveLog // with a View
}

// balancer is one balancer host with its daemon.
type balancer struct {
	h      *lab.Host
	n      int // 1, 2, ...
	daemon *lab.Proc
	api    *control.Client
	socket string
	dead   atomic.Bool // killed by hostkill, not started again yet
	pkts   uint64      // packets forwarded, at the last report
	at     time.Time   // of pkts
}

// client is one client address with one WebSocket connection.
type client struct {
	src     netip.Addr
	mu      sync.Mutex
	backend string // of the current or last connection
	up      bool   // connected now
	breaks  int    // connections that broke
}

func (c *client) state() (backend string, up bool, breaks int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.backend, c.up, c.breaks
}

// Run builds a lab, starts the backends, the daemons (and the router) and
// the clients, plays o.Scenarios, writing what happens to w, and removes
// everything (at the end, or when ctx ends; with o.Keep once ctx ends).
// It needs root.
func Run(ctx context.Context, w io.Writer, o Options) (err error) {
	if o.Hosts > 1 {
		if err := lab.BirdAvailable(); err != nil {
			return fmt.Errorf("tether lab --hosts %d runs a BIRD 2 router: %w", o.Hosts, err)
		}
	}
	l, err := lab.New(lab.Options{Backends: o.Backends, Clients: o.Clients + 2*Probes})
	if err != nil {
		return fmt.Errorf("lab: %w (tether lab needs root with network namespaces, bpffs and the ip command: on Debian or Ubuntu, apt-get install iproute2)", err)
	}
	var lg *liveLog
	if o.View != nil {
		lg = &liveLog{w: w}
		w = lg
	}
	r := &run{w: w, o: o, l: l, log: lg, echoes: map[string]*lab.Proc{}, names: map[string]string{},
		backends: slices.Clone(l.Backends), url: "ws://" + netip.AddrPortFrom(l.VIP4, Port).String() + "/chat",
		probes: l.ClientAddrs4[o.Clients:], svc: netip.AddrPortFrom(l.VIP4, Port).String()}
	if r.dir, err = os.MkdirTemp("", "tether-"+l.ID+"-lab-"); err != nil {
		l.Close()
		return err
	}
	defer func() {
		var cerr error
		// The daemons run with --clean: SIGTERM detaches the program and
		// removes its pinned state; Close then removes the rest.
		for _, b := range r.hosts {
			if b.daemon == nil {
				continue
			}
			if e := b.daemon.Stop(); e != nil {
				cerr = errors.Join(cerr, fmt.Errorf("stop the daemon on %s: %w", b.h.Name, e))
			}
		}
		if e := l.Close(); e != nil {
			cerr = errors.Join(cerr, fmt.Errorf("remove the lab: %w", e))
		}
		os.RemoveAll(r.dir)
		err = errors.Join(err, cerr)
		if cerr == nil {
			fmt.Fprintf(w, "lab %s removed: namespaces, processes, bpffs\n", l.ID)
		}
	}()
	r.hosts = []*balancer{{h: l.Balancer, n: 1}}
	for len(r.hosts) < o.Hosts {
		h, err := l.AddBalancer()
		if err != nil {
			return err
		}
		r.hosts = append(r.hosts, &balancer{h: h, n: len(r.hosts) + 1})
	}
	lbs := "lb"
	if o.Hosts > 1 {
		lbs = "lb,lb2,router"
		if o.Hosts > 2 {
			lbs = fmt.Sprintf("lb,lb2..lb%d,router", o.Hosts)
		}
		var hs []*lab.Host
		for _, b := range r.hosts {
			hs = append(hs, b.h)
		}
		if r.router, r.bird, err = l.StartECMPRouter(r.dir, HoldTime, hs...); err != nil {
			return err
		}
	}
	fmt.Fprintf(w, "lab %s: namespaces tether-%s-{client,%s,be1..be%d,wire}, %d clients, %d backends, %v per scenario\n",
		l.ID, l.ID, lbs, o.Backends, o.Clients, o.Backends, o.Duration)
	for _, be := range r.backends {
		if err := r.startEcho(ctx, be); err != nil {
			return err
		}
	}
	for _, b := range r.hosts {
		if err := r.startDaemon(ctx, b); err != nil {
			return err
		}
	}
	if err := r.routeThroughRouter(ctx); err != nil {
		return err
	}
	st, err := r.api().Status(ctx)
	if err != nil {
		return err
	}
	dp := modes(st)
	r.proxied = strings.Contains(dp, config.DatapathSplice)
	for _, b := range r.hosts {
		fmt.Fprintf(w, "daemon on %s pid %d: datapath %s (%s), source affinity, health checks every 500ms\n", b.h.Name, b.daemon.Cmd.Process.Pid, st.Datapath, dp)
	}
	if r.router != nil {
		fmt.Fprintf(w, "router %s (BIRD): the VIP via %s, flows spread by a layer-4 hash; BGP hold time %ds\n", r.router.Addr4, r.hopNames(), HoldTime)
	}

	cctx, stopClients := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		stopClients()
		wg.Wait()
	}()
	for _, src := range l.ClientAddrs4[:o.Clients] {
		c := &client{src: src}
		r.clients = append(r.clients, c)
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.runClient(cctx, c)
		}()
	}
	totalLost := 0
	for _, s := range o.Scenarios {
		lost, err := r.scenario(ctx, s)
		if err != nil {
			if ctx.Err() != nil {
				return errors.New("interrupted")
			}
			return fmt.Errorf("scenario %s: %w", s, err)
		}
		totalLost += lost
	}
	noun := "scenarios"
	if len(o.Scenarios) == 1 {
		noun = "scenario"
	}
	hosts := ""
	if o.Hosts > 1 {
		hosts = fmt.Sprintf(", %d hosts", o.Hosts)
	}
	fmt.Fprintf(w, "summary: %d %s (%s), datapath %s%s, %d clients, %d connections lost in all\n",
		len(o.Scenarios), noun, strings.Join(o.Scenarios, ", "), dp, hosts, o.Clients, totalLost)
	if o.Keep {
		fmt.Fprintf(w, "lab %s kept up until Ctrl-C. Reach it with:\n", l.ID)
		for _, h := range l.Hosts() {
			fmt.Fprintf(w, "  sudo ip netns exec %s bash    # %s %s\n", h.NS, h.Name, h.Addr4)
		}
		for _, b := range r.hosts {
			fmt.Fprintf(w, "  sudo tether --socket %s status    # %s\n", b.socket, b.h.Name)
		}
		fmt.Fprintf(w, "  sudo ip netns exec %s curl -s http://%s/\n", l.Client.NS, netip.AddrPortFrom(l.VIP4, Port))
		<-ctx.Done()
	}
	return nil
}

// first is the first host alive.
func (r *run) first() *balancer {
	for _, b := range r.hosts {
		if !b.dead.Load() {
			return b
		}
	}
	return r.hosts[0]
}

// api is the first host alive's API.
func (r *run) api() *control.Client { return r.first().api }

// eachAPI calls f with the API of every host alive: a change to the
// backends is made on every host, as an operator does.
func (r *run) eachAPI(f func(*control.Client) error) error {
	for _, b := range r.hosts {
		if b.dead.Load() {
			continue
		}
		if err := f(b.api); err != nil {
			return fmt.Errorf("%s: %w", b.h.Name, err)
		}
	}
	return nil
}

// routeThroughRouter routes the clients' traffic to the VIP through the
// router, once its kernel has the route through every host alive (with
// one host, the clients reach it directly).
func (r *run) routeThroughRouter(ctx context.Context) error {
	if r.router == nil {
		return nil
	}
	if err := r.awaitHops(ctx, 15*time.Second); err != nil {
		return err
	}
	return r.l.Client.Run("ip", "route", "replace", r.l.VIP4.String()+"/32", "via", r.router.Addr4.String())
}

// awaitHops waits until the router's kernel routes the VIP through every
// host alive, and through no other.
func (r *run) awaitHops(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		out, err := r.router.Command("ip", "route", "show", r.l.VIP4.String()+"/32").Output()
		ok := err == nil
		for _, b := range r.hosts {
			ok = ok && strings.Contains(string(out), "via "+b.h.Addr4.String()+" ") != b.dead.Load()
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the router does not route the VIP through %s after %v: %q", r.hopNames(), timeout, strings.TrimSpace(string(out)))
		}
		if err := sleepCtx(ctx, 20*time.Millisecond); err != nil {
			return err
		}
	}
}

// hopNames names the hosts alive.
func (r *run) hopNames() string {
	var names []string
	for _, b := range r.hosts {
		if !b.dead.Load() {
			names = append(names, b.h.Name)
		}
	}
	return strings.Join(names, ", ")
}

// labDatapath names the modes in force, from the daemon's status.
func modes(st control.Status) string {
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(st.Interfaces)) {
		parts = append(parts, k+": "+st.Interfaces[k])
	}
	return strings.Join(parts, ", ")
}

// startEcho runs `tether echo` on be, on both VIPs and its own address.
func (r *run) startEcho(ctx context.Context, be *lab.Host) error {
	p, err := StartEcho(ctx, r.o.Exe, be, r.l.VIP4, r.l.VIP6, be.Addr4, be.Addr6)
	if p != nil {
		r.echoes[be.Name] = p
	}
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.names[netip.AddrPortFrom(be.Addr4, Port).String()] = be.Name
	r.mu.Unlock()
	return nil
}

// StartEcho runs `exe echo` (a WebSocket echo server named after be) on
// be, listening on port Port of addrs, and waits until it serves. The
// process is returned when it started, also with an error: the caller
// stops it.
func StartEcho(ctx context.Context, exe string, be *lab.Host, addrs ...netip.Addr) (*lab.Proc, error) {
	args := []string{"echo", "--name", be.Name}
	for _, a := range addrs {
		args = append(args, "--listen", netip.AddrPortFrom(a, Port).String())
	}
	p, err := be.Start(exe, args...)
	if err != nil {
		return nil, err
	}
	return p, p.WaitOutput(ctx, "tether echo on "+be.Name, "ready", 10*time.Second)
}

// HostConfig is the configuration of balancer host h of lab l: the lab's
// service (the IPv4 VIP, port Port, source affinity, WebSocket health
// checks every 500ms) on backends, with datapath; with a router, a bgp
// block that peers with it (IPv4 and IPv6, hold time HoldTime).
func HostConfig(l *lab.Lab, h *lab.Host, backends []*lab.Host, datapath string, router *lab.Host) *config.Config {
	cfg := config.Default()
	cfg.Interfaces = []string{"eth0"}
	cfg.Datapath = datapath
	s := config.DefaultService()
	s.Name, s.VIP, s.Port = ServiceName, l.VIP4, Port
	s.Affinity, s.AffinityTimeout = config.AffinitySource, time.Hour
	s.Health = health.Check{Type: health.TypeWebSocket, Path: "/health", Send: "ping",
		Interval: 500 * time.Millisecond, Timeout: 300 * time.Millisecond, Rise: 2, Fall: 2}.Defaults()
	for _, be := range backends {
		s.Backends = append(s.Backends, config.Backend{Address: be.Addr4, Port: Port, Weight: 1, State: config.StateActive})
	}
	cfg.Services = []config.Service{s}
	if router != nil {
		cfg.BGP = &config.BGP{ASN: lab.BalancerAS, RouterID: h.Addr4, ReannounceDelay: time.Second,
			GracefulRestart: config.DefaultGracefulRestart}
		for _, a := range []netip.Addr{router.Addr4, router.Addr6} {
			cfg.BGP.Peers = append(cfg.BGP.Peers, config.BGPPeer{Address: a, ASN: lab.RouterAS,
				Port: config.DefaultBGPPort, HoldTime: HoldTime * time.Second})
		}
	}
	return cfg
}

// startDaemon writes b's configuration (HostConfig, with the backends the
// lab has now) and runs tether on b until it reports ready.
func (r *run) startDaemon(ctx context.Context, b *balancer) error {
	cfg := HostConfig(r.l, b.h, r.backends, r.o.Datapath, r.router)
	data, err := cfg.Marshal()
	if err != nil {
		return err
	}
	path := filepath.Join(r.dir, b.h.Name+".yaml")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		return err
	}
	b.socket = filepath.Join(r.dir, b.h.Name+".sock")
	p, err := b.h.Start(r.o.Exe, "run", "--config", path, "--socket", b.socket,
		"--pin-dir", b.pinDir(r.l), "--clean")
	if err != nil {
		return err
	}
	b.daemon = p
	if b.api == nil {
		b.api = control.NewClient(b.socket) // the same socket after a restart
	}
	b.dead.Store(false)
	return p.WaitOutput(ctx, "tether run on "+b.h.Name, "msg=ready", 15*time.Second)
}

// pinDir is where b's daemon pins its state, in the lab's bpffs.
func (b *balancer) pinDir(l *lab.Lab) string {
	if b.n == 1 {
		return filepath.Join(l.BPFFS, "tether")
	}
	return filepath.Join(l.BPFFS, "tether-"+b.h.Name)
}

// runClient keeps one connection from c.src, echoing every echoEvery
// and reconnecting when it breaks, until ctx ends.
func (r *run) runClient(ctx context.Context, c *client) {
	var ws *lab.WSClient
	defer func() {
		if ws != nil {
			ws.Close()
		}
	}()
	tick := time.NewTicker(echoEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if ws == nil {
			dctx, cancel := context.WithTimeout(ctx, dialTimeout)
			nws, err := lab.DialWS(dctx, r.l.Client, c.src, r.url)
			cancel()
			if err != nil {
				continue // again at the next tick
			}
			ws = nws
			c.mu.Lock()
			c.backend, c.up = ws.Backend(), true
			c.mu.Unlock()
			continue
		}
		ectx, cancel := context.WithTimeout(ctx, echoTimeout)
		_, err := ws.Echo(ectx, "hello")
		cancel()
		if err == nil {
			continue
		}
		if ctx.Err() != nil {
			return
		}
		ws.Close()
		ws = nil
		c.mu.Lock()
		c.up = false
		c.breaks++
		c.mu.Unlock()
	}
}

// snapshot returns each client's backend and breaks.
func (r *run) snapshot() (backends []string, breaks []int) {
	for _, c := range r.clients {
		b, _, n := c.state()
		backends = append(backends, b)
		breaks = append(breaks, n)
	}
	return backends, breaks
}

// waitConnected waits (up to timeout) until every client is connected.
func (r *run) waitConnected(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		n := 0
		for _, c := range r.clients {
			if _, up, _ := c.state(); up {
				n++
			}
		}
		if n == len(r.clients) {
			return nil
		}
		if err := sleepCtx(ctx, 50*time.Millisecond); err != nil {
			return err
		}
	}
	return nil // the scenario line will show it
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// waitState waits (up to timeout) until every host alive reports
// backend be in state.
func (r *run) waitState(ctx context.Context, be *lab.Host, state string, timeout time.Duration) error {
	addr := netip.AddrPortFrom(be.Addr4, Port).String()
	deadline := time.Now().Add(timeout)
	for {
		err := r.eachAPI(func(api *control.Client) error {
			svcs, err := api.Services(ctx, r.svc)
			if err != nil || len(svcs) == 0 {
				return fmt.Errorf("no service %s: %v", r.svc, err)
			}
			for _, b := range svcs[0].Backends {
				if b.Address == addr && b.State == state {
					return nil
				}
			}
			return fmt.Errorf("%s is not %s after %v", be.Name, state, timeout)
		})
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		if err := sleepCtx(ctx, 50*time.Millisecond); err != nil {
			return err
		}
	}
}

// probe opens one new connection from each of the next n fresh client
// addresses, echoes once and closes it; it returns the backends reached.
func (r *run) probe(ctx context.Context, n int) (map[string]int, int) {
	got := map[string]int{}
	srcs := r.probes[:min(n, len(r.probes))]
	r.probes = r.probes[len(srcs):]
	for _, src := range srcs {
		dctx, cancel := context.WithTimeout(ctx, dialTimeout)
		ws, err := lab.DialWS(dctx, r.l.Client, src, r.url)
		if err == nil {
			if be, err := ws.Echo(dctx, "probe"); err == nil {
				got[be]++
			}
			ws.Close()
		}
		cancel()
	}
	return got, len(srcs)
}

// report prints the backends' lines every second until ctx ends.
func (r *run) report(ctx context.Context, name string, start time.Time) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if r.o.View != nil {
			r.drawView(ctx, name, start)
			continue
		}
		hosts := r.hostsLine(ctx)
		svcs, err := r.api().Services(ctx, r.svc)
		if err != nil || len(svcs) == 0 {
			continue
		}
		total := 0
		for _, b := range svcs[0].Backends {
			total += b.ActiveConnections
		}
		up := 0
		for _, c := range r.clients {
			if _, ok, _ := c.state(); ok {
				up++
			}
		}
		var line strings.Builder
		fmt.Fprintf(&line, "  %-8s %3.0fs  clients %d/%d connected |", name, time.Since(start).Seconds(), up, len(r.clients))
		for _, b := range svcs[0].Backends {
			share := 0.0
			if total > 0 {
				share = 100 * float64(b.ActiveConnections) / float64(total)
			}
			r.mu.Lock()
			n := r.names[b.Address]
			r.mu.Unlock()
			if n == "" {
				n = b.Address
			}
			fmt.Fprintf(&line, " %s %s/%s %d conns %.0f%% |", n, b.State, b.Health.State, b.ActiveConnections, share)
		}
		fmt.Fprintln(r.w, strings.TrimSuffix(line.String(), " |"))
		if hosts != "" {
			fmt.Fprintf(r.w, "  %-8s %3.0fs  %s\n", name, time.Since(start).Seconds(), hosts)
		}
	}
}

// hostsLine says, with several hosts, what each carries: whether it is
// alive and announces the VIP, and the packets per second it forwarded
// since the last call (the router's share).
func (r *run) hostsLine(ctx context.Context) string {
	if len(r.hosts) < 2 {
		return ""
	}
	parts := []string{"hosts:"}
	for _, b := range r.hosts {
		if b.dead.Load() {
			parts = append(parts, b.h.Name+" dead |")
			continue
		}
		var pkts uint64
		st, err := b.api.Stats(ctx)
		status, serr := b.api.Status(ctx)
		if err != nil || serr != nil {
			parts = append(parts, b.h.Name+" (no answer) |")
			continue
		}
		for _, s := range st.Services {
			pkts += s.Packets
		}
		route := "withdrawn"
		if status.BGP != nil && len(status.BGP.Announced) > 0 {
			route = "announced"
		}
		rate := 0.0
		now := time.Now()
		if !b.at.IsZero() && pkts >= b.pkts {
			rate = float64(pkts-b.pkts) / now.Sub(b.at).Seconds()
		}
		b.pkts, b.at = pkts, now
		parts = append(parts, fmt.Sprintf("%s %s %.0f pkt/s |", b.h.Name, route, rate))
	}
	return strings.TrimSuffix(strings.Join(parts, " "), " |")
}

// connected counts the clients connected now.
func (r *run) connected() int {
	up := 0
	for _, c := range r.clients {
		if _, ok, _ := c.state(); ok {
			up++
		}
	}
	return up
}

// drawView redraws the live view from the daemon's status and counters,
// with the lab's last lines below it.
func (r *run) drawView(ctx context.Context, name string, start time.Time) {
	view, err := r.o.View(ctx, r.api())
	if err != nil {
		return
	}
	// Backends by lab name, for the header.
	r.mu.Lock()
	names := make([]string, 0, len(r.names))
	for addr, n := range r.names {
		names = append(names, n+"="+addr)
	}
	r.mu.Unlock()
	slices.Sort(names)
	head := fmt.Sprintf("tether lab %s: scenario %s %.0fs/%s, clients %d/%d connected (Ctrl-C to stop)\nbackends %s\n",
		r.l.ID, name, time.Since(start).Seconds(), r.o.Duration, r.connected(), len(r.clients), strings.Join(names, " "))
	if hosts := r.hostsLine(ctx); hosts != "" {
		head += hosts + " (the view below is " + r.first().h.Name + "'s)\n"
	}
	r.log.redraw(head + view)
}

// scenario plays one scenario for the duration and prints its line; it
// returns the connections lost.
func (r *run) scenario(ctx context.Context, name string) (int, error) {
	if err := r.waitConnected(ctx, 10*time.Second); err != nil {
		return 0, err
	}
	start := time.Now()
	end := start.Add(r.o.Duration)
	rctx, stopReport := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		r.report(rctx, name, start)
	}()
	defer func() {
		stopReport()
		wg.Wait()
	}()
	before, breaks0 := r.snapshot()
	n := len(r.backends)
	var detail string
	var err error
	switch name {
	case "steady":
		detail = "theory: 0 lost, 0 moved"
	case "kill":
		detail, err = r.kill(ctx, before)
	case "drain":
		detail, err = r.drain(ctx, start)
	case "scaleout":
		detail, err = r.scaleout(ctx, n)
	case "hostkill":
		detail, err = r.hostkill(ctx, start)
	}
	if err != nil {
		return 0, err
	}
	if err := sleepCtx(ctx, time.Until(end)); err != nil {
		return 0, err
	}
	if err := r.waitConnected(ctx, 5*time.Second); err != nil {
		return 0, err
	}
	after, breaks1 := r.snapshot()
	lost, changed := 0, 0
	for i := range r.clients {
		lost += breaks1[i] - breaks0[i]
		if before[i] != "" && after[i] != before[i] {
			changed++
		}
	}
	stopReport()
	wg.Wait()
	fmt.Fprintf(r.w, "%s: %d connections lost, %d/%d clients changed backend; %s\n", name, lost, changed, len(r.clients), detail)
	return lost, nil
}

// kill kills backend 2's echo process, waits until the daemon takes it
// down, starts it again and waits until it is back.
func (r *run) kill(ctx context.Context, before []string) (string, error) {
	be := r.backends[1]
	on := 0
	for _, b := range before {
		if b == be.Name {
			on++
		}
	}
	if err := r.echoes[be.Name].Kill(); err != nil {
		return "", err
	}
	if err := r.waitState(ctx, be, "down", 10*time.Second); err != nil {
		return "", err
	}
	if err := r.waitConnected(ctx, 10*time.Second); err != nil {
		return "", err
	}
	if err := r.startEcho(ctx, be); err != nil {
		return "", err
	}
	if err := r.waitState(ctx, be, config.StateActive, 10*time.Second); err != nil {
		return "", err
	}
	n := len(r.backends)
	return fmt.Sprintf("theory: the clients of %s move, %d/%d here, ≈ 1/%d = %.0f%%", be.Name, on, len(r.clients), n, 100/float64(n)), nil
}

// drain drains backend 1 through the API, probes new connections, and
// undrains it half-way through the scenario.
func (r *run) drain(ctx context.Context, start time.Time) (string, error) {
	be := r.backends[0]
	spec := control.BackendStateSpec{Service: r.svc, Backend: netip.AddrPortFrom(be.Addr4, Port).String(), State: config.StateDraining}
	if err := r.eachAPI(func(api *control.Client) error { _, err := api.SetBackendState(ctx, spec); return err }); err != nil {
		return "", err
	}
	got, n := r.probe(ctx, Probes)
	if err := sleepCtx(ctx, time.Until(start.Add(r.o.Duration/2))); err != nil {
		return "", err
	}
	spec.State = config.StateActive
	if err := r.eachAPI(func(api *control.Client) error { _, err := api.SetBackendState(ctx, spec); return err }); err != nil {
		return "", err
	}
	return fmt.Sprintf("new connections while drained: %d/%d on %s, %d elsewhere (theory: 0 lost, 0 moved, 0 new on %s)",
		got[be.Name], n, be.Name, n-got[be.Name], be.Name), nil
}

// scaleout adds a backend to the lab and to the daemon, then probes new
// connections.
func (r *run) scaleout(ctx context.Context, n int) (string, error) {
	be, err := r.l.AddBackend()
	if err != nil {
		return "", err
	}
	r.backends = append(r.backends, be)
	if err := r.startEcho(ctx, be); err != nil {
		return "", err
	}
	spec := control.BackendSpec{Service: r.svc, Backend: netip.AddrPortFrom(be.Addr4, Port).String()}
	if err := r.eachAPI(func(api *control.Client) error { _, err := api.AddBackend(ctx, spec); return err }); err != nil {
		return "", err
	}
	if err := r.waitState(ctx, be, config.StateActive, 10*time.Second); err != nil {
		return "", err
	}
	got, probes := r.probe(ctx, Probes)
	return fmt.Sprintf("new clients' choices moved to %s: %d/%d (theory: existing 0 lost, ≈ 1/%d = %.0f%% of new choices move)",
		be.Name, got[be.Name], probes, n+1, 100/float64(n+1)), nil
}

// hostkill kills host 1 as a machine dies: its link goes down first (no
// word to the router), then its daemon gets SIGKILL and its XDP program
// is detached. The router's session times out within the hold time and
// the flows host 1 carried reach the other hosts, whose rings give them
// the backends they had. Half-way through the scenario host 1 comes back
// with a fresh daemon (nothing pinned): it announces the VIP again and
// the router gives it a share of the flows, old and new.
func (r *run) hostkill(ctx context.Context, start time.Time) (string, error) {
	b := r.hosts[0]
	if err := r.l.SetLink(b.h, false); err != nil {
		return "", err
	}
	died := time.Now()
	b.dead.Store(true)
	if err := b.daemon.Kill(); err != nil {
		return "", err
	}
	if out, err := b.h.Command(r.o.Exe, "detach", "--pin-dir", b.pinDir(r.l)).CombinedOutput(); err != nil {
		return "", fmt.Errorf("tether detach on %s: %v: %s", b.h.Name, err, out)
	}
	if err := r.awaitHops(ctx, 3*HoldTime*time.Second); err != nil {
		return "", err
	}
	gone := time.Since(died)
	if err := sleepCtx(ctx, time.Until(start.Add(r.o.Duration/2))); err != nil {
		return "", err
	}
	if err := r.l.SetLink(b.h, true); err != nil {
		return "", err
	}
	started := time.Now()
	if err := r.startDaemon(ctx, b); err != nil {
		return "", err
	}
	if err := r.awaitHops(ctx, 15*time.Second); err != nil {
		return "", err
	}
	theory := "theory: 0 lost, 0 moved: the other hosts' rings give the flows " + b.h.Name + " carried the backends they had"
	if r.proxied {
		theory = "theory: the connections " + b.h.Name + " proxied end with it (splice holds them on the host); their clients reconnect to the backend they had"
	}
	return fmt.Sprintf("%s died (link down, daemon SIGKILL, XDP detached): the router withdrew it after %v (hold time %ds); started again, routed through %v later; %s",
		b.h.Name, gone.Round(100*time.Millisecond), HoldTime, time.Since(started).Round(100*time.Millisecond), theory), nil
}
