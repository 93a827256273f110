package control

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/datapath"
)

// DefaultSocket is where the daemon serves its API unless told otherwise.
const DefaultSocket = "/run/tether/tether.sock"

// APIError is the body of an error response.
type APIError struct {
	// Msg says what went wrong.
	Msg string `json:"error"`
	// Field names the argument or configuration field at fault, if any.
	Field string `json:"field,omitempty"`
	// Code is the HTTP status: 400 for refused input, 500 for a failure.
	Code int `json:"-"`
}

func (e *APIError) Error() string { return e.Msg }

// Refused reports whether the daemon refused the request because of its
// input.
func (e *APIError) Refused() bool { return e.Code >= 400 && e.Code < 500 }

// maxBody bounds request bodies.
const maxBody = 1 << 20

// Handler returns the API over d: HTTP with JSON bodies, served on a unix
// socket (see Listen and Serve), versioned by path:
//
//	GET    /v1/status                             Status
//	GET    /v1/services[?service=VIP:PORT[/PROTO]] []ServiceStatus
//	POST   /v1/services       ServiceSpec         Result   (tether vip add)
//	DELETE /v1/services?service=VIP:PORT[/PROTO]  Result   (tether vip rm)
//	POST   /v1/backends       BackendSpec         Result   (tether backend add)
//	DELETE /v1/backends?service=...&backend=ADDR[:PORT]  Result
//	PUT    /v1/backends/weight BackendWeightSpec  Result   (tether backend set)
//	PUT    /v1/backends/state BackendStateSpec    Result   (drain, undrain)
//	GET    /v1/stats                              Stats
//	GET    /v1/flows[?service=VIP:PORT[/PROTO]]   []FlowStatus
//	POST   /v1/reload[?dry_run=true]              Result   (with its Changes)
//	PUT    /v1/host/drain     HostDrainSpec       Result   (tether host drain, undrain)
//	GET    /v1/trace[?service=VIP:PORT[/PROTO]&client=ADDR&count=N&frames=true]
//	                                              TraceLine a line, as they happen
//
// Errors are {"error": "...", "field": "..."} with status 400 for a
// request refused because of its input (nothing changed), 409 for a trace
// while another runs, 405 for a method
// the path does not take, 413 for a body over 1 MiB and 500 for a failure.
// A JSON body must hold one object without duplicate keys; a request that
// takes no body must come without one.
func (d *Daemon) Handler() http.Handler {
	mux := http.NewServeMux()
	methods := map[string][]string{} // path → the methods it takes
	get := func(pattern string, params []string, fn func(q url.Values) (any, error)) {
		methods[pattern] = append(methods[pattern], "GET")
		mux.HandleFunc("GET "+pattern, func(w http.ResponseWriter, r *http.Request) {
			if err := checkParams(r.URL.Query(), params...); err != nil {
				writeError(w, err)
				return
			}
			if err := noBody(r); err != nil {
				writeError(w, err)
				return
			}
			v, err := fn(r.URL.Query())
			reply(w, v, err)
		})
	}
	withBody := func(method, pattern string, fn func(r *http.Request) (any, error)) {
		methods[pattern] = append(methods[pattern], method)
		mux.HandleFunc(method+" "+pattern, func(w http.ResponseWriter, r *http.Request) {
			v, err := fn(r)
			if err != nil {
				d.log.Info("API request refused or failed", "method", r.Method, "path", r.URL.Path, "err", err)
			}
			reply(w, v, err)
		})
	}

	get("/v1/status", nil, func(url.Values) (any, error) { return d.Status() })
	get("/v1/services", []string{"service"}, func(q url.Values) (any, error) { return d.Services(q.Get("service")) })
	get("/v1/stats", nil, func(url.Values) (any, error) { return d.Stats() })
	get("/v1/flows", []string{"service"}, func(q url.Values) (any, error) { return d.Flows(q.Get("service")) })

	withBody("POST", "/v1/services", func(r *http.Request) (any, error) {
		var spec ServiceSpec
		if err := decode(r, &spec); err != nil {
			return nil, err
		}
		return d.AddService(spec)
	})
	withBody("DELETE", "/v1/services", func(r *http.Request) (any, error) {
		q := r.URL.Query()
		if err := checkParams(q, "service"); err != nil {
			return nil, err
		}
		if err := noBody(r); err != nil {
			return nil, err
		}
		return d.RemoveService(q.Get("service"))
	})
	withBody("POST", "/v1/backends", func(r *http.Request) (any, error) {
		var spec BackendSpec
		if err := decode(r, &spec); err != nil {
			return nil, err
		}
		return d.AddBackend(spec)
	})
	withBody("DELETE", "/v1/backends", func(r *http.Request) (any, error) {
		q := r.URL.Query()
		if err := checkParams(q, "service", "backend"); err != nil {
			return nil, err
		}
		if err := noBody(r); err != nil {
			return nil, err
		}
		return d.RemoveBackend(q.Get("service"), q.Get("backend"))
	})
	withBody("PUT", "/v1/backends/weight", func(r *http.Request) (any, error) {
		var spec BackendWeightSpec
		if err := decode(r, &spec); err != nil {
			return nil, err
		}
		return d.SetBackendWeight(spec)
	})
	withBody("PUT", "/v1/backends/state", func(r *http.Request) (any, error) {
		var spec BackendStateSpec
		if err := decode(r, &spec); err != nil {
			return nil, err
		}
		return d.SetBackendState(spec)
	})
	withBody("PUT", "/v1/host/drain", func(r *http.Request) (any, error) {
		var spec HostDrainSpec
		if err := decode(r, &spec); err != nil {
			return nil, err
		}
		return d.SetDrained(spec.Drained)
	})
	withBody("POST", "/v1/reload", func(r *http.Request) (any, error) {
		if err := checkParams(r.URL.Query(), "dry_run"); err != nil {
			return nil, err
		}
		if err := noBody(r); err != nil {
			return nil, err
		}
		dry, err := boolParam(r.URL.Query(), "dry_run")
		if err != nil {
			return nil, err
		}
		if dry {
			return d.ReloadPlan()
		}
		return d.Reload()
	})
	methods["/v1/trace"] = append(methods["/v1/trace"], "GET")
	mux.HandleFunc("GET /v1/trace", d.serveTrace)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if allowed, ok := methods[r.URL.Path]; ok {
			w.Header().Set("Allow", strings.Join(allowed, ", "))
			writeJSON(w, http.StatusMethodNotAllowed, &APIError{Msg: fmt.Sprintf("%s does not take %s (it takes %s)", r.URL.Path, r.Method, strings.Join(allowed, ", "))})
			return
		}
		writeJSON(w, http.StatusNotFound, &APIError{Msg: fmt.Sprintf("no API endpoint %s %s (this daemon serves /v1/)", r.Method, r.URL.Path)})
	})
	return mux
}

// noBody refuses a body on a request that takes none.
func noBody(r *http.Request) error {
	var b [1]byte
	if n, _ := io.ReadFull(r.Body, b[:]); n > 0 {
		return refusef("", "%s %s takes no request body", r.Method, r.URL.Path)
	}
	return nil
}

// boolParam reads an optional true/false query parameter.
func boolParam(q url.Values, name string) (bool, error) {
	switch v := q.Get(name); v {
	case "", "false", "0":
		return false, nil
	case "true", "1":
		return true, nil
	default:
		return false, refusef(name, "%q is not true or false", v)
	}
}

// tooLarge is a request body over maxBody: 413.
type tooLarge struct{ error }

// checkParams refuses query parameters other than known ones, and
// repeated ones.
func checkParams(q url.Values, known ...string) error {
	for k, v := range q {
		if !slices.Contains(known, k) {
			return refusef(k, "unknown parameter")
		}
		if len(v) > 1 {
			return refusef(k, "given %d times", len(v))
		}
	}
	return nil
}

// decode reads a JSON request body strictly: unknown fields and values of
// the wrong type are refused with the field named.
func decode(r *http.Request, v any) error {
	if err := checkParams(r.URL.Query()); err != nil {
		return err
	}
	data, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, maxBody))
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return tooLarge{refusef("", "the request body is larger than %d bytes", maxBody)}
	}
	if err != nil {
		return fmt.Errorf("read the request body: %w", err)
	}
	if err := duplicateKeys(data); err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var te *json.UnmarshalTypeError
		switch {
		case errors.As(err, &te):
			return refusef(te.Field, "%s is not a JSON %s", te.Value, te.Type)
		case strings.HasPrefix(err.Error(), "json: unknown field "):
			name := strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`)
			return refusef(name, "unknown field")
		case errors.Is(err, io.EOF):
			return refusef("", "the request has no JSON body")
		}
		return refusef("", "the request body is not JSON: %v", err)
	}
	if dec.More() {
		return refusef("", "the request body holds more than one JSON value")
	}
	return nil
}

// duplicateKeys refuses a JSON value in which an object names a key twice
// (encoding/json would keep the last one without a word). A body that is
// not JSON is left to the decoder to refuse.
func duplicateKeys(data []byte) error {
	type level struct {
		object  bool
		path    string          // of this object or array
		keys    map[string]bool // the keys an object named
		wantKey bool            // an object's next token is a key
		last    string          // the path of its last key
	}
	var stack []*level
	valueDone := func() {
		if n := len(stack); n > 0 && stack[n-1].object {
			stack[n-1].wantKey = true
		}
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	for {
		tok, err := dec.Token()
		if err != nil {
			return nil
		}
		var top *level
		if n := len(stack); n > 0 {
			top = stack[n-1]
		}
		if key, ok := tok.(string); ok && top != nil && top.object && top.wantKey {
			name := key
			if top.path != "" {
				name = top.path + "." + key
			}
			if top.keys[key] {
				return refusef(name, "given twice")
			}
			top.keys[key], top.last, top.wantKey = true, name, false
			continue
		}
		switch tok {
		case json.Delim('{'), json.Delim('['):
			path := ""
			if top != nil {
				path = top.path
				if top.object {
					path = top.last
				}
			}
			stack = append(stack, &level{object: tok == json.Delim('{'), path: path, keys: map[string]bool{}, wantKey: true})
		case json.Delim('}'), json.Delim(']'):
			stack = stack[:len(stack)-1]
			valueDone()
		default:
			valueDone()
		}
	}
}

func reply(w http.ResponseWriter, v any, err error) {
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// writeError sends err as an APIError: 400 with the field for refused
// input, 500 otherwise.
func writeError(w http.ResponseWriter, err error) {
	var re *RefusedError
	var fe *config.FieldError
	var tl tooLarge
	var dre *datapath.RefusedError
	switch {
	case errors.As(err, &tl):
		writeJSON(w, http.StatusRequestEntityTooLarge, &APIError{Msg: err.Error()})
	case errors.Is(err, datapath.ErrTraceBusy):
		writeJSON(w, http.StatusConflict, &APIError{Msg: err.Error() + ": end it first"})
	case errors.As(err, &dre):
		writeJSON(w, http.StatusBadRequest, &APIError{Msg: err.Error()})
	case errors.As(err, &re):
		writeJSON(w, http.StatusBadRequest, &APIError{Msg: err.Error(), Field: re.Field})
	case errors.As(err, &fe):
		writeJSON(w, http.StatusBadRequest, &APIError{Msg: err.Error(), Field: fe.Path})
	default:
		writeJSON(w, http.StatusInternalServerError, &APIError{Msg: err.Error()})
	}
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// maxSocketPath is the longest path a unix socket address holds (sun_path
// less its NUL).
const maxSocketPath = 107

// Listen opens the API socket at path, mode 0600, creating its directory
// (mode 0700) if missing. It refuses when another daemon answers on path,
// and removes a stale socket left by a daemon that died.
func Listen(path string) (net.Listener, error) {
	if path == "" {
		return nil, errors.New("no socket path given")
	}
	if len(path) > maxSocketPath {
		return nil, fmt.Errorf("socket %s: the path is longer than %d bytes; choose a shorter one with --socket", path, maxSocketPath)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("socket %s: the path exists and is not a socket; remove it or choose another with --socket", path)
		}
		c, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			c.Close()
			return nil, fmt.Errorf("socket %s: another tether daemon is serving it; stop that one first, or give this one another socket with --socket", path)
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("socket %s: %w", path, err)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove the stale socket %s: %w", path, err)
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	return ln, nil
}

// Serve serves h on ln until ctx ends, then shuts down, giving requests
// in flight up to five seconds, and closes ln (which removes the socket).
func Serve(ctx context.Context, ln net.Listener, h http.Handler, log *slog.Logger) error {
	// Requests' contexts end when the shutdown begins: a trace streams
	// until its caller goes, and must not hold the shutdown.
	base, cancel := context.WithCancel(context.Background())
	defer cancel()
	srv := &http.Server{
		Handler:           h,
		BaseContext:       func(net.Listener) context.Context { return base },
		ReadHeaderTimeout: 10 * time.Second,
		// A client that trickles its request, or holds a connection idle,
		// holds a goroutine and a descriptor: not for long.
		ReadTimeout: 30 * time.Second,
		IdleTimeout: 2 * time.Minute,
		ErrorLog:    slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	srv.RegisterOnShutdown(cancel)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	select {
	case err := <-done:
		return fmt.Errorf("serve the API: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
	}
	<-done
	return nil
}
