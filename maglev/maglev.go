package maglev

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"slices"
)

// DefaultSize is the number of slots in a table unless configured otherwise.
// It is prime, as every table size must be, and large enough that 100
// backends of equal weight differ by at most one slot in 655 (0.15%).
const DefaultSize uint32 = 65537

// Sizes are suggested table sizes, all prime, smallest first. Maglev wants a
// size well above the number of backends (the paper uses M > 100·N) so that
// both the balance and the disruption on a change stay close to ideal: with
// 100 backends, removing one moves 1.55% of the slots at 65537 and 1.1% at
// 1048573, against the ideal 1%.
var Sizes = []uint32{251, 4099, 16381, 65537, 131071, 262139, 1048573}

// skipSeedXor turns the caller's seed into a second, different seed for the
// hash that gives a backend its skip. Any non-zero constant would do; this
// one is the 32-bit golden ratio.
const skipSeedXor = 0x9e3779b9

// Backend is one member of the set a table is built from.
type Backend struct {
	// ID is the value written into the backend's slots, the index the
	// datapath uses to find the backend. 0 means "no backend" and is
	// refused.
	ID uint32
	// Key is the backend's stable identity, such as "192.0.2.11:8765". It
	// alone decides where the backend's slots fall, so a backend keeps
	// its slots across rebuilds as long as its Key does not change.
	Key string
	// Weight is the backend's share of the slots relative to the others:
	// weight 2 gets about twice the slots of weight 1. Weight 0 gets none
	// (a drained backend).
	Weight uint32
}

// IsPrime reports whether n is a prime number.
func IsPrime(n uint32) bool {
	if n < 2 {
		return false
	}
	if n%2 == 0 {
		return n == 2
	}
	for d := uint64(3); d*d <= uint64(n); d += 2 {
		if uint64(n)%d == 0 {
			return false
		}
	}
	return true
}

// Build returns the Maglev table of size slots for backends: each slot holds
// the ID of the backend that owns it. The datapath sends a flow to
// table[hash % size].
//
// The table depends only on the set of backends, size and seed, never on the
// order of backends, so every host that builds it from the same inputs gets
// the same table. Each backend owns a share of the slots in proportion to its
// Weight; with equal weights every backend gets ⌊size/N⌋ or ⌈size/N⌉ slots.
// Removing one of N backends moves its 1/N of the slots plus a few more,
// fewer the larger size is against N (see [Sizes]). An empty set, or one where every weight is 0,
// gives a table of zeros ("no backend").
//
// Build refuses a size that is not prime or is smaller than len(backends), a
// backend with ID 0 or an empty Key, and two backends with the same ID or the
// same Key. The returned slice is new and owned by the caller.
func Build(backends []Backend, size uint32, seed uint32) ([]uint32, error) {
	if !IsPrime(size) {
		return nil, fmt.Errorf("maglev: table size %d is not prime (suggested sizes: %v)", size, Sizes)
	}
	if uint64(size) < uint64(len(backends)) {
		return nil, fmt.Errorf("maglev: table size %d is smaller than the number of backends (%d)", size, len(backends))
	}

	sorted := slices.Clone(backends)
	slices.SortFunc(sorted, func(a, b Backend) int { return cmp.Compare(a.Key, b.Key) })
	ids := make(map[uint32]string, len(sorted))
	var maxWeight uint32
	for i, b := range sorted {
		if b.Key == "" {
			return nil, fmt.Errorf("maglev: backend with ID %d has an empty key", b.ID)
		}
		if i > 0 && sorted[i-1].Key == b.Key {
			return nil, fmt.Errorf("maglev: duplicate backend key %q", b.Key)
		}
		if b.ID == 0 {
			return nil, fmt.Errorf("maglev: backend %q has ID 0, which means \"no backend\"", b.Key)
		}
		if other, ok := ids[b.ID]; ok {
			return nil, fmt.Errorf("maglev: backends %q and %q have the same ID %d", other, b.Key, b.ID)
		}
		ids[b.ID] = b.Key
		maxWeight = max(maxWeight, b.Weight)
	}

	table := make([]uint32, size)
	if maxWeight == 0 {
		return table, nil
	}

	// Each backend walks its own permutation of the slots: offset,
	// offset+skip, offset+2·skip, … mod size. size is prime and skip is in
	// [1, size-1], so the walk visits every slot once before repeating.
	type walker struct {
		id     uint32
		weight uint64
		next   uint32 // the next slot of the permutation to try
		skip   uint32
		credit uint64
		// steps holds, once the walk has stopped, how many steps
		// ahead each of the free slots left is.
		steps []uint32
	}
	walkers := make([]walker, 0, len(sorted))
	for _, b := range sorted {
		if b.Weight == 0 {
			continue
		}
		walkers = append(walkers, walker{
			id:     b.ID,
			weight: uint64(b.Weight),
			next:   hashKey(seed, b.Key) % size,
			skip:   hashKey(seed^skipSeedXor, b.Key)%(size-1) + 1,
		})
	}

	// Fill in rounds. Every round each backend earns its weight in credit
	// and takes a turn, claiming the next free slot of its permutation,
	// when it holds maxWeight of credit. The heaviest backends take a turn
	// every round and a backend of half their weight every other round,
	// so turns, hence slots, follow the weights. The heaviest backend
	// fills at least one slot per round, so the loop ends after at most
	// size rounds.
	//
	// A walk steps over taken slots, more of them the fuller the table:
	// claiming one of the last F free slots takes size/F steps on
	// average, so the last few hundred slots would cost as many steps as
	// all the others. The walks step over a bitmap of the taken slots
	// (size/8 bytes, which stay in the CPU's nearest cache) and, for the
	// last tailSlots slots, stop walking: a backend then claims, of the
	// free slots left, the one its walk would reach first, computed from
	// how many steps away each is. Both give the same table.
	taken := make([]uint64, (size+63)/64)
	mw := uint64(maxWeight)
	free := size
	tail := min(tailSlots, size)
	var left []uint32 // the free slots, once free <= tail
	var counted []int // the walkers with steps
	for free > 0 {
		for i := range walkers {
			w := &walkers[i]
			w.credit += w.weight
			if w.credit < mw {
				continue
			}
			w.credit -= mw
			next := w.next
			if left == nil {
				skip := w.skip
				for taken[next/64]&(1<<(next%64)) != 0 {
					// next = (next + skip) mod size without a branch:
					// whether the walk wraps is a coin toss the CPU
					// cannot predict. d is negative as an int32 when it
					// does not (size < 2^30, so next+skip fits).
					d := next + skip - size
					next = d + size&uint32(int32(d)>>31)
				}
				taken[next/64] |= 1 << (next % 64)
			} else {
				// The free slot fewest steps ahead: slot s is
				// (s - next)·skip⁻¹ mod size steps away, counted once
				// per backend, at its first turn here; the counts stay
				// in step with left as slots go.
				if w.steps == nil {
					inverse := modInverse(uint64(w.skip), uint64(size))
					w.steps = make([]uint32, len(left), tail)
					for k, s := range left {
						w.steps[k] = uint32((uint64(s) + uint64(size) - uint64(next)) * inverse % uint64(size))
					}
					counted = append(counted, i)
				}
				best := 0
				for k, n := range w.steps {
					if n < w.steps[best] {
						best = k
					}
				}
				next = left[best]
				last := len(left) - 1
				left[best] = left[last]
				left = left[:last]
				for _, j := range counted {
					c := walkers[j].steps
					c[best] = c[last]
					walkers[j].steps = c[:last]
				}
			}
			w.next = next
			table[next] = w.id
			if free--; free == 0 {
				break
			}
			if free == tail && left == nil {
				left = make([]uint32, 0, tail)
				for s := range size {
					if taken[s/64]&(1<<(s%64)) == 0 {
						left = append(left, s)
					}
				}
			}
		}
	}
	return table, nil
}

// tailSlots is how many free slots Build fills without walking. Claiming
// one of them this way costs a step per free slot instead of size/free
// steps; 256 is about where the two meet for the default size.
const tailSlots = 512

// modInverse is a⁻¹ mod p for a prime p that does not divide a: a^(p-2)
// (Fermat). p is below 2^32, so products fit in 64 bits.
func modInverse(a, p uint64) uint64 {
	r, e := uint64(1), p-2
	for a %= p; e > 0; e >>= 1 {
		if e&1 == 1 {
			r = r * a % p
		}
		a = a * a % p
	}
	return r
}

// Lookup returns the backend ID that table gives a flow with hash: the slot
// at hash % len(table), as the datapath reads it. It returns 0 ("no
// backend") for an empty table.
func Lookup(table []uint32, hash uint32) uint32 {
	if len(table) == 0 {
		return 0
	}
	return table[hash%uint32(len(table))]
}

// hashKey hashes a backend key with the flow hash's mixing: MurmurHash3
// (x86, 32-bit) over the key's bytes as little-endian words, the last word
// padded with zero bytes. For a key whose length is a multiple of four this is
// exactly MurmurHash3_x86_32; for other lengths the tail differs from the
// reference algorithm, which does not matter because only Go hashes keys.
func hashKey(seed uint32, key string) uint32 {
	h := seed
	n := len(key)
	for len(key) >= 4 {
		w := uint32(key[0]) | uint32(key[1])<<8 | uint32(key[2])<<16 | uint32(key[3])<<24
		h = mixWord(h, w)
		key = key[4:]
	}
	if len(key) > 0 {
		var tail [4]byte
		copy(tail[:], key)
		h = mixWord(h, binary.LittleEndian.Uint32(tail[:]))
	}
	return finish(h, uint32(n))
}
