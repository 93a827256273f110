package control

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/health"
)

// TestReloadEditIsApply reloads hundreds of random edits of a file twice:
// once as the daemon does, applying the services an edit changed alone
// (Controller.ApplyEdit), and once applying every configuration whole. The
// datapaths must end up serving the same, id for id and ring for ring, and
// the reloads must report the same changes, and the ids held must be the
// same.
func TestReloadEditIsApply(t *testing.T) {
	edited, whole := twoDaemons(t, 24, 4)
	data := edited.d.file.Data
	r := rand.New(rand.NewPCG(3, 4))
	edits := 0
	for round := range 300 {
		next := editText(r, data)
		var results [2]Result
		var errs [2]error
		for i, s := range []side{edited, whole} {
			if err := os.WriteFile(s.path, next, 0o600); err != nil {
				t.Fatal(err)
			}
			if i == 1 {
				s.d.file = nil // nothing known: the file is parsed and applied whole
			} else if s.d.file != nil {
				if f, err := config.ParseFile(s.path, next, s.d.file); err == nil {
					if _, ok := s.d.editOf(s.d.ctl.Config(), f); ok {
						edits++
					}
				}
			}
			results[i], errs[i] = s.d.Reload()
		}
		if (errs[0] == nil) != (errs[1] == nil) {
			t.Fatalf("round %d: reloads disagree: %v, %v\n%s", round, errs[0], errs[1], next)
		}
		if errs[0] != nil {
			continue // refused: both run what they ran
		}
		data = next
		if !reflect.DeepEqual(results[0].Changes, results[1].Changes) {
			t.Fatalf("round %d: changes %s, applied whole %s", round, results[0].Changes, results[1].Changes)
		}
		if !reflect.DeepEqual(edited.dp.installed, whole.dp.installed) {
			t.Fatalf("round %d: the datapaths differ:\nedited %v\nwhole  %v", round, edited.dp.installed, whole.dp.installed)
		}
		a, b := edited.d.ctl, whole.d.ctl
		if !reflect.DeepEqual(a.services, b.services) || !reflect.DeepEqual(a.backends, b.backends) {
			t.Fatalf("round %d: the id pools differ:\nedited %v %v\nwhole  %v %v", round, a.services.byKey, a.backends.byKey, b.services.byKey, b.backends.byKey)
		}
		if len(edited.dp.conflicts)+len(whole.dp.conflicts) > 0 {
			t.Fatalf("round %d: ids reused while held: %v %v", round, edited.dp.conflicts, whole.dp.conflicts)
		}
		edited.dp.take()
		whole.dp.take()
	}
	t.Logf("%d of 300 reloads applied as edits", edits)
	if edits < 100 {
		t.Errorf("only %d reloads applied as edits", edits)
	}
}

// editText makes one random change to a file Marshal wrote, as an operator
// would: a weight, a backend added or removed, a service added, removed
// or moved to another VIP, or nothing.
func editText(r *rand.Rand, data []byte) []byte {
	lines := strings.SplitAfter(string(data), "\n")
	pick := func(sub string) int {
		var at []int
		for i, l := range lines {
			if strings.Contains(l, sub) {
				at = append(at, i)
			}
		}
		if len(at) == 0 {
			return -1
		}
		return at[r.IntN(len(at))]
	}
	switch r.IntN(7) {
	case 0, 1:
		if i := pick("weight: "); i >= 0 {
			lines[i] = strings.Split(lines[i], "weight: ")[0] + fmt.Sprintf("weight: %d\n", r.IntN(4))
		}
	case 2:
		if i := pick("      - address: "); i >= 0 {
			lines[i] = fmt.Sprintf("      - address: 192.0.2.%d\n", 10+r.IntN(60)) + lines[i]
		}
	case 3:
		if i := pick("      - address: "); i >= 0 {
			end := i + 1
			for end < len(lines) && strings.HasPrefix(lines[end], "        ") {
				end++
			}
			lines = append(lines[:i], lines[end:]...)
		}
	case 4:
		if i := pick("  - name: "); i >= 0 {
			port := 1000 + r.IntN(100)
			add := fmt.Sprintf("  - name: added-%d\n    vip: 203.0.113.%d\n    port: %d\n    backends:\n      - address: 192.0.2.%d\n", port, 1+r.IntN(8), port, 10+r.IntN(60))
			lines = append(lines[:i], append([]string{add}, lines[i:]...)...)
		}
	case 5:
		if i := pick("  - name: "); i >= 0 {
			end := i + 1
			for end < len(lines) && !strings.HasPrefix(lines[end], "  - ") && strings.HasPrefix(lines[end], "    ") {
				end++
			}
			lines = append(lines[:i], lines[end:]...)
		}
	case 6:
		if i := pick("    vip: "); i >= 0 {
			lines[i] = fmt.Sprintf("    vip: 203.0.113.%d\n", 1+r.IntN(12))
		}
	}
	return bytes.Clone([]byte(strings.Join(lines, "")))
}

func netipAddr(a, b, c, d byte) netip.Addr { return netip.AddrFrom4([4]byte{a, b, c, d}) }

// TestChangeEditIsApply makes hundreds of random changes through the
// daemon's API methods twice: as the daemon makes them, applying and
// writing the one service a change touches, and with every change applied
// whole. The datapaths, the id pools and the files written must be the
// same after each, and the running configuration must be what the file
// says.
func TestChangeEditIsApply(t *testing.T) {
	edited, whole := twoDaemons(t, 12, 3)
	r := rand.New(rand.NewPCG(7, 8))
	ok := 0
	for round := range 400 {
		cfg := edited.d.ctl.Config()
		var svc string
		if len(cfg.Services) > 0 {
			s := cfg.Services[r.IntN(len(cfg.Services))]
			svc = netip.AddrPortFrom(s.VIP, s.Port).String()
		}
		be := fmt.Sprintf("192.0.2.%d", 10+r.IntN(24))
		weight := r.IntN(3)
		op := r.IntN(6)
		vip := fmt.Sprintf("203.0.113.%d:%d", 1+r.IntN(6), 80+r.IntN(3))
		var errs [2]error
		for i, s := range []side{edited, whole} {
			if i == 1 {
				s.d.ctl.desired = nil // what runs is unknown to ApplyEdit: it applies whole
			}
			switch op {
			case 0:
				_, errs[i] = s.d.AddService(ServiceSpec{VIP: vip})
			case 1:
				_, errs[i] = s.d.RemoveService(svc)
			case 2:
				_, errs[i] = s.d.AddBackend(BackendSpec{Service: svc, Backend: be})
			case 3:
				_, errs[i] = s.d.RemoveBackend(svc, be)
			case 4:
				_, errs[i] = s.d.SetBackendWeight(BackendWeightSpec{Service: svc, Backend: be, Weight: &weight})
			case 5:
				_, errs[i] = s.d.SetBackendState(BackendStateSpec{Service: svc, Backend: be, State: []string{config.StateActive, config.StateDraining}[weight%2]})
			}
		}
		if (errs[0] == nil) != (errs[1] == nil) {
			t.Fatalf("round %d (op %d): changes disagree: %v, %v", round, op, errs[0], errs[1])
		}
		if errs[0] == nil {
			ok++
		}
		a, b := edited.d.ctl, whole.d.ctl
		if !reflect.DeepEqual(edited.dp.installed, whole.dp.installed) {
			t.Fatalf("round %d (op %d): the datapaths differ:\nedited %v\nwhole  %v", round, op, edited.dp.installed, whole.dp.installed)
		}
		if !reflect.DeepEqual(a.services, b.services) || !reflect.DeepEqual(a.backends, b.backends) {
			t.Fatalf("round %d (op %d): the id pools differ", round, op)
		}
		fa, _ := os.ReadFile(edited.path)
		fb, _ := os.ReadFile(whole.path)
		if !bytes.Equal(fa, fb) {
			t.Fatalf("round %d (op %d): the files differ:\n%s\n---\n%s", round, op, fa, fb)
		}
		runs, err := a.Config().Marshal()
		if err != nil {
			t.Fatal(err)
		}
		if onDisk, err := config.Load(edited.path); err != nil {
			t.Fatalf("round %d (op %d): %v", round, op, err)
		} else if m, _ := onDisk.Marshal(); !bytes.Equal(m, runs) {
			t.Fatalf("round %d (op %d): the file does not hold the running configuration:\n%s\n---\n%s", round, op, m, runs)
		}

	}
	t.Logf("%d of 400 changes made", ok)
	if ok < 150 {
		t.Errorf("only %d changes made", ok)
	}
}

// side is a daemon over a fake datapath, serving the file at path.
type side struct {
	d    *Daemon
	dp   *fakeDP
	path string
}

// twoDaemons starts two daemons with the same file of n services, each
// with up to most backends, to make the same changes to.
func twoDaemons(t *testing.T, n, most int) (side, side) {
	t.Helper()
	base := config.Default()
	base.Interfaces = []string{"eth0"}
	base.Datapath = config.DatapathXDP
	base.Tables.RingSize = ringSize
	base.Tables.MaxServices, base.Tables.MaxBackends = 64, 512
	for k := range n {
		s := config.DefaultService()
		s.Name = fmt.Sprintf("svc-%d", k)
		s.VIP = netipAddr(203, 0, 113, byte(1+k%(n/2)))
		s.Port = uint16(80 + k/(n/2))
		for i := range 1 + k%most {
			s.Backends = append(s.Backends, config.Backend{Address: netipAddr(192, 0, 2, byte(10+(k+i)%40)), Port: s.Port, Weight: 1, State: config.StateActive})
		}
		base.Services = append(base.Services, s)
	}
	data, err := base.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	return fileDaemon(t, filepath.Join(dir, "edited.yaml"), data), fileDaemon(t, filepath.Join(dir, "whole.yaml"), data)
}

// fileDaemon starts a daemon over a fake datapath with data written to
// path as its configuration file.
func fileDaemon(t *testing.T, path string, data []byte) side {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := config.ReadFile(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	dp := newFakeDP()
	ctl := newController(dp, f.Config())
	mustApply(t, ctl, f.Config())
	d := NewDaemon(path, f.Config(), ctl, dp, discard())
	d.file = f
	return side{d, dp, path}
}

// After a change failed part way and its undo failed too, what runs is
// neither configuration: the next edit must apply the configuration
// whole, which repairs it, rather than the edited service alone.
func TestEditAfterFailedUndo(t *testing.T) {
	dp := newFakeDP()
	cur := parse(t, conf(8, 32, web4, dns6))
	c := newController(dp, cur)
	mustApply(t, c, cur)
	// web4 gains a backend and dns6 changes; dns6 fails, web4 is applied.
	dns6Changed := strings.Replace(dns6, "affinity_timeout: 1m", "affinity_timeout: 2m", 1)
	next := parse(t, conf(8, 32, web4Plus, dns6Changed))
	dp.failUpsert["dns6"] = fmt.Errorf("fake failure")
	if err := c.ApplyEdit(next, Edit{Changed: next.Services}); err == nil {
		t.Fatal("the change did not fail")
	}
	// The undo fails on web4, which keeps its fourth backend.
	dp.failUpsert["web4"] = fmt.Errorf("fake failure")
	if err := c.Apply(cur); err == nil {
		t.Fatal("the undo did not fail")
	}
	clear(dp.failUpsert)
	dp.take()
	// An edit of another service.
	web5 := strings.NewReplacer("web4", "web5", "port: 80", "port: 81").Replace(web4)
	edited := parse(t, conf(8, 32, web4, dns6, web5))
	if err := c.ApplyEdit(edited, Edit{Changed: edited.Services[2:]}); err != nil {
		t.Fatal(err)
	}
	for _, s := range dp.installed {
		if s.Name == "web4" && len(s.Backends) != 3 {
			t.Errorf("web4 runs %d backends after the next edit, want the configuration's 3", len(s.Backends))
		}
	}
}

// TestEditKeepsHealthTargets: after each change made as an edit, the
// health monitor probes exactly the backends of the configuration that
// runs, as a whole Set would make it, although it was handed the changed
// services alone. Backends are closed ports on loopback (datapath splice
// allows them), probed once an hour.
func TestEditKeepsHealthTargets(t *testing.T) {
	cfg := config.Default()
	cfg.Datapath = config.DatapathSplice
	for k := range 6 {
		s := config.DefaultService()
		s.Name = fmt.Sprintf("svc-%d", k)
		s.VIP, s.Port = netipAddr(203, 0, 113, byte(1+k)), 80
		s.Health.Interval = time.Hour
		for i := range 1 + k%3 {
			s.Backends = append(s.Backends, config.Backend{Address: netipAddr(127, 0, 0, byte(10+(k+i)%6)), Port: 9, Weight: 1, State: config.StateActive})
		}
		cfg.Services = append(cfg.Services, s)
	}
	f, err := cfg.MarshalFile()
	if err != nil {
		t.Fatal(err)
	}
	d := fileDaemon(t, filepath.Join(t.TempDir(), "tether.yaml"), f.Data).d
	if err := d.StartHealth(); err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	r := rand.New(rand.NewPCG(11, 12))
	for round := range 150 {
		svcs := d.ctl.Config().Services
		svc := ""
		if len(svcs) > 0 {
			svc = fmt.Sprintf("%s:80", svcs[r.IntN(len(svcs))].VIP)
		}
		be := fmt.Sprintf("127.0.0.%d:9", 10+r.IntN(6))
		w := r.IntN(2)
		switch r.IntN(5) {
		case 0:
			d.AddService(ServiceSpec{VIP: fmt.Sprintf("203.0.113.%d:80", 1+r.IntN(8))})
		case 1:
			d.RemoveService(svc)
		case 2:
			d.AddBackend(BackendSpec{Service: svc, Backend: be})
		case 3:
			d.RemoveBackend(svc, be)
		case 4:
			d.SetBackendWeight(BackendWeightSpec{Service: svc, Backend: be, Weight: &w})
		}
		want := map[health.Target]bool{}
		for _, tg := range targets(d.ctl.Config()) {
			tg.Check = tg.Check.Defaults()
			want[tg] = true
		}
		got := d.mon.Load().All()
		if len(got) != len(want) {
			t.Fatalf("round %d: %d targets probed, the configuration has %d", round, len(got), len(want))
		}
		for tg := range got {
			if !want[tg] {
				t.Fatalf("round %d: %s probed, not configured", round, tg)
			}
		}
	}
}
