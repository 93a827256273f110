package lab

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// frrBGPD is where Debian's frr package puts bgpd.
const frrBGPD = "/usr/lib/frr/bgpd"

// FRR is FRRouting's bgpd running in a lab host, alone (no zebra: it
// installs no route, which the tests that use it do not need), with its
// configuration and vty socket in its own directory, stopped by its PID
// when the lab closes.
type FRR struct {
	*Proc
	host *Host
	dir  string
}

// FRRAvailable says whether FRR's bgpd and vtysh are installed.
func FRRAvailable() error {
	if _, err := os.Stat(frrBGPD); err != nil {
		return fmt.Errorf("%s not found: install frr (sudo make tools does)", frrBGPD)
	}
	if _, err := exec.LookPath("vtysh"); err != nil {
		return fmt.Errorf("vtysh not found: install frr (sudo make tools does)")
	}
	return nil
}

// StartFRR runs bgpd in host h in the foreground with configuration conf,
// its files in dir, and waits until vtysh reaches it.
func (h *Host) StartFRR(dir, conf string) (*FRR, error) {
	if err := FRRAvailable(); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "bgpd.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		return nil, err
	}
	// -S: stay root (the lab runs as root); -Z -n: no zebra, no kernel
	// routes; -P 0: no vty over TCP, only the socket in dir.
	p, err := h.Start(frrBGPD, "-f", path, "-i", filepath.Join(dir, "bgpd.pid"), "--vty_socket", dir,
		"-S", "-Z", "-n", "-P", "0", "--log", "stdout")
	if err != nil {
		return nil, err
	}
	f := &FRR{Proc: p, host: h, dir: dir}
	if err := p.awaitAnswer("bgpd in "+h.Name, func() error { _, err := f.Cmd("show bgp summary"); return err }); err != nil {
		return nil, err
	}
	return f, nil
}

// Cmd runs one vtysh command against this bgpd and returns its output.
func (f *FRR) Cmd(cmd string) (string, error) {
	out, err := f.host.Command("vtysh", "--vty_socket", f.dir, "-d", "bgpd", "-c", cmd).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("vtysh -c %q: %v: %s", cmd, err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// FRRECMPConfig is the configuration of an FRR bgpd that peers with each of
// hosts (IPv4 and IPv6 sessions, passive: the balancers open them),
// accepts every route, keeps up to 8 paths of a prefix (multipath) and
// announces the prefixes of originate to them.
func FRRECMPConfig(router *Host, hold int, originate []netip.Prefix, hosts ...*Host) string {
	var b strings.Builder
	fmt.Fprintf(&b, "frr defaults traditional\nhostname router\n!\nrouter bgp %d\n bgp router-id %s\n no bgp ebgp-requires-policy\n no bgp network import-check\n no bgp default ipv4-unicast\n bgp bestpath as-path multipath-relax\n", RouterAS, router.Addr4)
	for _, h := range hosts {
		for _, a := range []netip.Addr{h.Addr4, h.Addr6} {
			fmt.Fprintf(&b, " neighbor %s remote-as %d\n neighbor %s passive\n neighbor %s timers 1 %d\n neighbor %s advertisement-interval 0\n", a, BalancerAS, a, a, hold, a)
		}
	}
	for _, fam := range []string{"ipv4", "ipv6"} {
		fmt.Fprintf(&b, " address-family %s unicast\n  maximum-paths 8\n", fam)
		for _, p := range originate {
			if p.Addr().Is4() == (fam == "ipv4") {
				fmt.Fprintf(&b, "  network %s\n", p)
			}
		}
		for _, h := range hosts {
			a := h.Addr4
			if fam == "ipv6" {
				a = h.Addr6
			}
			fmt.Fprintf(&b, "  neighbor %s activate\n", a)
		}
		b.WriteString(" exit-address-family\n")
	}
	return b.String()
}
