package maps

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/tetherlb/tether/bpf"
	"github.com/tetherlb/tether/datapath"
)

// BackendCounters are a backend's counters summed over CPUs.
type BackendCounters = datapath.BackendCounters

// ServiceCounters are a service's counters summed over CPUs.
type ServiceCounters = datapath.ServiceCounters

// BackendCounters sums backend id's per-CPU counters.
func (m *Maps) BackendCounters(id uint32) (BackendCounters, error) {
	var per []bpf.TetherBackendStats
	if err := m.m.BeStats.Lookup(id, &per); err != nil {
		return BackendCounters{}, fmt.Errorf("read counters of backend %d: %w", id, err)
	}
	var c BackendCounters
	for _, p := range per {
		c.Packets += p.Packets
		c.Bytes += p.Bytes
		c.NewConns += p.NewConns
	}
	return c, nil
}

// ResetBackendCounters zeroes backend id's counters (when its id is reused).
func (m *Maps) ResetBackendCounters(id uint32) error {
	n, err := ebpf.PossibleCPU()
	if err != nil {
		return fmt.Errorf("reset counters of backend %d: %w", id, err)
	}
	per := make([]bpf.TetherBackendStats, n)
	if err := m.m.BeStats.Put(id, per); err != nil {
		return fmt.Errorf("reset counters of backend %d: %w", id, err)
	}
	return nil
}

// ServiceCounters sums service id's per-CPU counters.
func (m *Maps) ServiceCounters(id uint32) (ServiceCounters, error) {
	var per []bpf.TetherServiceStats
	if err := m.m.SvcStats.Lookup(id, &per); err != nil {
		return ServiceCounters{}, fmt.Errorf("read counters of service %d: %w", id, err)
	}
	var c ServiceCounters
	for _, p := range per {
		c.NewConns += p.NewConns
		c.AffinityHits += p.AffinityHits
		c.AffinityMisses += p.AffinityMiss
	}
	return c, nil
}

// ReasonUnrecorded is the counter of the reasons map that counts packets
// forwarded without their new flow being recorded (the insertion guard,
// bpf/guard.h): forwarded, unlike the others.
var ReasonUnrecorded = ReasonName(bpf.TetherReasonR_GUARD_UNRECORDED)

// Reasons returns the packets passed to the kernel, dropped or answered with
// a TCP reset instead of being forwarded, by reason:
// "pass_not_vip", "drop_truncated"... Forwarded packets are counted per
// backend instead, but for ReasonUnrecorded, which the map holds too.
func (m *Maps) Reasons() (map[string]uint64, error) {
	out := make(map[string]uint64, int(bpf.TetherReasonR_MAX))
	for r := bpf.TetherReasonR_PARSED + 1; r < bpf.TetherReasonR_MAX; r++ {
		var per []uint64
		if err := m.m.Reasons.Lookup(uint32(r), &per); err != nil {
			return nil, fmt.Errorf("read reason %d: %w", r, err)
		}
		var n uint64
		for _, p := range per {
			n += p
		}
		out[ReasonName(r)] = n
	}
	return out, nil
}

// reasonNames follows enum reason in bpf/consts.h: R_X is named "x"
// (TestReasonNamesFollowC checks it against the program's BTF).
var reasonNames = [...]string{
	bpf.TetherReasonR_PARSED:              "",
	bpf.TetherReasonR_PASS_NOT_IP:         "pass_not_ip",
	bpf.TetherReasonR_PASS_NOT_VIP:        "pass_not_vip",
	bpf.TetherReasonR_PASS_NOT_TCP_UDP:    "pass_not_tcp_udp",
	bpf.TetherReasonR_PASS_IPV4OPTIONS:    "pass_ipv4_options",
	bpf.TetherReasonR_PASS_IPV4FRAGMENT:   "pass_ipv4_fragment",
	bpf.TetherReasonR_PASS_IPV6EXTENSION:  "pass_ipv6_extension",
	bpf.TetherReasonR_PASS_VLAN_STACK:     "pass_vlan_stack",
	bpf.TetherReasonR_DROP_TRUNCATED:      "drop_truncated",
	bpf.TetherReasonR_DROP_BAD_HEADER:     "drop_bad_header",
	bpf.TetherReasonR_DROP_NO_BACKEND:     "drop_no_backend",
	bpf.TetherReasonR_DROP_TX_FAILED:      "drop_tx_failed",
	bpf.TetherReasonR_RESET_NO_BACKEND:    "reset_no_backend",
	bpf.TetherReasonR_RESET_BACKEND_DOWN:  "reset_backend_down",
	bpf.TetherReasonR_DROP_L4TRUNCATED:    "drop_l4_truncated",
	bpf.TetherReasonR_DROP_TCP_OFFSET:     "drop_tcp_offset",
	bpf.TetherReasonR_DROP_UDP_LENGTH:     "drop_udp_length",
	bpf.TetherReasonR_DROP_IP_CHECKSUM:    "drop_ip_checksum",
	bpf.TetherReasonR_RESET_NAT_PORTS:     "reset_nat_ports",
	bpf.TetherReasonR_RESET_NAT_CLASH:     "reset_nat_clash",
	bpf.TetherReasonR_PASS_NAT_KERNEL:     "pass_nat_kernel",
	bpf.TetherReasonR_DROP_NAT_NO_ROUTE:   "drop_nat_no_route",
	bpf.TetherReasonR_DROP_NAT_STALE:      "drop_nat_stale",
	bpf.TetherReasonR_PASS_NAT_MTU:        "pass_nat_mtu",
	bpf.TetherReasonR_DROP_NAT_MTU:        "drop_nat_mtu",
	bpf.TetherReasonR_ICMP_TOO_BIG:        "icmp_too_big",
	bpf.TetherReasonR_DROP_ENCAP_MTU:      "drop_encap_mtu",
	bpf.TetherReasonR_DROP_ENCAP_NO_ROUTE: "drop_encap_no_route",
	bpf.TetherReasonR_PASS_ICMP_NO_FLOW:   "pass_icmp_no_flow",
	bpf.TetherReasonR_ICMP_ECHO_REPLY:     "icmp_echo_reply",
	bpf.TetherReasonR_GUARD_UNRECORDED:    "guard_unrecorded",
	bpf.TetherReasonR_DROP_GUARD:          "drop_guard",
	bpf.TetherReasonR_RESET_DRAINED:       "reset_drained",
}

// ReasonName is the name of a reason as counters and metrics show it.
func ReasonName(r bpf.TetherReason) string {
	if int(r) < len(reasonNames) {
		return reasonNames[r]
	}
	return fmt.Sprintf("reason_%d", r)
}

// ReasonCount is the number of reasons the program counts.
const ReasonCount = int(bpf.TetherReasonR_MAX) - 1
