package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strconv"
	"time"

	"github.com/tetherlb/tether/datapath"
)

// TraceLine is one line of a trace as GET /v1/trace streams it (one JSON
// object a line): a decision of the datapath, or the last line (End),
// which counts the events the datapath had no room for.
type TraceLine struct {
	Time     time.Time `json:"time,omitzero"`
	Src      string    `json:"src,omitempty"` // ADDR:PORT as the packet came
	Dst      string    `json:"dst,omitempty"`
	Protocol string    `json:"protocol,omitempty"`
	// Verdict, Reason and By as datapath.TraceEvent says.
	Verdict string `json:"verdict,omitempty"`
	Reason  string `json:"reason,omitempty"`
	By      string `json:"by,omitempty"`
	// Service is the service's name, Backend the backend's ADDR:PORT,
	// with their ids.
	Service   string `json:"service,omitempty"`
	Backend   string `json:"backend,omitempty"`
	ServiceID uint32 `json:"service_id,omitempty"`
	BackendID uint32 `json:"backend_id,omitempty"`
	// Len is the frame's length as it left the XDP program; Frame its
	// first bytes, with frames=true.
	Len   int    `json:"len,omitempty"`
	Frame []byte `json:"frame,omitempty"`
	// End marks the last line; Lost counts the events lost.
	End  bool   `json:"end,omitempty"`
	Lost uint64 `json:"lost,omitempty"`
}

// TraceSpec says what a trace reports: the packets of one service
// (VIP:PORT[/PROTO], empty: every packet) and of one client address
// (empty: any), Count of them (0: until the caller goes), with their
// frames if Frames.
type TraceSpec struct {
	Service string
	Client  string
	Count   int
	Frames  bool
}

// serveTrace streams a trace (GET /v1/trace).
func (d *Daemon) serveTrace(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if err := checkParams(q, "service", "client", "count", "frames"); err != nil {
		writeError(w, err)
		return
	}
	if err := noBody(r); err != nil {
		writeError(w, err)
		return
	}
	spec := TraceSpec{Service: q.Get("service"), Client: q.Get("client")}
	var err error
	if c := q.Get("count"); c != "" {
		if spec.Count, err = strconv.Atoi(c); err != nil || spec.Count < 0 {
			writeError(w, refusef("count", "%q is not a count of events (0: no end)", c))
			return
		}
	}
	if spec.Frames, err = boolParam(q, "frames"); err != nil {
		writeError(w, err)
		return
	}
	rd, err := d.startTrace(spec)
	if err != nil {
		writeError(w, err)
		return
	}
	d.log.Info("trace started", "service", spec.Service, "client", spec.Client, "count", spec.Count)
	defer func() {
		rd.Close()
		d.log.Info("trace ended", "service", spec.Service, "client", spec.Client)
	}()
	// The request is read: a trace lasts as long as its caller wants it.
	rc := http.NewResponseController(w)
	rc.SetReadDeadline(time.Time{})
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc.Flush()
	enc := json.NewEncoder(w)
	names, refreshed := d.traceNames(), time.Now()
	for n := 0; spec.Count == 0 || n < spec.Count; {
		if r.Context().Err() != nil {
			return
		}
		rd.SetDeadline(time.Now().Add(500 * time.Millisecond))
		ev, err := rd.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			continue
		}
		if err != nil {
			d.log.Warn("trace ended", "err", err)
			break
		}
		if time.Since(refreshed) > time.Second {
			names, refreshed = d.traceNames(), time.Now()
		}
		line := TraceLine{Time: ev.Time, Protocol: protoName(ev.Proto), Verdict: ev.Verdict, Reason: ev.Reason, By: ev.By, Len: ev.Len,
			ServiceID: ev.Service, BackendID: ev.Backend}
		if ev.Src.IsValid() {
			line.Src, line.Dst = ev.Src.String(), ev.Dst.String()
		}
		if ev.By != "" {
			line.Service = names.services[ev.Service]
			line.Backend = names.backends[[2]uint32{ev.Service, ev.Backend}]
		} else {
			line.ServiceID, line.BackendID = 0, 0
		}
		if spec.Frames {
			line.Frame = ev.Frame
		}
		if enc.Encode(line) != nil || rc.Flush() != nil {
			return
		}
		n++
	}
	enc.Encode(TraceLine{End: true, Lost: rd.Lost()})
	rc.Flush()
}

// startTrace starts the datapath's trace of what spec says.
func (d *Daemon) startTrace(spec TraceSpec) (datapath.TraceReader, error) {
	tr, ok := d.dp.(datapath.Tracer)
	if !ok {
		return nil, refusef("", "this datapath cannot trace")
	}
	var f datapath.TraceFilter
	if spec.Service != "" {
		ref, err := parseServiceRef(spec.Service, "service")
		if err != nil {
			return nil, err
		}
		cfg, applied := d.snapshot()
		i, err := findService(cfg, ref, "service")
		if err != nil {
			return nil, err
		}
		cs := cfg.Services[i]
		as, ok := appliedByKey(applied)[cs.Key()]
		if !ok {
			return nil, refusef("service", "service %s is not applied (see tether status)", cs.Key())
		}
		f.Service, f.VIP, f.Proto = as.ID, netip.AddrPortFrom(as.VIP, as.Port), as.Proto
	}
	if spec.Client != "" {
		a, err := netip.ParseAddr(spec.Client)
		if err != nil {
			return nil, refusef("client", "%q is not an IP address", spec.Client)
		}
		if f.VIP.IsValid() && a.Unmap().Is4() != f.VIP.Addr().Is4() {
			return nil, refusef("client", "%s is not of the family of %s", a, f.VIP)
		}
		f.Client = a.Unmap()
	}
	return tr.Trace(f)
}

// traceNames names the applied services and their backends by id.
type traceNames struct {
	services map[uint32]string
	backends map[[2]uint32]string
}

func (d *Daemon) traceNames() traceNames {
	_, applied := d.snapshot()
	n := traceNames{services: map[uint32]string{}, backends: map[[2]uint32]string{}}
	for _, s := range applied {
		n.services[s.ID] = s.Name
		for _, b := range s.Backends {
			n.backends[[2]uint32{s.ID, b.ID}] = netip.AddrPortFrom(b.Addr, b.Port).String()
		}
	}
	return n
}

// Trace streams a trace of what spec says to fn, line by line, until
// spec.Count events came, fn returns an error, or ctx ends; it returns
// the last line (End, Lost) when the daemon sent it.
func (c *Client) Trace(ctx context.Context, spec TraceSpec, fn func(TraceLine) error) (TraceLine, error) {
	q := url.Values{}
	if spec.Service != "" {
		q.Set("service", spec.Service)
	}
	if spec.Client != "" {
		q.Set("client", spec.Client)
	}
	if spec.Count > 0 {
		q.Set("count", strconv.Itoa(spec.Count))
	}
	if spec.Frames {
		q.Set("frames", "true")
	}
	u := url.URL{Scheme: "http", Host: "tether", Path: "/v1/trace", RawQuery: q.Encode()}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return TraceLine{}, err
	}
	// No overall timeout: a trace lasts as long as ctx.
	resp, err := (&http.Client{Transport: c.http.Transport}).Do(req)
	if err != nil {
		return TraceLine{}, c.unreachable(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		e := &APIError{Code: resp.StatusCode}
		if json.Unmarshal(data, e) != nil || e.Msg == "" {
			e.Msg = fmt.Sprintf("the daemon answered %s", resp.Status)
		}
		return TraceLine{}, e
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		var line TraceLine
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			return TraceLine{}, fmt.Errorf("read the trace: %w", err)
		}
		if line.End {
			return line, nil
		}
		if err := fn(line); err != nil {
			return TraceLine{}, err
		}
	}
	if ctx.Err() != nil {
		return TraceLine{}, ctx.Err()
	}
	if err := sc.Err(); err != nil {
		return TraceLine{}, fmt.Errorf("read the trace: %w", err)
	}
	return TraceLine{}, fmt.Errorf("read the trace: the daemon ended it without its last line (did it stop?): %w", io.ErrUnexpectedEOF)
}
