package benchrun

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Profile samples every CPU with perf's software clock (cpu-clock, which
// needs no hardware counters, so it works in VMs without them, and sees
// the JIT'd BPF programs by their kallsyms names) until stop is called,
// which returns the samples by symbol. It needs perf (Debian:
// linux-perf).
func Profile() (stop func() (map[string]int, error), err error) {
	perf, err := exec.LookPath("perf")
	if err != nil {
		return nil, errors.New("perf is not installed (Debian: apt-get install linux-perf)")
	}
	dir, err := os.MkdirTemp("", "tether-profile-")
	if err != nil {
		return nil, err
	}
	file := filepath.Join(dir, "perf.data")
	var out strings.Builder
	rec := exec.Command(perf, "record", "-a", "-q", "-e", "cpu-clock", "-F", "4000", "-o", file)
	rec.Stdout, rec.Stderr = &out, &out
	if err := rec.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("perf record: %w", err)
	}
	end := func() { rec.Process.Kill(); rec.Wait(); os.RemoveAll(dir) }
	AtExit(end)
	time.Sleep(300 * time.Millisecond) // perf opens its events on every CPU
	return func() (map[string]int, error) {
		defer end()
		rec.Process.Signal(os.Interrupt)
		// perf writes its data and ends with the signal's status.
		if err := rec.Wait(); err != nil && !interrupted(err) {
			return nil, fmt.Errorf("perf record: %w: %s", err, strings.TrimSpace(out.String()))
		}
		rep, err := exec.Command(perf, "report", "-i", file, "--stdio", "-q", "--sort", "sym", "-F", "sample,sym").Output()
		if err != nil {
			return nil, fmt.Errorf("perf report: %w", err)
		}
		return parseReport(string(rep)), nil
	}, nil
}

// interrupted tells whether err is a process's end by SIGINT.
func interrupted(err error) bool {
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return false
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == syscall.SIGINT
}

// parseReport reads perf report's "-F sample,sym" lines ("  930  [k]
// lookup_nulls_elem_raw") into samples by symbol.
func parseReport(rep string) map[string]int {
	samples := map[string]int{}
	for line := range strings.SplitSeq(rep, "\n") {
		f := strings.Fields(line)
		if len(f) < 3 || !strings.HasPrefix(f[1], "[") {
			continue
		}
		n, err := strconv.Atoi(f[0])
		if err != nil {
			continue
		}
		samples[strings.Join(f[2:], " ")] += n
	}
	return samples
}
