package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/urfave/cli/v2"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/loader"
)

var backendSetupCommand = &cli.Command{
	Name:      "backend-setup",
	Usage:     "print (or apply) what a backend host needs for a forwarding mode",
	ArgsUsage: "VIP...",
	Description: `Run on a backend host. It prints the commands that ready the host for
services of these VIPs in a forwarding mode, and with --apply carries them
out itself, through netlink and /proc/sys (each step leaves what is already
in place as it is, so running it again is safe).

  dsr        the VIPs on the loopback interface, arp_ignore=1 and
             arp_announce=2 so that the host does not answer ARP for them.
  ipip, gue  the same, plus decapsulation: with --decap kernel (default)
             the kernel's tunnel devices in external mode (ipip for IPv4
             outer headers, ip6tnl for IPv6 ones; gue: also fou sockets on
             --gue-port) and rp_filter loosened on them; with --decap xdp
             tether's own XDP program on --interface, for kernels without
             those devices (it strips ipip and gue headers before the
             kernel sees the packet; "ip link set dev IF xdp off" removes
             it). An IPv6 VIP with IPv4 backends needs --decap xdp (or a
             sit device of the operator's).

nat and fullnat need nothing on the backend (nat: a route to the clients
through the balancer). Encapsulation adds 20 bytes (ipip over IPv4), 28
(gue over IPv4), 40 (ipip over IPv6) or 48 (gue over IPv6) to each packet:
the balancer answers packets that no longer fit with ICMP "fragmentation
needed", or advertise a smaller MSS from the backends (ip route ... advmss
1440 for ipip over IPv4 on a 1500-byte path) to avoid the round trip.

Examples:
  tether backend-setup --forwarding ipip 203.0.113.10 2001:db8:f::10
  tether backend-setup --forwarding gue --gue-port 6080 --apply 203.0.113.10
  tether backend-setup --forwarding gue --decap xdp --interface eth0 --apply 203.0.113.10`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "forwarding", Value: "ipip", Usage: "the services' forwarding `MODE`: dsr, ipip or gue"},
		&cli.UintFlag{Name: "gue-port", Value: datapath.DefaultGUEPort, Usage: "gue: the UDP `PORT` the balancer sends to"},
		&cli.StringFlag{Name: "decap", Value: "kernel", Usage: "ipip and gue: who decapsulates, kernel (tunnel devices) or xdp (tether's XDP program on --interface)"},
		&cli.StringFlag{Name: "interface", Usage: "--decap xdp: the `NAME` of the interface the encapsulated packets arrive on"},
		&cli.BoolFlag{Name: "apply", Usage: "carry the steps out (needs root) instead of printing them"},
	},
	Action: func(c *cli.Context) error {
		a, done, err := args(c, 1, 1<<10, "VIP...")
		if done || err != nil {
			return err
		}
		opts := setupOptions{forwarding: c.String("forwarding"), decap: c.String("decap"), iface: c.String("interface")}
		p := c.Uint("gue-port")
		if p == 0 || p > 65535 {
			return usagef("--gue-port %d is out of range 1..65535", p)
		}
		opts.guePort = uint16(p)
		for _, s := range a {
			v, err := netip.ParseAddr(s)
			if err != nil {
				return usagef("%q is not an IP address (give the VIPs, such as 203.0.113.10)", s)
			}
			opts.vips = append(opts.vips, v.Unmap())
		}
		steps, err := setupSteps(opts)
		if err != nil {
			return usagef("%v", err)
		}
		if !c.Bool("apply") {
			printSteps(c.App.Writer, steps)
			return nil
		}
		for i, s := range steps {
			if s.apply == nil {
				continue
			}
			if err := s.apply(); err != nil {
				done := "no step was carried out"
				if i > 0 {
					done = fmt.Sprintf("the %d steps before it are in place", i)
				}
				return fmt.Errorf("%s: %w (%s; fix this and run again)", s.shell, err, done)
			}
			fmt.Fprintf(c.App.Writer, "done: %s\n", s.shell)
		}
		return nil
	},
}

// setupOptions is what backend-setup was asked.
type setupOptions struct {
	forwarding, decap, iface string
	guePort                  uint16
	vips                     []netip.Addr
}

// setupStep is one thing a backend needs: the shell command that does it,
// and the function that does it through netlink or /proc/sys.
type setupStep struct {
	shell   string
	comment string
	apply   func() error
}

// Names of the tunnel devices backend-setup creates.
const (
	ipipDevice   = "tether-ipip"
	ip6tnlDevice = "tether-ip6tnl"
)

func setupSteps(o setupOptions) ([]setupStep, error) {
	encap := false
	switch o.forwarding {
	case config.ForwardingDSR:
	case config.ForwardingIPIP, config.ForwardingGUE:
		encap = true
	case config.ForwardingNAT, config.ForwardingFullNAT:
		return nil, fmt.Errorf("forwarding %s needs nothing on the backends (nat: a route to the clients through the balancer)", o.forwarding)
	default:
		return nil, fmt.Errorf("--forwarding %q: want dsr, ipip or gue", o.forwarding)
	}
	if encap && o.decap != "kernel" && o.decap != "xdp" {
		return nil, fmt.Errorf("--decap %q: want kernel or xdp", o.decap)
	}
	if encap && o.decap == "xdp" && o.iface == "" {
		return nil, errors.New("--decap xdp needs --interface, the interface the encapsulated packets arrive on")
	}
	var steps []setupStep
	v4 := false
	for _, v := range o.vips {
		v4 = v4 || v.Is4()
		p := netip.PrefixFrom(v, v.BitLen())
		steps = append(steps, setupStep{
			shell:   fmt.Sprintf("ip addr add %s dev lo", p),
			comment: "the VIP, so that the host takes the packets to it and answers from it",
			apply:   func() error { return addLoopback(p) },
		})
	}
	if v4 {
		steps = append(steps,
			sysctlStep("net.ipv4.conf.all.arp_ignore", "1", "answer ARP only for addresses of the interface asked"),
			sysctlStep("net.ipv4.conf.all.arp_announce", "2", "never announce a VIP as an ARP source"))
	}
	if !encap {
		return steps, nil
	}
	if o.decap == "xdp" {
		port := uint16(0)
		if o.forwarding == config.ForwardingGUE {
			port = o.guePort
		}
		steps = append(steps, setupStep{
			shell:   fmt.Sprintf("tether backend-setup --forwarding %s --gue-port %d --decap xdp --interface %s --apply", o.forwarding, o.guePort, o.iface),
			comment: "tether's XDP program strips the outer headers on " + o.iface + " (no shell equivalent)",
			apply: func() error {
				_, err := loader.AttachDecap(o.iface, port)
				return err
			},
		})
		return steps, nil
	}
	steps = append(steps,
		linkStep(ipipDevice, "ipip", "", "IPv4 outer headers (IPv4 inside)", &netlink.Iptun{LinkAttrs: netlink.LinkAttrs{Name: ipipDevice}, FlowBased: true}),
		linkStep(ip6tnlDevice, "ip6tnl", " mode any", "IPv6 outer headers (IPv4 or IPv6 inside)", &netlink.Ip6tnl{LinkAttrs: netlink.LinkAttrs{Name: ip6tnlDevice}, FlowBased: true}),
		sysctlStep("net.ipv4.conf."+ipipDevice+".rp_filter", "0", "decapsulated packets arrive on the tunnel devices, not where the clients are routed"),
		sysctlStep("net.ipv4.conf."+ip6tnlDevice+".rp_filter", "0", "IPv4 packets inside IPv6 too"),
		setupStep{
			shell:   "sysctl -w net.ipv4.conf.all.rp_filter=2   # only if it is 1",
			comment: "strict reverse-path filtering would drop them all the same",
			apply:   looseRPFilter,
		},
	)
	if o.forwarding == config.ForwardingGUE {
		for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			shell := fmt.Sprintf("ip fou add port %d gue", o.guePort)
			if fam == netlink.FAMILY_V6 {
				shell += " -6"
			}
			port := int(o.guePort)
			steps = append(steps, setupStep{
				shell:   shell,
				comment: "a UDP socket that hands gue packets to the tunnel devices",
				apply: func() error {
					have, err := netlink.FouList(fam)
					if err == nil {
						for _, f := range have {
							if f.Port == port && f.EncapType == netlink.FOU_ENCAP_GUE {
								return nil // in place
							}
						}
					}
					err = netlink.FouAdd(netlink.Fou{Family: fam, Port: port, EncapType: netlink.FOU_ENCAP_GUE})
					if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EOPNOTSUPP) {
						return fmt.Errorf("this kernel has no fou (CONFIG_NET_FOU): use --decap xdp")
					}
					return err
				},
			})
		}
	}
	return steps, nil
}

func printSteps(w io.Writer, steps []setupStep) {
	for _, s := range steps {
		fmt.Fprintf(w, "# %s\n%s\n", s.comment, s.shell)
	}
}

func sysctlStep(key, value, why string) setupStep {
	return setupStep{
		shell:   fmt.Sprintf("sysctl -w %s=%s", key, value),
		comment: why,
		apply: func() error {
			return os.WriteFile(filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/")), []byte(value), 0o644)
		},
	}
}

// looseRPFilter sets net.ipv4.conf.all.rp_filter to 2 (loose) if it is 1
// (strict): the kernel applies the larger of it and the device's.
func looseRPFilter() error {
	const file = "/proc/sys/net/ipv4/conf/all/rp_filter"
	b, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	if strings.TrimSpace(string(b)) != "1" {
		return nil
	}
	return os.WriteFile(file, []byte("2"), 0o644)
}

func linkStep(name, kind, mode, what string, link netlink.Link) setupStep {
	return setupStep{
		shell:   fmt.Sprintf("ip link add %s type %s%s external && ip link set %s up", name, kind, mode, name),
		comment: "the kernel's decapsulation of " + what,
		apply: func() error {
			if _, err := netlink.LinkByName(name); err != nil {
				if err := netlink.LinkAdd(link); err != nil {
					if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOENT) || strings.Contains(err.Error(), "not supported") {
						return fmt.Errorf("this kernel has no %s devices: use --decap xdp", kind)
					}
					return err
				}
			}
			l, err := netlink.LinkByName(name)
			if err != nil {
				return err
			}
			return netlink.LinkSetUp(l)
		},
	}
}

func addLoopback(p netip.Prefix) error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return err
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
	if err := netlink.AddrAdd(lo, addr); err != nil && !errors.Is(err, unix.EEXIST) {
		return err
	}
	return nil
}
