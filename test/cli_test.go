package test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tetherlb/tether/internal/lab"
)

// runTether runs the tether binary in the lab's balancer namespace and
// returns its combined output and exit code.
func runTether(t *testing.T, l *lab.Lab, args ...string) (string, int) {
	t.Helper()
	return runIn(t, l.Balancer, args...)
}

// runIn runs the tether binary in host h and returns its combined output
// and exit code.
func runIn(t *testing.T, h *lab.Host, args ...string) (string, int) {
	t.Helper()
	cmd := h.Command(tetherBin, args...)
	// A socket of its own: never the host's /run/tether/tether.sock.
	cmd.Env = append(os.Environ(), "TETHER_SOCKET="+filepath.Join(t.TempDir(), "tether.sock"))
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		return string(out), exit.ExitCode()
	}
	if err != nil {
		t.Fatal(err)
	}
	return string(out), 0
}

// TestRunRefusesBadInput checks that `tether run` refuses a bad command
// line with exit code 2 and a bad file with exit code 1 and the field
// named, and that nothing was attached to the interface.
func TestRunRefusesBadInput(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 1, Clients: 1})
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := chatConfig(l, l.Backends)
	for _, tc := range []struct {
		desc string
		args []string
		code int
		want string
	}{
		{"no --config", []string{"run"}, 2, "needs --config"},
		{"unknown flag", []string{"run", "--bogus"}, 2, "bogus"},
		{"unknown command", []string{"rnu"}, 2, `no command "rnu"`},
		{"bad log format", []string{"run", "-c", write("good.yaml", good), "--log-format", "xml"}, 2, "--log-format"},
		{"missing file", []string{"run", "-c", filepath.Join(dir, "none.yaml")}, 1, "none.yaml"},
		{"bad VIP", []string{"run", "-c", write("vip.yaml", strings.Replace(good, "203.0.113.10", "203.0.113.300", 1))}, 1, "services[0].vip"},
		{"backend port differs in dsr", []string{"run", "-c", write("port.yaml", strings.Replace(good, "      - address: 198.51.100.11\n", "      - address: 198.51.100.11\n        port: 9000\n", 1))}, 1, "services[0].backends[0].port"},
		{"unknown field", []string{"run", "-c", write("field.yaml", good+"colour: blue\n")}, 1, "colour"},
		{"interface that does not exist", []string{"run", "-c", write("iface.yaml", strings.Replace(good, "[eth0]", "[eth9]", 1))}, 1, "eth9"},
		{"udp with splice", []string{"run", "-c", write("splice.yaml", strings.Replace(strings.Replace(good, "datapath: xdp", "datapath: splice", 1), "    affinity: source\n", "    protocol: udp\n    affinity: source\n", 1))}, 1, "services[0].protocol: udp services need the xdp datapath"},
		{"proxy_protocol with xdp", []string{"run", "-c", write("pp.yaml", strings.Replace(good, "    affinity: source\n", "    proxy_protocol: v2\n    affinity: source\n", 1))}, 1, "services[0].proxy_protocol: v2 needs the splice datapath"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			out, code := runTether(t, l, tc.args...)
			if code != tc.code || !strings.Contains(out, tc.want) {
				t.Fatalf("exit %d, output:\n%s\nwant exit %d and %q", code, out, tc.code, tc.want)
			}
			if id := balancerXDP(t, l); id != 0 {
				t.Fatalf("an XDP program (id %d) is attached after a refused run", id)
			}
		})
	}
}
