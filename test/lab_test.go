package test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/tetherlb/tether/internal/lab"
)

// TestLabCommand runs `tether lab --no-tty --duration 30s` (30 s per
// scenario, the default 30 clients) and checks its scenario lines and that
// it leaves nothing behind: no namespace, process or bpffs mount.
func TestLabCommand(t *testing.T) {
	lab.RequirePrivileged(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, tetherBin, "lab", "--no-tty", "--duration", "30s")
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
	for _, s := range []string{"steady", "kill", "drain", "scaleout"} {
		line := regexp.MustCompile(`(?m)^` + s + `: (\d+) connections lost, \d+/30 clients changed backend; .+$`).FindSubmatch(out)
		if line == nil {
			t.Errorf("no %s line", s)
			continue
		}
		if (s == "steady" || s == "drain") && string(line[1]) != "0" {
			t.Errorf("%s: %s connections lost, want 0", s, line[1])
		}
	}
	if !regexp.MustCompile(`(?m)^summary: 4 scenarios`).Match(out) {
		t.Error("no summary line")
	}
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
	// Every process the lab started runs the tether binary under test.
	procs, _ := filepath.Glob("/proc/[0-9]*/exe")
	for _, p := range procs {
		if exe, err := os.Readlink(p); err == nil && exe == tetherBin {
			cmdline, _ := os.ReadFile(filepath.Join(filepath.Dir(p), "cmdline"))
			t.Errorf("process left: %s %q", p, strings.ReplaceAll(string(cmdline), "\x00", " "))
		}
	}
}
