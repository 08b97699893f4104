/* C kernels of pvq's CPU layers, built by `pip install` when a C compiler is present
 * (setup.py: an optional extension; without it the numba kernels run, same results).
 *
 * Python calls these through ctypes (pvq/runtime/c_kernels.py), which releases the GIL.
 * Each kernel takes a row range and the layer's constant arrays; `pvq_run` splits the
 * rows over a small persistent thread pool (workers spin briefly, then sleep), so a call
 * costs a few microseconds of hand-off instead of a Python thread pool's ~100.
 *
 * Kernels (every weight formed exactly as the numba kernels and the reference decoder):
 *   PVQ split-order codes as stored (D = 8, 16, 32): the tree of splits level by level
 *     over a row (many codes in flight), P(4, k) leaves from a table, then per group
 *     scale = (float)(gain / sqrt(||p||^2)) and the dot product;
 *   the int8 compute layout: points (int8) x a float32 scale per group;
 *   4- and 8-bit grids (RTN / GPTQ, the 8-bit embedding as head): (code - zero) * scale.
 * Every kernel computes a GEMV over B token rows (out[b, r]) or decodes weight rows.
 * AVX2 + FMA paths are chosen at run time where the CPU has them; portable C otherwise.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PVQ_X86 1
#else
#define PVQ_X86 0
#endif

/* ------------------------------------------------------------------ layer arguments */

typedef struct {
    /* PVQ split order */
    const uint64_t *words;   /* the code stream's whole 8-byte words */
    const uint8_t *stream;   /* the code stream */
    int64_t n_words, n_stream, nbits, D, G, K, total, levels;
    const int64_t *offs;     /* (levels, (K+1)*(K+2)) */
    const int64_t *divs;
    const double *recs;
    const uint8_t *guide;    /* (levels, (K+1)*128) */
    const double *gscale;    /* (levels, K+1) */
    const int64_t *lbase;    /* (K+2) */
    const uint64_t *leaf64;  /* a leaf: its 4 int8 coordinates (low 32 bits), squared norm (high 32) */
    const double *inv_norm;  /* 1 / sqrt(n) for n = 0..K*K */
    /* gains */
    int64_t gain_mode, gbits, n_esc;
    const int16_t *gains16;  /* (R, G) float16 bits (gain_mode 0) */
    const uint8_t *gidx;     /* packed indices (gain_mode 1) */
    const double *codebook, *row_scale;
    const int64_t *esc_pos;  /* (R, n_esc) */
    const double *esc_gain;
    /* int8 layout */
    const int8_t *points;    /* (R, C) */
    const float *scales;     /* (R, G) */
    /* int4 layout: nibbles (p clamped to [-8, 7], plus 8; low nibble first) and per row the
     * escapes p - clamp(p) at columns esc_col[esc_ptr[r]..esc_ptr[r+1]] */
    const uint8_t *nibbles;  /* (R, C/2) */
    const int64_t *x_ptr;    /* (R + 1) */
    const int32_t *x_col;
    const int8_t *x_delta;
    /* grid */
    const uint8_t *codes;
    int64_t bits, gs;
    const float *gscales;    /* (R, G) */
    const int32_t *zeros;    /* (R, G) */
    int64_t C;
} LayerArgs;

typedef struct {
    const float *x;      /* (B, C) */
    int64_t B;
    float *out;          /* (B, R) */
    float *weight;       /* rows lo..hi at weight[(r - row0) * C] (decode) or NULL (GEMV) */
    int8_t *points_out;  /* transcode: (R, C) */
    float *scales_out;   /* transcode: (R, G) */
    int64_t row0, R;
} CallArgs;

static int have_avx2 = 0;

/* ------------------------------------------------------------------ float16 */

static inline double half_to_double(int16_t h) {
    uint32_t u = (uint16_t)h;
    double sign = (u & 0x8000) ? -1.0 : 1.0;
    uint32_t e = (u >> 10) & 0x1F, m = u & 0x3FF;
    if (e == 0) return sign * (double)m * ldexp(1.0, -24);
    if (e == 31) return m == 0 ? sign * INFINITY : NAN;
    return sign * (double)(1024 + m) * ldexp(1.0, (int)e - 25);
}

/* ------------------------------------------------------------------ PVQ decode */

static inline int64_t read_code(const LayerArgs *a, int64_t bitpos, uint64_t mask) {
    int64_t w = bitpos >> 6;
    unsigned s = (unsigned)(bitpos & 63);
    uint64_t v;
    if (w + 1 < a->n_words) {
        v = (a->words[w] >> s) | ((a->words[w + 1] << 1) << (63 - s));
    } else {  /* the stream's last bytes: at most 8 bytes hold a code of <= 56 bits at any shift */
        int64_t byte = bitpos >> 3;
        v = 0;
        for (int i = 0; i < 8; i++)
            if (byte + i < a->n_stream) v |= (uint64_t)a->stream[byte + i] << (8 * i);
        v >>= (bitpos & 7);
    }
    return (int64_t)(v & mask);
}

static inline void split_node(const LayerArgs *a, int64_t lvl, int64_t c, int64_t k, int64_t *kl_out, int64_t *q_out,
                              int64_t *r_out) {
    const int64_t S = a->K + 2;
    const int64_t *o = a->offs + lvl * (a->K + 1) * S + k * S;
    const int64_t *dv = a->divs + lvl * (a->K + 1) * S + k * S;
    const double *rc = a->recs + lvl * (a->K + 1) * S + k * S;
    int64_t j = (int64_t)((double)c * a->gscale[lvl * (a->K + 1) + k]);
    if (j > 127) j = 127;
    int64_t kl = a->guide[lvl * (a->K + 1) * 128 + k * 128 + j];
    kl += (c >= o[kl + 1]);
    while (c >= o[kl + 1]) kl++;
    while (c < o[kl]) kl--;
    c -= o[kl];
    int64_t d = dv[kl];
    int64_t q = (int64_t)((double)c * rc[kl]);
    int64_t r = c - q * d;
    /* the float quotient is within 1 of the true one: one correction each way, with masks
     * (a compiler turns conditionals here into branches, mispredicted on real codes) */
    int under = r < 0;
    r = under ? r + d : r;
    q = under ? q - 1 : q;
    int over = r >= d;
    r = over ? r - d : r;
    q = over ? q + 1 : q;
    *kl_out = kl;
    *q_out = q;
    *r_out = r;
}

typedef struct {
    int64_t *ka, *ca, *kb, *cb;
    uint32_t *pts32;
    uint32_t *ss;
    double *gains;
    float *scale;
} Scratch;

/* One buffer per thread, grown as needed and kept: no malloc per call (which left each
 * worker thread's malloc arena holding freed pages). */
static __thread char *tls_buf = NULL;
static __thread size_t tls_cap = 0;

static void *thread_buffer(size_t bytes) {
    if (bytes > tls_cap) {
        char *p = realloc(tls_buf, bytes);
        if (!p) return NULL;
        tls_buf = p;
        tls_cap = bytes;
    }
    return tls_buf;
}

static int scratch_alloc(Scratch *s, int64_t G, int64_t D) {
    size_t n = (size_t)(G * D / 4 + 8);
    size_t bytes = 4 * n * sizeof(int64_t) + n * sizeof(uint32_t) + 64 + (size_t)(G + 8) * (4 + 8 + 4);
    char *p = thread_buffer(bytes);
    if (!p) return 0;
    s->ka = (int64_t *)p; p += n * sizeof(int64_t);
    s->ca = (int64_t *)p; p += n * sizeof(int64_t);
    s->kb = (int64_t *)p; p += n * sizeof(int64_t);
    s->cb = (int64_t *)p; p += n * sizeof(int64_t);
    s->gains = (double *)p; p += (size_t)(G + 8) * sizeof(double);
    s->pts32 = (uint32_t *)p; p += n * sizeof(uint32_t) + 64;
    s->ss = (uint32_t *)p; p += (size_t)(G + 8) * sizeof(uint32_t);
    s->scale = (float *)p;
    return 1;
}

/* The points of row r into s->pts32 and each group's squared norm into s->ss; returns the
 * first group whose code is out of range, or -1. */
static int64_t row_points(const LayerArgs *a, int64_t r, Scratch *s) {
    const int64_t G = a->G, K = a->K;
    const uint64_t mask = a->nbits >= 64 ? ~(uint64_t)0 : (((uint64_t)1 << a->nbits) - 1);
    const int64_t base = r * G * a->nbits;
    int64_t *ka = s->ka, *ca = s->ca, *kb = s->kb, *cb = s->cb;
    for (int64_t g = 0; g < G; g++) {
        int64_t c = read_code(a, base + g * a->nbits, mask);
        if (c >= a->total) return g;
        ka[g] = K;
        ca[g] = c;
    }
    int64_t n = G;
    for (int64_t lvl = 0; lvl < a->levels; lvl++) {
        for (int64_t h = 0; h < n; h++) {
            int64_t kl, cl, cr;
            split_node(a, lvl, ca[h], ka[h], &kl, &cl, &cr);
            kb[2 * h] = kl;
            cb[2 * h] = cl;
            kb[2 * h + 1] = ka[h] - kl;
            cb[2 * h + 1] = cr;
        }
        n *= 2;
        int64_t *t = ka; ka = kb; kb = t;
        t = ca; ca = cb; cb = t;
    }
    const int64_t per = a->D / 4;
    for (int64_t g = 0; g < G; g++) {
        uint32_t ss = 0;
        for (int64_t j = 0; j < per; j++) {
            int64_t h = g * per + j;
            uint64_t leaf = a->leaf64[a->lbase[ka[h]] + ca[h]];
            s->pts32[h] = (uint32_t)leaf;
            ss += (uint32_t)(leaf >> 32);
        }
        s->ss[g] = ss;
    }
    return -1;
}

static void row_gains(const LayerArgs *a, int64_t r, double *gains) {
    const int64_t G = a->G;
    if (a->gain_mode == 0) {
        for (int64_t g = 0; g < G; g++) gains[g] = half_to_double(a->gains16[r * G + g]);
    } else {
        const double scale = a->row_scale[r];
        const int64_t gb = a->gbits, m = ((int64_t)1 << gb) - 1;
        for (int64_t g = 0; g < G; g++) {
            int64_t bp = (r * G + g) * gb, byte = bp >> 3;
            int64_t v = a->gidx[byte];
            if ((bp & 7) + gb > 8) v |= (int64_t)a->gidx[byte + 1] << 8;
            if ((bp & 7) + gb > 16) v |= (int64_t)a->gidx[byte + 2] << 16;  /* up to 16-bit indices */
            gains[g] = a->codebook[(v >> (bp & 7)) & m] * scale;
        }
    }
    for (int64_t k = 0; k < a->n_esc; k++) {
        int64_t pos = a->esc_pos[r * a->n_esc + k];
        if (pos >= 0 && pos < G) gains[pos] = a->esc_gain[r * a->n_esc + k];
    }
}

/* sum over groups of scale[g] * <p_g, x_g>: the portable version */
static float dot_groups_c(const int8_t *p, const float *scale, const float *x, int64_t G, int64_t D) {
    float acc = 0.0f;
    for (int64_t g = 0; g < G; g++) {
        float d = 0.0f;
        for (int64_t i = 0; i < D; i++) d += (float)p[g * D + i] * x[g * D + i];
        acc += scale[g] * d;
    }
    return acc;
}

#if PVQ_X86
__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

/* D a multiple of 8: 8 weights at a time, the group's scale folded into one FMA per 8 */
__attribute__((target("avx2,fma"))) static float dot_groups_avx2(const int8_t *p, const float *scale, const float *x,
                                                                  int64_t G, int64_t D) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
           acc3 = _mm256_setzero_ps();
    int64_t g = 0;
    if (D == 16) {  /* two groups an iteration, four independent sums */
        for (; g + 2 <= G; g += 2) {
            const int8_t *pg = p + g * 16;
            const float *xg = x + g * 16;
            __m256 s0 = _mm256_broadcast_ss(scale + g), s1 = _mm256_broadcast_ss(scale + g + 1);
            __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)pg)));
            __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(pg + 8))));
            __m256 f2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(pg + 16))));
            __m256 f3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(pg + 24))));
            acc0 = _mm256_fmadd_ps(s0, _mm256_mul_ps(f0, _mm256_loadu_ps(xg)), acc0);
            acc1 = _mm256_fmadd_ps(s0, _mm256_mul_ps(f1, _mm256_loadu_ps(xg + 8)), acc1);
            acc2 = _mm256_fmadd_ps(s1, _mm256_mul_ps(f2, _mm256_loadu_ps(xg + 16)), acc2);
            acc3 = _mm256_fmadd_ps(s1, _mm256_mul_ps(f3, _mm256_loadu_ps(xg + 24)), acc3);
        }
    }
    for (; g < G; g++) {
        __m256 s = _mm256_broadcast_ss(scale + g);
        const int8_t *pg = p + g * D;
        const float *xg = x + g * D;
        int64_t i = 0;
        for (; i + 16 <= D; i += 16) {
            __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(pg + i))));
            __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(pg + i + 8))));
            acc0 = _mm256_fmadd_ps(s, _mm256_mul_ps(f0, _mm256_loadu_ps(xg + i)), acc0);
            acc1 = _mm256_fmadd_ps(s, _mm256_mul_ps(f1, _mm256_loadu_ps(xg + i + 8)), acc1);
        }
        for (; i < D; i += 8) {
            __m128i b = _mm_loadl_epi64((const __m128i *)(pg + i));
            __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
            acc0 = _mm256_fmadd_ps(_mm256_mul_ps(s, f0), _mm256_loadu_ps(xg + i), acc0);
        }
    }
    return hsum256(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
}
#endif

static inline float dot_groups(const int8_t *p, const float *scale, const float *x, int64_t G, int64_t D) {
#if PVQ_X86
    if (have_avx2 && D % 8 == 0) return dot_groups_avx2(p, scale, x, G, D);
#endif
    return dot_groups_c(p, scale, x, G, D);
}

/* row r from its int8 points p and group scales sc: the GEMV (mode 0) or the weight row */
static void points_row(const LayerArgs *a, const CallArgs *c, int64_t r, const int8_t *p, const float *sc, int mode) {
    const int64_t G = a->G, D = a->D, C = G * D;
    if (mode == 0) {
        for (int64_t b = 0; b < c->B; b++) c->out[b * c->R + r] = dot_groups(p, sc, c->x + b * C, G, D);
    } else {
        float *w = c->weight + (r - c->row0) * C;
        for (int64_t g = 0; g < G; g++)
            for (int64_t i = 0; i < D; i++) w[g * D + i] = (float)p[g * D + i] * sc[g];
    }
}

/* mode 0: GEMV, 1: decode weight rows, 2: transcode to int8 points + scales */
static int64_t pvq_rows(const LayerArgs *a, const CallArgs *c, int64_t lo, int64_t hi, int mode) {
    const int64_t G = a->G, D = a->D, C = G * D;
    Scratch s;
    if (!scratch_alloc(&s, G, D)) return -2;
    int64_t bad = -1;
    for (int64_t r = lo; r < hi && bad < 0; r++) {
        int64_t g_bad = row_points(a, r, &s);
        if (g_bad >= 0) { bad = r * G + g_bad; break; }
        row_gains(a, r, s.gains);
        for (int64_t g = 0; g < G; g++) s.scale[g] = (float)(s.gains[g] * a->inv_norm[s.ss[g]]);
        const int8_t *p = (const int8_t *)s.pts32;
        if (mode != 2) {
            points_row(a, c, r, p, s.scale, mode);
        } else {
            memcpy(c->points_out + r * C, p, (size_t)C);
            memcpy(c->scales_out + r * G, s.scale, (size_t)G * sizeof(float));
        }
    }
    return bad;
}

/* ------------------------------------------------------------------ int8 layout */

static int64_t int8_rows(const LayerArgs *a, const CallArgs *c, int64_t lo, int64_t hi, int mode) {
    const int64_t G = a->G, C = G * a->D;
    for (int64_t r = lo; r < hi; r++) points_row(a, c, r, a->points + r * C, a->scales + r * G, mode);
    return -1;
}

/* ------------------------------------------------------------------ int4 layout */

/* row r's points as int8 into p (C values): nibbles less 8, escapes added back */
static void int4_row_points(const LayerArgs *a, int64_t r, int8_t *p) {
    const int64_t C = a->G * a->D;
    const uint8_t *q = a->nibbles + r * (C / 2);
    for (int64_t j = 0; j < C / 2; j++) {  /* the compiler vectorises this loop */
        int v = q[j];
        p[2 * j] = (int8_t)((v & 15) - 8);
        p[2 * j + 1] = (int8_t)((v >> 4) - 8);
    }
    for (int64_t e = a->x_ptr[r]; e < a->x_ptr[r + 1]; e++) p[a->x_col[e]] = (int8_t)(p[a->x_col[e]] + a->x_delta[e]);
}

static int64_t int4_rows(const LayerArgs *a, const CallArgs *c, int64_t lo, int64_t hi, int mode) {
    const int64_t G = a->G, C = G * a->D;
    int8_t *p = thread_buffer((size_t)C + 64);
    if (!p) return -2;
    for (int64_t r = lo; r < hi; r++) {
        int4_row_points(a, r, p);
        points_row(a, c, r, p, a->scales + r * G, mode);
    }
    return -1;
}

/* ------------------------------------------------------------------ 4/8-bit grids */

/* the integers (code - zero) of row r as float32 into f (C values) */
static void grid_row_values(const LayerArgs *a, int64_t r, float *f) {
    const int64_t C = a->C, gs = a->gs, G = C / gs;
    if (a->bits == 8) {
        const uint8_t *q = a->codes + r * C;
        for (int64_t g = 0; g < G; g++) {
            const int32_t z = a->zeros[r * G + g];
            for (int64_t j = 0; j < gs; j++) f[g * gs + j] = (float)((int32_t)q[g * gs + j] - z);
        }
    } else {
        const uint8_t *q = a->codes + ((r * C) >> 1);
        for (int64_t g = 0; g < G; g++) {
            const int32_t z = a->zeros[r * G + g];
            for (int64_t j = 0; j < gs / 2; j++) {
                int32_t byte = q[(g * gs) / 2 + j];
                f[g * gs + 2 * j] = (float)((byte & 15) - z);
                f[g * gs + 2 * j + 1] = (float)((byte >> 4) - z);
            }
        }
    }
}

static float grid_dot_c(const float *f, const float *sc, const float *x, int64_t G, int64_t gs) {
    float acc = 0.0f;
    for (int64_t g = 0; g < G; g++) {
        float d = 0.0f;
        for (int64_t j = 0; j < gs; j++) d += f[g * gs + j] * x[g * gs + j];
        acc += sc[g] * d;
    }
    return acc;
}

#if PVQ_X86
__attribute__((target("avx2,fma"))) static float grid_dot_avx2(const float *f, const float *sc, const float *x, int64_t G,
                                                                int64_t gs) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
        const float *fg = f + g * gs, *xg = x + g * gs;
        int64_t j = 0;
        for (; j + 16 <= gs; j += 16) {
            d0 = _mm256_fmadd_ps(_mm256_loadu_ps(fg + j), _mm256_loadu_ps(xg + j), d0);
            d1 = _mm256_fmadd_ps(_mm256_loadu_ps(fg + j + 8), _mm256_loadu_ps(xg + j + 8), d1);
        }
        for (; j < gs; j += 8) d0 = _mm256_fmadd_ps(_mm256_loadu_ps(fg + j), _mm256_loadu_ps(xg + j), d0);
        acc = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + g), _mm256_add_ps(d0, d1), acc);
    }
    return hsum256(acc);
}
#endif

static int64_t grid_rows(const LayerArgs *a, const CallArgs *c, int64_t lo, int64_t hi, int mode) {
    const int64_t C = a->C, gs = a->gs, G = C / gs;
    float *f = thread_buffer((size_t)C * sizeof(float) + 64);
    if (!f) return -2;
    for (int64_t r = lo; r < hi; r++) {
        grid_row_values(a, r, f);
        const float *sc = a->gscales + r * G;
        if (mode == 0) {
            for (int64_t b = 0; b < c->B; b++) {
#if PVQ_X86
                if (have_avx2 && gs % 8 == 0) { c->out[b * c->R + r] = grid_dot_avx2(f, sc, c->x + b * C, G, gs); continue; }
#endif
                c->out[b * c->R + r] = grid_dot_c(f, sc, c->x + b * C, G, gs);
            }
        } else {
            float *w = c->weight + (r - c->row0) * C;
            for (int64_t g = 0; g < G; g++)
                for (int64_t j = 0; j < gs; j++) w[g * gs + j] = f[g * gs + j] * sc[g];
        }
    }
    return -1;
}

/* ------------------------------------------------------------------ the thread pool */

typedef int64_t (*RowKernel)(const LayerArgs *, const CallArgs *, int64_t, int64_t, int);

typedef struct {
    RowKernel kernel;
    const LayerArgs *a;
    const CallArgs *c;
    int mode;
    long spins;  /* how long the workers spin for the next task before they sleep */
    int64_t bounds[65];
    int64_t results[64];
} Task;

#define MAX_THREADS 64
#ifndef PVQ_SPINS
/* ~2-3 ms of spinning before a worker sleeps: a layer's next call comes well within it
 * during a decode step (waking a sleeping thread costs 50-100 us in a VM, more than a small
 * layer's whole GEMV); only when torch's own ops run on one thread (`runtime_threads` in a
 * decode step), so the spinning uses a core that would idle */
#define PVQ_SPINS 100000
#endif
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;   /* one pvq_run at a time */
static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake_cond = PTHREAD_COND_INITIALIZER;
static int n_workers = 0;
static Task task;
static atomic_long generation = 0;
static atomic_int pending = 0;
static atomic_int sleepers = 0;

static long start_gen[MAX_THREADS + 1];  /* the generation current when each worker was made */

static void *worker_main(void *arg) {
    const int id = (int)(intptr_t)arg;  /* 1..n_workers */
    long seen = start_gen[id];  /* a worker made during a call waits for the next bump, never runs a half-written task */
    long spin_limit = 0;
    for (;;) {
        long gen;
        long spins = 0;
        while ((gen = atomic_load(&generation)) == seen) {  /* seq_cst: pairs with sleepers (no lost wake-up) */
            if (++spins < spin_limit) {
#if PVQ_X86
                _mm_pause();
#endif
                continue;
            }
            pthread_mutex_lock(&wake_lock);
            atomic_fetch_add(&sleepers, 1);
            while (atomic_load(&generation) == seen) pthread_cond_wait(&wake_cond, &wake_lock);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&wake_lock);
            spins = 0;
        }
        seen = gen;
        spin_limit = task.spins;
        if (task.bounds[id] < task.bounds[id + 1])
            task.results[id] = task.kernel(task.a, task.c, task.bounds[id], task.bounds[id + 1], task.mode);
        else
            task.results[id] = -1;
        atomic_fetch_sub_explicit(&pending, 1, memory_order_acq_rel);
    }
    return NULL;
}

/* a forked child has none of the parent's threads: start the pool afresh there */
static void pool_after_fork_child(void) {
    n_workers = 0;
    atomic_store(&pending, 0);
    atomic_store(&sleepers, 0);
    pthread_mutex_init(&pool_lock, NULL);
    pthread_mutex_init(&wake_lock, NULL);
    pthread_cond_init(&wake_cond, NULL);
}

static int ensure_workers(int want) {
    static int atfork_done = 0;
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, pool_after_fork_child);
        atfork_done = 1;
    }
    while (n_workers < want) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        start_gen[n_workers + 1] = atomic_load(&generation);  /* ordered before the thread by pthread_create */
        int rc = pthread_create(&t, &attr, worker_main, (void *)(intptr_t)(n_workers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) return n_workers;
        n_workers++;
    }
    return n_workers;
}

static int64_t run_rows(RowKernel kernel, const LayerArgs *a, const CallArgs *c, int64_t lo, int64_t hi, int mode,
                        int threads, long spins) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads <= 1 || hi - lo < 2 * threads) return kernel(a, c, lo, hi, mode);
    pthread_mutex_lock(&pool_lock);
    int workers = ensure_workers(threads - 1);
    int parts = workers + 1 < threads ? workers + 1 : threads;
    task.kernel = kernel;
    task.a = a;
    task.c = c;
    task.mode = mode;
    task.spins = spins;
    for (int i = 0; i <= MAX_THREADS; i++) task.bounds[i] = hi;
    for (int i = 0; i <= parts; i++) task.bounds[i] = lo + (hi - lo) * i / parts;
    atomic_store(&pending, n_workers);
    atomic_fetch_add(&generation, 1);  /* seq_cst, then the sleepers check below */
    if (atomic_load(&sleepers) > 0) {
        pthread_mutex_lock(&wake_lock);
        pthread_cond_broadcast(&wake_cond);
        pthread_mutex_unlock(&wake_lock);
    }
    int64_t bad = kernel(a, c, task.bounds[0], task.bounds[1], mode);
    while (atomic_load_explicit(&pending, memory_order_acquire) > 0) {
#if PVQ_X86
        _mm_pause();
#endif
    }
    for (int i = 1; i < parts; i++) {
        int64_t res = task.results[i];
        if (res == -2 || bad == -2) bad = -2;  /* out of memory wins */
        else if (res >= 0 && (bad < 0 || res < bad)) bad = res;  /* else the first bad code */
    }
    pthread_mutex_unlock(&pool_lock);
    return bad;
}

/* ------------------------------------------------------------------ entry points (ctypes) */

/* kind 0: PVQ as stored, 1: int8 layout, 2: grid, 3: int4 layout. mode 0 GEMV, 1 decode, 2 transcode (PVQ).
 * spin: whether the workers then spin for the next call (~2-3 ms; when torch's own ops run
 * on one thread, as in a decode step) or sleep almost at once (torch's threads need the cores).
 * Returns -1, the flat index r*G + g of the first code out of range, or -2 (out of memory). */
int64_t pvq_run(int kind, const LayerArgs *a, const CallArgs *c, int64_t lo, int64_t hi, int mode, int threads,
                int spin) {
    RowKernel k = kind == 0 ? pvq_rows : kind == 1 ? int8_rows : kind == 2 ? grid_rows : int4_rows;
    return run_rows(k, a, c, lo, hi, mode, threads, spin ? PVQ_SPINS : 200);
}

int pvq_has_avx2(void) { return have_avx2; }

/* bumped with every change of an entry point or a struct: a stale build is not used */
#define PVQ_KERNELS_ABI 4
int pvq_abi(void) { return PVQ_KERNELS_ABI; }

int64_t pvq_layer_args_size(void) { return (int64_t)sizeof(LayerArgs); }

int64_t pvq_call_args_size(void) { return (int64_t)sizeof(CallArgs); }

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pvqkernels",
                                    "pvq's C kernels (called through ctypes: pvq.runtime.c_kernels)", -1, NULL,
                                    NULL, NULL, NULL, NULL};

void pvq_init(void) {
#if PVQ_X86
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
}

PyMODINIT_FUNC PyInit__pvqkernels(void) {
    pvq_init();
    return PyModule_Create(&module);
}
