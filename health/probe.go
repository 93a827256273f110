package health

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/coder/websocket"
)

// userAgent identifies tether's probes in the backends' logs.
const userAgent = "tether-health/1"

// maxBody bounds what a probe reads of a response it does not judge: an
// HTTP body, the slack of a WebSocket echo beyond the message sent.
const maxBody = 4096

// attempt is one probe's check and where it goes: a backend's own address,
// or a VIP along the path (mark, source) that leads to the backend.
type attempt struct {
	Check Check
	to    netip.AddrPort
	path  Path
}

// plain is the attempt that probes t's backend on its own address.
func plain(t Target) attempt { return attempt{Check: t.Check, to: t.Addr} }

// dialer returns a dialer for a: bounded by its check's timeout, from the
// path's source address, its socket marked with the path's mark.
func (a attempt) dialer(network string) net.Dialer {
	d := net.Dialer{Timeout: a.Check.Timeout, KeepAlive: -1}
	if a.path.Source.IsValid() {
		ip := net.IP(a.path.Source.AsSlice())
		if network == "udp" {
			d.LocalAddr = &net.UDPAddr{IP: ip}
		} else {
			d.LocalAddr = &net.TCPAddr{IP: ip}
		}
	}
	if mark := a.path.Mark; mark != 0 {
		d.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_MARK, int(mark))
			})
			return cmp.Or(err, serr)
		}
	}
	return d
}

// probe runs one probe attempt, bounded by its check's timeout, and returns its
// result. A probe cut short by the cancellation of ctx returns a failure
// that the caller must discard.
func probe(ctx context.Context, a attempt) Result {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, a.Check.Timeout)
	defer cancel()

	var err error
	switch a.Check.Type {
	case TypeHTTP:
		err = probeHTTP(ctx, a)
	case TypeWebSocket:
		err = probeWebSocket(ctx, a)
	case TypeUDP:
		err = probeUDP(ctx, a)
	default:
		err = probeTCP(ctx, a)
	}
	res := Result{OK: err == nil, Reason: "ok", Latency: time.Since(start), At: start}
	if err != nil {
		res.Reason = reason(ctx, err)
	}
	return res
}

// probeTCP connects to the backend and closes the connection.
func probeTCP(ctx context.Context, a attempt) error {
	conn, err := dial(ctx, a)
	if err != nil {
		return err
	}
	return conn.Close()
}

// probeHTTP sends GET Path on a new connection and judges the status; the
// body is read up to maxBody so that the backend sees a complete exchange,
// redirects are not followed.
func probeHTTP(ctx context.Context, a attempt) error {
	tr := transport(a)
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, CheckRedirect: noRedirect}

	req, err := http.NewRequestWithContext(ctx, http.MethodGet, requestURL("http", a), nil)
	if err != nil {
		return err
	}
	req.Header.Set("User-Agent", userAgent)
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxBody))
	resp.Body.Close()

	if lo, hi := a.Check.ExpectStatus[0], a.Check.ExpectStatus[1]; resp.StatusCode < lo || resp.StatusCode > hi {
		return failure(fmt.Sprintf("status %d", resp.StatusCode))
	}
	return nil
}

// probeWebSocket performs the Upgrade handshake for Path, expecting 101,
// then, when the check has a message to send, sends it as text and expects a
// text reply containing it; it ends with a close handshake.
func probeWebSocket(ctx context.Context, a attempt) error {
	tr := transport(a)
	defer tr.CloseIdleConnections()
	conn, resp, err := websocket.Dial(ctx, requestURL("ws", a), &websocket.DialOptions{
		HTTPClient:      &http.Client{Transport: tr, CheckRedirect: noRedirect},
		HTTPHeader:      http.Header{"User-Agent": {userAgent}},
		CompressionMode: websocket.CompressionDisabled,
	})
	if err != nil {
		switch {
		case resp == nil:
			return err
		case resp.StatusCode != http.StatusSwitchingProtocols:
			return failure(fmt.Sprintf("handshake: status %d, want %d", resp.StatusCode, http.StatusSwitchingProtocols))
		default:
			return &phaseError{phase: "handshake", err: err}
		}
	}
	defer conn.CloseNow() // after Close, does nothing

	if send := a.Check.Send; send != "" {
		conn.SetReadLimit(int64(len(send)) + maxBody)
		if err := conn.Write(ctx, websocket.MessageText, []byte(send)); err != nil {
			return &phaseError{phase: "echo", err: err}
		}
		typ, msg, err := conn.Read(ctx)
		if err != nil {
			return &phaseError{phase: "echo", err: err}
		}
		if typ != websocket.MessageText || !strings.Contains(string(msg), send) {
			return failure("echo mismatch")
		}
	}
	// The close handshake waits for the peer's close frame, within the
	// deadline that dial set on the connection. The backend answered
	// correctly already: a peer that does not close cleanly is not a failure.
	_ = conn.Close(websocket.StatusNormalClosure, "")
	return nil
}

// probeUDP sends the check's datagram from a connected UDP socket and waits
// for an answer until the probe's deadline (see TypeUDP). The kernel reports
// an ICMP error for a connected socket on its next receive.
func probeUDP(ctx context.Context, a attempt) error {
	d := a.dialer("udp")
	conn, err := d.DialContext(ctx, "udp", a.to.String())
	if err != nil {
		return err
	}
	defer conn.Close()
	if deadline, ok := ctx.Deadline(); ok {
		if err := conn.SetDeadline(deadline); err != nil {
			return err
		}
	}
	if _, err := conn.Write([]byte(a.Check.Send)); err != nil {
		return udpError(err)
	}
	buf := make([]byte, maxBody)
	_, err = conn.Read(buf)
	var ne net.Error
	switch {
	case err == nil:
		return nil
	case errors.As(err, &ne) && ne.Timeout() && a.Check.Send == "":
		return nil // silence: no ICMP error came back
	case errors.As(err, &ne) && ne.Timeout():
		return failure("no reply")
	}
	return udpError(err)
}

// udpError names the ICMP error a UDP socket reports.
func udpError(err error) error {
	if errors.Is(err, syscall.ECONNREFUSED) {
		return failure("port unreachable")
	}
	return err
}

// noRedirect makes an http.Client return a redirect as the response.
func noRedirect(*http.Request, []*http.Request) error {
	return http.ErrUseLastResponse
}

// transport returns an HTTP transport for one probe of t: every connection
// goes to t's address whatever the URL's host, through no proxy, and is not
// kept for another request.
func transport(a attempt) *http.Transport {
	return &http.Transport{
		Proxy: nil,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dial(ctx, a)
		},
		DisableKeepAlives:      true,
		DisableCompression:     true,
		MaxResponseHeaderBytes: 64 << 10,
	}
}

// dial connects to a's address within its check's timeout and ctx, and bounds every
// read and write on the connection by ctx's deadline, so that no library
// above it, with timeouts of its own, holds a probe longer than the check
// allows.
func dial(ctx context.Context, a attempt) (net.Conn, error) {
	d := a.dialer("tcp")
	conn, err := d.DialContext(ctx, "tcp", a.to.String())
	if err != nil {
		return nil, err
	}
	if deadline, ok := ctx.Deadline(); ok {
		if err := conn.SetDeadline(deadline); err != nil {
			conn.Close()
			return nil, err
		}
	}
	return conn, nil
}

// requestURL returns the URL of a's check with the given scheme: its host is
// the check's Host, or the address probed (the backend's, or the VIP as
// the clients send it).
func requestURL(scheme string, a attempt) string {
	u, err := url.ParseRequestURI(a.Check.Path)
	if err != nil {
		u = &url.URL{Path: "/"} // unreachable: Validate parses the path
	}
	u.Scheme = scheme
	u.Host = a.Check.Host
	if u.Host == "" {
		u.Host = a.to.String()
	}
	return u.String()
}

// failure is a probe failure whose text is its reason.
type failure string

func (f failure) Error() string { return string(f) }

// phaseError is a failure in a phase of a probe after the connection was
// made, such as the WebSocket echo; its reason is "phase: " and the reason
// of err.
type phaseError struct {
	phase string
	err   error
}

func (e *phaseError) Error() string { return e.phase + ": " + e.err.Error() }
func (e *phaseError) Unwrap() error { return e.err }

// reason returns the short reason of a failed probe, made with ctx, for
// logs and Status: "timeout", "connection refused", "status 503"...
func reason(ctx context.Context, err error) string {
	var pe *phaseError
	if errors.As(err, &pe) {
		return pe.phase + ": " + reason(ctx, pe.err)
	}
	var f failure
	if errors.As(err, &f) {
		return string(f)
	}
	var ne net.Error
	switch {
	case ctx.Err() != nil,
		errors.Is(err, context.DeadlineExceeded),
		errors.Is(err, os.ErrDeadlineExceeded),
		errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return "connection reset"
	case errors.Is(err, syscall.EHOSTUNREACH):
		return "host unreachable"
	case errors.Is(err, syscall.ENETUNREACH):
		return "network unreachable"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		// net/http's unexported error for a connection closed before the
		// response began, which a fresh connection is too.
		strings.Contains(err.Error(), "server closed idle connection"):
		return "connection closed"
	}
	for {
		inner := errors.Unwrap(err)
		if inner == nil {
			return err.Error()
		}
		err = inner
	}
}
