// Package health probes backends and decides whether each one is up.
//
// A [Check] says how to probe: a TCP connect, an HTTP GET expecting a status
// range, a WebSocket Upgrade handshake expecting 101 and, optionally, one
// text message echoed back, or a UDP datagram that must not meet a port
// unreachable (and, with a message to send, must be answered). It also says how often (interval), how long a
// probe may take (timeout) and how many results in a row change the verdict
// (rise successes to come up, fall failures to go down).
//
// A [Monitor] runs one goroutine per [Target], a backend address with its
// check. Targets are compared as values, so several services that probe the
// same backend with an equal check share one prober: the backend sees one
// probe per interval, not one per service. Every transition is logged through
// log/slog with the reason of the probe that decided it ("connection refused",
// "timeout", "status 503", "handshake: status 200, want 101", "echo
// mismatch"), reported to the Monitor's callback, and counted in [Status].
//
// A new target starts up: a balancer that restarts must not take its backends
// out of service while it learns their state. Its first probe runs at once;
// the second follows after a random half to one and a half intervals, which
// gives each prober its own phase so that many probers do not fire together;
// the others follow every interval. A backend that is dead when added goes
// down within (fall-0.5)*interval + timeout; one that dies later, within
// fall*interval + timeout. One that comes back is up within rise*interval
// + timeout.
//
// A check via the VIP ([ViaVIP]) probes a [Target] with a VIP at that VIP,
// from the source address and with the socket mark its [PathFunc] gives
// (the datapath steers marked packets to the backend the way it sends the
// clients'). Once a probe failed, the next ones also probe the backend's
// own address, at the same time, and their reason says whether the
// backend answers there.
//
// Probes use the network only: no kernel features, and no privileges but
// the one a socket mark needs (CAP_NET_ADMIN). Every probe's I/O, connect
// included, is bounded by the check's timeout, and nothing outlives
// [Monitor.Close].
package health

import (
	"errors"
	"fmt"
	"net/netip"
	"net/url"
	"strings"
	"time"
)

// Check types: how a backend is probed.
const (
	// TypeTCP connects to the backend and closes the connection.
	TypeTCP = "tcp"
	// TypeHTTP sends GET Path and expects a status within ExpectStatus.
	TypeHTTP = "http"
	// TypeWebSocket sends an HTTP Upgrade for Path and expects 101
	// Switching Protocols, then, when Send is set, sends it as a text
	// message and expects a text reply that contains it.
	TypeWebSocket = "websocket"
	// TypeUDP sends Send (an empty datagram when it is empty) to the
	// backend's port from a connected UDP socket. An ICMP error in
	// return (port or host unreachable) fails the probe. With Send, the
	// backend must also answer within the timeout; without it, silence
	// passes: most UDP services answer no arbitrary datagram, and a
	// closed port says so with an ICMP error.
	TypeUDP = "udp"
)

// Paths a probe takes (Check.Via).
const (
	// ViaBackend probes the backend's own address and port.
	ViaBackend = "backend"
	// ViaVIP probes the service's VIP and port along the path its
	// clients' packets take to the backend (Target.VIP, Monitor.SetPath):
	// a backend that answers on its own address but not on the VIP fails.
	ViaVIP = "vip"
)

// Defaults of a Check's optional fields.
const (
	DefaultType     = TypeTCP
	DefaultInterval = 2 * time.Second
	DefaultTimeout  = 1 * time.Second // or half the interval, when that is shorter
	DefaultRise     = 2
	DefaultFall     = 3
	DefaultPath     = "/"
)

// DefaultExpectStatus is the status range an HTTP check accepts by default:
// success and redirects (which are not followed).
var DefaultExpectStatus = [2]int{200, 399}

// MinInterval is the shortest interval a check may have.
const MinInterval = 10 * time.Millisecond

// maxSend bounds the WebSocket message or UDP datagram a check sends.
const maxSend = 4096

// Check is how a backend is probed and how its results are judged. Its zero
// fields take their defaults from [Check.Defaults]; Check is comparable, and
// equal checks of one backend share a prober.
type Check struct {
	// Type is TypeTCP, TypeHTTP or TypeWebSocket.
	Type string
	// Path is the request path, with an optional query, of an http or
	// websocket check; it defaults to "/".
	Path string
	// Host is the Host header of an http or websocket check; empty sends
	// the backend's address:port.
	Host string
	// ExpectStatus is the inclusive range of HTTP statuses an http check
	// accepts; it defaults to 200..399.
	ExpectStatus [2]int
	// Send is an optional text message of a websocket check: it is sent
	// after the handshake and the reply must be a text message containing
	// it.
	Send string
	// Interval is the time between the starts of two probes.
	Interval time.Duration
	// Timeout bounds a whole probe, connect included; it is shorter than
	// Interval.
	Timeout time.Duration
	// Rise is how many successes in a row bring a down backend up.
	Rise int
	// Fall is how many failures in a row take an up backend down.
	Fall int
	// Via is the path probes take: ViaBackend (the default, which
	// Defaults writes as "") or ViaVIP.
	Via string
}

// Defaults returns c with its zero fields set to their defaults: a tcp
// check every 2s with a timeout of 1s (or half the interval, when a shorter
// interval is given), rise 2 and fall 3; path "/" for http and websocket,
// statuses 200..399 for http; via the backend's own address (""). Fields that the type does not use stay as they
// are, so that Validate can refuse them.
func (c Check) Defaults() Check {
	if c.Type == "" {
		c.Type = DefaultType
	}
	if c.Interval == 0 {
		c.Interval = DefaultInterval
	}
	if c.Timeout == 0 {
		c.Timeout = min(DefaultTimeout, c.Interval/2)
	}
	if c.Rise == 0 {
		c.Rise = DefaultRise
	}
	if c.Fall == 0 {
		c.Fall = DefaultFall
	}
	if c.Path == "" && (c.Type == TypeHTTP || c.Type == TypeWebSocket) {
		c.Path = DefaultPath
	}
	if c.ExpectStatus == [2]int{} && c.Type == TypeHTTP {
		c.ExpectStatus = DefaultExpectStatus
	}
	if c.Via == ViaBackend {
		c.Via = "" // the default, as one value: equal checks share a prober
	}
	return c
}

// FieldError is one problem with a Check, tied to the field it is about.
type FieldError struct {
	// Field is the field's name in the configuration file, such as
	// "interval" or "expect_status".
	Field string
	// Msg says what is wrong.
	Msg string
}

// Error formats the problem as "health.FIELD: MSG".
func (e *FieldError) Error() string {
	return "health." + e.Field + ": " + e.Msg
}

// Validate reports every problem with c, each as a *FieldError, joined
// with errors.Join; nil when c is usable. It does not apply the defaults:
// call c.Defaults().Validate() for a check read from a file.
func (c Check) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, &FieldError{Field: field, Msg: fmt.Sprintf(format, args...)})
	}
	httpLike := c.Type == TypeHTTP || c.Type == TypeWebSocket

	switch c.Type {
	case TypeTCP, TypeHTTP, TypeWebSocket, TypeUDP:
	default:
		bad("type", "must be %q, %q, %q or %q, not %q", TypeTCP, TypeHTTP, TypeWebSocket, TypeUDP, c.Type)
	}

	switch {
	case c.Interval <= 0:
		bad("interval", "must be > 0")
	case c.Interval < MinInterval:
		bad("interval", "must be at least %v", MinInterval)
	}
	switch {
	case c.Timeout <= 0:
		bad("timeout", "must be > 0")
	case c.Interval > 0 && c.Timeout >= c.Interval:
		bad("timeout", "must be less than the interval (%v)", c.Interval)
	}
	if c.Rise < 1 {
		bad("rise", "must be >= 1")
	}
	if c.Fall < 1 {
		bad("fall", "must be >= 1")
	}

	if httpLike {
		if !strings.HasPrefix(c.Path, "/") {
			bad("path", "must start with /")
		} else if _, err := url.ParseRequestURI(c.Path); err != nil || strings.ContainsAny(c.Path, " #") {
			bad("path", "must be a request path such as /healthz, not %q", c.Path)
		}
		if strings.ContainsFunc(c.Host, func(r rune) bool { return r <= ' ' || r == 0x7f || r == '/' }) {
			bad("host", "must be a host name, optionally with a port, not %q", c.Host)
		}
	} else {
		if c.Path != "" {
			bad("path", "only for http and websocket checks")
		}
		if c.Host != "" {
			bad("host", "only for http and websocket checks")
		}
	}

	if c.Type == TypeHTTP {
		lo, hi := c.ExpectStatus[0], c.ExpectStatus[1]
		if lo < 100 || hi > 599 || lo > hi {
			bad("expect_status", "must be a range of HTTP statuses within 100..599, low first, not %d..%d", lo, hi)
		}
	} else if c.ExpectStatus != [2]int{} {
		bad("expect_status", "only for http checks")
	}

	if c.Type == TypeWebSocket || c.Type == TypeUDP {
		if len(c.Send) > maxSend {
			bad("send", "must be at most %d bytes", maxSend)
		}
	} else if c.Send != "" {
		bad("send", "only for websocket and udp checks")
	}
	switch {
	case c.Via != "" && c.Via != ViaBackend && c.Via != ViaVIP:
		bad("via", "must be %q or %q, not %q", ViaBackend, ViaVIP, c.Via)
	case c.Via == ViaVIP && c.Type == TypeUDP && c.Send == "":
		// Silence passes such a check, and a backend without the VIP,
		// or its decapsulation, is silent.
		bad("via", "a udp check via the VIP needs send (a datagram the service answers): without it, a backend that drops the VIP's packets passes")
	}
	return errors.Join(errs...)
}

// Target is one backend probed with one check: the identity of a prober.
// Two services that probe the same address and port with equal checks (after
// Defaults) name the same Target and share its prober.
type Target struct {
	// Addr is the backend's address and port.
	Addr netip.AddrPort
	// Check is how the backend is probed.
	Check Check
	// VIP and Protocol, set with a check via ViaVIP, are the service whose
	// clients' path the probes follow: they connect to VIP, and the
	// Monitor's PathFunc says how they reach Addr's backend that way.
	VIP      netip.AddrPort
	Protocol string
}

// String returns the target for logs: the check's type and the backend as
// a URL, then what else tells the check apart from others of the backend:
// "tcp://192.0.2.11:8765", "http://[2001:db8::11]:80/healthz",
// "http://192.0.2.11:80/ host app.example status 200-204",
// "ws://192.0.2.11:80/ws send \"ping\"", "tcp://192.0.2.11:80 via
// 203.0.113.10:80".
func (t Target) String() string {
	var b strings.Builder
	switch t.Check.Type {
	case TypeHTTP:
		b.WriteString("http://" + t.Addr.String() + t.Check.Path)
	case TypeWebSocket:
		b.WriteString("ws://" + t.Addr.String() + t.Check.Path)
	default:
		b.WriteString(t.Check.Type + "://" + t.Addr.String())
	}
	if t.Check.Host != "" {
		b.WriteString(" host " + t.Check.Host)
	}
	if s := t.Check.ExpectStatus; s != DefaultExpectStatus && s != [2]int{} {
		fmt.Fprintf(&b, " status %d-%d", s[0], s[1])
	}
	if t.Check.Send != "" {
		fmt.Fprintf(&b, " send %q", t.Check.Send)
	}
	if t.VIP.IsValid() {
		b.WriteString(" via " + t.VIP.String())
	}
	return b.String()
}

// withDefaults returns t with the defaults of its check applied: the form a
// Monitor keys its probers by.
func (t Target) withDefaults() Target {
	t.Check = t.Check.Defaults()
	return t
}

// validate reports a problem with the address or the check of t.
func (t Target) validate() error {
	if !t.Addr.Addr().IsValid() || t.Addr.Addr().IsUnspecified() {
		return fmt.Errorf("health: target %s: invalid backend address", t)
	}
	if t.Addr.Port() == 0 {
		return fmt.Errorf("health: target %s: backend port must not be 0", t)
	}
	if t.VIP.IsValid() != (t.Check.Via == ViaVIP) {
		return fmt.Errorf("health: target %s: a VIP goes with a check via %q, and only with one", t, ViaVIP)
	}
	if t.VIP.IsValid() && t.VIP.Port() == 0 {
		return fmt.Errorf("health: target %s: VIP port must not be 0", t)
	}
	if err := t.Check.Validate(); err != nil {
		return fmt.Errorf("health: target %s: %w", t, err)
	}
	return nil
}

// Result is the outcome of one probe.
type Result struct {
	// OK says whether the probe succeeded.
	OK bool
	// Reason is "ok" or why the probe failed: "connection refused",
	// "timeout", "status 503", "handshake: status 200, want 101", "echo
	// mismatch", ...
	Reason string
	// Latency is how long the probe took.
	Latency time.Duration
	// At is when the probe started.
	At time.Time
}

// Status is the state of one target, with its counters.
type Status struct {
	// Up says whether the backend is in service.
	Up bool
	// Result is the last probe's; its zero value until the first probe
	// completes.
	Result Result
	// Since is when the target last changed state, or when it was added.
	Since time.Time
	// Probes counts the probes completed.
	Probes uint64
	// Failures counts the probes that failed.
	Failures uint64
	// Transitions counts the changes between up and down.
	Transitions uint64
}
