package bpf_test

import (
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tetherlb/tether/internal/bpftest"
	"github.com/tetherlb/tether/maps"
)

// spoofed is the i-th source of a flood: random addresses and ports of
// 203.0.113.0/24 and 198.51.100.0/24 that no established flow of these
// tests uses (those come from 192.0.2.0/24).
func spoofed(rnd *rand.Rand) netip.AddrPort {
	nets := [][3]byte{{203, 0, 113}, {198, 51, 100}}
	n := nets[rnd.UintN(2)]
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{n[0], n[1], n[2], byte(rnd.UintN(256))}), uint16(rnd.UintN(64511)+1024))
}

// TestACKFloodKeepsEstablished fills a connection table of 4,096 entries
// with 1,000 established flows, then sends ten times the table's size in
// spoofed ACKs of random 5-tuples. With the insertion guard (1,000 new
// flows a second on each CPU) every flood packet is
// still forwarded, to the backend its bare SYN gets from the ring, but
// only the guard's share is recorded, and every established flow keeps its
// entry. Without the guard the same flood evicts them: the test can tell.
func TestACKFloodKeepsEstablished(t *testing.T) {
	for _, rate := range []uint32{1000, 0} {
		name := "guard"
		if rate == 0 {
			name = "no guard"
		}
		t.Run(name, func(t *testing.T) {
			opts := loaderOptsSized(4096, 4096)
			opts.InsertRate = rate
			f := bpftest.NewFixture(t, opts)
			s := bpftest.Service{ID: 1, VIP: vip4, Proto: bpftest.TCP, Source: true, Backends: []uint32{1, 2, 3}}
			f.AddService(s)
			const established = 1000
			begin := time.Now()
			want := map[netip.AddrPort]uint32{}
			for i := range established {
				src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(i % 250)}), uint16(10000+i))
				want[src] = backendFor(t, f, s, src, bpftest.ACK)
			}
			if n, _, err := f.Maps.Entries(); err != nil || n != established {
				t.Fatalf("%d entries after %d established flows (%v)", n, established, err)
			}
			before := reasons(t, f)
			rnd := rand.New(rand.NewPCG(5, 6))
			const flood = 10 * 4096
			start := time.Now()
			for i := range flood {
				src := spoofed(rnd)
				b := backendFor(t, f, s, src, bpftest.ACK)
				if i%64 == 0 {
					if ring := backendFor(t, f, s, src, bpftest.SYN); ring != b {
						t.Fatalf("flood packet %d from %s went to backend %d, its SYN to %d", i, src, b, ring)
					}
				}
			}
			elapsed := time.Since(start)
			after := reasons(t, f)
			entries, _, err := f.Maps.Entries()
			must(t, err)
			kept := 0
			for src, b := range want {
				fl, ok, err := f.Maps.LookupFlow(src, vip4, bpftest.TCP)
				must(t, err)
				if ok && fl.Backend == b {
					kept++
				}
			}
			unrecorded := after["guard_unrecorded"] - before["guard_unrecorded"]
			t.Logf("%d spoofed ACKs in %v: %d unrecorded (guard_unrecorded), %d entries in the table, %d of %d established flows kept theirs",
				flood, elapsed.Round(time.Millisecond), unrecorded, entries, kept, established)
			if rate == 0 {
				if unrecorded != 0 {
					t.Errorf("no guard, yet %d packets went unrecorded", unrecorded)
				}
				if kept > established/10 {
					t.Errorf("without the guard %d of %d established entries survived a flood of %d: the test cannot tell", kept, established, flood)
				}
				return
			}
			if kept != established {
				t.Errorf("%d of %d established flows lost their entry to the flood", established-kept, established)
			}
			// Every flow recorded since the first established one came out
			// of a one-second window of at most rate insertions of the CPU
			// the run was on.
			cpus, err := ebpf.PossibleCPU()
			must(t, err)
			total := time.Since(begin)
			if windows := int(total/time.Second) + 1; entries > int(rate)*windows*cpus {
				t.Errorf("%d entries recorded in %v on %d CPUs, more than %d a second each", entries, total, cpus, rate)
			}
			// A flood packet was recorded, unrecorded, or found a flood
			// flow recorded before it (random 5-tuples repeat).
			if recorded := uint64(entries - established); recorded+unrecorded > flood || unrecorded < flood/2 {
				t.Errorf("%d flood flows recorded and %d unrecorded of %d", recorded, unrecorded, flood)
			}
		})
	}
}

// TestGuardDropsNATFlood: past the guard a new nat or fullnat flow cannot
// be forwarded (it needs its translation entered), so it is dropped and
// counted, and the tables keep what they had; a new client's handshake
// goes through again in the next second.
func TestGuardDropsNATFlood(t *testing.T) {
	for name, mode := range map[string]uint8{"nat": maps.ForwardNAT, "fullnat": maps.ForwardFullNAT} {
		t.Run(name, func(t *testing.T) {
			opts := loaderOpts()
			opts.InsertRate = 100
			f := bpftest.NewFixture(t, opts)
			s := bpftest.Service{ID: 1, VIP: vip4, Proto: bpftest.TCP, Backends: []uint32{1, 2},
				Forwarding: mode, BackendPort: backendPort, SNAT: snat4}
			f.AddService(s)
			rnd := rand.New(rand.NewPCG(7, 8))
			const flood = 5000
			var tx, dropped int
			start := time.Now()
			for range flood {
				switch verdict, _ := f.Run(bpftest.Frame{Src: spoofed(rnd), Dst: s.VIP, Proto: bpftest.TCP, Flags: bpftest.ACK}.Bytes()); verdict {
				case bpftest.XDPTx:
					tx++
				case bpftest.XDPDrop:
					dropped++
				default:
					t.Fatalf("verdict %d for a spoofed ACK", verdict)
				}
			}
			windows := int(time.Since(start)/time.Second) + 1
			cpus, err := ebpf.PossibleCPU()
			must(t, err)
			r := reasons(t, f)
			conns, _, err := f.Maps.Entries()
			must(t, err)
			t.Logf("%d spoofed ACKs: %d forwarded and entered, %d dropped (drop_guard %d), %d connection entries", flood, tx, dropped, r["drop_guard"], conns)
			if tx == 0 || tx > 100*windows*cpus || uint64(dropped) != r["drop_guard"] || conns != tx {
				t.Fatalf("want at most %d forwarded (100 a second on each of %d CPUs), each entered, the rest dropped as drop_guard", 100*windows*cpus, cpus)
			}
			time.Sleep(1100 * time.Millisecond) // the next second's insertions
			fresh := netip.AddrPortFrom(cli4.Addr(), 42001)
			for _, flags := range []uint8{bpftest.SYN, bpftest.ACK} {
				if verdict, _ := f.Run(bpftest.Frame{Src: fresh, Dst: s.VIP, Proto: bpftest.TCP, Flags: flags}.Bytes()); verdict != bpftest.XDPTx {
					t.Fatalf("new client after the flood, flags %#x: verdict %d", flags, verdict)
				}
			}
		})
	}
}
