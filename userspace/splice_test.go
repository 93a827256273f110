package userspace

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/maglev"
)

// The tests here run the proxy alone in a child process (this test binary
// started again as a helper), so that what the kernel counts for that
// process is the proxy's work only.

const (
	helperEnv        = "TETHER_USERSPACE_HELPER" // "vip backend" turns the binary into the helper
	helperPipeSize   = 256 << 10
	zeroCopyConns    = 4
	zeroCopyPerConn  = 64 << 20 // bytes each way
	straceConns      = 2
	straceBytes      = 32 << 20
	memoryIdleConns  = 500
	helperStartLimit = 10 * time.Second
)

func TestMain(m *testing.M) {
	if spec := os.Getenv(helperEnv); spec != "" {
		os.Exit(helperMain(spec))
	}
	os.Exit(m.Run())
}

// helperStats is what the helper reports about itself.
type helperStats struct {
	Heap, Stack   uint64 // runtime.MemStats HeapAlloc and StackInuse after a GC
	Goroutines    int
	FDs           int
	Rchar, Wchar  uint64 // /proc/self/io: bytes through read(2)/write(2) and the like
	Syscr, Syscw  uint64 // /proc/self/io: read and write calls
	Bytes, Splice uint64 // the proxy's counters
	Flows         int
}

// helperMain serves one service (VIP, one backend) until stdin ends,
// answering each "stats" line on stdin with a JSON helperStats line.
func helperMain(spec string) int {
	vs, bs, _ := strings.Cut(spec, " ")
	vip, err := netip.ParseAddrPort(vs)
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 2
	}
	be, err := netip.ParseAddrPort(bs)
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 2
	}
	p := New(slog.New(slog.NewTextHandler(os.Stderr, nil)), maglev.DefaultSeed, Options{PipeSize: helperPipeSize})
	defer p.Close()
	ring, _ := maglev.Build([]maglev.Backend{{ID: 1, Key: be.String(), Weight: 1}}, ringSize, maglev.DefaultSeed)
	err = p.UpsertService(datapath.Service{
		ID: 1, Name: "helper", VIP: vip.Addr(), Port: vip.Port(), Proto: 6,
		Backends: []datapath.Backend{{ID: 1, Addr: be.Addr(), Port: be.Port(), Weight: 1, State: datapath.Active}},
		Ring:     ring,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 1
	}
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		var st helperStats
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		st.Heap, st.Stack, st.Goroutines = m.HeapAlloc, m.StackInuse, runtime.NumGoroutine()
		ents, _ := os.ReadDir("/proc/self/fd")
		st.FDs = len(ents)
		pio, _ := os.ReadFile("/proc/self/io")
		for _, l := range strings.Split(string(pio), "\n") {
			k, v, _ := strings.Cut(l, ": ")
			n, _ := strconv.ParseUint(v, 10, 64)
			switch k {
			case "rchar":
				st.Rchar = n
			case "wchar":
				st.Wchar = n
			case "syscr":
				st.Syscr = n
			case "syscw":
				st.Syscw = n
			}
		}
		c, _ := p.Counters()
		st.Bytes, st.Splice = c.Backends[1].Bytes, c.Backends[1].Packets
		f, _ := p.Flows()
		st.Flows = len(f)
		b, _ := json.Marshal(st)
		fmt.Println(string(b))
	}
	return 0
}

// helper is a running helper process.
type helper struct {
	cmd   *exec.Cmd
	in    io.WriteCloser
	out   *bufio.Scanner
	vip   netip.AddrPort
	errMu sync.Mutex
	errb  strings.Builder
}

// startHelper runs the proxy in a child process in front of backend, with
// the command prefixed by wrap (strace...).
func startHelper(t *testing.T, backend netip.AddrPort, wrap ...string) *helper {
	t.Helper()
	h := &helper{vip: loopVIPPort(t)}
	args := append(wrap, os.Args[0], "-test.run=^$")
	h.cmd = exec.Command(args[0], args[1:]...)
	h.cmd.Env = append(os.Environ(), helperEnv+"="+h.vip.String()+" "+backend.String())
	h.cmd.Stderr = writerFunc(func(b []byte) (int, error) {
		h.errMu.Lock()
		defer h.errMu.Unlock()
		return h.errb.Write(b)
	})
	var err error
	if h.in, err = h.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	out, err := h.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	h.out = bufio.NewScanner(out)
	if err := h.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		h.cmd.Process.Kill()
		h.cmd.Wait()
	})
	ready := make(chan bool, 1)
	go func() { ready <- h.out.Scan() && h.out.Text() == "ready" }()
	select {
	case ok := <-ready:
		if !ok {
			t.Fatalf("helper did not start: %s", h.stderr())
		}
	case <-time.After(helperStartLimit):
		t.Fatalf("helper not ready after %v: %s", helperStartLimit, h.stderr())
	}
	return h
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }

func (h *helper) stderr() string {
	h.errMu.Lock()
	defer h.errMu.Unlock()
	return h.errb.String()
}

func (h *helper) stats(t *testing.T) helperStats {
	t.Helper()
	if _, err := io.WriteString(h.in, "stats\n"); err != nil {
		t.Fatal(err)
	}
	if !h.out.Scan() {
		t.Fatalf("helper: no stats: %v %s", h.out.Err(), h.stderr())
	}
	var st helperStats
	if err := json.Unmarshal(h.out.Bytes(), &st); err != nil {
		t.Fatal(err)
	}
	return st
}

// stop ends the helper and waits for it.
func (h *helper) stop(t *testing.T) {
	t.Helper()
	h.in.Close()
	done := make(chan error, 1)
	go func() { done <- h.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("helper: %v: %s", err, h.stderr())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("helper did not exit: %s", h.stderr())
	}
}

// sinkSource is a backend that sends n bytes and reads everything it gets,
// at the same time, then closes.
func sinkSource(n int64) func(net.Conn) {
	return func(c net.Conn) {
		c.SetDeadline(time.Now().Add(30 * time.Second))
		done := make(chan struct{})
		go func() {
			defer close(done)
			io.CopyN(c, zeros{}, n)
			c.(*net.TCPConn).CloseWrite()
		}()
		io.Copy(io.Discard, c)
		<-done
	}
}

type zeros struct{}

func (zeros) Read(b []byte) (int, error) {
	clear(b)
	return len(b), nil
}

// exchange opens conns connections to vip, each sending n bytes (then a
// FIN) while reading the backend's n bytes; it returns the bytes moved
// through the proxy, both ways.
func exchange(t *testing.T, vip netip.AddrPort, conns int, n int64) int64 {
	t.Helper()
	var wg sync.WaitGroup
	errs := make([]error, conns)
	for i := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.DialTimeout("tcp", vip.String(), 5*time.Second)
			if err != nil {
				errs[i] = err
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			werr := make(chan error, 1)
			go func() {
				_, err := io.CopyN(c, zeros{}, n)
				if err == nil {
					err = c.(*net.TCPConn).CloseWrite()
				}
				werr <- err
			}()
			got, err := io.Copy(io.Discard, c)
			errs[i] = errors.Join(err, <-werr)
			if got != n {
				errs[i] = errors.Join(errs[i], fmt.Errorf("received %d bytes, want %d", got, n))
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	return 2 * int64(conns) * n
}

// TestZeroCopy proves that the proxy's bytes never pass through userspace:
// while 512 MiB cross the proxy (in a child process of its own), the
// kernel's count of the bytes the process moved with read(2), write(2)
// and the like (/proc/PID/io rchar and wchar, which splice(2) does not
// touch) barely moves, and the proxy's own splice count shows how much
// each call carried.
func TestZeroCopy(t *testing.T) {
	be := listenServe(t, "127.0.0.1:0", sinkSource(zeroCopyPerConn))
	h := startHelper(t, be.addr)
	before, ours := h.stats(t), procIO(t)
	start := time.Now()
	moved := exchange(t, h.vip, zeroCopyConns, zeroCopyPerConn)
	elapsed := time.Since(start)
	// The control: this process's clients and backend read and write
	// every byte at both ends, and the kernel counts them.
	ours = procIO(t) - ours
	if !eventually(5*time.Second, func() bool { return h.stats(t).Flows == 0 }) {
		t.Fatal("connections still open in the helper")
	}
	after := h.stats(t)
	h.stop(t)
	spliced := after.Bytes - before.Bytes
	copied := (after.Rchar - before.Rchar) + (after.Wchar - before.Wchar)
	t.Logf("%d MiB through the proxy in %v (%.0f MiB/s): %d MiB spliced in %d splice reads (%.0f KiB each); %d bytes through read/write in %d calls (the helper's own control)",
		moved>>20, elapsed.Round(time.Millisecond), float64(moved)/(1<<20)/elapsed.Seconds(), spliced>>20, after.Splice-before.Splice,
		float64(spliced)/float64(after.Splice-before.Splice)/1024, copied, (after.Syscr-before.Syscr)+(after.Syscw-before.Syscw))
	t.Logf("control: the test's clients and backend, copying, moved %d MiB through read/write", ours>>20)
	if ours < uint64(moved) {
		t.Fatalf("/proc/self/io counts %d bytes of read/write for this process's %d: cannot tell copying from splicing here", ours, 2*moved)
	}
	if spliced != uint64(moved) {
		t.Fatalf("proxy counted %d bytes, want %d", spliced, moved)
	}
	if copied > uint64(moved)/1000 {
		t.Fatalf("%d bytes went through read/write for %d moved: not zero-copy", copied, moved)
	}
}

// procIO returns rchar + wchar of /proc/self/io.
func procIO(t *testing.T) uint64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/io")
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, _ := strings.Cut(l, ": "); k == "rchar" || k == "wchar" {
			c, _ := strconv.ParseUint(v, 10, 64)
			n += c
		}
	}
	return n
}

// TestZeroCopyStrace shows the same from outside, with strace counting
// the helper's system calls, when strace is installed.
func TestZeroCopyStrace(t *testing.T) {
	strace, err := exec.LookPath("strace")
	if err != nil {
		t.Skip("strace is not installed (apt-get install strace); TestZeroCopy proves zero-copy without it")
	}
	be := listenServe(t, "127.0.0.1:0", sinkSource(straceBytes))
	out := filepath.Join(t.TempDir(), "strace")
	h := startHelper(t, be.addr, strace, "-f", "-c", "-o", out, "-e", "trace=splice,read,write,readv,writev,recvfrom,sendto,recvmsg,sendmsg")
	moved := exchange(t, h.vip, straceConns, straceBytes)
	if !eventually(5*time.Second, func() bool { return h.stats(t).Flows == 0 }) {
		t.Fatal("connections still open in the helper")
	}
	h.stop(t)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	calls := map[string]int{}
	row := regexp.MustCompile(`^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$`)
	for _, l := range strings.Split(string(b), "\n") {
		if m := row.FindStringSubmatch(l); m != nil {
			calls[m[2]], _ = strconv.Atoi(m[1])
		}
	}
	t.Logf("strace -f -c of the helper while %d MiB crossed it:\n%s", moved>>20, b)
	// Each byte is spliced twice (socket → pipe → socket), at most a pipe's
	// worth a call.
	if min := int(2 * moved / helperPipeSize); calls["splice"] < min {
		t.Fatalf("%d splice calls for %d bytes, want at least %d", calls["splice"], moved, min)
	}
	others := 0
	for k, n := range calls {
		if k != "splice" && k != "total" {
			others += n
		}
	}
	// read/write calls are the helper's control channel and the runtime's,
	// a handful, not one per chunk.
	if others > calls["splice"]/20 {
		t.Fatalf("%d read/write-like calls against %d splice calls", others, calls["splice"])
	}
}

// TestMemoryPerIdleConnection measures what an idle proxied connection
// costs the proxy alone (the helper): file descriptors (no pipe while
// idle), goroutines (none), and Go memory.
func TestMemoryPerIdleConnection(t *testing.T) {
	be := listenServe(t, "127.0.0.1:0", namedEcho("be"))
	h := startHelper(t, be.addr)
	dialEcho(t, netip.Addr{}, h.vip).echo("warm up")
	before := h.stats(t)
	for range memoryIdleConns {
		if err := dialEcho(t, netip.Addr{}, h.vip).echo("x"); err != nil {
			t.Fatal(err)
		}
	}
	after := h.stats(t)
	n := float64(memoryIdleConns)
	fds := float64(after.FDs-before.FDs) / n
	gs := float64(after.Goroutines-before.Goroutines) / n
	heap := (float64(after.Heap) - float64(before.Heap)) / n
	stack := (float64(after.Stack) - float64(before.Stack)) / n
	t.Logf("per idle connection in the proxy: %.2f file descriptors, %.2f goroutines, %.1f KiB heap + %.1f KiB goroutine stacks = %.1f KiB",
		fds, gs, heap/1024, stack/1024, (heap+stack)/1024)
	if fds > 2.05 {
		t.Fatalf("%.2f descriptors per idle connection, want 2 (its sockets, no pipe)", fds)
	}
	// The event loops hold a connection as a small struct: no goroutine,
	// no stack, no buffer.
	if gs > 0.05 {
		t.Fatalf("%.2f goroutines per idle connection, want none", gs)
	}
	if heap+stack > 4<<10 {
		t.Fatalf("%.1f KiB of Go memory per idle connection, want under 4", (heap+stack)/1024)
	}
	h.stop(t)
}
