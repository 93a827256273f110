package bpf_test

import (
	"bytes"
	"net/netip"
	"testing"

	"github.com/tetherlb/tether/internal/bpftest"
	"github.com/tetherlb/tether/loader"
	"github.com/tetherlb/tether/maps"
)

// probeIfindex is the interface the probe tests' backends are reached by.
const probeIfindex = 7

// TestProbeFollowsClients: a health probe marked for one of a service's
// backends leaves the probe device as a client's packet of the same
// 5-tuple leaves the XDP program: dsr, unchanged; ipip and gue, inside the
// same outer headers byte for byte (the MACs are the kernel's to write
// here), in either family. It is redirected, and its mark cleared so that
// the backend's route, not the probe rule, takes it on.
func TestProbeFollowsClients(t *testing.T) {
	for _, mode := range []uint8{maps.ForwardDSR, maps.ForwardIPIP, maps.ForwardGUE} {
		for _, other := range []bool{false, true} {
			if mode == maps.ForwardDSR && other {
				continue
			}
			name := modeName(mode)
			if other {
				name += "/other family"
			}
			t.Run(name, func(t *testing.T) {
				e := newEncapLab(t, mode, other)
				for i := range e.svcs {
					e.svcs[i].Ifindex = probeIfindex
					e.AddService(e.svcs[i])
				}
				for _, tc := range forwardCases(e.svcs)[:4] {
					t.Run(tc.desc, func(t *testing.T) {
						in := bpftest.Frame{Src: tc.cli, Dst: tc.svc.VIP, Proto: tc.svc.Proto, Flags: bpftest.ACK,
							Payload: chatPayload, Checksum: true}.Bytes()
						// The backend the XDP program gives this 5-tuple.
						xv, viaXDP := e.run(t, in)
						if xv != bpftest.XDPTx && !(mode == maps.ForwardDSR && xv == bpftest.XDPRedirect) {
							t.Fatalf("XDP verdict %d, want it forwarded", xv)
						}
						id := tc.svc.Backends[0]
						if mode != maps.ForwardDSR {
							id = parseOuter(t, viaXDP, mode == maps.ForwardGUE, e.lab.Balancer.MAC).backendID
						} else if id, _ = bpftest.BackendOf(viaXDP); id == 0 {
							t.Fatal("XDP sent the frame to no backend")
						}
						verdict, out, mark := e.RunProbe(in, loader.ProbeMark|id)
						if verdict != bpftest.TCActRedirect {
							t.Fatalf("verdict %d, want TC_ACT_REDIRECT", verdict)
						}
						if mark != 0 {
							t.Fatalf("mark %#x left on the packet, want 0", mark)
						}
						if mode == maps.ForwardDSR {
							if !bytes.Equal(out, in) {
								t.Fatalf("dsr probe changed:\n got %x\nwant %x", out, in)
							}
							return
						}
						if !bytes.Equal(out[12:], viaXDP[12:]) {
							t.Fatalf("probe's headers differ from a client's:\nprobe %x\nxdp   %x", out[12:], viaXDP[12:])
						}
					})
				}
			})
		}
	}
}

// TestProbeRefused: the probe program drops what is not a probe it can
// steer: no mark of tether's, a backend of another service, a destination
// that is no VIP, a nat service (its client path is the backend's own
// address), a backend whose interface is not known.
func TestProbeRefused(t *testing.T) {
	e := newEncapLab(t, maps.ForwardIPIP, false)
	for i := range e.svcs {
		e.svcs[i].Ifindex = probeIfindex
		e.AddService(e.svcs[i])
	}
	tcp4 := func(dst netip.AddrPort) []byte {
		return bpftest.Frame{Src: cli4, Dst: dst, Proto: bpftest.TCP, Flags: bpftest.SYN, Checksum: true}.Bytes()
	}
	natSvc := bpftest.Service{ID: 5, VIP: netip.AddrPortFrom(vip4.Addr(), 8080), Proto: bpftest.TCP,
		Backends: []uint32{13}, Forwarding: maps.ForwardNAT, Ifindex: probeIfindex}
	e.AddService(natSvc)
	unresolved := bpftest.Service{ID: 6, VIP: netip.AddrPortFrom(vip4.Addr(), 8081), Proto: bpftest.TCP,
		Backends: []uint32{14}, Forwarding: maps.ForwardIPIP, Tunnel: e.svcs[0].Tunnel}
	e.AddService(unresolved)
	for _, tc := range []struct {
		desc  string
		frame []byte
		mark  uint32
	}{
		{"no mark", tcp4(vip4), 0},
		{"another mark", tcp4(vip4), 0x100 | 1},
		{"a backend of another service", tcp4(vip4), loader.ProbeMark | 4},
		{"no such backend", tcp4(vip4), loader.ProbeMark | 999},
		{"not a VIP", tcp4(netip.MustParseAddrPort("203.0.113.77:80")), loader.ProbeMark | 1},
		{"a nat service", tcp4(natSvc.VIP), loader.ProbeMark | 13},
		{"a backend not resolved", tcp4(unresolved.VIP), loader.ProbeMark | 14},
		{"a truncated frame", tcp4(vip4)[:50], loader.ProbeMark | 1},
	} {
		if verdict, _, _ := e.RunProbe(tc.frame, tc.mark); verdict != bpftest.TCActShot {
			t.Errorf("%s: verdict %d, want TC_ACT_SHOT", tc.desc, verdict)
		}
	}
	// And the same frame with the right mark goes.
	if verdict, _, _ := e.RunProbe(tcp4(vip4), loader.ProbeMark|1); verdict != bpftest.TCActRedirect {
		t.Errorf("a probe to backend 1: verdict %d, want TC_ACT_REDIRECT", verdict)
	}
}
