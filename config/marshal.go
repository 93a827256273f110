package config

import (
	"bytes"
	"fmt"
	"net/netip"
	"strconv"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/tetherlb/tether/health"
)

// Marshal writes the configuration as YAML in the file schema, every field
// spelled out (defaults included), so that Parse(Marshal(c)) equals c for
// any c that Parse returns. It writes c as it is, without validating it.
func (c *Config) Marshal() ([]byte, error) {
	f, err := c.MarshalFile()
	if err != nil {
		return nil, err
	}
	return f.Data, nil
}

// MarshalFile is Marshal that returns the File of what it wrote, for
// ReadFile to parse the next version of it in proportion to what changed
// (and MarshalEdit to write it). The File holds c: c must not change
// afterwards.
func (c *Config) MarshalFile() (*File, error) {
	var buf bytes.Buffer
	if f, err := c.writeHead(&buf); f != nil || err != nil {
		return f, err
	}
	starts := make([]int, 0, len(c.Services)+1)
	for _, s := range c.Services {
		starts = append(starts, buf.Len())
		if err := writeService(&buf, s); err != nil {
			return nil, err
		}
	}
	return &File{Data: buf.Bytes(), cfg: c, starts: append(starts, buf.Len()), column: 3, id: fileID()}, nil
}

// MarshalEdit is MarshalFile of c, an edit of prev's configuration that
// replaced prev's services [from, oldTo) by c's [from, newTo) and changed
// nothing else. The other services are copied from prev's text as they
// are (an operator's layout and comments within them too), so that
// writing a change costs a copy of the file and the encoding of the
// services it changed. When prev's services are not laid out as Marshal
// lays them out (block items at column 3), it is MarshalFile.
func (c *Config) MarshalEdit(prev *File, from, oldTo, newTo int) (*File, error) {
	n := len(prev.cfg.Services)
	if prev.starts == nil || prev.column != 3 || from < 0 || from > oldTo || oldTo > n || newTo < from ||
		newTo-from != len(c.Services)-n+oldTo-from {
		return c.MarshalFile()
	}
	var buf bytes.Buffer
	buf.Grow(len(prev.Data) + 4096)
	if f, err := c.writeHead(&buf); f != nil || err != nil {
		return f, err
	}
	starts := make([]int, 0, len(c.Services)+1)
	copyText := func(i, j int) { // prev's services [i, j)
		if i == j {
			return
		}
		at := buf.Len() - prev.starts[i]
		for k := i; k < j; k++ {
			starts = append(starts, prev.starts[k]+at)
		}
		buf.Write(prev.Data[prev.starts[i]:prev.starts[j]])
		if buf.Bytes()[buf.Len()-1] != '\n' { // the file's last line
			buf.WriteByte('\n')
		}
	}
	copyText(0, from)
	for _, s := range c.Services[from:newTo] {
		starts = append(starts, buf.Len())
		if err := writeService(&buf, s); err != nil {
			return nil, err
		}
	}
	copyText(oldTo, n)
	return &File{Data: buf.Bytes(), cfg: c, starts: append(starts, buf.Len()), column: 3, id: fileID()}, nil
}

// writeHead writes the settings and the "services:" key, and returns the
// whole File when there is no service to write after it. Each service is
// then encoded on its own and indented under "services:" (writeService),
// which reads as the whole encoded at once would: the YAML encoder keeps
// every event of a document until it ends, and thousands of services made
// one document cost it seconds.
func (c *Config) writeHead(buf *bytes.Buffer) (*File, error) {
	if err := encode(buf, c.rootNode()); err != nil {
		return nil, err
	}
	if len(c.Services) == 0 {
		buf.WriteString("services: []\n")
		return &File{Data: buf.Bytes(), cfg: c, id: fileID()}, nil
	}
	buf.WriteString("services:\n")
	return nil, nil
}

// writeService writes s as an item of the services list, indented under
// "services:".
func writeService(buf *bytes.Buffer, s Service) error {
	var one bytes.Buffer
	if err := encode(&one, &yaml.Node{Kind: yaml.SequenceNode, Content: []*yaml.Node{serviceNode(s)}}); err != nil {
		return err
	}
	for line := range bytes.Lines(one.Bytes()) {
		if len(bytes.TrimSpace(line)) > 0 {
			buf.WriteString("  ")
		}
		buf.Write(line)
	}
	return nil
}

// rootNode is the configuration as a YAML mapping, without its services.
func (c *Config) rootNode() *yaml.Node {
	interfaces := &yaml.Node{Kind: yaml.SequenceNode, Style: yaml.FlowStyle}
	for _, name := range c.Interfaces {
		interfaces.Content = append(interfaces.Content, str(name))
	}
	t := c.Tables
	kv := []any{
		"interfaces", interfaces,
		"datapath", str(c.Datapath),
		"hash_seed", &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!int", Value: fmt.Sprintf("0x%08x", c.HashSeed)},
		"tables", mapping(
			"connections", integer(t.Connections),
			"nat", integer(t.NAT),
			"affinity", integer(t.Affinity),
			"ring_size", integer(t.RingSize),
			"max_services", integer(t.MaxServices),
			"max_backends", integer(t.MaxBackends),
			"insert_rate", integer(t.InsertRate),
		),
	}
	// Like the services' splice-only settings, the splice block is
	// written when it is not the default.
	if c.Splice != (Splice{}) {
		kv = append(kv, "splice", mapping(
			"loops", integer(c.Splice.Loops),
			"max_connections", integer(c.Splice.MaxConnections),
		))
	}
	if c.BGP != nil {
		kv = append(kv, "bgp", bgpNode(c.BGP))
	}
	if c.Sync != nil {
		kv = append(kv, "sync", syncNode(c.Sync))
	}
	return mapping(kv...)
}

// encode writes n as a YAML document indented by two.
func encode(buf *bytes.Buffer, n *yaml.Node) error {
	enc := yaml.NewEncoder(buf)
	enc.SetIndent(2)
	if err := enc.Encode(n); err != nil {
		return fmt.Errorf("config: marshal: %w", err)
	}
	if err := enc.Close(); err != nil {
		return fmt.Errorf("config: marshal: %w", err)
	}
	return nil
}

func serviceNode(s Service) *yaml.Node {
	backends := &yaml.Node{Kind: yaml.SequenceNode}
	for _, b := range s.Backends {
		kv := []any{
			"address", addr(b.Address),
			"port", integer(b.Port),
			"weight", integer(b.Weight),
			"state", str(b.State),
		}
		if !b.CloseAt.IsZero() {
			kv = append(kv, "close_at", str(b.CloseAt.UTC().Format(time.RFC3339Nano)), "close_rate", integer(b.CloseRate))
		}
		backends.Content = append(backends.Content, mapping(kv...))
	}
	kv := []any{
		"name", str(s.Name),
		"vip", addr(s.VIP),
		"port", integer(s.Port),
		"protocol", str(s.Protocol),
		"affinity", str(s.Affinity),
		"affinity_timeout", str(s.AffinityTimeout.String()),
		"forwarding", str(s.Forwarding),
	}
	if s.SNATAddress.IsValid() {
		kv = append(kv, "snat_address", addr(s.SNATAddress))
	}
	if p := s.TunnelSource; p.IsValid() {
		v := p.String()
		if p.IsSingleIP() {
			v = p.Addr().String()
		}
		kv = append(kv, "tunnel_source", str(v))
	}
	if s.GUEPort != 0 {
		kv = append(kv, "gue_port", integer(s.GUEPort))
	}
	kv = append(kv,
		"health", healthNode(s.Health),
		"on_down", str(s.OnDown),
	)
	if s.ICMPEcho != ICMPEchoReply {
		kv = append(kv, "icmp_echo", str(s.ICMPEcho))
	}
	if s.MinHealthy != DefaultMinHealthy {
		kv = append(kv, "min_healthy", integer(s.MinHealthy))
	}
	// The splice-only settings are written when they are not the
	// defaults, so that files of the XDP datapath do not grow them.
	if s.IdleTimeout != 0 {
		kv = append(kv, "idle_timeout", str(s.IdleTimeout.String()))
	}
	if s.IdleAfter != 0 {
		kv = append(kv, "idle_after", str(s.IdleAfter.String()))
	}
	if s.ProxyProtocol != ProxyProtocolNone {
		kv = append(kv, "proxy_protocol", str(s.ProxyProtocol))
	}
	return mapping(append(kv, "backends", backends)...)
}

// healthNode writes a health check with every field its type uses, and any
// other field that is set (which Validate refuses), so that nothing is
// lost.
func healthNode(c health.Check) *yaml.Node {
	httpLike := c.Type == health.TypeHTTP || c.Type == health.TypeWebSocket
	probed := c.Type != HealthNone
	kv := []any{"type", str(c.Type)}
	if httpLike || c.Path != "" {
		kv = append(kv, "path", str(c.Path))
	}
	if httpLike || c.Host != "" {
		kv = append(kv, "host", str(c.Host))
	}
	if c.Type == health.TypeHTTP || c.ExpectStatus != [2]int{} {
		status := &yaml.Node{Kind: yaml.SequenceNode, Style: yaml.FlowStyle}
		status.Content = []*yaml.Node{integer(c.ExpectStatus[0]), integer(c.ExpectStatus[1])}
		kv = append(kv, "expect_status", status)
	}
	if c.Type == health.TypeWebSocket || c.Type == health.TypeUDP || c.Send != "" {
		kv = append(kv, "send", str(c.Send))
	}
	if probed || c.Interval != 0 {
		kv = append(kv, "interval", str(c.Interval.String()))
	}
	if probed || c.Timeout != 0 {
		kv = append(kv, "timeout", str(c.Timeout.String()))
	}
	if probed || c.Rise != 0 {
		kv = append(kv, "rise", integer(c.Rise))
	}
	if probed || c.Fall != 0 {
		kv = append(kv, "fall", integer(c.Fall))
	}
	if c.Via != "" {
		kv = append(kv, "via", str(c.Via))
	}
	n := mapping(kv...)
	if !probed {
		n.Style = yaml.FlowStyle // health: {type: none}
	}
	return n
}

// mapping builds a mapping node from alternating keys and value nodes.
func mapping(kv ...any) *yaml.Node {
	n := &yaml.Node{Kind: yaml.MappingNode}
	for i := 0; i+1 < len(kv); i += 2 {
		n.Content = append(n.Content, str(kv[i].(string)), kv[i+1].(*yaml.Node))
	}
	return n
}

// str is a string scalar; the encoder quotes it where it would read back
// as another type.
func str(s string) *yaml.Node {
	return &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: s}
}

func integer[T int | uint16 | uint32](v T) *yaml.Node {
	return &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!int", Value: strconv.FormatInt(int64(v), 10)}
}

// addr writes an address, or an empty string for the zero Addr.
func addr(a netip.Addr) *yaml.Node {
	if !a.IsValid() {
		return str("")
	}
	return str(a.String())
}
