package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestPackagedConfig: the example configuration the package installs is
// valid, and --check says so; a bad one is refused with its field named.
func TestPackagedConfig(t *testing.T) {
	var b strings.Builder
	if err := checkConfig(&b, "../../packaging/tether.yaml"); err != nil {
		t.Fatalf("packaging/tether.yaml: %v", err)
	}
	if !strings.Contains(b.String(), "valid; datapath auto on [eth0]; 1 service: chat (203.0.113.10:443, 3 backends)") {
		t.Errorf("--check said %q", b.String())
	}
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(bad, []byte("interfaces: [eth0]\nservices:\n  - name: x\n    vip: 203.0.113.1\n    port: 99999\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, errOut, code := run("run", "--config", bad, "--check")
	if code != exitFailed || !strings.Contains(errOut, "line 5: services[0].port: 99999 is out of range") {
		t.Errorf("--check of a bad file: exit %d, %q", code, errOut)
	}
}
