package bpf_test

import (
	"math/rand/v2"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/internal/bpftest"
	"github.com/tetherlb/tether/internal/lab"
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

// onOneCPU keeps the calling goroutine on one OS thread and that thread
// on one CPU until the test ends, so that every test run of the program
// meets the same per-CPU insertion window.
func onOneCPU(t *testing.T) {
	runtime.LockOSThread()
	var was, one unix.CPUSet
	must(t, unix.SchedGetaffinity(0, &was))
	for cpu := range 1024 {
		if was.IsSet(cpu) {
			one.Set(cpu)
			break
		}
	}
	must(t, unix.SchedSetaffinity(0, &one))
	t.Cleanup(func() {
		// A thread that stays pinned is not handed back to the runtime:
		// it ends with the goroutine.
		if unix.SchedSetaffinity(0, &was) == nil {
			runtime.UnlockOSThread()
		}
	})
}

// TestACKFloodKeepsEstablished fills a connection table of 4,096 entries
// with 1,000 established flows, then sends ten times its size in spoofed
// ACKs of random 5-tuples, on one CPU. With the insertion guard (250 new
// flows a second) every flood packet is still forwarded, to the backend
// its bare SYN gets from the ring, but only the guard's share is
// recorded, and every established flow keeps its entry. Without the guard
// the same flood evicts them: the test can tell.
func TestACKFloodKeepsEstablished(t *testing.T) {
	for _, rate := range []uint32{250, 0} {
		name := "guard"
		if rate == 0 {
			name = "no guard"
		}
		t.Run(name, func(t *testing.T) {
			onOneCPU(t)
			opts := loaderOptsSized(4096, 4096)
			opts.InsertRate = rate
			f := bpftest.NewFixture(t, opts)
			s := bpftest.Service{ID: 1, VIP: vip4, Proto: bpftest.TCP, Backends: []uint32{1, 2, 3}}
			f.AddService(s)
			// The established flows are entered as another host's would
			// be (the guard bounds only the program's insertions), on the
			// backend the ring gives them.
			const established = 1000
			want := map[netip.AddrPort]uint32{}
			for i := range established {
				src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(i % 250)}), uint16(10000+i))
				b := backendFor(t, f, s, src, bpftest.SYN)
				if _, err := f.Maps.PutFlow(maps.Flow{Client: src, VIP: vip4, Proto: bpftest.TCP, Service: s.ID, Backend: b}, false); err != nil {
					t.Fatal(err)
				}
				want[src] = b
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
			// Every flood flow recorded came out of a one-second window
			// of at most rate insertions; a flood packet was recorded,
			// unrecorded, or found a flood flow recorded before it
			// (random 5-tuples repeat).
			recorded := uint64(entries - established)
			if windows := uint64(elapsed/time.Second) + 2; recorded > uint64(rate)*windows {
				t.Errorf("%d flood flows recorded in %v, more than %d a second", recorded, elapsed, rate)
			}
			if recorded+unrecorded > flood || recorded+unrecorded < flood-flood/100 {
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
			cpus := lab.OnlineCPUs(t)
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
