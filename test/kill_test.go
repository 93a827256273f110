package test

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/lab"
)

// fileBackends lists the backends of every service of a configuration,
// by service name, or fails the test if the file does not parse whole.
func fileBackends(t *testing.T, path string) map[string][]string {
	t.Helper()
	f, err := config.ReadFile(path, nil)
	if err != nil {
		t.Fatalf("the configuration file after the kill: %v", err)
	}
	out := map[string][]string{}
	for _, s := range f.Config().Services {
		for _, b := range s.Backends {
			out[s.Name] = append(out[s.Name], netip.AddrPortFrom(b.Address, b.Port).String())
		}
		slices.Sort(out[s.Name])
	}
	return out
}

// whenCreated returns a channel closed as soon as a file whose name starts
// with prefix is created in dir (inotify), and a function that stops
// watching.
func whenCreated(t *testing.T, dir, prefix string) (<-chan struct{}, func()) {
	t.Helper()
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unix.InotifyAddWatch(fd, dir, unix.IN_CREATE); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	seen := make(chan struct{})
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := unix.Read(fd, buf)
			if err != nil || n <= 0 {
				return
			}
			for off := 0; off+unix.SizeofInotifyEvent <= n; {
				ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
				name := strings.TrimRight(string(buf[off+unix.SizeofInotifyEvent:off+unix.SizeofInotifyEvent+int(ev.Len)]), "\x00")
				if strings.HasPrefix(name, prefix) {
					close(seen)
					return
				}
				off += unix.SizeofInotifyEvent + int(ev.Len)
			}
		}
	}()
	return seen, func() { unix.Close(fd) }
}

// TestKilledMidChange kills the daemon with SIGKILL in the middle of a
// change, eight times, and starts it again:
//
//   - a backend added or removed through the CLI, killed the moment the
//     daemon creates the new configuration beside the old one (inotify),
//     before it applies it and renames it over the old one;
//   - the file rewritten (40 backends more, or fewer) and SIGHUP sent,
//     killed the moment the XDP program's backend table changes, before
//     the reload ends.
//
// After each kill the configuration file is whole (it parses) and holds
// either the configuration before the change or the one after (the daemon
// writes it on CLI changes; on reloads the test wrote it); no
// temporary file outlives the next start; the restarted daemon adopts the
// pinned state and serves exactly what the file says (status and the BPF
// maps: backends and rings); and the WebSocket connections held
// throughout echo from their backends.
func TestKilledMidChange(t *testing.T) {
	l := lab.NewT(t, lab.Options{Backends: 3, Clients: 10})
	for _, be := range l.Backends {
		serveEcho(t, l, be)
	}
	// Two backends; the third comes and goes. The reloads add 40
	// addresses that answer no one (no health checks: they stay active)
	// to the IPv4 service, which comes first.
	base := strings.ReplaceAll(chatConfig(l, l.Backends[:2]), "    backends:\n", "    health: {type: none}\n    backends:\n")
	var extra strings.Builder
	for i := range 40 {
		fmt.Fprintf(&extra, "      - address: 198.51.100.%d\n", 100+i)
	}
	at := strings.Index(base, "  - name: chat6")
	bigger := base[:at] + extra.String() + base[at:]

	d := startDaemon(t, l, base)
	conns := dialAll(t, l, l.ClientAddrs4, l.VIP4, 2)
	vip := netip.AddrPortFrom(l.VIP4, chatPort).String()
	be3 := netip.AddrPortFrom(l.Backends[2].Addr4, chatPort).String()
	mid := 0
	for round := range 8 {
		before := fileBackends(t, d.config)
		after := fileBackends(t, d.config)
		completed := func() bool { return false }
		var trigger <-chan struct{}
		stopWatch := func() {}
		if round%2 == 0 {
			// The CLI adds or removes the third backend.
			verb := "add"
			if slices.Contains(before["chat"], be3) {
				verb = "rm"
				after["chat"] = slices.DeleteFunc(slices.Clone(after["chat"]), func(s string) bool { return s == be3 })
			} else {
				after["chat"] = append(slices.Clone(after["chat"]), be3)
				slices.Sort(after["chat"])
			}
			trigger, stopWatch = whenCreated(t, filepath.Dir(d.config), ".tether.yaml.tmp-")
			cmd := d.host.Command(tetherBin, "--socket", d.socket, "backend", verb, vip, l.Backends[2].Addr4.String())
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			completed = func() bool { return cmd.Wait() == nil }
		} else {
			// The file changes and a reload is asked for.
			next := bigger
			if len(before["chat"]) > 3 {
				next = base
			}
			m := daemonMaps(t, l, testRing)
			n0 := len(backendIDs(t, m))
			if err := os.WriteFile(d.config, []byte(next), 0o600); err != nil {
				t.Fatal(err)
			}
			after = fileBackends(t, d.config)
			n := strings.Count(d.proc.Output(), "msg=reloaded")
			changed := make(chan struct{})
			quit := make(chan struct{})
			trigger, stopWatch = changed, func() { close(quit) }
			go func() {
				for {
					select {
					case <-quit:
						return
					case <-time.After(time.Millisecond):
					}
					if ids, err := backendTable(m); err == nil && len(ids) != n0 {
						close(changed)
						return
					}
				}
			}()
			if err := d.proc.Cmd.Process.Signal(syscall.SIGHUP); err != nil {
				t.Fatal(err)
			}
			completed = func() bool { return strings.Count(d.proc.Output(), "msg=reloaded") > n }
		}
		select {
		case <-trigger:
		case <-time.After(10 * time.Second):
			stopWatch()
			t.Fatalf("round %d: the change did not begin within 10s", round)
		}
		if err := d.proc.Kill(); err != nil {
			t.Fatal(err)
		}
		stopWatch()
		done := completed()
		if !done {
			mid++
		}
		got := fileBackends(t, d.config)
		if fmt.Sprint(got) != fmt.Sprint(before) && fmt.Sprint(got) != fmt.Sprint(after) {
			t.Fatalf("round %d: the file holds %v, neither the configuration before the change %v nor after it %v", round, got, before, after)
		}
		if done && fmt.Sprint(got) != fmt.Sprint(after) {
			t.Fatalf("round %d: the change completed, but the file holds %v, not %v", round, got, after)
		}
		temps, _ := filepath.Glob(filepath.Join(filepath.Dir(d.config), ".tether.yaml.tmp-*"))

		// The next start: the pinned state adopted, the file applied.
		p, err := d.host.Start(tetherBin, d.args...)
		if err != nil {
			t.Fatal(err)
		}
		d.proc = p
		d.waitLog("msg=ready", 15*time.Second)
		if !strings.Contains(p.Output(), `msg="adopted pinned state"`) {
			t.Errorf("round %d: the daemon started after the kill did not adopt the pinned state", round)
		}
		if left, _ := filepath.Glob(filepath.Join(filepath.Dir(d.config), ".tether.yaml.tmp-*")); len(left) > 0 {
			t.Errorf("round %d: temporary files left after the next start: %v", round, left)
		}
		agreesWithFile(t, d, l, got)
		echoAll(t, conns, fmt.Sprintf("after kill %d", round+1))
		kind := map[bool]string{true: "CLI", false: "reload"}[round%2 == 0]
		t.Logf("round %d (%s): killed %s, %d temporary file(s) left by the kill; the file holds %d+%d backends, and the next start serves them",
			round, kind, map[bool]string{true: "after the change completed", false: "in the middle of the change"}[done], len(temps), len(got["chat"]), len(got["chat6"]))
	}
	if mid == 0 {
		t.Error("no kill landed in the middle of a change")
	}
}

// agreesWithFile checks that the daemon serves the backends the file
// holds, per service, and that the XDP program's rings hold exactly the
// active ones.
func agreesWithFile(t *testing.T, d *daemon, l *lab.Lab, file map[string][]string) {
	t.Helper()
	var st control.Status
	d.cliJSON(&st, "status")
	m := daemonMaps(t, l, testRing)
	served := map[string][]string{}
	for _, s := range st.Services {
		var active []uint32
		for _, b := range s.Backends {
			served[s.Name] = append(served[s.Name], b.Address)
			if b.State == "active" {
				active = append(active, b.ID)
			}
		}
		slices.Sort(served[s.Name])
		slices.Sort(active)
		if ring := ringIDs(t, m, s.ID); !slices.Equal(ring, active) {
			t.Errorf("service %s: the ring holds backends %v, the active ones are %v", s.Name, ring, active)
		}
	}
	if fmt.Sprint(served) != fmt.Sprint(file) {
		t.Fatalf("the daemon serves %v, the file holds %v", served, file)
	}
}
