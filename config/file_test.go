package config

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// manyServices is a configuration of n services of a few backends each,
// with a multi-line health string on some.
func manyServices(n int) *Config {
	c := Default()
	c.Interfaces = []string{"eth0"}
	for k := range n {
		s := DefaultService()
		s.Name = fmt.Sprintf("svc-%d", k)
		s.VIP = netip.AddrFrom4([4]byte{203, 0, 113, byte(1 + k%200)})
		s.Port = uint16(1000 + k/200)
		if k%7 == 3 {
			s.Health.Type, s.Health.Path, s.Health.Send = "websocket", "/", "ping\n\n  pong\n"
		}
		for i := range 1 + k%3 {
			s.Backends = append(s.Backends, Backend{Address: netip.AddrFrom4([4]byte{198, 51, 100, byte(10 + i + k%50)}), Port: s.Port, Weight: 1, State: StateActive})
		}
		c.Services = append(c.Services, s)
	}
	return c
}

// serviceLines returns the offsets of the lines that begin services in a
// file Marshal wrote.
func serviceLines(data []byte) []int {
	var out []int
	for i := 0; i < len(data); {
		if bytes.HasPrefix(data[i:], []byte("  - name: ")) {
			out = append(out, i)
		}
		j := bytes.IndexByte(data[i:], '\n')
		if j < 0 {
			break
		}
		i += j + 1
	}
	return out
}

// edit is one change to a file's text, as an operator's editor makes it.
type edit struct {
	name string
	do   func(r *rand.Rand, data []byte) []byte
	// valid: the result always parses, and parses service by service
	// (the test fails if reparse gives up on it).
	valid bool
}

func splice(data []byte, at, n int, with string) []byte {
	return slices.Concat(data[:at], []byte(with), data[at+n:])
}

// randomLine returns the offset and text of a random line holding sub.
func randomLine(r *rand.Rand, data []byte, sub string) (int, string, bool) {
	var at []int
	for i := 0; i < len(data); {
		j := bytes.IndexByte(data[i:], '\n')
		if j < 0 {
			break
		}
		if bytes.Contains(data[i:i+j], []byte(sub)) {
			at = append(at, i)
		}
		i += j + 1
	}
	if len(at) == 0 {
		return 0, "", false
	}
	i := at[r.IntN(len(at))]
	j := bytes.IndexByte(data[i:], '\n')
	return i, string(data[i : i+j]), true
}

var edits = []edit{
	{"weight", func(r *rand.Rand, data []byte) []byte {
		at, line, ok := randomLine(r, data, "weight: ")
		if !ok {
			return data
		}
		return splice(data, at, len(line), strings.Split(line, "weight: ")[0]+fmt.Sprintf("weight: %d", r.IntN(100)))
	}, true},
	{"state", func(r *rand.Rand, data []byte) []byte {
		at, line, ok := randomLine(r, data, "state: active")
		if !ok {
			return data
		}
		return splice(data, at, len(line), strings.Replace(line, "active", "draining", 1))
	}, true},
	{"delete a service", func(r *rand.Rand, data []byte) []byte {
		starts := serviceLines(data)
		if len(starts) < 2 {
			return data
		}
		k := r.IntN(len(starts))
		end := len(data)
		if k+1 < len(starts) {
			end = starts[k+1]
		}
		return splice(data, starts[k], end-starts[k], "")
	}, true},
	{"add a service", func(r *rand.Rand, data []byte) []byte {
		starts := serviceLines(data)
		at := len(data)
		if k := r.IntN(len(starts) + 1); k < len(starts) {
			at = starts[k]
		}
		port := 20000 + r.IntN(40000)
		return splice(data, at, 0, fmt.Sprintf("  - name: added-%d\n    vip: 192.0.2.1\n    port: %d\n    backends:\n      - {address: 198.51.100.200, weight: 2}\n", port, port))
	}, true},
	{"add a backend", func(r *rand.Rand, data []byte) []byte {
		at, line, ok := randomLine(r, data, "state: ")
		if !ok {
			return data
		}
		return splice(data, at+len(line)+1, 0, fmt.Sprintf("      - address: 198.51.100.%d\n", 100+r.IntN(100)))
	}, true},
	{"comment", func(r *rand.Rand, data []byte) []byte {
		at, line, ok := randomLine(r, data, "vip: ")
		if !ok {
			return data
		}
		return splice(data, at+len(line), 0, " # edited")
	}, true},
	{"break a line's indentation", func(r *rand.Rand, data []byte) []byte {
		at, _, ok := randomLine(r, data, ":")
		if !ok {
			return data
		}
		return splice(data, at, 0, strings.Repeat(" ", 1+r.IntN(3)))
	}, false},
	{"an unknown field", func(r *rand.Rand, data []byte) []byte {
		at, line, ok := randomLine(r, data, "    port: ")
		if !ok {
			return data
		}
		return splice(data, at, len(line), strings.Replace(line, "port", "prot", 1))
	}, false},
	{"a duplicate service", func(r *rand.Rand, data []byte) []byte {
		starts := serviceLines(data)
		k := r.IntN(len(starts))
		end := len(data)
		if k+1 < len(starts) {
			end = starts[k+1]
		}
		return splice(data, end, 0, string(data[starts[k]:end]))
	}, false},
	{"another service's name", func(r *rand.Rand, data []byte) []byte {
		at, line, ok := randomLine(r, data, "  - name: ")
		if !ok {
			return data
		}
		return splice(data, at, len(line), fmt.Sprintf("  - name: svc-%d", r.IntN(8)))
	}, false},
	{"another service's vip and port", func(r *rand.Rand, data []byte) []byte {
		at, line, ok := randomLine(r, data, "    vip: ")
		if !ok {
			return data
		}
		return splice(data, at, len(line), fmt.Sprintf("    vip: 203.0.113.%d", 1+r.IntN(8)))
	}, false},
	{"a VIP as a backend", func(r *rand.Rand, data []byte) []byte {
		at, line, ok := randomLine(r, data, "      - address: ")
		if !ok {
			return data
		}
		return splice(data, at, len(line), fmt.Sprintf("      - address: 203.0.113.%d", 1+r.IntN(8)))
	}, false},
	{"a backend as a VIP", func(r *rand.Rand, data []byte) []byte {
		at, line, ok := randomLine(r, data, "    vip: ")
		if !ok {
			return data
		}
		return splice(data, at, len(line), fmt.Sprintf("    vip: 198.51.100.%d", 10+r.IntN(8)))
	}, false},
	{"a loopback backend", func(r *rand.Rand, data []byte) []byte {
		at, line, ok := randomLine(r, data, "      - address: ")
		if !ok {
			return data
		}
		return splice(data, at, len(line), "      - address: 127.0.0.1")
	}, false},
	{"an anchor and an alias", func(r *rand.Rand, data []byte) []byte {
		at, line, ok := randomLine(r, data, "    vip: ")
		if !ok {
			return data
		}
		data = splice(data, at, len(line), strings.Replace(line, "vip: ", "vip: &v ", 1))
		at, line, ok = randomLine(r, data, "    vip: 2")
		if !ok {
			return data
		}
		return splice(data, at, len(line), "    vip: *v")
	}, false},
	{"a random byte", func(r *rand.Rand, data []byte) []byte {
		at := r.IntN(len(data))
		return splice(data, at, 1, string("-:#{}[]&*!|> \n0aZ"[r.IntN(17)]))
	}, false},
	{"every weight", func(r *rand.Rand, data []byte) []byte {
		return regexp.MustCompile(`weight: \d+`).ReplaceAll(data, fmt.Appendf(nil, "weight: %d", 1+r.IntN(9)))
	}, true},
	{"every vip the same", func(r *rand.Rand, data []byte) []byte {
		return regexp.MustCompile(`vip: [0-9.]+`).ReplaceAll(data, []byte("vip: 203.0.113.1"))
	}, false},
	{"the tables", func(r *rand.Rand, data []byte) []byte {
		return bytes.Replace(data, []byte("connections: "), []byte("connections: 1"), 1)
	}, false},
}

// TestReparseIsParse edits a file thousands of times, as an operator
// would, and checks that parsing each version from the previous one gives
// what parsing it whole gives: the same configuration, or a refusal (from
// the parse of the whole), and the same layout for the next edit.
func TestReparseIsParse(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for round := range 12 {
		f, err := manyServices(5 + round*3).MarshalFile()
		if err != nil {
			t.Fatal(err)
		}
		reparsed := map[string]int{}
		for range 150 {
			e := edits[r.IntN(len(edits))]
			data := e.do(r, f.Data)
			whole, errs, _ := parseFile(data)
			got := reparse(f, data)
			switch {
			case got == nil && e.valid && len(errs) == 0 && f.starts != nil:
				a := commonPrefix(f.Data, data)
				t.Fatalf("%s: the edit was parsed whole; want service by service (at %d: %q; services at %v)", e.name, a, data[max(0, a-60):min(len(data), a+60)], f.starts)
			case got == nil:
			case len(errs) > 0:
				t.Fatalf("%s: reparse accepted what a parse refuses (%v)\n%s", e.name, errs[0], data)
			case !reflect.DeepEqual(got.Config(), whole.Config()):
				t.Fatalf("%s: reparse reads otherwise than a parse\n%s", e.name, data)
			case !slices.Equal(got.starts, whole.starts) || got.column != whole.column:
				t.Fatalf("%s: reparse lays out services at %v, a parse at %v", e.name, got.starts, whole.starts)
			case !editHolds(f, got):
				t.Fatalf("%s: reparse says services outside its edit changed", e.name)
			default:
				reparsed[e.name]++
			}
			if len(errs) == 0 {
				f = whole
				if got != nil {
					f = got
				}
			}
			if f.starts == nil {
				// An anchor stays in the file, and no service is parsed
				// on its own again: start again from Marshal.
				if f, err = f.Config().MarshalFile(); err != nil {
					t.Fatal(err)
				}
			}
		}
		t.Logf("round %d: parsed service by service: %v", round, reparsed)
		if reparsed["weight"]+reparsed["add a service"] == 0 {
			t.Errorf("round %d: nothing was parsed service by service (%v)", round, reparsed)
		}
	}
}

// TestLayout: a file Marshal wrote, and the same parsed, lay out the same
// services; files that a parse of some services alone could misread are
// not laid out.
func TestLayout(t *testing.T) {
	f, err := manyServices(9).MarshalFile()
	if err != nil {
		t.Fatal(err)
	}
	parsed, errs, _ := parseFile(f.Data)
	if len(errs) > 0 {
		t.Fatal(errs[0])
	}
	if f.starts == nil || !slices.Equal(f.starts, parsed.starts) || f.column != parsed.column {
		t.Fatalf("Marshal lays out %v at column %d, a parse %v at %d", f.starts, f.column, parsed.starts, parsed.column)
	}
	for _, tc := range []struct{ desc, yaml string }{
		{"flow list", "datapath: splice\nservices: [{name: a, vip: 192.0.2.1, port: 1}]\n"},
		{"dash alone", "datapath: splice\nservices:\n  -\n    name: a\n    vip: 192.0.2.1\n    port: 1\n"},
		{"anchor", "datapath: splice\nservices:\n  - &a {name: a, vip: 192.0.2.1, port: 1}\n"},
		{"no services", "interfaces: [eth0]\n"},
	} {
		f, errs, _ := parseFile([]byte(tc.yaml))
		if len(errs) > 0 {
			t.Fatalf("%s: %v", tc.desc, errs[0])
		}
		if f.starts != nil {
			t.Errorf("%s: laid out at %v", tc.desc, f.starts)
		}
	}
	// Services followed by another key end where it begins.
	data := "datapath: splice\nservices:\n  - {name: a, vip: 192.0.2.1, port: 1}\n  # the last\ninterfaces: [eth0]\n"
	f, errs, _ = parseFile([]byte(data))
	if len(errs) > 0 {
		t.Fatal(errs[0])
	}
	if want := []int{strings.Index(data, "  - "), strings.Index(data, "interfaces")}; !slices.Equal(f.starts, want) {
		t.Errorf("starts %v, want %v", f.starts, want)
	}
}

// TestReadFileReparses: ReadFile with the previous File reads an edit as a
// parse of the whole would, and an unchanged file as it was.
func TestReadFileReparses(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "tether.yaml")
	f0, err := manyServices(30).MarshalFile()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, f0.Data, 0o600); err != nil {
		t.Fatal(err)
	}
	f1, err := ReadFile(path, f0)
	if err != nil || f1.Config() != f0.Config() {
		t.Fatalf("unchanged file: %v, same configuration %v", err, f1 != nil && f1.Config() == f0.Config())
	}
	edited := bytes.Replace(f0.Data, []byte("name: svc-17\n"), []byte("name: renamed\n"), 1)
	if err := os.WriteFile(path, edited, 0o600); err != nil {
		t.Fatal(err)
	}
	f2, err := ReadFile(path, f1)
	if err != nil {
		t.Fatal(err)
	}
	want, err := Parse(edited)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(f2.Config(), want) || f2.Config().Services[17].Name != "renamed" {
		t.Fatal("the edit reads otherwise than a parse of the whole")
	}
	// A refused edit is reported with its line, as a parse of the whole
	// reports it.
	bad := bytes.Replace(edited, []byte("name: renamed\n"), []byte("name: renamed\n    colour: blue\n"), 1)
	if err := os.WriteFile(path, bad, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = ReadFile(path, f2)
	if err == nil || !strings.Contains(err.Error(), "services[17].colour") || !strings.Contains(err.Error(), path) {
		t.Fatalf("refused edit: %v", err)
	}
}

func TestCommonPrefixSuffix(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for range 300 {
		a := make([]byte, r.IntN(20000))
		for i := range a {
			a[i] = byte('a' + r.IntN(2))
		}
		b := slices.Clone(a)
		if len(b) > 0 && r.IntN(4) > 0 {
			at := r.IntN(len(b))
			b = splice(b, at, r.IntN(len(b)-at+1), strings.Repeat("c", r.IntN(5000)))
		}
		slow := func(a, b []byte, rev bool) int {
			n := 0
			for n < min(len(a), len(b)) {
				x, y := a[n], b[n]
				if rev {
					x, y = a[len(a)-1-n], b[len(b)-1-n]
				}
				if x != y {
					break
				}
				n++
			}
			return n
		}
		if got, want := commonPrefix(a, b), slow(a, b, false); got != want {
			t.Fatalf("commonPrefix = %d, want %d", got, want)
		}
		if got, want := commonSuffix(a, b), slow(a, b, true); got != want {
			t.Fatalf("commonSuffix = %d, want %d", got, want)
		}
	}
}

// TestMarshalFileIsMarshal: MarshalFile writes what Marshal writes, laid
// out as a parse of it lays it out.
func TestMarshalFileIsMarshal(t *testing.T) {
	c := manyServices(20)
	want, err := c.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	got, err := c.MarshalFile()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Data, want) {
		t.Fatalf("MarshalFile differs from Marshal:\n%s\nwant\n%s", got.Data, want)
	}
	if parsed, errs, _ := parseFile(got.Data); len(errs) > 0 || !slices.Equal(parsed.starts, got.starts) {
		t.Fatalf("lays out services at %v, a parse at %v (%v)", got.starts, parsed.starts, errs)
	}
}

// TestEdit: a File reparsed from the previous one says which services
// changed (a range that holds the change, with at most a neighbour), and
// the services outside it are the previous File's; one parsed whole, or
// asked about another File, says nothing.
func TestEdit(t *testing.T) {
	f, err := manyServices(10).MarshalFile()
	if err != nil {
		t.Fatal(err)
	}
	starts := serviceLines(f.Data)
	// check reparses data from prev and wants an edit of services around
	// at (old index) known, or none when at < 0.
	check := func(desc string, prev *File, data []byte, at int) *File {
		t.Helper()
		next, err := ParseFile("tether.yaml", data, prev)
		if err != nil {
			t.Fatalf("%s: %v", desc, err)
		}
		from, oldTo, newTo, ok := next.Edit(prev)
		if at < 0 {
			if ok {
				t.Errorf("%s: Edit known (%d, %d, %d), want unknown", desc, from, oldTo, newTo)
			}
			return next
		}
		old, cur := prev.Config().Services, next.Config().Services
		switch {
		case !ok:
			t.Errorf("%s: Edit unknown", desc)
		case from > at || oldTo < at || oldTo-from > 2 || newTo-from > 2:
			t.Errorf("%s: Edit = [%d, %d) → [%d, %d), want a range of at most two services around %d", desc, from, oldTo, from, newTo, at)
		case !reflect.DeepEqual(old[:from], cur[:from]) || !reflect.DeepEqual(old[oldTo:], cur[newTo:]):
			t.Errorf("%s: services outside the edit [%d, %d) → [%d, %d) changed", desc, from, oldTo, from, newTo)
		}
		return next
	}
	weight := bytes.Replace(f.Data[starts[4]:starts[5]], []byte("weight: 1"), []byte("weight: 7"), 1)
	g := check("a weight of service 4", f, splice(f.Data, starts[4], starts[5]-starts[4], string(weight)), 4)
	if !reflect.DeepEqual(g.Config().Services[4].Backends[0].Weight, uint32(7)) {
		t.Errorf("weight of service 4: %d", g.Config().Services[4].Backends[0].Weight)
	}
	if from, oldTo, newTo, ok := check("the same bytes", g, g.Data, 0).Edit(g); from != oldTo || oldTo != newTo || !ok {
		t.Errorf("the same bytes: Edit = %d, %d, %d, %v, want an empty edit", from, oldTo, newTo, ok)
	}
	check("service 2 deleted", f, splice(f.Data, starts[2], starts[3]-starts[2], ""), 2)
	added := "  - name: added\n    vip: 192.0.2.1\n    port: 80\n    backends:\n      - address: 198.51.100.200\n"
	check("a service added before service 7", f, splice(f.Data, starts[7], 0, added), 7)
	check("a table size", f, bytes.Replace(f.Data, []byte("connections: "), []byte("connections: 1"), 1), -1)
	if _, _, _, ok := g.Edit(g); ok {
		t.Error("a File is an edit of itself")
	}
}

// editHolds says whether next says which of prev's services it changed,
// and those outside the edit are prev's.
func editHolds(prev, next *File) bool {
	from, oldTo, newTo, ok := next.Edit(prev)
	old, cur := prev.Config().Services, next.Config().Services
	return ok && reflect.DeepEqual(old[:from], cur[:from]) && reflect.DeepEqual(old[oldTo:], cur[newTo:])
}

// TestMarshalEdit writes each version of a randomly edited file as the
// daemon writes a change (MarshalEdit: the services the edit changed
// encoded, the others copied from the previous text) and checks that the
// result reads as the configuration it was written from, laid out for the
// next edit, with the previous text of unchanged services kept.
func TestMarshalEdit(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	f, err := manyServices(30).MarshalFile()
	if err != nil {
		t.Fatal(err)
	}
	// An operator's comment inside a service, and no final newline.
	f, err = ParseFile("tether.yaml", bytes.TrimSuffix(bytes.Replace(f.Data, []byte("    port: 1000\n"), []byte("    port: 1000 # the web tier\n"), 1), []byte("\n")), f)
	if err != nil {
		t.Fatal(err)
	}
	// A weight of service 10: the comment in the first stays, and the
	// last, copied, gets its newline.
	at := bytes.Index(f.Data, []byte("name: svc-10\n"))
	at += bytes.Index(f.Data[at:], []byte("weight: 1"))
	next, err := ParseFile("tether.yaml", splice(f.Data, at, len("weight: 1"), "weight: 5"), f)
	if err != nil {
		t.Fatal(err)
	}
	from, oldTo, newTo, ok := next.Edit(f)
	if !ok {
		t.Fatal("an edit of one weight is not known as one")
	}
	out, err := next.Config().MarshalEdit(f, from, oldTo, newTo)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(out.Data, []byte("    port: 1000 # the web tier\n")) || !bytes.HasSuffix(out.Data, []byte("\n")) {
		t.Errorf("MarshalEdit lost the text of an unchanged service, or the last newline:\n%s", out.Data)
	}
	// A file that ends its document with "...": a service added at the
	// end (as vip add does) goes before the marker, not after it.
	ended, err := ParseFile("tether.yaml", append(bytes.Clone(out.Data), "...\n"...), out)
	if err != nil {
		t.Fatal(err)
	}
	withAdded := ended.Config().Clone()
	n := len(withAdded.Services)
	added := DefaultService()
	added.Name, added.VIP, added.Port = "added", netip.MustParseAddr("192.0.2.1"), 80
	withAdded.Services = append(withAdded.Services, added)
	out, err = withAdded.MarshalEdit(ended, n, n, n+1)
	if err != nil {
		t.Fatal(err)
	}
	if c, err := Parse(out.Data); err != nil || !reflect.DeepEqual(c, withAdded) {
		t.Fatalf("MarshalEdit of a file with an end marker: %v\n%s", err, out.Data)
	}
	written := 0
	for range 400 {
		e := edits[r.IntN(len(edits))]
		next, err := ParseFile("tether.yaml", e.do(r, f.Data), f)
		if err != nil {
			continue
		}
		from, oldTo, newTo, ok := next.Edit(f)
		if !ok {
			if f = next; f.starts == nil {
				// An anchor: start again from Marshal.
				if f, err = f.Config().MarshalFile(); err != nil {
					t.Fatal(err)
				}
			}
			continue
		}
		out, err := next.Config().MarshalEdit(f, from, oldTo, newTo)
		if err != nil {
			t.Fatal(err)
		}
		whole, errs, _ := parseFile(out.Data)
		switch {
		case len(errs) > 0:
			t.Fatalf("%s: MarshalEdit wrote what does not parse: %v\n%s", e.name, errs[0], out.Data)
		case !reflect.DeepEqual(whole.Config(), next.Config()):
			t.Fatalf("%s: MarshalEdit wrote another configuration\n%s", e.name, out.Data)
		case !slices.Equal(whole.starts, out.starts) || whole.column != out.column:
			t.Fatalf("%s: MarshalEdit lays out services at %v, a parse at %v", e.name, out.starts, whole.starts)
		}
		written++
		f = out
	}
	t.Logf("%d versions written as edits", written)
	if written < 100 {
		t.Errorf("only %d versions written as edits", written)
	}
}
