/*
 * online.h - the online-softmax merge of one row's blocks, shared by the
 * row kernels (rows/stats.h) and the split-row driver (parallel.c), so a
 * row gives the same bits whole or split across threads.
 *
 * A row is taken in blocks of FX_CHUNK elements, each read once from
 * memory: its max, then (from L1) its sum sk of exp(x - mk) against mk,
 * the max of the row so far. S, the sum of the blocks before against their
 * max M <= mk, moves to mk by one scalar rescale: S exp(M - mk) + sk. The
 * block size and the order of the merges are fixed, whatever the thread
 * count or the instruction set; the rescale is in double with the C
 * library's exp, the same function for every ISA build.
 */
#ifndef FASTXENT_ONLINE_H
#define FASTXENT_ONLINE_H

#include <math.h>

/* M = -inf: no block so far had a finite max, and S holds 0 (or NaN). */
static inline double fx_online_merge(double S, double M, double mk, double sk)
{
    if (mk > M && M > -INFINITY) S *= exp(M - mk);
    return S + sk;
}

#endif
