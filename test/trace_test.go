package test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"

	"github.com/tetherlb/tether/config"
	"github.com/tetherlb/tether/control"
	"github.com/tetherlb/tether/internal/lab"
)

// TestTrace runs `tether trace --client ADDR --pcap FILE -o json` on
// each datapath while that client opens two WebSocket connections through
// the VIP and sends a UDP datagram to a port no service has, and a client
// the filter leaves out connects too. The events name the backend each
// connection echoes from and what chose it: the ring for the first
// connection, its connection entry for its later packets (XDP), its
// affinity entry for the second; the stray datagram is passed to the
// kernel as pass_not_vip (XDP). The pcap file, read back with gopacket,
// holds the frames as the backend got them: its MAC address, the client's
// and the VIP's, the SYN first. The splice datapath reports each
// connection it takes, without frames.
func TestTrace(t *testing.T) { forEachDatapath(t, testTrace) }

func testTrace(t *testing.T, dp string) {
	l := lab.NewT(t, lab.Options{Backends: 3, Clients: 2})
	for _, be := range l.Backends {
		serveEcho(t, l, be)
	}
	d := startDaemon(t, l, withDatapath(chatConfig(l, l.Backends), dp))
	vip := netip.AddrPortFrom(l.VIP4, chatPort)
	traced, other := l.ClientAddrs4[0], l.ClientAddrs4[1]
	pcapPath := filepath.Join(t.TempDir(), "trace.pcap")

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, tetherBin, "--socket", d.socket, "trace", "--client", traced.String(), "--pcap", pcapPath, "-o", "json")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	stopped := false
	defer func() {
		if !stopped {
			cmd.Process.Kill()
			cmd.Wait()
		}
	}()
	d.waitLog("trace started", 10*time.Second)

	url := "ws://" + vip.String() + "/chat"
	var backends []string
	for i := range 2 {
		c, err := dial(ctx, l, traced, url)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.ws.Echo(ctx, fmt.Sprintf("echo %d", i)); err != nil {
			t.Fatal(err)
		}
		backends = append(backends, c.backend)
		c.ws.Close()
	}
	if c, err := dial(ctx, l, other, url); err == nil {
		c.ws.Close()
	} else {
		t.Fatal(err)
	}
	if dp == config.DatapathXDP {
		u, err := l.Client.Dial(ctx, "udp", traced, netip.AddrPortFrom(l.VIP4, 9).String())
		if err != nil {
			t.Fatal(err)
		}
		u.Write([]byte("stray"))
		u.Close()
	}
	time.Sleep(500 * time.Millisecond)
	cmd.Process.Signal(syscall.SIGINT)
	err := cmd.Wait()
	stopped = true
	if err != nil {
		t.Fatalf("tether trace: %v\n%s", err, stderr.String())
	}
	d.waitLog("trace ended", 5*time.Second)
	t.Logf("tether trace said: %s", strings.TrimSpace(stderr.String()))

	var lines []control.TraceLine
	sc := bufio.NewScanner(&stdout)
	for sc.Scan() {
		var line control.TraceLine
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			t.Fatalf("%v: %s", err, sc.Text())
		}
		lines = append(lines, line)
	}
	if backends[0] != backends[1] {
		t.Fatalf("the client's two connections echoed from %v: source affinity broke", backends)
	}
	var want string
	for _, be := range l.Backends {
		if be.Name == backends[0] {
			want = netip.AddrPortFrom(be.Addr4, chatPort).String()
		}
	}
	// The connections, in order: by their client port.
	var conns []string
	by := map[string][]string{}
	stray := 0
	for _, line := range lines {
		if !strings.HasPrefix(line.Src, traced.String()+":") && !strings.HasPrefix(line.Dst, traced.String()+":") {
			t.Errorf("an event of another client: %+v", line)
			continue
		}
		if line.Reason == "pass_not_vip" && line.Protocol == "udp" {
			stray++
			continue
		}
		if line.Dst != vip.String() || line.Backend != want || line.Service != "chat" || line.Verdict != "tx" && dp == config.DatapathXDP || line.Reason != "" {
			t.Errorf("event %+v, want to %s sent to %s of chat", line, vip, want)
			continue
		}
		if _, ok := by[line.Src]; !ok {
			conns = append(conns, line.Src)
		}
		by[line.Src] = append(by[line.Src], line.By)
	}
	t.Logf("%s: %d events; what chose the backend, per connection: %s %v, %s %v", dp, len(lines), conns[0], by[conns[0]], conns[len(conns)-1], by[conns[len(conns)-1]])
	if len(conns) != 2 {
		t.Fatalf("events of %d connections of %s, want 2: %v", len(conns), traced, conns)
	}
	first, second := by[conns[0]], by[conns[1]]
	if dp == config.DatapathSplice {
		if len(first) != 1 || first[0] != "ring" || len(second) != 1 || second[0] != "affinity" {
			t.Errorf("splice events %v then %v, want one by ring then one by affinity", first, second)
		}
		if _, err := os.Stat(pcapPath); err != nil {
			t.Error(err)
		}
		return
	}
	// XDP: the SYN and the handshake's ACK by the ring (a bare SYN is not
	// recorded), the rest by the connection entry; the second
	// connection's SYN by the client's affinity entry.
	if len(first) < 4 || first[0] != "ring" || first[1] != "ring" || first[2] != "conn" || first[len(first)-1] != "conn" {
		t.Errorf("the first connection's packets were decided by %v, want ring, ring, then conn", first)
	}
	if len(second) < 4 || second[0] != "affinity" || second[2] != "conn" {
		t.Errorf("the second connection's packets were decided by %v, want affinity first, then conn", second)
	}
	if stray != 1 {
		t.Errorf("%d events of the stray datagram, want 1 (pass_not_vip)", stray)
	}

	// The pcap file: the frames as the backend got them.
	f, err := os.Open(pcapPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, err := pcapgo.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	if r.LinkType() != layers.LinkTypeEthernet {
		t.Errorf("link type %v", r.LinkType())
	}
	var beMAC net.HardwareAddr
	for _, be := range l.Backends {
		if be.Name == backends[0] {
			beMAC = be.MAC
		}
	}
	frames := 0
	for {
		data, ci, err := r.ReadPacketData()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		pkt := gopacket.NewPacket(data, layers.LayerTypeEthernet, gopacket.Default)
		eth, _ := pkt.Layer(layers.LayerTypeEthernet).(*layers.Ethernet)
		ip, _ := pkt.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
		if eth == nil || ip == nil {
			t.Fatalf("frame %d does not decode as Ethernet and IPv4: %v", frames, pkt)
		}
		if ip.Protocol == layers.IPProtocolUDP {
			frames++
			continue // the stray datagram, passed to the kernel as it came
		}
		tcp, _ := pkt.Layer(layers.LayerTypeTCP).(*layers.TCP)
		if tcp == nil || !bytes.Equal(eth.DstMAC, beMAC) || ip.SrcIP.String() != traced.String() || ip.DstIP.String() != l.VIP4.String() || ci.Length < ci.CaptureLength {
			t.Fatalf("frame %d: %v → %v, %v → %v (%d of %d bytes), want %v → %v from %s to the VIP", frames, eth.SrcMAC, eth.DstMAC, ip.SrcIP, ip.DstIP, ci.CaptureLength, ci.Length, "the balancer", beMAC, traced)
		}
		if frames == 0 && (!tcp.SYN || tcp.ACK) {
			t.Errorf("the first frame is not the SYN: %v", tcp)
		}
		frames++
	}
	if frames != len(lines) {
		t.Errorf("%d frames in the pcap file, %d events", frames, len(lines))
	}
}
