package maglev

import (
	"fmt"
	"math"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

// makeBackends returns n backends of weight 1 with IDs 1..n and keys like
// the control plane passes.
func makeBackends(tb testing.TB, n int) []Backend {
	tb.Helper()
	bs := make([]Backend, n)
	for i := range bs {
		bs[i] = Backend{
			ID:     uint32(i + 1),
			Key:    fmt.Sprintf("192.0.2.%d:8765", i+1),
			Weight: 1,
		}
	}
	return bs
}

// mustBuild builds a table or fails the test.
func mustBuild(tb testing.TB, bs []Backend, size uint32) []uint32 {
	tb.Helper()
	table, err := Build(bs, size, DefaultSeed)
	if err != nil {
		tb.Fatalf("Build(%d backends, size %d): %v", len(bs), size, err)
	}
	if uint32(len(table)) != size {
		tb.Fatalf("Build returned %d slots, want %d", len(table), size)
	}
	return table
}

// counts returns how many slots each ID owns.
func counts(table []uint32) map[uint32]int {
	c := make(map[uint32]int)
	for _, id := range table {
		c[id]++
	}
	return c
}

// changed returns the fraction of all slots whose owner differs.
func changed(a, b []uint32) float64 {
	n := 0
	for i := range a {
		if a[i] != b[i] {
			n++
		}
	}
	return float64(n) / float64(len(a))
}

func TestIsPrime(t *testing.T) {
	primes := []uint32{2, 3, 5, 7, 251, 65537, 4294967291}
	composites := []uint32{0, 1, 4, 9, 65535, 65536, 4294967295}
	for _, n := range primes {
		if !IsPrime(n) {
			t.Errorf("IsPrime(%d) = false, want true", n)
		}
	}
	for _, n := range composites {
		if IsPrime(n) {
			t.Errorf("IsPrime(%d) = true, want false", n)
		}
	}
	if !IsPrime(DefaultSize) {
		t.Errorf("DefaultSize %d is not prime", DefaultSize)
	}
	for _, n := range Sizes {
		if !IsPrime(n) {
			t.Errorf("suggested size %d is not prime", n)
		}
	}
	if !slices.IsSorted(Sizes) {
		t.Errorf("Sizes %v are not sorted", Sizes)
	}
}

func TestBuildEqualWeights(t *testing.T) {
	for _, size := range []uint32{251, DefaultSize} {
		for _, n := range []int{1, 3, 7, 100} {
			t.Run(fmt.Sprintf("M=%d/N=%d", size, n), func(t *testing.T) {
				bs := makeBackends(t, n)
				c := counts(mustBuild(t, bs, size))
				lo, hi := int(size)/n, (int(size)+n-1)/n
				if _, ok := c[0]; ok {
					t.Fatalf("%d slots left empty", c[0])
				}
				if len(c) != n {
					t.Fatalf("table holds %d IDs, want %d", len(c), n)
				}
				for _, b := range bs {
					if got := c[b.ID]; got < lo || got > hi {
						t.Errorf("backend %d owns %d slots, want %d or %d", b.ID, got, lo, hi)
					}
				}
			})
		}
	}
}

func TestBuildWeights(t *testing.T) {
	// The fill gives each backend its share of the turns to within one
	// turn, so a share comes out within a slot or two of exact whatever
	// the weights. Measured at M=65537: at most 1.3 slots off in any case
	// below; relatively at most 0.14% (the 649 slots of weight 1 next to
	// weight 100), and 0.4 slots (0.005%) for weights 1,2,3,4.
	const tolerance = 2 // slots
	cases := []struct {
		name    string
		weights []uint32
	}{
		{"1,2,3,4", []uint32{1, 2, 3, 4}},
		{"100,1", []uint32{100, 1}},
		{"1,1,1,5", []uint32{1, 1, 1, 5}},
		{"10,20,30,0", []uint32{10, 20, 30, 0}},
		{"max", []uint32{math.MaxUint32, math.MaxUint32 / 2, 1 << 30}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			bs := makeBackends(t, len(tc.weights))
			var total float64
			for i, w := range tc.weights {
				bs[i].Weight = w
				total += float64(w)
			}
			c := counts(mustBuild(t, bs, DefaultSize))
			worst, worstRel := 0.0, 0.0
			for _, b := range bs {
				want := float64(DefaultSize) * float64(b.Weight) / total
				got := float64(c[b.ID])
				if b.Weight == 0 {
					if got != 0 {
						t.Errorf("backend %d of weight 0 owns %v slots", b.ID, got)
					}
					continue
				}
				off := math.Abs(got - want)
				worst, worstRel = max(worst, off), max(worstRel, off/want)
				if off > tolerance {
					t.Errorf("backend %d (weight %d) owns %v slots, want %.1f (off by %.3f%%)",
						b.ID, b.Weight, got, want, 100*off/want)
				}
			}
			t.Logf("weights %s: worst share %.2f slots off (%.4f%%)", tc.name, worst, 100*worstRel)
		})
	}
}

func TestBuildEmpty(t *testing.T) {
	zeroWeights := makeBackends(t, 3)
	for i := range zeroWeights {
		zeroWeights[i].Weight = 0
	}
	for name, bs := range map[string][]Backend{
		"nil":          nil,
		"zero weights": zeroWeights,
	} {
		t.Run(name, func(t *testing.T) {
			table := mustBuild(t, bs, 251)
			if c := counts(table); c[0] != 251 {
				t.Errorf("table has %d slots of ID 0, want all 251 (%v)", c[0], c)
			}
		})
	}
}

// TestBuildDisruption removes or adds one backend and measures the fraction
// of all slots that change owner. The ideal is 1/N on removal (exactly the
// removed backend's slots) and 1/(N+1) on addition (exactly the new
// backend's). Maglev moves more, because the backends that remain take their
// turns in a different order and reshuffle some slots among themselves; the
// excess grows with N²/M, which is why the paper wants M well above 100·N.
func TestBuildDisruption(t *testing.T) {
	// Each bound is the ratio moved/ideal allowed. Measured over seeds
	// 0-7, every removal position and an added backend, the worst ratios
	// were: M=65537: N=3 1.006, N=5 1.011, N=10 1.042, N=100 1.613;
	// M=1048573: N=100 1.132.
	cases := []struct {
		n     int
		size  uint32
		bound float64
	}{
		{3, DefaultSize, 1.05},
		{5, DefaultSize, 1.05},
		{10, DefaultSize, 1.10},
		{100, DefaultSize, 1.75},
		{100, 1048573, 1.20},
	}
	for _, tc := range cases {
		n, size := tc.n, tc.size
		t.Run(fmt.Sprintf("M=%d/N=%d", size, n), func(t *testing.T) {
			bs := makeBackends(t, n)
			before := mustBuild(t, bs, size)

			// Remove one from the middle of the key order.
			gone := bs[n/2]
			fewer := slices.Delete(slices.Clone(bs), n/2, n/2+1)
			after := mustBuild(t, fewer, size)
			ideal := 1 / float64(n)
			got := changed(before, after)
			t.Logf("M=%d remove 1 of %d: %.4f of slots moved (ideal %.4f, ratio %.3f)", size, n, got, ideal, got/ideal)
			if got > ideal*tc.bound {
				t.Errorf("removing 1 of %d moved %.4f of slots, want <= %.4f", n, got, ideal*tc.bound)
			}
			for i := range before {
				if before[i] == gone.ID && after[i] == gone.ID {
					t.Fatalf("slot %d still belongs to removed backend %d", i, gone.ID)
				}
			}

			// Add one.
			extra := Backend{ID: uint32(n + 1), Key: fmt.Sprintf("198.51.100.%d:8765", n+1), Weight: 1}
			more := append(slices.Clone(bs), extra)
			after = mustBuild(t, more, size)
			ideal = 1 / float64(n+1)
			got = changed(before, after)
			t.Logf("M=%d add 1 to %d: %.4f of slots moved (ideal %.4f, ratio %.3f)", size, n, got, ideal, got/ideal)
			if got > ideal*tc.bound {
				t.Errorf("adding 1 to %d moved %.4f of slots, want <= %.4f", n, got, ideal*tc.bound)
			}
		})
	}
}

func TestBuildOrderIndependent(t *testing.T) {
	bs := makeBackends(t, 50)
	for i := range bs {
		bs[i].Weight = uint32(1 + i%4)
	}
	orig := slices.Clone(bs)
	want := mustBuild(t, bs, 4099)
	if !slices.Equal(bs, orig) {
		t.Fatalf("Build reordered or changed its input")
	}
	r := rand.New(rand.NewPCG(1, 2))
	for range 5 {
		shuffled := slices.Clone(bs)
		r.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		if got := mustBuild(t, shuffled, 4099); !slices.Equal(got, want) {
			t.Fatalf("table differs for order %v", shuffled)
		}
	}
}

func TestBuildSeed(t *testing.T) {
	bs := makeBackends(t, 10)
	a := mustBuild(t, bs, 4099)
	b, err := Build(bs, 4099, DefaultSeed+1)
	if err != nil {
		t.Fatal(err)
	}
	if slices.Equal(a, b) {
		t.Errorf("tables for seeds %#x and %#x are identical", DefaultSeed, DefaultSeed+1)
	}
}

func TestBuildErrors(t *testing.T) {
	good := makeBackends(t, 3)
	with := func(f func(bs []Backend)) []Backend {
		bs := slices.Clone(good)
		f(bs)
		return bs
	}
	cases := []struct {
		name     string
		backends []Backend
		size     uint32
		want     string
	}{
		{"size not prime", good, 65536, "maglev: table size 65536 is not prime"},
		{"size zero", good, 0, "maglev: table size 0 is not prime"},
		{"size one", nil, 1, "maglev: table size 1 is not prime"},
		{"size below backends", makeBackends(t, 3), 2, "maglev: table size 2 is smaller than the number of backends (3)"},
		{"duplicate key", with(func(bs []Backend) { bs[2].Key = bs[0].Key }), 251, `maglev: duplicate backend key "192.0.2.1:8765"`},
		{"duplicate ID", with(func(bs []Backend) { bs[2].ID = bs[0].ID }), 251, "maglev: backends \"192.0.2.1:8765\" and \"192.0.2.3:8765\" have the same ID 1"},
		{"ID 0", with(func(bs []Backend) { bs[1].ID = 0 }), 251, `maglev: backend "192.0.2.2:8765" has ID 0`},
		{"ID 0 weight 0", with(func(bs []Backend) { bs[1].ID, bs[1].Weight = 0, 0 }), 251, `has ID 0`},
		{"empty key", with(func(bs []Backend) { bs[1].Key = "" }), 251, "maglev: backend with ID 2 has an empty key"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			table, err := Build(tc.backends, tc.size, DefaultSeed)
			if err == nil {
				t.Fatalf("Build succeeded with %d slots, want error %q", len(table), tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestLookup(t *testing.T) {
	table := mustBuild(t, makeBackends(t, 3), 251)
	for _, h := range []uint32{0, 250, 251, 1000, math.MaxUint32} {
		if got, want := Lookup(table, h), table[h%251]; got != want {
			t.Errorf("Lookup(table, %d) = %d, want %d", h, got, want)
		}
	}
	if got := Lookup(nil, 7); got != 0 {
		t.Errorf("Lookup(nil, 7) = %d, want 0", got)
	}
}

// TestHashKeyMurmur3 checks hashKey against published MurmurHash3_x86_32
// vectors. Only keys whose length is a multiple of four are listed: for those
// hashKey is the reference algorithm.
func TestHashKeyMurmur3(t *testing.T) {
	cases := []struct {
		key  string
		seed uint32
		want uint32
	}{
		{"", 0, 0},
		{"", 1, 0x514e28b7},
		{"", 0xffffffff, 0x81f16f39},
		{"\x00\x00\x00\x00", 0, 0x2362f9de},
		{"\xff\xff\xff\xff", 0, 0x76293b50},
		{"\x21\x43\x65\x87", 0, 0xf55b516b},
		{"\x21\x43\x65\x87", 0x5082edee, 0x2362f9de},
		{"aaaa", 0x9747b28c, 0x5a97808a},
		{"abcd", 0x9747b28c, 0xf0478627},
	}
	for _, tc := range cases {
		if got := hashKey(tc.seed, tc.key); got != tc.want {
			t.Errorf("murmur3_32(%q, %#x) = %#08x, want %#08x", tc.key, tc.seed, got, tc.want)
		}
	}
	// Keys that differ only in trailing zero bytes hash differently: the
	// length goes into the hash.
	if hashKey(0, "a") == hashKey(0, "a\x00") {
		t.Errorf("hashKey ignores the key length")
	}
}

// TestFlowHashGolden pins the flow hash. These values are what the XDP
// program computes too; a change here breaks every pinned ring and every
// host that runs the old version, so it must be deliberate.
func TestFlowHashGolden(t *testing.T) {
	cases := []struct {
		addr                string
		source0, sourceSeed uint32 // SourceHash with seed 0 and DefaultSeed
		connTCP443, connUDP uint32 // ConnHash with DefaultSeed
	}{
		{"192.0.2.1", 0x7467553c, 0xd3fe5eaa, 0x07be798b, 0x455076a9},
		{"198.51.100.42", 0xa98f28ba, 0x1210f534, 0x6cd93b31, 0xfd222472},
		{"::ffff:192.0.2.1", 0x7467553c, 0xd3fe5eaa, 0x07be798b, 0x455076a9},
		{"2001:db8::1", 0xbc42cf98, 0x48933f11, 0xf145ddab, 0x7a4ff16a},
		{"2001:db8:85a3::8a2e:370:7334", 0x81bc82e0, 0xfd3827d5, 0x612043ad, 0xefd62d75},
	}
	for _, tc := range cases {
		a := netip.MustParseAddr(tc.addr)
		if got := SourceHash(0, a); got != tc.source0 {
			t.Errorf("SourceHash(0, %s) = %#08x, want %#08x", a, got, tc.source0)
		}
		if got := SourceHash(DefaultSeed, a); got != tc.sourceSeed {
			t.Errorf("SourceHash(DefaultSeed, %s) = %#08x, want %#08x", a, got, tc.sourceSeed)
		}
		if got := ConnHash(DefaultSeed, a, 51234, 443, 6); got != tc.connTCP443 {
			t.Errorf("ConnHash(DefaultSeed, %s, 51234, 443, tcp) = %#08x, want %#08x", a, got, tc.connTCP443)
		}
		if got := ConnHash(DefaultSeed, a, 40000, 8765, 17); got != tc.connUDP {
			t.Errorf("ConnHash(DefaultSeed, %s, 40000, 8765, udp) = %#08x, want %#08x", a, got, tc.connUDP)
		}
	}
}

// TestFlowHashIsMurmur3 checks that the flow hashes are MurmurHash3_x86_32
// of the bytes the datapath keys on: the address in 16 bytes (IPv4 followed
// by zeros), then for ConnHash the two ports big-endian and the protocol in
// a zero-padded word.
func TestFlowHashIsMurmur3(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for range 1000 {
		var b [16]byte
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		addrs := []netip.Addr{netip.AddrFrom16(b), netip.AddrFrom4([4]byte(b[:4]))}
		for _, a := range addrs {
			key := b
			if a.Is4() {
				clear(key[4:])
			}
			seed, cp, sp, proto := r.Uint32(), uint16(r.Uint32()), uint16(r.Uint32()), uint8(r.Uint32())
			if got, want := SourceHash(seed, a), hashKey(seed, string(key[:])); got != want {
				t.Fatalf("SourceHash(%#x, %s) = %#08x, murmur3 = %#08x", seed, a, got, want)
			}
			conn := string(key[:]) + string([]byte{byte(cp >> 8), byte(cp), byte(sp >> 8), byte(sp), proto, 0, 0, 0})
			if got, want := ConnHash(seed, a, cp, sp, proto), hashKey(seed, conn); got != want {
				t.Fatalf("ConnHash(%#x, %s, %d, %d, %d) = %#08x, murmur3 = %#08x", seed, a, cp, sp, proto, got, want)
			}
		}
	}
}

func BenchmarkBuild(b *testing.B) {
	for _, n := range []int{10, 100, 1000} {
		b.Run(fmt.Sprintf("M=%d/N=%d", DefaultSize, n), func(b *testing.B) {
			bs := makeBackends(b, n)
			b.ReportAllocs()
			for b.Loop() {
				if _, err := Build(bs, DefaultSize, DefaultSeed); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run(fmt.Sprintf("M=%d/N=100/weighted", DefaultSize), func(b *testing.B) {
		bs := makeBackends(b, 100)
		for i := range bs {
			bs[i].Weight = uint32(1 + i%10)
		}
		b.ReportAllocs()
		for b.Loop() {
			if _, err := Build(bs, DefaultSize, DefaultSeed); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func TestIsPrimeAgainstTrialDivision(t *testing.T) {
	primes := map[uint32]bool{2: true, 3: true, 251: true, 65537: true, 1048573: true}
	for n := range uint32(300) {
		want := n >= 2
		for d := uint32(2); d < n; d++ {
			if n%d == 0 {
				want = false
				break
			}
		}
		if IsPrime(n) != want {
			t.Errorf("IsPrime(%d) = %v", n, !want)
		}
	}
	for n := range primes {
		if !IsPrime(n) {
			t.Errorf("IsPrime(%d) = false", n)
		}
	}
	for _, n := range []uint32{65536, 1048575, 1048576, 65535} {
		if IsPrime(n) {
			t.Errorf("IsPrime(%d) = true", n)
		}
	}
}
