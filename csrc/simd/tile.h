/*
 * tile.h - float32 tiles of 16 rows x up to 8 columns, transposed between
 * row-major memory and the small-row kernels' lane buffers (column c of
 * a group of 16 rows at buf + c*16, lane j = row j).
 *
 * Why: element-by-element transposition costs two memory operations per
 * element, and every 64-byte load of the buffer then waits for sixteen
 * scalar stores to drain (a store-forwarding stall); at 10 classes that
 * was most of the time of a row. Here each row of a tile is one masked
 * load (lanes past the row's end are never read), the 8x8 transposes run
 * in registers, and each buffer column is written by stores of the same
 * width the kernels load it with. Transposition is exact, so the results
 * are bitwise those of the scalar copy.
 *
 * On AVX-512 a tile's two 8-row halves share registers, and a row's last
 * few columns go by gathers and scatters (fx_tile_gather16): both keep
 * the transposes off the shuffle port, which the exp's 512-bit
 * arithmetic also needs.
 *
 * AVX2 and AVX-512 builds only (FX_HAVE_TILE); the baseline build keeps
 * the scalar copy.
 */
#ifndef FASTXENT_TILE_H
#define FASTXENT_TILE_H

#include <stdint.h>

#if defined(__AVX2__)
#include <immintrin.h>
#define FX_HAVE_TILE 1

/* Lanes [0, k) all ones, the rest zero: a maskload/maskstore mask. */
FX_INLINE __m256i fx_tile_mask(int64_t k)
{
    static const int32_t tab[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256((const __m256i *)(tab + 8 - k));
}

FX_INLINE void fx_tile_t8x8(__m256 r[8])
{
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* Rows 8h..8h+7 (row j at x + j*ld), columns [0, k), 1 <= k <= 8: the
   transposed tile, column c in r[c]. */
FX_INLINE void fx_tile_rows(const float *x, int64_t ld, int h, int64_t k, __m256 r[8])
{
    if (k == 8) {
        for (int j = 0; j < 8; j++) r[j] = _mm256_loadu_ps(x + (8 * h + j) * ld);
    } else {
        const __m256i m = fx_tile_mask(k);
        for (int j = 0; j < 8; j++) r[j] = _mm256_maskload_ps(x + (8 * h + j) * ld, m);
    }
    fx_tile_t8x8(r);
}

#if defined(__AVX512F__)
/* Columns [0, k) of 16 rows ld apart, one gather (load) or scatter
   (store) per column: for the last few columns of a row of 9 classes or
   more (loads k <= 4: rows of 9-12, 17-20 ... classes; stores k <= 2,
   three or four scatters cost more than a tile), which a tile would
   transpose eight columns wide. Rows of up to 4 classes keep their one
   tile: by gathers, log_softmax took 1.1-1.25x the time there. The gathers run on the load ports, beside the exps'
   arithmetic, where a tile's shuffles take the port the 512-bit
   arithmetic also uses: on an Intel Xeon (float32, one thread) 65536 x 10
   cross entropy took 0.81x the time, its gradient, softmax and
   log_softmax 0.8-0.9x with the scatters. Intel's cores only: AMD's
   gathers and scatters are microcoded (and unmeasured here), its rows
   keep the tiles. Lane j's index is j * ld, an int32. */
FX_INLINE int fx_tile_by_lanes(int64_t ld)
{
    return ld >= 0 && ld <= INT32_MAX / 16 && __builtin_cpu_is("intel");
}

FX_INLINE __m512i fx_tile_lanes(int64_t ld)
{
    return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                              _mm512_set1_epi32((int32_t)ld));
}

FX_INLINE void fx_tile_gather16(const float *x, int64_t ld, int64_t k, float *buf)
{
    const __m512i idx = fx_tile_lanes(ld);
    for (int64_t c = 0; c < k; c++) _mm512_storeu_ps(buf + 16 * c, _mm512_i32gather_ps(idx, x + c, 4));
}

FX_INLINE void fx_tile_scatter16(const float *buf, int64_t k, float *out, int64_t ld)
{
    const __m512i idx = fx_tile_lanes(ld);
    for (int64_t c = 0; c < k; c++)
        _mm512_i32scatter_ps(out + c, idx, _mm512_loadu_ps(buf + 16 * c), 4);
}
#endif

/* 16 rows, columns [0, k) of x into buf (column c at buf + c*16). */
FX_INLINE void fx_tile_load16(const float *x, int64_t ld, int64_t k, float *buf)
{
#if defined(__AVX512F__)
    /* Rows j and j + 8 in the halves of one register: each 512-bit
       shuffle transposes both 8x8 halves at once, and column c comes out
       whole, as buf holds it (half the shuffles of two 256-bit tiles and
       one 64-byte store per column, from which the kernels' 64-byte
       loads of it forward). */
    __m512 r[8];
    const __m256i m = fx_tile_mask(k);
    for (int j = 0; j < 8; j++) {
        const __m256 a = k == 8 ? _mm256_loadu_ps(x + j * ld) : _mm256_maskload_ps(x + j * ld, m);
        const __m256 b = k == 8 ? _mm256_loadu_ps(x + (j + 8) * ld)
                                : _mm256_maskload_ps(x + (j + 8) * ld, m);
        r[j] = _mm512_insertf32x8(_mm512_castps256_ps512(a), b, 1);
    }
    const __m512 t0 = _mm512_unpacklo_ps(r[0], r[1]), t1 = _mm512_unpackhi_ps(r[0], r[1]);
    const __m512 t2 = _mm512_unpacklo_ps(r[2], r[3]), t3 = _mm512_unpackhi_ps(r[2], r[3]);
    const __m512 t4 = _mm512_unpacklo_ps(r[4], r[5]), t5 = _mm512_unpackhi_ps(r[4], r[5]);
    const __m512 t6 = _mm512_unpacklo_ps(r[6], r[7]), t7 = _mm512_unpackhi_ps(r[6], r[7]);
    const __m512 u[8] = {_mm512_shuffle_ps(t0, t2, 0x44), _mm512_shuffle_ps(t0, t2, 0xEE),
                         _mm512_shuffle_ps(t1, t3, 0x44), _mm512_shuffle_ps(t1, t3, 0xEE),
                         _mm512_shuffle_ps(t4, t6, 0x44), _mm512_shuffle_ps(t4, t6, 0xEE),
                         _mm512_shuffle_ps(t5, t7, 0x44), _mm512_shuffle_ps(t5, t7, 0xEE)};
    /* The 128-bit quarters: column c < 4 takes the low quarter of each
       half of u[c] and u[c + 4], column c + 4 the high ones. */
    const __m512i qlo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
    const __m512i qhi = _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int64_t c = 0; c < k; c++)
        _mm512_storeu_ps(buf + 16 * c,
                         _mm512_permutex2var_ps(u[c & 3], c < 4 ? qlo : qhi, u[(c & 3) + 4]));
#else
    __m256 lo[8], hi[8];
    fx_tile_rows(x, ld, 0, k, lo);
    fx_tile_rows(x, ld, 1, k, hi);
    for (int64_t c = 0; c < k; c++) {
        _mm256_storeu_ps(buf + 16 * c, lo[c]);
        _mm256_storeu_ps(buf + 16 * c + 8, hi[c]);
    }
#endif
}

/* The inverse: columns [0, k) of buf into 16 rows of out (row j at
   out + j*ld); nothing past column k of a row is written. */
FX_INLINE void fx_tile_store16(const float *buf, int64_t k, float *out, int64_t ld)
{
    const __m256i m = fx_tile_mask(k);
    for (int h = 0; h < 2; h++) {
        __m256 r[8];
        for (int c = 0; c < 8; c++)
            r[c] = c < k ? _mm256_loadu_ps(buf + 16 * c + 8 * h) : _mm256_setzero_ps();
        fx_tile_t8x8(r);
        if (k == 8) {
            for (int j = 0; j < 8; j++) _mm256_storeu_ps(out + (8 * h + j) * ld, r[j]);
        } else {
            for (int j = 0; j < 8; j++) _mm256_maskstore_ps(out + (8 * h + j) * ld, m, r[j]);
        }
    }
}

#else
#define FX_HAVE_TILE 0
#endif

#endif
