// Package handover passes a splice daemon's sockets, with their
// connections' state, to the daemon that replaces it (`tether run
// --takeover`), so that a restart or an upgrade closes no connection.
//
// The running daemon (the giver) listens on a unix socket beside its API
// socket (Path), of type SOCK_SEQPACKET, mode 0600, and answers only a
// process of its own user. The new daemon (the taker) connects and says
// hello; the conversation, one message per packet, each a kind byte and
// its payload:
//
//	taker: H {"protocol":1,"version":"..."}
//	giver: H {"protocol":1,"version":"..."}   or N reason (refused; nothing changed)
//	giver: F count, with that many descriptors (SCM_RIGHTS), as often as needed
//	giver: S chunk ... E last chunk            the Package as JSON; descriptors are indices into those passed
//	taker: T                                    taken: the taker serves from now on
//	   or: A reason                             aborted: the giver thaws and goes on serving
//	giver: R                                    released: its API socket and metrics address are free
//
// Between its H and T the giver is frozen (userspace.Proxy.Freeze): it
// moves no byte and changes nothing; the taker applies its configuration
// and moves nothing either. A taker that goes away, aborts or stays silent
// for Timeout leaves the giver serving as before. After T the giver never
// serves again: it releases everything, says R and exits. A giver that
// speaks another protocol version refuses at hello, and both say which.
package handover

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/userspace"
)

// Protocol is the version of the conversation and of Package. A giver and
// a taker of different versions refuse each other at hello.
const Protocol = 1

// Timeout bounds each wait of the conversation: a giver thaws when its
// taker has not taken within it, and a taker gives up on a giver that does
// not answer.
var Timeout = 30 * time.Second

// Package is what a giver hands over.
type Package struct {
	// Version is the giver's tether version.
	Version string
	// Proxy is the splice proxy's state.
	Proxy *userspace.State
	// Lock is the descriptor of the pin directory's lock, -1 if none: an
	// flock belongs to the open file, so the taker holds it from the
	// start, and no other daemon can slip in between.
	Lock int
}

// fds lists p's descriptors for passing.
func (p *Package) fds() []*int {
	var out []*int
	if p.Lock >= 0 {
		out = append(out, &p.Lock)
	}
	return append(out, p.Proxy.FDs()...)
}

// Giver is a daemon that can hand over.
type Giver interface {
	// Freeze stops every change and the proxy, and returns what to hand
	// over; the descriptors stay open in the giver.
	Freeze() (*Package, error)
	// Thaw goes on serving after a failed handover.
	Thaw()
	// Release lets go of everything after the taker took it: the proxy's
	// sockets, the lock, the API socket and the metrics address.
	Release()
}

// Path is the handover socket of the daemon whose API socket is apiSocket.
func Path(apiSocket string) string { return apiSocket + ".handover" }

type hello struct {
	Protocol int    `json:"protocol"`
	Version  string `json:"version"`
}

const (
	kHello    = 'H'
	kRefused  = 'N'
	kFDs      = 'F'
	kState    = 'S'
	kStateEnd = 'E'
	kTaken    = 'T'
	kAborted  = 'A'
	kReleased = 'R'

	chunk     = 32 << 10 // bytes of JSON per packet
	fdsPerMsg = 250      // descriptors per packet (the kernel takes 253)
	maxPacket = chunk + 1
)

// Listen opens the handover socket at path, mode 0600, replacing a stale
// one (no daemon answers it).
func Listen(path string) (*net.UnixListener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("handover socket %s: the path exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unixpacket", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("handover socket %s: another tether daemon is serving it", path)
		}
		os.Remove(path)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("handover socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("handover socket %s: %w", path, err)
	}
	return ln, nil
}

// Serve answers takers on ln, one at a time, until one takes everything
// (nil) or ln closes (its error). A taker refused or failed leaves the
// giver serving, and Serve waits for the next.
func Serve(ln *net.UnixListener, g Giver, version string, log *slog.Logger) error {
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			return err
		}
		done, err := give(c, g, version, log)
		c.Close()
		if done {
			return nil
		}
		if err != nil {
			log.Warn("handover to a new daemon failed; serving on", "err", err)
		}
	}
}

// give hands everything to the taker on c; done once the taker took it.
func give(c *net.UnixConn, g Giver, version string, log *slog.Logger) (done bool, err error) {
	if err := sameUser(c); err != nil {
		return false, err
	}
	c.SetDeadline(time.Now().Add(Timeout))
	kind, body, _, err := read(c)
	if err != nil {
		return false, fmt.Errorf("read hello: %w", err)
	}
	var h hello
	if kind != kHello || json.Unmarshal(body, &h) != nil {
		return false, fmt.Errorf("the taker did not say hello")
	}
	if h.Protocol != Protocol {
		reason := fmt.Sprintf("this daemon (tether %s) speaks handover protocol %d, the new one (tether %s) %d; stop this one and start the new one instead (its connections end)", version, Protocol, h.Version, h.Protocol)
		write(c, kRefused, []byte(reason), nil)
		return false, errors.New(reason)
	}
	pkg, err := g.Freeze()
	if err != nil {
		write(c, kRefused, []byte(err.Error()), nil)
		return false, err
	}
	log.Info("handing over to a new daemon", "version", h.Version, "connections", len(pkg.Proxy.Conns), "listeners", len(pkg.Proxy.Listeners))
	took := false
	defer func() {
		if !took {
			g.Thaw()
		}
	}()
	mine, _ := json.Marshal(hello{Protocol: Protocol, Version: version})
	if err := write(c, kHello, mine, nil); err != nil {
		return false, err
	}
	c.SetDeadline(time.Now().Add(Timeout))
	if err := send(c, pkg); err != nil {
		return false, err
	}
	c.SetDeadline(time.Now().Add(Timeout))
	kind, body, stray, err := read(c)
	closeFDs(stray) // a taker passes none
	// Past its deadline the read fails and the giver thaws: a taker that
	// said "taken" after it finds the giver serving (Commit).
	switch {
	case err != nil:
		return false, fmt.Errorf("the new daemon did not take over: %w", err)
	case kind == kAborted:
		return false, fmt.Errorf("the new daemon gave up: %s", body)
	case kind != kTaken:
		return false, fmt.Errorf("the new daemon said %q", kind)
	}
	took = true
	g.Release()
	if err := write(c, kReleased, nil, nil); err != nil {
		log.Warn("could not tell the new daemon that it has everything", "err", err)
	}
	log.Info("handed over to the new daemon", "connections", len(pkg.Proxy.Conns))
	return true, nil
}

// send passes pkg's descriptors and then pkg itself, whose descriptors
// are indices into those.
func send(c *net.UnixConn, pkg *Package) error {
	ptrs := pkg.fds()
	fds := make([]int, len(ptrs))
	for i, p := range ptrs {
		fds[i] = *p
		*p = i
	}
	defer func() { // the giver keeps its numbers, to thaw or release
		for i, p := range ptrs {
			*p = fds[i]
		}
	}()
	for i := 0; i < len(fds); i += fdsPerMsg {
		part := fds[i:min(i+fdsPerMsg, len(fds))]
		if err := write(c, kFDs, binary.BigEndian.AppendUint32(nil, uint32(len(part))), part); err != nil {
			return fmt.Errorf("pass descriptors: %w", err)
		}
	}
	body, err := json.Marshal(pkg)
	if err != nil {
		return err
	}
	for len(body) > chunk {
		if err := write(c, kState, body[:chunk], nil); err != nil {
			return err
		}
		body = body[chunk:]
	}
	return write(c, kStateEnd, body, nil)
}

// Taken is a handover received by a taker, until Commit or Abort.
type Taken struct {
	Package *Package
	// Version is the giver's tether version.
	Version string
	c       *net.UnixConn
}

// ErrNoGiver is Take's error when no daemon listens at the path.
var ErrNoGiver = errors.New("no tether daemon hands over there")

// Take connects to the giver at path and receives its package. The giver
// stays frozen until Commit or Abort. On error nothing was taken and every
// descriptor received is closed.
func Take(path, version string) (*Taken, error) {
	conn, err := net.DialTimeout("unixpacket", path, 5*time.Second)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("%s: %w: is a splice daemon running with this --socket? (an XDP daemon needs no takeover: stop it and start the new one, forwarding goes on)", path, ErrNoGiver)
		}
		return nil, err
	}
	c := conn.(*net.UnixConn)
	t := &Taken{c: c}
	var fds []int
	defer func() {
		if t.Package == nil {
			closeFDs(fds)
			c.Close()
		}
	}()
	c.SetDeadline(time.Now().Add(Timeout))
	mine, _ := json.Marshal(hello{Protocol: Protocol, Version: version})
	if err := write(c, kHello, mine, nil); err != nil {
		return nil, err
	}
	kind, body, _, err := read(c)
	switch {
	case err != nil:
		return nil, fmt.Errorf("hello: %w", err)
	case kind == kRefused:
		return nil, fmt.Errorf("the running daemon refused to hand over: %s", body)
	case kind != kHello:
		return nil, fmt.Errorf("the running daemon said %q instead of hello", kind)
	}
	var h hello
	if err := json.Unmarshal(body, &h); err != nil || h.Protocol != Protocol {
		return nil, fmt.Errorf("the running daemon speaks handover protocol %d, this one %d", h.Protocol, Protocol)
	}
	t.Version = h.Version
	var state bytes.Buffer
	for {
		c.SetDeadline(time.Now().Add(Timeout))
		kind, body, got, err := read(c)
		fds = append(fds, got...)
		if err != nil {
			return nil, fmt.Errorf("receive: %w", err)
		}
		switch kind {
		case kFDs:
			if len(body) != 4 || int(binary.BigEndian.Uint32(body)) != len(got) {
				return nil, fmt.Errorf("receive: %d descriptors arrived, %d were sent", len(got), binary.BigEndian.Uint32(body))
			}
			continue
		case kState, kStateEnd:
			state.Write(body)
		default:
			return nil, fmt.Errorf("receive: unexpected %q", kind)
		}
		if kind == kStateEnd {
			break
		}
	}
	pkg := &Package{}
	if err := json.Unmarshal(state.Bytes(), pkg); err != nil || pkg.Proxy == nil {
		return nil, fmt.Errorf("receive: the state does not decode (%v)", err)
	}
	ptrs := pkg.fds()
	if len(ptrs) != len(fds) {
		return nil, fmt.Errorf("receive: the state names %d descriptors, %d arrived", len(ptrs), len(fds))
	}
	seen := make([]bool, len(fds))
	for _, p := range ptrs {
		if *p < 0 || *p >= len(fds) || seen[*p] {
			return nil, fmt.Errorf("receive: descriptor index %d out of range or named twice", *p)
		}
		seen[*p] = true
		*p = fds[*p]
	}
	t.Package = pkg
	return t, nil
}

// ErrNotTaken is Commit's error when the giver serves on: the taker must
// not serve what it received, and closes it plainly.
var ErrNotTaken = errors.New("the running daemon serves on")

// Commit tells the giver that the taker serves from now on and waits until
// the giver has let go of everything, its API socket and metrics address
// included. It returns nil when the taker is to serve, and ErrNotTaken
// when the giver serves on: "taken" could not be sent, or the giver did
// not confirm and still answers on its handover socket (it gave up
// waiting, Timeout). A giver that died without confirming serves nothing:
// Commit returns nil.
func (t *Taken) Commit(path string) error {
	defer t.c.Close()
	t.c.SetDeadline(time.Now().Add(Timeout))
	if err := write(t.c, kTaken, nil, nil); err != nil {
		return fmt.Errorf("%w: tell it: %v", ErrNotTaken, err)
	}
	kind, _, fds, err := read(t.c)
	closeFDs(fds)
	if err == nil && kind == kReleased {
		return nil
	}
	// The giver removes its handover socket before it confirms.
	if c, derr := net.DialTimeout("unixpacket", path, time.Second); derr == nil {
		c.Close()
		return fmt.Errorf("%w: it did not confirm (%v, %q) and still answers at %s", ErrNotTaken, err, kind, path)
	}
	return nil
}

// Abort tells the giver to go on serving. The taker's copies of the
// descriptors are the caller's to close (plainly: no shutdown, no reset).
func (t *Taken) Abort(reason string) {
	t.c.SetDeadline(time.Now().Add(time.Second))
	write(t.c, kAborted, []byte(reason), nil)
	t.c.Close()
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// write sends one packet: kind, body and descriptors.
func write(c *net.UnixConn, kind byte, body []byte, fds []int) error {
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	_, _, err := c.WriteMsgUnix(append([]byte{kind}, body...), oob, nil)
	return err
}

// read receives one packet; descriptors that came with it are returned
// whatever else happens, for the caller to own.
func read(c *net.UnixConn) (kind byte, body []byte, fds []int, err error) {
	buf := make([]byte, maxPacket)
	oob := make([]byte, unix.CmsgSpace(fdsPerMsg*4))
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	if oobn > 0 {
		msgs, perr := unix.ParseSocketControlMessage(oob[:oobn])
		if perr == nil {
			for _, m := range msgs {
				if got, err := unix.ParseUnixRights(&m); err == nil {
					fds = append(fds, got...)
				}
			}
		}
	}
	if err != nil {
		return 0, nil, fds, err
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		return 0, nil, fds, errors.New("a packet arrived cut short")
	}
	if n == 0 {
		return 0, nil, fds, errors.New("closed")
	}
	return buf[0], buf[1:n], fds, nil
}

// sameUser refuses a peer of another user than this process's.
func sameUser(c *net.UnixConn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	raw.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
	if cerr != nil {
		return cerr
	}
	if int(cred.Uid) != os.Geteuid() {
		return fmt.Errorf("a process of uid %d asked for the handover; only uid %d may", cred.Uid, os.Geteuid())
	}
	return nil
}
