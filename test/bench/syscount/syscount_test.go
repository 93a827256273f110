package syscount

import (
	"os"
	"os/exec"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/internal/bpftest"
)

// helperEnv makes the test binary a child that makes a known number of
// system calls when told to on its standard input.
const helperEnv = "SYSCOUNT_TEST_GETPPIDS"

func TestMain(m *testing.M) {
	if n, err := strconv.Atoi(os.Getenv(helperEnv)); err == nil {
		var b [1]byte
		os.Stdin.Read(b[:]) // counting has started
		for range n {
			unix.RawSyscall(unix.SYS_GETPPID, 0, 0, 0)
		}
		// getppid stands out: neither the runtime nor the counter's own
		// reads make it. The pipe's close ends the helper.
		os.Stdin.Read(b[:])
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestCountsOneProcess counts a child's system calls: exactly the getppid
// calls it made, in its own slot, and none of this process's, which makes
// its own calls alongside.
func TestCountsOneProcess(t *testing.T) {
	bpftest.RequireBPF(t)
	const calls = 12345
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+strconv.Itoa(calls))
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		in.Close()
		cmd.Wait()
	})
	c, err := New(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	before, err := c.Read()
	if err != nil {
		t.Fatal(err)
	}
	// This process's own calls, which must not count.
	for range calls {
		unix.RawSyscall(unix.SYS_GETPPID, 0, 0, 0)
	}
	in.Write([]byte{1})
	in.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("helper: %v", err)
	}
	after, err := c.Read()
	if err != nil {
		t.Fatal(err)
	}
	got := after.Sub(before)
	if n := got[unix.SYS_GETPPID]; n != calls {
		t.Errorf("counted %d getppid calls of the child, want %d (all: %v)", n, calls, got.ByName())
	}
	if got[unix.SYS_READ] == 0 || got[unix.SYS_EXIT_GROUP] == 0 {
		t.Errorf("the child's read and exit_group calls were not counted: %v", got.ByName())
	}
	if got.Total() < calls+2 {
		t.Errorf("total %d, want at least %d", got.Total(), calls+2)
	}
	if names := got.Names(); len(names) == 0 || names[0] != Name(unix.SYS_GETPPID) {
		t.Errorf("most frequent calls %v, want getppid first", names)
	}
}

func TestName(t *testing.T) {
	if got := Name(unix.SYS_SPLICE); got != "splice" {
		t.Errorf("Name(SYS_SPLICE) = %q", got)
	}
	if got := Name(999); got != "#999" {
		t.Errorf("Name(999) = %q", got)
	}
}
