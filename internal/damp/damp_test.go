package damp

import (
	"testing"
	"time"
)

// TestDamper: a key that changes every second for two minutes is logged
// six times one by one, then once every 30 s with the count held back,
// and one by one again after a quiet minute; another key is not affected.
func TestDamper(t *testing.T) {
	var d Damper
	t0 := time.Unix(1_700_000_000, 0)
	logged, held := 0, 0
	var lines []Verdict
	for i := range 120 {
		v := d.Note("be3", t0.Add(time.Duration(i)*time.Second))
		if v.Log {
			logged++
			held += v.Held
			lines = append(lines, v)
		}
		if i%15 == 0 {
			if w := d.Note("be1", t0.Add(time.Duration(i)*time.Second)); !w.Log || w.Damped {
				t.Fatalf("a key with an event every 15 s was damped: %+v", w)
			}
		}
	}
	// 6 one by one, then lines at 6 s, 36 s, 66 s, 96 s; the 23 events
	// after that are told by the next line.
	if logged != 10 || held+logged != 97 {
		t.Fatalf("logged %d lines holding back %d of 120 events, want 10 lines accounting for 97: %+v", logged, held, lines)
	}
	for i, v := range lines {
		if damped := i >= 6; v.Damped != damped {
			t.Errorf("line %d: damped %v, want %v", i, v.Damped, damped)
		}
	}
	// The last events held back are told once Every has passed without
	// a line, if the caller flushes.
	if v := d.Flush("be3", t0.Add(119*time.Second)); v.Log {
		t.Errorf("flushed %+v 23 s after the last line, before Every", v)
	}
	if v := d.Flush("be3", t0.Add(126*time.Second)); !v.Log || v.Held != 23 {
		t.Errorf("flush 30 s after the last line: %+v, want a line for the 23 events held back", v)
	}
	if v := d.Flush("be3", t0.Add(200*time.Second)); v.Log {
		t.Errorf("a second flush with nothing held: %+v", v)
	}
	if v := d.Note("be3", t0.Add(119*time.Second+2*time.Minute)); !v.Log || v.Damped || v.Held != 0 {
		t.Errorf("after a quiet minute: %+v, want a line as usual", v)
	}
	d.Note("gone", t0)
	d.Note("new", t0.Add(10*time.Minute))
	if _, ok := d.keys["gone"]; ok {
		t.Error("a key with no event for ten minutes is still kept")
	}
}
