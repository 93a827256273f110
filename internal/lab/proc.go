package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// stopGrace is how long Stop waits after SIGTERM before sending SIGKILL.
const stopGrace = 5 * time.Second

// Proc is a process started in a host's namespace by Host.Start. The lab
// stops it on Close if it is still running.
type Proc struct {
	// Cmd is the started command (`ip netns exec <ns> name args...`; ip
	// execs name, so Cmd.Process.Pid is the program's own PID).
	Cmd *exec.Cmd

	out  lockedBuffer
	done chan struct{}
	err  error // Wait's result, set before done is closed
	lab  *Lab
}

// Command returns a command that runs name with args inside h's namespace
// through `ip netns exec` (which execs name: the process is name itself).
// It is for commands that run to completion; Start is for the long-running
// ones, which the lab stops on Close.
func (h *Host) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", h.NS, name}, args...)...)
}

// Run runs name with args inside h's namespace and waits for it. An error
// names the command and the host and carries what it printed.
func (h *Host) Run(name string, args ...string) error {
	if out, err := h.Command(name, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s in %s: %v: %s", name, strings.Join(args, " "), h.Name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Start runs name with args inside h's namespace through
// `ip netns exec`, capturing stdout and stderr together (see Proc.Output).
// The process is registered with the lab, which stops it on Close.
func (h *Host) Start(name string, args ...string) (*Proc, error) {
	l := h.lab
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, errClosed
	}
	cmd := h.Command(name, args...)
	p := &Proc{Cmd: cmd, done: make(chan struct{}), lab: l}
	cmd.Stdout = &p.out
	cmd.Stderr = &p.out
	// If this process dies without Close, the child gets SIGKILL too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s in %s: %w", name, h.NS, err)
	}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	l.procs[p] = struct{}{}
	return p, nil
}

// Done is closed once the process has exited and been reaped.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Err returns the process's exit error (nil for exit status 0) once Done is
// closed, and nil before.
func (p *Proc) Err() error {
	select {
	case <-p.done:
		return p.err
	default:
		return nil
	}
}

// Output returns everything the process has written to stdout and stderr so
// far.
func (p *Proc) Output() string { return p.out.String() }

// WaitOutput waits until the process's output holds s (counting from its
// start), polling every 20 ms. It fails, naming the process as what, if
// the process exits first, timeout passes or ctx ends.
func (p *Proc) WaitOutput(ctx context.Context, what, s string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for !strings.Contains(p.Output(), s) {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-p.done:
			return fmt.Errorf("%s exited (%v) before printing %q:\n%s", what, p.Err(), s, p.Output())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not print %q within %v:\n%s", what, s, timeout, p.Output())
		}
	}
	return nil
}

// Stop sends SIGTERM to the process's PID, waits up to 5s for it to exit, then
// sends SIGKILL and waits up to 5s more. It returns nil once the process is
// gone, whatever its exit status; stopping an exited process is a no-op.
func (p *Proc) Stop() error {
	defer p.forget()
	if err := p.signal(syscall.SIGTERM); err != nil {
		return err
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(stopGrace):
	}
	return p.kill()
}

// Kill sends SIGKILL to the process's PID and waits up to 5s for it to be
// reaped.
func (p *Proc) Kill() error {
	defer p.forget()
	return p.kill()
}

func (p *Proc) kill() error {
	if err := p.signal(syscall.SIGKILL); err != nil {
		return err
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(stopGrace):
		return fmt.Errorf("pid %d did not exit %v after SIGKILL", p.Cmd.Process.Pid, stopGrace)
	}
}

// signal sends sig unless the process has already been reaped (os.Process
// refuses to signal a reaped PID, so a recycled PID is never hit).
func (p *Proc) signal(sig os.Signal) error {
	select {
	case <-p.done:
		return nil
	default:
	}
	if err := p.Cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("signal pid %d: %w", p.Cmd.Process.Pid, err)
	}
	return nil
}

func (p *Proc) forget() {
	select {
	case <-p.done:
		p.lab.mu.Lock()
		delete(p.lab.procs, p)
		p.lab.mu.Unlock()
	default:
	}
}

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
