package control

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestClientPermissionDenied runs a client as an unprivileged user (this
// test binary again, as nobody) against a daemon's socket, which is
// root's only: it must say so, not fail with a bare errno. As a user
// other than root the test cannot make another user, and skips.
func TestClientPermissionDenied(t *testing.T) {
	if sock := os.Getenv("TETHER_TEST_CLIENT_SOCKET"); sock != "" {
		_, err := NewClient(sock).Status(context.Background())
		fmt.Println(err)
		return
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root, to run a client as another user")
	}
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} { // nobody may reach the socket, not use it
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	sock := filepath.Join(dir, "api.sock")
	ln, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// A copy of this binary that nobody may run (the build directory is
	// root's only).
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "client.test")
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^TestClientPermissionDenied$")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "TETHER_TEST_CLIENT_SOCKET="+sock)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("client as nobody: %v\n%s", err, out)
	}
	want := "permission denied at " + sock + ": the socket is root's only; run this as root"
	if !strings.Contains(string(out), want) {
		t.Errorf("client as nobody says:\n%s\nwant %q", out, want)
	}
}
