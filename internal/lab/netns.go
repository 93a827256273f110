package lab

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// netnsDir is where named namespaces live, the directory `ip netns` uses.
const netnsDir = "/var/run/netns"

// inNetns runs fn on a fresh goroutine whose OS thread is locked and switched
// into ns, then switched back. The caller's goroutine never changes
// namespace. A panic in fn is re-raised in the caller.
func inNetns(ns netns.NsHandle, fn func() error) error {
	return onSwitchedThread(func() error {
		if err := netns.Set(ns); err != nil {
			return fmt.Errorf("enter netns: %w", err)
		}
		return nil
	}, fn)
}

// onSwitchedThread runs fn on a fresh goroutine whose OS thread is locked
// and moved by enter (setns or unshare), then moved back to the namespace
// it had. If enter fails it must leave the thread where it was. If the
// thread cannot be moved back it stays locked, so the runtime terminates
// it when the goroutine exits instead of reusing it. A panic in fn is
// re-raised in the caller.
func onSwitchedThread(enter, fn func() error) error {
	type result struct {
		err      error
		done     bool
		panicked bool
		value    any
	}
	ch := make(chan result, 1)
	go func() {
		var r result
		defer func() { ch <- r }()

		runtime.LockOSThread()
		origin, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			r.err = fmt.Errorf("get current netns: %w", err)
			return
		}
		defer origin.Close()
		if err := enter(); err != nil {
			runtime.UnlockOSThread()
			r.err = err
			return
		}
		defer func() {
			if err := netns.Set(origin); err != nil {
				// Keep the thread locked: it dies with this goroutine.
				r.err = errors.Join(r.err, fmt.Errorf("restore netns (thread discarded): %w", err))
				return
			}
			runtime.UnlockOSThread()
		}()
		defer func() {
			if v := recover(); v != nil {
				r.panicked, r.value = true, v
			}
		}()
		r.err = fn()
		r.done = true
	}()
	r := <-ch
	if r.panicked {
		panic(r.value)
	}
	if !r.done && r.err == nil {
		return errors.New("function run in netns exited with runtime.Goexit")
	}
	return r.err
}

// prepareNetnsDir makes netnsDir a shared mount point of its own, as
// `ip netns add` does. Otherwise the first `ip netns add` run by anyone
// else would bind netnsDir over itself and hide the pins made before, which
// could then not be unmounted by path nor removed (EBUSY).
func prepareNetnsDir() error {
	if err := os.MkdirAll(netnsDir, 0o755); err != nil {
		return err
	}
	made := false
	for {
		err := unix.Mount("", netnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EINVAL) || made {
			return fmt.Errorf("make %s a shared mount: %w", netnsDir, err)
		}
		// Not a mount point yet.
		if err := unix.Mount(netnsDir, netnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind %s onto itself: %w", netnsDir, err)
		}
		made = true
	}
}

// createNetns creates a network namespace pinned at netnsDir/name, as
// `ip netns add` does, and returns an open handle to it. On error nothing is
// left behind.
func createNetns(name string) (ns netns.NsHandle, err error) {
	if err := prepareNetnsDir(); err != nil {
		return netns.None(), err
	}
	path := filepath.Join(netnsDir, name)
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return netns.None(), fmt.Errorf("create netns %s: %w", name, err)
	}
	f.Close()
	mounted := false
	defer func() {
		if err != nil {
			if mounted {
				_ = unix.Unmount(path, unix.MNT_DETACH)
			}
			_ = os.Remove(path)
		}
	}()

	err = onSwitchedThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("unshare netns: %w", err)
		}
		return nil
	}, func() error {
		self := fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid())
		if err := unix.Mount(self, path, "none", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind mount netns %s: %w", name, err)
		}
		mounted = true
		return nil
	})
	if err != nil {
		return netns.None(), err
	}
	ns, err = netns.GetFromPath(path)
	if err != nil {
		return netns.None(), fmt.Errorf("open netns %s: %w", name, err)
	}
	return ns, nil
}

// deleteNetns removes the pin of a namespace made by createNetns, as
// `ip netns delete` does. The namespace itself goes once nothing else holds
// it (open sockets, processes, handles).
func deleteNetns(name string) error {
	path := filepath.Join(netnsDir, name)
	var errs []error
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, fmt.Errorf("unmount netns %s: %w", name, err))
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("remove netns %s: %w", name, err))
	}
	return errors.Join(errs...)
}

// writeSysctls writes each value to /proc/sys/<key> inside ns, in order.
// /proc/sys/net follows the writing thread's namespace.
func writeSysctls(ns netns.NsHandle, kv ...[2]string) error {
	return inNetns(ns, func() error {
		for _, e := range kv {
			if err := os.WriteFile(filepath.Join("/proc/sys", e[0]), []byte(e[1]), 0); err != nil {
				return fmt.Errorf("sysctl %s=%s: %w", e[0], e[1], err)
			}
		}
		return nil
	})
}
