package bpf_test

import (
	"bytes"
	"errors"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/internal/bpftest"
)

// readTrace reads the events r has, waiting at most 200 ms for each.
func readTrace(t *testing.T, r datapath.TraceReader) []datapath.TraceEvent {
	t.Helper()
	var out []datapath.TraceEvent
	for {
		r.SetDeadline(time.Now().Add(200 * time.Millisecond))
		ev, err := r.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, ev)
	}
}

// TestTrace checks tether trace's events against the decisions the
// packets must get: a new connection's first packet chosen by the ring,
// its next one by its connection entry, the client's next connection by
// its affinity entry; a packet for no service and a malformed one with
// their reasons; the frame as it left, byte for byte. A filter by client
// or by service leaves the others out, and no event comes once the trace
// is closed. One trace runs at a time.
func TestTrace(t *testing.T) {
	f, svcs := fourServices(t)
	s := svcs[0] // TCP over IPv4, source affinity
	cli := netip.AddrPortFrom(cli4.Addr(), 5555)
	r, err := f.Objs.Trace(datapath.TraceFilter{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := f.Objs.Trace(datapath.TraceFilter{}); !errors.Is(err, datapath.ErrTraceBusy) {
		t.Fatalf("a second trace: %v, want ErrTraceBusy", err)
	}

	type sent struct {
		desc    string
		frame   bpftest.Frame
		raw     []byte
		verdict string
		by      string
		reason  string
	}
	ack := bpftest.Frame{Src: cli, Dst: s.VIP, Proto: bpftest.TCP, Flags: bpftest.ACK, Payload: []byte("hi")}
	next := ack
	next.Src = netip.AddrPortFrom(cli.Addr(), 5556)
	cases := []sent{
		{desc: "a new connection", frame: ack, verdict: "tx", by: "ring"},
		{desc: "its next packet", frame: ack, verdict: "tx", by: "conn"},
		{desc: "the client's next connection", frame: next, verdict: "tx", by: "affinity"},
		{desc: "a packet for no service", frame: bpftest.Frame{Src: cli, Dst: netip.AddrPortFrom(s.VIP.Addr(), 9), Proto: bpftest.TCP, Flags: bpftest.ACK}, verdict: "pass", reason: "pass_not_vip"},
	}
	bad := bpftest.Frame{Src: cli, Dst: s.VIP, Proto: bpftest.TCP, Flags: bpftest.ACK}.Bytes()
	bad = bad[:len(bad)-8] // the TCP header cut short
	var outs [][]byte
	var backend uint32
	for i := range cases {
		c := &cases[i]
		c.raw = c.frame.Bytes()
		verdict, out := f.Run(c.raw)
		outs = append(outs, out)
		if i == 0 {
			if verdict != bpftest.XDPTx {
				t.Fatalf("verdict %d", verdict)
			}
			backend, _ = bpftest.BackendOf(out)
		}
	}
	f.Run(bad)
	cases = append(cases, sent{desc: "a truncated TCP header", raw: bad, verdict: "drop", reason: "drop_truncated"})
	outs = append(outs, nil)

	evs := readTrace(t, r)
	if len(evs) != len(cases) {
		t.Fatalf("%d events for %d packets: %+v", len(evs), len(cases), evs)
	}
	for i, c := range cases {
		ev := evs[i]
		if ev.Verdict != c.verdict || ev.By != c.by || ev.Reason != c.reason {
			t.Errorf("%s: verdict %q by %q reason %q, want %q by %q reason %q", c.desc, ev.Verdict, ev.By, ev.Reason, c.verdict, c.by, c.reason)
		}
		if c.by != "" {
			if ev.Service != s.ID || ev.Backend != backend || ev.Src != c.frame.Src || ev.Dst != s.VIP || ev.Proto != bpftest.TCP {
				t.Errorf("%s: %+v, want %s → %s service %d backend %d", c.desc, ev, c.frame.Src, s.VIP, s.ID, backend)
			}
			// The frame as it left: what BPF_PROG_TEST_RUN returned.
			if ev.Len != len(c.raw) || !bytes.Equal(ev.Frame, outs[i][:len(ev.Frame)]) || len(ev.Frame) != min(len(c.raw), 160) {
				t.Errorf("%s: frame of %d bytes (%d kept) differs from what left", c.desc, ev.Len, len(ev.Frame))
			}
		}
		if age := time.Since(ev.Time); age < 0 || age > 5*time.Second {
			t.Errorf("%s: event time %v is %v from now", c.desc, ev.Time, age)
		}
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	var on uint32
	if err := f.Objs.TetherVariables.TraceOn.Get(&on); err != nil || on != 0 {
		t.Fatalf("after the trace's Close, trace_on is %d (%v)", on, err)
	}
	f.Run(ack.Bytes())

	// Filters.
	for _, tc := range []struct {
		desc   string
		filter datapath.TraceFilter
		want   int
	}{
		{"by client", datapath.TraceFilter{Client: netip.MustParseAddr("198.51.100.99")}, 1},
		{"by service", datapath.TraceFilter{Service: s.ID, VIP: s.VIP, Proto: bpftest.TCP}, 2},
		{"by another service", datapath.TraceFilter{Service: svcs[1].ID, VIP: svcs[1].VIP, Proto: bpftest.UDP}, 0},
	} {
		r, err := f.Objs.Trace(tc.filter)
		if err != nil {
			t.Fatal(err)
		}
		f.Run(bpftest.Frame{Src: cli, Dst: netip.AddrPortFrom(s.VIP.Addr(), 9), Proto: bpftest.TCP, Flags: bpftest.ACK}.Bytes())
		f.Run(bpftest.Frame{Src: netip.MustParseAddrPort("198.51.100.99:1000"), Dst: s.VIP, Proto: bpftest.TCP, Flags: bpftest.ACK}.Bytes())
		f.Run(ack.Bytes())
		evs := readTrace(t, r)
		if len(evs) != tc.want {
			t.Errorf("%s: %d events, want %d: %+v", tc.desc, len(evs), tc.want, evs)
		}
		// The packet for no service before it, which the filter left
		// out, noted a reason: a forwarded packet shows none.
		for _, ev := range evs {
			if ev.Verdict == "tx" && ev.Reason != "" {
				t.Errorf("%s: a forwarded packet shows the reason %q", tc.desc, ev.Reason)
			}
		}
		if r.Lost() != 0 {
			t.Errorf("%s: %d events lost", tc.desc, r.Lost())
		}
		r.Close()
	}
}
