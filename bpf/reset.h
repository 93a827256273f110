/* reset.h: turning a TCP packet into the RST that answers it, sent back to the client. */
#ifndef TETHER_RESET_H
#define TETHER_RESET_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "consts.h"
#include "csum.h"
#include "forward.h"
#include "parsing.h"

#define IP_DF_BE 0x0040 /* htons(IP_DF) */

struct pseudo4 {
	__u32 saddr;
	__u32 daddr;
	__u8 zero;
	__u8 proto;
	__u16 len;
};

struct pseudo6 {
	struct in6_addr saddr;
	struct in6_addr daddr;
	__u32 len;
	__u8 zero[3];
	__u8 proto;
};

/* rst_fields computes the sequence numbers and flags of the RST that
 * answers tcp, as RFC 793 says: a segment with ACK is answered with
 * seq = its ack; one without (a SYN) with ACK of everything it carried. */
static __always_inline void rst_fields(const struct tcphdr *tcp, __u32 payload, __u32 *seq, __u32 *ack,
				       int *with_ack)
{
	if (tcp->ack) {
		*seq = tcp->ack_seq;
		*ack = 0;
		*with_ack = 0;
		return;
	}
	*seq = 0;
	*ack = bpf_htonl(bpf_ntohl(tcp->seq) + payload + tcp->syn + tcp->fin);
	*with_ack = 1;
}

static __always_inline void fill_rst(struct tcphdr *tcp, __u32 seq, __u32 ack, int with_ack)
{
	__u16 sport = tcp->source;
	tcp->source = tcp->dest;
	tcp->dest = sport;
	tcp->seq = seq;
	tcp->ack_seq = ack;
	/* doff 5, RST, ACK if needed; every other flag clear */
	((__u8 *)tcp)[12] = 5 << 4;
	((__u8 *)tcp)[13] = with_ack ? 0x14 : 0x04;
	tcp->window = 0;
	tcp->check = 0;
	tcp->urg_ptr = 0;
}

static __always_inline void swap_macs(struct ethhdr *eth)
{
	__u8 tmp[ETH_ALEN];
	__builtin_memcpy(tmp, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, tmp, ETH_ALEN);
}

/* shrink cuts the frame to len bytes (headers of the RST). */
static __always_inline int shrink(struct xdp_md *ctx, __u32 len)
{
	long have = (long)ctx->data_end - (long)ctx->data;
	if (have > len)
		return bpf_xdp_adjust_tail(ctx, (int)len - (int)have);
	return 0;
}

static __always_inline int reset_ipv4(struct xdp_md *ctx, __u32 l3off, __u32 payload)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + l3off;
	struct tcphdr *tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > data_end)
		return XDP_DROP;
	if (tcp->rst)
		return XDP_DROP; /* never answer a RST */
	__u32 seq, ack;
	int with_ack;
	rst_fields(tcp, payload, &seq, &ack, &with_ack);

	if (shrink(ctx, l3off + sizeof(*ip) + sizeof(*tcp)))
		return XDP_DROP;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	ip = data + l3off;
	tcp = (void *)(ip + 1);
	if ((void *)(eth + 1) > data_end || (void *)(tcp + 1) > data_end)
		return XDP_DROP;

	swap_macs(eth);
	__u32 saddr = ip->saddr;
	ip->saddr = ip->daddr;
	ip->daddr = saddr;
	ip->tos = 0;
	ip->tot_len = bpf_htons(sizeof(*ip) + sizeof(*tcp));
	ip->id = 0;
	ip->frag_off = IP_DF_BE;
	ip->ttl = 64;
	ip->check = 0;
	ip->check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0));

	fill_rst(tcp, seq, ack, with_ack);
	struct pseudo4 ph = {
	    .saddr = ip->saddr,
	    .daddr = ip->daddr,
	    .proto = IPPROTO_TCP,
	    .len = bpf_htons(sizeof(*tcp)),
	};
	__s64 sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	tcp->check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)tcp, sizeof(*tcp), (__u32)sum));
	return XDP_TX;
}

static __always_inline int reset_ipv6(struct xdp_md *ctx, __u32 l3off, __u32 payload)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ipv6hdr *ip6 = data + l3off;
	struct tcphdr *tcp = (void *)(ip6 + 1);
	if ((void *)(tcp + 1) > data_end)
		return XDP_DROP;
	if (tcp->rst)
		return XDP_DROP;
	__u32 seq, ack;
	int with_ack;
	rst_fields(tcp, payload, &seq, &ack, &with_ack);

	if (shrink(ctx, l3off + sizeof(*ip6) + sizeof(*tcp)))
		return XDP_DROP;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	ip6 = data + l3off;
	tcp = (void *)(ip6 + 1);
	if ((void *)(eth + 1) > data_end || (void *)(tcp + 1) > data_end)
		return XDP_DROP;

	swap_macs(eth);
	struct in6_addr saddr = ip6->saddr;
	ip6->saddr = ip6->daddr;
	ip6->daddr = saddr;
	ip6->priority = 0;
	ip6->flow_lbl[0] = ip6->flow_lbl[1] = ip6->flow_lbl[2] = 0;
	ip6->payload_len = bpf_htons(sizeof(*tcp));
	ip6->hop_limit = 64;

	fill_rst(tcp, seq, ack, with_ack);
	struct pseudo6 ph = {
	    .saddr = ip6->saddr,
	    .daddr = ip6->daddr,
	    .len = bpf_htonl(sizeof(*tcp)),
	    .proto = IPPROTO_TCP,
	};
	__s64 sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	tcp->check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)tcp, sizeof(*tcp), (__u32)sum));
	return XDP_TX;
}

/* reset_tcp answers a TCP packet with a RST back to its sender, counting it
 * under reason, so that a refused client fails at once instead of waiting
 * for its own timeouts. Its acknowledgement counts the segment's data as
 * parse_l4 measured it within the IP datagram. Other protocols are dropped
 * and counted as R_DROP_NO_BACKEND. */
static __always_inline int reset_tcp(struct xdp_md *ctx, const struct packet *pkt, __u32 reason)
{
	if (pkt->key.proto != IPPROTO_TCP)
		return count_reason(R_DROP_NO_BACKEND, XDP_DROP);
	__u32 l3off = l3_offset(pkt);
	int verdict = pkt->family == AF_INET6 ? reset_ipv6(ctx, l3off, pkt->payload)
					      : reset_ipv4(ctx, l3off, pkt->payload);
	return count_reason(verdict == XDP_TX ? reason : R_DROP_NO_BACKEND, verdict);
}

/* reset_or_drop refuses a new flow: a TCP one with a RST counted under
 * reason, a UDP one dropped and counted under the same reason. */
static __always_inline int reset_or_drop(struct xdp_md *ctx, const struct packet *pkt, __u32 reason)
{
	if (pkt->key.proto != IPPROTO_TCP)
		return count_reason(reason, XDP_DROP);
	return reset_tcp(ctx, pkt, reason);
}

#endif
