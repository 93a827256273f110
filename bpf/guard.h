/* guard.h: the insertion guard. A packet of no known flow that is not a
 * bare SYN enters the LRU tables (connection, affinity, NAT), and every
 * entry it adds may evict an established connection's: a flood of spoofed
 * ACKs or UDP datagrams with random 5-tuples would otherwise push out the
 * entries of idle WebSockets at the flood's rate. Each CPU may record at
 * most insert_rate new flows a second (Katran bounds its LRU updates the
 * same way, per CPU, in one-second windows). Past that, a dsr, ipip or gue
 * flow is still forwarded, by the ring or its affinity entry, which give
 * it the backend a recorded flow would have, and its next packet tries
 * again; a nat or fullnat flow, which cannot be forwarded without its
 * translation, is dropped and its client retransmits. Both are counted.
 * The windows are per CPU, so the guard writes no cache line another CPU
 * reads. */
#ifndef TETHER_GUARD_H
#define TETHER_GUARD_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "maps.h"

#define NSEC_PER_SEC 1000000000ULL

/* may_insert says whether this CPU may record one more new flow at time
 * now (bpf_ktime_get_coarse_ns), and counts it if so. */
static __always_inline int may_insert(__u64 now)
{
	__u32 limit = insert_rate;
	if (!limit)
		return 1;
	__u32 k = 0;
	struct insert_window *w = bpf_map_lookup_elem(&insert_guard, &k);
	if (!w)
		return 1;
	if (now - w->start_ns >= NSEC_PER_SEC) {
		w->start_ns = now;
		w->entered = 0;
	}
	if (w->entered >= limit)
		return 0;
	w->entered += 1;
	return 1;
}

#endif
