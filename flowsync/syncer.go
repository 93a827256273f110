package flowsync

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Defaults of a Syncer.
const (
	// FlushEvery is how long an entry waits at most for others to share
	// its datagram.
	FlushEvery = 10 * time.Millisecond
	// MaxSkew is how far a datagram's send time may be from the
	// receiver's clock.
	MaxSkew = 30 * time.Second
	// maxPending bounds the entries waiting to be sent: beyond it, the
	// newest are dropped and counted (a flood of new flows must not grow
	// the daemon without bound).
	maxPending = 1 << 16
	// A dump goes out in bursts of dumpBurst datagrams, dumpPause apart
	// (about 45 MB/s), so that the receiver's socket buffer keeps up.
	dumpBurst = 32
	dumpPause = time.Millisecond
	// recvBuffer is the receiving socket's buffer, for dumps: about 2,900
	// full datagrams.
	recvBuffer = 4 << 20
)

// Options configure a Syncer.
type Options struct {
	Listen netip.AddrPort   // where it receives, and who it says it is
	Peers  []netip.AddrPort // where it sends
	Key    []byte
	// Learn is called, on the receiving goroutine, with every datagram
	// that verified, but for TypeDumpDone.
	Learn func(h Header, entries []Entry)
	// Answered is called, on the receiving goroutine, when a peer has
	// sent the whole answer to a request (complete: every datagram of it
	// arrived; incomplete answers are to be asked again).
	Answered func(peer netip.AddrPort, complete bool)
	Log      *slog.Logger
}

// Stats are a Syncer's counters since its start.
type Stats struct {
	SentDatagrams, SentEntries, SentBytes uint64 // entries: those that reached the socket, once per peer
	SendErrors                            uint64 // datagrams that could not be sent (a peer unreachable: the next ones try again)
	Dropped                               uint64 // entries dropped unsent: more were waiting than maxPending
	ReceivedDatagrams, ReceivedEntries    uint64 // that verified
	Refused                               map[string]uint64
}

// Syncer sends the entries it is given to its peers, batched into
// datagrams, and hands those it receives and verifies to Options.Learn.
// A peer that cannot be reached costs nothing but a counted error per
// datagram: sending never blocks the caller of Send.
type Syncer struct {
	o    Options
	conn *net.UDPConn

	// sendMu orders the datagrams: each is numbered and written under
	// it, so that a peer receives them in sequence (a datagram numbered
	// before another but written after it would fall out of the
	// receiver's replay window once enough others passed it).
	sendMu sync.Mutex
	enc    *Encoder

	mu      sync.Mutex
	pending []Entry
	stats   Stats
	ver     *Verifier
	dumps   map[netip.AddrPort]int // dump datagrams received per peer since its last DumpDone

	kick    chan struct{}
	stop    chan struct{}
	flushed chan struct{} // closed when the flush loop has ended
	recvd   chan struct{} // closed when the receive loop has ended
}

// Start binds o.Listen and starts sending and receiving.
func Start(o Options) (*Syncer, error) {
	conn, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(o.Listen))
	if err != nil {
		return nil, fmt.Errorf("sync: listen on %s: %w", o.Listen, err)
	}
	growBuffer(conn)
	var b [8]byte
	rand.Read(b[:])
	s := &Syncer{o: o, conn: conn, enc: NewEncoder(o.Key, o.Listen, binary.BigEndian.Uint64(b[:])),
		ver: NewVerifier(o.Key, o.Peers, MaxSkew), dumps: map[netip.AddrPort]int{},
		kick: make(chan struct{}, 1), stop: make(chan struct{}), flushed: make(chan struct{}), recvd: make(chan struct{})}
	go s.receive()
	go s.flushLoop()
	return s, nil
}

// growBuffer raises the socket's receive buffer to recvBuffer, past
// net.core.rmem_max where the process may (SO_RCVBUFFORCE needs
// CAP_NET_ADMIN, which tether has); what it cannot, it leaves.
func growBuffer(conn *net.UDPConn) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return
	}
	raw.Control(func(fd uintptr) {
		if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, recvBuffer) != nil {
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, recvBuffer)
		}
	})
}

// Send queues entries for every peer.
func (s *Syncer) Send(entries ...Entry) {
	s.mu.Lock()
	room := max(maxPending-len(s.pending), 0)
	if room < len(entries) {
		s.stats.Dropped += uint64(len(entries) - room)
		entries = entries[:room]
	}
	s.pending = append(s.pending, entries...)
	full := len(s.pending) >= 48 // about a datagram of IPv4 entries
	s.mu.Unlock()
	if full {
		select {
		case s.kick <- struct{}{}:
		default:
		}
	}
}

// Dump sends peer entries (the answer to its request), in paced bursts,
// then a TypeDumpDone that says how many datagrams it took (at most
// 65,535 are counted: a larger dump is taken as complete when at least
// that many arrived).
func (s *Syncer) Dump(peer netip.AddrPort, entries []Entry) {
	per := (MaxPayload - headerLen - macLen) / 62 // IPv6 entries: a datagram holds at least this many
	n := 0
	for len(entries) > 0 || n == 0 {
		chunk := entries[:min(len(entries), per*dumpBurst)]
		entries = entries[len(chunk):]
		s.sendMu.Lock()
		dgrams := s.enc.Encode(TypeDump, chunk, time.Now())
		s.write([]netip.AddrPort{peer}, dgrams, len(chunk))
		s.sendMu.Unlock()
		n += len(dgrams)
		if len(entries) > 0 {
			select {
			case <-s.stop:
				return
			case <-time.After(dumpPause):
			}
		}
	}
	s.sendMu.Lock()
	s.write([]netip.AddrPort{peer}, [][]byte{s.enc.Control(TypeDumpDone, uint16(min(n, 0xffff)), time.Now())}, 0)
	s.sendMu.Unlock()
}

// Request asks peers for the entries they hold (TypeRequest).
func (s *Syncer) Request(peers ...netip.AddrPort) {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	s.write(peers, [][]byte{s.enc.Control(TypeRequest, 0, time.Now())}, 0)
}

// Peers are the addresses Start was given to send to.
func (s *Syncer) Peers() []netip.AddrPort { return s.o.Peers }

func (s *Syncer) flushLoop() {
	defer close(s.flushed)
	tick := time.NewTicker(FlushEvery)
	defer tick.Stop()
	for {
		select {
		case <-s.stop:
			s.flush()
			return
		case <-tick.C:
		case <-s.kick:
		}
		s.flush()
	}
}

// Flush sends what is pending now, without waiting for the next
// FlushEvery.
func (s *Syncer) Flush() { s.flush() }

// flush sends what is pending.
func (s *Syncer) flush() {
	s.mu.Lock()
	entries := s.pending
	s.pending = nil
	s.mu.Unlock()
	if len(entries) == 0 {
		return
	}
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	s.write(s.o.Peers, s.enc.Encode(TypeEntries, entries, time.Now()), len(entries))
}

// write sends dgrams, which hold entries entries, to peers. sendMu is
// held.
func (s *Syncer) write(peers []netip.AddrPort, dgrams [][]byte, entries int) {
	var sent, bytes, errs, reached uint64
	for _, p := range peers {
		ok := true
		for _, d := range dgrams {
			if _, err := s.conn.WriteToUDPAddrPort(d, p); err != nil {
				errs++
				ok = false
				continue
			}
			sent++
			bytes += uint64(len(d))
		}
		if ok {
			reached += uint64(entries)
		}
	}
	s.mu.Lock()
	s.stats.SentDatagrams += sent
	s.stats.SentBytes += bytes
	s.stats.SentEntries += reached
	s.stats.SendErrors += errs
	s.mu.Unlock()
}

func (s *Syncer) receive() {
	defer close(s.recvd)
	buf := make([]byte, MaxPayload+1)
	for {
		n, from, err := s.conn.ReadFromUDPAddrPort(buf)
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			// ICMP errors of earlier sends surface here (counted on
			// send); anything else, let it pass without spinning.
			if !errors.Is(err, syscall.ECONNREFUSED) {
				time.Sleep(time.Millisecond)
			}
			continue
		}
		s.mu.Lock()
		h, entries, err := s.ver.Check(from.Addr(), buf[:n], time.Now())
		var done, complete bool
		if err == nil {
			s.stats.ReceivedDatagrams++
			s.stats.ReceivedEntries += uint64(len(entries))
			switch h.Type {
			case TypeDump:
				s.dumps[h.Sender]++
			case TypeDumpDone:
				got := s.dumps[h.Sender]
				done, complete = true, got >= int(h.Count)
				delete(s.dumps, h.Sender)
			}
		}
		s.mu.Unlock()
		switch {
		case err != nil:
			if s.o.Log != nil {
				s.o.Log.Debug("sync: refused a datagram", "from", from, "reason", Reason(err))
			}
		case done:
			if s.o.Answered != nil {
				s.o.Answered(h.Sender, complete)
			}
		case s.o.Learn != nil:
			s.o.Learn(h, entries)
		}
	}
}

// Stats returns the counters.
func (s *Syncer) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stats
	st.Refused = s.ver.Refused()
	return st
}

// Close sends what is pending and stops; a dump under way stops.
func (s *Syncer) Close() {
	close(s.stop)
	<-s.flushed
	s.conn.Close()
	<-s.recvd
}
