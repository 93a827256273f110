// Package maglev is the reference model of how tether picks a backend: the
// flow hash and the Maglev lookup table (Eisenbud et al., "Maglev: A Fast and
// Reliable Software Network Load Balancer", NSDI 2016).
//
// The XDP program in bpf/ must match this package bit for bit. It hashes a
// packet's key with [SourceHash] or [ConnHash] and reads the VIP's table at
// hash % len(table); the table itself is built here, by [Build], and
// published to the kernel whole. The splice datapath calls the same functions,
// so both datapaths, and every tether host with the same backends and seed,
// send a client to the same backend.
//
// Everything in the package is pure computation on values: no state, no
// kernel, safe for concurrent use.
package maglev
