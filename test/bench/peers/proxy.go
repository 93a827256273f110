package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/tetherlb/tether/internal/lab"
	"github.com/tetherlb/tether/test/bench/syscount"
)

// The proxy rows (RowProxy) measure what a proxy costs, with clients
// that do nothing else: raw TCP to a server on every backend (a sink for
// throughput, a one-byte echo for the connection rate), wrk against nginx
// for a second connection rate by C programs, and the balancer process's
// CPU time, context switches and system calls.
const (
	portRaw  = 9000 // the raw TCP server on the backends
	portHTTP = 9001 // nginx on the backends, for wrk
	modeSink = 'S'  // 8-byte big-endian length follows; discard, then ack one byte
	modeEcho = 'E'  // echo one byte, then wait for the peer to close
)

// proxySample is one round's proxy measurements of one peer. CPU times
// are in seconds, of the balancer's process and its children.
type proxySample struct {
	one, eight       float64   // MiB/s, 1 and 8 streams
	cpuOne, cpuEight float64   // the balancer's CPU over each
	cps              []float64 // connections/s, by o.workers
	cpuConns         []float64 // the balancer's CPU, by o.workers
	// During each connection rate: the CPU of this program (the clients
	// and the backends), of the whole machine, and the machine's idle
	// share; the balancer's context switches (waits, preemptions) and
	// the machine's.
	genConns, busyConns, idleConns       []float64
	waitConns, preemptConns, switchConns []float64
	http                                 []float64 // wrk's connections/s, by o.wrkConns
	syscalls                             map[string]float64
}

// serveRaw runs the raw TCP server of a backend: sink or echo, by the
// first byte.
func serveRaw(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			c.SetDeadline(time.Now().Add(opLimit))
			var m [1]byte
			if _, err := io.ReadFull(c, m[:]); err != nil {
				return
			}
			switch m[0] {
			case modeEcho:
				if _, err := c.Write(m[:]); err != nil {
					return
				}
				io.Copy(io.Discard, c) // until the client closes
			case modeSink:
				var n [8]byte
				if _, err := io.ReadFull(c, n[:]); err != nil {
					return
				}
				if _, err := io.CopyN(io.Discard, c, int64(binary.BigEndian.Uint64(n[:]))); err != nil {
					return
				}
				c.Write([]byte{'A'})
			}
		}()
	}
}

// rawTarget is where the k-th raw connection through p goes: the VIP, or
// for the direct reference the backends in turn.
func rawTarget(e *Env, p Peer, port uint16) func(int) netip.AddrPort {
	if p.Direct {
		return func(k int) netip.AddrPort { return netip.AddrPortFrom(e.BackendAddrs[k%len(e.BackendAddrs)], port) }
	}
	return func(int) netip.AddrPort { return netip.AddrPortFrom(e.VIP, port) }
}

// dialRaw connects from the client namespace; call it inside Client.Do.
func dialRaw(src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}, Timeout: 10 * time.Second}
	c, err := d.Dial("tcp4", dst.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// rawThroughput sends mib MiB over streams streams (from as many client
// addresses) and returns MiB/s.
func rawThroughput(e *Env, target func(int) netip.AddrPort, streams, mib int) (float64, error) {
	per := int64(mib) << 20 / int64(streams)
	conns := make([]*net.TCPConn, streams)
	err := e.Lab.Client.Do(func() error {
		for k := range conns {
			c, err := dialRaw(e.Lab.ClientAddrs4[k%len(e.Lab.ClientAddrs4)], target(k))
			if err != nil {
				for _, c := range conns[:k] {
					c.Close()
				}
				return err
			}
			conns[k] = c
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("throughput: %w", err)
	}
	buf := bytes.Repeat([]byte("tether"), (1<<20)/6+1)[:1<<20]
	errs := make([]error, streams)
	var wg sync.WaitGroup
	start := time.Now()
	for k, c := range conns {
		wg.Go(func() {
			defer c.Close()
			c.SetDeadline(time.Now().Add(opLimit))
			hdr := make([]byte, 9)
			hdr[0] = modeSink
			binary.BigEndian.PutUint64(hdr[1:], uint64(per))
			if _, err := c.Write(hdr); err != nil {
				errs[k] = err
				return
			}
			for left := per; left > 0; {
				n := min(int64(len(buf)), left)
				w, err := c.Write(buf[:n])
				left -= int64(w)
				if err != nil {
					errs[k] = err
					return
				}
			}
			var ack [1]byte
			if _, err := io.ReadFull(c, ack[:]); err != nil {
				errs[k] = fmt.Errorf("reading the ack: %w", err)
			}
		})
	}
	wg.Wait()
	el := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		return 0, fmt.Errorf("throughput, %d streams: %w", streams, err)
	}
	return float64(per*int64(streams)) / (1 << 20) / el.Seconds(), nil
}

// rawConnRate makes n short connections (connect, one byte echoed, close)
// over workers workers and returns connections per second.
func rawConnRate(e *Env, target func(int) netip.AddrPort, n, workers int) (float64, error) {
	errs := make([]error, workers)
	var wg sync.WaitGroup
	start := time.Now()
	for w := range workers {
		wg.Go(func() {
			// The sockets are made on a thread in the client namespace.
			errs[w] = e.Lab.Client.Do(func() error {
				deadline := time.Now().Add(opLimit)
				for k := w; k < n; k += workers {
					c, err := dialRaw(e.Lab.ClientAddrs4[k%len(e.Lab.ClientAddrs4)], target(k))
					if err != nil {
						return err
					}
					c.SetDeadline(deadline)
					b := [1]byte{modeEcho}
					_, err = c.Write(b[:])
					if err == nil {
						_, err = io.ReadFull(c, b[:])
					}
					c.Close()
					if err != nil {
						return fmt.Errorf("connection %d: %w", k, err)
					}
				}
				return nil
			})
		})
	}
	wg.Wait()
	el := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		return 0, fmt.Errorf("connection rate: %w", err)
	}
	return float64(n) / el.Seconds(), nil
}

// measureProxy takes p's proxy rows; pid is its process (0: none).
func measureProxy(e *Env, p Peer, pid int, o options) (proxySample, error) {
	var s proxySample
	target := rawTarget(e, p, portRaw)
	procs := processTree(pid)
	c0 := cpuSeconds(procs)
	var err error
	if s.one, err = rawThroughput(e, target, 1, o.mib); err != nil {
		return s, err
	}
	c1 := cpuSeconds(procs)
	if s.eight, err = rawThroughput(e, target, 8, o.mib); err != nil {
		return s, err
	}
	c2 := cpuSeconds(procs)
	s.cpuOne, s.cpuEight = c1-c0, c2-c1
	for _, n := range o.workers {
		g0, m0 := cpuSeconds([]int{os.Getpid()}), machineTimes()
		w0, p0 := switches(procs)
		cps, err := rawConnRate(e, target, o.conns, n)
		if err != nil {
			return s, err
		}
		g1, m1, c3 := cpuSeconds([]int{os.Getpid()}), machineTimes(), cpuSeconds(procs)
		w1, p1 := switches(procs)
		s.cps = append(s.cps, cps)
		s.waitConns = append(s.waitConns, w1-w0)
		s.preemptConns = append(s.preemptConns, p1-p0)
		s.switchConns = append(s.switchConns, m1.switches-m0.switches)
		s.cpuConns = append(s.cpuConns, c3-c2)
		s.genConns = append(s.genConns, g1-g0)
		s.busyConns = append(s.busyConns, m1.busy-m0.busy)
		s.idleConns = append(s.idleConns, (m1.idle-m0.idle)/(m1.busy-m0.busy+m1.idle-m0.idle))
		c2 = c3
	}
	if pid != 0 && o.sysConns > 0 {
		s.syscalls, err = syscallsPerConn(processTree(pid), o.sysConns, func() error {
			_, err := rawConnRate(e, target, o.sysConns, o.workers[0])
			return err
		})
		if err != nil {
			return s, err
		}
	}
	for _, n := range o.wrkConns {
		to := rawTarget(e, p, portHTTP)(0)
		rate, err := wrkRate(e.Lab, to, n, o.wrkSecs)
		if err != nil {
			return s, err
		}
		s.http = append(s.http, rate)
	}
	return s, nil
}

// processTree is pid and its children (nginx's workers), none for pid 0.
func processTree(pid int) []int {
	if pid == 0 {
		return nil
	}
	out := []int{pid}
	entries, _ := os.ReadDir("/proc")
	for _, d := range entries {
		child, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		if f := procStat(child); len(f) > 1 && f[1] == strconv.Itoa(pid) {
			out = append(out, child)
		}
	}
	return out
}

// procStat is the fields of /proc/PID/stat after the command: state,
// ppid, ...; nil if the process is gone.
func procStat(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil
	}
	s := string(b)
	return strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
}

// cpuSeconds is the user + system CPU time of the processes.
func cpuSeconds(pids []int) float64 {
	var t float64
	for _, pid := range pids {
		// utime and stime are fields 14 and 15 of stat, 12 and 13 after
		// the command.
		if f := procStat(pid); len(f) > 12 {
			ut, _ := strconv.ParseFloat(f[11], 64)
			st, _ := strconv.ParseFloat(f[12], 64)
			t += (ut + st) / 100 // USER_HZ
		}
	}
	return t
}

// switches sums the context switches of the processes' threads: those
// where a thread gave up the CPU to wait, and those where it was
// preempted. The counts of threads that have exited are lost; no balancer
// here ends threads while it serves.
func switches(pids []int) (wait, preempt float64) {
	for _, pid := range pids {
		tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil {
			continue
		}
		for _, t := range tasks {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/status", pid, t.Name()))
			if err != nil {
				continue // the thread has just exited
			}
			for _, line := range strings.Split(string(b), "\n") {
				k, v, ok := strings.Cut(line, ":")
				if !ok {
					continue
				}
				n, _ := strconv.ParseFloat(strings.TrimSpace(v), 64)
				switch k {
				case "voluntary_ctxt_switches":
					wait += n
				case "nonvoluntary_ctxt_switches":
					preempt += n
				}
			}
		}
	}
	return wait, preempt
}

// machineTimes is the CPU time the machine spent busy and idle since boot,
// over all CPUs, in seconds (the first line of /proc/stat), and its count
// of context switches (the ctxt line).
func machineTimes() (t struct{ busy, idle, switches float64 }) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		fail(err.Error())
	}
	line, rest, _ := strings.Cut(string(b), "\n")
	// cpu user nice system idle iowait irq softirq steal (guest time is
	// counted in user and nice already).
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		fail(fmt.Sprintf("/proc/stat: unexpected first line %q", line))
	}
	for k, x := range f[1:9] {
		v, err := strconv.ParseFloat(x, 64)
		if err != nil {
			fail(fmt.Sprintf("/proc/stat: %q: %v", line, err))
		}
		if k == 3 || k == 4 {
			t.idle += v / 100 // USER_HZ
		} else {
			t.busy += v / 100
		}
	}
	for _, line := range strings.Split(rest, "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "ctxt" {
			v, err := strconv.ParseFloat(f[1], 64)
			if err != nil {
				fail(fmt.Sprintf("/proc/stat: %q: %v", line, err))
			}
			t.switches = v
			return t
		}
	}
	fail("/proc/stat has no ctxt line")
	return t
}

// syscallsPerConn counts the system calls of the processes while run makes
// n connections through them, per connection and by name.
func syscallsPerConn(pids []int, n int, run func() error) (map[string]float64, error) {
	var counters []*syscount.Counter
	defer func() {
		for _, c := range counters {
			c.Close()
		}
	}()
	var before []syscount.Counts
	for _, pid := range pids {
		c, err := syscount.New(pid)
		if err != nil {
			return nil, fmt.Errorf("count system calls: %w", err)
		}
		counters = append(counters, c)
		b, err := c.Read()
		if err != nil {
			return nil, err
		}
		before = append(before, b)
	}
	if err := run(); err != nil {
		return nil, err
	}
	per := map[string]float64{}
	for i, c := range counters {
		after, err := c.Read()
		if err != nil {
			return nil, err
		}
		for name, k := range after.Sub(before[i]).ByName() {
			per[name] += float64(k) / float64(n)
		}
	}
	return per, nil
}

// startHTTPBackend runs nginx on be as an HTTP backend on portHTTP that
// answers every request with a 1-byte body and closes the connection, for
// wrk. It returns the stop.
func startHTTPBackend(e *Env, be *lab.Host) (func() error, error) {
	dir := filepath.Join(e.Tmp, "nginx-http-"+be.Name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	conf := fmt.Sprintf(`worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %[1]s/body;
  proxy_temp_path %[1]s/proxy;
  fastcgi_temp_path %[1]s/fastcgi;
  uwsgi_temp_path %[1]s/uwsgi;
  scgi_temp_path %[1]s/scgi;
  server {
    listen %[2]s;
    keepalive_timeout 0;
    location / { return 200 "x"; }
  }
}
`, dir, netip.AddrPortFrom(be.Addr4, portHTTP))
	cfg := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		return nil, err
	}
	p, err := be.Start("nginx", "-c", cfg, "-p", dir)
	if err != nil {
		return nil, fmt.Errorf("nginx on %s: %w", be.Name, err)
	}
	addr := netip.AddrPortFrom(be.Addr4, portHTTP)
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := be.Dial(context.Background(), "tcp", netip.Addr{}, addr.String())
		if err == nil {
			c.Close()
			return p.Stop, nil
		}
		select {
		case <-p.Done():
			return nil, fmt.Errorf("nginx on %s exited (%v):\n%s", be.Name, p.Err(), p.Output())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return nil, joinErr(fmt.Errorf("nginx on %s does not accept on %s after 15s: %v", be.Name, addr, err), p.Stop())
		}
	}
}

// wrkRate runs wrk from the client host against to for secs seconds with
// conns concurrent connections, each request on a new connection
// (`Connection: close`), and returns the requests per second, which are
// the connections per second. An error, a timeout or a non-2xx answer is
// an error.
func wrkRate(l *lab.Lab, to netip.AddrPort, conns, secs int) (float64, error) {
	out, err := l.Client.Command("wrk", "-t", strconv.Itoa(min(conns, 2)), "-c", strconv.Itoa(conns),
		"-d", fmt.Sprintf("%ds", secs), "-H", "Connection: close", "http://"+to.String()+"/").CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("wrk: %v\n%s", err, out)
	}
	text := string(out)
	if strings.Contains(text, "Socket errors") || strings.Contains(text, "Non-2xx") {
		return 0, fmt.Errorf("wrk through %s saw errors:\n%s", to, text)
	}
	for _, line := range strings.Split(text, "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "Requests/sec:" {
			if v, err := strconv.ParseFloat(f[1], 64); err == nil && v > 0 {
				return v, nil
			}
		}
	}
	return 0, fmt.Errorf("wrk printed no request rate:\n%s", text)
}

// counts parses a comma-separated list of counts from 1 to most.
func counts(flagName, list string, most int) []int {
	var out []int
	for _, f := range strings.Split(list, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n > most {
			fail(fmt.Sprintf("bad %s %q: want counts from 1 to %d, separated by commas", flagName, list, most))
		}
		out = append(out, n)
	}
	return out
}
