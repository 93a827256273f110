package main

import (
	"fmt"
	"strings"
)

// HAProxy in TCP mode with source hashing, as people put it in front of
// WebSocket servers.
func init() {
	register(Peer{
		Name:           "HAProxy (balance source)",
		Order:          20,
		Rows:           RowStreams | RowProxy,
		Role:           RoleHAProxy,
		Version:        []string{"haproxy", "-v"},
		SourceAffinity: true,
		Note:           "`mode tcp`, `balance source`, `option splice-auto`, `maxconn 6000`, timeouts client/server/tunnel 1h, one thread per CPU unless -haproxy-threads says otherwise",
		Start:          startHAProxy,
	})
}

func startHAProxy(e *Env) (Running, error) {
	var b strings.Builder
	// maxconn sets the file-descriptor limit HAProxy asks for.
	b.WriteString("global\n    maxconn 6000\n")
	if e.HAProxyThreads > 0 {
		fmt.Fprintf(&b, "    nbthread %d\n", e.HAProxyThreads)
	}
	b.WriteString("defaults\n    mode tcp\n    option splice-auto\n    maxconn 6000\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n    timeout tunnel 1h\n")
	for _, svc := range proxiedPorts {
		fmt.Fprintf(&b, "listen %s\n    bind %s:%d\n    balance source\n", svc.name, e.VIP, svc.port)
		for i, a := range e.BackendAddrs {
			fmt.Fprintf(&b, "    server be%d %s:%d\n", i+1, a, svc.port)
		}
	}
	cfg, err := e.File("haproxy.cfg", b.String())
	if err != nil {
		return Running{}, err
	}
	return startProxy(e, "haproxy", "haproxy", "-db", "-f", cfg)
}

// proxiedPorts are the TCP services every proxy serves: WebSocket, iperf3,
// and the raw TCP and HTTP services of the proxy rows.
var proxiedPorts = []struct {
	name string
	port int
}{{"ws", portWS}, {"bulk", portBulk}, {"raw", portRaw}, {"http", portHTTP}}

// startProxy starts a userspace proxy listening on the VIP on the
// balancer and waits until it serves.
func startProxy(e *Env, what, name string, args ...string) (Running, error) {
	delRoute, err := e.LocalVIP()
	if err != nil {
		return Running{}, err
	}
	p, err := e.Lab.Balancer.Start(name, args...)
	if err != nil {
		return Running{}, joinErr(err, delRoute())
	}
	stop := undo(delRoute, p.Stop)
	if err := e.WaitServing(p, what); err != nil {
		return Running{}, joinErr(err, stop())
	}
	return Running{Stop: stop, PID: p.Cmd.Process.Pid}, nil
}
