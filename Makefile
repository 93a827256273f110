# tether: the single entry point for building, testing and trying it.
# Run `make help` for the targets. Privileged targets need root (sudo).

GO       ?= go
BIN      ?= bin/tether
VERSION  ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
# Turns the skip of privileged tests into a failure (CI sets it).
TETHER_REQUIRE_PRIVILEGED ?=
export TETHER_REQUIRE_PRIVILEGED

# What `make deps` installs (Debian/Ubuntu): clang and llvm-strip for
# bpf2go, libbpf headers (vendored copies are in bpf/include), kernel UAPI
# headers, iproute2 for the lab, bpftool to inspect maps, strace for the
# splice zero-copy test, iperf3 and nftables for the test of the peers
# benchmark.
APT_PACKAGES = clang llvm libbpf-dev linux-libc-dev iproute2 bpftool clang-format strace iperf3 nftables git make ca-certificates

# What `make bench` installs when missing: the proxies it measures tether
# against, and wrk, the C load generator of its proxy rows (iperf3 and
# nftables come with `tools`, which bench runs first). Their services are not started
# (policy-rc.d). perf (linux-perf, where the distribution has it) profiles
# tether's program in flowcost.
BENCH_PACKAGES = haproxy nginx libnginx-mod-stream wrk

# apt-get waits up to 5 minutes for the package database lock instead of
# failing at once when another apt-get (unattended upgrades, a second
# make) holds it.
APT = DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: deps
deps: ## install the build and test tools with apt-get (root)
	$(APT) update
	$(APT) install -y --no-install-recommends $(APT_PACKAGES)

# Tools the tests and the lab run (ip, strace, BIRD for the BGP tests):
# installed with apt-get when
# missing, so that `sudo make test` and `sudo make lab` work on a fresh
# Debian or Ubuntu machine with Go.
.PHONY: tools
tools:
	@missing=""; for t in ip:iproute2 strace:strace iperf3:iperf3 nft:nftables bird:bird2 vtysh:frr; do \
		command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		services=""; case "$$missing" in *bird2*) services="bird";; esac; \
		case "$$missing" in *frr*) services="$$services frr";; esac; \
		if [ -n "$$services" ]; then \
			echo "routers: the tests run their own in namespaces; the services of the packages installed now stay off ($$services)"; fi; \
		for s in $$services; do systemctl mask $$s.service >/dev/null 2>&1 || true; done; \
		$(APT) update && $(APT) install -y --no-install-recommends $$missing; rc=$$?; \
		for s in $$services; do systemctl unmask $$s.service >/dev/null 2>&1 || true; \
			systemctl disable $$s.service >/dev/null 2>&1 || true; done; \
		exit $$rc; \
	fi

.PHONY: generate
generate: ## rebuild the BPF object and its Go bindings with bpf2go (needs clang)
	$(GO) generate ./bpf

.PHONY: build
build: ## build bin/tether (no clang needed: the BPF object is committed)
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/tether

# The Debian package: nfpm from the Go module proxy, its version named
# (a later one may need a newer Go). Debian versions start with a digit:
# 0~git<commit time, UTC>.<commit> until tether has releases, so that a
# later commit's package is newer. It is built for the Go toolchain's
# architecture (GOARCH=arm64 make deb: another), named as Debian names it;
# the helpers the recipe runs (man page, completion, nfpm) are built for
# this machine.
DIST        ?= dist
NFPM         = github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.48.0
DEB_GOARCH  ?= $(shell $(GO) env GOARCH)
DEB_ARCHES   = amd64:amd64 arm64:arm64 386:i386 arm:armhf ppc64le:ppc64el riscv64:riscv64 s390x:s390x
DEB_ARCH     = $(or $(patsubst $(DEB_GOARCH):%,%,$(filter $(DEB_GOARCH):%,$(DEB_ARCHES))),$(error make deb: no Debian architecture for GOARCH $(DEB_GOARCH)))
DEB_VERSION ?= 0~git$(shell TZ=UTC git log -1 --format=%cd --date=format-local:%Y%m%d%H%M%S 2>/dev/null).$(subst -,.,$(VERSION))

.PHONY: deb
deb: ## build the Debian package dist/tether_<version>_<arch>.deb (DIST=DIR elsewhere): the binary, the systemd unit, an example /etc/tether/tether.yaml, the man page, bash and zsh completion
	mkdir -p $(DIST)
	CGO_ENABLED=0 GOARCH=$(DEB_GOARCH) $(GO) build -trimpath -ldflags "-s -w -X main.version=$(VERSION)" -o $(DIST)/tether ./cmd/tether
	GOARCH= $(GO) run ./cmd/tether man > $(DIST)/tether.8
	gzip -9nf $(DIST)/tether.8
	GOARCH= $(GO) run ./cmd/tether completion bash > $(DIST)/tether.bash
	GOARCH= $(GO) run ./cmd/tether completion zsh > $(DIST)/_tether
	sed -e 's|$${DIST}|$(DIST)|g' -e 's|$${DEB_VERSION}|$(DEB_VERSION)|g' -e 's|$${ARCH}|$(DEB_ARCH)|g' packaging/nfpm.yaml > $(DIST)/nfpm.yaml
	GOARCH= $(GO) run $(NFPM) package --packager deb --config $(DIST)/nfpm.yaml --target $(DIST)/

.PHONY: test
test: tools ## run every test: vet, unit, BPF_PROG_TEST_RUN and namespace end-to-end (root)
	$(GO) vet ./...
	$(GO) test -count=1 -timeout 30m ./...

.PHONY: lab
lab: tools ## watch tether do its job on a lab of namespaces: steady, kill, drain, scaleout (root)
	$(GO) run ./cmd/tether lab

.PHONY: bench
bench: tools bench-deps ## measure tether against HAProxy, nginx, nftables and the lab's limits, its control plane at scale and two hosts behind an ECMP router; write docs/bench (root, ~55 min)
	$(GO) run ./test/bench/xdpcost -out docs/bench/xdpcost.md
	$(GO) run ./test/bench/flowcost -out docs/bench/flowcost.md
	$(GO) run ./test/bench/ctlscale -out docs/bench/ctlscale.md
	$(GO) run ./test/bench/scaleout -out docs/bench/scaleout.md
	$(GO) run ./test/bench/peers -runs 5 -out docs/bench/RESULTS.md -chart docs/bench/results.png

.PHONY: soak
soak: tools ## hold 10,000 WebSocket connections through daemon restarts and upgrades (XDP and splice), measure the idle splice daemon, fuzz the XDP program with 1,000,000 inputs; time 1,000 WebSockets' echoes under a SYN flood against the trivial XDP forwarder's; write docs/bench/soak.md and flood.md (root, ~18 min)
	$(GO) run ./test/bench/soak -out docs/bench/soak.md
	$(GO) run ./test/bench/flood -out docs/bench/flood.md

.PHONY: bench-deps
bench-deps:
	@missing=""; for p in $(BENCH_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		policy=/usr/sbin/policy-rc.d; made=""; \
		if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' > $$policy && chmod +x $$policy && made=1; fi; \
		$(APT) update && $(APT) install -y --no-install-recommends $$missing; rc=$$?; \
		if [ -n "$$made" ]; then rm -f $$policy; fi; \
		exit $$rc; \
	fi
	@command -v perf >/dev/null || { $(APT) update && $(APT) install -y --no-install-recommends linux-perf; } || \
		echo "linux-perf not installed: flowcost runs without its profile"

.PHONY: format
format: ## gofmt the Go code and clang-format the C
	gofmt -w $$(git ls-files '*.go')
	clang-format -i bpf/*.c bpf/*.h

.PHONY: clean
clean: ## remove build output
	rm -rf bin
