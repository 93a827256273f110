package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
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
func startFake(t *testing.T, cfgText string) (socket, path string) {
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
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- control.Serve(ctx, ln, control.NewDaemon(path, cfg, ctl, dp, log).Handler(), log) }()
	t.Cleanup(func() {
		cancel()
		<-done
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
		{[]string{"backend", "ls", "203.0.113.10:8765"}, 0, []string{"198.51.100.11:8765  active    1       1", "198.51.100.12:8765  draining  1       0"}},
		{[]string{"status"}, 0, []string{"datapath:  xdp (eth0: xdp)", "chat6 [2001:db8::10]:8765/tcp, connection affinity, dsr", "[2001:db8::12]:8765  draining  0"}},
		{[]string{"stats"}, 0, []string{"SERVICE", "chat", "198.51.100.11:8765", "1,000", "1.0 MiB", "pass_not_vip", "drop_no_backend"}},
		{[]string{"flows", "203.0.113.10:8765"}, 0, []string{"192.0.2.10:40000", "198.51.100.12:8765", "closing", "2 flows, 1 closing"}},
		{[]string{"vip", "rm", "[2001:db8::10]:8765/tcp"}, 0, []string{"removed service chat6", "2 backends"}},
		{[]string{"reload"}, 0, []string{"reloaded"}},
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
	if err := json.Unmarshal([]byte(out), &st); err != nil || st.Config != path || len(st.Services) != 1 {
		t.Errorf("status -o json: %v\n%s", err, out)
	}
	var fl []control.FlowStatus
	out, _, _ = run("--socket", socket, "flows", "-o", "json")
	if err := json.Unmarshal([]byte(out), &fl); err != nil || len(fl) != 2 {
		t.Errorf("flows -o json: %v\n%s", err, out)
	}
	// TETHER_SOCKET stands for --socket.
	t.Setenv("TETHER_SOCKET", socket)
	if _, errOut, code := run("vip", "ls"); code != 0 {
		t.Errorf("vip ls with TETHER_SOCKET: exit %d: %s", code, errOut)
	}
}

func TestCLIDaemonNotRunning(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	_, errOut, code := run("--socket", sock, "status")
	want := "tether: cannot reach the tether daemon at " + sock + ": is it running? start it with: tether run --config FILE\n"
	if code != exitFailed || errOut != want {
		t.Errorf("exit %d, %q\nwant exit 1, %q", code, errOut, want)
	}
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
		{"tether back", "backend"},
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
// second round on; with JSON, one object per line.
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
			if n := strings.Count(out.String(), "\033[H\033[2J"); n < 2 || !strings.Contains(out.String(), "PACKETS/S") {
				t.Errorf("text: %d redraws, want at least 2 with rates:\n%s", n, out.String())
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
