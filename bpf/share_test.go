package bpf_test

import (
	"errors"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/tetherlb/tether/datapath"
	"github.com/tetherlb/tether/internal/bpftest"
	"github.com/tetherlb/tether/maps"
)

// TestShareNewFlows: a service that shares its entries hands each flow it
// enters to sync_events once, named by the flow's 5-tuple and the ids it
// chose (a bare SYN is not entered, so not handed out); a service that
// does not share hands out nothing. A flow another host entered (PutFlow)
// goes to the backend it names, whatever the ring says, is marked learned
// until its first packet here, and never replaces an entry of this host's
// own.
func TestShareNewFlows(t *testing.T) {
	f := bpftest.NewFixture(t, loaderOpts())
	svcs := fourServicesWith(f, func(s *bpftest.Service) { s.Share = s.Proto == bpftest.TCP })
	rd, err := ringbuf.NewReader(f.Maps.Raw().SyncEvents)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	next := func() (datapath.Flow, bool) {
		t.Helper()
		rd.SetDeadline(time.Now().Add(50 * time.Millisecond))
		rec, err := rd.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return datapath.Flow{}, false
		}
		if err != nil {
			t.Fatal(err)
		}
		fl, err := maps.SyncFlow(rec.RawSample)
		if err != nil {
			t.Fatal(err)
		}
		return fl, true
	}
	for _, c := range forwardCases(svcs)[:4] {
		src := netip.AddrPortFrom(c.cli.Addr(), 41000)
		if c.svc.Proto == bpftest.TCP {
			backendFor(t, f, c.svc, src, bpftest.SYN)
			if fl, ok := next(); ok {
				t.Errorf("%s: a bare SYN handed out %+v", c.desc, fl)
			}
		}
		id := backendFor(t, f, c.svc, src, 0)
		backendFor(t, f, c.svc, src, 0) // the entry's second packet
		fl, ok := next()
		want := datapath.Flow{Client: src, VIP: c.svc.VIP, Proto: c.svc.Proto, Service: c.svc.ID, Backend: id}
		switch {
		case !c.svc.Share && ok:
			t.Errorf("%s: a service that does not share handed out %+v", c.desc, fl)
		case c.svc.Share && !ok:
			t.Errorf("%s: nothing handed out", c.desc)
		case c.svc.Share && fl != want:
			t.Errorf("%s: handed out %+v, want %+v", c.desc, fl, want)
		}
		if fl, ok := next(); ok {
			t.Errorf("%s: handed out twice: %+v", c.desc, fl)
		}
	}

	// A learned flow goes where it says; it does not replace our own.
	s := svcs[1] // UDP, connection affinity: only the connection table decides
	src := netip.AddrPortFrom(cli4.Addr(), 42000)
	ring := backendFor(t, f, s, netip.AddrPortFrom(cli4.Addr(), 42001), 0)
	learned := without(s.Backends, ring)[0]
	fl := datapath.Flow{Client: src, VIP: s.VIP, Proto: s.Proto, Service: s.ID, Backend: learned}
	if ok, err := f.Maps.PutFlow(fl, false); err != nil || !ok {
		t.Fatalf("PutFlow: %v, %v", ok, err)
	}
	if got, ok, err := f.Maps.LookupFlow(src, s.VIP, s.Proto); err != nil || !ok || !got.Learned {
		t.Fatalf("the learned entry before its first packet here: %+v, %v, %v; want it marked learned", got, ok, err)
	}
	if got := backendFor(t, f, s, src, 0); got != learned {
		t.Errorf("a learned flow went to backend %d, want the %d it names", got, learned)
	}
	if got, _, _ := f.Maps.LookupFlow(src, s.VIP, s.Proto); got.Learned {
		t.Errorf("the learned entry after a packet here: still marked learned")
	}
	own := netip.AddrPortFrom(cli4.Addr(), 42001)
	fl.Client, fl.Backend = own, learned
	if ok, err := f.Maps.PutFlow(fl, false); err != nil || ok {
		t.Fatalf("PutFlow over an entry of ours: entered %v, %v", ok, err)
	}
	if got := backendFor(t, f, s, own, 0); got != ring {
		t.Errorf("our own flow moved to backend %d, want %d", got, ring)
	}
}
