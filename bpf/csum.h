/* csum.h: Internet checksum helpers: folding a sum, verifying an IPv4 header. */
#ifndef TETHER_CSUM_H
#define TETHER_CSUM_H

#include <linux/types.h>

/* csum_fold folds a 32-bit one's complement sum into the 16-bit checksum. */
static __always_inline __u16 csum_fold(__s64 sum)
{
	__u32 s = (__u32)sum;
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* ipv4_csum_ok says whether the 20-byte IPv4 header at w (5 words, bounds
 * checked by the caller) has a right checksum: the one's complement sum of
 * its words, checksum included, folds to all ones. The sum is the same in
 * either byte order, so the words are added as loaded. */
static __always_inline int ipv4_csum_ok(const __u32 *w)
{
	__u64 sum = (__u64)w[0] + w[1] + w[2] + w[3] + w[4];
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	return csum_fold(sum) == 0;
}

#endif
