package config

import (
	"bytes"
	"errors"
	"io"
	"slices"
	"sync/atomic"

	"go.yaml.in/yaml/v3"
)

// File is a configuration file's content with what parsing it gave, kept
// so that the next version of the file is parsed in proportion to what
// changed (ReadFile with a previous File): an edit of a few services
// costs a parse of those services, not of the thousands around them.
type File struct {
	Data []byte
	cfg  *Config
	// starts[i] is the offset of the line that begins service i, the
	// line of its "-"; starts[len(services)] is where the list ends. nil
	// when the file is not laid out for reparsing: no services, an
	// anchor or alias anywhere, a service not in block style.
	starts []int
	column int // the 1-based column of the services' "-"
	// id tells Files apart; a File parsed from another (reparse) has that
	// one's id as base, and the services it changed as edit (see Edit).
	id, base uint64
	edit     [3]int
}

var lastFileID atomic.Uint64

func fileID() uint64 { return lastFileID.Add(1) }

// Edit says, of a File read with prev as the previous File (ReadFile,
// ParseFile), which services changed: prev's services [from, oldTo) were
// replaced by this File's [from, newTo), and nothing else of the
// configuration differs. ok is false when that is not known (the file was
// parsed whole, or from another File); then anything may have changed.
func (f *File) Edit(prev *File) (from, oldTo, newTo int, ok bool) {
	if prev == nil || f.base == 0 || f.base != prev.id {
		return 0, 0, 0, false
	}
	return f.edit[0], f.edit[1], f.edit[2], true
}

// Config returns the configuration the file holds. It is shared with the
// File (and with the next one, ReadFile): clone it to change it.
func (f *File) Config() *Config { return f.cfg }

// layout finds where the services of a parsed file begin, from its root
// node. Only a file whose services a parse of their own lines reads the
// same as the parse of the whole is laid out: each service a block
// sequence item whose "-" starts its line, at one column, and no anchor or
// alias anywhere (an edited service could be what another refers to).
func layout(data []byte, root *yaml.Node, c *Config) *File {
	f := &File{Data: data, cfg: c, id: fileID()}
	if anchored(root) {
		return f
	}
	var seq *yaml.Node
	next := -1 // the line of the top-level key after services, if any
	for i := 0; i+1 < len(root.Content); i += 2 {
		if seq != nil {
			next = root.Content[i].Line
			break
		}
		if root.Content[i].Value == "services" {
			seq = root.Content[i+1]
		}
	}
	if seq == nil || seq.Kind != yaml.SequenceNode || seq.Style&yaml.FlowStyle != 0 || len(seq.Content) == 0 || len(seq.Content) != len(c.Services) {
		return f
	}
	lines := lineStarts(data)
	starts := make([]int, 0, len(seq.Content)+1)
	for _, it := range seq.Content {
		at, ok := dashLine(data, lines, it.Line, seq.Column)
		if !ok {
			return f
		}
		starts = append(starts, at)
	}
	end := len(data)
	if next > 0 {
		end = lines[next-1]
	}
	end = endOfServices(data, starts[len(starts)-1], end)
	if end < starts[len(starts)-1] {
		return f
	}
	f.starts, f.column = append(starts, end), seq.Column
	return f
}

// endOfServices is where the services end, given where the last one
// starts and where the list ends by the YAML nodes: a document marker
// after the last service ends them before that (it is no part of any).
func endOfServices(data []byte, last, end int) int {
	if k := docMarker(data[last:end]); k >= 0 {
		return last + k
	}
	return end
}

// docMarker returns the offset of the first line of data that is a YAML
// document marker ("---" or "..." at the start of a line), or -1.
func docMarker(data []byte) int {
	for at := 0; at < len(data); {
		line := data[at:]
		if i := bytes.IndexByte(line, '\n'); i >= 0 {
			line = line[:i+1]
		}
		if (bytes.HasPrefix(line, []byte("---")) || bytes.HasPrefix(line, []byte("..."))) &&
			(len(line) == 3 || line[3] == ' ' || line[3] == '\t' || line[3] == '\n' || line[3] == '\r') {
			return at
		}
		at += len(line)
	}
	return -1
}

// anchored says whether n or a node below it has an anchor or is an
// alias.
func anchored(n *yaml.Node) bool {
	if n.Anchor != "" || n.Kind == yaml.AliasNode {
		return true
	}
	return slices.ContainsFunc(n.Content, anchored)
}

// lineStarts returns the offset of each line of data: line n (1-based)
// starts at lineStarts[n-1].
func lineStarts(data []byte) []int {
	starts := []int{0}
	for i := 0; ; {
		j := bytes.IndexByte(data[i:], '\n')
		if j < 0 {
			return starts
		}
		i += j + 1
		starts = append(starts, i)
	}
}

// dashLine returns the offset of line (1-based) if it holds a sequence
// item's "-" at column, after spaces only.
func dashLine(data []byte, lines []int, line, column int) (int, bool) {
	if line < 1 || line > len(lines) {
		return 0, false
	}
	at := lines[line-1]
	dash := at + column - 1
	if dash+1 >= len(data) || data[dash] != '-' || (data[dash+1] != ' ' && data[dash+1] != '\n') {
		return 0, false
	}
	for _, b := range data[at:dash] {
		if b != ' ' {
			return 0, false
		}
	}
	return at, true
}

// reparse parses data, the next version of prev's file, by parsing only
// the services the change touches: the lines from the start of the first
// to the start of the first service after the change, which the rest of
// the file leaves as they were. It returns nil when it cannot tell that
// this reads as a parse of the whole (the change is outside the
// services, the services it touches parse into anything but services at
// their column, or the result has a problem to report, which a parse of
// the whole locates): the caller then parses the whole.
func reparse(prev *File, data []byte) *File {
	if prev == nil || prev.starts == nil {
		return nil
	}
	old := prev.Data
	n := len(prev.starts) - 1 // services
	a := commonPrefix(old, data)
	if a == len(old) && a == len(data) {
		return &File{Data: data, cfg: prev.cfg, starts: prev.starts, column: prev.column,
			id: fileID(), base: prev.id}
	}
	b := commonSuffix(old[a:], data[a:])
	oldEnd := len(old) - b // the change is old[a:oldEnd], data[a:len(data)-b]
	if a < prev.starts[0] || oldEnd > prev.starts[n] {
		return nil
	}
	// Services i to j are touched: i holds a, j holds the last changed
	// byte (or is i, for an insertion).
	i := max(0, upper(prev.starts[:n], a)-1)
	if i > 0 && a < prev.starts[i]+prev.column {
		// The change begins in the indentation or at the "-" of service
		// i: it may as well end service i-1 (a line added to its end).
		i--
	}
	j := max(i, upper(prev.starts[:n], oldEnd-1)-1)
	delta := len(data) - len(old)
	from, to := prev.starts[i], prev.starts[j+1]+delta
	if to < from {
		return nil
	}
	chunk := data[from:to]
	var added []Service
	var chunkStarts []int
	if len(bytes.TrimSpace(chunk)) > 0 {
		var doc yaml.Node
		dec := yaml.NewDecoder(bytes.NewReader(chunk))
		if err := dec.Decode(&doc); err != nil {
			return nil
		}
		var second yaml.Node
		if err := dec.Decode(&second); !errors.Is(err, io.EOF) {
			return nil
		}
		if doc.Kind != yaml.DocumentNode || len(doc.Content) != 1 {
			return nil
		}
		seq := doc.Content[0]
		if seq.Kind != yaml.SequenceNode || seq.Style&yaml.FlowStyle != 0 || seq.Column != prev.column || anchored(seq) {
			return nil
		}
		lines := lineStarts(chunk)
		d := &decoder{reported: make(map[string]bool)}
		for k, it := range seq.Content {
			at, ok := dashLine(chunk, lines, it.Line, prev.column)
			if !ok {
				return nil
			}
			chunkStarts = append(chunkStarts, from+at)
			added = append(added, d.service(it, index("services", i+k)))
		}
		if len(d.errs) > 0 {
			return nil
		}
	}
	c := *prev.cfg
	c.Services = slices.Concat(prev.cfg.Services[:i], added, prev.cfg.Services[j+1:])
	if len(c.Services) == 0 || len(c.Services) > limitMaxServices {
		return nil
	}
	backends := 0
	for _, s := range c.Services {
		backends += len(s.Backends)
	}
	if backends > limitMaxBackends {
		return nil
	}
	if !c.validEdit(i, i+len(added)) {
		return nil
	}
	starts := slices.Concat(prev.starts[:i], chunkStarts, prev.starts[j+1:])
	for k := i + len(added); k < len(starts); k++ {
		starts[k] += delta
	}
	if last := len(starts) - 1; last > 0 {
		starts[last] = endOfServices(data, starts[last-1], starts[last])
	}
	return &File{Data: data, cfg: &c, starts: starts, column: prev.column,
		id: fileID(), base: prev.id, edit: [3]int{i, j + 1, i + len(added)}}
}

// upper returns the number of starts at or before at (starts is sorted).
func upper(starts []int, at int) int {
	k, found := slices.BinarySearch(starts, at)
	if found {
		k++
	}
	return k
}

// commonPrefix returns the length of the longest common prefix of a and
// b, comparing blocks first: files are megabytes, edits a few bytes.
func commonPrefix(a, b []byte) int {
	const block = 4096
	i, n := 0, min(len(a), len(b))
	for i+block <= n && bytes.Equal(a[i:i+block], b[i:i+block]) {
		i += block
	}
	for i < n && a[i] == b[i] {
		i++
	}
	return i
}

// commonSuffix returns the length of the longest common suffix of a and
// b.
func commonSuffix(a, b []byte) int {
	const block = 4096
	i, n := 0, min(len(a), len(b))
	for i+block <= n && bytes.Equal(a[len(a)-i-block:len(a)-i], b[len(b)-i-block:len(b)-i]) {
		i += block
	}
	for i < n && a[len(a)-1-i] == b[len(b)-1-i] {
		i++
	}
	return i
}
