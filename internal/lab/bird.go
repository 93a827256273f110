package lab

import (
	"bufio"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
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
	if err := p.awaitAnswer("bird in "+h.Name, func() error { _, err := b.Cmd("show status"); return err }); err != nil {
		return nil, err
	}
	return b, nil
}

// awaitAnswer waits up to 10 s until ask succeeds, for a daemon p (what)
// that answers on a control socket; it stops p if it never does.
func (p *Proc) awaitAnswer(what string, ask func() error) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := ask()
		if err == nil {
			return nil
		}
		select {
		case <-p.Done():
			return fmt.Errorf("%s exited (%v):\n%s", what, p.Err(), p.Output())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.Stop()
			return fmt.Errorf("%s does not answer after 10s (%v):\n%s", what, err, p.Output())
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

// The AS numbers of an ECMP router (StartECMPRouter) and of the balancers
// that peer with it.
const (
	RouterAS   = 65000
	BalancerAS = 65001
)

// BirdECMPConfig is the configuration of a BIRD router that peers with
// each of hosts (IPv4 and IPv6 sessions, passive: the balancers open
// them), imports every route and spreads a prefix over the hosts that
// announce it (ECMP into its kernel table). hold is the hold time it
// offers, in seconds: a session takes the smaller of both sides'.
func BirdECMPConfig(router *Host, hold int, hosts ...*Host) string {
	var b strings.Builder
	fmt.Fprintf(&b, "router id %s;\nlog stderr all;\nprotocol device {}\n", router.Addr4)
	fmt.Fprintf(&b, "protocol kernel { ipv4 { export all; }; merge paths on; }\nprotocol kernel { ipv6 { export all; }; merge paths on; }\n")
	for i, h := range hosts {
		for _, fam := range []struct {
			name        string
			local, peer netip.Addr
		}{{"ipv4", router.Addr4, h.Addr4}, {"ipv6", router.Addr6, h.Addr6}} {
			fmt.Fprintf(&b, "protocol bgp %s%d {\n  local %s as %d;\n  neighbor %s as %d;\n  passive on;\n  hold time %d;\n  error wait time 1, 5;\n  %s { import all; export none; };\n}\n",
				fam.name, i, fam.local, RouterAS, fam.peer, BalancerAS, hold, fam.name)
		}
	}
	return b.String()
}

// StartECMPRouter adds the router (AddRouter), has its kernel hash the
// 5-tuple when it spreads flows over equal-cost paths, and runs BIRD there
// with BirdECMPConfig for hosts, its files in dir.
func (l *Lab) StartECMPRouter(dir string, hold int, hosts ...*Host) (*Host, *Bird, error) {
	if err := BirdAvailable(); err != nil {
		return nil, nil, err
	}
	router, err := l.AddRouter()
	if err != nil {
		return nil, nil, err
	}
	// Hash the 5-tuple (policy 3, fields: addresses, protocol, ports)
	// rather than policy 1 (layer 4): policy 1 takes a layer-4 hash the
	// packet already carries, and on veth that is the sending socket's
	// own hash, which TCP draws again after a retransmission timeout. A
	// flow held up on a dead host would so find a new path and stay there
	// when the host comes back, where a real router hashes the headers
	// (or its NIC does) and moves the flow back.
	for _, fam := range []string{"ipv4", "ipv6"} {
		if err := router.Sysctl("net/"+fam+"/fib_multipath_hash_policy", "3"); err != nil {
			return nil, nil, err
		}
		if err := router.Sysctl("net/"+fam+"/fib_multipath_hash_fields", "0x0037"); err != nil {
			return nil, nil, err
		}
	}
	bird, err := router.StartBird(dir, BirdECMPConfig(router, hold, hosts...))
	if err != nil {
		return nil, nil, err
	}
	return router, bird, nil
}

// NextHops returns the next hops BIRD has for addr's host route, sorted
// (none: no route).
func (b *Bird) NextHops(addr netip.Addr) ([]netip.Addr, error) {
	routes, err := b.Routes()
	if err != nil {
		return nil, err
	}
	hops := routes[netip.PrefixFrom(addr, addr.BitLen())]
	slices.SortFunc(hops, netip.Addr.Compare)
	return hops, nil
}
