/* nat.h: forwarding nat and fullnat: a flow's packets rewritten towards its
 * backend, and the backend's replies translated back and sent to the client.
 *
 * A translated flow has two entries: its connection entry (client 5-tuple →
 * backend, as with dsr, plus its fullnat source port) and its NAT entry,
 * keyed by the 5-tuple of the backend's replies, which tells what the
 * client expects them to come from. A bare SYN enters only a half-open NAT
 * entry, in the small nat_syn tables, so that its SYN-ACK can be
 * translated; the handshake's next packet enters both for good. A flood of
 * spoofed SYNs thus evicts half-open entries, never established ones, and
 * holds a fullnat port only NAT_SYN_HOLD_NS. */
#ifndef TETHER_NAT_H
#define TETHER_NAT_H

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
#include "parsing.h"
#include "hash.h"
#include "forward.h"
#include "lookup.h"

/* Incremental checksum update (RFC 1624): HC' = ~(~HC + ~m + m'). A diff
 * sums ~m + m' over the changed 16-bit words; words are added as loaded,
 * like the checksum field, which gives the same result in either byte
 * order. */
static __always_inline __u32 csum_diff16(__u32 d, __u16 from, __u16 to)
{
	return d + (__u16)~from + to;
}

static __always_inline __u32 csum_diff32(__u32 d, __u32 from, __u32 to)
{
	d = csum_diff16(d, (__u16)from, (__u16)to);
	return csum_diff16(d, (__u16)(from >> 16), (__u16)(to >> 16));
}

static __always_inline __u16 csum_apply(__u16 check, __u32 d)
{
	__u32 s = (__u16)~check + d;
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* The addresses and ports a translated packet leaves with. */
struct nat_tuple {
	__u32 src[4];
	__u32 dst[4];
	__u16 sport;
	__u16 dport;
};

/* nat_rewrite writes t into the parsed packet's IP and TCP/UDP headers and
 * updates their checksums (an IPv4 UDP checksum of 0, none, stays 0). */
static __always_inline int nat_rewrite(struct xdp_md *ctx, const struct packet *pkt,
				       const struct nat_tuple *t)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	void *l4;
	__u32 d = 0;
	if (pkt->family == AF_INET) {
		struct iphdr *ip = data + l3_offset(pkt);
		if ((void *)(ip + 1) > data_end)
			return -1;
		d = csum_diff32(d, ip->saddr, t->src[0]);
		d = csum_diff32(d, ip->daddr, t->dst[0]);
		ip->saddr = t->src[0];
		ip->daddr = t->dst[0];
		ip->check = csum_apply(ip->check, d);
		l4 = ip + 1;
	} else {
		struct ipv6hdr *ip6 = data + l3_offset(pkt);
		if ((void *)(ip6 + 1) > data_end)
			return -1;
		__u32 *s = ip6->saddr.in6_u.u6_addr32;
		__u32 *dst = ip6->daddr.in6_u.u6_addr32;
#pragma unroll
		for (int i = 0; i < 4; i++) {
			d = csum_diff32(d, s[i], t->src[i]);
			d = csum_diff32(d, dst[i], t->dst[i]);
			s[i] = t->src[i];
			dst[i] = t->dst[i];
		}
		l4 = ip6 + 1;
	}
	if (pkt->key.proto == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > data_end)
			return -1;
		d = csum_diff16(d, tcp->source, t->sport);
		d = csum_diff16(d, tcp->dest, t->dport);
		tcp->source = t->sport;
		tcp->dest = t->dport;
		tcp->check = csum_apply(tcp->check, d);
		return 0;
	}
	struct udphdr *udp = l4;
	if ((void *)(udp + 1) > data_end)
		return -1;
	d = csum_diff16(d, udp->source, t->sport);
	d = csum_diff16(d, udp->dest, t->dport);
	udp->source = t->sport;
	udp->dest = t->dport;
	if (udp->check || pkt->family == AF_INET6) {
		__u16 c = csum_apply(udp->check, d);
		udp->check = c ? c : 0xffff; /* 0 would mean "no checksum" */
	}
	return 0;
}

/* nat_lookup finds the NAT entry of reply key rk, established or (half)
 * half-open. Each map is named at its own call site (see lookup_conn). */
static __always_inline struct nat_entry *nat_lookup(__u8 family, const struct flow_key *rk, int half)
{
	if (family == AF_INET6) {
		if (half)
			return bpf_map_lookup_elem(&nat_syn6, rk);
		return bpf_map_lookup_elem(&nat6, rk);
	}
	struct flow_key4 k = key4_of(rk);
	if (half)
		return bpf_map_lookup_elem(&nat_syn4, &k);
	return bpf_map_lookup_elem(&nat4, &k);
}

static __always_inline void nat_insert(__u8 family, const struct flow_key *rk, const struct nat_entry *e,
				       int half)
{
	if (family == AF_INET6) {
		if (half)
			bpf_map_update_elem(&nat_syn6, rk, e, BPF_ANY);
		else
			bpf_map_update_elem(&nat6, rk, e, BPF_ANY);
		return;
	}
	struct flow_key4 k = key4_of(rk);
	if (half)
		bpf_map_update_elem(&nat_syn4, &k, e, BPF_ANY);
	else
		bpf_map_update_elem(&nat4, &k, e, BPF_ANY);
}

/* nat_key is the reply key of the packet's flow to backend be: from the
 * backend's address and port to the client's, or with fullnat to the
 * balancer's address sn and the flow's port. */
static __always_inline void nat_key(struct flow_key *rk, const struct packet *pkt, const struct backend *be,
				    const struct snat *sn, __u16 port)
{
	__builtin_memcpy(rk->src, be->addr, sizeof(rk->src));
	rk->sport = be->port;
	rk->proto = pkt->key.proto;
	if (sn) {
		__builtin_memcpy(rk->dst, sn->addr, sizeof(rk->dst));
		rk->dport = port;
	} else {
		__builtin_memcpy(rk->dst, pkt->key.src, sizeof(rk->dst));
		rk->dport = pkt->key.sport;
	}
}

static __always_inline int addr_eq(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* nat_ours says whether entry e is the packet's flow's. */
static __always_inline int nat_ours(const struct nat_entry *e, const struct packet *pkt)
{
	return e->cport == pkt->key.sport && e->vport == pkt->key.dport && addr_eq(e->client, pkt->key.src) &&
	       addr_eq(e->vip, pkt->key.dst);
}

/* nat_delete removes the established entry of reply key rk. */
static __always_inline void nat_delete(__u8 family, const struct flow_key *rk)
{
	if (family == AF_INET6) {
		bpf_map_delete_elem(&nat6, rk);
		return;
	}
	struct flow_key4 k = key4_of(rk);
	bpf_map_delete_elem(&nat4, &k);
}

/* nat_free says whether another flow's entry no longer holds its reply
 * 5-tuple: a half-open or unverified one after NAT_SYN_HOLD_NS, a closed
 * TCP flow's after NAT_CLOSED_HOLD_NS (NAT_TIMEWAIT_HOLD_NS if its backend
 * closed first), an idle UDP flow's after NAT_UDP_IDLE_NS. An open TCP
 * flow's is never free, however long it idles. */
static __always_inline int nat_free(const struct nat_entry *e, __u8 proto, int half, __u64 now)
{
	if (half || (e->flags & NAT_F_UNVERIFIED))
		return now - e->stamp_ns > NAT_SYN_HOLD_NS;
	if (proto == IPPROTO_UDP)
		return now - e->stamp_ns > NAT_UDP_IDLE_NS;
	if (!e->stamp_ns)
		return 0;
	__u64 hold = (e->flags & NAT_F_BACKEND_1ST) && !(e->flags & NAT_F_RESET) ? NAT_TIMEWAIT_HOLD_NS
										 : NAT_CLOSED_HOLD_NS;
	return now - e->stamp_ns > hold;
}

/* nat_taken says whether reply key rk belongs to another live flow than
 * the packet's. */
static __always_inline int nat_taken(const struct packet *pkt, const struct flow_key *rk, __u64 now)
{
	struct nat_entry *e = nat_lookup(pkt->family, rk, 0);
	if (e && !nat_ours(e, pkt) && !nat_free(e, pkt->key.proto, 0, now))
		return 1;
	e = nat_lookup(pkt->family, rk, 1);
	return e && !nat_ours(e, pkt) && !nat_free(e, pkt->key.proto, 1, now);
}

/* snat_port is the i-th source port a fullnat flow whose hash is h tries,
 * in network byte order. */
static __always_inline __u16 snat_port(__u32 h, __u32 i)
{
	return bpf_htons(SNAT_PORT_MIN + (h + i * 4099) % SNAT_PORT_SPAN);
}

/* snat_choose returns the source port of the packet's fullnat flow towards
 * backend be from address sn (0: none free), and leaves its reply key in
 * rk: the port its entries hold if it has some (the handshake's next packet
 * finds the port its SYN took), else the first free one it tries. */
static __always_inline __u16 snat_choose(const struct packet *pkt, const struct backend *be,
					 const struct snat *sn, struct flow_key *rk, __u64 now)
{
	__u32 h = hash_conn(hash_seed ^ 0x736e6174, &pkt->key);
	__u16 free = 0;
	for (__u32 i = 0; i < SNAT_PORT_TRIES; i++) {
		__u16 p = snat_port(h, i);
		nat_key(rk, pkt, be, sn, p);
		struct nat_entry *e = nat_lookup(pkt->family, rk, 0);
		if (e && nat_ours(e, pkt))
			return p;
		if (e && !nat_free(e, pkt->key.proto, 0, now))
			continue;
		e = nat_lookup(pkt->family, rk, 1);
		if (e && nat_ours(e, pkt))
			return p;
		if (e && !nat_free(e, pkt->key.proto, 1, now))
			continue;
		if (!free)
			free = p;
	}
	if (free)
		nat_key(rk, pkt, be, sn, free);
	return free;
}

/* nat_entry_of is the NAT entry of the packet's flow to backend id. */
static __always_inline struct nat_entry nat_entry_of(const struct packet *pkt, __u32 id, __u64 stamp)
{
	struct nat_entry e = {
	    .cport = pkt->key.sport, .vport = pkt->key.dport, .backend = id, .stamp_ns = stamp};
	__builtin_memcpy(e.client, pkt->key.src, sizeof(e.client));
	__builtin_memcpy(e.vip, pkt->key.dst, sizeof(e.vip));
	return e;
}

/* nat_closing notes a FIN (as fin: NAT_F_CLIENT_FIN or NAT_F_BACKEND_FIN)
 * or a RST on entry e, and when the flow closed: both FINs, or a RST. */
static __always_inline void nat_closing(struct nat_entry *e, const struct packet *pkt, __u32 fin)
{
	__u32 f = e->flags | ((pkt->closing & CLOSING_RST) ? NAT_F_RESET : fin);
	if (fin == NAT_F_BACKEND_FIN && !(pkt->closing & CLOSING_RST) && !(e->flags & NAT_F_CLIENT_FIN))
		f |= NAT_F_BACKEND_1ST;
	if (f == e->flags)
		return;
	int closed = (f & NAT_F_CLOSED) == NAT_F_CLOSED || (f & NAT_F_RESET);
	if (closed && (!e->stamp_ns || (f & NAT_F_UNVERIFIED)))
		e->stamp_ns = bpf_ktime_get_coarse_ns();
	e->flags = closed ? f & ~NAT_F_UNVERIFIED : f;
}

/* nat_touch notes a UDP flow's use, at most once every NAT_UDP_STAMP_NS. */
static __always_inline void nat_touch(struct nat_entry *e)
{
	__u64 now = bpf_ktime_get_coarse_ns();
	if (now - e->stamp_ns > NAT_UDP_STAMP_NS)
		e->stamp_ns = now;
}

/* forward_nat rewrites the packet towards backend be (from sn and port
 * with fullnat) and sends it there. */
static __always_inline int forward_nat(struct xdp_md *ctx, const struct packet *pkt, const struct backend *be,
				       __u32 id, const struct snat *sn, __u16 port)
{
	struct nat_tuple t = {.sport = pkt->key.sport, .dport = be->port};
	if (sn) {
		__builtin_memcpy(t.src, sn->addr, sizeof(t.src));
		t.sport = port;
	} else {
		__builtin_memcpy(t.src, pkt->key.src, sizeof(t.src));
	}
	__builtin_memcpy(t.dst, be->addr, sizeof(t.dst));
	if (nat_rewrite(ctx, pkt, &t))
		return count_reason(R_DROP_TRUNCATED, XDP_DROP);
	return forward_dsr(ctx, be, id);
}

/* snat_of is backend id's fullnat source address, NULL if it has none. */
static __always_inline struct snat *snat_of(__u32 id)
{
	struct snat *sn = bpf_map_lookup_elem(&snat_addrs, &id);
	if (!sn || !(sn->addr[0] | sn->addr[1] | sn->addr[2] | sn->addr[3]))
		return NULL;
	return sn;
}

/* NAT_STALE is what forward_nat_conn returns for a packet whose flow's
 * reply 5-tuple another flow holds now: its connection entry is stale. */
#define NAT_STALE (-1)

/* forward_nat_conn forwards a packet of a tracked translated flow. Its NAT
 * entry must be its own: one the LRU evicted is entered again (unverified
 * until the backend answers); one another flow holds, or is opening, makes
 * the connection entry stale (NAT_STALE). A FIN or RST is noted in it, a new handshake on
 * the 5-tuple reopens it, and a UDP flow's use is noted. */
static __always_inline int forward_nat_conn(struct xdp_md *ctx, const struct packet *pkt,
					    const struct backend *be, const struct conn *c)
{
	__u32 id = c->backend;
	struct snat *sn = NULL;
	if (c->flags & CONN_F_FULLNAT) {
		sn = snat_of(id);
		if (!sn)
			return count_reason(R_DROP_NO_BACKEND, XDP_DROP);
	}
	struct flow_key rk = {};
	nat_key(&rk, pkt, be, sn, c->nat_port);
	struct nat_entry *e = nat_lookup(pkt->family, &rk, 0);
	if (!e) {
		__u64 now = bpf_ktime_get_coarse_ns();
		struct nat_entry *h = nat_lookup(pkt->family, &rk, 1);
		if (h && !nat_ours(h, pkt) && !nat_free(h, pkt->key.proto, 1, now))
			return NAT_STALE;
		struct nat_entry ne = nat_entry_of(pkt, id, now);
		if (pkt->key.proto == IPPROTO_TCP)
			ne.flags = NAT_F_UNVERIFIED;
		nat_insert(pkt->family, &rk, &ne, 0);
	} else if (!nat_ours(e, pkt)) {
		return NAT_STALE;
	} else if (pkt->key.proto == IPPROTO_UDP) {
		nat_touch(e);
	} else if (pkt->syn_only) {
		if (e->flags || e->stamp_ns) {
			e->flags = 0;
			e->stamp_ns = 0;
		}
	} else if (pkt->closing) {
		nat_closing(e, pkt, NAT_F_CLIENT_FIN);
	}
	return forward_nat(ctx, pkt, be, id, sn, c->nat_port);
}

/* to_client sends a translated reply (now from t->src to t->dst) to the
 * client's next hop on the interface it came in on, as the kernel's FIB and
 * neighbour table give them; fib holds the lookup. A reply the kernel can
 * send better goes to it: one whose next hop it has not resolved yet (it
 * resolves it) or that leaves by another interface, which may have no XDP
 * (a VLAN or a tunnel device). */
static __always_inline int to_client(struct xdp_md *ctx, const struct bpf_fib_lookup *fib)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return count_reason(R_DROP_TRUNCATED, XDP_DROP);
	if (fib->ifindex != ctx->ingress_ifindex)
		return count_reason(R_PASS_NAT_KERNEL, XDP_PASS);
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	return XDP_TX;
}

/* fib_client asks the kernel's FIB for the next hop of a reply from t->src
 * to t->dst, and returns bpf_fib_lookup's answer. */
static __always_inline long fib_client(struct xdp_md *ctx, const struct packet *pkt,
				       const struct nat_tuple *t, struct bpf_fib_lookup *fib)
{
	fib->l4_protocol = pkt->key.proto;
	fib->sport = t->sport;
	fib->dport = t->dport;
	fib->ifindex = ctx->ingress_ifindex;
	fib->tot_len = pkt->len; /* the datagram's length, from the parser */
	if (pkt->family == AF_INET6) {
		fib->family = AF_INET6;
		__builtin_memcpy(fib->ipv6_src, t->src, sizeof(fib->ipv6_src));
		__builtin_memcpy(fib->ipv6_dst, t->dst, sizeof(fib->ipv6_dst));
	} else {
		fib->family = AF_INET;
		fib->ipv4_src = t->src[0];
		fib->ipv4_dst = t->dst[0];
	}
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
}

/* nat_reply translates a packet that is no VIP's if it is the reply of a
 * translated flow, and sends it to the client; anything else goes to the
 * kernel untouched. A nat reply too big for the egress MTU goes to the
 * kernel untranslated, whose ICMP "fragmentation needed" then reaches the
 * backend; a fullnat one is dropped (the kernel would answer it as its
 * own). */
static __always_inline int nat_reply(struct xdp_md *ctx, const struct packet *pkt)
{
	int half = 0;
	struct nat_entry *e = nat_lookup(pkt->family, &pkt->key, 0);
	/* A backend answers a SYN with a SYN-ACK or a RST: only those can be a
	 * half-open flow's, and only they pay the second lookup. */
	if (!e && pkt->key.proto == IPPROTO_TCP && (pkt->syn || (pkt->closing & CLOSING_RST))) {
		e = nat_lookup(pkt->family, &pkt->key, 1);
		half = 1;
	}
	if (!e)
		return count_reason(R_PASS_NOT_VIP, XDP_PASS);
	struct nat_tuple t = {.sport = e->vport, .dport = e->cport};
	__builtin_memcpy(t.src, e->vip, sizeof(t.src));
	__builtin_memcpy(t.dst, e->client, sizeof(t.dst));
	struct bpf_fib_lookup fib = {};
	long rc = fib_client(ctx, pkt, &t, &fib);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		if (t.dport == pkt->key.dport && addr_eq(t.dst, pkt->key.dst))
			return count_reason(R_PASS_NAT_MTU, XDP_PASS);
		return count_reason(R_DROP_NAT_MTU, XDP_DROP);
	}
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return count_reason(R_DROP_NAT_NO_ROUTE, XDP_DROP);
	if (!half && pkt->key.proto == IPPROTO_TCP) {
		if (pkt->closing)
			nat_closing(e, pkt, NAT_F_BACKEND_FIN);
		else if (e->flags & NAT_F_UNVERIFIED) {
			/* The backend answers: the flow is its. */
			e->flags &= ~NAT_F_UNVERIFIED;
			e->stamp_ns = 0;
		}
	} else if (!half) {
		nat_touch(e);
	}
	if (nat_rewrite(ctx, pkt, &t))
		return count_reason(R_DROP_TRUNCATED, XDP_DROP);
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return count_reason(R_PASS_NAT_KERNEL, XDP_PASS);
	return to_client(ctx, &fib);
}

#endif
