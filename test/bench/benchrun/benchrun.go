// Package benchrun holds what the benchmark commands share: cleanup on
// every exit path (failure, interrupt, normal end), failing and logging
// with the command's name, and the description of the machine.
package benchrun

import (
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// Name prefixes every message; commands set it first thing.
var Name = "bench"

var (
	mu       sync.Mutex
	cleanups []func()
	exitOnce sync.Once
)

// AtExit registers f to run on every exit path, last registered first.
func AtExit(f func()) {
	mu.Lock()
	defer mu.Unlock()
	cleanups = append(cleanups, f)
}

// Cleanup runs the registered functions once; a command defers it in main.
func Cleanup() {
	mu.Lock()
	fs := cleanups
	cleanups = nil
	mu.Unlock()
	for i := len(fs) - 1; i >= 0; i-- {
		fs[i]()
	}
}

// Fail reports msg, cleans up and exits with status 1. The first failure
// (or signal) wins; a later one, which the first's cleanup may cause,
// blocks until the process exits rather than exiting before the cleanup
// is done.
func Fail(msg string) {
	exitOnce.Do(func() {
		fmt.Fprintf(os.Stderr, "%s: %s\n", Name, msg)
		Cleanup()
		os.Exit(1)
	})
	select {}
}

// Report returns where a command writes its report: standard output,
// and the file at path too unless path is empty. It fails the run if the
// file cannot be created, and closes the file at exit.
func Report(path string) io.Writer {
	if path == "" {
		return os.Stdout
	}
	f, err := os.Create(path)
	if err != nil {
		Fail(err.Error())
	}
	AtExit(func() { f.Close() })
	return io.MultiWriter(os.Stdout, f)
}

// Logf writes a progress line to stderr.
func Logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, Name+": "+format+"\n", args...)
}

// FailOnSignal makes SIGINT, SIGTERM and SIGHUP a failure, so that an
// interrupted run cleans up too.
func FailOnSignal() {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	go func() { Fail("interrupted by " + (<-sig).String()) }()
}

// Kernel names the running kernel, "Linux <release>".
func Kernel() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return "kernel ?"
	}
	return "Linux " + strings.TrimSpace(string(b))
}

// Median returns the median of xs (0 for none).
func Median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// SNMPField reads field of the protocol line pair that starts with proto
// ("Tcp:") in the text of /proc/net/snmp or /proc/net/netstat: a line of
// names, then one of values.
func SNMPField(snmp, proto, field string) (uint64, error) {
	var names []string
	for line := range strings.Lines(snmp) {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != proto {
			continue
		}
		if names == nil {
			names = f
			continue
		}
		if i := slices.Index(names, field); i > 0 && i < len(f) {
			return strconv.ParseUint(f[i], 10, 64)
		}
	}
	return 0, fmt.Errorf("/proc/net/snmp has no %s %s", proto, field)
}
