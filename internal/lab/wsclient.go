package lab

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"

	"github.com/coder/websocket"
)

// WSClient is a WebSocket connection made by DialWS from a host's namespace.
type WSClient struct {
	conn    *websocket.Conn
	backend string
	local   net.Addr
	remote  net.Addr
}

// DialWS opens a TCP connection from h's namespace with source address src
// (a zero src lets the kernel choose) and performs the WebSocket handshake
// for url (ws://<ip literal>:<port>/path) over it. ctx bounds the dial and
// the handshake only.
func DialWS(ctx context.Context, h *Host, src netip.Addr, url string) (*WSClient, error) {
	ws := &WSClient{}
	tr := &http.Transport{
		Proxy: nil,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := h.Dial(ctx, network, src, addr)
			if err != nil {
				return nil, err
			}
			ws.local, ws.remote = c.LocalAddr(), c.RemoteAddr()
			return c, nil
		},
	}
	defer tr.CloseIdleConnections()
	conn, resp, err := websocket.Dial(ctx, url, &websocket.DialOptions{HTTPClient: &http.Client{Transport: tr}})
	if err != nil {
		return nil, fmt.Errorf("websocket %s from %s in %s: %w", url, src, h.Name, err)
	}
	ws.conn = conn
	ws.backend = resp.Header.Get(BackendHeader)
	return ws, nil
}

// Echo sends msg as a text message and reads the reply, which must be
// "<name> <msg>"; it returns name.
func (c *WSClient) Echo(ctx context.Context, msg string) (backend string, err error) {
	if err := c.conn.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
		return "", fmt.Errorf("echo write: %w", err)
	}
	typ, reply, err := c.conn.Read(ctx)
	if err != nil {
		return "", fmt.Errorf("echo read: %w", err)
	}
	if typ != websocket.MessageText {
		return "", fmt.Errorf("echo: reply is a %v message", typ)
	}
	name, rest, ok := strings.Cut(string(reply), " ")
	if !ok || name == "" || rest != msg {
		return "", fmt.Errorf("echo: reply %q is not \"<name> %s\"", reply, msg)
	}
	return name, nil
}

// Send writes msg as a text message without waiting for the reply, so that
// several can be in flight (see Receive).
func (c *WSClient) Send(ctx context.Context, msg string) error {
	if err := c.conn.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
		return fmt.Errorf("send: %w", err)
	}
	return nil
}

// Receive reads the next reply, "<name> <msg>", and returns name and msg.
func (c *WSClient) Receive(ctx context.Context) (backend, msg string, err error) {
	typ, reply, err := c.conn.Read(ctx)
	if err != nil {
		return "", "", fmt.Errorf("receive: %w", err)
	}
	if typ != websocket.MessageText {
		return "", "", fmt.Errorf("receive: reply is a %v message", typ)
	}
	name, rest, ok := strings.Cut(string(reply), " ")
	if !ok || name == "" {
		return "", "", fmt.Errorf("receive: reply %q is not \"<name> <msg>\"", reply)
	}
	return name, rest, nil
}

// Backend returns the X-Tether-Backend header of the handshake response.
func (c *WSClient) Backend() string { return c.backend }

// LocalAddr returns the TCP connection's local (source) address.
func (c *WSClient) LocalAddr() net.Addr { return c.local }

// RemoteAddr returns the address the TCP connection was made to.
func (c *WSClient) RemoteAddr() net.Addr { return c.remote }

// Close performs the WebSocket close handshake (bounded by the library's
// 5s) and closes the connection.
func (c *WSClient) Close() error {
	return c.conn.Close(websocket.StatusNormalClosure, "")
}
