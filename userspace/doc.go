// Package userspace is tether's splice datapath: a TCP proxy for hosts
// where the XDP program cannot run, behind the same datapath.Datapath
// interface, so that `tether status`, `stats`, `flows` and `backend drain`
// work the same on it. It needs Linux with splice(2) (any kernel Go
// supports) and, for IPv6 VIPs that are not local, IPV6_FREEBIND (4.15) or
// CAP_NET_ADMIN. A Proxy lives from New to Close.
//
// # Backend choice
//
// The proxy picks a backend for each accepted connection exactly as the
// XDP program picks one for a new flow (bpf/tether.c), with the Go model in
// maglev/ that the program matches bit for bit, the same seed and the
// rings the control plane builds:
//
//   - source affinity: the affinity table's entry for (service, client
//     address), if it is not older than the service's AffinityTimeout and
//     its backend is Active; otherwise ring[SourceHash(seed, client) % M];
//   - connection affinity: ring[ConnHash(seed, client, client port,
//     service port, 6) % M].
//
// The choice is then recorded as the program records it: the affinity
// entry is written or refreshed on every new connection of a
// source-affinity service, and the service counts a new connection and an
// affinity hit or miss. For the same client, backends and seed, both
// datapaths send a connection to the same backend (TestSameChoiceAsXDP runs
// the loaded program and the proxy side by side). The connection table is
// never consulted for the choice: a proxy accepts each connection whole, so
// every accepted connection is a new flow. It holds the connections being
// proxied, for Flows, Close and OnDownReset.
//
// Backend states: Draining and Down backends are out of the ring and their
// affinity entries are ignored; their established connections keep
// flowing, unless the service has OnDownReset, in which case the
// connections to a backend that goes Down are reset (client and backend get
// a TCP RST). A backend removed from a service keeps its established
// connections until they end: a proxied connection is bound to its backend
// socket, whereas the XDP program sends the packets of such a flow to a new
// choice, which the new backend would reset anyway. DeleteService closes
// the listener (new clients are refused by the kernel) and forgets the
// service's affinity entries; established connections keep flowing until
// either side closes them, like a soft stop in HAProxy. Close ends
// everything.
//
// # Accepting on the VIP
//
// Each service has a listening socket on VIP:port, bound with IP_FREEBIND
// (IPv4) or IPV6_FREEBIND (IPv6; IPV6_TRANSPARENT with CAP_NET_ADMIN on
// kernels before 4.15), so that it binds whether or not the VIP is an
// address of the host, and keeps listening when the VIP comes and goes
// (keepalived, say). For connections to arrive the host must still deliver
// the VIP locally: either it holds the address (`ip addr add VIP/32 dev lo`)
// or a local route covers it (`ip route add local VIP/32 dev lo`, which
// also takes a whole prefix of VIPs). Options.Netns places the sockets, the
// listening ones and those that connect to backends, in a network
// namespace.
//
// # Moving bytes
//
// The proxy runs Options.Loops event loops (by default one per P that the
// process had before its first loop started, as HAProxy runs one thread
// per CPU), and no goroutine per connection.
// Each service listens with one socket per loop (SO_REUSEPORT: the kernel
// spreads new clients over them). UpsertService refuses a second service
// of the proxy on the same VIP and port, and binds a socket without
// SO_REUSEPORT first, which fails if another process listens there: the
// port would otherwise be shared with it. The loop that accepts a client
// does everything for it (or hands it to a loop with at least two
// connections fewer: the kernel's spread by address leaves a few long
// streams unevenly placed). It picks the backend, connects to it without
// blocking (within Options.DialTimeout; a client whose backend fails is
// reset), optionally sends a PROXY protocol v2 header
// (datapath.Service.ProxyProtocol) before any byte of the client, then splices each socket into a pipe and the
// pipe into the other socket whenever epoll (edge-triggered, both
// directions) says they are ready: the bytes never reach userspace
// (TestZeroCopy: /proc/PID/io of a proxy that moved 512 MiB shows a few
// hundred bytes read or written; TestZeroCopyStrace counts the splice
// calls). Each loop waits for its sockets in its own epoll_wait, holding
// its P, and the proxy raises GOMAXPROCS to keep one P more than its loops
// for the rest of the process (see loop.run for the designs measured
// against this one). When a
// source ends its stream the proxy shuts down the sending side of the other socket (the half-close
// goes on), and the connection is closed once both directions have ended;
// an error on either side closes both. There is no idle timeout unless
// datapath.Service.IdleTimeout sets one (the loop's timers enforce it);
// TCP keepalive (DefaultKeepAlive) runs on both sockets so that a vanished
// peer is found and a quiet connection keeps NAT state alive.
//
// Memory per connection is bounded. An idle connection holds its two
// sockets and about half a KiB of Go memory (TestMemoryPerIdleConnection),
// and no goroutine or pipe: pipes are lent by a pool from the moment a
// socket is readable until the pipe is empty and the socket has nothing
// more. A connection moving bytes holds at most one pipe per direction,
// so at most 2·Options.PipeSize (128 KiB by default) of data in the proxy,
// as page references, and four more file descriptors. The kernel's socket
// buffers come on top: up to net.ipv4.tcp_rmem and
// tcp_wmem's maxima per socket under autotuning, or 4·Options.SocketBuffer
// per socket when that is set.
//
// # Counters
//
// Per service: new connections, affinity hits and misses, as the XDP
// datapath counts them. Per backend: new connections; Bytes are the bytes
// moved both ways (the XDP datapath counts the frames it forwards, client
// to backend only, headers included); Packets are splice calls that read
// from either socket (up to PipeSize each), not IP packets. Reasons count
// connections refused or cut, not packets: reset_no_backend,
// reset_backend_down, reset_drained (a paced drain's CloseFlows),
// reset_dial_failed, reset_conn_limit and drop_accept_failed.
//
// # UDP
//
// UDP services are refused: UpsertService returns an error wrapping ErrUDP
// ("udp services need the xdp datapath"). Configuration validation should
// refuse `protocol: udp` with `datapath: splice` up front with the same
// words.
package userspace
