/* forward.h: counting, backend checks and the DSR rewrite that sends a frame to its backend. */
#ifndef TETHER_FORWARD_H
#define TETHER_FORWARD_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include "consts.h"
#include "maps.h"

/* count_reason adds one packet to a pass or drop reason and returns
 * the verdict it is given, so call sites read "return count_reason(...)". */
static __always_inline int count_reason(__u32 reason, int verdict)
{
	__u64 *n = bpf_map_lookup_elem(&reasons, &reason);
	if (n)
		*n += 1;
	if (trace_on)
		trace_reason[bpf_get_smp_processor_id() & (TRACE_CPUS - 1)] = reason;
	return verdict;
}

/* verdict_of is what happens to a packet that parse_packet refused. */
static __always_inline int verdict_of(__u32 reason)
{
	return reason >= R_DROP_TRUNCATED ? XDP_DROP : XDP_PASS;
}

/* lookup_backend returns the backend with this id if it still belongs to
 * the service, or NULL for a stale id. */
static __always_inline struct backend *lookup_backend(__u32 id, __u32 service)
{
	struct backend *be = bpf_map_lookup_elem(&backends, &id);
	if (!be || be->state == BE_UNUSED || be->service != service)
		return NULL;
	return be;
}

/* forward_dsr rewrites the Ethernet addresses to reach the backend, which
 * holds the VIP itself and answers the client directly, and sends the frame:
 * back out of the ingress interface with XDP_TX, or to another one. */
static __always_inline int forward_dsr(struct xdp_md *ctx, const struct backend *be, __u32 id)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return count_reason(R_DROP_TRUNCATED, XDP_DROP);
	__builtin_memcpy(eth->h_dest, be->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, be->smac, ETH_ALEN);

	struct backend_stats *st = bpf_map_lookup_elem(&be_stats, &id);
	if (st) {
		st->packets += 1;
		st->bytes += data_end - data;
	}
	/* Forwarded packets are counted per backend above, not as a reason. */
	if (be->ifindex == 0 || be->ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	int verdict = bpf_redirect(be->ifindex, 0);
	if (verdict != XDP_REDIRECT)
		return count_reason(R_DROP_TX_FAILED, XDP_DROP);
	return verdict;
}

#endif
