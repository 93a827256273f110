package benchrun

import "testing"

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
