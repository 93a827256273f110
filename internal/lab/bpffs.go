package lab

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// mountBPFFS mounts a bpffs of the lab's own at <dir>/fs, dir being a new
// directory under the temporary directory. Processes started in the lab's
// hosts see it: `ip netns exec` mounts a /sys of the namespace's own, which
// hides /sys/fs/bpf, but keeps a copy of every other mount. dir is a
// shared bind mount of itself, so that unmounting the bpffs also unmounts
// those copies (a copy of a mount whose parent is not shared would outlive
// the unmount, and keep the pins alive, as long as the process that holds
// it).
func (l *Lab) mountBPFFS() (err error) {
	dir, err := os.MkdirTemp("", "tether-"+l.ID+"-bpffs-")
	if err != nil {
		return err
	}
	l.bpffsDir = dir
	fs := filepath.Join(dir, "fs")
	for _, step := range []struct {
		what string
		do   func() error
	}{
		{"bind " + dir, func() error { return unix.Mount(dir, dir, "", unix.MS_BIND, "") }},
		{"make " + dir + " private", func() error { return unix.Mount("", dir, "", unix.MS_PRIVATE, "") }},
		{"make " + dir + " shared", func() error { return unix.Mount("", dir, "", unix.MS_SHARED, "") }},
		{"create " + fs, func() error { return os.Mkdir(fs, 0o700) }},
		{"mount bpffs at " + fs, func() error { return unix.Mount("bpf", fs, "bpf", 0, "mode=0700") }},
	} {
		if err := step.do(); err != nil {
			return fmt.Errorf("lab bpffs: %s: %w", step.what, err)
		}
	}
	l.BPFFS = fs
	return nil
}

// unmountBPFFS unmounts the lab's bpffs, which releases everything pinned
// in it (an XDP link whose pin goes and that no process holds is detached),
// and removes its directory.
func (l *Lab) unmountBPFFS() error {
	if l.bpffsDir == "" {
		return nil
	}
	var errs []error
	for _, m := range []string{l.BPFFS, l.bpffsDir} {
		if m == "" {
			continue
		}
		if err := unix.Unmount(m, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", m, err))
		}
	}
	if len(errs) == 0 {
		if err := os.RemoveAll(l.bpffsDir); err != nil {
			errs = append(errs, err)
		}
	}
	l.BPFFS, l.bpffsDir = "", ""
	return errors.Join(errs...)
}
