// Native CPU kernels of twa_ray.core.projection on packed b-bit codes (b = 1, 2, 4, 8).
//
// A run of blocks l (m_l elements each) is stored per candidate row as the blocks' packed
// codes one after another (ceil(m_l * b / 8) bytes each; code e of a block sits in bits
// [e*b % 8, ...) of byte e*b / 8, little end first). Both kernels work on centred codes
// code - 2^(b-1) (projection.py's module docstring says why):
//
//   coef_grad:   dot[i, l]  = sum_e (code_ie - h) * g_e over block l,   gsum[l] = sum_e g_e
//   reconstruct: out[e]     = (center[e] + base_l) + sum_i w[l, i] * (code_ie - h)
//
// Blocks are cut into tiles of at most TILE elements. The gradient is centred per tile t,
// gc = fl(g - mean_t), and dot adds, per (row, tile), the float32 sum of the products
// (code - h) * gc (a "piece" of at most TILE <= SUM_PIECE products) and mean_t * S_t in
// float64, S_t the row's sum of code - h over the tile (an integer, ``code_sums``). Tile
// means need no pass over the whole block first, so g is read once; the centring keeps
// the float32 pieces small when g has a mean (projection.py's module docstring). Pieces
// are added in tile order: the result does not depend on the thread count. A tile's
// centred gradient is made once and reused by every candidate row, a group of rows at a time.
//
// Code paths: AVX-512, AVX2 + FMA (chosen at run time where the CPU has them; the binary
// is built without -march flags, so a cached build runs on any x86-64) and portable C++.
// Called from Python with tensors' data pointers; twa_ray/core/native/__init__.py checks
// dtypes, shapes and contiguity before any call.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TWA_X86 1
#endif

namespace {

constexpr int64_t TILE = 4096;  // elements per tile (a multiple of STEP; <= SUM_PIECE)
constexpr int64_t STEP = 32;    // elements per step: 4 vectors of 8 lanes, 4*b bytes
// candidate rows sharing one pass over a tile, at most (AVX2: 16 vector registers; AVX-512:
// 32, but b = 1 keeps a mask register per row and there are 8)
constexpr int ROWS_AVX2 = 4;
constexpr int rows_avx512(int bits) { return bits == 1 ? 4 : 8; }
// the reconstruction's rows per group: one load and store of the tile's sums per group, so as
// many as the registers hold (the code vector and weight of each row, PER sums, the table)
constexpr int recon_rows_avx512(int bits) { return bits == 1 ? 4 : 12; }
// bytes ahead in a row that are prefetched: a tile reads short segments of rows far apart,
// which the hardware prefetchers pick up late (benchmarks/RESULTS.md)
constexpr int64_t PREFETCH = 4096;
// The next tile's gradient, prefetched into L2 a few lines per step of the current tile's
// rows: read when its tile starts, it came in one burst of misses that the rows then waited
// for (at n = 10 the gradient is 4 of every 9 bytes read; benchmarks/RESULTS.md).
struct Ahead {
    const char* p;
    int64_t lines, per_step, next = 0;

    // floats [0, len) at p, spread over `steps` calls of step() (a prefetch past the end of
    // the gradient is harmless: prefetches do not fault)
    Ahead(const float* p_, int64_t len, int64_t steps)
        : p(reinterpret_cast<const char*>(p_)), lines((len * 4 + 63) / 64),
          per_step(steps > 0 ? (lines + steps - 1) / steps : lines) {}

    inline void step() {
        for (int64_t k = 0; k < per_step && next < lines; ++k, ++next) __builtin_prefetch(p + 64 * next, 0, 2);
    }
};

// reconstructed weights of at least this many bytes are written with non-temporal stores
// (AVX-512 code): no read of their lines before the write, and weights this large do not
// stay in the caches for their reader anyway (benchmarks/RESULTS.md)
constexpr int64_t STREAM_BYTES = int64_t{16} << 20;
// tiles per thread below which more threads cost more than they save
constexpr int64_t MIN_TILES_PER_THREAD = 8;

enum Isa { ISA_AUTO = 0, ISA_PORTABLE = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 };

struct Tile {
    int64_t block;  // local block index
    int64_t elem;   // first element, in the run
    int64_t len;    // elements
    int64_t col;    // first byte, in a row
};

std::vector<Tile> plan_tiles(const int64_t* sizes, int64_t num_blocks, int bits) {
    std::vector<Tile> tiles;
    int64_t elem = 0, col = 0;
    for (int64_t l = 0; l < num_blocks; ++l) {
        const int64_t m = sizes[l];
        for (int64_t a = 0; a < m; a += TILE) {
            tiles.push_back({l, elem + a, std::min(TILE, m - a), col + a * bits / 8});
        }
        elem += m;
        col += (m * bits + 7) / 8;
    }
    return tiles;
}

inline int64_t tile_bytes(int64_t len, int bits) { return (len * bits + 7) / 8; }

template <int R, class Fn>
inline void row_rest(int64_t rest, int64_t i, const Fn& fn) {
    if constexpr (R > 0) {
        if (rest == R)
            fn(std::integral_constant<int, R>{}, i);
        else
            row_rest<R - 1>(rest, i, fn);
    }
}

// fn(std::integral_constant<int, R>{}, i) for row groups [i, i + R) that cover [0, n): the
// fewest groups of at most ROWS rows, their sizes differing by at most one (a small last
// group, 10 = 4 + 4 + 2, would give the gradient's sums too few independent chains)
template <int ROWS>
inline int64_t row_groups(int64_t n) { return (n + ROWS - 1) / ROWS; }

template <int ROWS, class Fn>
inline void for_row_groups(int64_t n, const Fn& fn) {
    const int64_t groups = row_groups<ROWS>(n);
    int64_t i = 0;
    for (int64_t k = 0; k < groups; ++k) {
        const int64_t size = (n - i) / (groups - k);
        row_rest<ROWS>(size, i, fn);
        i += size;
    }
}

// Runs fn(first, last) over [0, count) tiles on up to `threads` threads, contiguous ranges.
template <class Fn>
void parallel_tiles(int64_t count, int threads, const Fn& fn) {
    const int64_t usable = std::max<int64_t>(1, std::min<int64_t>(threads, count / MIN_TILES_PER_THREAD));
    if (usable <= 1) {
        fn(int64_t{0}, count);
        return;
    }
    std::vector<std::thread> pool;
    const int64_t per = (count + usable - 1) / usable;
    int64_t next = per;  // tiles [next, count) not yet handed to a thread
    try {
        for (int64_t t = 1; t < usable; ++t) {
            const int64_t a = std::min(count, t * per), b = std::min(count, (t + 1) * per);
            pool.emplace_back([&fn, a, b] { fn(a, b); });
            next = b;
        }
    } catch (...) {  // no more threads: this one does the rest
    }
    fn(int64_t{0}, std::min(count, per));
    if (next < count) fn(next, count);
    for (auto& th : pool) th.join();
}

// ------------------------------------------------------------------ portable C++

template <int BITS>
inline int centred_code(const uint8_t* p, int64_t e) {
    constexpr int mask = (1 << BITS) - 1, h = 1 << (BITS - 1);
    return ((p[(e * BITS) >> 3] >> ((e * BITS) & 7)) & mask) - h;
}

// The tile's mean of g (any value near it keeps the pieces small).
inline float tile_mean(const float* g, int64_t len) {
    float part[32] = {0};  // independent sums: no chain of dependent additions
    int64_t e = 0;
    for (; e + 32 <= len; e += 32)
        for (int j = 0; j < 32; ++j) part[j] += g[e + j];
    for (; e < len; ++e) part[0] += g[e];
    float s = 0.0f;
    for (float p : part) s += p;
    return s / static_cast<float>(len);
}

template <int BITS>
void grad_tile_portable(const uint8_t* data, int64_t stride, int64_t n, const float* g, int64_t len,
                        float* pieces, float* gc_piece, float* mean_out) {
    const float mean = *mean_out = tile_mean(g, len);
    float gc[TILE];
    float s = 0.0f;
    for (int64_t e = 0; e < len; ++e) {
        gc[e] = g[e] - mean;
        s += gc[e];
    }
    *gc_piece = s;
    for (int64_t i = 0; i < n; ++i) {
        const uint8_t* row = data + i * stride;
        float acc[8] = {0};  // 8 partial sums, as the vector code keeps
        for (int64_t e = 0; e < len; ++e) acc[e & 7] += static_cast<float>(centred_code<BITS>(row, e)) * gc[e];
        float total = 0.0f;
        for (float a : acc) total += a;
        pieces[i] = total;
    }
}

template <int BITS>
void reconstruct_tile_portable(const uint8_t* data, int64_t stride, int64_t n, const float* w, float base,
                               const float* center, float* out, int64_t len, bool stream) {
    (void)stream;  // plain stores (STREAM_BYTES)
    float acc[TILE];
    std::fill(acc, acc + len, 0.0f);
    for (int64_t i = 0; i < n; ++i) {
        const uint8_t* row = data + i * stride;
        const float wi = w[i];
        for (int64_t e = 0; e < len; ++e) acc[e] += wi * static_cast<float>(centred_code<BITS>(row, e));
    }
    for (int64_t e = 0; e < len; ++e) out[e] = (center[e] + base) + acc[e];
}

// ------------------------------------------------------------------ AVX2 + FMA

#ifdef TWA_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

inline __m256i bcast_u32(const uint8_t* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(static_cast<int>(v));
}

// The 8 centred codes of vector u (elements 8u..8u+7) of the step at p, as floats.
// b = 4 returns lane j times 2^(4j) (the gradient tile is scaled to match, exactly);
// the others return them as they are.
template <int BITS>
inline __m256 decode(const uint8_t* p, int u) {
    if constexpr (BITS == 1) {
        // lane j: bit 8u + j of the step's dword; the table's index is its low 3 bits
        const __m256i sh = _mm256_add_epi32(_mm256_set1_epi32(8 * u), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256 table = _mm256_setr_ps(-1, 0, -1, 0, -1, 0, -1, 0);
        return _mm256_permutevar8x32_ps(table, _mm256_srlv_epi32(bcast_u32(p), sh));
    } else if constexpr (BITS == 2) {
        const __m256i sh = _mm256_add_epi32(_mm256_set1_epi32(16 * (u & 1)), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14));
        const __m256 table = _mm256_setr_ps(-2, -1, 0, 1, -2, -1, 0, 1);
        return _mm256_permutevar8x32_ps(table, _mm256_srlv_epi32(bcast_u32(p + 4 * (u >> 1)), sh));
    } else if constexpr (BITS == 4) {
        // (dword & 15 << 4j) - (8 << 4j) = (code - 8) * 2^(4j), exact in int32 (lane 7 wraps)
        const __m256i mask = _mm256_setr_epi32(0xF, 0xF0, 0xF00, 0xF000, 0xF0000, 0xF00000, 0xF000000,
                                               static_cast<int>(0xF0000000u));
        const __m256i centre = _mm256_setr_epi32(0x8, 0x80, 0x800, 0x8000, 0x80000, 0x800000, 0x8000000,
                                                 static_cast<int>(0x80000000u));
        return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(bcast_u32(p + 4 * u), mask), centre));
    } else {
        const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * u)));
        return _mm256_cvtepi32_ps(_mm256_sub_epi32(x, _mm256_set1_epi32(128)));
    }
}

// 2^(-4j) per lane: the b = 4 gradient tile's scaling (exact: powers of two)
inline __m256 lane_scale4() {
    return _mm256_setr_ps(1.0f, 0.0625f, 0.00390625f, 0x1p-12f, 0x1p-16f, 0x1p-20f, 0x1p-24f, 0x1p-28f);
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Rows [i0, i0 + R) of one tile: pieces[r] = sum of the products over the tile.
template <int BITS, int R>
inline void grad_rows_avx2(const uint8_t* const* rows, const float* gs, int64_t full, int64_t steps,
                           int64_t nbytes, float* pieces) {
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    constexpr int64_t line_steps = 64 / (4 * BITS) > 0 ? 64 / (4 * BITS) : 1;  // steps per cache line
    for (int64_t s = 0; s < full; ++s) {
        const int64_t off = s * 4 * BITS;
        if (s % line_steps == 0)
            for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(rows[r] + off + PREFETCH), _MM_HINT_T0);
        for (int u = 0; u < 4; ++u) {
            const __m256 gv = _mm256_load_ps(gs + s * STEP + 8 * u);
            for (int r = 0; r < R; ++r) acc[r][u & 1] = _mm256_fmadd_ps(decode<BITS>(rows[r] + off, u), gv, acc[r][u & 1]);
        }
    }
    if (full < steps) {  // the tile's last, partial step: its bytes copied, zero padded
        const int64_t off = full * 4 * BITS;
        for (int r = 0; r < R; ++r) {
            alignas(32) uint8_t buf[32] = {0};
            std::memcpy(buf, rows[r] + off, static_cast<size_t>(nbytes - off));
            for (int u = 0; u < 4; ++u)
                acc[r][u & 1] = _mm256_fmadd_ps(decode<BITS>(buf, u), _mm256_load_ps(gs + full * STEP + 8 * u), acc[r][u & 1]);
        }
    }
    for (int r = 0; r < R; ++r) pieces[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
}

template <int BITS>
void grad_tile_avx2(const uint8_t* data, int64_t stride, int64_t n, const float* g, int64_t len,
                    float* pieces, float* gc_piece, float* mean_out) {
    const float mean = *mean_out = tile_mean(g, len);
    alignas(32) float gs[TILE];
    const int64_t steps = (len + STEP - 1) / STEP;
    const int64_t nbytes = tile_bytes(len, BITS);
    const int64_t full = nbytes / (4 * BITS);
    const __m256 mv = _mm256_set1_ps(mean);
    __m256 sum[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t s = 0; s < steps; ++s) {
        for (int u = 0; u < 4; ++u) {  // one sum per vector of the step: independent chains
            const int64_t e = s * STEP + 8 * u;
            __m256 gc;
            if (e + 8 <= len) {
                gc = _mm256_sub_ps(_mm256_loadu_ps(g + e), mv);
            } else {  // zero past the end: padding codes then add nothing
                alignas(32) float t[8] = {0};
                for (int64_t j = e; j < len; ++j) t[j - e] = g[j] - mean;
                gc = _mm256_load_ps(t);
            }
            sum[u] = _mm256_add_ps(sum[u], gc);
            if constexpr (BITS == 4) gc = _mm256_mul_ps(gc, lane_scale4());
            _mm256_store_ps(gs + e, gc);
        }
    }
    *gc_piece = hsum(_mm256_add_ps(_mm256_add_ps(sum[0], sum[1]), _mm256_add_ps(sum[2], sum[3])));
    for_row_groups<ROWS_AVX2>(n, [&](auto group, int64_t i) {
        constexpr int R = decltype(group)::value;
        const uint8_t* rows[R];
        for (int r = 0; r < R; ++r) rows[r] = data + (i + r) * stride;
        grad_rows_avx2<BITS, R>(rows, gs, full, steps, nbytes, pieces + i);
    });
}

// acc (the tile's sums over the rows so far) += sum over rows [0, R) of w[r] * codes
template <int BITS, int R>
inline void reconstruct_rows_avx2(const uint8_t* const* rows, const float* w, bool first, int64_t full,
                                  int64_t steps, int64_t nbytes, float* acc) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm256_set1_ps(w[r]);
    constexpr int64_t line_steps = 64 / (4 * BITS) > 0 ? 64 / (4 * BITS) : 1;  // steps per cache line
    for (int64_t s = 0; s < steps; ++s) {
        const uint8_t* src[R];
        alignas(32) uint8_t buf[R][32];
        const int64_t off = s * 4 * BITS;
        if (s % line_steps == 0)
            for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(rows[r] + off + PREFETCH), _MM_HINT_T0);
        for (int r = 0; r < R; ++r) {
            if (s < full) {
                src[r] = rows[r] + off;
            } else {  // the tile's last, partial step
                std::memset(buf[r], 0, 32);
                std::memcpy(buf[r], rows[r] + off, static_cast<size_t>(nbytes - off));
                src[r] = buf[r];
            }
        }
        for (int u = 0; u < 4; ++u) {
            float* a = acc + s * STEP + 8 * u;
            __m256 v = first ? _mm256_setzero_ps() : _mm256_load_ps(a);
            for (int r = 0; r < R; ++r) v = _mm256_fmadd_ps(decode<BITS>(src[r], u), wv[r], v);
            _mm256_store_ps(a, v);
        }
    }
}

template <int BITS>
void reconstruct_tile_avx2(const uint8_t* data, int64_t stride, int64_t n, const float* w, float base,
                           const float* center, float* out, int64_t len, bool stream) {
    (void)stream;  // plain stores (STREAM_BYTES)
    alignas(32) float acc[TILE];
    const int64_t steps = (len + STEP - 1) / STEP;
    const int64_t nbytes = tile_bytes(len, BITS);
    const int64_t full = nbytes / (4 * BITS);
    for_row_groups<ROWS_AVX2>(n, [&](auto group, int64_t i) {
        constexpr int R = decltype(group)::value;
        const uint8_t* rows[R];
        for (int r = 0; r < R; ++r) rows[r] = data + (i + r) * stride;
        reconstruct_rows_avx2<BITS, R>(rows, w + i, i == 0, full, steps, nbytes, acc);
    });
    if (n == 0) std::fill(acc, acc + steps * STEP, 0.0f);
    const __m256 bv = _mm256_set1_ps(base);
    for (int64_t e = 0; e < len; e += 8) {
        __m256 a = _mm256_load_ps(acc + e);
        if constexpr (BITS == 4) a = _mm256_mul_ps(a, lane_scale4());  // exact: powers of two
        if (e + 8 <= len) {
            _mm256_storeu_ps(out + e, _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(center + e), bv), a));
        } else {
            alignas(32) float t[8];
            _mm256_store_ps(t, a);
            for (int64_t j = e; j < len; ++j) out[j] = (center[j] + base) + t[j - e];
        }
    }
}

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

// ------------------------------------------------------------------ AVX-512

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#endif

// b = 2, 4, 8: a vector lane holds one byte (16 bytes at a time) and code k of every lane
// is one table lookup of (byte >> k*b): vpermps reads an index's low 4 bits, so the table
// (i & (2^b - 1)) - 2^(b-1), i < 16, gives the centred code as a float. The gradient (and
// the reconstruction's sums) are therefore kept de-interleaved per tile: segment k holds
// the elements j*per + k, segments in bit-reversed order of k (the order the halving
// passes below leave them in).
// b = 1: 16 codes are a mask register as stored, and (code - 1) * v is -v where the bit is
// clear: a masked subtraction (as exact as the product), elements in their own order.

constexpr int64_t SEG_PAD = 16;  // segments are padded to whole 16-byte groups

template <int PER>
constexpr int segment_of(int k) {  // bit reversal of k over log2(PER) bits
    int s = 0;
    for (int m = PER >> 1, b = 1; m > 0; m >>= 1, b <<= 1)
        if (k & m) s |= b;
    return s;
}

template <int BITS>
inline __m512 code_table() {
    constexpr int mask = (1 << BITS) - 1, h = 1 << (BITS - 1);
    alignas(64) float t[16];
    for (int i = 0; i < 16; ++i) t[i] = static_cast<float>((i & mask) - h);
    return _mm512_load_ps(t);
}

// Centred codes k of the 16 bytes in x (zero-extended to dwords), as floats.
template <int BITS>
inline __m512 decode16(__m512i x, int k, __m512 table) {
    if constexpr (BITS == 8) {
        (void)k;
        (void)table;
        return _mm512_cvtepi32_ps(_mm512_sub_epi32(x, _mm512_set1_epi32(128)));
    } else {
        return _mm512_permutexvar_ps(k == 0 ? x : _mm512_srli_epi32(x, static_cast<unsigned>(k * BITS)), table);
    }
}

inline __m512i load16(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The sum of x[0, len), in four independent chains (one chain of dependent additions
// would bound the gradient tile's preparation, which n = 10 rows do not amortise).
inline float sum_of(const float* x, int64_t len) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t e = 0;
    for (; e + 64 <= len; e += 64) {
        s0 = _mm512_add_ps(s0, _mm512_loadu_ps(x + e));
        s1 = _mm512_add_ps(s1, _mm512_loadu_ps(x + e + 16));
        s2 = _mm512_add_ps(s2, _mm512_loadu_ps(x + e + 32));
        s3 = _mm512_add_ps(s3, _mm512_loadu_ps(x + e + 48));
    }
    for (; e < len; e += 16) {
        const __mmask16 keep = e + 16 <= len ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (len - e)) - 1);
        s0 = _mm512_add_ps(s0, _mm512_maskz_loadu_ps(keep, x + e));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

// the clear bits of the 16 codes at p (b = 1): where (code - 1) * v = -v
inline __mmask16 zero_codes(const uint8_t* p) {
    uint16_t bits;
    std::memcpy(&bits, p, 2);
    return static_cast<__mmask16>(~bits);
}

// n floats (n a multiple of 32), 16 at a time from load(i) -> dst: the even ones, then the odd ones
template <class Load>
inline void halve_from(const Load& load, float* dst, int64_t n) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int64_t i = 0; i < n; i += 32) {
        const __m512 a = load(i), b = load(i + 16);
        _mm512_store_ps(dst + i / 2, _mm512_permutex2var_ps(a, even, b));
        _mm512_store_ps(dst + n / 2 + i / 2, _mm512_permutex2var_ps(a, odd, b));
    }
}

inline void halve(const float* src, float* dst, int64_t n) {
    halve_from([src](int64_t i) { return _mm512_load_ps(src + i); }, dst, n);
}

// the inverse of halve: dst[2i] = src[i], dst[2i + 1] = src[n/2 + i]
inline void unhalve(const float* src, float* dst, int64_t n) {
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
    for (int64_t i = 0; i < n; i += 32) {
        const __m512 a = _mm512_load_ps(src + i / 2), b = _mm512_load_ps(src + n / 2 + i / 2);
        _mm512_store_ps(dst + i, _mm512_permutex2var_ps(a, lo, b));
        _mm512_store_ps(dst + i + 16, _mm512_permutex2var_ps(a, hi, b));
    }
}

// a (PER segments of seg floats, natural order; halved already into `parts` parts)
// de-interleaved, using b as scratch; returns the one of the two that holds the result
template <int PER>
inline float* deinterleave(float* a, float* b, int64_t seg, int parts = 1) {
    for (; parts < PER; parts <<= 1) {  // halve every part
        const int64_t len = PER * seg / parts;
        for (int p = 0; p < parts; ++p) halve(a + p * len, b + p * len, len);
        std::swap(a, b);
    }
    return a;
}

// the inverse of deinterleave
template <int PER>
inline float* interleave(float* a, float* b, int64_t seg) {
    for (int parts = PER >> 1; parts >= 1; parts >>= 1) {
        const int64_t len = PER * seg / parts;
        for (int p = 0; p < parts; ++p) unhalve(a + p * len, b + p * len, len);
        std::swap(a, b);
    }
    return a;
}

template <int BITS, int R>
inline void grad_rows_avx512(const uint8_t* const* rows, const float* gs, int64_t seg, int64_t full,
                             int64_t groups, int64_t nbytes, float* pieces, Ahead& ahead) {
    constexpr int PER = 8 / BITS;
    const __m512 table = code_table<BITS>();
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    auto group = [&](const uint8_t* const* src, int64_t off, int64_t j) {
        if constexpr (BITS == 1) {  // elements 8j.. in order: 8 masks of 16
            for (int t = 0; t < 8; ++t) {
                const __m512 gv = _mm512_load_ps(gs + 8 * j + 16 * t);
                for (int r = 0; r < R; ++r)
                    acc[r][t & 1] = _mm512_mask_sub_ps(acc[r][t & 1], zero_codes(src[r] + off + 2 * t), acc[r][t & 1], gv);
            }
            return;
        }
        __m512i x[R];
        for (int r = 0; r < R; ++r) x[r] = load16(src[r] + off);
        for (int k = 0; k < PER; ++k) {
            const __m512 gv = _mm512_load_ps(gs + segment_of<PER>(k) * seg + j);
            for (int r = 0; r < R; ++r) acc[r][k & 1] = _mm512_fmadd_ps(decode16<BITS>(x[r], k, table), gv, acc[r][k & 1]);
        }
    };
    for (int64_t q = 0; q < full; ++q) {
        if (q % 4 == 0)
            for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(rows[r] + 16 * q + PREFETCH), _MM_HINT_T0);
        ahead.step();
        group(rows, 16 * q, 16 * q);
    }
    if (full < groups) {  // the tile's last, partial group: its bytes copied, zero padded
        alignas(16) uint8_t buf[R][16];
        const uint8_t* src[R];
        for (int r = 0; r < R; ++r) {
            std::memset(buf[r], 0, 16);
            std::memcpy(buf[r], rows[r] + 16 * full, static_cast<size_t>(nbytes - 16 * full));
            src[r] = buf[r];
        }
        group(src, 0, 16 * full);
    }
    for (int r = 0; r < R; ++r) pieces[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}

template <int BITS>
void grad_tile_avx512(const uint8_t* data, int64_t stride, int64_t n, const float* g, int64_t len,
                      float* pieces, float* gc_piece, float* mean_out) {
    constexpr int PER = 8 / BITS;
    alignas(64) float gs[TILE + PER * SEG_PAD];
    alignas(64) float tmp[TILE + PER * SEG_PAD];
    const int64_t nbytes = tile_bytes(len, BITS);
    const int64_t groups = (nbytes + 15) / 16, full = nbytes / 16;
    const int64_t seg = groups * 16;  // floats per segment
    // the tile's mean (the tile stays in cache for the next pass)
    const float mean = *mean_out = sum_of(g, len) / static_cast<float>(len);
    const __m512 mv = _mm512_set1_ps(mean);
    auto centred = [&](int64_t e) {  // g - mean, zero past the end (padding codes then add nothing)
        if (e + 16 <= len) return _mm512_sub_ps(_mm512_loadu_ps(g + e), mv);
        const __mmask16 keep = e < len ? static_cast<__mmask16>((1u << (len - e)) - 1) : 0;
        return _mm512_maskz_sub_ps(keep, _mm512_maskz_loadu_ps(keep, g + e), mv);
    };
    const float* gd = gs;
    if constexpr (BITS == 1 || BITS == 8) {  // elements in order
        for (int64_t e = 0; e < PER * seg; e += 16) _mm512_store_ps(gs + e, centred(e));
    } else {  // the first halving pass reads g itself
        halve_from(centred, gs, PER * seg);
        gd = deinterleave<PER>(gs, tmp, seg, 2);
    }
    *gc_piece = sum_of(gd, PER * seg);  // the centred tile, zero padded
    Ahead ahead(g + len, len, row_groups<rows_avx512(BITS)>(n) * full);
    for_row_groups<rows_avx512(BITS)>(n, [&](auto group, int64_t i) {
        constexpr int R = decltype(group)::value;
        const uint8_t* rows[R];
        for (int r = 0; r < R; ++r) rows[r] = data + (i + r) * stride;
        grad_rows_avx512<BITS, R>(rows, gd, seg, full, groups, nbytes, pieces + i, ahead);
    });
}

// the PER vectors v[k] (codes k of 16 bytes: elements PER*i + k, i < 16) as 16*PER
// consecutive elements, out[t] holding elements [16t, 16t + 16): the permutes of interleave,
// in registers
template <int PER>
inline void interleave_regs(const __m512* v, __m512* out) {
    if constexpr (PER == 1) {
        out[0] = v[0];
    } else {
        const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
        if constexpr (PER == 2) {
            out[0] = _mm512_permutex2var_ps(v[0], lo, v[1]);
            out[1] = _mm512_permutex2var_ps(v[0], hi, v[1]);
        } else {  // PER == 4: the even elements (codes 0, 2), the odd ones (1, 3), then both
            const __m512 e0 = _mm512_permutex2var_ps(v[0], lo, v[2]), e1 = _mm512_permutex2var_ps(v[0], hi, v[2]);
            const __m512 o0 = _mm512_permutex2var_ps(v[1], lo, v[3]), o1 = _mm512_permutex2var_ps(v[1], hi, v[3]);
            out[0] = _mm512_permutex2var_ps(e0, lo, o0);
            out[1] = _mm512_permutex2var_ps(e0, hi, o0);
            out[2] = _mm512_permutex2var_ps(e1, lo, o1);
            out[3] = _mm512_permutex2var_ps(e1, hi, o1);
        }
    }
}

// floats of center prefetched ahead of the fused reconstruction's reads: read between the
// rows' codes rather than in a pass of their own, its lines came late from the hardware
// prefetchers
constexpr int64_t CENTER_AHEAD = 2048;

// Where the reconstruction's last row group writes (b = 2, 4, 8): its sums go straight to
// out = (center + base) + sums, with no pass over the tile's sums after the rows.
struct Dest {
    const float* center;
    float* out;
    int64_t len;
    __m512 base;
    bool nt;  // streamed stores (out 64-byte aligned)
};

// out[e, e + 16) = (center + base) + sums, the elements before len
inline void write_out(const Dest& d, int64_t e, __m512 sums) {
    if (e + 16 <= d.len) {
        const __m512 o = _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(d.center + e), d.base), sums);
        if (d.nt)
            _mm512_stream_ps(d.out + e, o);
        else
            _mm512_storeu_ps(d.out + e, o);
    } else if (e < d.len) {
        const __mmask16 keep = static_cast<__mmask16>((1u << (d.len - e)) - 1);
        const __m512 c = _mm512_maskz_loadu_ps(keep, d.center + e);
        _mm512_mask_storeu_ps(d.out + e, keep, _mm512_add_ps(_mm512_add_ps(c, d.base), sums));
    }
}

// acc (the tile's sums over the rows so far, de-interleaved) += sum over rows [0, R) of
// w[r] * codes; LAST (b = 2, 4, 8): the sums of the tile's last group of rows go to dest
template <int BITS, int R, bool LAST>
inline void reconstruct_rows_avx512(const uint8_t* const* rows, const float* w, bool first, int64_t seg,
                                    int64_t full, int64_t groups, int64_t nbytes, float* acc, const Dest& dest) {
    constexpr int PER = 8 / BITS;
    const __m512 table = code_table<BITS>();
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_set1_ps(w[r]);
    auto group = [&](const uint8_t* const* src, int64_t off, int64_t j) {
        if constexpr (BITS == 1) {
            for (int t = 0; t < 8; ++t) {
                float* a = acc + 8 * j + 16 * t;
                __m512 v = first ? _mm512_setzero_ps() : _mm512_load_ps(a);
                for (int r = 0; r < R; ++r) v = _mm512_mask_sub_ps(v, zero_codes(src[r] + off + 2 * t), v, wv[r]);
                _mm512_store_ps(a, v);
            }
            return;
        } else {
            __m512 v[PER];
            for (int k = 0; k < PER; ++k) v[k] = first ? _mm512_setzero_ps() : _mm512_load_ps(acc + segment_of<PER>(k) * seg + j);
            for (int r = 0; r < R; ++r) {  // per k, the rows' products added in row order
                const __m512i x = load16(src[r] + off);
                for (int k = 0; k < PER; ++k) v[k] = _mm512_fmadd_ps(decode16<BITS>(x, k, table), wv[r], v[k]);
            }
            if constexpr (!LAST) {
                for (int k = 0; k < PER; ++k) _mm512_store_ps(acc + segment_of<PER>(k) * seg + j, v[k]);
            } else {
                __m512 sums[PER];
                interleave_regs<PER>(v, sums);
                for (int t = 0; t < PER; ++t) {
                    const int64_t e = PER * j + 16 * t;
                    _mm_prefetch(reinterpret_cast<const char*>(dest.center + e + CENTER_AHEAD), _MM_HINT_T0);
                    write_out(dest, e, sums[t]);
                }
            }
        }
    };
    for (int64_t q = 0; q < full; ++q) {
        if (q % 4 == 0)
            for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(rows[r] + 16 * q + PREFETCH), _MM_HINT_T0);
        group(rows, 16 * q, 16 * q);
    }
    if (full < groups) {
        alignas(16) uint8_t buf[R][16];
        const uint8_t* src[R];
        for (int r = 0; r < R; ++r) {
            std::memset(buf[r], 0, 16);
            std::memcpy(buf[r], rows[r] + 16 * full, static_cast<size_t>(nbytes - 16 * full));
            src[r] = buf[r];
        }
        group(src, 0, 16 * full);
    }
}

template <int BITS>
void reconstruct_tile_avx512(const uint8_t* data, int64_t stride, int64_t n, const float* w, float base,
                             const float* center, float* out, int64_t len, bool stream) {
    constexpr int PER = 8 / BITS;
    constexpr bool fused = BITS != 1;  // the last row group writes out (b = 1: acc as it is, in order)
    alignas(64) float acc[TILE + PER * SEG_PAD];
    const int64_t nbytes = tile_bytes(len, BITS);
    const int64_t groups = (nbytes + 15) / 16, full = nbytes / 16;
    const int64_t seg = groups * 16;
    const bool nt = stream && (reinterpret_cast<uintptr_t>(out) & 63) == 0;  // streamed stores need aligned lines
    const Dest dest{center, out, len, _mm512_set1_ps(base), nt};
    for_row_groups<recon_rows_avx512(BITS)>(n, [&](auto group, int64_t i) {
        constexpr int R = decltype(group)::value;
        const uint8_t* rows[R];
        for (int r = 0; r < R; ++r) rows[r] = data + (i + r) * stride;
        if (fused && i + R == n)
            reconstruct_rows_avx512<BITS, R, fused>(rows, w + i, i == 0, seg, full, groups, nbytes, acc, dest);
        else
            reconstruct_rows_avx512<BITS, R, false>(rows, w + i, i == 0, seg, full, groups, nbytes, acc, dest);
    });
    if (!fused || n == 0) {
        alignas(64) float tmp[TILE + PER * SEG_PAD];
        if (n == 0) std::fill(acc, acc + PER * seg, 0.0f);
        const float* sums = BITS == 1 ? acc : interleave<PER>(acc, tmp, seg);
        for (int64_t e = 0; e < len; e += 16) write_out(dest, e, _mm512_load_ps(sums + e));
    }
    if (nt) _mm_sfence();  // the streamed stores are ordered before the caller's (other threads') reads
}

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

bool cpu_has_avx2() {
    static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return has;
}

bool cpu_has_avx512() {
    static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f");
    return has;
}
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
#endif

int resolve_isa(int isa) {
    if (isa == ISA_AUTO) return cpu_has_avx512() ? ISA_AVX512 : cpu_has_avx2() ? ISA_AVX2 : ISA_PORTABLE;
    return isa;
}

// ------------------------------------------------------------------ dispatch

using GradTile = void (*)(const uint8_t*, int64_t, int64_t, const float*, int64_t, float*, float*, float*);
using ReconTile = void (*)(const uint8_t*, int64_t, int64_t, const float*, float, const float*, float*, int64_t, bool);

template <int BITS>
GradTile grad_tile_for(int isa) {
#ifdef TWA_X86
    if (isa == ISA_AVX2) return grad_tile_avx2<BITS>;
    if (isa == ISA_AVX512) return grad_tile_avx512<BITS>;
#endif
    (void)isa;
    return grad_tile_portable<BITS>;
}

template <int BITS>
ReconTile reconstruct_tile_for(int isa) {
#ifdef TWA_X86
    if (isa == ISA_AVX2) return reconstruct_tile_avx2<BITS>;
    if (isa == ISA_AVX512) return reconstruct_tile_avx512<BITS>;
#endif
    (void)isa;
    return reconstruct_tile_portable<BITS>;
}

GradTile pick_grad(int bits, int isa) {
    switch (bits) {
        case 1: return grad_tile_for<1>(isa);
        case 2: return grad_tile_for<2>(isa);
        case 4: return grad_tile_for<4>(isa);
        case 8: return grad_tile_for<8>(isa);
        default: return nullptr;
    }
}

ReconTile pick_reconstruct(int bits, int isa) {
    switch (bits) {
        case 1: return reconstruct_tile_for<1>(isa);
        case 2: return reconstruct_tile_for<2>(isa);
        case 4: return reconstruct_tile_for<4>(isa);
        case 8: return reconstruct_tile_for<8>(isa);
        default: return nullptr;
    }
}

template <class T>
T* ptr(unsigned long long address) { return reinterpret_cast<T*>(static_cast<uintptr_t>(address)); }

bool check_args(int bits, int isa) {
    if (bits != 1 && bits != 2 && bits != 4 && bits != 8) {
        PyErr_SetString(PyExc_ValueError, "bits must be 1, 2, 4 or 8");
        return false;
    }
    if (isa != ISA_PORTABLE && isa != ISA_AVX2 && isa != ISA_AVX512) {
        PyErr_SetString(PyExc_ValueError, "unknown instruction set");
        return false;
    }
    if ((isa == ISA_AVX2 && !cpu_has_avx2()) || (isa == ISA_AVX512 && !cpu_has_avx512())) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU lacks the instruction set asked for");
        return false;
    }
    return true;
}

// Runs fn() without the GIL; a C++ exception becomes a Python one.
template <class Fn>
PyObject* without_gil(const Fn& fn) {
    std::string error;
    bool no_memory = false;
    Py_BEGIN_ALLOW_THREADS
    try {
        fn();
    } catch (const std::bad_alloc&) {
        no_memory = true;
    } catch (const std::exception& exc) {
        error = exc.what();
    }
    Py_END_ALLOW_THREADS
    if (no_memory) return PyErr_NoMemory();
    if (!error.empty()) {
        PyErr_SetString(PyExc_RuntimeError, error.c_str());
        return nullptr;
    }
    Py_RETURN_NONE;
}

// coef_grad(data, n, stride, g, sizes, num_blocks, code_sums, bits, dot, g_sum, threads, isa)
//   data (n, stride) uint8; g (m,) float32; sizes (L,) int64; code_sums (tiles, n) int32;
//   out: dot (n, L) float64, g_sum (L,) float64 (overwritten)
PyObject* py_coef_grad(PyObject*, PyObject* args) {
    unsigned long long data, g, sizes, code_sums, dot, g_sum;
    Py_ssize_t n, stride, num_blocks;
    int bits, threads, isa;
    if (!PyArg_ParseTuple(args, "KnnKKnKiKKii", &data, &n, &stride, &g, &sizes, &num_blocks, &code_sums, &bits, &dot,
                          &g_sum, &threads, &isa))
        return nullptr;
    isa = resolve_isa(isa);
    if (!check_args(bits, isa)) return nullptr;
    const GradTile tile_fn = pick_grad(bits, isa);
    return without_gil([&] {
        const std::vector<Tile> tiles = plan_tiles(ptr<const int64_t>(sizes), num_blocks, bits);
        const int64_t count = static_cast<int64_t>(tiles.size());
        std::vector<float> pieces(static_cast<size_t>(count * n)), gc_pieces(static_cast<size_t>(count)),
            means(static_cast<size_t>(count));
        const uint8_t* d = ptr<const uint8_t>(data);
        const float* gp = ptr<const float>(g);
        parallel_tiles(count, threads, [&](int64_t a, int64_t b) {
            for (int64_t t = a; t < b; ++t) {
                const Tile& tl = tiles[t];
                tile_fn(d + tl.col, stride, n, gp + tl.elem, tl.len, pieces.data() + t * n, gc_pieces.data() + t,
                        means.data() + t);
            }
        });
        const int32_t* cs = ptr<const int32_t>(code_sums);
        double* dp = ptr<double>(dot);
        double* sp = ptr<double>(g_sum);
        std::fill(dp, dp + n * num_blocks, 0.0);
        std::fill(sp, sp + num_blocks, 0.0);
        for (int64_t t = 0; t < count; ++t) {  // float64 sums, in tile order
            const int64_t l = tiles[t].block;
            const double mean = means[t];
            for (int64_t i = 0; i < n; ++i) dp[i * num_blocks + l] += pieces[t * n + i] + mean * cs[t * n + i];
            sp[l] += gc_pieces[t] + mean * static_cast<double>(tiles[t].len);
        }
    });
}

template <int BITS>
void code_sums_tile(const uint8_t* data, int64_t stride, int64_t n, int64_t len, int32_t* out) {
    constexpr int PER = 8 / BITS, mask = (1 << BITS) - 1, h = 1 << (BITS - 1);
    int32_t per_byte[256];  // sum of a byte's centred codes
    for (int v = 0; v < 256; ++v) {
        per_byte[v] = 0;
        for (int k = 0; k < PER; ++k) per_byte[v] += ((v >> (k * BITS)) & mask) - h;
    }
    const int64_t full = len / PER;
    for (int64_t i = 0; i < n; ++i) {
        const uint8_t* row = data + i * stride;
        int32_t s = 0;
        for (int64_t j = 0; j < full; ++j) s += per_byte[row[j]];
        for (int64_t e = full * PER; e < len; ++e) s += centred_code<BITS>(row, e);
        out[i] = s;
    }
}

// code_sums(data, n, stride, sizes, num_blocks, bits, out, threads)
//   out (tiles, n) int32: each row's sum of code - 2^(b-1) over each tile of coef_grad
PyObject* py_code_sums(PyObject*, PyObject* args) {
    unsigned long long data, sizes, out;
    Py_ssize_t n, stride, num_blocks;
    int bits, threads;
    if (!PyArg_ParseTuple(args, "KnnKniKi", &data, &n, &stride, &sizes, &num_blocks, &bits, &out, &threads))
        return nullptr;
    if (!check_args(bits, ISA_PORTABLE)) return nullptr;
    using Fn = void (*)(const uint8_t*, int64_t, int64_t, int64_t, int32_t*);
    const Fn fn = bits == 1 ? code_sums_tile<1> : bits == 2 ? code_sums_tile<2> : bits == 4 ? code_sums_tile<4> : code_sums_tile<8>;
    return without_gil([&] {
        const std::vector<Tile> tiles = plan_tiles(ptr<const int64_t>(sizes), num_blocks, bits);
        const uint8_t* d = ptr<const uint8_t>(data);
        int32_t* op = ptr<int32_t>(out);
        parallel_tiles(static_cast<int64_t>(tiles.size()), threads, [&](int64_t a, int64_t b) {
            for (int64_t t = a; t < b; ++t) fn(d + tiles[t].col, stride, n, tiles[t].len, op + t * n);
        });
    });
}

// reconstruct(data, n, stride, weights, base, center, out, sizes, num_blocks, bits, threads, isa)
//   weights (L, n), base (L,), center (m,) float32; out (m,) float32 (overwritten)
PyObject* py_reconstruct(PyObject*, PyObject* args) {
    unsigned long long data, weights, base, center, out, sizes;
    Py_ssize_t n, stride, num_blocks;
    int bits, threads, isa;
    if (!PyArg_ParseTuple(args, "KnnKKKKKniii", &data, &n, &stride, &weights, &base, &center, &out, &sizes,
                          &num_blocks, &bits, &threads, &isa))
        return nullptr;
    isa = resolve_isa(isa);
    if (!check_args(bits, isa)) return nullptr;
    const ReconTile tile_fn = pick_reconstruct(bits, isa);
    return without_gil([&] {
        const std::vector<Tile> tiles = plan_tiles(ptr<const int64_t>(sizes), num_blocks, bits);
        const uint8_t* d = ptr<const uint8_t>(data);
        const float* wp = ptr<const float>(weights);
        const float* bp = ptr<const float>(base);
        const float* cp = ptr<const float>(center);
        float* op = ptr<float>(out);
        int64_t m = 0;
        for (int64_t l = 0; l < num_blocks; ++l) m += ptr<const int64_t>(sizes)[l];
        const bool stream = m * 4 >= STREAM_BYTES;
        parallel_tiles(static_cast<int64_t>(tiles.size()), threads, [&](int64_t a, int64_t b) {
            for (int64_t t = a; t < b; ++t) {
                const Tile& tl = tiles[t];
                tile_fn(d + tl.col, stride, n, wp + tl.block * n, bp[tl.block], cp + tl.elem, op + tl.elem, tl.len,
                        stream);
            }
        });
    });
}

PyObject* py_isa(PyObject*, PyObject*) {
    const int isa = resolve_isa(ISA_AUTO);
    return PyUnicode_FromString(isa == ISA_AVX512 ? "avx512" : isa == ISA_AVX2 ? "avx2" : "portable");
}

PyMethodDef methods[] = {
    {"coef_grad", py_coef_grad, METH_VARARGS, "dot (n, L) of the centred codes with g and g_sum (L,)"},
    {"code_sums", py_code_sums, METH_VARARGS, "(tiles, n) sums of the centred codes per tile"},
    {"reconstruct", py_reconstruct, METH_VARARGS, "out (m,) = center + base + sum_i w_i * centred codes"},
    {"isa", py_isa, METH_NOARGS, "the instruction set the automatic choice uses on this CPU"},
    {nullptr, nullptr, 0, nullptr},
};

#define TWA_STR2(x) #x
#define TWA_STR(x) TWA_STR2(x)
PyModuleDef module_def = {PyModuleDef_HEAD_INIT, TWA_STR(TORCH_EXTENSION_NAME), nullptr, -1, methods};

}  // namespace

#define TWA_CAT2(a, b) a##b
#define TWA_CAT(a, b) TWA_CAT2(a, b)
PyMODINIT_FUNC TWA_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
    PyObject* module = PyModule_Create(&module_def);
    if (module != nullptr && (PyModule_AddIntConstant(module, "TILE", static_cast<long>(TILE)) < 0 ||
                              PyModule_AddIntConstant(module, "STREAM_BYTES", static_cast<long>(STREAM_BYTES)) < 0)) {
        Py_DECREF(module);
        return nullptr;
    }
    return module;
}
