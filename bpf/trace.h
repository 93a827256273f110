/* trace.h: tether trace, the program's decisions as they happen. While a
 * trace runs (trace_on), each packet the filter takes is reported once the
 * program has decided, with the frame as it leaves (as the backend gets
 * it, for frames sent back out). With no trace running a packet pays one
 * load of trace_on. */
#ifndef TETHER_TRACE_H
#define TETHER_TRACE_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include "consts.h"
#include "maps.h"
#include "parsing.h"

static __always_inline int trace_addr_eq(const __u32 *a, const __u32 *b, int v6)
{
	if (!v6)
		return a[0] == b[0];
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* trace_takes says whether the filter takes a packet: to the service's
 * VIP and port, or from them; from the client, or to it. */
static __always_inline int trace_takes(const struct packet *pkt)
{
	const struct trace_filter *f = &trace_match;
	int v6 = pkt->family == AF_INET6;
	if ((f->by_vip || f->by_client) && f->family != pkt->family)
		return 0;
	if (f->by_vip) {
		int to = pkt->key.proto == f->proto && pkt->key.dport == f->port &&
			 trace_addr_eq(pkt->key.dst, f->vip, v6);
		int from = pkt->key.proto == f->proto && pkt->key.sport == f->port &&
			   trace_addr_eq(pkt->key.src, f->vip, v6);
		if (!to && !from)
			return 0;
	}
	if (f->by_client && !trace_addr_eq(pkt->key.src, f->client, v6) &&
	    !trace_addr_eq(pkt->key.dst, f->client, v6))
		return 0;
	return 1;
}

/* trace_packet reports one packet's decision. */
static __always_inline void trace_packet(struct xdp_md *ctx, struct packet *pkt, int verdict)
{
	/* The reason is this packet's, or none: taken or not, it is cleared
	 * for the next one. */
	__u32 cpu = bpf_get_smp_processor_id() & (TRACE_CPUS - 1);
	__u32 reason = trace_reason[cpu];
	if (reason)
		trace_reason[cpu] = 0;
	if (!trace_takes(pkt))
		return;
	struct trace_event *e = bpf_ringbuf_reserve(&trace_events, sizeof(*e), 0);
	if (!e) {
		__sync_fetch_and_add(&trace_lost, 1);
		return;
	}
	e->time_ns = bpf_ktime_get_ns();
	e->key = pkt->key;
	e->service = pkt->service;
	e->backend = pkt->backend;
	e->reason = reason;
	e->verdict = verdict;
	e->decided = pkt->decided;
	e->family = pkt->family;
	e->pad[0] = 0;
	e->pad[1] = 0;
	__u64 len = bpf_xdp_get_buff_len(ctx);
	__u64 cap = len;
	asm volatile("" : "+r"(cap)); /* compared here, as the verifier sees it */
	if (cap > TRACE_SNAP)
		cap = TRACE_SNAP;
	e->len = len;
	e->cap = cap;
	if (cap == 0 || bpf_xdp_load_bytes(ctx, 0, e->data, cap))
		e->cap = 0;
	bpf_ringbuf_submit(e, 0);
}

#endif
