/* lookup.h: finding a packet's service, connection entry, affinity entry and ring slot. */
#ifndef TETHER_LOOKUP_H
#define TETHER_LOOKUP_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "consts.h"
#include "maps.h"
#include "parsing.h"
#include "hash.h"
#include "forward.h"

/* key4_of is the compact key of an IPv4 flow key. */
static __always_inline struct flow_key4 key4_of(const struct flow_key *k)
{
	struct flow_key4 k4 = {
	    .src = k->src[0],
	    .dst = k->dst[0],
	    .sport = k->sport,
	    .dport = k->dport,
	    .proto = k->proto,
	};
	return k4;
}

/* lookup_service finds the service of the packet's VIP, port and protocol. */
static __always_inline struct service *lookup_service(const struct packet *pkt)
{
	if (pkt->family == AF_INET6) {
		struct service_key sk = {.port = pkt->key.dport, .proto = pkt->key.proto};
		__builtin_memcpy(sk.addr, pkt->key.dst, sizeof(sk.addr));
		return bpf_map_lookup_elem(&services6, &sk);
	}
	struct service_key4 sk = {.addr = pkt->key.dst[0], .port = pkt->key.dport, .proto = pkt->key.proto};
	return bpf_map_lookup_elem(&services4, &sk);
}

/* affinity_backend returns the backend id remembered for this client if the
 * entry has not timed out and its backend still takes new connections;
 * with refresh, it also marks the entry seen at now, where it lies (an
 * update would take a fresh element from the LRU and free the old one, for
 * every new flow of a client that reconnects). */
static __always_inline __u32 affinity_backend(const struct service *svc, const struct affinity_key *ak,
					      __u64 now, int refresh)
{
	struct affinity *a = bpf_map_lookup_elem(&affinities, ak);
	/* Signed: an entry the daemon wrote (a renewal, another host's) is
	 * stamped with CLOCK_MONOTONIC, up to a tick ahead of this coarse
	 * clock, and is fresh, not expired. */
	if (!a || (__s64)(now - a->last_seen_ns) > (__s64)svc->affinity_timeout_ns)
		return 0;
	struct backend *be = lookup_backend(a->backend, svc->id);
	if (!be || be->state != BE_ACTIVE)
		return 0;
	if (refresh)
		a->last_seen_ns = now;
	return a->backend;
}

/* ring_backend returns the backend id at the flow's slot of the service's ring. */
static __always_inline __u32 ring_backend(const struct service *svc, const struct packet *pkt)
{
	void *ring = bpf_map_lookup_elem(&rings, &svc->id);
	if (!ring)
		return 0;
	__u32 h = (svc->flags & SVC_F_SOURCE_AFFINITY) ? hash_source(hash_seed, &pkt->key)
						       : hash_conn(hash_seed, &pkt->key);
	__u32 slot = h % ring_size;
	__u32 entry = slot / RING_SLOTS_PER_ENTRY;
	__u64 *slots = bpf_map_lookup_elem(ring, &entry);
	return slots ? (*slots >> (16 * (slot % RING_SLOTS_PER_ENTRY))) & 0xffff : 0;
}

/* choose_backend picks the backend of a flow with no connection entry:
 * the client's affinity entry (source affinity) or else the ring's slot.
 * It leaves in ak and *now the affinity key and the clock it read (0 when
 * it read none), for recording the choice, and in *hit whether affinity
 * chose. refresh: the packet is not a bare SYN (or takes over an entry),
 * and the client's affinity entry that chose is marked seen now, whether
 * or not the flow is then recorded (the insertion guard, or a nat flow
 * refused for want of a port, leave it unrecorded): it only keeps alive
 * the entry of a client that is sending, and never creates one. The
 * element may be reused for another client between the lookup and the
 * write, as any map value the program writes can be: that client's entry
 * is then stamped with about the same time. */
static __always_inline __u32 choose_backend(const struct service *svc, const struct packet *pkt,
					    struct affinity_key *ak, __u64 *now, int *hit, int refresh)
{
	__builtin_memset(ak, 0, sizeof(*ak));
	ak->service = svc->id;
	*now = 0;
	__u32 id = 0;
	if (svc->flags & SVC_F_SOURCE_AFFINITY) {
		__builtin_memcpy(ak->addr, pkt->key.src, sizeof(ak->addr));
		*now = bpf_ktime_get_coarse_ns();
		id = affinity_backend(svc, ak, *now, refresh);
	}
	*hit = id != 0;
	return id ? id : ring_backend(svc, pkt);
}

/* may_be_vip says whether the packet's destination address has its bit
 * in vip_filter: the multiplicative hash of its words (an IPv4 address is
 * dst[0], the other words zero), top VIP_FILTER_LOG2 bits.
 * maps.VIPFilterBit is its model. */
static __always_inline int may_be_vip(const struct packet *pkt)
{
	const __u32 *d = pkt->key.dst;
	__u32 bit = ((d[0] ^ d[1] ^ d[2] ^ d[3]) * 0x9e3779b1U) >> (32 - VIP_FILTER_LOG2);
	return (vip_filter[bit / 64] >> (bit % 64)) & 1;
}

/* Each table is named at its own call site: a call that could see either
 * map would lose the verifier's inlining of the lookup. */
static __always_inline struct conn *lookup_conn(const struct packet *pkt)
{
	if (pkt->family == AF_INET6)
		return bpf_map_lookup_elem(&conns6, &pkt->key);
	struct flow_key4 k = key4_of(&pkt->key);
	return bpf_map_lookup_elem(&conns4, &k);
}

static __always_inline void insert_conn(const struct packet *pkt, const struct conn *c)
{
	if (pkt->family == AF_INET6) {
		bpf_map_update_elem(&conns6, &pkt->key, c, BPF_ANY);
		return;
	}
	struct flow_key4 k = key4_of(&pkt->key);
	bpf_map_update_elem(&conns4, &k, c, BPF_ANY);
}

#endif
