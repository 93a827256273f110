package main

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"
)

// detach says when there is nothing to remove, and refuses a directory
// that is not on a bpffs. (test/restart_test.go detaches a pinned datapath.)
func TestDetachNothing(t *testing.T) {
	var out bytes.Buffer
	dir := t.TempDir()
	if err := detach(&out, filepath.Join(dir, "none")); err != nil || !strings.Contains(out.String(), "nothing pinned in") {
		t.Errorf("detach of a missing directory: %v, %q", err, out.String())
	}
	out.Reset()
	if err := detach(&out, dir); err == nil || !strings.Contains(err.Error(), "not on a bpffs") {
		t.Errorf("detach of a directory that is not on a bpffs: %v, %q", err, out.String())
	}
}
