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
	"time"
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
)

// Options configure a Syncer.
type Options struct {
	Listen netip.AddrPort   // where it receives
	Peers  []netip.AddrPort // where it sends
	Key    []byte
	// Learn is called, on the receiving goroutine, with the entries of
	// every datagram that verified.
	Learn func(from netip.Addr, h Header, entries []Entry)
	Log   *slog.Logger
}

// Stats are a Syncer's counters since its start.
type Stats struct {
	SentDatagrams, SentEntries, SentBytes uint64
	SendErrors                            uint64 // datagrams a peer could not be sent (unreachable: the next ones try again)
	Dropped                               uint64 // entries dropped unsent: more were waiting than maxPending
	ReceivedDatagrams, ReceivedEntries    uint64 // that verified
	Refused                               map[string]uint64
}

// Syncer sends the entries it is given to its peers, batched into
// datagrams, and hands those it receives and verifies to Options.Learn.
// A peer that cannot be reached costs nothing but a counted error per
// datagram: sending never blocks the caller.
type Syncer struct {
	o    Options
	conn *net.UDPConn
	enc  *Encoder

	mu      sync.Mutex
	pending []Entry
	stats   Stats
	ver     *Verifier
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
	var b [8]byte
	rand.Read(b[:])
	s := &Syncer{o: o, conn: conn, enc: NewEncoder(o.Key, binary.BigEndian.Uint64(b[:])),
		ver: NewVerifier(o.Key, peerAddrs(o.Peers), MaxSkew), kick: make(chan struct{}, 1), stop: make(chan struct{}),
		flushed: make(chan struct{}), recvd: make(chan struct{})}
	go s.receive()
	go s.flushLoop()
	return s, nil
}

func peerAddrs(peers []netip.AddrPort) []netip.Addr {
	out := make([]netip.Addr, len(peers))
	for i, p := range peers {
		out[i] = p.Addr()
	}
	return out
}

// Send queues entries for every peer.
func (s *Syncer) Send(entries ...Entry) {
	s.mu.Lock()
	room := maxPending - len(s.pending)
	if room < len(entries) {
		s.stats.Dropped += uint64(len(entries) - max(room, 0))
		entries = entries[:max(room, 0)]
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

// SendTo sends datagrams of type t with entries to one peer at once
// (answers to a request).
func (s *Syncer) SendTo(peer netip.AddrPort, t Type, entries []Entry) {
	s.mu.Lock()
	dgrams := s.enc.Encode(t, entries, time.Now())
	if t == TypeDump {
		dgrams = append(dgrams, s.enc.Control(TypeDumpDone, uint16(min(len(dgrams), 0xffff)), time.Now()))
	}
	s.mu.Unlock()
	s.write([]netip.AddrPort{peer}, dgrams, len(entries))
}

// Request asks every peer for the entries it holds (TypeRequest).
func (s *Syncer) Request() {
	s.mu.Lock()
	d := s.enc.Control(TypeRequest, 0, time.Now())
	s.mu.Unlock()
	s.write(s.o.Peers, [][]byte{d}, 0)
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

// flush sends what is pending.
func (s *Syncer) flush() {
	s.mu.Lock()
	if len(s.pending) == 0 {
		s.mu.Unlock()
		return
	}
	entries := s.pending
	s.pending = nil
	dgrams := s.enc.Encode(TypeEntries, entries, time.Now())
	s.mu.Unlock()
	s.write(s.o.Peers, dgrams, len(entries))
}

func (s *Syncer) write(peers []netip.AddrPort, dgrams [][]byte, entries int) {
	var sent, bytes, errs uint64
	for _, p := range peers {
		for _, d := range dgrams {
			if _, err := s.conn.WriteToUDPAddrPort(d, p); err != nil {
				errs++
				continue
			}
			sent++
			bytes += uint64(len(d))
		}
	}
	s.mu.Lock()
	s.stats.SentDatagrams += sent
	s.stats.SentBytes += bytes
	s.stats.SentEntries += uint64(entries * len(peers))
	s.stats.SendErrors += errs
	s.mu.Unlock()
}

func (s *Syncer) receive() {
	defer close(s.recvd)
	buf := make([]byte, MaxPayload+1)
	for {
		n, from, err := s.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue // ICMP errors of sends surface here: counted on send
		}
		s.mu.Lock()
		h, entries, err := s.ver.Check(from.Addr(), buf[:n], time.Now())
		if err == nil {
			s.stats.ReceivedDatagrams++
			s.stats.ReceivedEntries += uint64(len(entries))
		}
		s.mu.Unlock()
		if err != nil {
			if s.o.Log != nil {
				s.o.Log.Debug("sync: refused a datagram", "from", from, "reason", Reason(err))
			}
			continue
		}
		if s.o.Learn != nil {
			s.o.Learn(from.Addr(), h, entries)
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

// Close sends what is pending and stops.
func (s *Syncer) Close() {
	close(s.stop)
	<-s.flushed
	s.conn.Close()
	<-s.recvd
}

// PeerOf returns the peer at address a, if one is.
func (s *Syncer) PeerOf(a netip.Addr) (netip.AddrPort, bool) {
	for _, p := range s.o.Peers {
		if p.Addr() == a.Unmap() || p.Addr() == a {
			return p, true
		}
	}
	return netip.AddrPort{}, false
}
