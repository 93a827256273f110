package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/tetherlb/tether/internal/lab"
)

// Ports the backends serve on, the same through every balancer.
const (
	portWS   = 8080 // WebSocket echo (lab.EchoServer)
	portBulk = 5201 // iperf3
	portUDP  = 9999 // small UDP packets, counted and dropped at the backends
)

// Env is what a peer's Start gets: the lab, a scratch directory and
// helpers that run commands on the lab's hosts.
type Env struct {
	Lab *lab.Lab
	// VIP is the address clients reach the service on (IPv4).
	VIP netip.Addr
	// Tmp is a scratch directory removed at the end of the run.
	Tmp string
	// Tether is the tether binary built for this run.
	Tether string
	// Pins is the bpffs directory for tether's pinned state.
	Pins string
	// BackendAddrs are the backends' own IPv4 addresses.
	BackendAddrs []netip.Addr
	// HAProxyThreads is HAProxy's nbthread (0: its default).
	HAProxyThreads int

	round int // for unique file names
}

// File writes content to a new file in Tmp named after name and the round
// and returns its path.
func (e *Env) File(name, content string) (string, error) {
	path := filepath.Join(e.Tmp, fmt.Sprintf("r%d-%s", e.round, name))
	return path, os.WriteFile(path, []byte(content), 0o600)
}

// RunInput is lab.Host.Run with stdin.
func (e *Env) RunInput(h *lab.Host, stdin, name string, args ...string) error {
	cmd := h.Command(name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s in %s: %v: %s\ninput:\n%s", name, strings.Join(args, " "), h.Name, err, strings.TrimSpace(string(out)), stdin)
	}
	return nil
}

// Sysctl sets key=value in h's namespace and returns a function that sets
// the old value back.
func (e *Env) Sysctl(h *lab.Host, key, value string) (restore func() error, err error) {
	old, err := h.Command("sysctl", "-n", key).Output()
	if err != nil {
		return nil, fmt.Errorf("sysctl %s in %s: %w", key, h.Name, err)
	}
	if err := h.Run("sysctl", "-qw", key+"="+value); err != nil {
		return nil, err
	}
	return func() error { return h.Run("sysctl", "-qw", key+"="+strings.TrimSpace(string(old))) }, nil
}

// LocalVIP makes the balancer accept connections to the VIP (a proxy's
// listener) with a local route, and returns the function that removes it.
func (e *Env) LocalVIP() (remove func() error, err error) {
	route := []string{"route", "add", "local", e.VIP.String() + "/32", "dev", "lo", "table", "local"}
	if err := e.Lab.Balancer.Run("ip", route...); err != nil {
		return nil, err
	}
	return func() error {
		route[1] = "del"
		return e.Lab.Balancer.Run("ip", route...)
	}, nil
}

// ClientsViaBalancer routes the backends' replies to the client addresses
// through the balancer, as a NAT balancer needs (the lab's default is an
// on-link route, for direct server return). It returns the undo.
func (e *Env) ClientsViaBalancer() (restore func() error, err error) {
	set := func(args ...string) error {
		for _, be := range e.Lab.Backends {
			if err := be.Run("ip", append([]string{"route", "replace", "192.0.2.0/24"}, args...)...); err != nil {
				return err
			}
		}
		return nil
	}
	if err := set("via", e.Lab.Balancer.Addr4.String(), "dev", "eth0"); err != nil {
		return nil, err
	}
	return func() error { return set("dev", "eth0") }, nil
}

// Forwarding turns on IPv4 forwarding on the balancer and returns the undo.
func (e *Env) Forwarding() (restore func() error, err error) {
	return e.Sysctl(e.Lab.Balancer, "net.ipv4.ip_forward", "1")
}

// WaitServing waits until a WebSocket echo through the VIP succeeds, or
// fails early if p (when not nil) exits.
func (e *Env) WaitServing(p *lab.Proc, what string) error {
	deadline := time.Now().Add(20 * time.Second)
	url := fmt.Sprintf("ws://%s/", netip.AddrPortFrom(e.VIP, portWS))
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		c, err := lab.DialWS(ctx, e.Lab.Client, e.Lab.ClientAddrs4[0], url)
		if err == nil {
			_, err = c.Echo(ctx, "ready?")
			c.Close()
		}
		cancel()
		if err == nil {
			return nil
		}
		if p != nil {
			select {
			case <-p.Done():
				return fmt.Errorf("%s exited (%v):\n%s", what, p.Err(), p.Output())
			default:
			}
		}
		if time.Now().After(deadline) {
			out := ""
			if p != nil {
				out = "\n" + p.Output()
			}
			return fmt.Errorf("%s does not serve %s after 20s: %v%s", what, url, err, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// undo runs fs in reverse order and joins their errors: the stop function
// a peer returns.
func undo(fs ...func() error) func() error {
	return func() error {
		var errs []error
		for i := len(fs) - 1; i >= 0; i-- {
			if fs[i] != nil {
				errs = append(errs, fs[i]())
			}
		}
		return errors.Join(errs...)
	}
}

// joinErr returns err with the cleanup error, if any, appended.
func joinErr(err, cleanupErr error) error {
	if cleanupErr == nil {
		return err
	}
	return fmt.Errorf("%w (and cleaning up: %v)", err, cleanupErr)
}
