package benchrun

import (
	"maps"
	"testing"
)

func TestSNMPField(t *testing.T) {
	const snmp = `Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 1234
Tcp: RtoAlgorithm ActiveOpens RetransSegs
Tcp: 1 7 42
`
	for _, c := range []struct {
		proto, field string
		want         uint64
	}{{"Ip:", "InReceives", 1234}, {"Tcp:", "RetransSegs", 42}, {"Tcp:", "ActiveOpens", 7}} {
		if got, err := SNMPField(snmp, c.proto, c.field); err != nil || got != c.want {
			t.Errorf("SNMPField(%s %s) = %d, %v; want %d", c.proto, c.field, got, err, c.want)
		}
	}
	for _, c := range [][2]string{{"Udp:", "InDatagrams"}, {"Tcp:", "Tcp:"}, {"Tcp:", "OutRsts"}} {
		if got, err := SNMPField(snmp, c[0], c[1]); err == nil {
			t.Errorf("SNMPField(%s %s) = %d, want an error", c[0], c[1], got)
		}
	}
}

func TestParseReport(t *testing.T) {
	rep := "\n     42596  [k] pvm_safe_halt_hc\n       164  [k] bpf_prog_8bfa598103d213b7_tether_xdp\n" +
		"        12  [.] 0x0000000000004a26\n         3  [.] cmd/link/internal/ld.(*Link) foo\n# a comment\n\n"
	got := parseReport(rep)
	want := map[string]int{"pvm_safe_halt_hc": 42596, "bpf_prog_8bfa598103d213b7_tether_xdp": 164,
		"0x0000000000004a26": 12, "cmd/link/internal/ld.(*Link) foo": 3}
	if !maps.Equal(got, want) {
		t.Fatalf("parseReport = %v, want %v", got, want)
	}
}
