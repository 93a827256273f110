package lab

import (
	"bufio"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Bird is a BIRD 2 routing daemon running in a lab host, with its own
// configuration and control socket, stopped by its PID when the lab closes
// (or by Stop).
type Bird struct {
	*Proc
	host *Host
	sock string
}

// BirdAvailable says whether BIRD 2 is installed (bird and birdc): the
// configurations the tests write are BIRD 2's.
func BirdAvailable() error {
	for _, name := range []string{"bird", "birdc"} {
		if _, err := exec.LookPath(name); err != nil {
			return fmt.Errorf("%s not found: install bird2 (sudo make tools does)", name)
		}
	}
	out, _ := exec.Command("bird", "--version").CombinedOutput()
	if !strings.Contains(string(out), "version 2.") {
		return fmt.Errorf("bird is not BIRD 2 (%s): install bird2", strings.TrimSpace(string(out)))
	}
	return nil
}

// StartBird runs BIRD in host h in the foreground with configuration conf,
// its control socket and files in dir, and waits until it answers on its
// socket.
func (h *Host) StartBird(dir, conf string) (*Bird, error) {
	if err := BirdAvailable(); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "bird.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		return nil, err
	}
	sock := filepath.Join(dir, "bird.ctl")
	p, err := h.Start("bird", "-f", "-c", path, "-s", sock)
	if err != nil {
		return nil, err
	}
	b := &Bird{Proc: p, host: h, sock: sock}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := b.Cmd("show status"); err == nil {
			return b, nil
		}
		select {
		case <-p.Done():
			return nil, fmt.Errorf("bird in %s exited (%v):\n%s", h.Name, p.Err(), p.Output())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.Stop()
			return nil, fmt.Errorf("bird in %s does not answer on %s after 10s:\n%s", h.Name, sock, p.Output())
		}
	}
}

// Cmd runs one birdc command and returns its output.
func (b *Bird) Cmd(cmd string) (string, error) {
	out, err := b.host.Command("birdc", append([]string{"-s", b.sock}, strings.Fields(cmd)...)...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("birdc %s: %v: %s", cmd, err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// Routes returns the routes BIRD holds in its tables, by prefix: the next
// hops of each ("via ADDR"), every path's, in the order BIRD lists them.
func (b *Bird) Routes() (map[netip.Prefix][]netip.Addr, error) {
	out, err := b.Cmd("show route")
	if err != nil {
		return nil, err
	}
	return parseBirdRoutes(out), nil
}

// parseBirdRoutes reads the output of birdc's "show route": a route begins
// with its prefix at the start of a line; its next hops follow on
// indented lines as "via ADDR on IFACE".
func parseBirdRoutes(out string) map[netip.Prefix][]netip.Addr {
	routes := make(map[netip.Prefix][]netip.Addr)
	var cur netip.Prefix
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if line[0] != ' ' && line[0] != '\t' {
			if p, err := netip.ParsePrefix(f[0]); err == nil {
				cur = p
				if _, ok := routes[cur]; !ok {
					routes[cur] = nil
				}
			} else {
				cur = netip.Prefix{}
			}
			continue
		}
		if !cur.IsValid() {
			continue
		}
		for i := 0; i+1 < len(f); i++ {
			if f[i] == "via" {
				if a, err := netip.ParseAddr(f[i+1]); err == nil {
					routes[cur] = append(routes[cur], a)
				}
			}
		}
	}
	return routes
}
