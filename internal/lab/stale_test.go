package lab

import (
	"bufio"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestHelperLabThenHang is not a test: TestStaleLabSwept runs it in a child
// process, which builds a lab, prints its id and waits to be killed.
func TestHelperLabThenHang(t *testing.T) {
	if os.Getenv("TETHER_LAB_HELPER") != "1" {
		t.Skip("helper process for TestStaleLabSwept")
	}
	l, err := New(Options{Backends: 1, Clients: 1})
	if err != nil {
		t.Fatal(err)
	}
	os.Stdout.WriteString("lab " + l.ID + "\n")
	time.Sleep(time.Minute)
}

// TestStaleLabSwept kills a process that built a lab (so it cannot clean
// up) and checks that the next New removes what that lab left.
func TestStaleLabSwept(t *testing.T) {
	RequirePrivileged(t)
	cmd := exec.Command(os.Args[0], "-test.run", "^TestHelperLabThenHang$", "-test.v")
	cmd.Env = append(os.Environ(), "TETHER_LAB_HELPER=1")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	id := ""
	ids := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if f := strings.Fields(sc.Text()); len(f) == 2 && f[0] == "lab" {
				ids <- f[1]
				return
			}
		}
		close(ids)
	}()
	select {
	case id = <-ids:
	case <-time.After(30 * time.Second):
		t.Fatal("helper built no lab within 30s")
	}
	if id == "" {
		t.Fatal("helper exited without a lab")
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	if n := leftovers(t, id); n == 0 {
		t.Fatalf("the killed helper's lab %s left nothing: the test proves nothing", id)
	}
	l := NewT(t, Options{Backends: 1, Clients: 1})
	_ = l
	if n := leftovers(t, id); n != 0 {
		t.Fatalf("%d namespaces or mounts of dead lab %s remain after New", n, id)
	}
}

// leftovers counts the namespaces and mounts of lab id.
func leftovers(t *testing.T, id string) int {
	t.Helper()
	n := 0
	names, _ := os.ReadDir(netnsDir)
	for _, e := range names {
		if strings.HasPrefix(e.Name(), "tether-"+id+"-") {
			n++
		}
	}
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	n += strings.Count(string(mounts), "tether-"+id+"-bpffs-")
	return n
}
