// Package userspace will hold tether's splice(2) proxy: the datapath for
// hosts where XDP cannot run. It implements datapath.Datapath with the same
// backend choice as the XDP program (maglev.SourceHash / ConnHash into the
// same rings, a connection table and an affinity table with timeouts), so
// that a client reaches the same backend through either datapath.
//
// It is not built yet: a configuration with `datapath: splice` is refused
// by `tether run`.
package userspace
