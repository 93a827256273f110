package lab

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ownerDir holds one file per live lab, named after its id, with the PID of
// the process that built it and the lab's bpffs directory. A test binary
// that is killed cannot run Close; the next New removes what such a lab
// left behind (its namespaces and bpffs mount), and only labs whose owner
// process is gone.
const ownerDir = "/run/tether-lab"

func (l *Lab) recordOwner() error {
	if err := os.MkdirAll(ownerDir, 0o700); err != nil {
		return fmt.Errorf("lab owner file: %w", err)
	}
	body := fmt.Sprintf("%d\n%s\n", os.Getpid(), l.bpffsDir)
	return os.WriteFile(filepath.Join(ownerDir, l.ID), []byte(body), 0o600)
}

func (l *Lab) forgetOwner() {
	_ = os.Remove(filepath.Join(ownerDir, l.ID))
}

// sweepStale removes the leftovers of labs whose owner process has died.
func sweepStale() error {
	entries, err := os.ReadDir(ownerDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		path := filepath.Join(ownerDir, e.Name())
		data, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		lines := strings.Split(strings.TrimSpace(string(data)), "\n")
		pid, err := strconv.Atoi(lines[0])
		if err != nil || pid <= 0 || unix.Kill(pid, 0) != unix.ESRCH {
			continue // alive, or not ours to judge
		}
		id := e.Name()
		if len(lines) > 1 && strings.Contains(lines[1], "tether-"+id+"-bpffs-") {
			dir := lines[1]
			_ = unix.Unmount(filepath.Join(dir, "fs"), unix.MNT_DETACH)
			_ = unix.Unmount(dir, unix.MNT_DETACH)
			_ = os.RemoveAll(dir)
		}
		names, _ := os.ReadDir(netnsDir)
		for _, n := range names {
			if strings.HasPrefix(n.Name(), "tether-"+id+"-") {
				if err := deleteNetns(n.Name()); err != nil {
					errs = append(errs, err)
				}
			}
		}
		_ = os.Remove(path)
	}
	return errors.Join(errs...)
}
