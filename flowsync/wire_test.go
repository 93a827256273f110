package flowsync

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"testing"
	"time"
)

var (
	testKey = []byte("0123456789abcdef0123456789abcdef")
	peerA   = netip.MustParseAddrPort("198.51.100.2:7946")
	peerB   = netip.MustParseAddrPort("[2001:db8:100::3]:7946")
	t0      = time.UnixMilli(1_800_000_000_000)
)

// entries returns n entries of every shape: IPv4 and IPv6 flows,
// affinity entries, an IPv4 VIP with IPv6 backends.
func entries(n int) []Entry {
	out := make([]Entry, 0, n)
	for i := range n {
		c4 := netip.AddrFrom4([4]byte{192, 0, 2, byte(10 + i%200)})
		c6 := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0x0c, 14: byte(i >> 8), 15: byte(i)})
		v4, v6 := netip.MustParseAddr("203.0.113.10"), netip.MustParseAddr("2001:db8:f::10")
		b4, b6 := netip.MustParseAddr("198.51.100.11"), netip.MustParseAddr("2001:db8:100::b")
		switch i % 4 {
		case 0:
			out = append(out, Entry{KindConn, 6, netip.AddrPortFrom(c4, uint16(40000+i)), netip.AddrPortFrom(v4, 80), netip.AddrPortFrom(b4, 8765), 0})
		case 1:
			out = append(out, Entry{KindConn, 17, netip.AddrPortFrom(c6, uint16(40000+i)), netip.AddrPortFrom(v6, 53), netip.AddrPortFrom(b6, 5353), 0})
		case 2:
			out = append(out, Entry{KindAffinity, 6, netip.AddrPortFrom(c4, 0), netip.AddrPortFrom(v4, 80), netip.AddrPortFrom(b6, 8765), time.Duration(i) * time.Second})
		case 3:
			out = append(out, Entry{KindAffinity, 6, netip.AddrPortFrom(c6, 0), netip.AddrPortFrom(v6, 443), netip.AddrPortFrom(b4, 8443), 59 * time.Minute})
		}
	}
	return out
}

// TestRoundTrip: entries come back as they went, in datagrams no longer
// than MaxPayload, numbered from 1; control datagrams carry their count.
func TestRoundTrip(t *testing.T) {
	for _, n := range []int{0, 1, 4, 53, 500} {
		want := entries(n)
		enc := NewEncoder(testKey, peerA, 7)
		dgrams := enc.Encode(TypeEntries, want, t0)
		var got []Entry
		for i, d := range dgrams {
			if len(d) > MaxPayload {
				t.Fatalf("%d entries: datagram %d is %d bytes, more than %d", n, i, len(d), MaxPayload)
			}
			h, es, err := Decode(testKey, d)
			if err != nil {
				t.Fatalf("%d entries: datagram %d: %v", n, i, err)
			}
			if h.Type != TypeEntries || h.Sender != peerA || h.Epoch != 7 || h.Seq != uint64(i+1) || !h.Time.Equal(t0) || int(h.Count) != len(es) {
				t.Fatalf("%d entries: datagram %d header %+v (%d entries)", n, i, h, len(es))
			}
			got = append(got, es...)
		}
		if len(got) != n || (n > 0 && !reflect.DeepEqual(got, want)) {
			t.Fatalf("%d entries: got %d back, differing", n, len(got))
		}
		if n == 500 && len(dgrams) > 500*62/(MaxPayload-headerLen-macLen)+2 {
			t.Errorf("500 entries took %d datagrams: batching is loose", len(dgrams))
		}
		t.Logf("%d entries: %d datagrams, %d bytes", n, len(dgrams), total(dgrams))
	}
	d := NewEncoder(testKey, peerB, 1).Control(TypeDumpDone, 12, t0)
	h, es, err := Decode(testKey, d)
	if err != nil || h.Type != TypeDumpDone || h.Sender != peerB || h.Count != 12 || es != nil {
		t.Fatalf("control datagram: %+v %v %v", h, es, err)
	}
}

func total(ds [][]byte) int {
	n := 0
	for _, d := range ds {
		n += len(d)
	}
	return n
}

// TestRefused: what must not be taken is not, and each refusal is counted
// under its reason; a datagram refused changes no state (the next genuine
// one is taken).
func TestRefused(t *testing.T) {
	enc := NewEncoder(testKey, peerA, 42)
	good := enc.Encode(TypeEntries, entries(8), t0)[0]
	v := NewVerifier(testKey, []netip.AddrPort{peerA, peerB}, 30*time.Second)
	check := func(name string, from netip.AddrPort, d []byte, now time.Time, want error) {
		t.Helper()
		_, es, err := v.Check(from.Addr(), d, now)
		if !errors.Is(err, want) {
			t.Errorf("%s: got %v, want %v", name, err, want)
		}
		if err != nil && es != nil {
			t.Errorf("%s: refused, yet entries returned", name)
		}
	}
	other := NewEncoder([]byte("another key, as long as the first"), peerA, 42).Encode(TypeEntries, entries(8), t0)[0]
	check("wrong key", peerA, other, t0, ErrMAC)
	check("unknown peer", netip.MustParseAddrPort("198.51.100.99:7946"), good, t0, ErrUnknownPeer)
	check("sent 31 s ago", peerA, good, t0.Add(31*time.Second), ErrStale)
	check("sent 31 s in the future", peerA, good, t0.Add(-31*time.Second), ErrStale)
	for n := range len(good) {
		_, _, err := v.Check(peerA.Addr(), good[:n], t0)
		if err == nil {
			t.Fatalf("truncated to %d bytes: taken", n)
		}
	}
	for i := range len(good) * 8 {
		d := bytes.Clone(good)
		d[i/8] ^= 1 << (i % 8)
		if _, _, err := v.Check(peerA.Addr(), d, t0); err == nil {
			t.Fatalf("bit %d flipped: taken", i)
		}
	}
	check("genuine", peerA, good, t0, nil)
	check("replayed", peerA, good, t0.Add(time.Second), ErrReplayed)
	// A's datagram from B's address: refused, and B's own datagrams are
	// taken as before.
	check("replayed from another peer's address", peerB, good, t0, ErrSender)
	fromB := NewEncoder(testKey, peerB, 5)
	check("B's first", peerB, fromB.Encode(TypeEntries, entries(1), t0)[0], t0, nil)
	check("A names B", peerA, fromB.Encode(TypeEntries, entries(1), t0.Add(time.Second))[0], t0, ErrSender)
	check("B's next", peerB, fromB.Encode(TypeEntries, entries(1), t0)[0], t0, nil)
	r := v.Refused()
	if r["bad_mac"] == 0 || r["truncated"] == 0 || r["unknown_peer"] != 1 || r["stale"] != 2 || r["replayed"] != 1 || r["wrong_sender"] != 2 {
		t.Errorf("refusals counted: %v", r)
	}
	t.Logf("refusals: %v", r)
}

// TestReplayWindow: datagrams may arrive out of order within the window,
// each once; older ones and an earlier epoch's are refused; a restarted
// sender's new epoch is taken.
func TestReplayWindow(t *testing.T) {
	v := NewVerifier(testKey, []netip.AddrPort{peerA}, 30*time.Second)
	enc := NewEncoder(testKey, peerA, 1)
	var ds [][]byte
	for i := range 200 {
		ds = append(ds, enc.Control(TypeRequest, 0, t0.Add(time.Duration(i)*time.Millisecond)))
	}
	take := func(i int, want error) {
		t.Helper()
		if _, _, err := v.Check(peerA.Addr(), ds[i], t0.Add(time.Second)); !errors.Is(err, want) {
			t.Fatalf("datagram seq %d: got %v, want %v", i+1, err, want)
		}
	}
	take(99, nil)
	take(50, nil) // 49 below the top: in the window
	take(50, ErrReplayed)
	take(30, ErrReplayed) // 69 below: out of the window
	take(100, nil)
	take(98, nil)
	take(99, ErrReplayed)
	take(199, nil) // a jump beyond the window clears it
	take(150, nil)
	take(150, ErrReplayed)

	// The sender restarts: a new epoch, numbered from 1 again.
	enc2 := NewEncoder(testKey, peerA, 2)
	d := enc2.Control(TypeRequest, 0, t0.Add(time.Second))
	if _, _, err := v.Check(peerA.Addr(), d, t0.Add(time.Second)); err != nil {
		t.Fatalf("the new epoch: %v", err)
	}
	// The old epoch's datagrams, replayed, are refused, even unseen ones.
	take(180, ErrReplayed)
	take(10, ErrReplayed)
}

// TestForgedFlood: 100,000 random and mangled datagrams change nothing:
// every one is refused, and the genuine datagram that follows is taken.
func TestForgedFlood(t *testing.T) {
	v := NewVerifier(testKey, []netip.AddrPort{peerA}, 30*time.Second)
	enc := NewEncoder(testKey, peerA, 9)
	first := enc.Encode(TypeEntries, entries(4), t0)[0]
	if _, _, err := v.Check(peerA.Addr(), first, t0); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	tmpl := enc.Encode(TypeEntries, entries(4), t0)[0] // seq 2, never delivered
	for i := range 100_000 {
		var d []byte
		switch i % 3 {
		case 0: // random bytes
			d = make([]byte, rng.IntN(200))
			for j := range d {
				d[j] = byte(rng.Uint32())
			}
		case 1: // a genuine header, another seq and epoch, a random MAC
			d = bytes.Clone(tmpl)
			d[15] = byte(rng.Uint32())
			d[23] = byte(rng.Uint32())
			for j := len(d) - macLen; j < len(d); j++ {
				d[j] = byte(rng.Uint32())
			}
		case 2: // the delivered datagram, replayed
			d = first
		}
		if _, _, err := v.Check(peerA.Addr(), d, t0); err == nil {
			t.Fatalf("forged datagram %d taken", i)
		}
	}
	if _, _, err := v.Check(peerA.Addr(), tmpl, t0); err != nil {
		t.Fatalf("the genuine datagram after the flood: %v", err)
	}
	t.Logf("refused: %v", v.Refused())
}
