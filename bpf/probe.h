/* probe.h: health probes that reach a backend the way client packets do.
 *
 * The daemon's probe to backend id of a service connects to the service's
 * VIP and port from a socket marked PROBE_MARK | id; a policy rule routes
 * marked packets to the probe device, where this program runs on egress
 * (TC). It finds the service of the packet's VIP, port and protocol as the
 * XDP program does, checks that backend id belongs to it, and sends the
 * packet to the backend as that service forwards client packets: dsr, the
 * packet unchanged to the backend's MAC; ipip and gue, inside the outer
 * headers the XDP program would write for a client flow of the same
 * 5-tuple. The kernel's neighbour code sends it on the backend's
 * interface. The backend answers from the VIP straight to the daemon's
 * socket, as it answers clients. A backend that lacks the VIP, or its
 * decapsulation, fails the probe though it answers on its own address.
 *
 * Anything else on the device (no mark of ours, no such service or
 * backend, a nat or fullnat service, whose client path is the backend's
 * own address) is dropped. */
#ifndef TETHER_PROBE_H
#define TETHER_PROBE_H

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include "consts.h"
#include "maps.h"
#include "parsing.h"
#include "lookup.h"
#include "encap.h"

/* probe_encap wraps the probe packet (IP datagram pkt, after an Ethernet
 * header) in the outer headers of backend be (id). */
static __always_inline int probe_encap(struct __sk_buff *skb, const struct packet *pkt,
				       const struct backend *be, __u32 id)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 src[4];
	struct outer o = {};
	if (encap_begin(pkt, be, id, data + ETH_HLEN, data_end, &o, src))
		return -1;
	__u32 overhead = encap_overhead(be->family, o.gue);

	/* The kernel keeps the inner headers' offsets (checksum offload,
	 * segmentation) and sets the packet's protocol to the outer family. */
	__u64 flags = be->family == AF_INET6 ? BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 : BPF_F_ADJ_ROOM_ENCAP_L3_IPV4;
	if (o.gue)
		flags |= BPF_F_ADJ_ROOM_ENCAP_L4_UDP;
	if (bpf_skb_adjust_room(skb, overhead, BPF_ADJ_ROOM_MAC, flags))
		return -1;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return -1;
	return write_outer(eth, data_end, be, &o);
}

SEC("tc")
int tether_probe(struct __sk_buff *skb)
{
	__u32 mark = skb->mark;
	if ((mark & PROBE_MARK_MASK) != PROBE_MARK)
		return TC_ACT_SHOT;
	__u32 id = mark & ~PROBE_MARK_MASK;

	/* The socket's payload may sit in pages: make the whole (small)
	 * packet readable. */
	if (bpf_skb_pull_data(skb, skb->len))
		return TC_ACT_SHOT;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_SHOT;
	struct packet pkt = {};
	int r = R_PASS_NOT_IP;
	if (eth->h_proto == ETH_P_IP_BE)
		r = parse_ipv4(eth + 1, data_end, &pkt);
	else if (eth->h_proto == ETH_P_IPV6_BE)
		r = parse_ipv6(eth + 1, data_end, &pkt);
	if (r)
		return TC_ACT_SHOT;

	struct service *svc = lookup_service(&pkt);
	if (!svc || (svc->flags & (SVC_F_NAT | SVC_F_FULLNAT)))
		return TC_ACT_SHOT;
	struct backend *be = lookup_backend(id, svc->id);
	if (!be || !be->ifindex)
		return TC_ACT_SHOT;
	__u32 ifindex = be->ifindex;
	struct bpf_redir_neigh nh = {.nh_family = be->family};
	__builtin_memcpy(&nh.ipv6_nh, be->addr, sizeof(nh.ipv6_nh));

	/* The mark chose the probe device; the rest of the way is the
	 * backend's route, as for any packet. */
	skb->mark = 0;
	if (svc->flags & (SVC_F_IPIP | SVC_F_GUE)) {
		if (probe_encap(skb, &pkt, be, id))
			return TC_ACT_SHOT;
		/* To the next hop the route to the backend gives. */
		return bpf_redirect_neigh(ifindex, NULL, 0, 0);
	}
	/* dsr: the backend is on the interface's network. */
	return bpf_redirect_neigh(ifindex, &nh, sizeof(nh), 0);
}

#endif
