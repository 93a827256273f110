package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/tetherlb/tether/health"
)

// Load reads the configuration file at path and parses it like Parse. Every
// *FieldError it returns carries the path in its File.
func Load(path string) (*Config, error) {
	f, err := ReadFile(path, nil)
	if err != nil {
		return nil, err
	}
	return f.Config(), nil
}

// ReadFile is Load that returns the file's content with the configuration.
// Given prev, the File of an earlier version of the file, it parses only
// the services that changed since, where it can tell that this reads as a
// parse of the whole (see File).
func ReadFile(path string, prev *File) (*File, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			err = pe.Err // the path is already in our message
		}
		return nil, fmt.Errorf("config: read %s: %w", path, err)
	}
	return ParseFile(path, data, prev)
}

// ParseFile is ReadFile of data, read from the file at path.
func ParseFile(path string, data []byte, prev *File) (*File, error) {
	if f := reparse(prev, data); f != nil {
		return f, nil
	}
	f, errs, truncated := parseFile(data)
	for _, e := range errs {
		e.File = path
	}
	if err := joinErrors(errs, truncated); err != nil {
		return nil, err
	}
	return f, nil
}

// Parse decodes a YAML configuration strictly, applies the defaults and
// validates the result. The configuration is refused as a whole if anything
// is wrong: the error lists every problem found, earliest in the file
// first, each a *FieldError naming the field and its line.
func Parse(data []byte) (*Config, error) {
	f, errs, truncated := parseFile(data)
	if err := joinErrors(errs, truncated); err != nil {
		return nil, err
	}
	return f.Config(), nil
}

// Field names of each mapping, in the order Marshal writes them.
var (
	topFields     = []string{"interfaces", "datapath", "hash_seed", "tables", "splice", "services", "bgp", "sync"}
	tablesFields  = []string{"connections", "nat", "affinity", "ring_size", "max_services", "max_backends", "insert_rate"}
	spliceFields  = []string{"loops", "max_connections"}
	serviceFields = []string{"name", "vip", "port", "protocol", "affinity", "affinity_timeout", "forwarding", "snat_address", "tunnel_source", "gue_port", "health", "on_down", "icmp_echo", "min_healthy", "idle_timeout", "idle_after", "proxy_protocol", "backends"}
	healthFields  = []string{"type", "path", "host", "expect_status", "send", "interval", "timeout", "rise", "fall", "via"}
	backendFields = []string{"address", "port", "weight", "state", "close_at", "close_rate"}
)

// parseFile decodes data and validates the result. It returns the problems
// sorted by their position in the file, and whether some were left out.
func parseFile(data []byte) (*File, []*FieldError, bool) {
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, []*FieldError{{Msg: "the file is empty"}}, false
		}
		return nil, []*FieldError{yamlError(err)}, false
	}
	var next yaml.Node
	if err := dec.Decode(&next); err == nil {
		return nil, []*FieldError{{Line: next.Line, Msg: "a second YAML document; the configuration is one document"}}, false
	} else if !errors.Is(err, io.EOF) {
		return nil, []*FieldError{yamlError(err)}, false
	}

	var root *yaml.Node
	if doc.Kind == yaml.DocumentNode && len(doc.Content) == 1 {
		root = resolve(doc.Content[0])
	}
	if root == nil || isNull(root) {
		return nil, []*FieldError{{Msg: "the file is empty"}}, false
	}
	if root.Kind != yaml.MappingNode {
		return nil, []*FieldError{{Line: root.Line,
			Msg: fmt.Sprintf("the file must be a mapping of %s; it is %s", strings.Join(topFields, ", "), describe(root))}}, false
	}

	d := &decoder{reported: make(map[string]bool)}
	c := d.config(root)
	if d.stopped {
		// Too many problems already: validating the rest adds nothing.
		return nil, d.errs, true
	}

	// Validate what was decoded. Problems at a path the decoder has already
	// reported, or below it, are the same problem seen again through a zero
	// value: leave them out.
	var v validator
	c.validate(&v)
	errs := d.errs
	for _, e := range v.errs {
		if d.covers(e.Path) {
			continue
		}
		// A field that is not in the file is shown at the line of what
		// should hold it, and sorted after everything that is there.
		switch n, exact := locate(root, e.Path); {
		case exact:
			e.Line, e.at = n.Line, position{n.Line, n.Column}
		case n != nil:
			e.Line, e.at = n.Line, end(n)
		default:
			e.at = end(root)
		}
		errs = append(errs, e)
	}
	if len(errs) == 0 {
		return layout(data, root, c), nil, false
	}
	slices.SortStableFunc(errs, func(a, b *FieldError) int { return a.at.compare(b.at) })
	return nil, errs, v.truncated
}

// yamlError turns a syntax error of the YAML library, "yaml: line N: msg",
// into a FieldError at line N.
func yamlError(err error) *FieldError {
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	if rest, ok := strings.CutPrefix(msg, "line "); ok {
		num, text, ok := strings.Cut(rest, ": ")
		if line, err := strconv.Atoi(num); ok && err == nil {
			return &FieldError{Line: line, Msg: text}
		}
	}
	return &FieldError{Msg: msg}
}

// decoder walks the YAML node tree of a configuration into a Config, in
// document order. It checks what a Config cannot hold (values of the wrong
// type, numbers out of the range of their field, unparsable addresses and
// durations, unknown and repeated fields) and leaves everything else to
// Validate. A field it refuses is left zero.
type decoder struct {
	errs     []*FieldError
	reported map[string]bool // paths of errs, and of fields not to check again
	stopped  bool            // maxErrors reached: the rest of the file is skipped
	services int             // decoded so far, against aliases that multiply them
	backends int
}

func (d *decoder) fail(n *yaml.Node, path, format string, args ...any) {
	d.reported[path] = true
	if len(d.errs) >= maxErrors {
		d.stopped = true
		return
	}
	d.errs = append(d.errs, &FieldError{Path: path, Line: n.Line, at: position{n.Line, n.Column}, Msg: fmt.Sprintf(format, args...)})
}

// covers reports whether path, or a field that contains it, has already
// been reported.
func (d *decoder) covers(path string) bool {
	for i := range len(path) {
		if (path[i] == '.' || path[i] == '[') && d.reported[path[:i]] {
			return true
		}
	}
	return d.reported[path]
}

// mapping checks that n is a mapping of the known fields, each at most once,
// and calls set for each field whose value is not null, in document order.
// what names the mapping in messages ("a service").
func (d *decoder) mapping(n *yaml.Node, path, what string, known []string, set func(name string, v *yaml.Node, path string)) {
	if n.Kind != yaml.MappingNode {
		d.fail(n, path, "want %s (a mapping of %s), got %s", what, strings.Join(known, ", "), describe(n))
		return
	}
	seen := make(map[string]int, len(known))
	for i := 0; i+1 < len(n.Content) && !d.stopped; i += 2 {
		k, v := resolve(n.Content[i]), resolve(n.Content[i+1])
		if k.Kind != yaml.ScalarNode {
			d.fail(k, path, "a key of %s is %s; keys are field names", what, describe(k))
			continue
		}
		name := k.Value
		p := field(path, name)
		switch line, dup := seen[name]; {
		case name == "<<":
			d.fail(k, p, "merge keys are not supported; write the fields out")
		case !slices.Contains(known, name):
			d.fail(k, p, "unknown field%s; %s has %s", suggest(name, known), what, strings.Join(known, ", "))
		case dup:
			d.fail(k, p, "repeated; first given at line %d", line)
		default:
			seen[name] = k.Line
			if !isNull(v) {
				set(name, v, p)
			}
		}
	}
}

// list checks that n is a list and returns its items, aliases resolved.
func (d *decoder) list(n *yaml.Node, path, what string) []*yaml.Node {
	if n.Kind != yaml.SequenceNode {
		d.fail(n, path, "want a list of %s, got %s", what, describe(n))
		return nil
	}
	items := make([]*yaml.Node, len(n.Content))
	for i, it := range n.Content {
		items[i] = resolve(it)
	}
	return items
}

func (d *decoder) config(n *yaml.Node) *Config {
	c := Default()
	d.mapping(n, "", "the configuration", topFields, func(name string, v *yaml.Node, p string) {
		switch name {
		case "interfaces":
			c.Interfaces = nil
			for i, it := range d.list(v, p, "interface names") {
				c.Interfaces = append(c.Interfaces, d.str(it, index(p, i)))
			}
		case "datapath":
			c.Datapath = d.str(v, p)
		case "hash_seed":
			c.HashSeed = uint32(d.integer(v, p, 0, math.MaxUint32))
		case "tables":
			d.tables(v, p, &c.Tables)
		case "bgp":
			c.BGP = d.bgp(v, p)
		case "sync":
			c.Sync = d.sync(v, p)
		case "splice":
			d.mapping(v, p, "splice", spliceFields, func(name string, v *yaml.Node, p string) {
				switch name {
				case "loops":
					c.Splice.Loops = int(d.integer(v, p, 0, maxSpliceLoops))
				case "max_connections":
					c.Splice.MaxConnections = int(d.integer(v, p, 0, maxSpliceConnections))
				}
			})
		case "services":
			c.Services = nil
			for i, it := range d.list(v, p, "services") {
				if d.stopped {
					break
				}
				if d.services++; d.services > limitMaxServices {
					d.fail(it, index(p, i), "more than %d services", limitMaxServices)
					break
				}
				c.Services = append(c.Services, d.service(it, index(p, i)))
			}
		}
	})
	return c
}

func (d *decoder) tables(n *yaml.Node, path string, t *Tables) {
	d.mapping(n, path, "tables", tablesFields, func(name string, v *yaml.Node, p string) {
		switch name {
		case "connections":
			t.Connections = uint32(d.integer(v, p, minTableEntries, maxTableEntries))
		case "nat":
			t.NAT = uint32(d.integer(v, p, minTableEntries, maxTableEntries))
		case "affinity":
			t.Affinity = uint32(d.integer(v, p, minTableEntries, maxTableEntries))
		case "ring_size":
			t.RingSize = uint32(d.integer(v, p, minRingSize, maxRingSize))
		case "max_services":
			t.MaxServices = uint32(d.integer(v, p, 1, limitMaxServices))
		case "max_backends":
			t.MaxBackends = uint32(d.integer(v, p, 1, limitMaxBackends))
		case "insert_rate":
			t.InsertRate = uint32(d.integer(v, p, 0, maxInsertRate))
		}
	})
}

func (d *decoder) service(n *yaml.Node, path string) Service {
	s := DefaultService()
	var portGiven []bool
	healthGiven := false
	d.mapping(n, path, "a service", serviceFields, func(name string, v *yaml.Node, p string) {
		switch name {
		case "name":
			s.Name = d.str(v, p)
		case "vip":
			s.VIP = d.addr(v, p)
		case "port":
			s.Port = d.port(v, p)
		case "protocol":
			s.Protocol = d.str(v, p)
		case "affinity":
			s.Affinity = d.str(v, p)
		case "affinity_timeout":
			s.AffinityTimeout = d.duration(v, p)
		case "forwarding":
			s.Forwarding = d.str(v, p)
		case "snat_address":
			s.SNATAddress = d.addr(v, p)
		case "tunnel_source":
			s.TunnelSource = d.prefix(v, p)
		case "gue_port":
			s.GUEPort = d.port(v, p)
		case "health":
			s.Health, healthGiven = d.health(v, p), true
		case "on_down":
			s.OnDown = d.str(v, p)
		case "icmp_echo":
			s.ICMPEcho = d.str(v, p)
		case "min_healthy":
			s.MinHealthy = int(d.integer(v, p, 0, limitMaxBackends))
		case "idle_timeout":
			s.IdleTimeout = d.duration(v, p)
		case "idle_after":
			s.IdleAfter = d.positiveDuration(v, p)
		case "proxy_protocol":
			if s.ProxyProtocol = d.str(v, p); s.ProxyProtocol == "none" {
				s.ProxyProtocol = ProxyProtocolNone
			}
		case "backends":
			s.Backends, portGiven = nil, nil
			for i, it := range d.list(v, p, "backends") {
				if d.stopped {
					break
				}
				if d.backends++; d.backends > limitMaxBackends {
					d.fail(it, index(p, i), "more than %d backends", limitMaxBackends)
					break
				}
				b, given := d.backend(it, index(p, i))
				s.Backends = append(s.Backends, b)
				portGiven = append(portGiven, given)
			}
		}
	})
	if !healthGiven {
		s.Health = DefaultHealthFor(s.Protocol) // the protocol may come after
	}
	// A backend port defaults to the service port, which may come after the
	// backends in the file.
	for i := range s.Backends {
		if portGiven[i] {
			continue
		}
		if s.Port != 0 {
			s.Backends[i].Port = s.Port
		} else {
			// The service port is missing or wrong, and says so.
			d.reported[field(index(field(path, "backends"), i), "port")] = true
		}
	}
	return s
}

// health decodes a service's health check and applies the defaults of the
// fields it leaves out, unless its type is none (which has no other
// field). Values the defaults would stand for (a rise of 0, an empty path)
// are refused rather than silently replaced.
func (d *decoder) health(n *yaml.Node, path string) health.Check {
	var c health.Check
	d.mapping(n, path, "a health check", healthFields, func(name string, v *yaml.Node, p string) {
		switch name {
		case "type":
			c.Type = d.str(v, p)
		case "path":
			if c.Path = d.str(v, p); c.Path == "" && !d.reported[p] {
				d.fail(v, p, "empty; leave the field out for %q, or write a path such as /healthz", health.DefaultPath)
			}
		case "host":
			c.Host = d.str(v, p)
		case "expect_status":
			c.ExpectStatus = d.statusRange(v, p)
		case "send":
			c.Send = d.str(v, p)
		case "interval":
			if c.Interval = d.positiveDuration(v, p); c.Interval == 0 {
				// The timeout's default and bound follow the interval.
				d.reported[field(path, "timeout")] = true
			}
		case "timeout":
			c.Timeout = d.positiveDuration(v, p)
		case "rise":
			c.Rise = int(d.integer(v, p, 1, MaxRiseFall))
		case "fall":
			c.Fall = int(d.integer(v, p, 1, MaxRiseFall))
		case "via":
			c.Via = d.str(v, p)
		}
	})
	if c.Type == HealthNone {
		return c
	}
	return c.Defaults()
}

// statusRange decodes expect_status: a list of two HTTP statuses, low
// first, or one status standing for a range of one.
func (d *decoder) statusRange(n *yaml.Node, path string) [2]int {
	const want = "want an HTTP status such as 200, or a range such as [200, 399]"
	status := func(n *yaml.Node, p string) int {
		s := int(d.integer(n, p, 100, 599))
		if s == 0 {
			d.reported[path] = true // the range as a whole says nothing more
		}
		return s
	}
	switch {
	case n.Kind == yaml.ScalarNode:
		s := status(n, path)
		return [2]int{s, s}
	case n.Kind == yaml.SequenceNode && len(n.Content) == 2:
		return [2]int{status(resolve(n.Content[0]), index(path, 0)), status(resolve(n.Content[1]), index(path, 1))}
	case n.Kind == yaml.SequenceNode:
		d.fail(n, path, "a list of %d statuses; %s", len(n.Content), want)
	default:
		d.fail(n, path, "%s, got %s", want, describe(n))
	}
	return [2]int{}
}

// positiveDuration decodes a duration that must be more than zero.
func (d *decoder) positiveDuration(n *yaml.Node, path string) time.Duration {
	t := d.duration(n, path)
	if t <= 0 && !d.reported[path] {
		d.fail(n, path, "%s: must be more than 0", n.Value)
		return 0
	}
	return t
}

// backend decodes one backend and reports whether its port was given.
func (d *decoder) backend(n *yaml.Node, path string) (Backend, bool) {
	b := defaultBackend()
	portGiven := false
	d.mapping(n, path, "a backend", backendFields, func(name string, v *yaml.Node, p string) {
		switch name {
		case "address":
			b.Address = d.addr(v, p)
		case "port":
			b.Port = d.port(v, p)
			portGiven = true
		case "weight":
			b.Weight = uint32(d.integer(v, p, 0, MaxWeight))
		case "state":
			b.State = d.str(v, p)
		case "close_at":
			b.CloseAt = d.time(v, p)
		case "close_rate":
			b.CloseRate = int(d.integer(v, p, 1, MaxCloseRate))
		}
	})
	if !b.CloseAt.IsZero() && b.CloseRate == 0 {
		b.CloseRate = DefaultCloseRate
	}
	return b, portGiven
}

// time decodes a point in time written as RFC 3339, such as
// 2026-12-06T16:00:00Z.
func (d *decoder) time(n *yaml.Node, path string) time.Time {
	if n.Kind != yaml.ScalarNode || isNull(n) {
		d.fail(n, path, "want a time such as 2026-12-06T16:00:00Z, got %s", describe(n))
		return time.Time{}
	}
	t, err := time.Parse(time.RFC3339, n.Value)
	if err != nil {
		d.fail(n, path, "%q is not a time such as 2026-12-06T16:00:00Z (RFC 3339)", n.Value)
		return time.Time{}
	}
	return t.UTC()
}

// str returns the text of a scalar. Any scalar is taken as it is written:
// `name: 443` is the name "443".
func (d *decoder) str(n *yaml.Node, path string) string {
	if n.Kind != yaml.ScalarNode || isNull(n) {
		d.fail(n, path, "want a string, got %s", describe(n))
		return ""
	}
	return n.Value
}

// integer returns an integer scalar in lo..hi, or 0 after reporting why it
// is not one.
func (d *decoder) integer(n *yaml.Node, path string, lo, hi int64) int64 {
	if n.Kind != yaml.ScalarNode || isNull(n) {
		d.fail(n, path, "want a number, got %s", describe(n))
		return 0
	}
	switch n.ShortTag() {
	case "!!int":
		var i int64
		if err := n.Decode(&i); err != nil {
			var u uint64
			if n.Decode(&u) != nil {
				d.fail(n, path, "%s is not a number", n.Value)
				return 0
			}
			// Larger than any int64: out of range below.
			i = math.MaxInt64
		}
		if i < lo || i > hi {
			d.fail(n, path, "%s is out of range %d..%d", n.Value, lo, hi)
			return 0
		}
		return i
	case "!!float":
		d.fail(n, path, "%s is not a whole number", n.Value)
	case "!!str":
		if _, err := strconv.ParseInt(strings.TrimSpace(n.Value), 0, 64); err == nil {
			d.fail(n, path, "%q is a string; write the number without quotes", n.Value)
		} else {
			d.fail(n, path, "%q is not a number", n.Value)
		}
	default:
		d.fail(n, path, "%s is not a number", n.Value)
	}
	return 0
}

func (d *decoder) port(n *yaml.Node, path string) uint16 {
	return uint16(d.integer(n, path, 1, math.MaxUint16))
}

func (d *decoder) addr(n *yaml.Node, path string) netip.Addr {
	if n.Kind != yaml.ScalarNode || isNull(n) {
		d.fail(n, path, "want an IP address, got %s", describe(n))
		return netip.Addr{}
	}
	s := n.Value
	a, err := netip.ParseAddr(s)
	if err != nil {
		hint := ""
		if strings.Contains(s, "/") {
			hint = " (write the address without a prefix length)"
		}
		d.fail(n, path, "%q is not an IP address%s", s, hint)
		return netip.Addr{}
	}
	return a
}

// prefix reads an address with or without a prefix length (an address
// alone is the prefix of that one address).
func (d *decoder) prefix(n *yaml.Node, path string) netip.Prefix {
	if n.Kind != yaml.ScalarNode || isNull(n) {
		d.fail(n, path, "want an IP address or prefix, got %s", describe(n))
		return netip.Prefix{}
	}
	p, err := ParsePrefix(n.Value)
	if err != nil {
		d.fail(n, path, "%v", err)
	}
	return p
}

// ParsePrefix parses an address (the prefix of that address alone) or a
// prefix such as 198.51.100.0/24, whose host bits must be zero.
func ParsePrefix(s string) (netip.Prefix, error) {
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("%q is not an IP address or prefix", s)
		}
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not an IP address or prefix", s)
	}
	if p != p.Masked() {
		return netip.Prefix{}, fmt.Errorf("%q has host bits set: write %s", s, p.Masked())
	}
	return p, nil
}

func (d *decoder) duration(n *yaml.Node, path string) time.Duration {
	if n.Kind != yaml.ScalarNode || isNull(n) {
		d.fail(n, path, "want a duration such as 3h or 90m, got %s", describe(n))
		return 0
	}
	if tag := n.ShortTag(); tag == "!!int" || tag == "!!float" {
		d.fail(n, path, "%s", errNoUnit(n.Value))
		return 0
	}
	t, err := ParseDuration(n.Value)
	if err != nil {
		d.fail(n, path, "%v", err)
		return 0
	}
	return t
}

// ParseDuration reads a duration as the configuration file writes it: a
// number with a unit, such as 3h, 90m or 1h30m. The API reads durations
// with it too, so that both accept and refuse the same.
func ParseDuration(s string) (time.Duration, error) {
	t, err := time.ParseDuration(s)
	if err == nil {
		return t, nil
	}
	if _, ferr := strconv.ParseFloat(s, 64); ferr == nil {
		return 0, errNoUnit(s)
	}
	return 0, fmt.Errorf("%q is not a duration (write it as 3h, 90m or 1h30m)", s)
}

func errNoUnit(s string) error {
	return fmt.Errorf("%s has no unit; write a duration such as 3h or 90m", s)
}

// resolve follows aliases to the node they name.
func resolve(n *yaml.Node) *yaml.Node {
	for n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	return n
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

// describe names a node's kind for messages: a mapping, a list, or the
// quoted text of a scalar.
func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		if isNull(n) {
			return "null"
		}
		return strconv.Quote(n.Value)
	}
	return "nothing"
}

// locate finds where a validation path is in the file. For a field that is
// there it returns its key (the key's line is the field's) or list item, and
// true. For a field that is not, it returns the deepest mapping or list that
// should hold it, and false, or nil when that is the top level.
func locate(root *yaml.Node, path string) (*yaml.Node, bool) {
	n := root
	var found *yaml.Node // the key or item path names so far
	for path != "" {
		var next *yaml.Node
		if path[0] == '[' {
			end := strings.IndexByte(path, ']')
			if end < 0 || n.Kind != yaml.SequenceNode {
				break
			}
			i, err := strconv.Atoi(path[1:end])
			if err != nil || i < 0 || i >= len(n.Content) {
				break
			}
			next, path = resolve(n.Content[i]), path[end+1:]
			found = next
		} else {
			path = strings.TrimPrefix(path, ".")
			end := strings.IndexAny(path, ".[")
			if end < 0 {
				end = len(path)
			}
			if n.Kind != yaml.MappingNode {
				break
			}
			name := path[:end]
			for i := 0; i+1 < len(n.Content); i += 2 {
				if k := resolve(n.Content[i]); k.Kind == yaml.ScalarNode && k.Value == name {
					found, next = k, resolve(n.Content[i+1])
					break
				}
			}
			if next == nil {
				break
			}
			path = path[end:]
		}
		n = next
	}
	switch {
	case path == "":
		return found, true
	case n == root:
		return nil, false
	}
	return n, false
}

// end returns a position just after the last node below n, or after n
// itself when it is empty.
func end(n *yaml.Node) position {
	for len(n.Content) > 0 {
		n = resolve(n.Content[len(n.Content)-1])
	}
	return position{n.Line, n.Column + 1}
}

// suggest returns ` (did you mean "x"?)` for the known field nearest to
// name: within two edits (a swap of neighbours counts as one), or else
// sharing its first four letters.
func suggest(name string, known []string) string {
	best, bestDist := "", 3
	for _, k := range known {
		if dist := distance(name, k); dist < bestDist {
			best, bestDist = k, dist
		}
	}
	if best == "" {
		for _, k := range known {
			if len(name) >= 4 && strings.HasPrefix(k, name[:4]) {
				best = k
				break
			}
		}
	}
	if best == "" {
		return ""
	}
	return fmt.Sprintf(" (did you mean %q?)", best)
}

// distance is the optimal string alignment distance between a and b: the
// edits (insert, delete, replace, swap of neighbours) that turn one into
// the other.
func distance(a, b string) int {
	prev2 := make([]int, len(b)+1)
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				cur[j] = min(cur[j], prev2[j-2]+1)
			}
		}
		prev2, prev, cur = prev, cur, prev2
	}
	return prev[len(b)]
}
