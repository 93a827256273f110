package benchrun

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
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
	// perf ends once: by stop's SIGINT, which has it write its data, or by
	// the bench's exit, which kills it.
	var (
		once    sync.Once
		waitErr error
	)
	end := func(sig os.Signal) error {
		once.Do(func() {
			rec.Process.Signal(sig)
			waitErr = rec.Wait()
		})
		return waitErr
	}
	AtExit(func() { end(os.Kill); os.RemoveAll(dir) })
	time.Sleep(300 * time.Millisecond) // perf opens its events on every CPU
	return func() (map[string]int, error) {
		defer os.RemoveAll(dir)
		// perf writes its data and ends with the signal's status.
		if err := end(os.Interrupt); err != nil && !interrupted(err) {
			return nil, fmt.Errorf("perf record: %w: %s", err, strings.TrimSpace(out.String()))
		}
		rep, err := exec.Command(perf, "report", "-i", file, "--stdio", "-q", "--sort", "sym", "-F", "sample,sym").Output()
		if err != nil {
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				err = fmt.Errorf("%w: %s", err, strings.TrimSpace(string(ee.Stderr)))
			}
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
