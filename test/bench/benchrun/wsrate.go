package benchrun

import (
	"context"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tetherlb/tether/internal/lab"
)

// WSConnRate opens n WebSocket connections to url from client, over
// workers workers, each from the next of addrs: handshake, one echo,
// close, within limit in all. It returns the connections per second of
// those that succeeded, how many failed and the first failure; seen, if
// set, is told each connection's source address and backend.
func WSConnRate(client *lab.Host, addrs []netip.Addr, url string, n, workers int, limit time.Duration,
	seen func(src netip.Addr, backend string)) (rate float64, failed int, first error) {
	var next, ok, bad atomic.Int64
	var once sync.Once
	deadline := time.Now().Add(limit)
	var wg sync.WaitGroup
	start := time.Now()
	for range workers {
		wg.Go(func() {
			for {
				k := int(next.Add(1)) - 1
				if k >= n || time.Now().After(deadline) {
					return
				}
				src := addrs[k%len(addrs)]
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				c, err := lab.DialWS(ctx, client, src, url)
				if err == nil {
					_, err = c.Echo(ctx, "hi")
					if seen != nil {
						seen(src, c.Backend())
					}
					c.Close()
				}
				cancel()
				if err != nil {
					bad.Add(1)
					once.Do(func() { first = err })
					continue
				}
				ok.Add(1)
			}
		})
	}
	wg.Wait()
	return float64(ok.Load()) / time.Since(start).Seconds(), int(bad.Load()), first
}
