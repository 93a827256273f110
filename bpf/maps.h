/* maps.h: the BPF maps shared with the Go control plane (maps/), one comment each; layouts in structs.h. */
#ifndef TETHER_MAPS_H
#define TETHER_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "consts.h"
#include "structs.h"

/* Load-time settings, written by the loader before the program is loaded. */
volatile const __u32 ring_size = RING_SIZE;  /* slots in every ring, prime */
volatile const __u32 hash_seed = 0x74657468; /* the same on every tether host */
volatile const __u32 insert_rate = 0;	     /* new flows each CPU records a second; 0: no limit (guard.h) */

/* The time as struct conn.flags holds it (CONN_SEEN_SHIFT: units of 2^30
 * ns of CLOCK_MONOTONIC_COARSE, modulo 2^24), which the loader writes
 * every 100 ms: a connection-table hit reads it instead of the clock. 0
 * until the first write: the entries keep the time they hold. */
volatile __u32 seen_now = 0;

/* Which destination addresses may be a VIP's: the bit may_be_vip
 * (lookup.h) computes is set for the VIP of every service, by the control
 * plane (maps/vipfilter.go) before the service's entry is written, and
 * cleared after the last service of its VIPs is gone. A packet whose bit
 * is clear is no service's and skips the connection table's lookup (a
 * cache and TLB miss in a big table) and the service's: traffic for the host, and the
 * replies of translated flows (nat, fullnat) on their way to be
 * translated back. Every bit is set until the control plane writes the
 * filter (from the pinned services, before it attaches the program). */
__u64 vip_filter[VIP_FILTER_WORDS] = {[0 ... VIP_FILTER_WORDS - 1] = ~0ULL};

/* tether trace (trace.h), written by the daemon while a trace runs:
 * trace_on turns it on, trace_match says which packets, trace_reason is
 * each CPU's reason for its packet, trace_lost counts events the ring had
 * no room for. Not pinned: a trace lives as long as one daemon. */
volatile __u32 trace_on = 0;
struct trace_filter trace_match = {};
__u32 trace_reason[TRACE_CPUS] = {};
__u64 trace_lost = 0;

/* Services by VIP, port and protocol. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SERVICES);
	__type(key, struct service_key4);
	__type(value, struct service);
} services4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SERVICES);
	__type(key, struct service_key);
	__type(value, struct service);
} services6 SEC(".maps");

/* Backends by id (id 0 is never used). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct backend);
} backends SEC(".maps");

/* One Maglev ring per service id, replaced whole by the control plane:
 * packets see the old ring or the new one. Backend ids are 16 bits, four to
 * an 8-byte entry (the kernel rounds array values up to 8 bytes, so a slot
 * per entry would waste three quarters): slot s is bits 16*(s%4) and up of
 * entry s/4. Memory-mappable, so that the control plane writes a new ring
 * in one copy rather than one syscall copy per entry. */
struct ring {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, RING_ENTRIES(RING_SIZE));
	__type(key, __u32);
	__type(value, __u64);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, MAX_SERVICES);
	__type(key, __u32);
	__array(values, struct ring);
} rings SEC(".maps");

/* Established flows → backend, IPv4 and IPv6. Entered on a flow's first
 * non-SYN packet. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CONN_ENTRIES);
	__type(key, struct flow_key4);
	__type(value, struct conn);
} conns4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CONN_ENTRIES);
	__type(key, struct flow_key);
	__type(value, struct conn);
} conns6 SEC(".maps");

/* Source affinity: (service, client address) → backend and last use. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, AFFINITY_ENTRIES);
	__type(key, struct affinity_key);
	__type(value, struct affinity);
} affinities SEC(".maps");

/* Translated flows by their replies' 5-tuple (nat, fullnat), IPv4 and
 * IPv6: established ones, entered with the connection entry, and half-open
 * ones, entered by a SYN, in a small table of their own so that a SYN
 * flood evicts only its own kind (nat.h). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NAT_ENTRIES);
	__type(key, struct flow_key4);
	__type(value, struct nat_entry);
} nat4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NAT_ENTRIES);
	__type(key, struct flow_key);
	__type(value, struct nat_entry);
} nat6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NAT_SYN_ENTRIES);
	__type(key, struct flow_key4);
	__type(value, struct nat_entry);
} nat_syn4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NAT_SYN_ENTRIES);
	__type(key, struct flow_key);
	__type(value, struct nat_entry);
} nat_syn6 SEC(".maps");

/* fullnat source addresses by backend id. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct snat);
} snat_addrs SEC(".maps");

/* ipip and gue outer headers by backend id. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct tunnel);
} tunnels SEC(".maps");

/* VIPs by address, with VIP_F_* flags: what the program does for the
 * VIP itself rather than for a service's port. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SERVICES);
	__type(key, struct vip_key);
	__type(value, __u32);
} vips SEC(".maps");

/* Per-CPU counters, summed in Go. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct backend_stats);
} be_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct service_stats);
} svc_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, R_MAX);
	__type(key, enum reason);
	__type(value, __u64);
} reasons SEC(".maps");

/* The insertion guard's count of this second, per CPU (guard.h). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct insert_window);
} insert_guard SEC(".maps");

/* New flows of the services that share their entries (SVC_F_SYNC), for
 * the daemon to send to its peers; sync_lost counts those it had no room
 * for (the daemon fell behind). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, SYNC_RING_BYTES);
} sync_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} sync_lost SEC(".maps");

/* tether trace's events (trace.h). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, TRACE_RING_BYTES);
} trace_events SEC(".maps");

#endif
