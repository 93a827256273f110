//go:build tools

package tools
import (
 _ "github.com/cilium/ebpf"
 _ "github.com/cilium/ebpf/link"
 _ "github.com/cilium/ebpf/cmd/bpf2go"
 _ "github.com/vishvananda/netlink"
 _ "github.com/urfave/cli/v2"
 _ "golang.org/x/sys/unix"
 _ "go.yaml.in/yaml/v3"
 _ "github.com/coder/websocket"
)
