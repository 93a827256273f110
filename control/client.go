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
	"syscall"
	"time"
)

// Client talks to a daemon's API over its unix socket. Errors the daemon
// sends back are *APIError; a daemon that cannot be reached gives an error
// that says what to do.
type Client struct {
	socket string
	http   *http.Client
}

// clientTimeout bounds one request; a change may wait for backends'
// neighbour resolution and a status for a read of the connection table.
const clientTimeout = 60 * time.Second

// NewClient returns a client of the daemon serving socket.
func NewClient(socket string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		DisableCompression: true,
	}
	return &Client{socket: socket, http: &http.Client{Transport: tr, Timeout: clientTimeout}}
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

// unreachable turns a failure to talk to the daemon into advice.
func (c *Client) unreachable(err error) error {
	switch {
	case errors.Is(err, syscall.ENOENT), errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("cannot reach the tether daemon at %s: is it running? start it with: tether run --config FILE", c.socket)
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return fmt.Errorf("cannot reach the tether daemon at %s: permission denied; the socket is root's only: run this as root", c.socket)
	}
	return fmt.Errorf("talk to the tether daemon at %s: %w", c.socket, err)
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
	var r Result
	err := c.Call(ctx, http.MethodPost, "/v1/reload", nil, nil, &r)
	return r, err
}

func optional(key, value string) url.Values {
	if value == "" {
		return nil
	}
	return url.Values{key: {value}}
}
