package control

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"syscall"
	"time"
)

// Client talks to a daemon's API over its unix socket. Errors the daemon
// sends back are *APIError; a daemon that cannot be reached gives an error
// that says what to do.
type Client struct {
	socket  string
	timeout time.Duration
	http    *http.Client
}

// DefaultTimeout bounds one request unless the client is given another
// bound: a change may wait up to 3s for backends' neighbour resolution,
// and a status reads the connection tables.
const DefaultTimeout = 10 * time.Second

// NewClient returns a client of the daemon serving socket, whose requests
// take at most DefaultTimeout.
func NewClient(socket string) *Client { return NewClientTimeout(socket, DefaultTimeout) }

// NewClientTimeout returns a client of the daemon serving socket whose
// requests take at most timeout each (0: DefaultTimeout), so that a socket
// that accepts and never answers cannot hold the caller.
func NewClientTimeout(socket string, timeout time.Duration) *Client {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		DisableCompression: true,
	}
	return &Client{socket: socket, timeout: timeout, http: &http.Client{Transport: tr, Timeout: timeout}}
}

// Socket returns the socket the client talks to.
func (c *Client) Socket() string { return c.socket }

// Call sends a request with in as its JSON body (none if nil) and decodes
// the JSON response into out (unless nil).
func (c *Client) Call(ctx context.Context, method, path string, query url.Values, in, out any) error {
	var body io.Reader
	if in != nil {
		data, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(data)
	}
	u := url.URL{Scheme: "http", Host: "tether", Path: path, RawQuery: query.Encode()}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return c.unreachable(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<30))
	if err != nil {
		return fmt.Errorf("read the daemon's answer: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		e := &APIError{Code: resp.StatusCode}
		if json.Unmarshal(data, e) != nil || e.Msg == "" {
			e.Msg = fmt.Sprintf("the daemon answered %s: %s", resp.Status, bytes.TrimSpace(data))
		}
		return e
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("decode the daemon's answer to %s %s: %w", method, path, err)
	}
	return nil
}

// unreachable turns a failure to talk to the daemon into advice: no
// socket, something that is not a socket, a socket nobody listens on, a
// socket the user may not use, or a daemon that does not answer in time.
func (c *Client) unreachable(err error) error {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ENOENT):
		return fmt.Errorf("no socket at %s: is the daemon running? start it with: tether run --config FILE (or give the --socket it serves)", c.socket)
	case errors.Is(err, syscall.ECONNREFUSED):
		if fi, serr := os.Stat(c.socket); serr == nil && fi.Mode()&os.ModeSocket == 0 {
			return fmt.Errorf("%s is not a socket (a %s): give the --socket the daemon serves", c.socket, fileKind(fi.Mode()))
		}
		return fmt.Errorf("connection refused at %s: no daemon listens there (one that stopped may have left the socket); start it with: tether run --config FILE", c.socket)
	case errors.Is(err, syscall.ENOTSOCK):
		return fmt.Errorf("%s is not a socket: give the --socket the daemon serves", c.socket)
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return fmt.Errorf("permission denied at %s: the socket is root's only; run this as root", c.socket)
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return fmt.Errorf("the daemon at %s did not answer within %v (--timeout): it may be busy or hung; its log says more", c.socket, c.timeout)
	}
	return fmt.Errorf("talk to the tether daemon at %s: %w", c.socket, err)
}

// fileKind names the kind of file a mode is, for a message.
func fileKind(m os.FileMode) string {
	switch {
	case m.IsDir():
		return "directory"
	case m.IsRegular():
		return "regular file"
	case m&os.ModeNamedPipe != 0:
		return "named pipe"
	case m&os.ModeDevice != 0:
		return "device"
	}
	return "file of another kind"
}

// Status returns the running state.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	err := c.Call(ctx, http.MethodGet, "/v1/status", nil, nil, &s)
	return s, err
}

// Services returns every service, or the one ref ("VIP:PORT[/PROTO]")
// names if not empty.
func (c *Client) Services(ctx context.Context, ref string) ([]ServiceStatus, error) {
	var s []ServiceStatus
	err := c.Call(ctx, http.MethodGet, "/v1/services", optional("service", ref), nil, &s)
	return s, err
}

// AddService adds a service.
func (c *Client) AddService(ctx context.Context, spec ServiceSpec) (Result, error) {
	var r Result
	err := c.Call(ctx, http.MethodPost, "/v1/services", nil, spec, &r)
	return r, err
}

// RemoveService removes a service and its backends.
func (c *Client) RemoveService(ctx context.Context, ref string) (Result, error) {
	var r Result
	err := c.Call(ctx, http.MethodDelete, "/v1/services", url.Values{"service": {ref}}, nil, &r)
	return r, err
}

// AddBackend adds a backend to a service.
func (c *Client) AddBackend(ctx context.Context, spec BackendSpec) (Result, error) {
	var r Result
	err := c.Call(ctx, http.MethodPost, "/v1/backends", nil, spec, &r)
	return r, err
}

// RemoveBackend removes a backend from a service.
func (c *Client) RemoveBackend(ctx context.Context, service, backend string) (Result, error) {
	var r Result
	err := c.Call(ctx, http.MethodDelete, "/v1/backends", url.Values{"service": {service}, "backend": {backend}}, nil, &r)
	return r, err
}

// SetBackendWeight changes a backend's weight in place.
func (c *Client) SetBackendWeight(ctx context.Context, spec BackendWeightSpec) (Result, error) {
	var r Result
	err := c.Call(ctx, http.MethodPut, "/v1/backends/weight", nil, spec, &r)
	return r, err
}

// SetBackendState drains a backend or makes it active again.
func (c *Client) SetBackendState(ctx context.Context, spec BackendStateSpec) (Result, error) {
	var r Result
	err := c.Call(ctx, http.MethodPut, "/v1/backends/state", nil, spec, &r)
	return r, err
}

// Stats returns the counters.
func (c *Client) Stats(ctx context.Context) (Stats, error) {
	var s Stats
	err := c.Call(ctx, http.MethodGet, "/v1/stats", nil, nil, &s)
	return s, err
}

// Flows lists the connection table, or the flows of the service ref names
// if not empty.
func (c *Client) Flows(ctx context.Context, ref string) ([]FlowStatus, error) {
	var f []FlowStatus
	err := c.Call(ctx, http.MethodGet, "/v1/flows", optional("service", ref), nil, &f)
	return f, err
}

// Reload makes the daemon re-read its configuration file.
func (c *Client) Reload(ctx context.Context) (Result, error) {
	return c.reload(ctx, false)
}

// SetDrained drains this host (withdraws its VIPs from BGP) or undrains it.
func (c *Client) SetDrained(ctx context.Context, drained bool) (Result, error) {
	var res Result
	err := c.Call(ctx, http.MethodPut, "/v1/host/drain", nil, HostDrainSpec{Drained: drained}, &res)
	return res, err
}

// ReloadPlan asks what a reload would change, changing nothing.
func (c *Client) ReloadPlan(ctx context.Context) (Result, error) {
	return c.reload(ctx, true)
}

func (c *Client) reload(ctx context.Context, dry bool) (Result, error) {
	var q url.Values
	if dry {
		q = url.Values{"dry_run": {"true"}}
	}
	var r Result
	err := c.Call(ctx, http.MethodPost, "/v1/reload", q, nil, &r)
	return r, err
}

func optional(key, value string) url.Values {
	if value == "" {
		return nil
	}
	return url.Values{key: {value}}
}
