package main

import (
	"fmt"
	"strings"
)

// The kernel here is built without IPVS; nftables stands in for its two
// modes with the same per-packet work: DNAT with a hash of the source
// address (IPVS NAT with the sh scheduler) and a netdev-ingress rewrite of
// the destination MAC with fwd (IPVS direct routing).
func init() {
	register(Peer{
		Name:           "nftables DNAT (IPVS-NAT stand-in)",
		Order:          40,
		Role:           RoleKernel,
		Version:        []string{"nft", "--version"},
		Rows:           RowPackets | RowStreams,
		SourceAffinity: true,
		Note:           "prerouting `dnat to jhash ip saddr mod N map {...}` with conntrack, forwarding on, backends route replies through the balancer",
		Start:          func(e *Env) (Running, error) { return noProcess(startNftDNAT(e)) },
	})
	register(Peer{
		Name:           "nftables fwd (IPVS-DR stand-in)",
		Order:          41,
		Role:           RoleKernel,
		Version:        []string{"nft", "--version"},
		Rows:           RowPackets | RowStreams,
		SourceAffinity: true,
		Note:           "netdev ingress `ether daddr set jhash ip saddr mod N map {...} fwd to eth0`, no conntrack; backends answer clients directly (DSR)",
		Start:          func(e *Env) (Running, error) { return noProcess(startNftDR(e)) },
	})
}

const nftTable = "tether_bench"

// hashMap is an nftables map literal from hash bucket to values[i].
func hashMap(values []string) string {
	var parts []string
	for i, v := range values {
		parts = append(parts, fmt.Sprintf("%d : %s", i, v))
	}
	return "map { " + strings.Join(parts, ", ") + " }"
}

// applyNft loads ruleset on the balancer and returns the removal of
// table family/nftTable.
func applyNft(e *Env, family, ruleset string) (func() error, error) {
	if err := e.RunInput(e.Lab.Balancer, ruleset, "nft", "-f", "-"); err != nil {
		return nil, err
	}
	return func() error { return e.Lab.Balancer.Run("nft", "delete", "table", family, nftTable) }, nil
}

func startNftDNAT(e *Env) (func() error, error) {
	var addrs []string
	for _, a := range e.BackendAddrs {
		addrs = append(addrs, a.String())
	}
	ruleset := fmt.Sprintf(`table ip %s {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr %s dnat to jhash ip saddr mod %d seed 0x7e7e %s
	}
}
`, nftTable, e.VIP, len(addrs), hashMap(addrs))
	return startKernelPeer(e, true, func() (func() error, error) { return applyNft(e, "ip", ruleset) })
}

func startNftDR(e *Env) (func() error, error) {
	var macs []string
	for _, be := range e.Lab.Backends {
		macs = append(macs, be.MAC.String())
	}
	ruleset := fmt.Sprintf(`table netdev %s {
	chain ingress {
		type filter hook ingress device "eth0" priority 0; policy accept;
		ip daddr %s ether saddr set %s ether daddr set jhash ip saddr mod %d seed 0x7e7e %s fwd to "eth0"
	}
}
`, nftTable, e.VIP, e.Lab.Balancer.MAC, len(macs), hashMap(macs))
	return startKernelPeer(e, false, func() (func() error, error) { return applyNft(e, "netdev", ruleset) })
}

// startKernelPeer sets up a balancer that lives in the kernel: apply, with
// forwarding and replies through the balancer when nat is set, then waits
// until it serves.
func startKernelPeer(e *Env, nat bool, apply func() (func() error, error)) (func() error, error) {
	var undos []func() error
	fail := func(err error) (func() error, error) { return nil, joinErr(err, undo(undos...)()) }
	if nat {
		fwd, err := e.Forwarding()
		if err != nil {
			return fail(err)
		}
		undos = append(undos, fwd)
		via, err := e.ClientsViaBalancer()
		if err != nil {
			return fail(err)
		}
		undos = append(undos, via)
	}
	del, err := apply()
	if err != nil {
		return fail(err)
	}
	undos = append(undos, del)
	if err := e.WaitServing(nil, "the ruleset"); err != nil {
		return fail(err)
	}
	return undo(undos...), nil
}
