package maps

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/tetherlb/tether/bpf"
	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/maglev"
)

// verdictNames names the XDP verdicts as traces show them.
var verdictNames = [...]string{"aborted", "drop", "pass", "tx", "redirect"}

// byNames follows enum trace_by in bpf/consts.h.
var byNames = [...]string{
	bpf.TetherTraceByTRACE_BY_NONE:     "",
	bpf.TetherTraceByTRACE_BY_CONN:     "conn",
	bpf.TetherTraceByTRACE_BY_AFFINITY: "affinity",
	bpf.TetherTraceByTRACE_BY_RING:     "ring",
}

// TraceFilter is filter as the program's trace_match holds it.
func TraceFilter(f datapath.TraceFilter) bpf.TetherTraceFilter {
	var m bpf.TetherTraceFilter
	if f.VIP.IsValid() {
		m.Vip = maglev.AddrWords(f.VIP.Addr())
		m.Port = Port(f.VIP.Port())
		m.Proto = f.Proto
		m.ByVip = 1
		m.Family = family(f.VIP.Addr())
	}
	if f.Client.IsValid() {
		m.Client = maglev.AddrWords(f.Client)
		m.ByClient = 1
		m.Family = family(f.Client)
	}
	return m
}

// TraceEvent decodes a record of trace_events. Its Time is left zero:
// the record's time is returned apart, in ns of CLOCK_MONOTONIC.
func TraceEvent(raw []byte) (datapath.TraceEvent, uint64, error) {
	var ev bpf.TetherTraceEvent
	if len(raw) < binary.Size(ev) {
		return datapath.TraceEvent{}, 0, fmt.Errorf("a trace event of %d bytes, want %d", len(raw), binary.Size(ev))
	}
	if _, err := binary.Decode(raw, binary.NativeEndian, &ev); err != nil {
		return datapath.TraceEvent{}, 0, fmt.Errorf("read a trace event: %w", err)
	}
	fam := ev.Family
	if fam != afInet6 {
		fam = afInet
	}
	out := datapath.TraceEvent{
		Src:     netip.AddrPortFrom(addrOf(ev.Key.Src, fam), HostPort(ev.Key.Sport)),
		Dst:     netip.AddrPortFrom(addrOf(ev.Key.Dst, fam), HostPort(ev.Key.Dport)),
		Proto:   ev.Key.Proto,
		Service: ev.Service,
		Backend: ev.Backend,
		Len:     int(ev.Len),
		Frame:   append([]byte(nil), ev.Data[:min(int(ev.Cap), len(ev.Data))]...),
	}
	if ev.Family == 0 {
		// Not IP, or refused before its addresses were read.
		out.Src, out.Dst = netip.AddrPort{}, netip.AddrPort{}
	}
	if int(ev.Verdict) < len(verdictNames) {
		out.Verdict = verdictNames[ev.Verdict]
	} else {
		out.Verdict = fmt.Sprintf("verdict_%d", ev.Verdict)
	}
	if ev.Reason != 0 {
		out.Reason = ReasonName(bpf.TetherReason(ev.Reason))
	}
	if int(ev.Decided) < len(byNames) {
		out.By = byNames[ev.Decided]
	}
	return out, ev.TimeNs, nil
}
