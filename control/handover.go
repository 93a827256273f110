package control

import (
	"errors"
	"os"

	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/userspace"
)

// Handing a splice daemon's connections to its successor (package
// handover): the giving daemon freezes its changes and its proxy, and
// after the successor took everything, releases it; the successor starts
// with StartOptions.Inherit and resumes once the giver has let go.

// errNoProxy is Freeze's error for a daemon whose datapath is not the
// splice proxy: the XDP datapath needs no handover, its state is pinned.
var errNoProxy = errors.New("this daemon forwards with XDP, whose connections outlive it without a handover: stop it and start the new one")

// HandsOver says whether the daemon's datapath is the splice proxy, whose
// connections end with the daemon unless it hands them over.
func (d *Daemon) HandsOver() bool {
	_, ok := d.dp.(*userspace.Proxy)
	return ok
}

// Freeze stops every change (API, reload; health transitions are retried
// later) and the splice proxy, and returns the proxy's state and the
// descriptor of the pin directory's lock (-1 without one), for a
// successor. Thaw or Release ends it.
func (d *Daemon) Freeze() (*userspace.State, int, error) {
	p, ok := d.dp.(*userspace.Proxy)
	if !ok {
		return nil, -1, errNoProxy
	}
	d.mu.Lock()
	st, err := p.Freeze()
	if err != nil {
		d.mu.Unlock()
		return nil, -1, err
	}
	lock := -1
	if f, ok := d.lock.(*os.File); ok {
		lock = int(f.Fd())
	}
	return st, lock, nil
}

// Thaw serves on after a handover that failed.
func (d *Daemon) Thaw() {
	d.dp.(*userspace.Proxy).Thaw()
	d.mu.Unlock()
}

// Release lets go of what the successor took: the proxy's sockets and
// routes are its now. Changes are refused from then on; Stop still stops
// what is left (health checks, BGP).
func (d *Daemon) Release() {
	d.dp.(*userspace.Proxy).Release()
	d.handedOver.Store(true)
	d.mu.Unlock()
}

// Resume serves what the daemon inherited (StartOptions.Inherit) once the
// predecessor has let go of it. Without an inheritance it does nothing.
//
// BGP starts here for a daemon that took over: until then its predecessor
// announces, and a second session from this host would only collide.
func (d *Daemon) Resume() error {
	var err error
	if r, ok := d.dp.(datapath.Resumer); ok {
		err = r.Resume()
	}
	if d.bgpLater {
		d.bgpLater = false
		d.startBGP()
	}
	return err
}
