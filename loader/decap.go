package loader

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/rlimit"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"

	"github.com/tetherlb/tether/bpf"
	"github.com/tetherlb/tether/maps"
)

// AttachDecap loads tether's decapsulation program (bpf/decap.c), which
// strips the outer header of ipip packets and of gue packets to guePort
// (0: ipip only), and attaches it to interface ifname of a backend. It is
// attached through netlink, not with a BPF link, so that it stays after
// this process ends ("ip link set dev IF xdp off" removes it): in native
// mode, or generic mode where the driver has none (mode says which). It
// replaces a decapsulation program attached before, and refuses an
// interface that has another XDP program.
func AttachDecap(ifname string, guePort uint16) (mode string, err error) {
	if err := rlimit.RemoveMemlock(); err != nil {
		return "", fmt.Errorf("remove memlock limit: %w", err)
	}
	link, err := netlink.LinkByName(ifname)
	if err != nil {
		return "", fmt.Errorf("interface %s: %w", ifname, err)
	}
	if x := link.Attrs().Xdp; x != nil && x.Attached && x.ProgId != 0 {
		name := "?"
		if p, err := ebpf.NewProgramFromID(ebpf.ProgramID(x.ProgId)); err == nil {
			if info, err := p.Info(); err == nil {
				name = info.Name
			}
			p.Close()
		}
		if name != bpf.DecapProgTetherDecap {
			return "", fmt.Errorf("interface %s has an XDP program already (%s, id %d): tether's decapsulation would replace it", ifname, name, x.ProgId)
		}
	}
	spec, err := bpf.LoadDecap()
	if err != nil {
		return "", err
	}
	if err := spec.Variables[bpf.DecapVarGuePort].Set(maps.Port(guePort)); err != nil {
		return "", fmt.Errorf("set the gue port: %w", err)
	}
	var objs bpf.DecapObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return "", fmt.Errorf("load the decapsulation program: %+v", ve)
		}
		return "", fmt.Errorf("load the decapsulation program: %w", err)
	}
	defer objs.Close() // the interface holds the program
	fd := objs.TetherDecap.FD()
	if err := netlink.LinkSetXdpFdWithFlags(link, fd, nl.XDP_FLAGS_DRV_MODE); err == nil {
		return "native", nil
	}
	if err := netlink.LinkSetXdpFdWithFlags(link, fd, nl.XDP_FLAGS_SKB_MODE); err != nil {
		return "", fmt.Errorf("attach the decapsulation program to %s: %w", ifname, err)
	}
	return "generic", nil
}
