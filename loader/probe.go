package loader

// The socket mark of a health probe that follows the client's path to
// backend id is ProbeMark | id (see bpf/probe.h, which holds the same
// values).
const (
	ProbeMark     uint32 = 0x54480000
	ProbeMarkMask uint32 = 0xffff0000
)
