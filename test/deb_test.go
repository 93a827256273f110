package test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

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
// configuration alone and nothing else, `dpkg -P` that too. It refuses to
// touch a machine where a tether package is installed already.
func TestDebianPackage(t *testing.T) {
	lab.RequirePrivileged(t)
	for _, tool := range []string{"dpkg", "dpkg-deb", "make", "gzip"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed: %v", tool, err)
		}
	}
	if out, err := exec.Command("dpkg-query", "-W", "-f=${Status}", "tether").CombinedOutput(); err == nil && strings.Contains(string(out), "installed") {
		t.Fatalf("a tether package is installed on this machine already (%s): the test installs and removes its own", out)
	}
	dist := t.TempDir()
	build := exec.Command("make", "-C", "..", "deb", "DIST="+dist)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("make deb: %v\n%s", err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(dist, "tether_*_amd64.deb"))
	if len(debs) != 1 {
		t.Fatalf("make deb made %v, want one tether_*_amd64.deb", debs)
	}
	deb := debs[0]
	info, err := exec.Command("dpkg-deb", "--info", deb).CombinedOutput()
	if err != nil {
		t.Fatalf("dpkg-deb --info: %v\n%s", err, info)
	}
	t.Logf("%s (%d bytes):\n%s", filepath.Base(deb), fileSize(t, deb), info)

	dpkg := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("dpkg", args...).CombinedOutput(); err != nil {
			t.Fatalf("dpkg %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	t.Cleanup(func() { exec.Command("dpkg", "--purge", "tether").Run() })
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

func fileSize(t *testing.T, path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}
