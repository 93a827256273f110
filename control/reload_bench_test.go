package control

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
)

// BenchmarkReloadOneWeight reloads a file of 10,000 services of 6
// backends in which one backend's weight changes, over a datapath that
// does nothing: the control plane's own cost of a small change to a
// large configuration (go test -bench ReloadOneWeight ./control).
func BenchmarkReloadOneWeight(b *testing.B) {
	d, dp, path, data := largeDaemon(b)
	// The weight of a service in the middle, then back.
	mid := bytes.Index(data, []byte("name: svc-5000\n"))
	at := mid + bytes.Index(data[mid:], []byte("weight: 1\n"))
	one := bytes.Clone(data)
	one[at+len("weight: ")] = '2'
	dp.upserts = 0
	b.ResetTimer()
	for i := range b.N {
		next := data
		if i%2 == 0 {
			next = one
		}
		if err := os.WriteFile(path, next, 0o600); err != nil {
			b.Fatal(err)
		}
		if _, err := d.Reload(); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if dp.upserts != b.N {
		b.Fatalf("%d upserts for %d reloads", dp.upserts, b.N)
	}
}

// largeDaemon is a daemon of 10,000 services of 6 backends, read from
// its file (data, at path), over a nullDP.
func largeDaemon(b *testing.B) (*Daemon, *nullDP, string, []byte) {
	var buf bytes.Buffer
	fmt.Fprintf(&buf, "interfaces: [eth0]\ndatapath: xdp\ntables:\n  ring_size: 251\n  max_services: 10008\n  max_backends: 65535\nservices:\n")
	for k := range 10000 {
		fmt.Fprintf(&buf, "  - name: svc-%d\n    vip: 203.0.113.%d\n    port: %d\n    health: {type: none}\n    backends:\n", k, 1+k%234, 10000+k/234)
		for i := range 6 {
			fmt.Fprintf(&buf, "      - address: 198.51.100.%d\n        weight: 1\n", 20+(k%234+23*i)%234)
		}
	}
	path := filepath.Join(b.TempDir(), "tether.yaml")
	data := buf.Bytes()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		b.Fatal(err)
	}
	f, err := config.ReadFile(path, nil)
	if err != nil {
		b.Fatal(err)
	}
	dp := &nullDP{}
	ctl := newController(dp, f.Config())
	if err := ctl.Apply(f.Config()); err != nil {
		b.Fatal(err)
	}
	d := NewDaemon(path, f.Config(), ctl, dp, discard())
	d.file = f
	return d, dp, path, data
}

// BenchmarkChangeOneWeight changes one backend's weight among 10,000
// services through the daemon's API method (tether backend set), which
// writes the file and applies the change.
func BenchmarkChangeOneWeight(b *testing.B) {
	d, _, _, _ := largeDaemon(b)
	b.ResetTimer()
	for i := range b.N {
		w := 1 + i%2
		if _, err := d.SetBackendWeight(BackendWeightSpec{Service: "203.0.113.86:10021", Backend: "198.51.100.105", Weight: &w}); err != nil {
			b.Fatal(err)
		}
	}
}

// nullDP is a datapath that counts upserts and does nothing else (the
// fake datapath checks every call against every service it holds).
type nullDP struct{ upserts int }

func (n *nullDP) Modes() map[string]string             { return nil }
func (n *nullDP) UpsertService(datapath.Service) error { n.upserts++; return nil }
func (n *nullDP) DeleteService(datapath.Service) error { return nil }
func (n *nullDP) Counters() (datapath.Counters, error) { return datapath.Counters{}, nil }
func (n *nullDP) Flows() ([]datapath.Flow, error)      { return nil, nil }
func (n *nullDP) Close() error                         { return nil }
