package config

import (
	"bytes"
	"errors"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/tetherlb/tether/health"
	"github.com/tetherlb/tether/maglev"
)

// example is the configuration of the schema's documentation.
const example = `
interfaces: [eth0]
datapath: auto
hash_seed: 0x74657468
tables:
  connections: 1048576
  affinity: 1048576
  ring_size: 65537
  max_services: 1024
  max_backends: 4096
  insert_rate: 10000
splice:
  loops: 0
  max_connections: 0
services:
  - name: chat
    vip: 203.0.113.10
    port: 8765
    protocol: tcp
    affinity: source
    affinity_timeout: 3h
    forwarding: dsr
    health:
      type: websocket
      path: /ws
      host: chat.example
      send: ping
      interval: 2s
      timeout: 1s
      rise: 2
      fall: 3
    on_down: reset
    backends:
      - address: 192.0.2.11
        port: 8765
        weight: 1
        state: active
`

// minimal is the smallest useful configuration; the bad cases below are
// small edits of it.
const minimal = `
interfaces: [eth0]
services:
  - name: chat
    vip: 203.0.113.10
    port: 8765
    backends:
      - address: 192.0.2.11
`

func mustParse(t testing.TB, data string) *Config {
	t.Helper()
	c, err := Parse([]byte(data))
	if err != nil {
		t.Fatalf("Parse: %v\ninput:\n%s", err, data)
	}
	return c
}

func TestParseExample(t *testing.T) {
	got := mustParse(t, example)
	want := &Config{
		Interfaces: []string{"eth0"},
		Datapath:   DatapathAuto,
		HashSeed:   0x74657468,
		Tables: Tables{
			Connections: 1 << 20,
			NAT:         1 << 18,
			Affinity:    1 << 20,
			RingSize:    65537,
			MaxServices: 1024,
			MaxBackends: 4096,
			InsertRate:  10000,
		},
		Services: []Service{{
			Name:            "chat",
			VIP:             netip.MustParseAddr("203.0.113.10"),
			Port:            8765,
			Protocol:        ProtocolTCP,
			Affinity:        AffinitySource,
			AffinityTimeout: 3 * time.Hour,
			Forwarding:      ForwardingDSR,
			Health: health.Check{
				Type:     health.TypeWebSocket,
				Path:     "/ws",
				Host:     "chat.example",
				Send:     "ping",
				Interval: 2 * time.Second,
				Timeout:  time.Second,
				Rise:     2,
				Fall:     3,
			},
			OnDown: OnDownReset, ICMPEcho: ICMPEchoReply, MinHealthy: 1,
			Backends: []Backend{{
				Address: netip.MustParseAddr("192.0.2.11"),
				Port:    8765,
				Weight:  1,
				State:   StateActive,
			}},
		}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Parse(example) =\n%+v\nwant\n%+v", got, want)
	}
	if k := got.Services[0].Key(); k != "203.0.113.10:8765/tcp" {
		t.Errorf("service Key() = %q", k)
	}
	if k := got.Services[0].Backends[0].Key(); k != "192.0.2.11:8765" {
		t.Errorf("backend Key() = %q", k)
	}
	if p := got.Services[0].ProtoNumber(); p != 6 {
		t.Errorf("ProtoNumber() = %d, want 6", p)
	}
}

func TestParseDefaults(t *testing.T) {
	got := mustParse(t, minimal)
	want := Default()
	want.Interfaces = []string{"eth0"}
	want.Services = []Service{{
		Name:            "chat",
		VIP:             netip.MustParseAddr("203.0.113.10"),
		Port:            8765,
		Protocol:        ProtocolTCP,
		Affinity:        AffinitySource,
		AffinityTimeout: DefaultAffinityTimeout,
		Forwarding:      ForwardingDSR,
		Health:          health.Check{Type: health.TypeTCP, Interval: 2 * time.Second, Timeout: time.Second, Rise: 2, Fall: 3},
		OnDown:          OnDownKeep,
		ICMPEcho:        ICMPEchoReply,
		MinHealthy:      1,
		Backends: []Backend{{
			Address: netip.MustParseAddr("192.0.2.11"),
			Port:    8765, // the service port
			Weight:  1,
			State:   StateActive,
		}},
	}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Parse(minimal) =\n%+v\nwant\n%+v", got, want)
	}
	if got.HashSeed != maglev.DefaultSeed {
		t.Errorf("HashSeed = %#x, want maglev.DefaultSeed %#x", got.HashSeed, maglev.DefaultSeed)
	}
	wantTables := Tables{Connections: 1 << 20, NAT: 1 << 18, Affinity: 1 << 20, RingSize: 65537, MaxServices: 1024, MaxBackends: 4096, InsertRate: 10000}
	if got.Tables != wantTables {
		t.Errorf("Tables = %+v, want %+v", got.Tables, wantTables)
	}
}

func TestParseBackendPortAfterBackends(t *testing.T) {
	// The default backend port is the service port even when the service
	// port is written after the backends.
	c := mustParse(t, `
interfaces: [eth0]
services:
  - name: chat
    backends:
      - address: 192.0.2.11
    vip: 203.0.113.10
    port: 443
`)
	if p := c.Services[0].Backends[0].Port; p != 443 {
		t.Errorf("backend port = %d, want the service port 443", p)
	}
}

func TestParseIPv6(t *testing.T) {
	c := mustParse(t, `
interfaces: [eth0, eth1]
datapath: xdp
services:
  - name: chat-v6
    vip: 2001:db8::10
    port: 8765
    protocol: udp
    affinity: connection
    backends:
      - address: 2001:db8::11
      - address: 2001:db8::12
        weight: 0
        state: draining
`)
	s := c.Services[0]
	if s.Key() != "[2001:db8::10]:8765/udp" {
		t.Errorf("Key() = %q", s.Key())
	}
	if s.ProtoNumber() != 17 {
		t.Errorf("ProtoNumber() = %d, want 17", s.ProtoNumber())
	}
	if got := s.Backends[1].Key(); got != "[2001:db8::12]:8765" {
		t.Errorf("backend Key() = %q", got)
	}
	if b := s.Backends[1]; b.Weight != 0 || b.State != StateDraining {
		t.Errorf("backends[1] = %+v, want weight 0 draining", b)
	}
	if s.Affinity != AffinityConnection || s.Protocol != ProtocolUDP {
		t.Errorf("service = %+v", s)
	}
}

func TestParseGood(t *testing.T) {
	for _, tc := range []struct {
		desc string
		yaml string
	}{
		{"splice datapath needs no interfaces", "datapath: splice\nservices: []\n"},
		{"splice with services", `
datapath: splice
services:
  - name: web
    vip: 198.51.100.1
    port: 80
    backends: [{address: 127.0.0.1, port: 80}]
`},
		{"splice maps a service port to another backend port", `
datapath: splice
services:
  - name: web
    vip: 198.51.100.1
    port: 80
    backends: [{address: 192.0.2.11, port: 8765}]
`},
		{"nat and fullnat map the service port to backend ports", `
interfaces: [eth0]
services:
  - name: web
    vip: 203.0.113.10
    port: 80
    forwarding: nat
    backends: [{address: 192.0.2.11, port: 8765}, {address: 192.0.2.12, port: 8766}]
  - name: web6
    vip: 2001:db8::10
    port: 80
    forwarding: fullnat
    snat_address: 2001:db8::2
    backends: [{address: 2001:db8::11, port: 8765}]
`},
		{"ipip and gue, with tunnel sources, and a backend of the other family", `
interfaces: [eth0]
services:
  - name: tunnelled
    vip: 203.0.113.10
    port: 80
    forwarding: ipip
    tunnel_source: 198.51.100.64/26
    backends: [{address: 192.0.2.11}, {address: 2001:db8::11}]
  - name: gue6
    vip: 2001:db8::10
    port: 80
    forwarding: gue
    gue_port: 5555
    tunnel_source: 2001:db8:1::/96
    backends: [{address: 2001:db8::11}]
`},
		{"service with zero backends", `
interfaces: [eth0]
services:
  - name: empty
    vip: 203.0.113.10
    port: 1
`},
		{"interfaces only", "interfaces: [eth0]\n"},
		{"decimal hash seed and extreme values", `
interfaces: [eth0]
datapath: xdp-generic
hash_seed: 4294967295
tables: {connections: 1024, affinity: 134217728, ring_size: 251, max_services: 1, max_backends: 1}
services:
  - name: a
    vip: 203.0.113.10
    port: 65535
    affinity_timeout: 720h
    backends: [{address: 192.0.2.11, port: 65535, weight: 10000}]
`},
		{"largest ring", "interfaces: [eth0]\ntables: {ring_size: 1048573}\n"},
		{"same vip and port, other protocol", `
interfaces: [eth0]
services:
  - {name: a, vip: 203.0.113.10, port: 53, protocol: udp}
  - {name: b, vip: 203.0.113.10, port: 53, protocol: tcp}
`},
		{"same backend address on another port is another backend", `
datapath: splice
services:
  - name: a
    vip: 203.0.113.10
    port: 80
    backends: [{address: 192.0.2.11}]
  - name: b
    vip: 203.0.113.10
    port: 81
    backends: [{address: 192.0.2.11}]
`},
		{"anchors and aliases", `
interfaces: [eth0]
services:
  - name: a
    vip: 203.0.113.10
    port: 80
    backends: &pool
      - address: 192.0.2.11
      - address: 192.0.2.12
  - name: b
    vip: 203.0.113.11
    port: 80
    backends: *pool
`},
		{"null values take the defaults", `
interfaces: [eth0]
datapath:
tables:
services:
  - name: a
    vip: 203.0.113.10
    port: 80
    protocol: ~
`},
		{"comments and document marker", "# tether\n---\ninterfaces: [eth0] # uplink\n"},
		{"name of digits", "interfaces: [eth0]\nservices: [{name: 443, vip: 203.0.113.10, port: 443}]\n"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			mustParse(t, tc.yaml)
		})
	}
}

// badCases are configurations Parse must refuse. path is the field the
// first line of the error must name ("" for the file as a whole), msg a
// fragment of what it must say.
var badCases = []struct {
	desc string
	yaml string
	path string
	msg  string
}{
	// The file as a whole.
	{"empty file", "", "", "empty"},
	{"only comments", "# nothing here\n", "", "empty"},
	{"only a document marker", "---\n", "", "empty"},
	{"a list at top level", "- interfaces: [eth0]\n", "", "must be a mapping"},
	{"a string at top level", "tether\n", "", "must be a mapping"},
	{"two documents", minimal + "---\ninterfaces: [eth1]\n", "", "second YAML document"},
	{"YAML syntax error", "interfaces: [eth0\n", "", "line 1: did not find expected"},
	{"tab indentation", "services:\n\t- name: chat\n", "", "line 2: found character that cannot start any token"},

	// Unknown and repeated fields.
	{"unknown top-level field", "interfaces: [eth0]\nbogus: 1\n", "bogus", `unknown field`},
	{"unknown service field", strings.Replace(minimal, "vip:", "vipp:", 1), "services[0].vipp", `unknown field (did you mean "vip"?)`},
	{"unknown backend field", minimal + "        wieght: 2\n", "services[0].backends[0].wieght", `unknown field (did you mean "weight"?)`},
	{"unknown tables field", "interfaces: [eth0]\ntables: {conections: 2048}\n", "tables.conections", `did you mean "connections"?`},
	{"unknown splice field", "datapath: splice\nsplice: {loop: 2}\n", "splice.loop", `did you mean "loops"?`},
	{"splice as a list", "datapath: splice\nsplice: [2]\n", "splice", "want splice"},
	{"negative loops", "datapath: splice\nsplice: {loops: -1}\n", "splice.loops", "-1 is out of range 0..1024"},
	{"too many loops", "datapath: splice\nsplice: {loops: 1025}\n", "splice.loops", "1025 is out of range 0..1024"},
	{"loops as a string", "datapath: splice\nsplice: {loops: many}\n", "splice.loops", `"many" is not a number`},
	{"max_connections too large", "datapath: splice\nsplice: {max_connections: 16777217}\n", "splice.max_connections", "out of range 0..16777216"},
	{"repeated field", strings.Replace(minimal, "port: 8765", "port: 8765\n    port: 8766", 1), "services[0].port", "repeated; first given at line"},
	{"merge key", "interfaces: [eth0]\nservices:\n  - <<: {name: a}\n", "services[0].<<", "merge keys are not supported"},

	// Shapes.
	{"interfaces as a string", "interfaces: eth0\n", "interfaces", "want a list of interface names"},
	{"services as a mapping", "interfaces: [eth0]\nservices: {name: chat}\n", "services", "want a list of services"},
	{"service as a string", "interfaces: [eth0]\nservices: [chat]\n", "services[0]", "want a service"},
	{"backends as a string", strings.Replace(minimal, "backends:\n      - address: 192.0.2.11", "backends: 192.0.2.11", 1), "services[0].backends", "want a list of backends"},
	{"tables as a list", "interfaces: [eth0]\ntables: [1024]\n", "tables", "want tables"},
	{"null interface", "interfaces: [eth0, ~]\n", "interfaces[1]", "want a string, got null"},
	{"null backend", strings.Replace(minimal, "      - address: 192.0.2.11", "      -", 1), "services[0].backends[0]", "want a backend"},
	{"vip as a list", strings.Replace(minimal, "203.0.113.10", "[203.0.113.10]", 1), "services[0].vip", "want an IP address, got a list"},
	{"name as a list", "interfaces: [eth0]\nservices: [{name: [a], vip: 203.0.113.10, port: 80}]\n", "services[0].name", "want a string"},

	// Interfaces and datapath.
	{"missing interfaces with auto", "services: []\n", "interfaces", "at least one interface is required"},
	{"empty interfaces with xdp", "interfaces: []\ndatapath: xdp\n", "interfaces", "required with datapath xdp"},
	{"duplicate interface", "interfaces: [eth0, eth1, eth0]\n", "interfaces[2]", `"eth0" is already listed as interfaces[0]`},
	{"interface name with a slash", "interfaces: [eth/0]\n", "interfaces[0]", "not an interface name"},
	{"interface name too long", "interfaces: [abcdefghijklmnop]\n", "interfaces[0]", "not an interface name"},
	{"interface name with a space", "interfaces: ['eth 0']\n", "interfaces[0]", "not an interface name"},
	{"empty interface name", "interfaces: ['']\n", "interfaces[0]", "not an interface name"},
	{"unknown datapath", "interfaces: [eth0]\ndatapath: dpdk\n", "datapath", `unknown datapath "dpdk" (want auto, xdp, xdp-generic or splice)`},

	// Hash seed and tables.
	{"negative hash seed", "interfaces: [eth0]\nhash_seed: -1\n", "hash_seed", "-1 is out of range 0..4294967295"},
	{"hash seed over 32 bits", "interfaces: [eth0]\nhash_seed: 0x100000000\n", "hash_seed", "out of range"},
	{"hash seed not a number", "interfaces: [eth0]\nhash_seed: teth\n", "hash_seed", `"teth" is not a number`},
	{"ring_size not prime", "interfaces: [eth0]\ntables: {ring_size: 65536}\n", "tables.ring_size", "65536 is not prime"},
	{"ring_size too small", "interfaces: [eth0]\ntables: {ring_size: 13}\n", "tables.ring_size", "13 is out of range 251..1048573"},
	{"ring_size too large", "interfaces: [eth0]\ntables: {ring_size: 2000003}\n", "tables.ring_size", "out of range 251..1048573"},
	{"connections 0", "interfaces: [eth0]\ntables: {connections: 0}\n", "tables.connections", "0 is out of range 1024..134217728"},
	{"affinity table too large", "interfaces: [eth0]\ntables: {affinity: 268435456}\n", "tables.affinity", "out of range 1024..134217728"},
	{"connections a float", "interfaces: [eth0]\ntables: {connections: 1.5e6}\n", "tables.connections", "not a whole number"},
	{"max_services 0", "interfaces: [eth0]\ntables: {max_services: 0}\n", "tables.max_services", "0 is out of range 1..65536"},
	{"max_backends too large", "interfaces: [eth0]\ntables: {max_backends: 2000000}\n", "tables.max_backends", "out of range 1..65535"},
	{"more services than max_services", `
interfaces: [eth0]
tables: {max_services: 1}
services:
  - {name: a, vip: 203.0.113.10, port: 80}
  - {name: b, vip: 203.0.113.10, port: 81}
`, "services", "2 services are more than tables.max_services (1)"},
	{"more backends than max_backends", `
interfaces: [eth0]
tables: {max_backends: 2}
services:
  - name: a
    vip: 203.0.113.10
    port: 80
    backends: [{address: 192.0.2.11}, {address: 192.0.2.12}]
  - name: b
    vip: 203.0.113.10
    port: 81
    backends: [{address: 192.0.2.13}]
`, "services[1].backends[0]", "more than tables.max_backends (2)"},

	// Service names.
	{"missing name", strings.Replace(minimal, "  - name: chat\n    vip", "  - vip", 1), "services[0].name", "missing"},
	{"bad name", strings.Replace(minimal, "name: chat", "name: Chat!", 1), "services[0].name", `"Chat!" is not a service name`},
	{"name too long", strings.Replace(minimal, "name: chat", "name: "+strings.Repeat("a", 64), 1), "services[0].name", "not a service name"},
	{"duplicate name", `
interfaces: [eth0]
services:
  - {name: chat, vip: 203.0.113.10, port: 80}
  - {name: chat, vip: 203.0.113.10, port: 81}
`, "services[1].name", `"chat" is already the name of services[0]`},

	// VIPs.
	{"bad vip", strings.Replace(minimal, "203.0.113.10", "203.0.113.300", 1), "services[0].vip", `"203.0.113.300" is not an IP address`},
	{"vip with a prefix length", strings.Replace(minimal, "203.0.113.10", "203.0.113.10/32", 1), "services[0].vip", "without a prefix length"},
	{"missing vip", strings.Replace(minimal, "    vip: 203.0.113.10\n", "", 1), "services[0].vip", "missing"},
	{"multicast vip", strings.Replace(minimal, "203.0.113.10", "224.0.0.1", 1), "services[0].vip", "224.0.0.1 is a multicast address"},
	{"loopback vip", strings.Replace(minimal, "203.0.113.10", "127.0.0.1", 1), "services[0].vip", "127.0.0.1 is a loopback address"},
	{"unspecified vip", strings.Replace(minimal, "203.0.113.10", "0.0.0.0", 1), "services[0].vip", "0.0.0.0 is the unspecified address"},
	{"unspecified IPv6 vip", strings.Replace(minimal, "203.0.113.10", "'::'", 1), "services[0].vip", "is the unspecified address"},
	{"IPv4-mapped vip", strings.Replace(minimal, "203.0.113.10", "'::ffff:203.0.113.10'", 1), "services[0].vip", "write it as 203.0.113.10"},
	{"vip with a zone", strings.Replace(minimal, "203.0.113.10", "fe80::1%eth0", 1), "services[0].vip", "zone"},
	{"duplicate service", `
interfaces: [eth0]
services:
  - {name: a, vip: 203.0.113.10, port: 80}
  - {name: b, vip: 203.0.113.10, port: 80, protocol: tcp}
`, "services[1]", `203.0.113.10:80/tcp is already defined by services[0] ("a")`},

	// Ports.
	{"port 0", strings.Replace(minimal, "port: 8765", "port: 0", 1), "services[0].port", "0 is out of range 1..65535"},
	{"port -1", strings.Replace(minimal, "port: 8765", "port: -1", 1), "services[0].port", "-1 is out of range 1..65535"},
	{"port 70000", strings.Replace(minimal, "port: 8765", "port: 70000", 1), "services[0].port", "70000 is out of range 1..65535"},
	{"port beyond int64", strings.Replace(minimal, "port: 8765", "port: 18446744073709551615", 1), "services[0].port", "out of range 1..65535"},
	{"port quoted", strings.Replace(minimal, "port: 8765", `port: "8765"`, 1), "services[0].port", "write the number without quotes"},
	{"port a word", strings.Replace(minimal, "port: 8765", "port: http", 1), "services[0].port", `"http" is not a number`},
	{"missing port", strings.Replace(minimal, "    port: 8765\n", "", 1), "services[0].port", "missing"},
	{"backend port 70000", minimal + "        port: 70000\n", "services[0].backends[0].port", "70000 is out of range 1..65535"},
	{"backend port 0", minimal + "        port: 0\n", "services[0].backends[0].port", "0 is out of range 1..65535"},
	{"backend port differs in dsr", minimal + "        port: 8080\n", "services[0].backends[0].port", "dsr forwarding sends the packet as the client sent it, it cannot change the port"},
	{"backend port differs in dsr, datapath auto", "datapath: auto\n" + minimal + "        port: 8080\n", "services[0].backends[0].port", "forwarding nat or fullnat, and datapath splice, map ports"},

	{"tables.nat too small", strings.Replace(minimal, "interfaces: [eth0]", "interfaces: [eth0]\ntables: {nat: 10}", 1), "tables.nat", "out of range"},
	// Modes.
	{"unknown protocol", strings.Replace(minimal, "port: 8765", "port: 8765\n    protocol: sctp", 1), "services[0].protocol", `unknown protocol "sctp" (want tcp or udp)`},
	{"unknown affinity", strings.Replace(minimal, "port: 8765", "port: 8765\n    affinity: sticky", 1), "services[0].affinity", `unknown mode "sticky" (want source or connection)`},
	{"unknown forwarding", strings.Replace(minimal, "port: 8765", "port: 8765\n    forwarding: magic", 1), "services[0].forwarding", `unknown mode "magic" (want dsr, ipip, gue, nat or fullnat)`},
	{"tunnel_source without ipip", strings.Replace(minimal, "port: 8765", "port: 8765\n    tunnel_source: 198.51.100.0/28", 1), "services[0].tunnel_source", "only forwarding ipip and gue encapsulate"},
	{"tunnel_source with host bits", strings.Replace(minimal, "port: 8765", "port: 8765\n    forwarding: ipip\n    tunnel_source: 198.51.100.1/28", 1), "services[0].tunnel_source", `has host bits set: write 198.51.100.0/28`},
	{"tunnel_source too wide", strings.Replace(minimal, "port: 8765", "port: 8765\n    forwarding: gue\n    tunnel_source: 2001:db8::/64", 1), "services[0].tunnel_source", "varies more than 32 bits per flow: give a prefix of /96 or longer"},
	{"tunnel_source a word", strings.Replace(minimal, "port: 8765", "port: 8765\n    forwarding: gue\n    tunnel_source: here", 1), "services[0].tunnel_source", `"here" is not an IP address or prefix`},
	{"tunnel_source loopback", strings.Replace(minimal, "port: 8765", "port: 8765\n    forwarding: ipip\n    tunnel_source: 127.0.0.0/24", 1), "services[0].tunnel_source", "is a loopback address"},
	{"tunnel_source reaching multicast", strings.Replace(minimal, "port: 8765", "port: 8765\n    forwarding: ipip\n    tunnel_source: 128.0.0.0/1", 1), "services[0].tunnel_source", "255.255.255.255 is the broadcast address"},
	{"tunnel_source of no backend's family", strings.Replace(minimal, "port: 8765", "port: 8765\n    forwarding: ipip\n    tunnel_source: 2001:db8::/120", 1), "services[0].tunnel_source", "2001:db8::/120 is IPv6 but no backend is"},
	{"unknown icmp_echo", strings.Replace(minimal, "port: 8765", "port: 8765\n    icmp_echo: drop", 1), "services[0].icmp_echo", `unknown mode "drop" (want reply or pass)`},
	{"gue_port without gue", strings.Replace(minimal, "port: 8765", "port: 8765\n    forwarding: ipip\n    gue_port: 5555", 1), "services[0].gue_port", "only forwarding gue sends to a UDP port"},
	{"backend port differs in ipip", strings.Replace(minimal, "port: 8765", "port: 8765\n    forwarding: ipip", 1) + "        port: 8080\n", "services[0].backends[0].port", "ipip forwarding sends the packet as the client sent it, it cannot change the port"},
	{"snat_address without fullnat", strings.Replace(minimal, "port: 8765", "port: 8765\n    forwarding: nat\n    snat_address: 198.51.100.2", 1), "services[0].snat_address", "only forwarding fullnat rewrites the client's address"},
	{"snat_address of the other family", strings.Replace(minimal, "port: 8765", "port: 8765\n    forwarding: fullnat\n    snat_address: 2001:db8::2", 1), "services[0].snat_address", "2001:db8::2 is IPv6 but the vip 203.0.113.10 is IPv4"},
	{"snat_address loopback", strings.Replace(minimal, "port: 8765", "port: 8765\n    forwarding: fullnat\n    snat_address: 127.0.0.1", 1), "services[0].snat_address", "is a loopback address"},
	{"snat_address a VIP", strings.Replace(minimal, "port: 8765", "port: 8765\n    forwarding: fullnat\n    snat_address: 203.0.113.10", 1), "services[0].snat_address", "is the VIP of the service chat"},
	{"snat_address multicast", strings.Replace(minimal, "port: 8765", "port: 8765\n    forwarding: fullnat\n    snat_address: 224.0.0.1", 1), "services[0].snat_address", "is a multicast address"},
	{"affinity_timeout in words", strings.Replace(minimal, "port: 8765", "port: 8765\n    affinity_timeout: 3 hours", 1), "services[0].affinity_timeout", `"3 hours" is not a duration`},
	{"affinity_timeout without unit", strings.Replace(minimal, "port: 8765", "port: 8765\n    affinity_timeout: 3600", 1), "services[0].affinity_timeout", "3600 has no unit"},
	{"negative affinity_timeout", strings.Replace(minimal, "port: 8765", "port: 8765\n    affinity_timeout: -1h", 1), "services[0].affinity_timeout", "-1h0m0s is out of range"},
	{"zero affinity_timeout", strings.Replace(minimal, "port: 8765", "port: 8765\n    affinity_timeout: 0s", 1), "services[0].affinity_timeout", "out of range"},
	{"affinity_timeout over 720h", strings.Replace(minimal, "port: 8765", "port: 8765\n    affinity_timeout: 721h", 1), "services[0].affinity_timeout", "at most 720h"},

	// Splice-only settings.
	{"udp with splice", strings.Replace(strings.Replace(minimal, "interfaces: [eth0]", "datapath: splice", 1), "port: 8765", "port: 8765\n    protocol: udp", 1), "services[0].protocol", "udp services need the xdp datapath"},
	{"idle_timeout without unit", strings.Replace(minimal, "port: 8765", "port: 8765\n    idle_timeout: 600", 1), "services[0].idle_timeout", "600 has no unit"},
	{"negative idle_timeout", strings.Replace(minimal, "port: 8765", "port: 8765\n    idle_timeout: -1s", 1), "services[0].idle_timeout", "-1s is out of range"},
	{"idle_timeout over 720h", strings.Replace(minimal, "port: 8765", "port: 8765\n    idle_timeout: 721h", 1), "services[0].idle_timeout", "up to 720h"},
	{"idle_timeout as a list", strings.Replace(minimal, "port: 8765", "port: 8765\n    idle_timeout: [1h]", 1), "services[0].idle_timeout", "want a duration"},
	{"unknown proxy_protocol", strings.Replace(strings.Replace(minimal, "interfaces: [eth0]", "datapath: splice", 1), "port: 8765", "port: 8765\n    proxy_protocol: v1", 1), "services[0].proxy_protocol", `unknown version "v1" (want v2 or none)`},
	{"proxy_protocol as a number", strings.Replace(minimal, "port: 8765", "port: 8765\n    proxy_protocol: 2", 1), "services[0].proxy_protocol", `unknown version "2"`},
	{"proxy_protocol v2 with xdp", strings.Replace(minimal, "port: 8765", "port: 8765\n    proxy_protocol: v2", 1), "services[0].proxy_protocol", "v2 needs the splice datapath"},

	// Backends.
	{"vip family mismatch with backend", strings.Replace(minimal, "192.0.2.11", "2001:db8::11", 1), "services[0].backends[0].address", "2001:db8::11 is IPv6 but the vip 203.0.113.10 is IPv4"},
	{"bad backend address", strings.Replace(minimal, "192.0.2.11", "backend-1", 1), "services[0].backends[0].address", `"backend-1" is not an IP address`},
	{"missing backend address", minimal + "      - weight: 2\n", "services[0].backends[1].address", "missing"},
	{"unspecified backend", strings.Replace(minimal, "192.0.2.11", "0.0.0.0", 1), "services[0].backends[0].address", "is the unspecified address"},
	{"multicast backend", strings.Replace(minimal, "192.0.2.11", "239.1.2.3", 1), "services[0].backends[0].address", "is a multicast address"},
	{"broadcast backend", strings.Replace(minimal, "192.0.2.11", "255.255.255.255", 1), "services[0].backends[0].address", "broadcast"},
	{"backend is the service itself", strings.Replace(minimal, "192.0.2.11", "203.0.113.10", 1), "services[0].backends[0]", "203.0.113.10:8765 is the service itself"},
	{"backend is the VIP on another port", strings.Replace(minimal, "192.0.2.11", "203.0.113.10", 1) + "        port: 9000\n", "services[0].backends[0].address", "203.0.113.10 is the VIP of the service chat: a VIP is not a backend"},
	{"backend is another service's VIP", `
interfaces: [eth0]
services:
  - {name: a, vip: 203.0.113.10, port: 80, backends: [{address: 192.0.2.11}]}
  - {name: b, vip: 203.0.113.20, port: 80, backends: [{address: 203.0.113.10}]}
`, "services[1].backends[0].address", "203.0.113.10 is the VIP of the service a: a VIP is not a backend"},
	{"loopback backend with XDP", strings.Replace(minimal, "192.0.2.11", "127.0.0.1", 1), "services[0].backends[0].address", "127.0.0.1 is a loopback address: only the splice datapath"},
	{"IPv6 loopback backend with datapath auto", `
interfaces: [eth0]
services:
  - {name: a, vip: "2001:db8::10", port: 80, backends: [{address: "::1"}]}
`, "services[0].backends[0].address", "::1 is a loopback address"},
	{"link-local IPv6 backend", `
interfaces: [eth0]
services:
  - {name: a, vip: "2001:db8::10", port: 80, backends: [{address: "fe80::1"}]}
`, "services[0].backends[0].address", "fe80::1 is an IPv6 link-local address, which needs a zone"},
	{"link-local IPv6 vip", `
interfaces: [eth0]
services:
  - {name: a, vip: "fe80::10", port: 80}
`, "services[0].vip", "is an IPv6 link-local address"},
	{"backend in 0.0.0.0/8", strings.Replace(minimal, "192.0.2.11", "0.1.2.3", 1), "services[0].backends[0].address", "0.1.2.3 is in 0.0.0.0/8"},
	{"duplicate backend", minimal + "      - address: 192.0.2.12\n      - address: 192.0.2.11\n        port: 8765\n", "services[0].backends[2]", "192.0.2.11:8765 is already listed as backends[0]"},
	{"negative weight", minimal + "        weight: -1\n", "services[0].backends[0].weight", "-1 is out of range 0..10000"},
	{"weight too big", minimal + "        weight: 10001\n", "services[0].backends[0].weight", "10001 is out of range 0..10000"},
	{"idle_after 0", strings.Replace(minimal, "    backends:", "    idle_after: 0s\n    backends:", 1), "services[0].idle_after", "0s: must be more than 0"},
	{"bad state", minimal + "        state: up\n", "services[0].backends[0].state", `unknown state "up" (want active or draining)`},
	{"close_at of an active backend", minimal + "        close_at: 2026-12-06T16:00:00Z\n", "services[0].backends[0].close_at", "only a draining backend closes its connections"},
	{"close_at not a time", minimal + "        state: draining\n        close_at: 16:00\n", "services[0].backends[0].close_at", `"16:00" is not a time such as 2026-12-06T16:00:00Z`},
	{"close_rate alone", minimal + "        state: draining\n        close_rate: 5\n", "services[0].backends[0].close_rate", "close_rate paces the closes of close_at, which is not set"},
	{"close_rate 0", minimal + "        state: draining\n        close_at: 2026-12-06T16:00:00Z\n        close_rate: 0\n", "services[0].backends[0].close_rate", "0 is out of range 1..1000000"},

	// Health checks.
	{"health as a string", withHealth("tcp"), "services[0].health", "want a health check (a mapping of type, path"},
	{"unknown health field", withHealth("{type: tcp, intervall: 1s}"), "services[0].health.intervall", `unknown field (did you mean "interval"?)`},
	{"repeated health field", withHealth("{rise: 2, rise: 3}"), "services[0].health.rise", "repeated"},
	{"unknown health type", withHealth("{type: icmp}"), "services[0].health.type", `unknown type "icmp" (want tcp, http, websocket, udp or none)`},
	{"health type as a list", withHealth("{type: [tcp]}"), "services[0].health.type", "want a string, got a list"},
	{"type none with an interval", withHealth("{type: none, interval: 1s}"), "services[0].health.interval", "type none probes nothing"},
	{"type none with a path", withHealth("{type: none, path: /}"), "services[0].health.path", "type none probes nothing"},
	{"timeout as long as the interval", withHealth("{interval: 1s, timeout: 1s}"), "services[0].health.timeout", "must be less than the interval (1s)"},
	{"timeout longer than the default interval", withHealth("{timeout: 5s}"), "services[0].health.timeout", "must be less than the interval (2s)"},
	{"interval too short", withHealth("{interval: 5ms}"), "services[0].health.interval", "must be at least 10ms"},
	{"interval 0", withHealth("{interval: 0s}"), "services[0].health.interval", "0s: must be more than 0"},
	{"negative timeout", withHealth("{timeout: -1s}"), "services[0].health.timeout", "-1s: must be more than 0"},
	{"interval without unit", withHealth("{interval: 2}"), "services[0].health.interval", "2 has no unit"},
	{"interval in words", withHealth("{interval: often}"), "services[0].health.interval", `"often" is not a duration`},
	{"rise 0", withHealth("{rise: 0}"), "services[0].health.rise", "0 is out of range 1..1000"},
	{"fall too large", withHealth("{fall: 1001}"), "services[0].health.fall", "1001 is out of range 1..1000"},
	{"rise a float", withHealth("{rise: 1.5}"), "services[0].health.rise", "not a whole number"},
	{"path for a tcp check", withHealth("{type: tcp, path: /healthz}"), "services[0].health.path", "only for http and websocket checks"},
	{"host for a tcp check", withHealth("{host: app.example}"), "services[0].health.host", "only for http and websocket checks"},
	{"path without a slash", withHealth("{type: http, path: healthz}"), "services[0].health.path", "must start with /"},
	{"path with a space", withHealth("{type: http, path: '/a b'}"), "services[0].health.path", "must be a request path"},
	{"empty path", withHealth("{type: http, path: ''}"), "services[0].health.path", "empty; leave the field out"},
	{"host with a slash", withHealth("{type: http, host: a/b}"), "services[0].health.host", "must be a host name"},
	{"via nowhere", withHealth("{via: direct}"), "services[0].health.via", `must be "backend" or "vip", not "direct"`},
	{"via with type none", withHealth("{type: none, via: vip}"), "services[0].health.via", "type none probes nothing"},
	{"expect_status for a websocket check", withHealth("{type: websocket, expect_status: 101}"), "services[0].health.expect_status", "only for http checks"},
	{"expect_status high first", withHealth("{type: http, expect_status: [399, 200]}"), "services[0].health.expect_status", "low first, not 399..200"},
	{"expect_status of three", withHealth("{type: http, expect_status: [200, 300, 400]}"), "services[0].health.expect_status", "a list of 3 statuses"},
	{"expect_status out of range", withHealth("{type: http, expect_status: [99, 200]}"), "services[0].health.expect_status[0]", "99 is out of range 100..599"},
	{"expect_status in words", withHealth("{type: http, expect_status: 2xx}"), "services[0].health.expect_status", `"2xx" is not a number`},
	{"expect_status as a mapping", withHealth("{type: http, expect_status: {low: 200}}"), "services[0].health.expect_status", "want an HTTP status such as 200"},
	{"send for an http check", withHealth("{type: http, send: ping}"), "services[0].health.send", "only for websocket and udp checks"},
	{"udp check of a tcp service", withHealth("{type: udp}"), "services[0].health.type", "a udp check probes over UDP, which a tcp service does not answer"},
	{"path for a udp check", strings.Replace(withHealth("{type: udp, path: /x}"), "port: 8765", "port: 8765\n    protocol: udp", 1), "services[0].health.path", "only for http and websocket checks"},
	{"udp datagram too long", strings.Replace(withHealth("{type: udp, send: "+strings.Repeat("x", 4097)+"}"), "port: 8765", "port: 8765\n    protocol: udp", 1), "services[0].health.send", "at most 4096 bytes"},
	{"send too long", withHealth("{type: websocket, send: " + strings.Repeat("x", 4097) + "}"), "services[0].health.send", "at most 4096 bytes"},
	{"unknown on_down", strings.Replace(minimal, "port: 8765", "port: 8765\n    on_down: drop", 1), "services[0].on_down", `unknown mode "drop" (want keep or reset)`},
	{"on_down as a list", strings.Replace(minimal, "port: 8765", "port: 8765\n    on_down: [reset]", 1), "services[0].on_down", "want a string"},
}

// withHealth is minimal with the health block h (flow style) in its
// service.
func withHealth(h string) string {
	return strings.Replace(minimal, "port: 8765", "port: 8765\n    health: "+h, 1)
}

func TestParseBad(t *testing.T) {
	if len(badCases) < 30 {
		t.Fatalf("only %d bad cases", len(badCases))
	}
	for _, tc := range badCases {
		t.Run(tc.desc, func(t *testing.T) {
			c, err := Parse([]byte(tc.yaml))
			if err == nil {
				t.Fatalf("Parse accepted it: %+v\ninput:\n%s", c, tc.yaml)
			}
			if c != nil {
				t.Errorf("Parse returned a Config with its error")
			}
			first, _, _ := strings.Cut(err.Error(), "\n")
			if !strings.HasPrefix(first, "config: ") {
				t.Errorf("error %q does not start with \"config: \"", first)
			}
			if tc.path != "" && !strings.Contains(first, " "+tc.path+": ") {
				t.Errorf("first error %q does not name %s\nall errors:\n%v", first, tc.path, err)
			}
			if !strings.Contains(first, tc.msg) {
				t.Errorf("first error %q does not say %q\nall errors:\n%v", first, tc.msg, err)
			}
			var fe *FieldError
			if !errors.As(err, &fe) {
				t.Errorf("error %v is not a *FieldError", err)
			} else if fe.Path != tc.path {
				t.Errorf("FieldError.Path = %q, want %q", fe.Path, tc.path)
			}
			// The same input gives the same message.
			if _, again := Parse([]byte(tc.yaml)); again == nil || again.Error() != err.Error() {
				t.Errorf("second Parse gave %v, first %v", again, err)
			}
		})
	}
}

func TestParseErrorLine(t *testing.T) {
	_, err := Parse([]byte(strings.Replace(minimal, "vip:", "vipp:", 1)))
	var fe *FieldError
	if !errors.As(err, &fe) {
		t.Fatalf("error %v is not a *FieldError", err)
	}
	// minimal starts with an empty line: vip is on line 5.
	if fe.Line != 5 {
		t.Errorf("Line = %d, want 5", fe.Line)
	}
	if want := `config: line 5: services[0].vipp: unknown field`; !strings.HasPrefix(err.Error(), want) {
		t.Errorf("error = %q, want it to start with %q", err, want)
	}
}

func TestParseEarliestFirst(t *testing.T) {
	for _, tc := range []struct {
		desc  string
		yaml  string
		first string   // field the first line names
		all   []string // fields named on the following lines, in order
	}{
		{
			desc: "a cross-field problem before a decoding problem",
			yaml: `
interfaces: [eth0]
services:
  - name: a
    vip: 203.0.113.10
    port: 80
    backends: [{address: 192.0.2.11, port: 81}]
  - name: B!
    vip: 203.0.113.300
    port: 70000
`,
			first: "services[0].backends[0].port",
			all:   []string{"services[1].name", "services[1].vip", "services[1].port"},
		},
		{
			desc: "fields in another order than the struct",
			yaml: `
interfaces: [eth0]
services:
  - port: 0
    forwarding: magic
    vip: 224.0.0.1
    name: "-x"
`,
			first: "services[0].port",
			all:   []string{"services[0].forwarding", "services[0].vip", "services[0].name"},
		},
		{
			desc: "tables after services",
			yaml: `
interfaces: [eth0, eth0]
services:
  - {name: a, vip: 203.0.113.10, port: 80, backends: [{address: 192.0.2.1}, {address: 192.0.2.2}]}
tables: {max_backends: 1, ring_size: 100}
`,
			first: "interfaces[1]",
			all:   []string{"services[0].backends[1]", "tables.ring_size"},
		},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml))
			if err == nil {
				t.Fatal("Parse accepted it")
			}
			lines := strings.Split(err.Error(), "\n")
			fields := append([]string{tc.first}, tc.all...)
			if len(lines) != len(fields) {
				t.Fatalf("got %d errors, want %d:\n%v", len(lines), len(fields), err)
			}
			for i, f := range fields {
				if !strings.Contains(lines[i], " "+f+": ") {
					t.Errorf("error %d = %q, want it about %s", i, lines[i], f)
				}
			}
		})
	}
}

func TestParseNoEchoes(t *testing.T) {
	// A field refused while decoding is not reported again, nor are the
	// fields that depend on it.
	_, err := Parse([]byte(`
interfaces: [eth0]
services:
  - name: a
    vip: 203.0.113.300
    port: 70000
    affinity_timeout: soon
    backends: [{address: 2001:db8::1}, {address: 192.0.2.1}]
`))
	if err == nil {
		t.Fatal("Parse accepted it")
	}
	lines := strings.Split(err.Error(), "\n")
	if len(lines) != 3 {
		t.Errorf("got %d errors, want 3 (vip, port, affinity_timeout):\n%v", len(lines), err)
	}
}

func TestParseManyErrors(t *testing.T) {
	var b strings.Builder
	b.WriteString("interfaces: [eth0]\nservices:\n")
	for range 50 {
		b.WriteString("  - {name: a, vip: 203.0.113.10, port: 0}\n")
	}
	_, err := Parse([]byte(b.String()))
	if err == nil {
		t.Fatal("Parse accepted it")
	}
	lines := strings.Split(err.Error(), "\n")
	if len(lines) != maxReported+1 || !strings.Contains(lines[maxReported], "further problems not shown") {
		t.Errorf("got %d lines, want %d and a last line saying more were left out:\n%v", len(lines), maxReported+1, err)
	}
}

func TestParseAliasBomb(t *testing.T) {
	// 2,000 services sharing, by alias, a list of 1,000 backends: the
	// decoder must stop at the backend limit rather than expand it all.
	var b strings.Builder
	b.WriteString("datapath: splice\nservices:\n  - &s\n    name: a\n    vip: 203.0.113.10\n    port: 80\n    backends: &b [")
	for i := range 1000 {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString("{address: 192.0.2.1}")
	}
	b.WriteString("]\n")
	for range 2000 {
		b.WriteString("  - *s\n")
	}
	start := time.Now()
	_, err := Parse([]byte(b.String()))
	if err == nil {
		t.Fatal("Parse accepted it")
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("Parse took %v", d)
	}
}

func TestMarshalRoundTrip(t *testing.T) {
	splice := Default()
	splice.Datapath = DatapathSplice
	for _, tc := range []struct {
		desc string
		c    *Config
	}{
		{"example", mustParse(t, example)},
		{"defaults with splice", splice},
		{"everything set", mustParse(t, `
interfaces: [eth0, "eth1"]
datapath: xdp-generic
hash_seed: 7
tables: {connections: 2048, affinity: 4096, ring_size: 251, max_services: 11, max_backends: 14}
services:
  - name: v6
    vip: 2001:db8::10
    port: 443
    protocol: udp
    affinity: connection
    affinity_timeout: 90m30s
    backends:
      - {address: 2001:db8::11, weight: 0, state: draining}
      - {address: 2001:db8::12, weight: 10000}
      - {address: 2001:db8::13, state: draining, close_at: "2026-12-06T16:00:00.25Z", close_rate: 20}
      - {address: 2001:db8::14, state: draining, close_at: 2026-12-06T17:00:00+01:00}
  - name: "0"
    vip: 203.0.113.10
    port: 80
  - name: "true"
    vip: 198.51.100.7
    port: 65535
    idle_after: 45s
    backends: [{address: 192.0.2.1}]
  - name: fullnat
    vip: 198.51.100.10
    port: 80
    forwarding: fullnat
    snat_address: 198.51.100.2
    backends: [{address: 192.0.2.2, port: 8765}]
  - name: gue
    vip: 198.51.100.11
    port: 80
    forwarding: gue
    tunnel_source: 198.51.100.128/25
    gue_port: 5555
    backends: [{address: 192.0.2.3}, {address: 2001:db8::3}]
  - name: ipip
    vip: 198.51.100.11
    port: 81
    icmp_echo: pass
    forwarding: ipip
    tunnel_source: 198.51.100.3
    backends: [{address: 192.0.2.3}]
  - name: http
    vip: 198.51.100.8
    port: 80
    health: {type: http, path: "/healthz?full=1", host: "app.example:8080", expect_status: [200, 204], interval: 500ms, timeout: 100ms, rise: 1, fall: 1000}
    on_down: reset
  - name: ws
    vip: 198.51.100.9
    port: 80
    health: {type: websocket, send: "ping: 1"}
  - name: ws-plain
    vip: 198.51.100.9
    port: 81
    health: {type: websocket, interval: 15s}
  - name: unprobed
    vip: 198.51.100.9
    port: 82
    health: {type: none}
    on_down: keep
  - name: ws-lines
    vip: 198.51.100.9
    port: 83
    health: {type: websocket, send: "ping\n\n  pong\n"}
`)},
		{"splice block", mustParse(t, "datapath: splice\nsplice: {loops: 3, max_connections: 100000}\n")},
		{"splice loops only", mustParse(t, "datapath: auto\ninterfaces: [eth0]\nsplice: {loops: 1}\n")},
		{"splice settings", mustParse(t, `
datapath: splice
services:
  - name: chat
    vip: 2001:db8::10
    port: 8765
    idle_timeout: 90m
    proxy_protocol: v2
    backends: [{address: 2001:db8::11}]
  - name: plain
    vip: 203.0.113.10
    port: 80
    idle_timeout: 0s
    proxy_protocol: none
`)},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			out, err := tc.c.Marshal()
			if err != nil {
				t.Fatalf("Marshal: %v", err)
			}
			back, err := Parse(out)
			if err != nil {
				t.Fatalf("Parse(Marshal(c)): %v\nYAML:\n%s", err, out)
			}
			if !reflect.DeepEqual(back, tc.c) {
				t.Errorf("Parse(Marshal(c)) =\n%+v\nwant\n%+v\nYAML:\n%s", back, tc.c, out)
			}
			// Marshal encodes services one at a time; the file reads as
			// the whole configuration encoded as one document.
			root := tc.c.rootNode()
			list := &yaml.Node{Kind: yaml.SequenceNode}
			for _, s := range tc.c.Services {
				list.Content = append(list.Content, serviceNode(s))
			}
			root.Content = append(root.Content, str("services"), list)
			var whole bytes.Buffer
			if err := encode(&whole, root); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(out, whole.Bytes()) {
				t.Errorf("Marshal differs from one document:\n%s\nwant\n%s", out, whole.Bytes())
			}
		})
	}
}

func TestMarshalSchema(t *testing.T) {
	out, err := mustParse(t, minimal).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"interfaces: [eth0]\n",
		"hash_seed: 0x74657468\n",
		"  ring_size: 65537\n",
		"    affinity_timeout: 3h0m0s\n",
		"      - address: 192.0.2.11\n        port: 8765\n        weight: 1\n        state: active\n",
		"    health:\n      type: tcp\n      interval: 2s\n      timeout: 1s\n      rise: 2\n      fall: 3\n    on_down: keep\n",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("Marshal output lacks %q:\n%s", want, out)
		}
	}
}

func TestParseHealth(t *testing.T) {
	for _, tc := range []struct {
		desc   string
		health string // flow mapping, or "" for none
		want   health.Check
	}{
		{"no health block: a tcp check", "", health.Check{Type: "tcp", Interval: 2 * time.Second, Timeout: time.Second, Rise: 2, Fall: 3}},
		{"an empty block", "{}", health.Check{Type: "tcp", Interval: 2 * time.Second, Timeout: time.Second, Rise: 2, Fall: 3}},
		{"a null block", "~", health.Check{Type: "tcp", Interval: 2 * time.Second, Timeout: time.Second, Rise: 2, Fall: 3}},
		{"a short interval halves the default timeout", "{interval: 200ms, fall: 5}", health.Check{Type: "tcp", Interval: 200 * time.Millisecond, Timeout: 100 * time.Millisecond, Rise: 2, Fall: 5}},
		{"http with defaults", "{type: http}", health.Check{Type: "http", Path: "/", ExpectStatus: [2]int{200, 399}, Interval: 2 * time.Second, Timeout: time.Second, Rise: 2, Fall: 3}},
		{"http with one status", "{type: http, path: /healthz, host: app.example, expect_status: 204}", health.Check{Type: "http", Path: "/healthz", Host: "app.example", ExpectStatus: [2]int{204, 204}, Interval: 2 * time.Second, Timeout: time.Second, Rise: 2, Fall: 3}},
		{"websocket with an echo", "{type: websocket, path: /ws, send: ping, interval: 1s, timeout: 900ms, rise: 1, fall: 1}", health.Check{Type: "websocket", Path: "/ws", Send: "ping", Interval: time.Second, Timeout: 900 * time.Millisecond, Rise: 1, Fall: 1}},
		{"none", "{type: none}", health.Check{Type: HealthNone}},
		{"via the backend, as by default", "{via: backend}", health.Check{Type: "tcp", Interval: 2 * time.Second, Timeout: time.Second, Rise: 2, Fall: 3}},
		{"via the VIP", "{type: http, via: vip}", health.Check{Type: "http", Path: "/", ExpectStatus: [2]int{200, 399}, Interval: 2 * time.Second, Timeout: time.Second, Rise: 2, Fall: 3, Via: "vip"}},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			data := minimal
			if tc.health != "" {
				data = withHealth(tc.health)
			}
			s := mustParse(t, data).Services[0]
			if s.Health != tc.want {
				t.Errorf("Health = %+v, want %+v", s.Health, tc.want)
			}
			if s.OnDown != OnDownKeep {
				t.Errorf("OnDown = %q, want %q", s.OnDown, OnDownKeep)
			}
			target, ok := s.Target(s.Backends[0])
			if ok != (tc.want.Type != HealthNone) {
				t.Fatalf("Target ok = %v for type %s", ok, tc.want.Type)
			}
			if ok && (target.Addr.String() != "192.0.2.11:8765" || target.Check != tc.want) {
				t.Errorf("Target = %+v", target)
			}
			// A check via the VIP probes the service's VIP and port; in
			// the minimal (dsr) service, and not in a nat one, whose
			// clients reach the backend's own address.
			if want := tc.want.Via == health.ViaVIP; target.VIP.IsValid() != want || want && (target.VIP != netip.AddrPortFrom(s.VIP, s.Port) || target.Protocol != s.Protocol) {
				t.Errorf("Target VIP %s/%s, want the service's: %v", target.VIP, target.Protocol, want)
			}
			s.Forwarding = ForwardingNAT
			if nt, _ := s.Target(s.Backends[0]); nt.VIP.IsValid() || nt.Check.Via != "" {
				t.Errorf("nat Target = %+v, want a plain probe", nt)
			}
		})
	}
	// Several problems of one check are each named.
	_, err := Parse([]byte(withHealth("{type: http, path: x, expect_status: [500, 200], send: a}")))
	for _, f := range []string{"services[0].health.path: ", "services[0].health.expect_status: ", "services[0].health.send: "} {
		if err == nil || !strings.Contains(err.Error(), f) {
			t.Errorf("error %v does not name %s", err, f)
		}
	}
}

func TestValidate(t *testing.T) {
	c := Default()
	c.Datapath = DatapathSplice
	if err := c.Validate(); err != nil {
		t.Fatalf("Validate(Default with splice) = %v", err)
	}
	if err := Default().Validate(); err == nil || !strings.Contains(err.Error(), "interfaces: ") {
		t.Errorf("Validate(Default()) = %v, want interfaces required", err)
	}

	// A service as the control plane would build it from an API call.
	s := Service{
		Name:            "api",
		VIP:             netip.MustParseAddr("203.0.113.20"),
		Port:            9000,
		Protocol:        ProtocolTCP,
		Affinity:        AffinitySource,
		AffinityTimeout: time.Hour,
		Forwarding:      ForwardingDSR,
		Health:          DefaultHealth(),
		OnDown:          OnDownKeep,
		ICMPEcho:        ICMPEchoReply,
		Backends:        []Backend{{Address: netip.MustParseAddr("192.0.2.30"), Port: 9000, Weight: 5, State: StateActive}},
	}
	c.Services = []Service{s}
	if err := c.Validate(); err != nil {
		t.Fatalf("Validate(good service) = %v", err)
	}
	c.Services[0].Port = 0
	c.Services[0].Backends[0].Weight = MaxWeight + 1
	err := c.Validate()
	if err == nil {
		t.Fatal("Validate accepted port 0 and a weight too big")
	}
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Path != "services[0].port" || fe.Line != 0 {
		t.Errorf("first FieldError = %+v, want services[0].port without a line", fe)
	}
	if !strings.Contains(err.Error(), "services[0].backends[0].weight: 10001 is out of range 0..10000") {
		t.Errorf("Validate = %v, want the weight named too", err)
	}

	// The splice settings as code could set them.
	c = Default()
	c.Datapath = DatapathSplice
	c.Splice = Splice{Loops: -2, MaxConnections: 1 << 25}
	err = c.Validate()
	for _, want := range []string{"splice.loops: -2 is out of range 0..1024", "splice.max_connections: 33554432 is out of range 0..16777216"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate(bad splice settings) = %v, want %q", err, want)
		}
	}

	var nilConfig *Config
	if nilConfig.Validate() == nil {
		t.Error("Validate(nil) = nil")
	}
	if (&Config{}).Validate() == nil {
		t.Error("Validate(zero Config) = nil")
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()

	missing := filepath.Join(dir, "missing.yaml")
	_, err := Load(missing)
	if err == nil {
		t.Fatal("Load of a missing file succeeded")
	}
	if want := "config: read " + missing + ": "; !strings.HasPrefix(err.Error(), want) {
		t.Errorf("Load(missing) = %q, want it to start with %q", err, want)
	}
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load(missing) = %v, want errors.Is fs.ErrNotExist", err)
	}

	good := filepath.Join(dir, "good.yaml")
	if err := os.WriteFile(good, []byte(example), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Load(good)
	if err != nil {
		t.Fatalf("Load(good) = %v", err)
	}
	if !reflect.DeepEqual(c, mustParse(t, example)) {
		t.Errorf("Load and Parse differ")
	}

	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte(strings.Replace(example, "vip:", "vipp:", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = Load(bad)
	if want := "config: " + bad + ": line 17: services[0].vipp: unknown field"; err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Errorf("Load(bad) = %v, want it to start with %q", err, want)
	}
}

func TestClone(t *testing.T) {
	c, err := Parse([]byte(example))
	if err != nil {
		t.Fatal(err)
	}
	d := c.Clone()
	if !reflect.DeepEqual(c, d) {
		t.Fatalf("clone differs:\n%+v\n%+v", c, d)
	}
	d.Interfaces[0] = "eth9"
	d.Services[0].Name = "other"
	d.Services[0].Backends[0].Weight = 7
	d.Services[0].Health.Interval = time.Minute
	d.Services = append(d.Services, Service{Name: "new"})
	if c.Interfaces[0] == "eth9" || c.Services[0].Name == "other" || c.Services[0].Backends[0].Weight == 7 ||
		c.Services[0].Health.Interval == time.Minute || len(c.Services) != 1 {
		t.Fatalf("changing the clone changed the original: %+v", c)
	}
}

// TestUDPHealthDefaults checks the health check a service gets when its
// file has no health block: a TCP connect for tcp, none for udp (whatever
// the order of protocol and health in the file), and that a udp check is
// accepted for a udp service, with the fields it uses.
func TestUDPHealthDefaults(t *testing.T) {
	udp := strings.Replace(minimal, "port: 8765", "port: 8765\n    protocol: udp", 1)
	if h := mustParse(t, udp).Services[0].Health; h.Type != HealthNone || h != DefaultHealthFor(ProtocolUDP) {
		t.Errorf("udp service without a health block: %+v, want type none", h)
	}
	protocolLast := minimal + "    protocol: udp\n"
	if h := mustParse(t, protocolLast).Services[0].Health; h.Type != HealthNone {
		t.Errorf("udp service with its protocol after the backends: %+v, want type none", h)
	}
	if h := mustParse(t, minimal).Services[0].Health; h != DefaultHealth() {
		t.Errorf("tcp service without a health block: %+v, want %+v", h, DefaultHealth())
	}
	c := mustParse(t, strings.Replace(udp, "protocol: udp", "protocol: udp\n    health: {type: udp, send: ping, interval: 1s}", 1))
	want := health.Check{Type: health.TypeUDP, Send: "ping", Interval: time.Second, Timeout: 500 * time.Millisecond, Rise: 2, Fall: 3}
	if h := c.Services[0].Health; h != want {
		t.Errorf("udp check: %+v, want %+v", h, want)
	}
	again, err := c.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if back := mustParse(t, string(again)); !reflect.DeepEqual(back, c) {
		t.Errorf("a udp check does not survive Marshal:\n%s", again)
	}
}

// TestLoopbackBackendWithSplice checks that the splice datapath, which
// connects to its backends, takes one on the host itself.
func TestLoopbackBackendWithSplice(t *testing.T) {
	yaml := strings.Replace(strings.Replace(minimal, "192.0.2.11", "127.0.0.1", 1), "interfaces: [eth0]", "datapath: splice", 1)
	if c := mustParse(t, yaml); c.Services[0].Backends[0].Address != netip.MustParseAddr("127.0.0.1") {
		t.Errorf("backend %v", c.Services[0].Backends[0].Address)
	}
}
