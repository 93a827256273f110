/* structs.h: the key and value layouts of the BPF maps, shared with the Go control plane (bpf2go -type). */
#ifndef TETHER_STRUCTS_H
#define TETHER_STRUCTS_H

#include <linux/types.h>

/* A service is found by VIP, port and protocol, in a table per family (an
 * 8-byte key hashes faster than a 20-byte one). Ports are in network byte
 * order; elsewhere an IPv4 address sits in addr[0] with addr[1..3] zero. */
struct service_key {
	__u32 addr[4];
	__u16 port;
	__u8 proto;
	__u8 pad;
};

struct service_key4 {
	__u32 addr;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

struct service {
	__u32 id;    /* index into rings and service_stats */
	__u32 flags; /* SVC_F_* */
	__u64 affinity_timeout_ns;
	/* The control plane's signature of what the service's ring is built
	 * from (0: unknown), so that a restarted daemon keeps rings it would
	 * build alike. The program never reads it. Two words, where pinned
	 * services have two zero ones. */
	__u32 ring_sig_lo;
	__u32 ring_sig_hi;
};

/* A backend of one service; its index in the backends map is its id. */
struct backend {
	__u32 addr[4];
	__u8 dmac[6];  /* the backend's MAC */
	__u8 smac[6];  /* the MAC of the interface that reaches it */
	__u32 ifindex; /* that interface; the ingress one means XDP_TX */
	__u32 service; /* id of the service it belongs to */
	__u16 port;    /* network byte order */
	__u8 state;    /* BE_* */
	__u8 family;
};

/* The 5-tuple of a flow as the client sent it. IPv4 flows are keyed by the
 * compact flow_key4 in a table of their own: a 16-byte key hashes and
 * compares faster than the 40-byte one, on every packet. */
struct flow_key {
	__u32 src[4];
	__u32 dst[4];
	__u16 sport; /* network byte order */
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct flow_key4 {
	__u32 src;
	__u32 dst;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct conn {
	__u32 backend;
	__u32 service;
	__u32 flags;	/* CONN_F_* */
	__u32 nat_port; /* fullnat: the flow's source port towards the backend, network byte order */
};

/* A translated flow as its backend's replies show it: the key is the
 * reply's 5-tuple (src = backend, dst = client, or the balancer's address
 * and the flow's port with fullnat), the value what the client expects. */
struct nat_entry {
	__u32 client[4]; /* the client's address and port */
	__u32 vip[4];	 /* the service's address and port */
	__u16 cport;
	__u16 vport;
	__u32 backend;
	__u32 flags; /* NAT_F_* */
	__u32 pad;
	__u64 stamp_ns; /* TCP: when it closed (0: open); UDP: last use; half-open: when the SYN came */
};

/* The address a fullnat flow to a backend comes from, by backend id. */
struct snat {
	__u32 addr[4];
};

/* How a flow to a backend is encapsulated (ipip, gue), by backend id. */
struct tunnel {
	__u32 src[4];	/* outer source address: the first of the operator's prefix */
	__u16 gue_port; /* gue: the outer UDP destination port, network byte order; 0: ipip */
	__u8 src_bits;	/* low bits of src that vary per flow (0-32) */
	__u8 pad;
};

/* A VIP, whatever its services' ports (an IPv4 address in addr[0]). */
struct vip_key {
	__u32 addr[4];
	__u32 family;
};

struct affinity_key {
	__u32 addr[4]; /* client address */
	__u32 service;
};

struct affinity {
	__u64 last_seen_ns; /* bpf_ktime_get_coarse_ns of the client's last new connection */
	__u32 backend;
	__u32 pad;
};

/* A flow entered in the connection table of a service that shares its
 * entries with other hosts (SVC_F_SYNC): the daemon reads it from
 * sync_events and sends it, named by addresses, to its peers. */
struct sync_event {
	struct flow_key key;
	__u32 service;
	__u32 backend;
	__u32 family; /* AF_INET or AF_INET6: which of key's forms */
};

struct backend_stats {
	__u64 packets;
	__u64 bytes;
	__u64 new_conns;
};

struct service_stats {
	__u64 new_conns;     /* flows entered in the connection table */
	__u64 affinity_hits; /* new flows sent by a live affinity entry */
	__u64 affinity_miss; /* new flows that had to use the ring */
};

/* One CPU's insertions in the current second (guard.h). */
struct insert_window {
	__u64 start_ns; /* when the second began (bpf_ktime_get_coarse_ns) */
	__u64 entered;	/* flows recorded since then */
};

/* One decision of the program, for tether trace (trace.h): the packet as
 * parsed, what became of it, and the frame as it left. */
struct trace_event {
	__u64 time_ns; /* bpf_ktime_get_ns */
	struct flow_key key;
	__u32 service; /* 0: none */
	__u32 backend; /* 0: none */
	__u32 reason;  /* enum reason: why it was not forwarded, or guard_unrecorded; 0: none */
	__u32 verdict; /* XDP_* */
	__u16 len;     /* the frame's length as it left */
	__u16 cap;     /* the bytes of it in data */
	__u8 decided;  /* enum trace_by */
	__u8 family;
	__u8 pad[2];
	__u8 data[TRACE_SNAP];
};

/* tether trace's filter: the packets to trace (trace.h). */
struct trace_filter {
	__u32 vip[4]; /* with port and proto: the service's packets (to it, or from it) */
	__u32 client[4];
	__u16 port;
	__u8 proto;
	__u8 family;	/* of vip and client: AF_INET, AF_INET6 */
	__u8 by_vip;	/* vip, port and proto are set */
	__u8 by_client; /* client is set */
	__u8 pad[2];
};

#endif
