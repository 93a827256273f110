package config

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

const withSync = minimal + `sync:
  listen: 198.51.100.2:7946
  peers: [198.51.100.3:7946, 198.51.100.4:7946]
  key: 0123456789abcdef0123456789abcdef
`

func TestParseSync(t *testing.T) {
	c := mustParse(t, withSync)
	want := &Sync{
		Listen:    netip.MustParseAddrPort("198.51.100.2:7946"),
		Peers:     []netip.AddrPort{netip.MustParseAddrPort("198.51.100.3:7946"), netip.MustParseAddrPort("198.51.100.4:7946")},
		Key:       "0123456789abcdef0123456789abcdef",
		StartWait: DefaultSyncStartWait,
	}
	if !reflect.DeepEqual(c.Sync, want) {
		t.Errorf("Sync = %+v\nwant %+v", c.Sync, want)
	}
	out, err := c.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if again := mustParse(t, string(out)); !reflect.DeepEqual(again.Sync, c.Sync) {
		t.Errorf("after a round trip: %+v, want %+v\n%s", again.Sync, c.Sync, out)
	}
	cl := c.Clone()
	cl.Sync.Peers[0] = netip.AddrPort{}
	if !c.Sync.Peers[0].IsValid() {
		t.Error("Clone shares the peers")
	}
	if c := mustParse(t, strings.Replace(withSync, "  key:", "  start_wait: 0s\n  key:", 1)); c.Sync.StartWait != 0 {
		t.Errorf("start_wait 0s: %v", c.Sync.StartWait)
	}
}

func TestParseSyncBad(t *testing.T) {
	for _, tc := range []struct{ desc, from, to, field, msg string }{
		{"no listen", "  listen: 198.51.100.2:7946\n", "", "sync.listen", "required"},
		{"listen without a port", "listen: 198.51.100.2:7946", "listen: 198.51.100.2", "sync.listen", "is not ADDR:PORT"},
		{"listen on port 0", "listen: 198.51.100.2:7946", "listen: 198.51.100.2:0", "sync.listen", "the port must not be 0"},
		{"no peers", "  peers: [198.51.100.3:7946, 198.51.100.4:7946]\n", "", "sync.peers", "at least one peer"},
		{"itself as a peer", "[198.51.100.3:7946,", "[198.51.100.2:7947,", "sync.peers[0]", "is this host's sync.listen address"},
		{"a peer twice", "198.51.100.4:7946]", "198.51.100.3:7947]", "sync.peers[1]", "already sync.peers[0]"},
		{"another family", "198.51.100.4:7946]", "\"[2001:db8:100::4]:7946\"]", "sync.peers[1]", "not of sync.listen's family"},
		{"a mapped address", "198.51.100.4:7946]", "\"[::ffff:198.51.100.4]:7946\"]", "sync.peers[1]", "write it as 198.51.100.4:7946"},
		{"a loopback listen", "listen: 198.51.100.2:7946", "listen: 127.0.0.1:7946", "sync.listen", "not unspecified, loopback"},
		{"a short key", "0123456789abcdef0123456789abcdef", "s3cret", "sync.key", "6 bytes: want 32"},
		{"no key", "  key: 0123456789abcdef0123456789abcdef\n", "", "sync.key", "required"},
		{"a long wait", "  key:", "  start_wait: 1h\n  key:", "sync.start_wait", "out of range"},
		{"an unknown field", "  listen:", "  listn:", "sync.listn", "unknown field"},
		{"the splice datapath", "sync:\n", "datapath: splice\nsync:\n", "sync", "the splice datapath shares no entries"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			data := strings.Replace(withSync, tc.from, tc.to, 1)
			if data == withSync {
				t.Fatalf("the edit %q changed nothing", tc.from)
			}
			_, err := Parse([]byte(data))
			if err == nil || !strings.Contains(err.Error(), tc.field+": ") || !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("error %v, want %s: ...%s", err, tc.field, tc.msg)
			}
		})
	}
}
