package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/tetherlb/tether/control"
)

var traceCommand = &cli.Command{
	Name:      "trace",
	Usage:     "show the datapath's decisions as they happen: why this client went to that backend",
	ArgsUsage: "[VIP:PORT[/PROTO]]",
	Description: `trace prints one line per decision, as the datapath makes it: the time, the
packet's addresses, what became of it (XDP: tx, redirect, pass, drop; splice:
proxy or reset), why it was not forwarded (the reason, as tether stats counts
it), and the service, the backend and what chose it: its connection entry
(conn), its client's affinity entry (affinity) or the Maglev ring (ring).

Only the packets of the service given, and with --client of one client
address (to it or from it), are reported: the XDP program filters them
itself. With no trace running the program pays one load of a flag per
packet. Until --count events or Ctrl-C. One trace runs at a time.

--pcap writes the frames as they left the XDP program, as the backend (or,
for a reply, the client) receives them: frames sent back out with XDP_TX are
invisible to tcpdump on the balancer. It keeps the first 160 bytes of each.
The splice datapath has no frames: it reports each connection it takes or
resets.

Examples:
  tether trace 203.0.113.10:8765 --client 198.51.100.7
  tether trace --count 100 -o json
  tether trace 203.0.113.10:8765 --pcap /tmp/chat.pcap --count 1000`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "client", Usage: "only the packets from this `ADDR` or to it"},
		&cli.IntFlag{Name: "count", Usage: "stop after `N` events (0: at Ctrl-C)"},
		&cli.StringFlag{Name: "pcap", Usage: "also write the frames to this pcap `FILE`"},
		outputFlag,
	},
	Action: listing(0, 1, "[VIP:PORT[/PROTO]]", func(c *cli.Context, a []string, format string) error {
		spec := control.TraceSpec{Client: c.String("client"), Count: c.Int("count"), Frames: c.IsSet("pcap")}
		if len(a) == 1 {
			spec.Service = a[0]
		}
		if spec.Count < 0 {
			return fmt.Errorf("--count %d: want a number of events, or 0 for no end", spec.Count)
		}
		return trace(c.Context, client(c), c.App.Writer, c.App.ErrWriter, spec, format, c.String("pcap"))
	}),
}

// trace prints a trace as lines or JSON, and writes its frames to a pcap
// file if pcapPath is set, until it ends or Ctrl-C.
func trace(ctx context.Context, cl *control.Client, w, ew io.Writer, spec control.TraceSpec, format, pcapPath string) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	var pw *pcapWriter
	if pcapPath != "" {
		f, err := os.OpenFile(pcapPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return err
		}
		defer f.Close()
		if pw, err = newPcapWriter(f); err != nil {
			return fmt.Errorf("write %s: %w", pcapPath, err)
		}
	}
	enc := json.NewEncoder(w)
	n, frames := 0, 0
	end, err := cl.Trace(ctx, spec, func(l control.TraceLine) error {
		n++
		if pw != nil && len(l.Frame) > 0 {
			frames++
			if err := pw.write(l); err != nil {
				return fmt.Errorf("write %s: %w", pcapPath, err)
			}
		}
		if format == "json" {
			l.Frame = nil
			return enc.Encode(l)
		}
		_, err := fmt.Fprintln(w, traceLine(l))
		return err
	})
	if err != nil && ctx.Err() == nil {
		return err
	}
	msg := fmt.Sprintf("%d events", n)
	if end.Lost > 0 {
		msg += fmt.Sprintf(", %d lost (the datapath had no room: narrow the trace)", end.Lost)
	}
	if pw != nil {
		msg += fmt.Sprintf("; %d frames written to %s", frames, pcapPath)
	}
	fmt.Fprintln(ew, msg)
	return nil
}

// traceLine formats one decision.
func traceLine(l control.TraceLine) string {
	s := l.Time.Local().Format("15:04:05.000000") + " " + l.Protocol
	if l.Src != "" {
		s += " " + l.Src + " > " + l.Dst
	}
	s += " " + l.Verdict
	if l.Reason != "" {
		s += " " + l.Reason
	}
	if l.Backend != "" {
		s += " " + l.Service + " → " + l.Backend
	}
	if l.By != "" {
		s += " by " + l.By
	}
	return s
}

// pcapWriter writes frames in the pcap format (LINKTYPE_ETHERNET,
// microseconds).
type pcapWriter struct{ w io.Writer }

// pcapSnap is the snapshot length the file announces: the program keeps
// the first 160 bytes of each frame.
const pcapSnap = 160

func newPcapWriter(w io.Writer) (*pcapWriter, error) {
	var h [24]byte
	binary.LittleEndian.PutUint32(h[0:], 0xa1b2c3d4) // magic, microseconds
	binary.LittleEndian.PutUint16(h[4:], 2)          // version 2.4
	binary.LittleEndian.PutUint16(h[6:], 4)
	binary.LittleEndian.PutUint32(h[16:], pcapSnap)
	binary.LittleEndian.PutUint32(h[20:], 1) // LINKTYPE_ETHERNET
	_, err := w.Write(h[:])
	return &pcapWriter{w: w}, err
}

func (p *pcapWriter) write(l control.TraceLine) error {
	var h [16]byte
	us := l.Time.UnixMicro()
	binary.LittleEndian.PutUint32(h[0:], uint32(us/1e6))
	binary.LittleEndian.PutUint32(h[4:], uint32(us%1e6))
	binary.LittleEndian.PutUint32(h[8:], uint32(len(l.Frame)))
	binary.LittleEndian.PutUint32(h[12:], uint32(max(l.Len, len(l.Frame))))
	if _, err := p.w.Write(h[:]); err != nil {
		return err
	}
	_, err := p.w.Write(l.Frame)
	return err
}
