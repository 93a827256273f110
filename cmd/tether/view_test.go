package main

import (
	"encoding/json"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// loadSnapshot reads a recorded viewSnapshot from testdata.
func loadSnapshot(t *testing.T, name string) viewSnapshot {
	t.Helper()
	data, err := os.ReadFile("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	var s viewSnapshot
	dec := json.NewDecoder(strings.NewReader(string(data)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return s
}

// viewLine returns the one line of out that holds s.
func viewLine(t *testing.T, out, s string) string {
	t.Helper()
	var found []string
	for line := range strings.Lines(out) {
		if strings.Contains(line, s) {
			found = append(found, strings.TrimRight(line, "\n"))
		}
	}
	if len(found) != 1 {
		t.Fatalf("%d lines hold %q, want 1:\n%s", len(found), s, out)
	}
	return found[0]
}

// TestRenderView draws the live view from a recorded snapshot pair, two
// seconds apart, and checks its numbers against the fixtures.
func TestRenderView(t *testing.T) {
	prev, cur := loadSnapshot(t, "view_prev.json"), loadSnapshot(t, "view_cur.json")
	if d := cur.At.Sub(prev.At); d != 2*time.Second {
		t.Fatalf("fixtures %v apart, want 2s", d)
	}
	out := renderView(prev, cur, 2*time.Second, 100)
	t.Logf("view:\n%s", out)
	if strings.Contains(out, "\033") {
		t.Error("the view holds escape sequences")
	}

	viewLine(t, out, "datapath xdp (eth0: native), rates over 2s")
	viewLine(t, out, "chat 203.0.113.10:8765/tcp: up, source affinity, dsr forwarding")
	// new conns 100 -> 130, hits 80 -> 104, misses 20 -> 26 in 2s.
	viewLine(t, out, "new conns 130 (15.0/s), affinity hits 104 (12.0/s), misses 26 (3.0/s)")

	for _, tc := range []struct {
		addr, state    string
		conns, share   int
		packets, bytes string // totals
		pps, bps       string // rates
		bar            int    // full blocks of viewBarWidth
	}{
		// 1500 packets and 2 MiB in 2s; 6 of 10 active connections.
		{"198.51.100.11:8765", "active", 6, 60, "11,500", "3.0 MiB", "750", "1.0 MiB/s", 12},
		// 400 packets and 20 KiB in 2s; 3 of 10.
		{"198.51.100.12:8765", "active", 3, 30, "4,400", "420.0 KiB", "200", "10.0 KiB/s", 6},
		// nothing forwarded; 1 of 10.
		{"198.51.100.13:8765", "draining", 1, 10, "0", "0 B", "0.0", "0 B/s", 2},
	} {
		line := viewLine(t, out, tc.addr)
		want := []string{tc.state, "up", strconv.Itoa(tc.conns), strconv.Itoa(tc.share) + "%", tc.packets, tc.bytes, tc.pps, tc.bps}
		fields := strings.Fields(line)
		joined := " " + strings.Join(fields, " ") + " "
		for _, w := range want {
			if !strings.Contains(joined, " "+w+" ") {
				t.Errorf("%s: no %q in %q", tc.addr, w, line)
			}
		}
		if got := strings.Count(line, "█"); got != tc.bar {
			t.Errorf("%s: bar of %d blocks, want %d", tc.addr, got, tc.bar)
		}
		if got := strings.Count(line, "█") + strings.Count(line, "░"); got != viewBarWidth {
			t.Errorf("%s: bar %d wide, want %d", tc.addr, got, viewBarWidth)
		}
	}
	shares := 0
	for _, b := range cur.Status.Services[0].Backends {
		shares += b.ActiveConnections
	}
	if shares != 10 {
		t.Fatalf("fixture: %d active connections, want 10", shares)
	}

	// Packets not forwarded: non-zero reasons only, with their rates.
	for r, want := range map[string]string{
		"pass_not_vip":    "90 20.0", // 50 -> 90
		"drop_no_backend": "10 5.0",  // 0 -> 10
		"drop_fragment":   "4 2.0",   // absent -> 4
	} {
		line := viewLine(t, out, r)
		if got := strings.Join(strings.Fields(line)[1:], " "); got != want {
			t.Errorf("%s: %q, want %q", r, got, want)
		}
	}
	if strings.Contains(out, "reset_service_down") {
		t.Error("a zero reason is shown")
	}
	if strings.Index(out, "pass_not_vip") > strings.Index(out, "drop_fragment") {
		t.Error("passes are not listed before drops")
	}
}

// TestRenderViewNoRates draws totals only, without panicking, when there
// is no previous snapshot, no elapsed time, or counters went back.
func TestRenderViewNoRates(t *testing.T) {
	prev, cur := loadSnapshot(t, "view_prev.json"), loadSnapshot(t, "view_cur.json")
	for name, tc := range map[string]struct {
		prev, cur viewSnapshot
		elapsed   time.Duration
	}{
		"no prev":      {viewSnapshot{}, cur, 0},
		"no prev, 2s":  {viewSnapshot{}, cur, 2 * time.Second},
		"zero elapsed": {prev, cur, 0},
		"reset":        {cur, prev, 2 * time.Second}, // counters went back
		"empty":        {viewSnapshot{}, viewSnapshot{}, time.Second},
	} {
		out := renderView(tc.prev, tc.cur, tc.elapsed, 60)
		if name == "empty" {
			if !strings.Contains(out, "no services") {
				t.Errorf("%s: no \"no services\":\n%s", name, out)
			}
			continue
		}
		if name != "reset" && strings.Contains(out, "/s") {
			t.Errorf("%s: rates shown:\n%s", name, out)
		}
		if name == "reset" {
			// be1 and be2 went back: no rates; be3 stayed at 0.
			for _, be := range []string{"198.51.100.11:8765", "198.51.100.12:8765"} {
				if f := strings.Fields(viewLine(t, out, be)); f[len(f)-1] != "-" || f[len(f)-2] != "-" {
					t.Errorf("reset: %s has rates: %q", be, f)
				}
			}
			viewLine(t, out, "new conns 100, affinity hits 80, misses 20")
			continue
		}
		if strings.Contains(out, "B/s") {
			t.Errorf("%s: backend byte rates shown:\n%s", name, out)
		}
		viewLine(t, out, "new conns 130, affinity hits 104, misses 26")
		line := viewLine(t, out, "198.51.100.11:8765")
		for _, w := range []string{"11,500", "3.0 MiB", "60%"} {
			if !strings.Contains(line, w) {
				t.Errorf("%s: no %q in %q", name, w, line)
			}
		}
		if got := strings.Count(line, "█") + strings.Count(line, "░"); got != viewBarWidthNarrow {
			t.Errorf("%s: bar %d wide at 60 columns, want %d", name, got, viewBarWidthNarrow)
		}
	}
}

// TestWithPackets: the reasons' table lists passes, then drops, then
// resets, leaving out those that counted nothing.
func TestWithPackets(t *testing.T) {
	reasons := withPackets(map[string]uint64{
		"reset_no_backend": 1, "pass_not_vip": 3, "drop_truncated": 2, "drop_bad_header": 0,
	})
	if want := []string{"pass_not_vip", "drop_truncated", "reset_no_backend"}; !slices.Equal(reasons, want) {
		t.Errorf("withPackets = %v, want %v", reasons, want)
	}
}
