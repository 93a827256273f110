// Package bpf holds tether's XDP program and its bpf2go-generated Go
// bindings. The C sources are split by concern: consts.h (tunables, flags,
// backend states, reasons), structs.h (the maps' key and value layouts),
// maps.h (the maps), parsing.h, csum.h (checksums), hash.h, forward.h,
// reset.h, lookup.h, guard.h (the insertion guard), nat.h, encap.h, icmp.h, probe.h (the health probes' TC program), and the entry point in tether.c. The generated tether_bpfel.go and tether_bpfel.o are
// committed so that building tether needs no clang; `make generate`
// rebuilds them. decap.c is a program of its own (DecapObjects), for
// backends: it strips the outer header of ipip and gue packets.
package bpf

//go:generate go tool bpf2go -tags linux -target bpfel -type service_key -type service_key4 -type service -type backend -type flow_key -type flow_key4 -type conn -type nat_entry -type snat -type tunnel -type vip_key -type affinity_key -type affinity -type backend_stats -type service_stats -type sync_event -type reason -type backend_state -type trace_event -type trace_by Tether tether.c -- -I./include -I/usr/include/x86_64-linux-gnu -O2 -Wall -Werror
//go:generate go tool bpf2go -tags linux -target bpfel Decap decap.c -- -I./include -I/usr/include/x86_64-linux-gnu -O2 -Wall -Werror
