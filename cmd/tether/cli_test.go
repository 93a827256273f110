package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/datapath"
)

// memDP is a datapath that keeps services in memory and reports one flow
// per backend, for CLI tests without root.
type memDP struct {
	mu       sync.Mutex
	services map[uint32]datapath.Service
}

func (m *memDP) Modes() map[string]string { return map[string]string{"eth0": "xdp"} }
func (m *memDP) UpsertService(s datapath.Service) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.services[s.ID] = s
	return nil
}
func (m *memDP) DeleteService(s datapath.Service) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.services, s.ID)
	return nil
}
func (m *memDP) Counters() (datapath.Counters, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	c := datapath.Counters{
		Services: map[uint32]datapath.ServiceCounters{},
		Backends: map[uint32]datapath.BackendCounters{},
		Reasons:  map[string]uint64{"pass_not_vip": 12, "drop_truncated": 0, "drop_no_backend": 3},
	}
	for _, s := range m.services {
		c.Services[s.ID] = datapath.ServiceCounters{NewConns: uint64(len(s.Backends))}
		for _, b := range s.Backends {
			c.Backends[b.ID] = datapath.BackendCounters{Packets: 1000, Bytes: 1 << 20, NewConns: 1}
		}
	}
	return c, nil
}
func (m *memDP) Flows() ([]datapath.Flow, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []datapath.Flow
	for _, s := range m.services {
		for i, b := range s.Backends {
			out = append(out, datapath.Flow{
				Client:  netip.MustParseAddrPort("192.0.2.10:40000"),
				VIP:     netip.AddrPortFrom(s.VIP, 8765),
				Proto:   s.Proto,
				Service: s.ID,
				Backend: b.ID,
				Closing: i == 1,
			})
		}
	}
	return out, nil
}
func (m *memDP) Close() error { return nil }

// startFake serves the API of a daemon over memDP on a socket in a
// temporary directory and returns the socket and the configuration file.
// It does not probe the backends.
func startFake(t *testing.T, cfgText string) (socket, path string) {
	t.Helper()
	return startFakeDaemon(t, cfgText, false)
}

// startFakeDaemon is startFake, with health checks when probe is set.
func startFakeDaemon(t *testing.T, cfgText string, probe bool) (socket, path string) {
	t.Helper()
	dir := t.TempDir()
	path = filepath.Join(dir, "tether.yaml")
	if err := os.WriteFile(path, []byte(cfgText), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	dp := &memDP{services: map[uint32]datapath.Service{}}
	ctl := control.New(dp, cfg.HashSeed, cfg.Tables.RingSize, cfg.Tables.MaxServices, cfg.Tables.MaxBackends, log)
	if err := ctl.Apply(cfg); err != nil {
		t.Fatal(err)
	}
	socket = filepath.Join(dir, "api.sock")
	ln, err := control.Listen(socket)
	if err != nil {
		t.Fatal(err)
	}
	d := control.NewDaemon(path, cfg, ctl, dp, log)
	if probe {
		if err := d.StartHealth(); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- control.Serve(ctx, ln, d.Handler(), log) }()
	t.Cleanup(func() {
		cancel()
		<-done
		d.Close()
	})
	return socket, path
}

// run runs the CLI in-process and returns its output, error output and
// exit code, as main would.
func run(args ...string) (string, string, int) {
	app := newApp()
	var out, errOut bytes.Buffer
	app.Writer, app.ErrWriter = &out, &errOut
	err := app.Run(append([]string{"tether"}, args...))
	if err == nil {
		return out.String(), errOut.String(), 0
	}
	errOut.WriteString("tether: " + err.Error() + "\n")
	var u usageError
	if errors.As(err, &u) {
		return out.String(), errOut.String(), exitUsage
	}
	return out.String(), errOut.String(), exitFailed
}

const fakeConfig = `interfaces: [eth0]
datapath: xdp
tables: {ring_size: 251}
services:
  - name: chat
    vip: 203.0.113.10
    port: 8765
    affinity_timeout: 1h
    backends:
      - address: 198.51.100.11
      - address: 198.51.100.12
`

func TestCLICommands(t *testing.T) {
	socket, path := startFake(t, fakeConfig)
	for _, tc := range []struct {
		args []string
		code int
		want []string // in the output (code 0) or the error output
	}{
		{[]string{"vip", "ls"}, 0, []string{"NAME", "chat", "203.0.113.10:8765", "2 active", "1h0m0s"}},
		{[]string{"vip", "add", "[2001:db8::10]:8765", "--name", "chat6", "--affinity", "connection"}, 0, []string{"added service chat6 ([2001:db8::10]:8765/tcp)"}},
		{[]string{"backend", "add", "[2001:db8::10]:8765", "2001:db8::11", "--weight", "3"}, 0, []string{"[2001:db8::11]:8765", "weight 3"}},
		{[]string{"backend", "add", "--weight", "0", "[2001:db8::10]:8765", "[2001:db8::12]:8765"}, 0, []string{"weight 0"}},
		{[]string{"backend", "drain", "203.0.113.10:8765", "198.51.100.12"}, 0, []string{"is draining"}},
		{[]string{"backend", "drain", "203.0.113.10:8765", "198.51.100.12"}, 0, []string{"already draining"}},
		{[]string{"backend", "undrain", "[2001:db8::10]:8765", "2001:db8::12"}, 0, []string{"already active"}},
		{[]string{"backend", "ls", "203.0.113.10:8765"}, 0, []string{"chat 203.0.113.10:8765/tcp: up", "HEALTH", "LAST PROBE", "198.51.100.11:8765  active    1       1", "198.51.100.12:8765  draining  1       0"}},
		{[]string{"status"}, 0, []string{"datapath:  xdp (eth0: xdp)", "chat6 [2001:db8::10]:8765/tcp, connection affinity, dsr", "[2001:db8::12]:8765  draining  0",
			"  up; tcp check every 2s (timeout 1s, rise 2, fall 3), on_down keep", "unchecked"}},
		{[]string{"stats"}, 0, []string{"SERVICE", "chat", "198.51.100.11:8765", "1,000", "1.0 MiB", "TRANSITIONS", "pass_not_vip", "drop_no_backend"}},
		{[]string{"flows", "203.0.113.10:8765"}, 0, []string{"192.0.2.10:40000", "198.51.100.12:8765", "closing", "2 flows, 1 closing"}},
		{[]string{"vip", "rm", "[2001:db8::10]:8765/tcp"}, 0, []string{"removed service chat6", "2 backends"}},
		{[]string{"reload"}, 0, []string{"reloaded", "nothing changed"}},
		{[]string{"reload", "--dry-run"}, 0, []string{"would apply: nothing changed"}},
		{[]string{"backend", "set", "203.0.113.10:8765", "198.51.100.11", "--weight", "4"}, 0, []string{"weight 4 (was 1)"}},
		{[]string{"backend", "set", "203.0.113.10:8765", "198.51.100.11"}, 2, []string{"backend set needs --weight N"}},
		{[]string{"backend", "set", "-o", "json", "203.0.113.10:8765", "198.51.100.11", "--weight", "4"}, 0, []string{`"message": "backend 198.51.100.11:8765 of chat (203.0.113.10:8765/tcp) already has weight 4"`}},
		{[]string{"vip", "add", "203.0.113.30:9000", "--protocol", "udp"}, 0, []string{"added service 203.0.113.30-9000-udp"}},
		{[]string{"vip", "add", "203.0.113.30:80", "--health-type", "http", "--health-path", "/healthz", "--health-interval", "1s", "--health-expect-status", "200-204", "--on-down", "reset"}, 0, []string{"added service 203.0.113.30-80"}},
		{[]string{"vip", "add", "203.0.113.30:81", "--health-type", "udp"}, 1, []string{"health.type: a udp check probes over UDP"}},
		{[]string{"vip", "add", "203.0.113.30:82", "--health-rise", "0"}, 2, []string{"--health-rise: 0 is not a count"}},
		{[]string{"vip", "add", "203.0.113.30:83", "--health-expect-status", "2xx"}, 2, []string{"--health-expect-status"}},
		{[]string{"vip", "add", "203.0.113.30:84", "--protocol", "UDP"}, 1, []string{`protocol: unknown protocol "UDP"`}},
		{[]string{"vip", "rm", "-o", "json", "203.0.113.30:9000"}, 0, []string{`"message": "removed service 203.0.113.30-9000-udp`}},
		{[]string{"vip", "rm", "[2001:db8::10]:8765"}, 1, []string{"service: no service [2001:db8::10]:8765"}},
		{[]string{"backend", "add", "203.0.113.10:8765"}, 2, []string{"backend add needs VIP:PORT ADDR[:PORT]"}},
		{[]string{"backend", "add", "203.0.113.10:8765", "198.51.100.13", "--weihgt", "2"}, 2, []string{"weihgt"}},
		{[]string{"backend", "ls", "--bogus", "203.0.113.10:8765"}, 2, []string{"bogus"}},
		{[]string{"status", "-o", "xml"}, 2, []string{`"xml" is not text or json`}},
		{[]string{"flows", "a", "b"}, 2, []string{"flows takes [VIP:PORT[/PROTO]]"}},
		{[]string{"backend"}, 2, []string{"backend needs a subcommand"}},
	} {
		out, errOut, code := run(append([]string{"--socket", socket}, tc.args...)...)
		got := out
		if tc.code != 0 {
			got = errOut
		}
		if code != tc.code {
			t.Errorf("tether %s: exit %d, want %d\n%s%s", strings.Join(tc.args, " "), code, tc.code, out, errOut)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(got, w) {
				t.Errorf("tether %s: output does not hold %q:\n%s", strings.Join(tc.args, " "), w, got)
			}
		}
	}

	// JSON listings decode into the API's types.
	var st control.Status
	out, _, _ := run("--socket", socket, "status", "-o", "json")
	if err := json.Unmarshal([]byte(out), &st); err != nil || st.Config != path || len(st.Services) != 2 {
		t.Errorf("status -o json: %v\n%s", err, out)
	}
	var fl []control.FlowStatus
	out, _, _ = run("--socket", socket, "flows", "-o", "json")
	if err := json.Unmarshal([]byte(out), &fl); err != nil || len(fl) != 2 {
		t.Errorf("flows -o json: %v\n%s", err, out)
	}
	// What vip add's health flags made, as the file says it.
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range cfg.Services {
		if s.Port == 80 && (s.Health.Type != "http" || s.Health.Path != "/healthz" || s.Health.Interval != time.Second || s.Health.ExpectStatus != [2]int{200, 204} || s.OnDown != "reset") {
			t.Errorf("vip add with health flags made %+v, on_down %s", s.Health, s.OnDown)
		}
	}
	// TETHER_SOCKET stands for --socket.
	t.Setenv("TETHER_SOCKET", socket)
	if _, errOut, code := run("vip", "ls"); code != 0 {
		t.Errorf("vip ls with TETHER_SOCKET: exit %d: %s", code, errOut)
	}
}

// TestCLIUnreachable tells apart why the daemon cannot be reached: no
// socket, a path that is no socket, a socket nobody listens on, and one
// that accepts and never answers (within --timeout, not forever).
func TestCLIUnreachable(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(dir, "stale.sock")
	ln, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	mute := filepath.Join(dir, "mute.sock")
	ml, err := net.Listen("unix", mute)
	if err != nil {
		t.Fatal(err)
	}
	defer ml.Close()
	go func() {
		var held []net.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := ml.Accept()
			if err != nil {
				return
			}
			held = append(held, c) // accepted, never answered
		}
	}()
	for _, tc := range []struct {
		socket string
		args   []string
		want   string
	}{
		{filepath.Join(dir, "none.sock"), nil, "no socket at " + filepath.Join(dir, "none.sock") + ": is the daemon running?"},
		{file, nil, file + " is not a socket (a regular file)"},
		{dir, nil, dir + " is not a socket (a directory)"},
		{stale, nil, "connection refused at " + stale + ": no daemon listens there"},
		{mute, []string{"--timeout", "300ms"}, "the daemon at " + mute + " did not answer within 300ms (--timeout)"},
	} {
		start := time.Now()
		_, errOut, code := run(append(append([]string{"--socket", tc.socket}, tc.args...), "status")...)
		if code != exitFailed || !strings.Contains(errOut, tc.want) {
			t.Errorf("--socket %s: exit %d, %q; want exit 1 saying %q", tc.socket, code, errOut, tc.want)
		}
		if took := time.Since(start); took > 3*time.Second {
			t.Errorf("--socket %s: took %v", tc.socket, took)
		}
	}
}

// TestCLIHealth shows health checks at work against backends on loopback
// addresses: one listening, one not. backend ls, status, vip ls and stats
// show the down one with its reason; with both down the service is down.
func TestCLIHealth(t *testing.T) {
	up, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	go func() {
		for {
			c, err := up.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	port := up.Addr().(*net.TCPAddr).Port
	cfg := fmt.Sprintf(`interfaces: [eth0]
datapath: splice
tables: {ring_size: 251}
services:
  - name: web
    vip: 203.0.113.20
    port: %d
    health: {interval: 50ms, timeout: 40ms, rise: 2, fall: 2}
    on_down: reset
    backends:
      - address: 127.0.0.2
      - address: 127.0.0.3
`, port)
	socket, _ := startFakeDaemon(t, cfg, true)
	vip := fmt.Sprintf("203.0.113.20:%d", port)
	be2, be3 := fmt.Sprintf("127.0.0.2:%d", port), fmt.Sprintf("127.0.0.3:%d", port)
	want := func(args []string, re ...string) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			out, errOut, code := run(append([]string{"--socket", socket}, args...)...)
			ok := code == 0
			for _, r := range re {
				ok = ok && regexp.MustCompile(r).MatchString(out)
			}
			if ok {
				t.Logf("tether %s\n%s", strings.Join(args, " "), out)
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("tether %s: exit %d, want %q:\n%s%s", strings.Join(args, " "), code, re, out, errOut)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	want([]string{"backend", "ls", vip},
		`web `+regexp.QuoteMeta(vip)+`/tcp: up\n`,
		regexp.QuoteMeta(be2)+` +active +1 +[0-9]+ +0 +0 +up +ok in [0-9.]+[µm]?s +0\n`,
		regexp.QuoteMeta(be3)+` +down +1 +[0-9]+ +0 +[0-9]+ +down +connection refused in [0-9.]+[µm]?s +1\n`)
	want([]string{"status"}, `up; tcp check every 50ms \(timeout 40ms, rise 2, fall 2\), on_down reset`)
	want([]string{"vip", "ls"}, `web +`+regexp.QuoteMeta(vip)+` +tcp +up +source .* tcp +1 active, 1 down +[0-9]+`)
	want([]string{"stats"}, regexp.QuoteMeta(be3)+` +[0-9,]+ +[0-9,]+ +[0-9.]+ [KMG]?i?B +1\n`)

	up.Close()
	want([]string{"status"}, `DOWN: no usable backend, new connections are refused \(TCP reset\)`)
	want([]string{"backend", "ls", vip}, `web `+regexp.QuoteMeta(vip)+`/tcp: DOWN`)
	want([]string{"vip", "ls"}, `0 active, 2 down`)
	var svcs []control.ServiceStatus
	out, _, _ := run("--socket", socket, "vip", "ls", "-o", "json")
	if err := json.Unmarshal([]byte(out), &svcs); err != nil || len(svcs) != 1 {
		t.Fatalf("vip ls -o json: %v\n%s", err, out)
	}
	if s := svcs[0]; s.State != "down" || s.OnDown != "reset" || s.Health.Type != "tcp" || s.Backends[0].Health.State != "down" ||
		s.Backends[0].Health.LastResult != "connection refused" || s.Backends[0].Health.Check != "tcp://"+be2 {
		t.Errorf("vip ls -o json: %+v", s)
	}
}

// TestEcho runs the hidden echo command: refused without a name or an
// address, hidden from tether --help, and serving until its context ends.
func TestEcho(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"echo", "--listen", "127.0.0.1:0"}, "echo needs --name NAME"},
		{[]string{"echo", "--name", "x"}, "echo needs at least one --listen ADDR:PORT"},
		{[]string{"echo", "--name", "x", "--listen", "localhost:80"}, `--listen "localhost:80" is not ADDR:PORT`},
		{[]string{"echo", "--name", "x", "extra"}, "echo takes no arguments"},
	} {
		if _, errOut, code := run(tc.args...); code != exitUsage || !strings.Contains(errOut, tc.want) {
			t.Errorf("tether %s: exit %d, %q; want %d and %q", strings.Join(tc.args, " "), code, errOut, exitUsage, tc.want)
		}
	}
	if out, _, _ := run("--help"); strings.Contains(out, "echo") {
		t.Errorf("tether --help lists echo:\n%s", out)
	}
	if out, _, code := run("echo", "--help"); code != 0 || !strings.Contains(out, "X-Tether-Backend: NAME") {
		t.Errorf("tether echo --help: exit %d\n%s", code, out)
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	var out syncBuffer
	done := make(chan error, 1)
	go func() { done <- echo(ctx, &out, "be9", []string{addr}) }()
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(out.String(), "ready"); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("echo did not say ready")
		}
	}
	resp, err := http.Get("http://" + addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "be9\n" || resp.Header.Get("X-Tether-Backend") != "be9" {
		t.Errorf("GET /: %q, header %q", body, resp.Header.Get("X-Tether-Backend"))
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("echo: %v", err)
	}
	if _, err := net.Dial("tcp", addr); err == nil {
		t.Error("echo still listens after its context ended")
	}
}

// syncBuffer is a bytes.Buffer safe for one writer and one reader.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestMain lets the test binary stand for tether itself (see tetherExe),
// for what depends on the process's arguments, such as completion.
func TestMain(m *testing.M) {
	if os.Getenv("TETHER_TEST_AS_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// tetherExe returns a directory holding "tether", a link to the test
// binary that runs main, and the environment that makes it do so.
func tetherExe(t *testing.T) (dir string, env []string) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir = t.TempDir()
	if err := os.Symlink(exe, filepath.Join(dir, "tether")); err != nil {
		t.Fatal(err)
	}
	env = append(os.Environ(), "TETHER_TEST_AS_MAIN=1", "PATH="+dir+":"+os.Getenv("PATH"))
	return dir, env
}

func TestCompletion(t *testing.T) {
	dir, env := tetherExe(t)
	for _, shell := range []string{"bash", "zsh"} {
		out, _, code := run("completion", shell)
		if code != 0 || !strings.Contains(out, "--generate-bash-completion") {
			t.Errorf("completion %s: exit %d\n%s", shell, code, out)
		}
		if sh, err := exec.LookPath(shell); err == nil {
			cmd := exec.Command(sh, "-n")
			cmd.Stdin = strings.NewReader(out)
			if msg, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("%s -n on the script: %v\n%s", shell, err, msg)
			}
		}
	}
	if _, _, code := run("completion", "fish"); code != exitUsage {
		t.Errorf("completion fish: exit %d, want %d", code, exitUsage)
	}
	// What the scripts ask tether for.
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"--generate-bash-completion"}, []string{"vip", "backend", "status", "stats", "flows", "reload", "completion"}},
		{[]string{"backend", "--generate-bash-completion"}, []string{"add", "rm", "drain", "undrain", "ls"}},
		{[]string{"stats", "-", "--generate-bash-completion"}, []string{"--watch", "--interval", "--output"}},
	} {
		cmd := exec.Command(filepath.Join(dir, "tether"), tc.args...)
		cmd.Env = env
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("tether %s: %v", strings.Join(tc.args, " "), err)
		}
		for _, w := range tc.want {
			if !strings.Contains(string(out), w+"\n") {
				t.Errorf("tether %s does not offer %q:\n%s", strings.Join(tc.args, " "), w, out)
			}
		}
	}
	// The bash script, run by bash.
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("no bash")
	}
	for _, tc := range []struct{ line, want string }{
		{"tether backend-", "backend-setup"},
		{"tether back", "backend backend-setup"},
		{"tether backend dr", "drain"},
		{"tether stats --wa", "--watch"},
	} {
		script := `source <(tether completion bash)
COMP_WORDS=(` + tc.line + `)
COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
_tether_complete
echo "${COMPREPLY[@]}"`
		cmd := exec.Command(bash, "-c", script)
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != tc.want {
			t.Errorf("completing %q: %q (%v), want %q", tc.line, out, err, tc.want)
		}
	}
}

// TestStatsWatch redraws until its context ends, with rates from the
// second round on, and writes no terminal escape code to what is not a
// terminal; with JSON, one object per line.
func TestStatsWatch(t *testing.T) {
	socket, _ := startFake(t, fakeConfig)
	cl := control.NewClient(socket)
	for _, format := range []string{"text", "json"} {
		ctx, cancel := context.WithTimeout(context.Background(), 350*time.Millisecond)
		var out bytes.Buffer
		err := statsWatch(ctx, cl, &out, format, 100*time.Millisecond)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		switch format {
		case "text":
			// A file or pipe gets one block per interval, no escape code.
			if n := strings.Count(out.String(), "tether stats every"); n < 2 || !strings.Contains(out.String(), "PACKETS/S") {
				t.Errorf("text: %d blocks, want at least 2 with rates:\n%s", n, out.String())
			}
			if strings.Contains(out.String(), "\033") {
				t.Errorf("text written to a file holds escape codes:\n%q", out.String())
			}
		case "json":
			lines := strings.Split(strings.TrimSpace(out.String()), "\n")
			var s control.Stats
			if len(lines) < 2 || json.Unmarshal([]byte(lines[1]), &s) != nil || len(s.Services) != 1 {
				t.Errorf("json: %d lines:\n%s", len(lines), out.String())
			}
		}
	}
}
