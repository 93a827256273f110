package control

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tetherlb/tether/config"
)

// TestAPIAbusiveClients: clients that send a body one byte at a time,
// hold a connection without a request, send a body over the limit or
// malformed JSON neither block the daemon nor change anything: meanwhile a
// well-behaved client's change goes through at once, and afterwards the
// configuration file holds that change alone.
func TestAPIAbusiveClients(t *testing.T) {
	e := newAPIEnv(t, conf(2, 8, web4))
	ctx := context.Background()
	sock := filepath.Join(e.dir, "api.sock")
	dial := func() net.Conn {
		t.Helper()
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	body := `{"service": "203.0.113.10:80", "backend": "192.0.2.11:80", "state": "draining"}`

	// One byte every 100 ms of a body that drains backend .11; and a
	// connection that never sends a request.
	slow := dial()
	fmt.Fprintf(slow, "PUT /v1/backends/state HTTP/1.1\r\nHost: tether\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n", len(body))
	stop := make(chan struct{})
	trickled := make(chan struct{})
	go func() {
		defer close(trickled)
		for i := 0; i < 20 && i < len(body); i++ { // 2 s at most, never the whole body
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			slow.Write([]byte{body[i]})
		}
	}()
	dial()

	// Over the limit, and not JSON: refused, with the status that says so.
	for _, tc := range []struct {
		desc, body string
		status     int
	}{
		{"over the limit", `{"service": "` + strings.Repeat("x", maxBody) + `"}`, http.StatusRequestEntityTooLarge},
		{"not JSON", `{"service": "203.0.113.10:80", "backend": `, http.StatusBadRequest},
		{"JSON of another shape", `["203.0.113.10:80"]`, http.StatusBadRequest},
	} {
		c := dial()
		fmt.Fprintf(c, "PUT /v1/backends/state HTTP/1.1\r\nHost: tether\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(tc.body), tc.body)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("%s: %v", tc.desc, err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.status {
			t.Errorf("%s: status %d, want %d", tc.desc, resp.StatusCode, tc.status)
		}
	}

	// Meanwhile, half a second into the trickle, a well-behaved change
	// goes through at once.
	time.Sleep(500 * time.Millisecond)
	start := time.Now()
	if _, err := e.cl.SetBackendState(ctx, BackendStateSpec{Service: "203.0.113.10:80", Backend: "192.0.2.12:80", State: config.StateDraining}); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("a change took %v while slow clients held connections", took)
	}
	close(stop)
	<-trickled

	// The file says what the one complete change did, and nothing else.
	states := map[string]string{}
	for _, b := range e.onDisk(t).Services[0].Backends {
		states[b.Address.String()] = b.State
	}
	if states["192.0.2.11"] != config.StateActive || states["192.0.2.12"] != config.StateDraining || states["192.0.2.13"] != config.StateActive {
		t.Errorf("backend states on disk %v: want only 192.0.2.12 draining", states)
	}
	if bytes.Contains(e.file(t), []byte("xxxx")) {
		t.Error("the oversized body reached the file")
	}
}
