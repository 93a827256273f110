// Package syscount counts the system calls of one process, by system call
// number, in the kernel: a BPF program on the sys_enter raw tracepoint
// (Linux 4.17 or later, root) adds one to a per-CPU slot of the call's
// number whenever a thread of the process enters a system call. Unlike
// strace, which stops the process at every call and slows it tenfold, it
// costs each system call of the machine a few tens of nanoseconds, so the
// process runs as it would. The bench commands use it to compare how many
// system calls the balancers make per connection: a count that the noise
// of a shared machine does not move, where rates and CPU times do.
package syscount

import (
	"errors"
	"fmt"
	"sort"
	"strconv"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"

	"github.com/tetherlb/tether/test/bench/percpu"
)

// maxNR bounds the system call numbers counted; a call above it (none on
// amd64 or arm64 today) is not counted.
const maxNR = 1024

// Counter counts the system calls of one process while it is open.
type Counter struct {
	counts *ebpf.Map
	prog   *ebpf.Program
	link   link.Link
}

// New starts counting the system calls of the process pid (its thread
// group: every thread). It needs root.
func New(pid int) (_ *Counter, err error) {
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("remove memlock limit: %w", err)
	}
	c := &Counter{}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	if c.counts, err = percpu.New("syscount", maxNR); err != nil {
		return nil, err
	}
	c.prog, err = ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "syscount",
		Type:         ebpf.RawTracepoint,
		License:      "GPL",
		Instructions: program(uint32(pid), c.counts),
	})
	if err != nil {
		return nil, fmt.Errorf("load count program: %+v", err)
	}
	c.link, err = link.AttachRawTracepoint(link.RawTracepointOptions{Name: "sys_enter", Program: c.prog})
	if err != nil {
		return nil, fmt.Errorf("attach to raw tracepoint sys_enter: %w", err)
	}
	return c, nil
}

// program is the BPF program: sys_enter's raw tracepoint passes the
// registers and the call's number (args[0] and args[1] of the context).
// For a thread of pid it adds one to the number's counter.
func program(pid uint32, counts *ebpf.Map) asm.Instructions {
	insns := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1), // context
		asm.FnGetCurrentPidTgid.Call(),
		asm.RSh.Imm(asm.R0, 32), // thread group id: the process
		asm.JNE.Imm(asm.R0, int32(pid), "out"),
		asm.LoadMem(asm.R1, asm.R6, 8, asm.DWord), // the call's number
		asm.JGE.Imm(asm.R1, maxNR, "out"),         // unsigned: also -1
		asm.StoreMem(asm.RFP, -4, asm.R1, asm.Word),
	}
	insns = append(insns, percpu.Increment(counts, "out")...)
	return append(insns,
		asm.Mov.Imm(asm.R0, 0).WithSymbol("out"),
		asm.Return(),
	)
}

// Counts are system calls by number.
type Counts map[int]uint64

// Read returns the calls counted so far, summed over the CPUs.
func (c *Counter) Read() (Counts, error) {
	out := Counts{}
	var (
		key    uint32
		values []uint64
	)
	it := c.counts.Iterate()
	for it.Next(&key, &values) {
		if n := percpu.Sum(values); n > 0 {
			out[int(key)] = n
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read counts: %w", err)
	}
	return out, nil
}

// Close stops counting.
func (c *Counter) Close() error {
	var errs []error
	if c.link != nil {
		errs = append(errs, c.link.Close())
	}
	if c.prog != nil {
		errs = append(errs, c.prog.Close())
	}
	if c.counts != nil {
		errs = append(errs, c.counts.Close())
	}
	return errors.Join(errs...)
}

// Sub returns the calls of a made since b.
func (a Counts) Sub(b Counts) Counts {
	out := Counts{}
	for nr, n := range a {
		if n > b[nr] {
			out[nr] = n - b[nr]
		}
	}
	return out
}

// Total is the number of calls of every number.
func (a Counts) Total() uint64 {
	var t uint64
	for _, n := range a {
		t += n
	}
	return t
}

// ByName is a's calls by name, where Name knows the number.
func (a Counts) ByName() map[string]uint64 {
	out := map[string]uint64{}
	for nr, n := range a {
		out[Name(nr)] += n
	}
	return out
}

// Names returns the names of a's calls, the most frequent first.
func (a Counts) Names() []string {
	by := a.ByName()
	names := make([]string, 0, len(by))
	for name := range by {
		names = append(names, name)
	}
	sort.Slice(names, func(i, j int) bool {
		if by[names[i]] != by[names[j]] {
			return by[names[i]] > by[names[j]]
		}
		return names[i] < names[j]
	})
	return names
}

// names are the system calls a proxy, its runtime and its load make, by
// number on this architecture.
var names = map[int]string{
	unix.SYS_ACCEPT4:         "accept4",
	unix.SYS_ACCEPT:          "accept",
	unix.SYS_SOCKET:          "socket",
	unix.SYS_CONNECT:         "connect",
	unix.SYS_BIND:            "bind",
	unix.SYS_LISTEN:          "listen",
	unix.SYS_SETSOCKOPT:      "setsockopt",
	unix.SYS_GETSOCKOPT:      "getsockopt",
	unix.SYS_GETSOCKNAME:     "getsockname",
	unix.SYS_GETPEERNAME:     "getpeername",
	unix.SYS_SHUTDOWN:        "shutdown",
	unix.SYS_CLOSE:           "close",
	unix.SYS_READ:            "read",
	unix.SYS_WRITE:           "write",
	unix.SYS_READV:           "readv",
	unix.SYS_WRITEV:          "writev",
	unix.SYS_RECVFROM:        "recvfrom",
	unix.SYS_SENDTO:          "sendto",
	unix.SYS_RECVMSG:         "recvmsg",
	unix.SYS_SENDMSG:         "sendmsg",
	unix.SYS_SPLICE:          "splice",
	unix.SYS_PIPE2:           "pipe2",
	unix.SYS_FCNTL:           "fcntl",
	unix.SYS_IOCTL:           "ioctl",
	unix.SYS_EPOLL_WAIT:      "epoll_wait",
	unix.SYS_EPOLL_PWAIT:     "epoll_pwait",
	unix.SYS_EPOLL_CTL:       "epoll_ctl",
	unix.SYS_FUTEX:           "futex",
	unix.SYS_NANOSLEEP:       "nanosleep",
	unix.SYS_SCHED_YIELD:     "sched_yield",
	unix.SYS_TGKILL:          "tgkill",
	unix.SYS_GETPID:          "getpid",
	unix.SYS_GETPPID:         "getppid",
	unix.SYS_EXIT_GROUP:      "exit_group",
	unix.SYS_GETTID:          "gettid",
	unix.SYS_RT_SIGRETURN:    "rt_sigreturn",
	unix.SYS_RT_SIGPROCMASK:  "rt_sigprocmask",
	unix.SYS_CLOCK_GETTIME:   "clock_gettime",
	unix.SYS_GETRUSAGE:       "getrusage",
	unix.SYS_MMAP:            "mmap",
	unix.SYS_MUNMAP:          "munmap",
	unix.SYS_MADVISE:         "madvise",
	unix.SYS_MPROTECT:        "mprotect",
	unix.SYS_OPENAT:          "openat",
	unix.SYS_EVENTFD2:        "eventfd2",
	unix.SYS_IO_URING_ENTER:  "io_uring_enter",
	unix.SYS_RESTART_SYSCALL: "restart_syscall",
}

// Name is the name of system call nr, or "#nr" for one this package does
// not name.
func Name(nr int) string {
	if n, ok := names[nr]; ok {
		return n
	}
	return "#" + strconv.Itoa(nr)
}
