// Package damp keeps repeated log lines of one thing that changes too
// often (a backend that flaps) from flooding the log: past a number of
// events in a window, it lets one line through now and then, which says
// how many it held back.
package damp

import (
	"sync"
	"time"
)

// Defaults of a Damper's zero fields.
const (
	DefaultWindow = time.Minute
	DefaultLimit  = 6
	DefaultEvery  = 30 * time.Second
)

// Damper decides which events of each key are logged. The zero value
// uses the defaults; it is safe for concurrent use.
type Damper struct {
	// Window is how far back events count; Limit how many of them are
	// logged one by one; Every how often, beyond Limit, a line is let
	// through.
	Window time.Duration
	Limit  int
	Every  time.Duration

	mu   sync.Mutex
	keys map[string]*history
}

type history struct {
	times []time.Time // events within the window, oldest first
	last  time.Time   // the last line let through while damped
	held  int         // events not logged since then
}

// Verdict says how to log one event.
type Verdict struct {
	// Log: write the line. Damped: the key changes too often (more than
	// Limit events in Window): say so, with Held, the events of the key
	// not logged since its last line, and Recent, its events in Window.
	Log, Damped  bool
	Held, Recent int
}

// Note records an event of key at now and says whether to log it.
func (d *Damper) Note(key string, now time.Time) Verdict {
	window, limit, every := d.Window, d.Limit, d.Every
	if window <= 0 {
		window = DefaultWindow
	}
	if limit <= 0 {
		limit = DefaultLimit
	}
	if every <= 0 {
		every = DefaultEvery
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.keys == nil {
		d.keys = make(map[string]*history)
	}
	h := d.keys[key]
	if h == nil {
		h = &history{}
		d.keys[key] = h
		d.prune(now, window)
	}
	cut := 0
	for cut < len(h.times) && now.Sub(h.times[cut]) > window {
		cut++
	}
	h.times = append(h.times[cut:], now)
	v := Verdict{Recent: len(h.times)}
	switch {
	case len(h.times) <= limit:
		v.Log, v.Held = true, h.held // what was held back before it calmed
		h.held = 0
	case now.Sub(h.last) >= every:
		v.Log, v.Damped, v.Held = true, true, h.held
		h.last, h.held = now, 0
	default:
		v.Damped = true
		h.held++
	}
	return v
}

// Flush says whether to log key's state now that it has had no event for
// a while: when events of a damped key were held back and Every has passed
// since its last line, the caller logs the key's current state once (Held
// tells how many events that line stands for), so that the log never ends
// on a state the key has left. Call it as often as convenient (on every
// probe, say); it records nothing.
func (d *Damper) Flush(key string, now time.Time) Verdict {
	every := d.Every
	if every <= 0 {
		every = DefaultEvery
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	h := d.keys[key]
	if h == nil || h.held == 0 || now.Sub(h.last) < every {
		return Verdict{}
	}
	v := Verdict{Log: true, Damped: true, Held: h.held, Recent: len(h.times)}
	h.last, h.held = now, 0
	return v
}

// prune forgets the keys with no event in the window, so that keys that
// come and go (removed backends) do not pile up. d.mu is held.
func (d *Damper) prune(now time.Time, window time.Duration) {
	for k, h := range d.keys {
		// A key with events held back waits for its Flush, unless it
		// is long gone.
		if n := len(h.times); n > 0 && now.Sub(h.times[n-1]) > window && (h.held == 0 || now.Sub(h.times[n-1]) > 10*window) {
			delete(d.keys, k)
		}
	}
}
