//go:build ignore

/* tether.c: the XDP entry point. Per packet, as DESIGN.md describes:
 *   1. parse; anything that is not TCP/UDP to a VIP goes to the kernel;
 *   2. a connection-table hit whose backend still exists is forwarded
 *      (but a bare SYN whose backend takes no new connections chooses
 *      again); a destination that vip_filter says is no VIP's goes
 *      straight to step 5;
 *   3. a new flow takes its backend from the affinity table (source
 *      affinity, entry alive, backend active) or else from the service's
 *      Maglev ring at hash(key) % ring_size;
 *   4. its choice is recorded (not for a bare SYN: see below; not past
 *      this CPU's insertions a second: guard.h), counted,
 *      and the frame is rewritten and sent: its MACs (dsr), or its
 *      addresses and ports too (nat, fullnat: nat.h), or it is
 *      encapsulated (ipip, gue: encap.h);
 *   5. a packet for no VIP that is a translated flow's reply is translated
 *      back and sent to the client;
 *   6. an ICMP error about a VIP flow goes to the flow's backend (icmp.h).
 *
 * The object holds a second program, tether_probe (probe.h), which sends
 * the daemon's health probes along the same path on TC egress. */

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "consts.h"
#include "maps.h"
#include "parsing.h"
#include "hash.h"
#include "forward.h"
#include "reset.h"
#include "lookup.h"
#include "guard.h"
#include "nat.h"
#include "encap.h"
#include "icmp.h"
#include "probe.h"
#include "trace.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/* Emits enum backend_state into the BTF for bpf2go (-type backend_state):
 * struct backend holds a state in a __u8, which names no type. */
const enum backend_state *backend_state_btf __attribute__((unused));
/* And struct sync_event, which travels through a ring buffer, untyped. */
const struct sync_event *sync_event_btf __attribute__((unused));
/* And enum trace_by, which struct trace_event holds in a __u8, and struct
 * trace_event, which travels through a ring buffer. */
const enum trace_by *trace_by_btf __attribute__((unused));
const struct trace_event *trace_event_btf __attribute__((unused));

/* share hands a new flow of a service that shares its entries to the
 * daemon, which sends it to the other hosts; a full ring counts it lost. */
static __always_inline void share(const struct packet *pkt, __u32 service, __u32 backend)
{
	struct sync_event ev = {
	    .key = pkt->key, .service = service, .backend = backend, .family = pkt->family};
	if (bpf_ringbuf_output(&sync_events, &ev, sizeof(ev), 0)) {
		__u32 k = 0;
		__u64 *lost = bpf_map_lookup_elem(&sync_lost, &k);
		if (lost)
			*lost += 1;
	}
}

/* seen_of is time t (bpf_ktime_get_coarse_ns) as struct conn.flags holds
 * it (CONN_SEEN_SHIFT). */
static __always_inline __u32 seen_of(__u64 t)
{
	return (__u32)(t >> CONN_SEEN_UNIT) << CONN_SEEN_SHIFT;
}

/* record remembers a new flow's backend, as of time now (the coarse clock,
 * read once for the packet). A bare SYN is not recorded: the handshake's
 * next packet is, so a flood of spoofed SYNs cannot push the entries of
 * established connections out of the LRU tables. The ring and affinity
 * give that next packet the same backend. A client's affinity entry is
 * written only when the ring chose: an entry that chose was marked seen
 * where it lies by choose_backend. */
static __always_inline void record(const struct service *svc, const struct packet *pkt,
				   const struct affinity_key *ak, __u32 id, int affinity_hit, __u64 now,
				   __u32 flags, __u16 nat_port)
{
	struct conn c = {
	    .backend = id,
	    .service = svc->id,
	    .flags = flags | (pkt->closing ? CONN_F_CLOSING : 0) | seen_of(now),
	    .nat_port = nat_port,
	};
	insert_conn(pkt, &c);
	if (svc->flags & SVC_F_SYNC)
		share(pkt, svc->id, id);
	if ((svc->flags & SVC_F_SOURCE_AFFINITY) && !affinity_hit) {
		struct affinity a = {.last_seen_ns = now, .backend = id};
		bpf_map_update_elem(&affinities, ak, &a, BPF_ANY);
	}
	struct service_stats *ss = bpf_map_lookup_elem(&svc_stats, &svc->id);
	if (ss) {
		ss->new_conns += 1;
		if (affinity_hit)
			ss->affinity_hits += 1;
		else
			ss->affinity_miss += 1;
	}
	struct backend_stats *bs = bpf_map_lookup_elem(&be_stats, &id);
	if (bs)
		bs->new_conns += 1;
}

/* new_nat_flow enters a new translated flow to backend be: a bare SYN a
 * half-open NAT entry only (nat.h), any other packet its connection and
 * NAT entries; and forwards it. A fullnat flow that finds no free source
 * port, or a nat flow whose replies would look like another live flow's,
 * is refused with a RST (UDP: dropped) and counted; one past this CPU's
 * insertions (guard.h) is dropped and counted. The freed entry of
 * another flow on the chosen reply 5-tuple is removed first, so that the
 * backend's replies find the new flow's. A TCP flow whose handshake was
 * not seen (a spoofed ACK, or a flow whose entries the tables lost) is
 * entered unverified: its port is held only until the backend answers. */
static __always_inline int new_nat_flow(struct xdp_md *ctx, const struct packet *pkt,
					const struct service *svc, const struct backend *be,
					const struct affinity_key *ak, __u32 id, int affinity_hit, __u64 now,
					int replace)
{
	int half = pkt->syn_only && !replace;
	/* choose_backend read the clock only for source affinity. */
	__u64 t = now ? now : bpf_ktime_get_coarse_ns();
	if (!half && !replace && !may_insert(t))
		return count_reason(R_DROP_GUARD, XDP_DROP);
	struct flow_key rk = {};
	struct snat *sn = NULL;
	__u16 port = 0;
	__u32 flags = CONN_F_NAT;
	if (svc->flags & SVC_F_FULLNAT) {
		flags = CONN_F_FULLNAT;
		sn = snat_of(id);
		if (!sn)
			return count_reason(R_DROP_NO_BACKEND, XDP_DROP);
		port = snat_choose(pkt, be, sn, &rk, t);
		if (!port)
			return reset_or_drop(ctx, pkt, R_RESET_NAT_PORTS);
	} else {
		nat_key(&rk, pkt, be, NULL, 0);
		if (nat_taken(pkt, &rk, t))
			return reset_or_drop(ctx, pkt, R_RESET_NAT_CLASH);
	}
	struct nat_entry *cur = nat_lookup(pkt->family, &rk, 0);
	if (cur && !nat_ours(cur, pkt)) {
		nat_delete(pkt->family, &rk);
		cur = NULL;
	}
	if (half) {
		struct nat_entry e = nat_entry_of(pkt, id, t);
		nat_insert(pkt->family, &rk, &e, 1);
	} else if (cur && pkt->closing) {
		nat_closing(cur, pkt, NAT_F_CLIENT_FIN);
	} else if (!cur) {
		/* A UDP flow's stamp is its last use; an open TCP flow's is 0,
		 * an unverified one's the time it was entered. */
		struct nat_entry e = nat_entry_of(pkt, id, t);
		if (pkt->key.proto == IPPROTO_TCP) {
			struct nat_entry *h = nat_lookup(pkt->family, &rk, 1);
			if (h && nat_ours(h, pkt))
				e.stamp_ns = 0;
			else
				e.flags = NAT_F_UNVERIFIED;
			if (pkt->closing)
				nat_closing(&e, pkt, NAT_F_CLIENT_FIN);
		}
		nat_insert(pkt->family, &rk, &e, 0);
	}
	if (!half)
		record(svc, pkt, ak, id, affinity_hit, t, flags, port);
	return forward_nat(ctx, pkt, be, id, sn, port);
}

/* new_flow chooses a backend for a packet without a usable connection
 * entry, once its IPv4 header checksum proved right. replace: a bare SYN
 * whose entry it takes over (see tether_xdp) is recorded at once, since
 * the handshake's next packet would otherwise find the old entry. A flow
 * past this CPU's insertions (guard.h) is forwarded unrecorded. */
static __always_inline int new_flow(struct xdp_md *ctx, struct packet *pkt, int replace)
{
	struct service *svc = lookup_service(pkt);
	if (!svc)
		return nat_reply(ctx, pkt);
	if (!ipv4_header_ok(ctx, pkt))
		return count_reason(R_DROP_IP_CHECKSUM, XDP_DROP);

	struct affinity_key ak;
	__u64 now;
	int affinity_hit;
	__u32 id = choose_backend(svc, pkt, &ak, &now, &affinity_hit, replace || !pkt->syn_only);
	pkt->decided = affinity_hit ? TRACE_BY_AFFINITY : TRACE_BY_RING;
	pkt->service = svc->id;
	pkt->backend = id;

	struct backend *be = lookup_backend(id, svc->id);
	if (!be)
		return reset_tcp(ctx, pkt, R_RESET_NO_BACKEND);
	if (svc->flags & (SVC_F_NAT | SVC_F_FULLNAT))
		return new_nat_flow(ctx, pkt, svc, be, &ak, id, affinity_hit, now, replace);
	__u32 encap = svc->flags & (SVC_F_IPIP | SVC_F_GUE) ? CONN_F_ENCAP : 0;
	/* choose_backend read the clock only for source affinity; a bare SYN
	 * that is not recorded needs none. */
	if (!now && (replace || !pkt->syn_only))
		now = bpf_ktime_get_coarse_ns();
	if (replace || (!pkt->syn_only && may_insert(now)))
		record(svc, pkt, &ak, id, affinity_hit, now, encap, 0);
	else if (!pkt->syn_only)
		count_reason(R_GUARD_UNRECORDED, 0);
	if (encap)
		return forward_encap(ctx, pkt, be, id);
	return forward_dsr(ctx, be, id);
}

/* handle decides what becomes of one packet, parsed into pkt. */
static __always_inline int handle(struct xdp_md *ctx, struct packet *pkt)
{
	int reason = parse_packet(ctx, pkt);
	if (reason == R_PASS_NOT_TCP_UDP &&
	    pkt->key.proto == (pkt->family == AF_INET6 ? IPPROTO_ICMPV6 : IPPROTO_ICMP))
		return icmp_error(ctx, pkt);
	if (reason)
		return count_reason(reason, verdict_of(reason));

	/* A destination that is no VIP's has no service and no connection
	 * entry: it can only be a translated flow's reply. */
	if (!may_be_vip(pkt))
		return nat_reply(ctx, pkt);
	struct conn *c = lookup_conn(pkt);
	if (c) {
		__u32 id = c->backend;
		pkt->decided = TRACE_BY_CONN;
		pkt->service = c->service;
		pkt->backend = id;
		struct backend *be = lookup_backend(id, c->service);
		/* A new handshake on the 5-tuple of a connection whose backend
		 * no longer takes new connections (draining, down), as a client
		 * that reuses a port makes it, is a new connection: it chooses
		 * again, and its choice replaces the entry so that the rest of
		 * the handshake follows. The old connection's other packets go
		 * on as its backend's state says until then. */
		if (be && pkt->syn_only && (be->state != BE_ACTIVE || (c->flags & CONN_F_RESET)))
			return new_flow(ctx, pkt, 1);
		/* on_down: reset, and a connection a paced drain closed. A TCP
		 * connection is reset so that its client reconnects at once; a
		 * UDP flow chooses a backend again. */
		if (be && (be->state == BE_DOWN_RESET || (c->flags & CONN_F_RESET))) {
			if (pkt->key.proto == IPPROTO_TCP)
				return reset_tcp(ctx, pkt,
						 be->state == BE_DOWN_RESET ? R_RESET_BACKEND_DOWN
									    : R_RESET_DRAINED);
			be = NULL;
		}
		if (be) {
			/* The entry is written only when this packet changes it, so at
			 * most about once a second for a flow that sends many:
			 * - a flow another host entered reaches this one: from now on
			 *   it is one of ours (counted, sent to peers that ask);
			 * - a FIN or RST: the entry stays for the last packets, but no
			 *   longer counts as open; a new handshake on the same 5-tuple
			 *   reopens it;
			 * - the time of its last packet, in units of about a second
			 *   (seen_now, which the loader keeps: no clock read here). */
			__u32 fl = c->flags;
			__u32 now = seen_now;
			__u32 nf = (fl & CONN_F_MASK & ~CONN_F_LEARNED) |
				   (now ? now << CONN_SEEN_SHIFT : fl & ~CONN_F_MASK);
			if (pkt->closing)
				nf |= CONN_F_CLOSING;
			else if (pkt->syn_only)
				nf &= ~CONN_F_CLOSING;
			if (nf != fl)
				c->flags = nf;
			/* The NAT entry may have been closed by the backend alone: a
			 * SYN reopens it whatever the connection entry says. */
			if (c->flags & (CONN_F_NAT | CONN_F_FULLNAT)) {
				int verdict = forward_nat_conn(ctx, pkt, be, c);
				if (verdict != NAT_STALE)
					return verdict;
				/* Another flow holds its replies' 5-tuple now: a new
				 * handshake chooses again, the rest is dropped. */
				if (!pkt->syn_only)
					return count_reason(R_DROP_NAT_STALE, XDP_DROP);
				return new_flow(ctx, pkt, 1);
			}
			if (c->flags & CONN_F_ENCAP)
				return forward_encap(ctx, pkt, be, id);
			return forward_dsr(ctx, be, id);
		}
	}
	return new_flow(ctx, pkt, 0);
}

SEC("xdp")
int tether_xdp(struct xdp_md *ctx)
{
	struct packet pkt = {};
	int verdict = handle(ctx, &pkt);
	if (trace_on)
		trace_packet(ctx, &pkt, verdict);
	return verdict;
}
