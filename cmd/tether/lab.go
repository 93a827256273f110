package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/lab"
)

// The lab's service and how its clients behave.
const (
	labPort        = 8765
	labService     = "chat"
	labEchoEvery   = 200 * time.Millisecond // one echo per client and period
	labEchoTimeout = time.Second            // an echo that takes longer breaks the connection
	labDialTimeout = 2 * time.Second
	labProbes      = 20 // fresh client addresses per scenario that probes new connections
	labHealth      = "{type: websocket, path: /health, send: ping, interval: 500ms, timeout: 300ms, rise: 2, fall: 2}"
)

var labScenarios = []string{"steady", "kill", "drain", "scaleout"}

var labCommand = &cli.Command{
	Name:  "lab",
	Usage: "watch tether do its job on a throwaway lab of network namespaces (root)",
	Description: `lab builds a lab of network namespaces on this machine (a client, a
balancer, backends, joined by a bridge; documentation addresses only, the
machine's own interfaces untouched), starts a WebSocket echo backend on each
backend, "tether run" on the balancer (source affinity, health checks every
500ms) and WebSocket clients that echo every 200ms and reconnect when their
connection breaks. It then plays scenarios, each for --duration:

  steady    nothing happens: no connection is lost, no client moves
  kill      backend 2's process is killed, then started again: its clients
            (about 1/N) reconnect elsewhere, the others stay
  drain     backend 1 is drained through the API, then undrained: no
            connection is lost, new clients go elsewhere
  scaleout  a backend is added: existing connections stay, about 1/(N+1)
            of new clients' choices move to it

On a terminal it shows the live view of "tether top", redrawn every second
from the daemon's API (per backend its state, health, active connections,
share as a bar, packets/s and bytes/s; per service new connections/s and
affinity hits and misses; packets not forwarded by reason; the datapath
mode), with the lab's lines below it. Without a terminal, or with --no-tty,
it prints every second one plain line per scenario with each backend's
state, active connections from the daemon's status and share. After each
scenario it prints one line with the connections lost, the clients that
changed backend, and what theory expects.

Everything is removed at the end, or on Ctrl-C; --keep leaves the lab up
until Ctrl-C and prints how to reach it. It needs root.`,
	Flags: []cli.Flag{
		&cli.IntFlag{Name: "backends", Value: lab.DefaultBackends, Usage: "backends at the start (scaleout adds one)"},
		&cli.IntFlag{Name: "clients", Value: 30, Usage: "WebSocket clients, each from an address of its own"},
		&cli.DurationFlag{Name: "duration", Value: 10 * time.Second, Usage: "how long each scenario runs"},
		&cli.StringFlag{Name: "datapath", Value: config.DatapathAuto, Usage: "the daemon's datapath: auto (XDP when possible, else splice), xdp, xdp-generic or splice"},
		&cli.StringFlag{Name: "scenario", Usage: "play only `NAME`: steady, kill, drain or scaleout (default: all, in that order)"},
		&cli.BoolFlag{Name: "keep", Usage: "leave the lab up at the end, print how to reach it, and wait for Ctrl-C"},
		&cli.BoolFlag{Name: "no-tty", Usage: "plain periodic lines instead of the live view, even on a terminal"},
	},
	Action: func(c *cli.Context) error {
		if _, done, err := args(c, 0, 0, ""); done || err != nil {
			return err
		}
		o := labOptions{
			backends: c.Int("backends"), clients: c.Int("clients"), duration: c.Duration("duration"),
			datapath: c.String("datapath"), keep: c.Bool("keep"),
		}
		if tty, _ := terminal(c.App.Writer); tty && !c.Bool("no-tty") {
			o.live = true
		}
		switch {
		case o.backends < 2 || o.backends > lab.MaxBackends-1:
			return usagef("lab: --backends must be 2 to %d, got %d", lab.MaxBackends-1, o.backends)
		case o.clients < 1 || o.clients > lab.MaxClients-2*labProbes:
			return usagef("lab: --clients must be 1 to %d, got %d", lab.MaxClients-2*labProbes, o.clients)
		case o.duration < time.Second:
			return usagef("lab: --duration must be at least 1s, got %v", o.duration)
		}
		if err := config.CheckDatapath(o.datapath); err != nil {
			return usagef("lab: --datapath: %v", err)
		}
		o.scenarios = labScenarios
		if s := c.String("scenario"); s != "" {
			if !slices.Contains(labScenarios, s) {
				return usagef("lab: --scenario %q is not one of %s", s, strings.Join(labScenarios, ", "))
			}
			o.scenarios = []string{s}
		}
		if os.Geteuid() != 0 {
			return errors.New("tether lab needs root: run sudo tether lab")
		}
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("lab: the tether binary to run in the lab: %w", err)
		}
		o.exe = exe
		ctx, stop := signal.NotifyContext(c.Context, syscall.SIGINT, syscall.SIGTERM)
		defer stop()
		return runLab(ctx, c.App.Writer, o)
	},
}

type labOptions struct {
	backends, clients int
	duration          time.Duration
	datapath          string
	scenarios         []string
	keep              bool
	live              bool // draw the live view (on a terminal)
	exe               string
}

// labLog passes the lab's lines through to the terminal and keeps the
// last ones, to redraw them under the live view.
type labLog struct {
	mu    sync.Mutex
	w     io.Writer
	lines []string
	part  string // an unfinished line
}

const labLogLines = 12

func (l *labLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	text := l.part + string(p)
	parts := strings.Split(text, "\n")
	l.part = parts[len(parts)-1]
	l.lines = append(l.lines, parts[:len(parts)-1]...)
	if len(l.lines) > labLogLines {
		l.lines = l.lines[len(l.lines)-labLogLines:]
	}
	return l.w.Write(p)
}

// redraw clears the screen and draws view, then the last lines.
func (l *labLog) redraw(view string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var b strings.Builder
	b.WriteString(clearScreen + view + "\n")
	for _, line := range l.lines {
		b.WriteString(line + "\n")
	}
	io.WriteString(l.w, b.String())
}

// labRun is a running lab with its daemon and clients.
type labRun struct {
	w        io.Writer
	o        labOptions
	l        *lab.Lab
	api      *control.Client
	daemon   *lab.Proc
	backends []*lab.Host          // our copy: the lab's grows with AddBackend
	echoes   map[string]*lab.Proc // by backend name
	mu       sync.Mutex
	names    map[string]string // backend ADDR:PORT -> name, under mu
	clients  []*labClient
	probes   []netip.Addr // fresh client addresses, consumed by probe
	url      string
	svc      string       // the service's VIP:PORT, as the API names it
	log      *labLog      // with o.live
	prevView viewSnapshot // the live view's last snapshot
}

// labClient is one client address with one WebSocket connection.
type labClient struct {
	src     netip.Addr
	mu      sync.Mutex
	backend string // of the current or last connection
	up      bool   // connected now
	breaks  int    // connections that broke
}

func (c *labClient) state() (backend string, up bool, breaks int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.backend, c.up, c.breaks
}

func runLab(ctx context.Context, w io.Writer, o labOptions) (err error) {
	l, err := lab.New(lab.Options{Backends: o.backends, Clients: o.clients + 2*labProbes})
	if err != nil {
		return fmt.Errorf("lab: %w (tether lab needs root with network namespaces, bpffs and the ip command: on Debian or Ubuntu, apt-get install iproute2)", err)
	}
	var lg *labLog
	if o.live {
		lg = &labLog{w: w}
		w = lg
	}
	r := &labRun{w: w, o: o, l: l, log: lg, echoes: map[string]*lab.Proc{}, names: map[string]string{},
		backends: slices.Clone(l.Backends), url: "ws://" + netip.AddrPortFrom(l.VIP4, labPort).String() + "/chat",
		probes: l.ClientAddrs4[o.clients:], svc: netip.AddrPortFrom(l.VIP4, labPort).String()}
	dir, err := os.MkdirTemp("", "tether-"+l.ID+"-lab-")
	if err != nil {
		l.Close()
		return err
	}
	defer func() {
		var cerr error
		// The daemon runs with --clean: SIGTERM detaches the program and
		// removes its pinned state; Close then removes the rest.
		if r.daemon != nil {
			if e := r.daemon.Stop(); e != nil {
				cerr = fmt.Errorf("stop the daemon: %w", e)
			}
		}
		if e := l.Close(); e != nil {
			cerr = errors.Join(cerr, fmt.Errorf("remove the lab: %w", e))
		}
		os.RemoveAll(dir)
		err = errors.Join(err, cerr)
		if cerr == nil {
			fmt.Fprintf(w, "lab %s removed: namespaces, processes, bpffs\n", l.ID)
		}
	}()
	fmt.Fprintf(w, "lab %s: namespaces tether-%s-{client,lb,be1..be%d,wire}, %d clients, %d backends, %v per scenario\n",
		l.ID, l.ID, o.backends, o.clients, o.backends, o.duration)
	for _, be := range r.backends {
		if err := r.startEcho(ctx, be); err != nil {
			return err
		}
	}
	socket := filepath.Join(dir, "tether.sock")
	if err := r.startDaemon(ctx, dir, socket); err != nil {
		return err
	}
	st, err := r.api.Status(ctx)
	if err != nil {
		return err
	}
	dp := labDatapath(st)
	fmt.Fprintf(w, "daemon pid %d: datapath %s (%s), source affinity, health checks every 500ms\n", r.daemon.Cmd.Process.Pid, st.Datapath, dp)

	cctx, stopClients := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		stopClients()
		wg.Wait()
	}()
	for _, src := range l.ClientAddrs4[:o.clients] {
		c := &labClient{src: src}
		r.clients = append(r.clients, c)
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.runClient(cctx, c)
		}()
	}
	totalLost := 0
	for _, s := range o.scenarios {
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
	if len(o.scenarios) == 1 {
		noun = "scenario"
	}
	fmt.Fprintf(w, "summary: %d %s (%s), datapath %s, %d clients, %d connections lost in all\n",
		len(o.scenarios), noun, strings.Join(o.scenarios, ", "), dp, o.clients, totalLost)
	if o.keep {
		fmt.Fprintf(w, "lab %s kept up until Ctrl-C. Reach it with:\n", l.ID)
		for _, h := range l.Hosts() {
			fmt.Fprintf(w, "  sudo ip netns exec %s bash    # %s %s\n", h.NS, h.Name, h.Addr4)
		}
		fmt.Fprintf(w, "  sudo tether --socket %s status\n", socket)
		fmt.Fprintf(w, "  sudo ip netns exec %s curl -s http://%s/\n", l.Client.NS, netip.AddrPortFrom(l.VIP4, labPort))
		<-ctx.Done()
	}
	return nil
}

// labDatapath names the modes in force, from the daemon's status.
func labDatapath(st control.Status) string {
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(st.Interfaces)) {
		parts = append(parts, k+": "+st.Interfaces[k])
	}
	return strings.Join(parts, ", ")
}

// waitOutput waits until p's output holds s.
func waitOutput(ctx context.Context, p *lab.Proc, what, s string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for !strings.Contains(p.Output(), s) {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-p.Done():
			return fmt.Errorf("%s exited (%v):\n%s", what, p.Err(), p.Output())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s is not ready after %v:\n%s", what, timeout, p.Output())
		}
	}
	return nil
}

// startEcho runs `tether echo` on be, on both VIPs and its own address.
func (r *labRun) startEcho(ctx context.Context, be *lab.Host) error {
	args := []string{"echo", "--name", be.Name}
	for _, a := range []netip.Addr{r.l.VIP4, r.l.VIP6, be.Addr4, be.Addr6} {
		args = append(args, "--listen", netip.AddrPortFrom(a, labPort).String())
	}
	p, err := be.Start(r.o.exe, args...)
	if err != nil {
		return err
	}
	r.echoes[be.Name] = p
	r.mu.Lock()
	r.names[netip.AddrPortFrom(be.Addr4, labPort).String()] = be.Name
	r.mu.Unlock()
	return waitOutput(ctx, p, "tether echo on "+be.Name, "ready", 10*time.Second)
}

func (r *labRun) startDaemon(ctx context.Context, dir, socket string) error {
	var b strings.Builder
	fmt.Fprintf(&b, "interfaces: [eth0]\ndatapath: %s\nservices:\n", r.o.datapath)
	fmt.Fprintf(&b, "  - name: %s\n    vip: %s\n    port: %d\n    affinity: source\n    affinity_timeout: 1h\n    health: %s\n    backends:\n",
		labService, r.l.VIP4, labPort, labHealth)
	for _, be := range r.backends {
		fmt.Fprintf(&b, "      - address: %s\n", be.Addr4)
	}
	path := filepath.Join(dir, "tether.yaml")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		return err
	}
	p, err := r.l.Balancer.Start(r.o.exe, "run", "--config", path, "--socket", socket,
		"--pin-dir", filepath.Join(r.l.BPFFS, "tether"), "--clean")
	if err != nil {
		return err
	}
	r.daemon = p
	r.api = control.NewClient(socket)
	return waitOutput(ctx, p, "tether run", "msg=ready", 15*time.Second)
}

// runClient keeps one connection from c.src, echoing every labEchoEvery
// and reconnecting when it breaks, until ctx ends.
func (r *labRun) runClient(ctx context.Context, c *labClient) {
	var ws *lab.WSClient
	defer func() {
		if ws != nil {
			ws.Close()
		}
	}()
	tick := time.NewTicker(labEchoEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if ws == nil {
			dctx, cancel := context.WithTimeout(ctx, labDialTimeout)
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
		ectx, cancel := context.WithTimeout(ctx, labEchoTimeout)
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
func (r *labRun) snapshot() (backends []string, breaks []int) {
	for _, c := range r.clients {
		b, _, n := c.state()
		backends = append(backends, b)
		breaks = append(breaks, n)
	}
	return backends, breaks
}

// waitConnected waits (up to timeout) until every client is connected.
func (r *labRun) waitConnected(ctx context.Context, timeout time.Duration) error {
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

// waitState waits (up to timeout) until the daemon reports backend be in
// state.
func (r *labRun) waitState(ctx context.Context, be *lab.Host, state string, timeout time.Duration) error {
	addr := netip.AddrPortFrom(be.Addr4, labPort).String()
	deadline := time.Now().Add(timeout)
	for {
		svcs, err := r.api.Services(ctx, r.svc)
		if err == nil && len(svcs) > 0 {
			for _, b := range svcs[0].Backends {
				if b.Address == addr && b.State == state {
					return nil
				}
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s is not %s after %v", be.Name, state, timeout)
		}
		if err := sleepCtx(ctx, 50*time.Millisecond); err != nil {
			return err
		}
	}
}

// probe opens one new connection from each of the next n fresh client
// addresses, echoes once and closes it; it returns the backends reached.
func (r *labRun) probe(ctx context.Context, n int) (map[string]int, int) {
	got := map[string]int{}
	srcs := r.probes[:min(n, len(r.probes))]
	r.probes = r.probes[len(srcs):]
	for _, src := range srcs {
		dctx, cancel := context.WithTimeout(ctx, labDialTimeout)
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
func (r *labRun) report(ctx context.Context, name string, start time.Time) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if r.o.live {
			r.drawView(ctx, name, start)
			continue
		}
		svcs, err := r.api.Services(ctx, r.svc)
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
	}
}

// connected counts the clients connected now.
func (r *labRun) connected() int {
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
func (r *labRun) drawView(ctx context.Context, name string, start time.Time) {
	cur, err := takeSnapshot(ctx, r.api)
	if err != nil {
		return
	}
	var elapsed time.Duration
	if !r.prevView.At.IsZero() {
		elapsed = cur.At.Sub(r.prevView.At)
	}
	_, width := terminal(r.log.w)
	// Backends by lab name, for the header.
	r.mu.Lock()
	var names []string
	for _, sv := range cur.Status.Services {
		for _, b := range sv.Backends {
			if n := r.names[b.Address]; n != "" {
				names = append(names, n+"="+b.Address)
			}
		}
	}
	r.mu.Unlock()
	head := fmt.Sprintf("tether lab %s: scenario %s %.0fs/%s, clients %d/%d connected (Ctrl-C to stop)\nbackends %s\n",
		r.l.ID, name, time.Since(start).Seconds(), r.o.duration, r.connected(), len(r.clients), strings.Join(names, " "))
	r.log.redraw(head + renderView(r.prevView, cur, elapsed, width))
	r.prevView = cur
}

// scenario plays one scenario for the duration and prints its line; it
// returns the connections lost.
func (r *labRun) scenario(ctx context.Context, name string) (int, error) {
	if err := r.waitConnected(ctx, 10*time.Second); err != nil {
		return 0, err
	}
	start := time.Now()
	end := start.Add(r.o.duration)
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
func (r *labRun) kill(ctx context.Context, before []string) (string, error) {
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
func (r *labRun) drain(ctx context.Context, start time.Time) (string, error) {
	be := r.backends[0]
	spec := control.BackendStateSpec{Service: r.svc, Backend: netip.AddrPortFrom(be.Addr4, labPort).String(), State: config.StateDraining}
	if _, err := r.api.SetBackendState(ctx, spec); err != nil {
		return "", err
	}
	got, n := r.probe(ctx, labProbes)
	if err := sleepCtx(ctx, time.Until(start.Add(r.o.duration/2))); err != nil {
		return "", err
	}
	spec.State = config.StateActive
	if _, err := r.api.SetBackendState(ctx, spec); err != nil {
		return "", err
	}
	return fmt.Sprintf("new connections while drained: %d/%d on %s, %d elsewhere (theory: 0 lost, 0 moved, 0 new on %s)",
		got[be.Name], n, be.Name, n-got[be.Name], be.Name), nil
}

// scaleout adds a backend to the lab and to the daemon, then probes new
// connections.
func (r *labRun) scaleout(ctx context.Context, n int) (string, error) {
	be, err := r.l.AddBackend()
	if err != nil {
		return "", err
	}
	r.backends = append(r.backends, be)
	if err := r.startEcho(ctx, be); err != nil {
		return "", err
	}
	spec := control.BackendSpec{Service: r.svc, Backend: netip.AddrPortFrom(be.Addr4, labPort).String()}
	if _, err := r.api.AddBackend(ctx, spec); err != nil {
		return "", err
	}
	if err := r.waitState(ctx, be, config.StateActive, 10*time.Second); err != nil {
		return "", err
	}
	got, probes := r.probe(ctx, labProbes)
	return fmt.Sprintf("new clients' choices moved to %s: %d/%d (theory: existing 0 lost, ≈ 1/%d = %.0f%% of new choices move)",
		be.Name, got[be.Name], probes, n+1, 100/float64(n+1)), nil
}
