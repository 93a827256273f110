/* hash.h: the flow hash (MurmurHash3 x86-32 over whole words); maglev/hash.go is its reference model. */
#ifndef TETHER_HASH_H
#define TETHER_HASH_H

#include <linux/types.h>
#include "maps.h"

static __always_inline __u32 rotl32(__u32 x, __u32 r)
{
	return (x << r) | (x >> (32 - r));
}

static __always_inline __u32 hash_mix(__u32 h, __u32 w)
{
	w *= 0xcc9e2d51;
	w = rotl32(w, 15);
	w *= 0x1b873593;
	h ^= w;
	h = rotl32(h, 13);
	return h * 5 + 0xe6546b64;
}

static __always_inline __u32 hash_finish(__u32 h, __u32 len)
{
	h ^= len;
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline __u32 hash_addr(__u32 h, const __u32 *addr)
{
	h = hash_mix(h, addr[0]);
	h = hash_mix(h, addr[1]);
	h = hash_mix(h, addr[2]);
	return hash_mix(h, addr[3]);
}

/* hash_source keys source affinity: the client address alone. */
static __always_inline __u32 hash_source(__u32 seed, const struct flow_key *key)
{
	return hash_finish(hash_addr(seed, key->src), 16);
}

/* hash_conn keys connection affinity: client address, both ports, protocol. */
static __always_inline __u32 hash_conn(__u32 seed, const struct flow_key *key)
{
	__u32 h = hash_addr(seed, key->src);
	h = hash_mix(h, (__u32)key->sport | ((__u32)key->dport << 16));
	h = hash_mix(h, key->proto);
	return hash_finish(h, 24);
}

#endif
