package lab

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/coder/websocket"
)

// BackendHeader is the response header in which an EchoServer names itself.
const BackendHeader = "X-Tether-Backend"

// echoCloseTimeout bounds how long EchoServer.Close waits for its handlers.
const echoCloseTimeout = 5 * time.Second

// EchoServer is a WebSocket echo backend: every request upgrades to
// WebSocket (a plain GET gets 200 and the name), and each text message m is
// answered with "<name> <m>".
type EchoServer struct {
	name string
	srv  *http.Server

	mu       sync.Mutex
	closed   bool
	conns    map[*websocket.Conn]struct{}
	stats    EchoStats
	handlers sync.WaitGroup

	serveDone chan struct{}
	serveErr  error
}

// EchoStats counts what an EchoServer has seen.
type EchoStats struct {
	// Accepted is the number of connections upgraded to WebSocket.
	Accepted int
	// Active is the number of WebSocket connections open now.
	Active int
	// Messages is the number of text messages answered.
	Messages int
	// Clients maps a remote IP address to the number of WebSocket
	// connections accepted from it.
	Clients map[string]int
}

// ServeEcho serves the echo backend named name on ln until Close. It sets
// the response header X-Tether-Backend: <name> on every response, including
// the WebSocket handshake.
func ServeEcho(ln net.Listener, name string) *EchoServer {
	s := &EchoServer{
		name:      name,
		conns:     map[*websocket.Conn]struct{}{},
		stats:     EchoStats{Clients: map[string]int{}},
		serveDone: make(chan struct{}),
	}
	s.srv = &http.Server{Handler: s, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		defer close(s.serveDone)
		if err := s.srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			s.serveErr = err
		}
	}()
	return s
}

// Name returns the name the server answers with.
func (s *EchoServer) Name() string { return s.name }

// ServeHTTP implements http.Handler.
func (s *EchoServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set(BackendHeader, s.name)
	if !strings.Contains(strings.ToLower(r.Header.Get("Upgrade")), "websocket") {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		io.WriteString(w, s.name+"\n")
		return
	}
	c, err := websocket.Accept(w, r, nil)
	if err != nil {
		return // Accept has written the error response
	}
	ip := r.RemoteAddr
	if host, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		ip = host
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		c.CloseNow()
		return
	}
	s.conns[c] = struct{}{}
	s.stats.Accepted++
	s.stats.Active++
	s.stats.Clients[ip]++
	s.handlers.Add(1)
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.stats.Active--
		s.mu.Unlock()
		s.handlers.Done()
	}()
	defer c.CloseNow()

	ctx := r.Context()
	for {
		typ, msg, err := c.Read(ctx)
		if err != nil {
			return
		}
		if typ != websocket.MessageText {
			c.Close(websocket.StatusUnsupportedData, "text messages only")
			return
		}
		s.mu.Lock()
		s.stats.Messages++
		s.mu.Unlock()
		if err := c.Write(ctx, websocket.MessageText, []byte(s.name+" "+string(msg))); err != nil {
			return
		}
	}
}

// Stats returns a snapshot of the counters.
func (s *EchoServer) Stats() EchoStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stats
	st.Clients = make(map[string]int, len(s.stats.Clients))
	for k, v := range s.stats.Clients {
		st.Clients[k] = v
	}
	return st
}

// Close closes the listener and every open connection, WebSocket or not,
// and waits (up to 5s) for the handlers to return. It is idempotent.
func (s *EchoServer) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	conns := make([]*websocket.Conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()

	err := s.srv.Close() // listener and non-hijacked connections
	for _, c := range conns {
		c.CloseNow()
	}
	done := make(chan struct{})
	go func() {
		s.handlers.Wait()
		<-s.serveDone
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(echoCloseTimeout):
		return errors.Join(err, fmt.Errorf("echo %s: handlers still running after %v", s.name, echoCloseTimeout))
	}
	return errors.Join(err, s.serveErr)
}
