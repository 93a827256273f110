package main

import (
	"fmt"
	"strings"
)

// nginx's stream module with consistent hashing of the client address,
// the "ip_hash" of TCP proxying.
func init() {
	register(Peer{
		Name:           "nginx (stream, hash $remote_addr)",
		Order:          30,
		Role:           RoleNginx,
		Version:        []string{"nginx", "-v"},
		Rows:           RowStreams | RowProxy,
		SourceAffinity: true,
		Note:           "stream module, `hash $remote_addr consistent`, `proxy_timeout 1h`, one worker per CPU, 20,000 connections per worker",
		Start:          startNginx,
	})
}

// nginxModule is where Debian's libnginx-mod-stream puts the module.
const nginxModule = "/usr/lib/nginx/modules/ngx_stream_module.so"

func startNginx(e *Env) (Running, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "load_module %s;\n", nginxModule)
	fmt.Fprintf(&b, "daemon off;\nworker_processes auto;\nworker_rlimit_nofile 50000;\npid %s/nginx-%d.pid;\nerror_log stderr warn;\n", e.Tmp, e.round)
	b.WriteString("events {\n    worker_connections 20000;\n}\nstream {\n")
	for _, svc := range proxiedPorts {
		fmt.Fprintf(&b, "    upstream %s {\n        hash $remote_addr consistent;\n", svc.name)
		for _, a := range e.BackendAddrs {
			fmt.Fprintf(&b, "        server %s:%d;\n", a, svc.port)
		}
		fmt.Fprintf(&b, "    }\n    server {\n        listen %s:%d;\n        proxy_pass %s;\n        proxy_timeout 1h;\n    }\n", e.VIP, svc.port, svc.name)
	}
	b.WriteString("}\n")
	cfg, err := e.File("nginx.conf", b.String())
	if err != nil {
		return Running{}, err
	}
	return startProxy(e, "nginx", "nginx", "-p", e.Tmp, "-e", "stderr", "-c", cfg)
}
