package control

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/health"
)

// TestAPIBackendAddresses refuses, through the API, the backend addresses
// the configuration refuses without knowing the host, with the field
// named, and leaves the file as it was.
func TestAPIBackendAddresses(t *testing.T) {
	e := newAPIEnv(t, conf(4, 32, web4, svc("web5", "203.0.113.20", 80, "192.0.2.21")))
	ctx := context.Background()
	before := e.file(t)
	for _, tc := range []struct {
		backend, msg string
	}{
		{"255.255.255.255", "is the broadcast address"},
		{"224.0.0.5", "is a multicast address"},
		{"0.0.0.0", "is the unspecified address"},
		{"0.1.2.3", "is in 0.0.0.0/8"},
		{"127.0.0.1", "is a loopback address: only the splice datapath"},
		{"203.0.113.20", "is the VIP of the service web5: a VIP is not a backend"},
		{"203.0.113.10", "is the service itself"},
	} {
		_, err := e.cl.AddBackend(ctx, BackendSpec{Service: "203.0.113.10:80", Backend: tc.backend})
		var ae *APIError
		if !errors.As(err, &ae) || ae.Code != http.StatusBadRequest || !strings.Contains(ae.Msg, tc.msg) || !strings.Contains(ae.Field, "backends") {
			t.Errorf("backend %s: %v, want a refusal saying %q with the field named", tc.backend, err, tc.msg)
		}
	}
	if !bytes.Equal(e.file(t), before) {
		t.Error("a refused backend changed the file")
	}
	if calls := e.dp.take(); len(calls) != 0 {
		t.Errorf("a refused backend reached the datapath: %v", calls)
	}
}

// TestAPIUDPHealth checks the health a UDP service added through the API
// gets: none by default, a udp check when asked; a udp check of a TCP
// service is refused; a health block given through the API is judged as
// the file's is.
func TestAPIUDPHealth(t *testing.T) {
	e := newAPIEnv(t, conf(8, 32, web4))
	ctx := context.Background()
	if _, err := e.cl.AddService(ctx, ServiceSpec{VIP: "203.0.113.30:9000", Protocol: "udp"}); err != nil {
		t.Fatal(err)
	}
	if h := e.onDisk(t).Services[1].Health; h.Type != config.HealthNone {
		t.Errorf("udp service added without health: %+v, want none", h)
	}
	if _, err := e.cl.AddService(ctx, ServiceSpec{VIP: "203.0.113.30:9001", Protocol: "udp", Health: &HealthSpec{Type: "udp", Send: "ping", Interval: "1s"}}); err != nil {
		t.Fatal(err)
	}
	want := health.Check{Type: health.TypeUDP, Send: "ping", Interval: time.Second, Timeout: 500 * time.Millisecond, Rise: 2, Fall: 3}
	if h := e.onDisk(t).Services[2].Health; h != want {
		t.Errorf("udp check: %+v, want %+v", h, want)
	}
	if _, err := e.cl.AddService(ctx, ServiceSpec{VIP: "203.0.113.30:80", Health: &HealthSpec{Type: "http", Path: "/healthz"}, OnDown: "reset"}); err != nil {
		t.Fatal(err)
	}
	s := e.onDisk(t).Services[3]
	if s.Health.Type != health.TypeHTTP || s.Health.Path != "/healthz" || s.Health.ExpectStatus != health.DefaultExpectStatus || s.OnDown != config.OnDownReset {
		t.Errorf("http check and on_down: %+v %s", s.Health, s.OnDown)
	}
	for _, tc := range []struct {
		desc  string
		spec  ServiceSpec
		field string
		msg   string
	}{
		{"a udp check of a tcp service", ServiceSpec{VIP: "203.0.113.31:80", Health: &HealthSpec{Type: "udp"}}, "health.type", "a tcp service does not answer"},
		{"an interval without a unit", ServiceSpec{VIP: "203.0.113.31:80", Health: &HealthSpec{Interval: "2"}}, "health.interval", "2 has no unit"},
		{"a timeout over the interval", ServiceSpec{VIP: "203.0.113.31:80", Health: &HealthSpec{Interval: "1s", Timeout: "2s"}}, "health.timeout", "must be less than the interval"},
		{"a path for a tcp check", ServiceSpec{VIP: "203.0.113.31:80", Health: &HealthSpec{Type: "tcp", Path: "/x"}}, "health.path", "only for http and websocket checks"},
		{"an unknown on_down", ServiceSpec{VIP: "203.0.113.31:80", OnDown: "drop"}, "on_down", "unknown mode"},
		// The name made of the protocol is not what is wrong.
		{"an upper-case protocol", ServiceSpec{VIP: "203.0.113.31:80", Protocol: "UDP"}, "protocol", `unknown protocol "UDP"`},
	} {
		_, err := e.cl.AddService(ctx, tc.spec)
		var ae *APIError
		if !errors.As(err, &ae) || ae.Field != tc.field || !strings.Contains(ae.Msg, tc.msg) {
			t.Errorf("%s: %v (field %q), want field %q saying %q", tc.desc, err, fieldOf(err), tc.field, tc.msg)
			continue
		}
		if strings.Contains(ae.Msg, "name") {
			t.Errorf("%s: the error names a field the request did not give: %s", tc.desc, ae.Msg)
		}
	}
}

func fieldOf(err error) string {
	var ae *APIError
	if errors.As(err, &ae) {
		return ae.Field
	}
	return ""
}

// TestAPISetWeight changes a backend's weight in place and refuses what
// is out of range.
func TestAPISetWeight(t *testing.T) {
	e := newAPIEnv(t, conf(8, 32, web4))
	ctx := context.Background()
	w := 3
	r, err := e.cl.SetBackendWeight(ctx, BackendWeightSpec{Service: "203.0.113.10:80", Backend: "192.0.2.12", Weight: &w})
	if err != nil || !strings.Contains(r.Message, "weight 3 (was 1)") {
		t.Fatalf("set weight: %+v, %v", r, err)
	}
	if b := e.onDisk(t).Services[0].Backends[1]; b.Weight != 3 || b.State != config.StateActive {
		t.Errorf("backend on disk: %+v", b)
	}
	// web4's three backends, the second now of weight 3.
	s := services(e.ctl)[0]
	count := map[uint32]int{}
	for _, id := range s.Ring {
		count[id]++
	}
	heavy := s.Backends[1].ID
	for id, n := range count {
		if id == heavy {
			continue
		}
		if r := float64(count[heavy]) / float64(n); r < 2.7 || r > 3.3 {
			t.Errorf("ring shares %v: backend %d has %.2f times backend %d's, want about 3", count, heavy, r, id)
		}
	}
	for _, bad := range []*int{nil, new(int), ptr(-1), ptr(10001)} {
		if bad != nil && *bad == 0 {
			continue // weight 0 is allowed: it drains
		}
		if _, err := e.cl.SetBackendWeight(ctx, BackendWeightSpec{Service: "203.0.113.10:80", Backend: "192.0.2.12", Weight: bad}); fieldOf(err) != "weight" {
			t.Errorf("weight %v: %v, want a refusal of the weight", bad, err)
		}
	}
	if _, err := e.cl.SetBackendWeight(ctx, BackendWeightSpec{Service: "203.0.113.10:80", Backend: "192.0.2.99", Weight: &w}); fieldOf(err) != "backend" {
		t.Errorf("unknown backend: %v", err)
	}
}

func ptr(n int) *int { return &n }

// TestReloadDryRun prints what a reload would change and changes nothing;
// the reload then applies it and says the same.
func TestReloadDryRun(t *testing.T) {
	e := newAPIEnv(t, conf(8, 32, web4, dns6))
	ctx := context.Background()
	r, err := e.cl.ReloadPlan(ctx)
	if err != nil || !r.Changes.Empty() || !strings.Contains(r.Message, "nothing changed") {
		t.Fatalf("dry run of an unchanged file: %+v, %v", r, err)
	}
	edited := strings.Replace(conf(8, 32, web4, svc("web6", "203.0.113.60", 80, "192.0.2.61")), "affinity_timeout: 30m", "affinity_timeout: 1h", 1)
	edited = strings.Replace(edited, "      - address: 192.0.2.12\n", "      - address: 192.0.2.12\n        weight: 2\n", 1)
	edited = strings.Replace(edited, "      - address: 192.0.2.13\n", "      - address: 192.0.2.13\n      - address: 192.0.2.14\n", 1)
	if err := os.WriteFile(e.path, []byte(edited), 0o640); err != nil {
		t.Fatal(err)
	}
	plan, err := e.cl.ReloadPlan(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := &Changes{
		ServicesAdded:   []string{"web6 (203.0.113.60:80/tcp)"},
		ServicesRemoved: []string{"dns6 ([2001:db8::10]:53/udp)"},
		ServicesChanged: []ServiceChange{{
			Service:         "web4 (203.0.113.10:80/tcp)",
			Settings:        []string{"affinity_timeout"},
			BackendsAdded:   []string{"192.0.2.14:80"},
			BackendsChanged: []string{"192.0.2.12:80 weight 1→2"},
		}},
	}
	if fmt.Sprint(plan.Changes) != fmt.Sprint(want) {
		t.Errorf("dry run:\n got %+v\nwant %+v", plan.Changes, want)
	}
	if calls := e.dp.take(); len(calls) != 0 {
		t.Errorf("a dry run reached the datapath: %v", calls)
	}
	if n := len(e.ctl.Config().Services); n != 2 || e.ctl.Config().Services[1].Name != "dns6" {
		t.Errorf("a dry run changed the running configuration")
	}
	done, err := e.cl.Reload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(done.Changes) != fmt.Sprint(want) || !strings.Contains(done.Message, "1 service added (web6 (203.0.113.60:80/tcp))") {
		t.Errorf("reload said %q, %+v", done.Message, done.Changes)
	}
	if again, _ := e.cl.ReloadPlan(ctx); !again.Changes.Empty() {
		t.Errorf("after the reload a dry run still finds %v", again.Changes)
	}
}

// TestAPIStrict checks what the API refuses of a request's form: a key
// given twice, a body on a request that takes none, a method the path
// does not take, a body over the limit.
func TestAPIStrict(t *testing.T) {
	e := newAPIEnv(t, conf(8, 32, web4))
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", e.cl.Socket())
	}}, Timeout: 5 * time.Second}
	before := e.file(t)
	for _, tc := range []struct {
		desc, method, path, body string
		code                     int
		msg                      string
	}{
		{"a key given twice", "POST", "/v1/backends", `{"service": "203.0.113.10:80", "backend": "192.0.2.20", "backend": "192.0.2.21"}`, 400, "backend: given twice"},
		{"a nested key given twice", "POST", "/v1/services", `{"vip": "203.0.113.40:80", "health": {"type": "tcp", "type": "http"}}`, 400, "health.type: given twice"},
		{"a body on a reload", "POST", "/v1/reload", `{"now": true}`, 400, "takes no request body"},
		{"a body on a removal", "DELETE", "/v1/backends?service=203.0.113.10:80&backend=192.0.2.11", `{}`, 400, "takes no request body"},
		{"a body on a status", "GET", "/v1/status", `{}`, 400, "takes no request body"},
		{"a wrong method", "DELETE", "/v1/reload", "", 405, "takes POST"},
		{"another wrong method", "POST", "/v1/status", "", 405, "takes GET"},
		{"a body over 1 MiB", "POST", "/v1/services", `{"name": "` + strings.Repeat("x", 1<<20) + `"}`, 413, "larger than"},
		{"no such endpoint", "GET", "/v1/nothing", "", 404, "no API endpoint"},
	} {
		req, err := http.NewRequest(tc.method, "http://tether"+tc.path, strings.NewReader(tc.body))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", tc.desc, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.code || !strings.Contains(string(body), tc.msg) {
			t.Errorf("%s: %d %s, want %d saying %q", tc.desc, resp.StatusCode, body, tc.code, tc.msg)
		}
		if tc.code == 405 && resp.Header.Get("Allow") == "" {
			t.Errorf("%s: no Allow header", tc.desc)
		}
	}
	if !bytes.Equal(e.file(t), before) {
		t.Error("a refused request changed the file")
	}
}

// TestStartRemovesTemps checks that the temporary files a daemon killed
// while it wrote the configuration left are removed when one starts, and
// other files are not.
func TestStartRemovesTemps(t *testing.T) {
	dir := t.TempDir()
	path := dir + "/tether.yaml"
	for _, f := range []string{path, dir + "/.tether.yaml.tmp-123", dir + "/.tether.yaml.tmp-abc", dir + "/.other.yaml.tmp-1", dir + "/tether.yaml.bak"} {
		if err := os.WriteFile(f, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	removeTemps(path, discard())
	left, _ := os.ReadDir(dir)
	var names []string
	for _, e := range left {
		names = append(names, e.Name())
	}
	if strings.Join(names, " ") != ".other.yaml.tmp-1 tether.yaml tether.yaml.bak" {
		t.Errorf("left %v", names)
	}
}
