//go:build ignore

/* decap.c: the decapsulation program of a backend of an ipip or gue
 * service, for hosts whose kernel has no ipip, ip6tnl, sit or fou devices,
 * or that would rather not pay for them: attached to the backend's
 * interface (tether backend-setup --decap xdp), it strips the outer header
 * of IP-in-IP (IPv4 or IPv6 outer, IPv4 or IPv6 inside) and of GUE
 * variant 1 to gue_port, addressed to this host, and passes the packet
 * inside to the kernel as if it had arrived so. Anything else passes
 * untouched. Like the kernel's tunnel devices in external mode, it takes
 * any outer source: let only the balancers send such packets to the
 * backends (a firewall at the network's edge). */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "consts.h"

#define AF_INET	 2
#define AF_INET6 10

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/* The UDP port gue packets come to, network byte order (0: none). */
volatile const __u16 gue_port = 0;

/* Packets decapsulated and passed on, per CPU: index 0 ipip, 1 gue. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} decap_stats SEC(".maps");

/* for_us says whether the outer packet is addressed to this host: a host
 * that does not forward takes only what is (the kernel's FIB does not
 * even look); one that does must find the destination local, so that
 * transit traffic is never decapsulated. */
static __always_inline int for_us(struct xdp_md *ctx, __u8 family, const void *src, const void *dst)
{
	struct bpf_fib_lookup fib = {.family = family, .ifindex = ctx->ingress_ifindex};
	if (family == AF_INET6) {
		__builtin_memcpy(fib.ipv6_src, src, sizeof(fib.ipv6_src));
		__builtin_memcpy(fib.ipv6_dst, dst, sizeof(fib.ipv6_dst));
	} else {
		__builtin_memcpy(&fib.ipv4_src, src, sizeof(fib.ipv4_src));
		__builtin_memcpy(&fib.ipv4_dst, dst, sizeof(fib.ipv4_dst));
	}
	long rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	return rc == BPF_FIB_LKUP_RET_FWD_DISABLED || rc == BPF_FIB_LKUP_RET_NOT_FWDED;
}

/* inner_of says which Ethernet type the packet at p starts with (an IPv4
 * or IPv6 header, by its version), 0 if neither or out of reach. */
static __always_inline __u16 inner_of(__u8 *p, void *data_end)
{
	if ((void *)(p + 1) > data_end)
		return 0;
	switch (*p >> 4) {
	case 4:
		return ETH_P_IP_BE;
	case 6:
		return ETH_P_IPV6_BE;
	}
	return 0;
}

SEC("xdp")
int tether_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	__u32 hdr; /* bytes of outer headers */
	__u8 proto, family;
	__u8 *l4;
	void *src, *dst;
	if (eth->h_proto == ETH_P_IP_BE) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end || ip->ihl != 5 || (ip->frag_off & IP_MF_OFFSET_BE))
			return XDP_PASS;
		proto = ip->protocol;
		l4 = (void *)(ip + 1);
		hdr = sizeof(*ip);
		family = AF_INET;
		src = &ip->saddr;
		dst = &ip->daddr;
	} else if (eth->h_proto == ETH_P_IPV6_BE) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return XDP_PASS;
		proto = ip6->nexthdr;
		l4 = (void *)(ip6 + 1);
		hdr = sizeof(*ip6);
		family = AF_INET6;
		src = &ip6->saddr;
		dst = &ip6->daddr;
	} else {
		return XDP_PASS;
	}
	__u32 kind = 0;
	if (proto == IPPROTO_UDP) {
		struct udphdr *udp = (void *)l4;
		if (!gue_port || (void *)(udp + 1) > data_end || udp->dest != gue_port)
			return XDP_PASS;
		l4 = (void *)(udp + 1);
		hdr += sizeof(*udp);
		kind = 1;
	} else if (proto != IPPROTO_IPIP && proto != IPPROTO_IPV6) {
		return XDP_PASS;
	}
	/* GUE variant 1 starts with the inner IP header itself (version 4 or
	 * 6: the two bits 01); variant 0 has a GUE header, not decapsulated
	 * here. */
	__u16 type = inner_of(l4, data_end);
	if (!type || (proto == IPPROTO_IPIP && type != ETH_P_IP_BE) ||
	    (proto == IPPROTO_IPV6 && type != ETH_P_IPV6_BE))
		return XDP_PASS;
	if (!for_us(ctx, family, src, dst))
		return XDP_PASS;

	/* The Ethernet header moves to just before the packet inside. */
	struct ethhdr copy = *eth;
	copy.h_proto = type;
	if (bpf_xdp_adjust_head(ctx, (int)hdr))
		return XDP_PASS;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return XDP_DROP;
	*eth = copy;
	__u64 *n = bpf_map_lookup_elem(&decap_stats, &kind);
	if (n)
		*n += 1;
	return XDP_PASS;
}
