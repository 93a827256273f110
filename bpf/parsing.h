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
#include "csum.h"

#define AF_INET	 2
#define AF_INET6 10

struct vlan_hdr {
	__u16 tci;
	__u16 proto;
};

/* What the entry point needs to know about a parsed packet. */
struct packet {
	struct flow_key key;
	__u16 payload; /* TCP: bytes of data after the header, from the validated lengths */
	__u16 len;     /* the IP datagram's length, header included (within the frame) */
	__u8 family;
	__u8 syn_only; /* TCP SYN without ACK: the first packet of a handshake */
	__u8 closing;  /* TCP FIN or RST (CLOSING_*): the connection is ending */
	__u8 vlan;     /* one 802.1Q tag sits before the IP header */
	__u8 syn;      /* TCP SYN, with or without ACK */
	__u8 icmp;     /* an ICMP error about the flow of key (icmp.h) */
	__u8 decided;  /* enum trace_by: what chose its backend, for tether trace */
	__u32 service; /* and which: for tether trace */
	__u32 backend;
};

#define CLOSING_FIN 1
#define CLOSING_RST 2

/* l3_offset is where the IP header of a parsed packet starts. */
static __always_inline __u32 l3_offset(const struct packet *pkt)
{
	return pkt->vlan ? sizeof(struct ethhdr) + sizeof(struct vlan_hdr) : sizeof(struct ethhdr);
}

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

/* parse_l4 reads the ports (and for TCP the SYN/ACK flags) at l4. len is
 * the L4 length the IP header gives (IPv4 total length less the header,
 * IPv6 payload length), already checked to lie within the frame: the L4
 * header must fit in it, and the frame's bytes beyond it are padding. The
 * checks against data_end repeat it for the verifier. */
static __always_inline int parse_l4(void *l4, void *data_end, __u32 len, struct packet *pkt)
{
	if (pkt->key.proto == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;
		if (len < sizeof(*tcp))
			return R_DROP_L4_TRUNCATED;
		if ((void *)(tcp + 1) > data_end)
			return R_DROP_TRUNCATED;
		__u32 hdr = tcp->doff * 4;
		if (tcp->doff < 5 || hdr > len)
			return R_DROP_TCP_OFFSET;
		pkt->key.sport = tcp->source;
		pkt->key.dport = tcp->dest;
		pkt->payload = len - hdr;
		pkt->syn = tcp->syn;
		pkt->syn_only = tcp->syn && !tcp->ack;
		pkt->closing = (tcp->fin ? CLOSING_FIN : 0) | (tcp->rst ? CLOSING_RST : 0);
		return 0;
	}
	if (pkt->key.proto == IPPROTO_UDP) {
		struct udphdr *udp = l4;
		if (len < sizeof(*udp))
			return R_DROP_L4_TRUNCATED;
		if ((void *)(udp + 1) > data_end)
			return R_DROP_TRUNCATED;
		/* The kernel would trim a datagram longer than its UDP length;
		 * tether forwards the IP datagram whole, so the two must agree. */
		if (bpf_ntohs(udp->len) != len)
			return R_DROP_UDP_LENGTH;
		pkt->key.sport = udp->source;
		pkt->key.dport = udp->dest;
		return 0;
	}
	return R_PASS_NOT_TCP_UDP;
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
		return R_PASS_IPV4_OPTIONS;
	__u16 tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < sizeof(*ip))
		return R_DROP_BAD_HEADER;
	if (l3 + tot_len > data_end)
		return R_DROP_TRUNCATED;
	/* A fragment has no ports (or only the first has): unsupported. */
	if (ip->frag_off & IP_MF_OFFSET_BE)
		return R_PASS_IPV4_FRAGMENT;
	pkt->family = AF_INET;
	pkt->len = tot_len;
	pkt->key.src[0] = ip->saddr;
	pkt->key.dst[0] = ip->daddr;
	pkt->key.proto = ip->protocol;
	return parse_l4(ip + 1, data_end, tot_len - sizeof(*ip), pkt);
}

static __always_inline int parse_ipv6(void *l3, void *data_end, struct packet *pkt)
{
	struct ipv6hdr *ip6 = l3;
	if ((void *)(ip6 + 1) > data_end)
		return R_DROP_TRUNCATED;
	if (ip6->version != 6)
		return R_DROP_BAD_HEADER;
	__u16 payload_len = bpf_ntohs(ip6->payload_len);
	if ((void *)(ip6 + 1) + payload_len > data_end)
		return R_DROP_TRUNCATED;
	if (is_ipv6_ext(ip6->nexthdr))
		return R_PASS_IPV6_EXTENSION;
	pkt->family = AF_INET6;
	pkt->len = sizeof(*ip6) + payload_len;
	__builtin_memcpy(pkt->key.src, &ip6->saddr, sizeof(pkt->key.src));
	__builtin_memcpy(pkt->key.dst, &ip6->daddr, sizeof(pkt->key.dst));
	pkt->key.proto = ip6->nexthdr;
	return parse_l4(ip6 + 1, data_end, payload_len, pkt);
}

/* ipv4_header_ok verifies a parsed IPv4 packet's header checksum (IPv6
 * has none). It costs a few nanoseconds, so the program calls it only for
 * packets that are no tracked flow's, before they can create entries or be
 * answered: a tracked flow's packet is forwarded with its IP header as it
 * came (dsr), and the backend's kernel drops it if the checksum is wrong. */
static __always_inline int ipv4_header_ok(struct xdp_md *ctx, const struct packet *pkt)
{
	if (pkt->family != AF_INET)
		return 1;
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 *ip = data + l3_offset(pkt);
	if ((void *)(ip + 5) > data_end)
		return 0;
	return ipv4_csum_ok(ip);
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
