package bpf_test

import "github.com/tetherlb/tether/loader"

func loaderOpts() loader.Options { return loaderOptsSized(1<<14, 1<<14) }

func loaderOptsSized(conns, affinity uint32) loader.Options {
	return loader.Options{Connections: conns, Affinity: affinity, RingSize: 4099}
}
