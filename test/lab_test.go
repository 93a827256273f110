package test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tetherlb/tether/internal/lab"
)

// TestLabCommand runs `tether lab --no-tty --duration 30s` (30 s per
// scenario, the default 30 clients), and with two hosts behind the BIRD
// router its hostkill scenario, and checks their scenario lines and that
// they leave nothing behind: no namespace, process or bpffs mount.
func TestLabCommand(t *testing.T) {
	lab.RequirePrivileged(t)
	for _, run := range []struct {
		name      string
		args      []string
		scenarios []string
		lossless  []string // scenarios that must lose no connection and move no client
	}{
		{"one host", []string{"--duration", "30s"}, []string{"steady", "kill", "drain", "scaleout"}, []string{"steady", "drain"}},
		{"two hosts", []string{"--hosts", "2", "--scenario", "steady,hostkill", "--duration", "12s"}, []string{"steady", "hostkill"}, []string{"steady", "hostkill"}},
	} {
		t.Run(run.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, tetherBin, append([]string{"lab", "--no-tty"}, run.args...)...)
			out, err := cmd.CombinedOutput()
			t.Logf("tether lab:\n%s", out)
			if err != nil {
				t.Fatalf("tether lab: %v", err)
			}
			m := regexp.MustCompile(`(?m)^lab (t[0-9a-f]+):`).FindSubmatch(out)
			if m == nil {
				t.Fatal("no lab id in the output")
			}
			id := string(m[1])
			for _, s := range run.scenarios {
				line := regexp.MustCompile(`(?m)^` + s + `: (\d+) connections lost, (\d+)/30 clients changed backend; .+$`).FindSubmatch(out)
				if line == nil {
					t.Errorf("no %s line", s)
					continue
				}
				if slices.Contains(run.lossless, s) && (string(line[1]) != "0" || string(line[2]) != "0") {
					t.Errorf("%s: %s connections lost, %s clients changed backend, want 0 and 0", s, line[1], line[2])
				}
			}
			if !regexp.MustCompile(fmt.Sprintf(`(?m)^summary: %d scenarios?`, len(run.scenarios))).Match(out) {
				t.Error("no summary line")
			}
			if run.name == "two hosts" {
				// Both hosts carried packets (steady), then host 2 alone.
				if !regexp.MustCompile(`hosts: lb announced [1-9]\d* pkt/s \| lb2 announced [1-9]\d* pkt/s`).Match(out) {
					t.Error("no line with both hosts forwarding")
				}
				if !regexp.MustCompile(`hosts: lb dead \| lb2 announced [1-9]`).Match(out) {
					t.Error("no line with host 1 dead and host 2 forwarding")
				}
			}
			leftBehind(t, id)
		})
	}
}

// leftBehind fails t for what lab id left: namespaces, bpffs mounts, or
// processes (the tether binary under test, BIRD).
func leftBehind(t *testing.T, id string) {
	t.Helper()
	ns, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(ns), "tether-"+id+"-") {
		t.Errorf("namespaces left:\n%s", ns)
	}
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(mounts), id) {
		t.Errorf("mounts of lab %s left", id)
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		exe, _ := os.Readlink(filepath.Join(filepath.Dir(p), "exe"))
		cmdline, _ := os.ReadFile(p)
		if exe == tetherBin || strings.Contains(string(cmdline), "tether-"+id+"-") {
			t.Errorf("process left: %s %q", p, strings.ReplaceAll(string(cmdline), "\x00", " "))
		}
	}
}
