package health

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
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

// probe runs one probe of t, bounded by its check's timeout, and returns its
// result. A probe cut short by the cancellation of ctx returns a failure
// that the caller must discard.
func probe(ctx context.Context, t Target) Result {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, t.Check.Timeout)
	defer cancel()

	var err error
	switch t.Check.Type {
	case TypeHTTP:
		err = probeHTTP(ctx, t)
	case TypeWebSocket:
		err = probeWebSocket(ctx, t)
	case TypeUDP:
		err = probeUDP(ctx, t)
	default:
		err = probeTCP(ctx, t)
	}
	res := Result{OK: err == nil, Reason: "ok", Latency: time.Since(start), At: start}
	if err != nil {
		res.Reason = reason(ctx, err)
	}
	return res
}

// probeTCP connects to the backend and closes the connection.
func probeTCP(ctx context.Context, t Target) error {
	conn, err := dial(ctx, t)
	if err != nil {
		return err
	}
	return conn.Close()
}

// probeHTTP sends GET Path on a new connection and judges the status; the
// body is read up to maxBody so that the backend sees a complete exchange,
// redirects are not followed.
func probeHTTP(ctx context.Context, t Target) error {
	tr := transport(t)
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, CheckRedirect: noRedirect}

	req, err := http.NewRequestWithContext(ctx, http.MethodGet, requestURL("http", t), nil)
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

	if lo, hi := t.Check.ExpectStatus[0], t.Check.ExpectStatus[1]; resp.StatusCode < lo || resp.StatusCode > hi {
		return failure(fmt.Sprintf("status %d", resp.StatusCode))
	}
	return nil
}

// probeWebSocket performs the Upgrade handshake for Path, expecting 101,
// then, when the check has a message to send, sends it as text and expects a
// text reply containing it; it ends with a close handshake.
func probeWebSocket(ctx context.Context, t Target) error {
	tr := transport(t)
	defer tr.CloseIdleConnections()
	conn, resp, err := websocket.Dial(ctx, requestURL("ws", t), &websocket.DialOptions{
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

	if send := t.Check.Send; send != "" {
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
func probeUDP(ctx context.Context, t Target) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "udp", t.Addr.String())
	if err != nil {
		return err
	}
	defer conn.Close()
	if deadline, ok := ctx.Deadline(); ok {
		if err := conn.SetDeadline(deadline); err != nil {
			return err
		}
	}
	if _, err := conn.Write([]byte(t.Check.Send)); err != nil {
		return udpError(err)
	}
	buf := make([]byte, maxBody)
	_, err = conn.Read(buf)
	var ne net.Error
	switch {
	case err == nil:
		return nil
	case errors.As(err, &ne) && ne.Timeout() && t.Check.Send == "":
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
func transport(t Target) *http.Transport {
	return &http.Transport{
		Proxy: nil,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dial(ctx, t)
		},
		DisableKeepAlives:      true,
		DisableCompression:     true,
		MaxResponseHeaderBytes: 64 << 10,
	}
}

// dial connects to t's address within t's timeout and ctx, and bounds every
// read and write on the connection by ctx's deadline, so that no library
// above it, with timeouts of its own, holds a probe longer than the check
// allows.
func dial(ctx context.Context, t Target) (net.Conn, error) {
	d := net.Dialer{Timeout: t.Check.Timeout, KeepAlive: -1}
	conn, err := d.DialContext(ctx, "tcp", t.Addr.String())
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

// requestURL returns the URL of t's check with the given scheme: its host is
// the check's Host, or the backend's address.
func requestURL(scheme string, t Target) string {
	u, err := url.ParseRequestURI(t.Check.Path)
	if err != nil {
		u = &url.URL{Path: "/"} // unreachable: Validate parses the path
	}
	u.Scheme = scheme
	u.Host = t.Check.Host
	if u.Host == "" {
		u.Host = t.Addr.String()
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
