package lab

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Legacy ethtool ioctl commands (linux/ethtool.h).
const (
	ethtoolGTXCSUM = 0x16
	ethtoolSTXCSUM = 0x17
)

type ethtoolValue struct {
	cmd  uint32
	data uint32
}

// ifreqData is struct ifreq with the ifr_data member of the union.
type ifreqData struct {
	name [unix.IFNAMSIZ]byte
	data unsafe.Pointer
	_    [24 - unsafe.Sizeof(uintptr(0))]byte
}

// setTxChecksum turns transmit checksum offload of interface name on or
// off, like `ethtool -K name tx on|off`, in the namespace of the calling
// thread, and checks the result.
func setTxChecksum(name string, on bool) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("ethtool socket: %w", err)
	}
	defer unix.Close(fd)
	ioctl := func(v *ethtoolValue) error {
		ifr := &ifreqData{data: unsafe.Pointer(v)}
		copy(ifr.name[:unix.IFNAMSIZ-1], name)
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(ifr))); errno != 0 {
			return errno
		}
		return nil
	}
	want := uint32(0)
	if on {
		want = 1
	}
	if err := ioctl(&ethtoolValue{cmd: ethtoolSTXCSUM, data: want}); err != nil {
		return fmt.Errorf("ethtool -K %s tx %v: %w", name, on, err)
	}
	got := &ethtoolValue{cmd: ethtoolGTXCSUM}
	if err := ioctl(got); err != nil {
		return fmt.Errorf("ethtool -k %s: %w", name, err)
	}
	if got.data != want {
		return fmt.Errorf("ethtool -K %s tx %v did not stick", name, on)
	}
	return nil
}
