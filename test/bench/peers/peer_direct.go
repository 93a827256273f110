package main

// The reference: no balancer, the client talks to one backend.
func init() {
	register(Peer{
		Name:           "direct (no balancer)",
		Order:          0,
		Rows:           RowStreams | RowProxy,
		Direct:         true,
		SourceAffinity: true,
		Note:           "the client connects to backend 1's own address (the proxy rows: to each backend's in turn); the reference the stream rows are divided by",
		Start:          func(*Env) (Running, error) { return noProcess(func() error { return nil }, nil) },
	})
}
