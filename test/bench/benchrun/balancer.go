package benchrun

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/test/bench/pktgen"
)

// TrivialForwarder attaches the trivial XDP forwarder to l's balancer,
// for l.VIP4 towards the first backend, until the returned function
// detaches it.
func TrivialForwarder(l *lab.Lab) func() { return VIPForwarder(l, l.VIP4) }

// VIPForwarder is TrivialForwarder for vip (l.VIP4 or l.VIP6).
func VIPForwarder(l *lab.Lab, vip netip.Addr) func() {
	return onBalancer(l, func() (*pktgen.Forwarder, error) {
		return pktgen.AttachVIPForwarder(l.Balancer.Ifindex, vip, l.Balancer.MAC, l.Backends[0].MAC)
	})
}

// TableForwarder is VIPForwarder with a flow table of entries, by kind:
// "table", the kernel's LRU hash (pktgen.AttachTableForwarder), the floor
// of a balancer that remembers its flows in one; "array", a flat array
// indexed by a hash of the flow (pktgen.AttachArrayForwarder); "chunked",
// the same in arrays small enough for the kernel's linear map
// (pktgen.AttachChunkedForwarder).
func TableForwarder(l *lab.Lab, vip netip.Addr, entries uint32, kind string) func() {
	attach := map[string]func(int, netip.Addr, net.HardwareAddr, net.HardwareAddr, uint32) (*pktgen.Forwarder, error){
		"table":   pktgen.AttachTableForwarder,
		"percpu":  pktgen.AttachPerCPUTableForwarder,
		"array":   pktgen.AttachArrayForwarder,
		"chunked": pktgen.AttachChunkedForwarder,
	}[kind]
	if attach == nil {
		Fail(fmt.Sprintf("no table forwarder %q", kind))
	}
	return onBalancer(l, func() (*pktgen.Forwarder, error) {
		return attach(l.Balancer.Ifindex, vip, l.Balancer.MAC, l.Backends[0].MAC, entries)
	})
}

// onBalancer runs attach in l's balancer namespace, failing the bench on
// an error, and returns what closes the forwarder it attached.
func onBalancer(l *lab.Lab, attach func() (*pktgen.Forwarder, error)) func() {
	var fw *pktgen.Forwarder
	if err := l.Balancer.Do(func() error {
		var err error
		fw, err = attach()
		return err
	}); err != nil {
		Fail(err.Error())
	}
	return func() { fw.Close() }
}

// Setup makes a temporary directory named after prefix (removed at
// exit), builds tether into it and builds a lab with opts (closed at
// exit): what a bench that runs the daemon starts with. It returns the
// directory, the binary and the lab.
func Setup(prefix string, opts lab.Options) (dir, bin string, l *lab.Lab) {
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		Fail(err.Error())
	}
	AtExit(func() { os.RemoveAll(dir) })
	bin = filepath.Join(dir, "tether")
	if b, err := exec.Command("go", "build", "-o", bin, "./cmd/tether").CombinedOutput(); err != nil {
		Fail(fmt.Sprintf("build tether: %v\n%s", err, b))
	}
	l, err = lab.New(opts)
	if err != nil {
		Fail(err.Error())
	}
	AtExit(func() { l.Close() })
	return dir, bin, l
}

// TetherDaemon runs `bin run --config conf` on l's balancer, its socket in
// dir and its pins under l's bpffs at pin, until the returned function
// stops it and detaches its program (which forgets its tables).
func TetherDaemon(l *lab.Lab, bin, conf, dir, pin string) func() {
	pinDir := filepath.Join(l.BPFFS, pin)
	p, err := l.Balancer.Start(bin, "run", "--config", conf, "--socket", filepath.Join(dir, "tether.sock"), "--pin-dir", pinDir)
	if err != nil {
		Fail(err.Error())
	}
	AtExit(func() { p.Stop() })
	if err := p.WaitOutput(context.Background(), "tether", "msg=ready", 30*time.Second); err != nil {
		Fail(err.Error())
	}
	return func() {
		if err := p.Stop(); err != nil {
			Fail(err.Error())
		}
		if b, err := l.Balancer.Command(bin, "detach", "--pin-dir", pinDir).CombinedOutput(); err != nil {
			Fail(fmt.Sprintf("tether detach: %v\n%s", err, b))
		}
	}
}
