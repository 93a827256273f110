// Package bgp is tether's BGP speaker: GoBGP (github.com/osrg/gobgp/v4)
// embedded as a library, opening sessions to the configured peers and
// announcing each VIP the daemon says this host can serve as a /32 or
// /128, so that the routers spread the VIP's flows over every tether host
// that announces it (ECMP). It announces what it is told and nothing else,
// and leaves the choice of what to announce, and when, to the daemon. The
// routes peers send are kept in GoBGP's table and used for nothing (the
// kernel's routes are not touched): configure the routers to send tether
// none.
//
// GoBGP v4 rather than v3: v4 is the maintained line, and its library API
// takes log/slog and net/netip, as tether does.
package bgp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/osrg/gobgp/v4/api"
	"github.com/osrg/gobgp/v4/pkg/apiutil"
	bgppkt "github.com/osrg/gobgp/v4/pkg/packet/bgp"
	"github.com/osrg/gobgp/v4/pkg/server"

	"github.com/tetherlb/tether/config"
)

// Speaker runs one BGP server. Its methods are safe for concurrent use.
type Speaker struct {
	log *slog.Logger

	mu        sync.Mutex
	srv       *server.BgpServer
	cfg       *config.BGP
	announced map[netip.Addr]bool // the VIPs announced
	closed    bool
	// restarting: this speaker follows one that stopped gracefully (the
	// daemon adopted a running datapath); its first sessions say so.
	restarting bool
}

// Start starts a speaker with cfg, opening a session to every peer. It
// announces nothing until Announce. restarting says that it follows a
// speaker of this host that stopped gracefully (see Close): with graceful
// restart, the peers then keep its routes until it has sent its own.
func Start(cfg *config.BGP, restarting bool, log *slog.Logger) (*Speaker, error) {
	s := &Speaker{log: log, announced: make(map[netip.Addr]bool), restarting: restarting}
	if err := s.start(cfg); err != nil {
		return nil, err
	}
	s.restarting = false // the sessions opened later are new ones
	return s, nil
}

// start starts the BGP server of cfg and adds its peers. s.mu must be held
// (or s not shared yet).
func (s *Speaker) start(cfg *config.BGP) error {
	lvl := &slog.LevelVar{}
	lvl.Set(slog.LevelWarn) // GoBGP's own chatter: warnings and errors
	glog := slog.New(levelHandler{s.log.Handler(), lvl}).With("component", "gobgp")
	srv := server.NewBgpServer(server.LoggerOption(glog, lvl))
	go srv.Serve()
	port := int32(cfg.ListenPort)
	if port == 0 {
		port = -1 // GoBGP: listen on no port
	}
	ctx := context.Background()
	err := srv.StartBgp(ctx, &api.StartBgpRequest{Global: &api.Global{
		Asn: cfg.ASN, RouterId: cfg.RouterID.String(), ListenPort: port,
	}})
	if err != nil {
		srv.Stop()
		return fmt.Errorf("start BGP: %w", err)
	}
	err = rejectReceived(ctx, srv)
	if err == nil {
		err = srv.WatchEvent(ctx, server.WatchEventMessageCallbacks{OnPeerUpdate: s.peerEvent}, server.WatchPeer())
	}
	for _, p := range cfg.Peers {
		if err != nil {
			break
		}
		err = srv.AddPeer(ctx, &api.AddPeerRequest{Peer: s.peerOf(p, cfg)})
	}
	if err != nil {
		srv.Stop()
		return fmt.Errorf("start BGP: %w", err)
	}
	s.srv, s.cfg = srv, cfg.Clone()
	s.log.Info("bgp: started", "asn", cfg.ASN, "router_id", cfg.RouterID, "peers", len(cfg.Peers))
	return nil
}

// rejectReceived makes srv take no route from its peers: every path that
// came from a neighbour (any address) is rejected on import, so tether
// neither uses nor passes on what routers send it; its own paths, which
// come from no neighbour, are accepted.
func rejectReceived(ctx context.Context, srv *server.BgpServer) error {
	const set, policy = "tether-any-neighbour", "tether-reject-received"
	err := srv.AddDefinedSet(ctx, &api.AddDefinedSetRequest{DefinedSet: &api.DefinedSet{
		DefinedType: api.DefinedType_DEFINED_TYPE_NEIGHBOR, Name: set, List: []string{"0.0.0.0/0", "::/0"},
	}})
	if err == nil {
		err = srv.AddPolicy(ctx, &api.AddPolicyRequest{Policy: &api.Policy{Name: policy, Statements: []*api.Statement{{
			Name:       policy,
			Conditions: &api.Conditions{NeighborSet: &api.MatchSet{Type: api.MatchSet_TYPE_ANY, Name: set}},
			Actions:    &api.Actions{RouteAction: api.RouteAction_ROUTE_ACTION_REJECT},
		}}}})
	}
	if err == nil {
		err = srv.SetPolicyAssignment(ctx, &api.SetPolicyAssignmentRequest{Assignment: &api.PolicyAssignment{
			Name: "global", Direction: api.PolicyDirection_POLICY_DIRECTION_IMPORT,
			Policies: []*api.Policy{{Name: policy}}, DefaultAction: api.RouteAction_ROUTE_ACTION_ACCEPT,
		}})
	}
	if err != nil {
		return fmt.Errorf("set the import policy: %w", err)
	}
	return nil
}

// restartDeferral is how long a restarting speaker waits for its peers'
// End-of-RIB before it sends its own routes and changes anyway (GoBGP
// would wait 360 s): tether needs no route from them.
const restartDeferral = 5

// peerOf is the GoBGP configuration of peer p of cfg: the address family
// of its address only, its timers and password, and graceful restart.
func (s *Speaker) peerOf(p config.BGPPeer, cfg *config.BGP) *api.Peer {
	fam := &api.Family{Afi: api.Family_AFI_IP, Safi: api.Family_SAFI_UNICAST}
	if p.Address.Is6() {
		fam.Afi = api.Family_AFI_IP6
	}
	hold := uint64(p.HoldTime / time.Second)
	afi := &api.AfiSafi{Config: &api.AfiSafiConfig{Family: fam, Enabled: true}}
	var gr *api.GracefulRestart
	if t := uint32(cfg.GracefulRestart / time.Second); t > 0 {
		gr = &api.GracefulRestart{Enabled: true, RestartTime: t, LocalRestarting: s.restarting, DeferralTime: restartDeferral}
		afi.MpGracefulRestart = &api.MpGracefulRestart{Config: &api.MpGracefulRestartConfig{Enabled: true}}
	}
	return &api.Peer{
		Conf: &api.PeerConf{NeighborAddress: p.Address.String(), PeerAsn: p.ASN, AuthPassword: p.Password},
		Timers: &api.Timers{Config: &api.TimersConfig{
			HoldTime: hold, KeepaliveInterval: max(hold/3, 1), ConnectRetry: 5,
		}},
		Transport:       &api.Transport{RemotePort: uint32(p.Port)},
		AfiSafis:        []*api.AfiSafi{afi},
		GracefulRestart: gr,
	}
}

// peerEvent logs a session's state changes.
func (s *Speaker) peerEvent(e *apiutil.WatchEventMessage_PeerEvent, _ time.Time) {
	if e.Type != apiutil.PEER_EVENT_STATE {
		return
	}
	st := e.Peer.State
	args := []any{"peer", st.NeighborAddress, "asn", st.PeerASN, "state", stateName(st.SessionState)}
	if st.SessionState == bgppkt.BGP_FSM_ESTABLISHED {
		s.log.Info("bgp: session established", args...)
		return
	}
	if st.DisconnectMessage != "" {
		args = append(args, "reason", st.DisconnectMessage)
	}
	s.log.Debug("bgp: session state", args...)
}

// sessionStates name the session states as operators read them, in the
// order of GoBGP's FSM states (BGP_FSM_IDLE first).
var sessionStates = [...]string{"idle", "connect", "active", "opensent", "openconfirm", "established"}

// stateName is the name of a session state.
func stateName(st bgppkt.FSMState) string {
	if st >= 0 && int(st) < len(sessionStates) {
		return sessionStates[st]
	}
	return st.String()
}

// Reconfigure applies cfg. Peers added are connected, removed ones closed,
// changed ones (ASN, port, password, hold time) reset; the sessions of
// the others go on. Changed next hops or communities are announced again
// over the sessions as they are. A changed ASN, router id or listen port
// restarts the server: every session is reset.
func (s *Speaker) Reconfigure(cfg *config.BGP) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("bgp: speaker closed")
	}
	old := s.cfg
	if old.ASN != cfg.ASN || old.RouterID != cfg.RouterID || old.ListenPort != cfg.ListenPort {
		s.log.Warn("bgp: ASN, router id or listen port changed: restarting the speaker, every session resets")
		s.srv.Stop()
		if err := s.start(cfg); err != nil {
			s.closed = true // the daemon starts a new speaker later
			return err
		}
		return s.announce(slices.Collect(maps.Keys(s.announced)), true)
	}
	ctx := context.Background()
	was := make(map[netip.Addr]config.BGPPeer, len(old.Peers))
	for _, p := range old.Peers {
		was[p.Address] = p
	}
	var errs []error
	for _, p := range cfg.Peers {
		o, ok := was[p.Address]
		delete(was, p.Address)
		switch {
		case !ok:
			errs = append(errs, s.srv.AddPeer(ctx, &api.AddPeerRequest{Peer: s.peerOf(p, cfg)}))
			s.log.Info("bgp: peer added", "peer", p.Address)
		case o != p:
			// A peer's transport and password are fixed at connection:
			// it is closed and opened again.
			errs = append(errs, s.srv.DeletePeer(ctx, &api.DeletePeerRequest{Address: p.Address.String()}))
			errs = append(errs, s.srv.AddPeer(ctx, &api.AddPeerRequest{Peer: s.peerOf(p, cfg)}))
			s.log.Info("bgp: peer changed: session reset", "peer", p.Address)
		}
	}
	for a := range was {
		errs = append(errs, s.srv.DeletePeer(ctx, &api.DeletePeerRequest{Address: a.String()}))
		s.log.Info("bgp: peer removed", "peer", a)
	}
	if old.GracefulRestart != cfg.GracefulRestart {
		// Negotiated when a session opens.
		s.log.Warn("bgp: graceful_restart changed: it applies to the sessions opened from now on")
	}
	pathsChanged := !slices.Equal(old.NextHops, cfg.NextHops) || !slices.Equal(old.Communities, cfg.Communities)
	s.cfg = cfg.Clone()
	if pathsChanged {
		errs = append(errs, s.announce(slices.Collect(maps.Keys(s.announced)), true))
	}
	return errors.Join(errs...)
}

// Announce makes vips the VIPs announced: it announces those that are not
// yet and withdraws those no longer listed.
func (s *Speaker) Announce(vips []netip.Addr) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("bgp: speaker closed")
	}
	return s.announce(vips, false)
}

// announce does Announce; again announces the listed VIPs even if they
// are already (their attributes changed). s.mu must be held.
func (s *Speaker) announce(vips []netip.Addr, again bool) error {
	want := make(map[netip.Addr]bool, len(vips))
	var add, del []*apiutil.Path
	for _, v := range vips {
		want[v] = true
		if !s.announced[v] || again {
			p, err := s.path(v)
			if err != nil {
				return err
			}
			add = append(add, p)
		}
	}
	for v := range s.announced {
		if !want[v] {
			p, err := s.path(v)
			if err != nil {
				return err
			}
			del = append(del, p)
		}
	}
	// Withdrawals first: a VIP that cannot be served must go, whatever
	// becomes of the announcements.
	var errs []error
	if len(del) > 0 {
		if err := s.srv.DeletePath(apiutil.DeletePathRequest{Paths: del}); err != nil {
			errs = append(errs, fmt.Errorf("bgp: withdraw: %w", err))
			del = nil
		}
		for _, p := range del {
			v := p.Nlri.(*bgppkt.IPAddrPrefix).Prefix.Addr()
			delete(s.announced, v)
			s.log.Info("bgp: VIP withdrawn", "vip", v)
		}
	}
	if len(add) > 0 {
		if _, err := s.srv.AddPath(apiutil.AddPathRequest{Paths: add}); err != nil {
			errs = append(errs, fmt.Errorf("bgp: announce: %w", err))
			add = nil
		}
		for _, p := range add {
			v := p.Nlri.(*bgppkt.IPAddrPrefix).Prefix.Addr()
			if !s.announced[v] {
				s.log.Info("bgp: VIP announced", "vip", v)
			}
			s.announced[v] = true
		}
	}
	return errors.Join(errs...)
}

// path is the route of vip: origin IGP, the configured next hop of its
// family or none (the session's own address), the configured
// communities.
func (s *Speaker) path(vip netip.Addr) (*apiutil.Path, error) {
	nlri, err := bgppkt.NewIPAddrPrefix(netip.PrefixFrom(vip, vip.BitLen()))
	if err != nil {
		return nil, err
	}
	hop := netip.IPv4Unspecified()
	if vip.Is6() {
		hop = netip.IPv6Unspecified()
	}
	for _, a := range s.cfg.NextHops {
		if a.Is4() == vip.Is4() {
			hop = a
		}
	}
	attrs := []bgppkt.PathAttributeInterface{bgppkt.NewPathAttributeOrigin(0)}
	fam := bgppkt.RF_IPv4_UC
	if vip.Is4() {
		nh, err := bgppkt.NewPathAttributeNextHop(hop)
		if err != nil {
			return nil, err
		}
		attrs = append(attrs, nh)
	} else {
		fam = bgppkt.RF_IPv6_UC
		mp, err := bgppkt.NewPathAttributeMpReachNLRI(fam, []bgppkt.PathNLRI{{NLRI: nlri}}, hop)
		if err != nil {
			return nil, err
		}
		attrs = append(attrs, mp)
	}
	if len(s.cfg.Communities) > 0 {
		cs := make([]uint32, 0, len(s.cfg.Communities))
		for _, c := range s.cfg.Communities {
			v, err := config.ParseCommunity(c)
			if err != nil {
				return nil, err
			}
			cs = append(cs, v)
		}
		attrs = append(attrs, bgppkt.NewPathAttributeCommunities(cs))
	}
	return &apiutil.Path{Family: fam, Nlri: nlri, Attrs: attrs}, nil
}

// PeerStatus is one session as status shows it.
type PeerStatus struct {
	Address string `json:"address"`
	ASN     uint32 `json:"asn"`
	// State is the session's: idle, connect, active, opensent,
	// openconfirm or established.
	State string `json:"state"`
	// Since is when the session was established, while it is.
	Since time.Time `json:"since,omitzero"`
	// LastError is why the session last went down, if it did.
	LastError string `json:"last_error,omitempty"`
	// Received counts the routes the peer sent that are not loops back to
	// this host (tether uses none), and Accepted those of them that its
	// import policy let into its routing table: none.
	Received uint64 `json:"received"`
	Accepted uint64 `json:"accepted"`
}

// Status is the speaker's sessions and the VIPs it announces.
type Status struct {
	ASN       uint32       `json:"asn"`
	RouterID  string       `json:"router_id"`
	Peers     []PeerStatus `json:"peers"`
	Announced []string     `json:"announced"`
}

// Status returns the sessions, in the configuration's order, and the VIPs
// announced, sorted.
func (s *Speaker) Status() (Status, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Status{ASN: s.cfg.ASN, RouterID: s.cfg.RouterID.String(), Peers: []PeerStatus{}, Announced: []string{}}
	if s.closed {
		return st, errors.New("bgp: speaker closed")
	}
	byAddr := make(map[string]PeerStatus)
	err := s.srv.ListPeer(context.Background(), &api.ListPeerRequest{}, func(p *api.Peer) {
		ps := PeerStatus{Address: p.GetConf().GetNeighborAddress(), ASN: p.GetConf().GetPeerAsn(), State: "idle"}
		if state := p.GetState(); state != nil {
			ps.State = sessionName(state.GetSessionState())
			ps.LastError = state.GetDisconnectMessage()
		}
		if up := p.GetTimers().GetState().GetUptime(); up != nil && ps.State == "established" {
			ps.Since = up.AsTime()
		}
		for _, a := range p.GetAfiSafis() {
			// GoBGP's "accepted" counts what passed loop detection,
			// before the import policy.
			ps.Received += a.GetState().GetAccepted()
		}
		byAddr[ps.Address] = ps
	})
	// What the import policy let in: the routing table's paths from each
	// peer.
	inRIB := map[netip.Addr]uint64{}
	for _, fam := range []bgppkt.Family{bgppkt.RF_IPv4_UC, bgppkt.RF_IPv6_UC} {
		if lerr := s.srv.ListPath(apiutil.ListPathRequest{TableType: api.TableType_TABLE_TYPE_GLOBAL, Family: fam},
			func(_ bgppkt.NLRI, paths []*apiutil.Path) {
				for _, p := range paths {
					inRIB[p.PeerAddress.Unmap()]++
				}
			}); lerr != nil && err == nil {
			err = lerr
		}
	}
	for _, p := range s.cfg.Peers {
		if ps, ok := byAddr[p.Address.String()]; ok {
			ps.Accepted = inRIB[p.Address.Unmap()]
			st.Peers = append(st.Peers, ps)
		}
	}
	vips := slices.SortedFunc(maps.Keys(s.announced), netip.Addr.Compare)
	for _, v := range vips {
		st.Announced = append(st.Announced, netip.PrefixFrom(v, v.BitLen()).String())
	}
	return st, err
}

// sessionName is the name of an API session state, whose values follow
// the FSM states' after an "unspecified" 0.
func sessionName(st api.PeerState_SessionState) string {
	if st == api.PeerState_SESSION_STATE_UNSPECIFIED {
		return "idle"
	}
	return stateName(bgppkt.FSMState(st - api.PeerState_SESSION_STATE_IDLE))
}

// Close stops the speaker and closes every session. With graceful, and
// graceful restart configured, it sends the peers no notification: they
// keep its routes for the restart time, as stale, until a new speaker of
// this host announces them again (or the time runs out). Otherwise they
// drop its routes at once.
func (s *Speaker) Close(graceful bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	graceful = graceful && s.cfg.GracefulRestart > 0
	err := s.srv.StopBgp(context.Background(), &api.StopBgpRequest{AllowGracefulRestart: graceful})
	if graceful {
		s.log.Info("bgp: stopped; the peers keep this host's routes while it restarts", "restart_time", s.cfg.GracefulRestart)
	} else {
		s.log.Info("bgp: stopped; the peers drop this host's routes")
	}
	return err
}

// levelHandler passes on the records of level lvl and above only.
type levelHandler struct {
	slog.Handler
	lvl slog.Leveler
}

func (h levelHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= h.lvl.Level() && h.Handler.Enabled(ctx, l)
}

func (h levelHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return levelHandler{h.Handler.WithAttrs(as), h.lvl}
}

func (h levelHandler) WithGroup(name string) slog.Handler {
	return levelHandler{h.Handler.WithGroup(name), h.lvl}
}
