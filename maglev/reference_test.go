package maglev

import (
	"cmp"
	"fmt"
	"hash/fnv"
	"slices"
	"testing"
)

// referenceBuild is Build as the Maglev fill reads plainly: every turn walks
// the backend's permutation over the table itself, slot by slot, to the end.
// Build's shortcuts must give the very same table: rings are compared
// between hosts and across versions (an adopted ring is kept when it equals
// the one built).
func referenceBuild(backends []Backend, size, seed uint32) []uint32 {
	sorted := slices.Clone(backends)
	slices.SortFunc(sorted, func(a, b Backend) int { return cmp.Compare(a.Key, b.Key) })
	table := make([]uint32, size)
	type walker struct {
		id, next, skip        uint32
		weight, credit, turns uint64
	}
	var ws []walker
	var mw uint64
	for _, b := range sorted {
		if b.Weight == 0 {
			continue
		}
		mw = max(mw, uint64(b.Weight))
		ws = append(ws, walker{id: b.ID, weight: uint64(b.Weight),
			next: hashKey(seed, b.Key) % size, skip: hashKey(seed^skipSeedXor, b.Key)%(size-1) + 1})
	}
	if len(ws) == 0 {
		return table
	}
	for filled := uint32(0); filled < size; {
		for i := range ws {
			w := &ws[i]
			if w.credit += w.weight; w.credit < mw {
				continue
			}
			w.credit -= mw
			for table[w.next] != 0 {
				w.next = (w.next + w.skip) % size
			}
			table[w.next] = w.id
			if filled++; filled == size {
				break
			}
		}
	}
	return table
}

func TestBuildIsReference(t *testing.T) {
	for _, size := range []uint32{251, 257, 4099, 65537} {
		for _, n := range []int{1, 2, 3, 10, 100, 250} {
			if n > int(size) {
				continue
			}
			for _, weighted := range []bool{false, true} {
				bs := makeBackends(t, n)
				if weighted {
					for i := range bs {
						bs[i].Weight = uint32(i%7) * 3 // some 0
					}
				}
				for _, seed := range []uint32{DefaultSeed, 7} {
					got, err := Build(bs, size, seed)
					if err != nil {
						t.Fatal(err)
					}
					if want := referenceBuild(bs, size, seed); !slices.Equal(got, want) {
						t.Fatalf("size %d, %d backends, weighted %v, seed %d: Build differs from the reference", size, n, weighted, seed)
					}
				}
			}
		}
	}
}

// TestBuildGolden pins one table: a change to it moves connections between
// hosts of different versions and is a protocol change, not a refactoring.
func TestBuildGolden(t *testing.T) {
	bs := makeBackends(t, 10)
	bs[3].Weight = 3
	h := fnv.New64a()
	for _, id := range mustBuild(t, bs, DefaultSize) {
		fmt.Fprintf(h, "%d,", id)
	}
	if got, want := h.Sum64(), uint64(0x87234ec598999ab5); got != want {
		t.Fatalf("table digest %#x, want %#x", got, want)
	}
}
