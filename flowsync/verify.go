package flowsync

import (
	"errors"
	"net/netip"
	"time"
)

// More errors of Verifier.Check.
var (
	ErrUnknownPeer = errors.New("not from a peer")
	ErrSender      = errors.New("names another sender than the peer it came from")
	ErrStale       = errors.New("sent too long ago or in the future")
	ErrReplayed    = errors.New("replayed")
)

// window is how many sequence numbers below the highest seen a peer's
// datagrams may arrive out of order and still be taken.
const window = 64

// Verifier checks the datagrams a host receives: from a peer's address,
// with a MAC that verifies with the shared key, naming as its sender the
// peer (address and port) whose address it came from, sent within MaxSkew
// of now, and never seen before (a sequence number per sender and epoch,
// with a window of 64 for reordering; a new epoch only from a datagram
// sent after the newest one taken). Nothing a datagram says changes any
// state before its MAC verified, and a datagram of one peer replayed from
// another's address is refused. It is not safe for concurrent use.
type Verifier struct {
	key     []byte
	maxSkew time.Duration
	addrs   map[netip.Addr]bool // the peers' addresses
	peers   map[netip.AddrPort]*peerState
	refused map[string]uint64
}

type peerState struct {
	epoch uint64
	top   uint64    // the highest sequence number taken in epoch
	seen  uint64    // bit i: top-i was taken
	last  time.Time // the send time of the newest datagram taken
}

// NewVerifier returns a verifier of datagrams from peers signed with key,
// sent at most maxSkew before or after the receiver's clock says.
func NewVerifier(key []byte, peers []netip.AddrPort, maxSkew time.Duration) *Verifier {
	v := &Verifier{key: key, maxSkew: maxSkew, addrs: map[netip.Addr]bool{}, peers: map[netip.AddrPort]*peerState{}, refused: map[string]uint64{}}
	for _, p := range peers {
		p = unmap(p)
		v.addrs[p.Addr()] = true
		v.peers[p] = &peerState{}
	}
	return v
}

func unmap(p netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(p.Addr().Unmap(), p.Port()) }

// Check verifies datagram b from address from, received at now, and
// returns what it carries; a refusal is counted under its reason.
func (v *Verifier) Check(from netip.Addr, b []byte, now time.Time) (Header, []Entry, error) {
	h, entries, err := v.check(from, b, now)
	if err != nil {
		v.refused[Reason(err)]++
	}
	return h, entries, err
}

func (v *Verifier) check(from netip.Addr, b []byte, now time.Time) (Header, []Entry, error) {
	if !v.addrs[from.Unmap()] {
		return Header{}, nil, ErrUnknownPeer
	}
	h, entries, err := Decode(v.key, b)
	if err != nil {
		return h, nil, err
	}
	st := v.peers[h.Sender]
	if st == nil || h.Sender.Addr() != from.Unmap() {
		return h, nil, ErrSender
	}
	if d := now.Sub(h.Time); d > v.maxSkew || d < -v.maxSkew {
		return h, nil, ErrStale
	}
	if h.Seq == 0 {
		return h, nil, ErrReplayed
	}
	if h.Epoch != st.epoch {
		// A new epoch (the peer restarted) must be newer than all it
		// sent before: an old epoch's datagram replayed is not.
		if !st.last.IsZero() && !h.Time.After(st.last) {
			return h, nil, ErrReplayed
		}
		*st = peerState{epoch: h.Epoch}
	}
	switch {
	case h.Seq > st.top:
		shift := h.Seq - st.top
		if shift >= window {
			st.seen = 0
		} else {
			st.seen <<= shift
		}
		st.seen |= 1
		st.top = h.Seq
	case st.top-h.Seq >= window:
		return h, nil, ErrReplayed
	default:
		bit := uint64(1) << (st.top - h.Seq)
		if st.seen&bit != 0 {
			return h, nil, ErrReplayed
		}
		st.seen |= bit
	}
	if h.Time.After(st.last) {
		st.last = h.Time
	}
	return h, entries, nil
}

// Refused returns how many datagrams were refused, by reason.
func (v *Verifier) Refused() map[string]uint64 {
	out := make(map[string]uint64, len(v.refused))
	for k, n := range v.refused {
		out[k] = n
	}
	return out
}

// Reason names a refusal for counters and metrics.
func Reason(err error) string {
	for _, r := range []struct {
		err  error
		name string
	}{
		{ErrTruncated, "truncated"}, {ErrMagic, "not_sync"}, {ErrVersion, "version"},
		{ErrMAC, "bad_mac"}, {ErrEntry, "malformed"}, {ErrUnknownPeer, "unknown_peer"},
		{ErrStale, "stale"}, {ErrReplayed, "replayed"}, {ErrSender, "wrong_sender"},
	} {
		if errors.Is(err, r.err) {
			return r.name
		}
	}
	return "other"
}
