/* parsing.h: bounds-checked parsing of Ethernet, one VLAN tag, IPv4/IPv6 and TCP/UDP into a flow key. */
#ifndef TETHER_PARSING_H
#define TETHER_PARSING_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "consts.h"
#include "maps.h"

#define AF_INET	 2
#define AF_INET6 10

struct vlan_hdr {
	__u16 tci;
	__u16 proto;
};

/* What the entry point needs to know about a parsed packet. */
struct packet {
	struct flow_key key;
	__u8 family;
	__u8 syn_only; /* TCP SYN without ACK: the first packet of a handshake */
	__u8 closing;  /* TCP FIN or RST: the connection is ending */
	__u8 vlan;     /* one 802.1Q tag sits before the IP header */
};

/* is_ipv6_ext tells whether an IPv6 next-header value is an extension
 * header. tether does not walk extension headers: such packets go to the
 * kernel untouched. */
static __always_inline int is_ipv6_ext(__u8 nexthdr)
{
	switch (nexthdr) {
	case 0:	  /* hop-by-hop */
	case 43:  /* routing */
	case 44:  /* fragment */
	case 51:  /* authentication */
	case 60:  /* destination options */
	case 135: /* mobility */
	case 139: /* HIP */
	case 140: /* shim6 */
	case 253: /* experiments */
	case 254:
		return 1;
	}
	return 0;
}

/* parse_l4 reads the ports (and for TCP the SYN/ACK flags) at l4. */
static __always_inline int parse_l4(void *l4, void *data_end, struct packet *pkt)
{
	if (pkt->key.proto == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > data_end)
			return R_DROP_TRUNCATED;
		if (tcp->doff < 5)
			return R_DROP_BAD_HEADER;
		pkt->key.sport = tcp->source;
		pkt->key.dport = tcp->dest;
		pkt->syn_only = tcp->syn && !tcp->ack;
		pkt->closing = tcp->fin || tcp->rst;
		return 0;
	}
	if (pkt->key.proto == IPPROTO_UDP) {
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > data_end)
			return R_DROP_TRUNCATED;
		pkt->key.sport = udp->source;
		pkt->key.dport = udp->dest;
		return 0;
	}
	return R_PASS_NOT_L4;
}

static __always_inline int parse_ipv4(void *l3, void *data_end, struct packet *pkt)
{
	struct iphdr *ip = l3;
	if ((void *)(ip + 1) > data_end)
		return R_DROP_TRUNCATED;
	if (ip->version != 4 || ip->ihl < 5)
		return R_DROP_BAD_HEADER;
	/* Options are legal but rare and never needed by a VIP flow: leave them
	 * (and whatever they are for) to the kernel. */
	if (ip->ihl != 5)
		return R_PASS_IP_OPTIONS;
	__u16 tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < sizeof(*ip))
		return R_DROP_BAD_HEADER;
	if (l3 + tot_len > data_end)
		return R_DROP_TRUNCATED;
	/* A fragment has no ports (or only the first has): unsupported. */
	if (ip->frag_off & IP_MF_OFFSET_BE)
		return R_PASS_FRAGMENT;
	pkt->family = AF_INET;
	pkt->key.src[0] = ip->saddr;
	pkt->key.dst[0] = ip->daddr;
	pkt->key.proto = ip->protocol;
	return parse_l4(ip + 1, data_end, pkt);
}

static __always_inline int parse_ipv6(void *l3, void *data_end, struct packet *pkt)
{
	struct ipv6hdr *ip6 = l3;
	if ((void *)(ip6 + 1) > data_end)
		return R_DROP_TRUNCATED;
	if (ip6->version != 6)
		return R_DROP_BAD_HEADER;
	if ((void *)(ip6 + 1) + bpf_ntohs(ip6->payload_len) > data_end)
		return R_DROP_TRUNCATED;
	if (is_ipv6_ext(ip6->nexthdr))
		return R_PASS_IPV6_EXT;
	pkt->family = AF_INET6;
	__builtin_memcpy(pkt->key.src, &ip6->saddr, sizeof(pkt->key.src));
	__builtin_memcpy(pkt->key.dst, &ip6->daddr, sizeof(pkt->key.dst));
	pkt->key.proto = ip6->nexthdr;
	return parse_l4(ip6 + 1, data_end, pkt);
}

/* parse_packet fills pkt from the frame. It returns 0 when the packet is a
 * TCP or UDP packet tether may balance, otherwise the reason (enum reason)
 * why it must be passed or dropped. */
static __always_inline int parse_packet(struct xdp_md *ctx, struct packet *pkt)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return R_DROP_TRUNCATED;
	void *l3 = eth + 1;
	__u16 proto = eth->h_proto;
	if (proto == ETH_P_8021Q_BE || proto == ETH_P_8021AD_BE) {
		struct vlan_hdr *vlan = l3;
		if ((void *)(vlan + 1) > data_end)
			return R_DROP_TRUNCATED;
		proto = vlan->proto;
		l3 = vlan + 1;
		pkt->vlan = 1;
		/* QinQ and deeper stacks: unsupported. */
		if (proto == ETH_P_8021Q_BE || proto == ETH_P_8021AD_BE)
			return R_PASS_VLAN_STACK;
	}
	if (proto == ETH_P_IP_BE)
		return parse_ipv4(l3, data_end, pkt);
	if (proto == ETH_P_IPV6_BE)
		return parse_ipv6(l3, data_end, pkt);
	return R_PASS_NOT_IP;
}

#endif
