package lab

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// RequirePrivilegedEnv is the environment variable that turns the skip of
// RequirePrivileged into a failure (set it to 1 in CI).
const RequirePrivilegedEnv = "TETHER_REQUIRE_PRIVILEGED"

var (
	privOnce sync.Once
	privErr  error
)

// RequirePrivileged skips tb, with the reason, unless the process can build
// labs: running as root, with network namespaces, `ip` and the right to
// create a namespace. With TETHER_REQUIRE_PRIVILEGED=1 it fails tb instead.
func RequirePrivileged(tb testing.TB) {
	tb.Helper()
	privOnce.Do(func() { privErr = probePrivileged() })
	if privErr == nil {
		return
	}
	if os.Getenv(RequirePrivilegedEnv) == "1" {
		tb.Fatalf("privileged test cannot run (%s=1): %v", RequirePrivilegedEnv, privErr)
	}
	tb.Skipf("skipping privileged test: %v (set %s=1 to fail instead)", privErr, RequirePrivilegedEnv)
}

func probePrivileged() error {
	if runtime.GOOS != "linux" {
		return fmt.Errorf("network namespaces need linux, not %s", runtime.GOOS)
	}
	if uid := os.Geteuid(); uid != 0 {
		return fmt.Errorf("needs root, running as uid %d", uid)
	}
	if _, err := os.Stat("/proc/self/ns/net"); err != nil {
		return fmt.Errorf("no network namespace support: %w", err)
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return fmt.Errorf("iproute2 `ip` not found: %w", err)
	}
	// Create an unnamed namespace on a throwaway thread and come back.
	ch := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		origin, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			ch <- err
			return
		}
		defer origin.Close()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- fmt.Errorf("cannot create a network namespace: %w", err)
			return
		}
		if err := netns.Set(origin); err != nil {
			ch <- errors.Join(errors.New("cannot return from a new network namespace"), err)
			return // thread stays locked and dies with the goroutine
		}
		runtime.UnlockOSThread()
		ch <- nil
	}()
	return <-ch
}

// NewT builds a lab for a test: it calls RequirePrivileged, then New, failing
// tb on error, and registers Close with tb.Cleanup (a Close error fails tb).
func NewT(tb testing.TB, opts Options) *Lab {
	tb.Helper()
	RequirePrivileged(tb)
	l, err := New(opts)
	if err != nil {
		tb.Fatalf("lab.New: %v", err)
	}
	tb.Cleanup(func() {
		if err := l.Close(); err != nil {
			tb.Errorf("lab %s Close: %v", l.ID, err)
		}
	})
	return l
}

// OnlineCPUs counts the CPUs online (/sys/devices/system/cpu/online, such
// as "0-3,8"): those that run XDP programs, each with its own per-CPU
// map values, whatever CPUs this process may use.
func OnlineCPUs(tb testing.TB) int {
	tb.Helper()
	b, err := os.ReadFile("/sys/devices/system/cpu/online")
	if err != nil {
		tb.Fatal(err)
	}
	n := 0
	for _, r := range strings.Split(strings.TrimSpace(string(b)), ",") {
		lo, hi, found := strings.Cut(r, "-")
		a, err1 := strconv.Atoi(lo)
		z, err2 := a, error(nil)
		if found {
			z, err2 = strconv.Atoi(hi)
		}
		if err1 != nil || err2 != nil || z < a {
			tb.Fatalf("/sys/devices/system/cpu/online: %q", b)
		}
		n += z - a + 1
	}
	return n
}
