// Command flowcost measures what tether's XDP program costs a packet under
// lab traffic as the number of live flows grows: 1k, 16k, 256k and 1M
// UDP flows, each first entered in the connection table, then every flow
// sent again in turn while the kernel's BPF run-time statistics count the
// balancer's program; the trivial XDP forwarder (rewrites the MACs and
// sends every frame to one backend: the floor of an XDP balancer) is
// measured on the same traffic, in alternating rounds on one lab.
//
//	sudo go run ./test/bench/flowcost -out docs/bench/flowcost.md
package main

import (
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/cilium/ebpf"

	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/test/bench/benchrun"
	"github.com/tetherlb/tether/test/bench/pktgen"
)

const (
	svcPort = 9000
	ports   = 4096 // per spoofed source; sources from 192.0.2.0
	burst   = 1024 // frames a burst, a millisecond apart: the veth queues keep up
)

type env struct {
	l    *lab.Lab
	dir  string
	bin  string
	conf string
}

func main() {
	benchrun.Name = "flowcost"
	defer benchrun.Cleanup()
	benchrun.FailOnSignal()
	out := flag.String("out", "", "also write the report to `FILE`")
	rounds := flag.Int("rounds", 3, "rounds, each measuring tether and the trivial forwarder at every flow count")
	passes := flag.Int("passes", 4, "times every flow is sent while the statistics count")
	flag.Parse()
	if os.Geteuid() != 0 {
		benchrun.Fail("needs root (network namespaces, XDP)")
	}
	counts := []int{1024, 16384, 262144, 1 << 20}
	e := setup()
	type key struct {
		who   string
		flows int
	}
	samples := map[key][]float64{}
	for r := range *rounds {
		for _, who := range []string{"trivial", "tether"} {
			var stop func()
			if who == "tether" {
				stop = tether(e)
			} else {
				stop = trivial(e)
			}
			for _, n := range counts {
				ns := measure(e, n, *passes)
				samples[key{who, n}] = append(samples[key{who, n}], ns)
				fmt.Fprintf(os.Stderr, "round %d: %s, %d flows: %.0f ns a packet\n", r+1, who, n, ns)
			}
			stop()
		}
	}

	w := benchrun.Report(*out)
	fmt.Fprintf(w, "# tether XDP cost by live flows (%s, %s)\n\n", time.Now().UTC().Format("2006-01-02"), benchrun.Kernel())
	fmt.Fprintf(w, "`sudo go run ./test/bench/flowcost`: UDP flows from spoofed sources (%d ports each), every flow entered first, then sent %d times over in bursts of %d frames a millisecond apart; ns a run of the balancer's XDP program from the kernel's run-time statistics (which slow every program down a little), median of %d rounds alternating tether and the trivial forwarder (MAC rewrite to one backend, XDP_TX). Tables of 2,097,152 connections, insertion guard off.\n\n", ports, *passes, burst, *rounds)
	fmt.Fprintln(w, "| live flows | tether ns/packet | min–max | trivial forwarder ns/packet | tether / trivial |")
	fmt.Fprintln(w, "|---:|---:|---:|---:|---:|")
	for _, n := range counts {
		t, f := samples[key{"tether", n}], samples[key{"trivial", n}]
		tm, fm := benchrun.Median(t), benchrun.Median(f)
		fmt.Fprintf(w, "| %d | %.0f | %.0f–%.0f | %.0f | %.2f |\n", n, tm, minOf(t), maxOf(t), fm, tm/fm)
	}
}

func minOf(s []float64) float64 {
	m := s[0]
	for _, v := range s {
		m = min(m, v)
	}
	return m
}

func maxOf(s []float64) float64 {
	m := s[0]
	for _, v := range s {
		m = max(m, v)
	}
	return m
}

func setup() *env {
	dir, err := os.MkdirTemp("", "tether-flowcost-")
	if err != nil {
		benchrun.Fail(err.Error())
	}
	benchrun.AtExit(func() { os.RemoveAll(dir) })
	e := &env{dir: dir, bin: filepath.Join(dir, "tether")}
	if b, err := exec.Command("go", "build", "-o", e.bin, "./cmd/tether").CombinedOutput(); err != nil {
		benchrun.Fail(fmt.Sprintf("build tether: %v\n%s", err, b))
	}
	l, err := lab.New(lab.Options{Backends: 3, Clients: 1})
	if err != nil {
		benchrun.Fail(err.Error())
	}
	benchrun.AtExit(func() { l.Close() })
	e.l = l
	// The generator sends with XDP_TX from the client's veth.
	if err := l.SetPortXDP(l.Client, true); err != nil {
		benchrun.Fail(err.Error())
	}
	var b strings.Builder
	fmt.Fprintf(&b, "interfaces: [eth0]\ndatapath: xdp\ntables: {connections: 2097152, affinity: 65536, insert_rate: 0}\nservices:\n")
	fmt.Fprintf(&b, "  - {name: udp, vip: %s, port: %d, protocol: udp, affinity: connection, health: {type: none}, backends: [", l.VIP4, svcPort)
	for i, be := range l.Backends {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "{address: %s}", be.Addr4)
	}
	b.WriteString("]}\n")
	e.conf = filepath.Join(dir, "tether.yaml")
	if err := os.WriteFile(e.conf, []byte(b.String()), 0o600); err != nil {
		benchrun.Fail(err.Error())
	}
	return e
}

// measure enters n flows, then sends every one passes times with the
// run-time statistics on, and returns ns a run of the balancer's program.
func measure(e *env, n, passes int) float64 {
	sources := max(1, n/ports)
	p := min(n, ports)
	gen, err := pktgen.NewGenerator(sources, p)
	if err != nil {
		benchrun.Fail(err.Error())
	}
	defer gen.Close()
	send := func(total int) {
		// Bursts of the generator's flows in order: burst k starts at
		// flow k*burst (its source and port in the template).
		for k := 0; k*burst < total; k++ {
			f := (k * burst) % n
			src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(f / p)}), uint16(1024+f%p))
			fr := pktgen.UDPFrame(e.l.Client.MAC, e.l.Balancer.MAC, src, netip.AddrPortFrom(e.l.VIP4, svcPort), 64)
			c := uint32(min(burst, n-f, total-k*burst))
			if err := e.l.Client.Do(func() error {
				_, err := gen.Send(e.l.Client.Ifindex, fr, c)
				return err
			}); err != nil {
				benchrun.Fail(err.Error())
			}
			time.Sleep(time.Millisecond)
		}
	}
	send(n) // enter every flow
	time.Sleep(200 * time.Millisecond)
	var id ebpf.ProgramID
	if err := e.l.Balancer.Do(func() error {
		var err error
		id, err = pktgen.XDPProgramID(e.l.Balancer.Ifindex)
		return err
	}); err != nil {
		benchrun.Fail(err.Error())
	}
	stats, err := pktgen.EnableRunStats()
	if err != nil {
		benchrun.Fail(err.Error())
	}
	defer stats.Close()
	t0, n0, err := pktgen.RunStats(id)
	if err != nil {
		benchrun.Fail(err.Error())
	}
	send(n * passes)
	time.Sleep(200 * time.Millisecond)
	t1, n1, err := pktgen.RunStats(id)
	if err != nil {
		benchrun.Fail(err.Error())
	}
	if n1 <= n0 {
		benchrun.Fail("the balancer's program did not run")
	}
	if runs := n1 - n0; runs < uint64(n*passes)*9/10 {
		fmt.Fprintf(os.Stderr, "warning: %d runs for %d frames sent\n", runs, n*passes)
	}
	return float64((t1 - t0).Nanoseconds()) / float64(n1-n0)
}

// trivial attaches the trivial XDP forwarder to the balancer.
func trivial(e *env) func() { return benchrun.TrivialForwarder(e.l) }

// tether runs the daemon until the returned function stops it and detaches
// its program.
func tether(e *env) func() {
	return benchrun.TetherDaemon(e.l, e.bin, e.conf, e.dir, "tether-flowcost")
}
