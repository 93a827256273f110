package test

import (
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/lab"
)

// debFiles are the files the package installs besides its documentation,
// and what each must hold.
var debFiles = map[string]string{
	"/usr/bin/tether":                               "",
	"/lib/systemd/system/tether.service":            "ExecStart=/usr/bin/tether run --config /etc/tether/tether.yaml",
	"/etc/tether/tether.yaml":                       "interfaces:",
	"/usr/share/man/man8/tether.8.gz":               "",
	"/usr/share/bash-completion/completions/tether": "complete -o bashdefault",
	"/usr/share/zsh/vendor-completions/_tether":     "#compdef tether",
	"/usr/share/doc/tether/docs/configuration.md":   "# Configuration",
}

// TestDebianPackage builds the package with `make deb` and installs it on
// this machine with dpkg: the files are in place, the binary runs and
// finds the example configuration valid; `dpkg -r` leaves the
// configuration alone and nothing else, `dpkg -P` that too. It leaves
// alone a machine that has tether already, as a package (even one
// removed but not purged) or installed by hand: it skips there, and fails
// where privileged tests are required (CI's fresh machine).
func TestDebianPackage(t *testing.T) {
	lab.RequirePrivileged(t)
	for _, tool := range []string{"dpkg", "dpkg-deb", "dpkg-query", "make", "gzip"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed: %v", tool, err)
		}
	}
	if reason := tetherHere(); reason != "" {
		if os.Getenv(lab.RequirePrivilegedEnv) == "1" {
			t.Fatalf("this machine has tether already (%s): the test installs and removes a package of its own", reason)
		}
		t.Skipf("this machine has tether already (%s): the test would install and remove a package of its own over it", reason)
	}
	dist := t.TempDir()
	build := exec.Command("make", "-C", "..", "deb", "DIST="+dist)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("make deb: %v\n%s", err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(dist, "tether_*.deb"))
	if len(debs) != 1 {
		t.Fatalf("make deb made %v, want one tether_*.deb", debs)
	}
	deb := debs[0]
	info, err := exec.Command("dpkg-deb", "--info", deb).CombinedOutput()
	if err != nil {
		t.Fatalf("dpkg-deb --info: %v\n%s", err, info)
	}
	t.Logf("%s (%d bytes):\n%s", filepath.Base(deb), fileSize(t, deb), info)

	dpkg := func(args ...string) {
		t.Helper()
		if err := dpkgWait(args...); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		if err := dpkgWait("--purge", "tether"); err != nil {
			t.Errorf("cleaning up: %v", err)
		}
	})
	dpkg("--install", deb)
	listed, err := exec.Command("dpkg-query", "-L", "tether").Output()
	if err != nil {
		t.Fatal(err)
	}
	var files []string // what the package installed, directories left out
	for _, p := range strings.Fields(string(listed)) {
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			files = append(files, p)
		}
	}
	for path, want := range debFiles {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Errorf("after dpkg --install: %v", err)
			continue
		}
		if !strings.Contains(string(b), want) {
			t.Errorf("%s does not hold %q", path, want)
		}
	}
	if st, err := os.Stat("/etc/tether/tether.yaml"); err == nil && st.Mode().Perm() != 0o600 {
		t.Errorf("/etc/tether/tether.yaml has mode %v, want 0600", st.Mode().Perm())
	}
	for _, args := range [][]string{{"--version"}, {"run", "--config", "/etc/tether/tether.yaml", "--check"}} {
		out, err := exec.Command("/usr/bin/tether", args...).CombinedOutput()
		if err != nil {
			t.Fatalf("tether %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		t.Logf("tether %s: %s", strings.Join(args, " "), strings.TrimSpace(string(out)))
	}
	if page, err := exec.Command("gzip", "-dc", "/usr/share/man/man8/tether.8.gz").Output(); err != nil || !strings.Contains(string(page), ".TH tether 8") || !strings.Contains(string(page), "backend") {
		t.Errorf("the man page is no roff page of tether's commands (%v):\n%.300s", err, page)
	}

	dpkg("--remove", "tether")
	for _, p := range files {
		_, err := os.Stat(p)
		switch {
		case p == "/etc/tether/tether.yaml" && err != nil:
			t.Errorf("dpkg --remove removed the configuration %s", p)
		case p != "/etc/tether/tether.yaml" && err == nil:
			t.Errorf("dpkg --remove left %s", p)
		}
	}
	dpkg("--purge", "tether")
	if _, err := os.Stat("/etc/tether/tether.yaml"); err == nil {
		t.Error("dpkg --purge left /etc/tether/tether.yaml")
	}
	t.Logf("%d files installed, all but the configuration gone after dpkg --remove, that too after --purge", len(files))
}

// dpkgWait runs dpkg with args, waiting up to 5 minutes for the lock that
// another dpkg or apt-get (unattended upgrades) may hold.
func dpkgWait(args ...string) error {
	deadline := time.Now().Add(5 * time.Minute)
	for {
		out, err := exec.Command("dpkg", args...).CombinedOutput()
		if err == nil {
			return nil
		}
		if !strings.Contains(string(out), "lock") || time.Now().After(deadline) {
			return fmt.Errorf("dpkg %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		time.Sleep(2 * time.Second)
	}
}

// tetherHere says why this machine has tether already, or "": a package
// in any state dpkg remembers (installed, or removed with its
// configuration kept), one of the package's files, /etc/tether, or state
// pinned in the default pin directory (which the package's removal
// detaches).
func tetherHere() string {
	out, err := exec.Command("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "tether").Output()
	if st := strings.TrimSpace(string(out)); err == nil && st != "" && !strings.HasPrefix(st, "un") && !strings.HasPrefix(st, "pn") {
		return "package tether, dpkg status " + st
	}
	for _, p := range append(slices.Sorted(maps.Keys(debFiles)), "/etc/tether", control.DefaultPinDir) {
		if _, err := os.Lstat(p); err == nil {
			return p + " exists"
		}
	}
	return ""
}

func fileSize(t *testing.T, path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}
