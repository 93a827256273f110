/* encap.h: forwarding ipip and gue: a flow's packet goes to its backend
 * whole, inside an outer IP header (ipip) or an outer IP and UDP header
 * (gue, direct IP encapsulation, GUE variant 1) addressed to the backend,
 * which decapsulates it, holds the VIP and answers the client itself. The
 * outer packet goes to the next hop the kernel's FIB gives for the
 * backend's address, on whatever interface that is.
 *
 * The outer family is the backend's: IPv4 in IPv4, IPv6 in IPv6, and the
 * mixed cases (IPv4 in IPv6, IPv6 in IPv4) alike. Per flow, the low
 * src_bits of the outer source address vary (and with gue the UDP source
 * port, and with IPv6 the flow label), so that a backend's NIC spreads
 * flows over its receive queues. A packet that would exceed the egress MTU
 * once encapsulated is answered with ICMP "fragmentation needed" or
 * "packet too big" giving the MTU that fits. */
#ifndef TETHER_ENCAP_H
#define TETHER_ENCAP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "consts.h"
#include "maps.h"
#include "parsing.h"
#include "hash.h"
#include "csum.h"
#include "forward.h"
#include "reset.h"

/* The ICMP headers tether writes (linux/icmp.h would pull in libc's). */
struct icmp4 {
	__u8 type; /* 3: destination unreachable */
	__u8 code; /* 4: fragmentation needed */
	__u16 check;
	__u16 unused;
	__u16 mtu;
};

struct icmp6 {
	__u8 type; /* 2: packet too big */
	__u8 code;
	__u16 check;
	__u32 mtu;
};

#define ENCAP_HASH_SALT 0x656e6361 /* "enca": the per-flow variation's own hash */
#define GUE_SPORT_BASE	0xc000	   /* gue source ports: 49152-65535 */

/* ICMP errors quote the start of the packet they answer: its IP header and
 * the first bytes beyond (the ports and sequence number the sender needs). */
#define ICMP4_QUOTE 64
#define ICMP6_QUOTE 96

/* encap_source is the outer source of a flow whose hash is h: the tunnel's
 * address with its low src_bits taken from h. */
static __always_inline void encap_source(__u32 *src, const struct tunnel *tn, __u8 family, __u32 h)
{
	__builtin_memcpy(src, tn->src, sizeof(tn->src));
	__u32 bits = tn->src_bits;
	if (!bits)
		return;
	__u32 mask = bits >= 32 ? 0xffffffff : (1U << bits) - 1;
	int last = family == AF_INET6 ? 3 : 0;
	__u32 a = bpf_ntohl(src[last]);
	src[last] = bpf_htonl((a & ~mask) | (h & mask));
}

/* icmp_room makes room for an ICMP error of add bytes of headers before
 * the packet it answers, of which it keeps quote bytes from the IP header
 * on: the Ethernet header (and VLAN tag) move to the new start, their MACs
 * swapped so that the error goes back where the packet came from. It
 * returns the new start, NULL if the frame could not be reshaped. */
static __always_inline void *icmp_room(struct xdp_md *ctx, const struct packet *pkt, __u32 add, __u32 quote)
{
	__u32 l3off = l3_offset(pkt);
	if (bpf_xdp_adjust_head(ctx, -(int)add) || shrink(ctx, l3off + add + quote))
		return NULL;
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	if (data + l3off + add + quote > data_end || data + add + ETH_HLEN + 4 > data_end)
		return NULL;
	__builtin_memcpy(data, data + add, ETH_HLEN);
	if (pkt->vlan)
		__builtin_memcpy(data + ETH_HLEN, data + add + ETH_HLEN, 4);
	swap_macs(data);
	return data;
}

/* too_big4 turns an IPv4 packet with DF that does not fit once
 * encapsulated into the ICMP "fragmentation needed" that answers it, from
 * the VIP, with next-hop MTU mtu, and sends it back where it came from. */
static __always_inline int too_big4(struct xdp_md *ctx, const struct packet *pkt, __u32 mtu)
{
	__u32 add = sizeof(struct iphdr) + sizeof(struct icmp4);
	void *data = icmp_room(ctx, pkt, add, ICMP4_QUOTE);
	if (!data)
		return count_reason(R_DROP_ENCAP_MTU, XDP_DROP);
	void *data_end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + l3_offset(pkt);
	struct icmp4 *icmp = (void *)(ip + 1);
	struct iphdr *quoted = (void *)(icmp + 1);
	if ((void *)(quoted + 1) > data_end || (void *)icmp + sizeof(*icmp) + ICMP4_QUOTE > data_end)
		return count_reason(R_DROP_ENCAP_MTU, XDP_DROP);
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = bpf_htons(add + ICMP4_QUOTE);
	ip->id = 0;
	ip->frag_off = 0;
	ip->ttl = 64;
	ip->protocol = IPPROTO_ICMP;
	ip->saddr = quoted->daddr;
	ip->daddr = quoted->saddr;
	ip->check = 0;
	ip->check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0));
	icmp->type = 3;
	icmp->code = 4;
	icmp->check = 0;
	icmp->unused = 0;
	icmp->mtu = bpf_htons(mtu);
	icmp->check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)icmp, sizeof(*icmp) + ICMP4_QUOTE, 0));
	return count_reason(R_ICMP_TOO_BIG, XDP_TX);
}

/* too_big6 is too_big4 for IPv6: ICMPv6 "packet too big". */
static __always_inline int too_big6(struct xdp_md *ctx, const struct packet *pkt, __u32 mtu)
{
	__u32 add = sizeof(struct ipv6hdr) + sizeof(struct icmp6);
	void *data = icmp_room(ctx, pkt, add, ICMP6_QUOTE);
	if (!data)
		return count_reason(R_DROP_ENCAP_MTU, XDP_DROP);
	void *data_end = (void *)(long)ctx->data_end;
	struct ipv6hdr *ip6 = data + l3_offset(pkt);
	struct icmp6 *icmp = (void *)(ip6 + 1);
	struct ipv6hdr *quoted = (void *)(icmp + 1);
	if ((void *)(quoted + 1) > data_end || (void *)icmp + sizeof(*icmp) + ICMP6_QUOTE > data_end)
		return count_reason(R_DROP_ENCAP_MTU, XDP_DROP);
	*(__u32 *)ip6 = bpf_htonl(6 << 28);
	ip6->payload_len = bpf_htons(sizeof(*icmp) + ICMP6_QUOTE);
	ip6->nexthdr = IPPROTO_ICMPV6;
	ip6->hop_limit = 64;
	ip6->saddr = quoted->daddr;
	ip6->daddr = quoted->saddr;
	icmp->type = 2;
	icmp->code = 0;
	icmp->check = 0;
	icmp->mtu = bpf_htonl(mtu);
	struct pseudo6 ph = {
	    .saddr = ip6->saddr,
	    .daddr = ip6->daddr,
	    .len = bpf_htonl(sizeof(*icmp) + ICMP6_QUOTE),
	    .proto = IPPROTO_ICMPV6,
	};
	__s64 sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	icmp->check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)icmp, sizeof(*icmp) + ICMP6_QUOTE, (__u32)sum));
	return count_reason(R_ICMP_TOO_BIG, XDP_TX);
}

/* too_big answers a packet that does not fit in mtu bytes once
 * encapsulated with overhead more: IPv4 with DF and IPv6 with an ICMP
 * error giving the MTU that fits; IPv4 without DF, which tether cannot
 * fragment, is dropped and counted. */
static __always_inline int too_big(struct xdp_md *ctx, const struct packet *pkt, __u32 mtu, __u32 overhead,
				   __u32 len)
{
	if (pkt->icmp) /* never an ICMP error about an ICMP error */
		return count_reason(R_DROP_ENCAP_MTU, XDP_DROP);
	__u32 fits = mtu > overhead ? mtu - overhead : 0;
	if (pkt->family == AF_INET6) {
		if (len < sizeof(struct ipv6hdr) + ICMP6_QUOTE)
			return count_reason(R_DROP_ENCAP_MTU, XDP_DROP);
		return too_big6(ctx, pkt, fits);
	}
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + l3_offset(pkt);
	if ((void *)(ip + 1) > data_end || !(ip->frag_off & IP_DF_BE) || len < sizeof(*ip) + ICMP4_QUOTE)
		return count_reason(R_DROP_ENCAP_MTU, XDP_DROP);
	return too_big4(ctx, pkt, fits);
}

/* inner_class reads what an outer header copies from the inner IP header
 * at l3: its traffic class and, for IPv4, DF (IPv6 is never fragmented on
 * the way: DF). It returns -1 when the header runs past data_end. */
static __always_inline int inner_class(void *l3, void *data_end, __u8 family, __u8 *tos, __u16 *df)
{
	if (family == AF_INET6) {
		__u8 *v = l3;
		if ((void *)(v + 2) > data_end)
			return -1;
		*tos = (v[0] << 4) | (v[1] >> 4);
		*df = IP_DF_BE;
		return 0;
	}
	struct iphdr *ip = l3;
	if ((void *)(ip + 1) > data_end)
		return -1;
	*tos = ip->tos;
	*df = ip->frag_off & IP_DF_BE;
	return 0;
}

/* encap_overhead is the length of the outer headers to a backend of family. */
static __always_inline __u32 encap_overhead(__u8 family, __u16 gue)
{
	return (family == AF_INET6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr)) +
	       (gue ? sizeof(struct udphdr) : 0);
}

/* What the outer headers of one packet hold besides the backend. */
struct outer {
	const __u32 *src; /* outer source (encap_source) */
	__u32 len;	  /* the inner IP datagram's length */
	__u32 h;	  /* the flow's hash: GUE source port, IPv6 flow label */
	__u16 gue;	  /* gue: the UDP destination port, network byte order; 0: ipip */
	__u16 df;	  /* the inner IPv4 packet's DF, network byte order */
	__u8 inner;	  /* IPPROTO_IPIP or IPPROTO_IPV6 */
	__u8 tos;	  /* the inner packet's traffic class */
};

/* write_outer writes the outer IP header (and UDP header, gue) to backend
 * be after the Ethernet header eth, whose MACs it leaves alone, and sets
 * its type. The room is there already. It returns -1 when a header would
 * run past data_end. */
static __always_inline int write_outer(struct ethhdr *eth, void *data_end, const struct backend *be,
				       const struct outer *o)
{
	__u32 overhead = encap_overhead(be->family, o->gue);
	struct udphdr *udp;
	if (be->family == AF_INET6) {
		eth->h_proto = ETH_P_IPV6_BE;
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return -1;
		*(__u32 *)ip6 = bpf_htonl((6 << 28) | ((__u32)o->tos << 20) | (o->h & 0xfffff));
		ip6->payload_len = bpf_htons(o->len + overhead - sizeof(*ip6));
		ip6->nexthdr = o->gue ? IPPROTO_UDP : o->inner;
		ip6->hop_limit = 64;
		__builtin_memcpy(&ip6->saddr, o->src, sizeof(ip6->saddr));
		__builtin_memcpy(&ip6->daddr, be->addr, sizeof(ip6->daddr));
		udp = (void *)(ip6 + 1);
	} else {
		eth->h_proto = ETH_P_IP_BE;
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end)
			return -1;
		ip->version = 4;
		ip->ihl = 5;
		ip->tos = o->tos;
		ip->tot_len = bpf_htons(o->len + overhead);
		/* An outer packet routers may fragment needs an id of its own. */
		ip->id = o->df ? 0 : (__u16)bpf_get_prandom_u32();
		ip->frag_off = o->df;
		ip->ttl = 64;
		ip->protocol = o->gue ? IPPROTO_UDP : o->inner;
		ip->saddr = o->src[0];
		ip->daddr = be->addr[0];
		ip->check = 0;
		ip->check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0));
		udp = (void *)(ip + 1);
	}
	if (o->gue) {
		if ((void *)(udp + 1) > data_end)
			return -1;
		udp->source = bpf_htons(GUE_SPORT_BASE | (o->h >> 18));
		udp->dest = o->gue;
		udp->len = bpf_htons(o->len + sizeof(*udp));
		/* No checksum: the inner packet carries its own, and the
		 * kernel's fou sockets take a zero one over IPv6 too. */
		udp->check = 0;
	}
	return 0;
}

/* encap_begin prepares o, the outer headers of packet pkt (its IP header
 * at l3) to backend be (id), from the backend's tunnel, the outer source
 * in src: what the XDP program and the probe program (probe.h) write
 * alike. It returns 0, or the reason it cannot: the backend has no tunnel,
 * or the header runs past data_end. */
static __always_inline int encap_begin(const struct packet *pkt, const struct backend *be, __u32 id, void *l3,
				       void *data_end, struct outer *o, __u32 *src)
{
	struct tunnel *tn = bpf_map_lookup_elem(&tunnels, &id);
	if (!tn || !(tn->src[0] | tn->src[1] | tn->src[2] | tn->src[3]))
		return R_DROP_NO_BACKEND;
	o->h = hash_conn(hash_seed ^ ENCAP_HASH_SALT, &pkt->key);
	encap_source(src, tn, be->family, o->h);
	o->src = src;
	o->len = pkt->len;
	o->gue = tn->gue_port;
	o->inner = pkt->family == AF_INET6 ? IPPROTO_IPV6 : IPPROTO_IPIP;
	if (inner_class(l3, data_end, pkt->family, &o->tos, &o->df))
		return R_DROP_TRUNCATED;
	return 0;
}

/* encap_hop finds the next hop of the outer packet (from src to the
 * backend, len bytes) in the kernel's FIB. It returns 0 with the hop in
 * fib, or the MTU the outer packet exceeds (> 0), or a negative value when
 * no route leads to the backend. A next hop the kernel has not resolved
 * (yet) is the backend entry's, which the control plane keeps resolved, if
 * the route still leaves by its interface. */
static __always_inline long encap_hop(struct xdp_md *ctx, const struct backend *be, const __u32 *src,
				      __u32 len, __u8 l4, struct bpf_fib_lookup *fib)
{
	fib->family = be->family;
	fib->l4_protocol = l4;
	fib->tot_len = len;
	fib->ifindex = ctx->ingress_ifindex;
	if (be->family == AF_INET6) {
		__builtin_memcpy(fib->ipv6_src, src, sizeof(fib->ipv6_src));
		__builtin_memcpy(fib->ipv6_dst, be->addr, sizeof(fib->ipv6_dst));
	} else {
		fib->ipv4_src = src[0];
		fib->ipv4_dst = be->addr[0];
	}
	long rc = bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS)
		return 0;
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return fib->mtu_result ? fib->mtu_result : 1;
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH && be->ifindex && be->ifindex == fib->ifindex) {
		__builtin_memcpy(fib->dmac, be->dmac, ETH_ALEN);
		__builtin_memcpy(fib->smac, be->smac, ETH_ALEN);
		fib->ifindex = be->ifindex;
		return 0;
	}
	return -1;
}

/* forward_encap encapsulates the packet towards backend be (id) and sends
 * it to the next hop. */
static __always_inline int forward_encap(struct xdp_md *ctx, const struct packet *pkt,
					 const struct backend *be, __u32 id)
{
	/* What the outer header copies from the inner one is read before the
	 * headers move. */
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 l3off = l3_offset(pkt);
	__u32 src[4];
	struct outer o = {};
	int reason = encap_begin(pkt, be, id, data + l3off, data_end, &o, src);
	if (reason)
		return count_reason(reason, XDP_DROP);
	__u32 overhead = encap_overhead(be->family, o.gue);

	struct bpf_fib_lookup fib = {};
	long rc = encap_hop(ctx, be, src, o.len + overhead, o.gue ? IPPROTO_UDP : o.inner, &fib);
	if (rc > 0)
		return too_big(ctx, pkt, rc, overhead, o.len);
	if (rc < 0)
		return count_reason(R_DROP_ENCAP_NO_ROUTE, XDP_DROP);

	/* Room for the outer headers, where the Ethernet header (and a VLAN
	 * tag, which the outer packet does not keep) was. */
	int delta = (int)(ETH_HLEN + overhead) - (int)l3off;
	if (bpf_xdp_adjust_head(ctx, -delta))
		return count_reason(R_DROP_TX_FAILED, XDP_DROP);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return count_reason(R_DROP_TRUNCATED, XDP_DROP);
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	if (write_outer(eth, data_end, be, &o))
		return count_reason(R_DROP_TRUNCATED, XDP_DROP);

	struct backend_stats *st = bpf_map_lookup_elem(&be_stats, &id);
	if (st) {
		st->packets += 1;
		st->bytes += l3off + o.len; /* the frame as it came, as forward_dsr counts */
	}
	if (fib.ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	int verdict = bpf_redirect(fib.ifindex, 0);
	if (verdict != XDP_REDIRECT)
		return count_reason(R_DROP_TX_FAILED, XDP_DROP);
	return verdict;
}

#endif
