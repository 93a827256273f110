/* consts.h: tunables, map sizes, flags, backend states and drop/pass reasons of the tether XDP program. */
#ifndef TETHER_CONSTS_H
#define TETHER_CONSTS_H

#include <linux/types.h>

/* Default sizes. The loader overrides every one of them from the config
 * before loading, so these only matter to a program loaded by hand. */
#ifndef MAX_SERVICES
#define MAX_SERVICES 1024 /* services (VIP, port, protocol) */
#endif
#ifndef MAX_BACKENDS
#define MAX_BACKENDS 4096 /* backend slots over all services, at most 65536 (16-bit ids in rings) */
#endif
#ifndef CONN_ENTRIES
#define CONN_ENTRIES (1 << 20) /* connection-table entries */
#endif
#ifndef AFFINITY_ENTRIES
#define AFFINITY_ENTRIES (1 << 20) /* affinity-table entries */
#endif
#ifndef RING_SIZE
#define RING_SIZE 65537 /* Maglev ring slots, prime */
#endif
#ifndef NAT_ENTRIES
#define NAT_ENTRIES (1 << 18) /* translation-table entries (nat, fullnat) */
#endif
#ifndef NAT_SYN_ENTRIES
#define NAT_SYN_ENTRIES 16384 /* half-open NAT'ed handshakes (see nat.h) */
#endif
#define TRACE_RING_BYTES (1 << 20) /* trace_events: 232-byte records, 240 with the ring's header: 4,369 */
#define TRACE_SNAP	 160	   /* bytes of each traced frame kept for --pcap */
#define TRACE_CPUS	 1024	   /* trace_reason slots: CPU ids past it share them */

/* What decided a traced packet's backend (struct trace_event.decided). */
enum trace_by {
	TRACE_BY_NONE = 0,     /* nothing: not forwarded to a backend (the reason says why) */
	TRACE_BY_CONN = 1,     /* its connection entry */
	TRACE_BY_AFFINITY = 2, /* its client's affinity entry (a new connection) */
	TRACE_BY_RING = 3,     /* the service's Maglev ring (a new connection) */
};

#ifndef SYNC_RING_BYTES
#define SYNC_RING_BYTES (1 << 20) /* sync_events: 52-byte records, 64 with the ring's header: 16,384 */
#endif
#define VIP_FILTER_LOG2	 8 /* vip_filter's bits: 256 */
#define VIP_FILTER_WORDS (1 << (VIP_FILTER_LOG2 - 6))

#define RING_SLOTS_PER_ENTRY 4 /* 16-bit backend ids per ring array entry */
#define RING_ENTRIES(slots)  (((slots) + RING_SLOTS_PER_ENTRY - 1) / RING_SLOTS_PER_ENTRY)

/* Byte-order constants, precomputed for a little-endian target (bpfel). */
#define ETH_P_IP_BE	0x0008 /* htons(ETH_P_IP) */
#define ETH_P_IPV6_BE	0xDD86 /* htons(ETH_P_IPV6) */
#define ETH_P_8021Q_BE	0x0081 /* htons(ETH_P_8021Q) */
#define ETH_P_8021AD_BE 0xA888 /* htons(ETH_P_8021AD) */
#define IP_MF_OFFSET_BE 0xFF3F /* htons(IP_MF | IP_OFFSET) */
#define IP_OFFSET_BE	0xFF1F /* htons(IP_OFFSET) */

/* service flags (struct service.flags) */
#define SVC_F_SOURCE_AFFINITY (1U << 0) /* key the ring and affinity table by client address */
#define SVC_F_RESET_ON_DOWN   (1U << 1) /* on_down: reset (backends carry it as BE_DOWN_RESET) */
#define SVC_F_NAT	      (1U << 2) /* forwarding nat: VIP:port → backend:port, replies translated back */
#define SVC_F_FULLNAT	      (1U << 3) /* forwarding fullnat: the client's address and port too */
#define SVC_F_IPIP	      (1U << 4) /* forwarding ipip: encapsulated in an outer IP header (encap.h) */
#define SVC_F_GUE	      (1U << 5) /* forwarding gue: in an outer IP and UDP header */
#define SVC_F_SYNC	      (1U << 6) /* new flows go to sync_events, for the hosts that share entries */

/* connection flags (struct conn.flags) */
#define CONN_F_CLOSING (1U << 0) /* a FIN or RST was seen: no longer counted as active */
#define CONN_F_NAT     (1U << 1) /* the flow is translated (nat) */
#define CONN_F_FULLNAT (1U << 2) /* the flow is translated both ways (fullnat) */
#define CONN_F_ENCAP   (1U << 3) /* the flow is encapsulated (ipip, gue: the backend's tunnel says how) */
#define CONN_F_LEARNED                                                                                       \
	(1U << 4) /* entered from another host's entry (sync); cleared by its first packet here */
#define CONN_F_RESET                                                                                         \
	(1U << 5) /* closed by a paced drain (set with CONN_F_CLOSING by the control plane): its TCP packets \
		     are answered with a RST, a UDP flow chooses again */
/* struct conn.flags holds the flags in its low byte, and in bits 8..31
 * when the flow's last packet came: bpf_ktime_get_coarse_ns() >> 30
 * (units of 2^30 ns, about a second), modulo 2^24 (about 208 days). 0 is
 * unknown (an entry an earlier tether or another host made). The program
 * writes it at most once a unit, on a packet that finds it older. */
#define CONN_F_MASK	0xffU
#define CONN_SEEN_SHIFT 8
#define CONN_SEEN_UNIT	30 /* log2 of the unit in ns */

/* VIP flags (the vips map's values) */
#define VIP_F_ECHO_REPLY (1U << 0) /* answer ICMP echo requests to the VIP */

/* NAT entry flags (struct nat_entry.flags) */
#define NAT_F_CLIENT_FIN  (1U << 0) /* the client sent a FIN */
#define NAT_F_BACKEND_FIN (1U << 1) /* the backend sent a FIN */
#define NAT_F_RESET	  (1U << 2) /* either side sent a RST */
#define NAT_F_CLOSED	  (NAT_F_CLIENT_FIN | NAT_F_BACKEND_FIN)
#define NAT_F_UNVERIFIED  (1U << 3) /* entered by no handshake: held only until the backend answers */
#define NAT_F_BACKEND_1ST (1U << 4) /* the backend closed first: it holds the 5-tuple in TIME_WAIT */

/* fullnat source ports: SNAT_PORT_MIN up to SNAT_PORT_MIN + SNAT_PORT_SPAN
 * - 1 (1024-32767), below the kernel's default ephemeral range
 * (32768-60999) so that the balancer's own connections to a backend (its
 * health checks) never share a 5-tuple with a translated flow. A new flow
 * tries SNAT_PORT_TRIES ports in an order its 5-tuple fixes. Half-open
 * entries hold at most NAT_SYN_ENTRIES ports, about half of one backend's:
 * a SYN flood, all to one backend, leaves a new flow with all 16 of its
 * tries taken about once in 40,000. */
#define SNAT_PORT_MIN	1024
#define SNAT_PORT_SPAN	31744
#define SNAT_PORT_TRIES 16
/* How long a port stays taken after its use ended: a closed TCP flow's
 * (both FINs, or a RST) for its last retransmits, or for the backend's
 * TIME_WAIT (60 s on Linux) when the backend closed first; a half-open
 * handshake's, or an unverified entry's, for its SYN retransmits; an idle
 * UDP flow's for its replies. */
#define NAT_CLOSED_HOLD_NS   (10ULL * 1000000000)
#define NAT_TIMEWAIT_HOLD_NS (60ULL * 1000000000)
#define NAT_SYN_HOLD_NS	     (3ULL * 1000000000)
#define NAT_UDP_IDLE_NS	     (120ULL * 1000000000)
#define NAT_UDP_STAMP_NS     (1000000000ULL) /* a UDP entry's last use is written at most once a second */

/* Health probes that follow the client's path (probe.h) carry a socket mark
 * of PROBE_MARK with the backend's id in the low 16 bits. loader/probe.go
 * holds the same values. */
#define PROBE_MARK	0x54480000U /* "TH" */
#define PROBE_MARK_MASK 0xffff0000U

/* Backend states (struct backend.state, a __u8). maps/ names them from the
 * bpf2go-generated constants; a test checks the control plane's states
 * against them. */
enum backend_state {
	BE_UNUSED = 0,	   /* slot free: entries that point here are stale */
	BE_ACTIVE = 1,	   /* in the ring, takes new connections */
	BE_DRAINING = 2,   /* out of the ring; established connections keep flowing */
	BE_DOWN = 3,	   /* out of the ring; affinity ignored; established keep flowing */
	BE_DOWN_RESET = 4, /* like BE_DOWN, but established connections are reset */
};

/* Why a packet was passed to the kernel, dropped, answered with a RST
 * instead of being forwarded, or forwarded without its flow being
 * recorded; index of the reasons map. maps/counters.go
 * names them (an enumerator R_X is counted as "x"; a test checks that the
 * two agree). Append only: the values index counters that a restart or an
 * upgrade adopts. */
enum reason {
	R_PARSED = 0,	       /* not a reason: nothing stopped the packet (never counted) */
	R_PASS_NOT_IP,	       /* not IPv4/IPv6 (ARP, LLDP...): host traffic */
	R_PASS_NOT_VIP,	       /* IP traffic for no service */
	R_PASS_NOT_TCP_UDP,    /* neither TCP nor UDP (ICMP, ND...) */
	R_PASS_IPV4_OPTIONS,   /* IPv4 header with options: unsupported */
	R_PASS_IPV4_FRAGMENT,  /* IPv4 fragment: unsupported (no L4 ports) */
	R_PASS_IPV6_EXTENSION, /* IPv6 extension header: unsupported */
	R_PASS_VLAN_STACK,     /* more than one VLAN tag: unsupported */
	R_DROP_TRUNCATED,      /* a header runs past the end of the frame */
	R_DROP_BAD_HEADER,     /* impossible IP header field (IHL<5, total length, version) */
	R_DROP_NO_BACKEND,     /* VIP traffic but the ring has no backend */
	R_DROP_TX_FAILED,      /* bpf_redirect refused */
	R_RESET_NO_BACKEND,    /* TCP to a service with no usable backend: answered with a RST */
	R_RESET_BACKEND_DOWN,  /* TCP of a connection whose backend is down (on_down: reset): RST */
	R_DROP_L4_TRUNCATED,   /* the TCP or UDP header runs past the IP datagram */
	R_DROP_TCP_OFFSET,     /* TCP data offset below 5 or past the end of the segment */
	R_DROP_UDP_LENGTH,     /* UDP length field other than the IP datagram's L4 length */
	R_DROP_IP_CHECKSUM,    /* IPv4 header checksum wrong on a packet that is not a tracked flow's */
	R_RESET_NAT_PORTS,     /* fullnat: no free source port towards the backend: RST */
	R_RESET_NAT_CLASH,     /* nat: the backend's reply 5-tuple is another live flow's: RST */
	R_PASS_NAT_KERNEL,     /* a translated reply the kernel sends (no next hop yet, other port) */
	R_DROP_NAT_NO_ROUTE,   /* a translated reply with no route to the client (or forwarding off) */
	R_DROP_NAT_STALE,      /* a packet of a translated flow whose 5-tuple another flow now holds */
	R_PASS_NAT_MTU,	       /* nat: a reply over the egress MTU, to the kernel untranslated */
	R_DROP_NAT_MTU,	       /* fullnat: a reply over the egress MTU */
	R_ICMP_TOO_BIG,	       /* ipip, gue: over the egress MTU once encapsulated: answered with ICMP */
	R_DROP_ENCAP_MTU, /* ipip, gue: over the egress MTU, and IPv4 without DF (or too short to quote) */
	R_DROP_ENCAP_NO_ROUTE, /* ipip, gue: no route to the backend (or forwarding off) */
	R_PASS_ICMP_NO_FLOW,   /* an ICMP error about a VIP flow whose backend is gone: to the kernel */
	R_ICMP_ECHO_REPLY,     /* an echo request to a VIP, answered */
	R_GUARD_UNRECORDED,    /* forwarded by the ring without an entry: this CPU's insertions were spent
				  (guard.h) */
	R_DROP_GUARD,	 /* a new nat or fullnat flow while this CPU's insertions were spent (guard.h) */
	R_RESET_DRAINED, /* TCP of a connection a paced drain closed (CONN_F_RESET): RST */
	R_MAX,
};

#endif
