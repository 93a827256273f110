/* icmp.h: ICMP errors about VIP flows. A router on the way to a client
 * that cannot pass a backend's reply (from the VIP) answers the VIP:
 * "fragmentation needed", "packet too big", "unreachable", "time
 * exceeded". The balancer gets those; the backend that holds the flow
 * needs them (path MTU discovery). The quoted header is the reply, from
 * VIP:port to the client: reversed, it is the flow's key, whose connection
 * entry (or else affinity entry, or ring) names the backend, and the error
 * goes there as the flow's packets do: its MACs rewritten (dsr),
 * encapsulated (ipip, gue), or with its destination and the quoted header
 * translated (nat, fullnat: from the balancer's address too). Anything
 * else, and any error about no VIP
 * flow or too short to quote one, goes to the kernel as before. */
#ifndef TETHER_ICMP_H
#define TETHER_ICMP_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "consts.h"
#include "maps.h"
#include "parsing.h"
#include "forward.h"
#include "lookup.h"
#include "nat.h"
#include "encap.h"
#include "reset.h"

/* The start of a quoted TCP or UDP header: what every ICMP error carries. */
struct quoted_l4 {
	__u16 sport;
	__u16 dport;
	__u16 udp_len;
	__u16 udp_check; /* UDP only: TCP's checksum lies further */
};

/* icmp_quote finds the ICMP error's quoted IP header and the start of its
 * TCP or UDP header, within the IP datagram, and fills q->key with the flow
 * it belongs to, as the client sends it. It returns the quoted IP header's
 * offset, 0 for a packet that is no such error. */
static __always_inline __u32 icmp_quote(struct xdp_md *ctx, const struct packet *pkt, struct packet *q)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 off = l3_offset(pkt);
	/* The quote ends with the IP datagram, not the frame's padding. */
	void *end = data + off + pkt->len;
	if (pkt->family == AF_INET) {
		off += sizeof(struct iphdr);
		__u8 *type = data + off;
		if ((void *)(type + 8) > data_end || (void *)(type + 8) > end || (*type != 3 && *type != 11))
			return 0;
		off += 8;
		struct iphdr *in = data + off;
		if ((void *)(in + 1) > data_end || in->version != 4 || in->ihl != 5 ||
		    (in->frag_off & IP_OFFSET_BE) ||
		    (in->protocol != IPPROTO_TCP && in->protocol != IPPROTO_UDP))
			return 0;
		struct quoted_l4 *l4 = (void *)(in + 1);
		if ((void *)(l4 + 1) > data_end || (void *)(l4 + 1) > end || in->saddr != pkt->key.dst[0])
			return 0;
		q->key.src[0] = in->daddr;
		q->key.dst[0] = in->saddr;
		q->key.sport = l4->dport;
		q->key.dport = l4->sport;
		q->key.proto = in->protocol;
		return off;
	}
	off += sizeof(struct ipv6hdr);
	__u8 *type = data + off;
	if ((void *)(type + 8) > data_end || (void *)(type + 8) > end || *type < 1 || *type > 3)
		return 0;
	off += 8;
	struct ipv6hdr *in = data + off;
	if ((void *)(in + 1) > data_end || in->version != 6 ||
	    (in->nexthdr != IPPROTO_TCP && in->nexthdr != IPPROTO_UDP))
		return 0;
	struct quoted_l4 *l4 = (void *)(in + 1);
	if ((void *)(l4 + 1) > data_end || (void *)(l4 + 1) > end)
		return 0;
	__builtin_memcpy(q->key.src, &in->daddr, sizeof(q->key.src));
	__builtin_memcpy(q->key.dst, &in->saddr, sizeof(q->key.dst));
	if (!addr_eq(q->key.dst, pkt->key.dst))
		return 0;
	q->key.sport = l4->dport;
	q->key.dport = l4->sport;
	q->key.proto = in->nexthdr;
	return off;
}

/* icmp_nat translates an ICMP error about a translated flow for backend
 * be: its destination (the VIP) becomes the backend's address, and the
 * quoted reply is written as the backend sent it (from the backend's
 * address and port; with fullnat, to sn and port). Checksums follow: the
 * outer IPv4 header's, the quoted IPv4 header's, a quoted UDP checksum,
 * and the ICMP checksum over all of it (with ICMPv6, its pseudo-header). */
static __always_inline int icmp_nat(struct xdp_md *ctx, const struct packet *pkt, const struct packet *q,
				    __u32 qoff, const struct backend *be, const struct snat *sn, __u16 port)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 l3off = l3_offset(pkt);
	__u32 d = 0; /* the ICMP checksum's change */
	__u16 *check;
	struct quoted_l4 *l4;
	__u32 dl4 = 0; /* a quoted UDP checksum's change */
	if (pkt->family == AF_INET) {
		struct iphdr *ip = data + l3off;
		struct iphdr *in = data + qoff;
		if ((void *)(ip + 1) > data_end || (void *)(in + 1) > data_end)
			return -1;
		__u32 dip = csum_diff32(0, ip->daddr, be->addr[0]);
		ip->daddr = be->addr[0];
		if (sn) { /* the backend may have no route to the router */
			dip = csum_diff32(dip, ip->saddr, sn->addr[0]);
			ip->saddr = sn->addr[0];
		}
		ip->check = csum_apply(ip->check, dip);
		__u32 dq = csum_diff32(0, in->saddr, be->addr[0]);
		in->saddr = be->addr[0];
		if (sn) {
			dq = csum_diff32(dq, in->daddr, sn->addr[0]);
			in->daddr = sn->addr[0];
		}
		__u16 qcheck = csum_apply(in->check, dq);
		d = csum_diff16(dq, in->check, qcheck);
		dl4 = dq;
		in->check = qcheck;
		check = (__u16 *)(ip + 1) + 1;
		l4 = (void *)(in + 1);
	} else {
		struct ipv6hdr *ip6 = data + l3off;
		struct ipv6hdr *in = data + qoff;
		if ((void *)(ip6 + 1) > data_end || (void *)(in + 1) > data_end)
			return -1;
		__u32 *dst = ip6->daddr.in6_u.u6_addr32;
		__u32 *src = ip6->saddr.in6_u.u6_addr32;
		__u32 *qs = in->saddr.in6_u.u6_addr32;
		__u32 *qd = in->daddr.in6_u.u6_addr32;
#pragma unroll
		for (int i = 0; i < 4; i++) {
			d = csum_diff32(d, dst[i], be->addr[i]); /* the pseudo-header */
			dst[i] = be->addr[i];
			dl4 = csum_diff32(dl4, qs[i], be->addr[i]);
			qs[i] = be->addr[i];
			if (sn) {
				dl4 = csum_diff32(dl4, qd[i], sn->addr[i]);
				qd[i] = sn->addr[i];
				d = csum_diff32(d, src[i], sn->addr[i]);
				src[i] = sn->addr[i];
			}
		}
		d += dl4;
		check = (__u16 *)(ip6 + 1) + 1;
		l4 = (void *)(in + 1);
	}
	if ((void *)(l4 + 1) > data_end || (void *)(check + 1) > data_end)
		return -1;
	__u32 dp = csum_diff16(0, l4->sport, be->port);
	l4->sport = be->port;
	if (sn) {
		dp = csum_diff16(dp, l4->dport, port);
		l4->dport = port;
	}
	d += dp;
	if (q->key.proto == IPPROTO_UDP && l4->udp_check) {
		__u16 c = csum_apply(l4->udp_check, dl4 + dp);
		c = c ? c : 0xffff;
		d = csum_diff16(d, l4->udp_check, c);
		l4->udp_check = c;
	}
	*check = csum_apply(*check, d);
	return 0;
}

/* icmp_echo answers an echo request to a VIP whose flags say so, from the
 * VIP, back where it came from; it returns -1 for a packet that is no echo
 * request, and passes one to an address that is no such VIP. */
static __always_inline int icmp_echo(struct xdp_md *ctx, const struct packet *pkt)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 l3off = l3_offset(pkt);
	__u32 hlen = pkt->family == AF_INET ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
	__u8 *type = data + l3off + hlen;
	void *end = data + l3off + pkt->len;
	if ((void *)(type + 4) > data_end || (void *)(type + 4) > end ||
	    *type != (pkt->family == AF_INET ? 8 : 128) || type[1])
		return -1;
	struct vip_key k = {.family = pkt->family};
	__builtin_memcpy(k.addr, pkt->key.dst, sizeof(k.addr));
	__u32 *flags = bpf_map_lookup_elem(&vips, &k);
	if (!flags || !(*flags & VIP_F_ECHO_REPLY) || !ipv4_header_ok(ctx, pkt))
		return count_reason(R_PASS_NOT_TCP_UDP, XDP_PASS);
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return count_reason(R_DROP_TRUNCATED, XDP_DROP);
	swap_macs(eth);
	/* Swapped addresses leave every checksum as it was; the type and the
	 * TTL change theirs. */
	__u16 *word = (__u16 *)type;
	__u16 old = *word;
	*type = pkt->family == AF_INET ? 0 : 129;
	__u16 *check = word + 1;
	*check = csum_apply(*check, csum_diff16(0, old, *word));
	if (pkt->family == AF_INET) {
		struct iphdr *ip = data + l3off;
		if ((void *)(ip + 1) > data_end)
			return count_reason(R_DROP_TRUNCATED, XDP_DROP);
		__u32 a = ip->saddr;
		ip->saddr = ip->daddr;
		ip->daddr = a;
		__u16 *ttl = (__u16 *)&ip->ttl; /* TTL and protocol, one word */
		__u16 was = *ttl;
		ip->ttl = 64;
		ip->check = csum_apply(ip->check, csum_diff16(0, was, *ttl));
	} else {
		struct ipv6hdr *ip6 = data + l3off;
		if ((void *)(ip6 + 1) > data_end)
			return count_reason(R_DROP_TRUNCATED, XDP_DROP);
		struct in6_addr a = ip6->saddr;
		ip6->saddr = ip6->daddr;
		ip6->daddr = a;
		ip6->hop_limit = 64;
	}
	return count_reason(R_ICMP_ECHO_REPLY, XDP_TX);
}

/* icmp_error forwards an ICMP error about a VIP flow to the flow's backend
 * (see above), answers an echo request to a VIP (icmp_echo), or passes it
 * to the kernel. */
static __always_inline int icmp_error(struct xdp_md *ctx, const struct packet *pkt)
{
	int verdict = icmp_echo(ctx, pkt);
	if (verdict >= 0)
		return verdict;
	struct packet q = {.family = pkt->family, .vlan = pkt->vlan, .len = pkt->len, .icmp = 1};
	__u32 qoff = icmp_quote(ctx, pkt, &q);
	if (!qoff || !ipv4_header_ok(ctx, pkt))
		return count_reason(R_PASS_NOT_TCP_UDP, XDP_PASS);
	struct service *svc = lookup_service(&q);
	if (!svc)
		return count_reason(R_PASS_NOT_TCP_UDP, XDP_PASS);
	__u32 id = 0, flags = 0, port = 0;
	struct backend *be = NULL;
	struct conn *c = lookup_conn(&q);
	if (c) {
		id = c->backend;
		flags = c->flags;
		port = c->nat_port;
		be = lookup_backend(id, c->service);
	}
	if (!be) {
		struct affinity_key ak;
		__u64 now;
		int hit;
		flags = 0;
		id = choose_backend(svc, &q, &ak, &now, &hit, 0);
		be = lookup_backend(id, svc->id);
		if (svc->flags & (SVC_F_IPIP | SVC_F_GUE))
			flags = CONN_F_ENCAP;
		else if (svc->flags & SVC_F_NAT)
			flags = CONN_F_NAT;
		else if (svc->flags & SVC_F_FULLNAT)
			flags = CONN_F_FULLNAT; /* with no port: passed below */
	}
	if (!be)
		return count_reason(R_PASS_ICMP_NO_FLOW, XDP_PASS);
	if (flags & CONN_F_ENCAP)
		return forward_encap(ctx, &q, be, id);
	if (flags & (CONN_F_NAT | CONN_F_FULLNAT)) {
		struct snat *sn = NULL;
		if (flags & CONN_F_FULLNAT) {
			sn = snat_of(id);
			if (!sn || !port)
				return count_reason(R_PASS_ICMP_NO_FLOW, XDP_PASS);
		}
		if (icmp_nat(ctx, pkt, &q, qoff, be, sn, port))
			return count_reason(R_DROP_TRUNCATED, XDP_DROP);
	}
	return forward_dsr(ctx, be, id);
}

#endif
