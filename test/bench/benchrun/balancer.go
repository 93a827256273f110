package benchrun

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/test/bench/pktgen"
)

// TrivialForwarder attaches the trivial XDP forwarder to l's balancer,
// towards the first backend, until the returned function detaches it.
func TrivialForwarder(l *lab.Lab) func() {
	var fw *pktgen.Forwarder
	if err := l.Balancer.Do(func() error {
		var err error
		fw, err = pktgen.AttachVIPForwarder(l.Balancer.Ifindex, l.VIP4, l.Balancer.MAC, l.Backends[0].MAC)
		return err
	}); err != nil {
		Fail(err.Error())
	}
	return func() { fw.Close() }
}

// TableForwarder is TrivialForwarder with a flow table of entries: the
// kernel's LRU hash (pktgen.AttachTableForwarder), the floor of a balancer
// that remembers its flows in one, or with array a flat array indexed by
// a hash of the flow (pktgen.AttachArrayForwarder).
func TableForwarder(l *lab.Lab, entries uint32, array bool) func() {
	attach := pktgen.AttachTableForwarder
	if array {
		attach = pktgen.AttachArrayForwarder
	}
	var fw *pktgen.Forwarder
	if err := l.Balancer.Do(func() error {
		var err error
		fw, err = attach(l.Balancer.Ifindex, l.VIP4, l.Balancer.MAC, l.Backends[0].MAC, entries)
		return err
	}); err != nil {
		Fail(err.Error())
	}
	return func() { fw.Close() }
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
