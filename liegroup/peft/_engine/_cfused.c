/*
 * Compiled CPU kernel of LieRA's low-rank adapted weight and its factor gradients (float32).
 *
 *   form:  W' = W ⊙ exp(L R)   (mode 0)      or   W ⊙ (L R + 1)   (mode 1, first order)
 *   grads: G_Δ = G ⊙ M         (mode 0)      or   G ⊙ M ⊙ exp(L R) (mode 1)   or   G (mode 2)
 *          ∂L/∂L = G_Δ Rᵀ,  ∂L/∂R = Lᵀ G_Δ
 *
 * with W, M, G, W' (rows, cols), L (rows, r), R (r, cols), all C-contiguous float32. The eager
 * torch chain (a rank-r GEMM into a buffer, exp_, mul_; mul_, then two GEMMs for the factor
 * gradients) passes over weight-sized memory four to six times; here each weight entry is
 * read once and written at most once: the rank-r sum, the exponential and the products are
 * formed in registers, and G_Δ is never stored whole (ranks above 8: one row pair's column
 * panel at a time, in an L1-sized buffer that every group of 8 ranks reads).
 *
 * Per entry, the rank-r sum runs k = 0..r-1 (fused multiply-adds where the instruction set
 * has them), and exp is a vectorised Cody–Waite reduction x = n ln 2 + t with the degree-6
 * minimax polynomial of Cephes' expf (< 1 ulp measured over the whole float32 range, subnormal
 * results included), then the scaling by 2^n (AVX-512: vscalefps; otherwise two power-of-two
 * factors, so that no intermediate overflows early): overflow gives inf, underflow 0 or a
 * subnormal within 1 ulp (the polynomial's rounding and the scaling's can both apply there),
 * NaN stays NaN. Every entry of W' is computed by the same operations
 * whatever the tiling, thread count or vector width (per instruction set); the gradient
 * reductions are deterministic for a given instruction set and thread count.
 *
 * Rows are split over up to `threads` POSIX threads (the caller passes torch's intra-op thread
 * count); the GIL is released. On x86-64 with gcc/clang the body is compiled for the baseline,
 * AVX2+FMA and AVX-512 and chosen at load time (`isa()`), as liegroup/linalg/_cexpm.c does.
 *
 * The file includes itself once per instruction set: the part after the #else is the body.
 */
#ifndef CF_BODY

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(_WIN32)
#include <pthread.h>
#define CF_THREADS 1
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define CF_X86_ISA 1
#include <immintrin.h>
#endif

#define CF_RESTRICT __restrict__
#define CF_FI static inline __attribute__((always_inline)) CF_TGT
#define CF_FN static CF_TGT

/* Columns per panel of the gradient kernel: the panels of R and ∂L/∂R (CF_KG x CF_PANEL
 * floats, 64 KiB each) stay in L2 while every row of the panel goes by. Measured on the 53
 * weights of a ResNet-50 (rank 8, AVX-512, 2 MiB L2): with 512 columns (L1-sized panels) the
 * many short row segments ran slower than the prefetcher-friendly long ones (below). */
#define CF_PANEL 2048
/* Most ranks per pass of the gradient kernel (its accumulators live in registers); each
 * body takes KG <= CF_KG of them, by its register count. */
#define CF_KG 8
/* Largest rank taken (larger: the caller's torch path). */
#define CF_RMAX 256
/* Work per thread, in entries x (rank + 8): a thread is started only for this much, so that
 * starting it costs a small part of its share. */
#define CF_MT_WORK (1 << 23)

typedef struct {
    int mode, rows, cols, r;
    const float *W, *M, *G, *L, *R;
    float *out, *gL, *gR;
    int row0, row1;
} cf_job;

#define CF_BODY
#define CF_TGT
#define CF_VB 16
#define CF_S(name) name##_base
#include "_cfused.c"
#undef CF_S
#undef CF_VB
#undef CF_TGT
#ifdef CF_X86_ISA
#define CF_TGT __attribute__((target("avx2,fma")))
#define CF_VB 32
#define CF_S(name) name##_avx2
#include "_cfused.c"
#undef CF_S
#undef CF_VB
#undef CF_TGT
#define CF_TGT __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma")))
#define CF_VB 64
#define CF_S(name) name##_avx512
#include "_cfused.c"
#undef CF_S
#undef CF_VB
#undef CF_TGT
#endif
#undef CF_BODY

typedef void (*cf_fn)(cf_job *);
typedef struct {
    cf_fn form, grads;
    const char *name;
} cf_bodies;

static const cf_bodies CF_BASE = {form_rows_base, grads_rows_base, "baseline"};
#ifdef CF_X86_ISA
static const cf_bodies CF_AVX2 = {form_rows_avx2, grads_rows_avx2, "avx2"};
static const cf_bodies CF_AVX512 = {form_rows_avx512, grads_rows_avx512, "avx512"};
#endif
static const cf_bodies *cf_use = &CF_BASE;

static int cf_select(const char *name) {
    int want_auto = strcmp(name, "auto") == 0;
#ifdef CF_X86_ISA
    __builtin_cpu_init();
    int has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    int has512 = has2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                 __builtin_cpu_supports("avx512dq");
    if ((want_auto || strcmp(name, "avx512") == 0) && has512) {
        cf_use = &CF_AVX512;
        return 1;
    }
    if ((want_auto || strcmp(name, "avx2") == 0) && has2) {
        cf_use = &CF_AVX2;
        return 1;
    }
#endif
    if (want_auto || strcmp(name, "baseline") == 0) {
        cf_use = &CF_BASE;
        return 1;
    }
    return 0;
}

#ifdef CF_THREADS
static void *cf_thread_form(void *p) {
    cf_use->form((cf_job *)p);
    return NULL;
}
static void *cf_thread_grads(void *p) {
    cf_use->grads((cf_job *)p);
    return NULL;
}
#endif

/* Run `job` over its rows in `nt` parts (part 0 on this thread). Each part of a gradient job
 * accumulates ∂L/∂R into its own buffer (part 0 into gR), summed here in part order. Returns
 * 0, or -1 when memory ran out. */
static int cf_run(cf_job *job, int grads, int nt) {
    if (nt < 1) nt = 1;
    if (nt > job->rows / 2) nt = job->rows / 2 > 0 ? job->rows / 2 : 1;
    if ((double)job->rows * job->cols * (job->r + 8) < (double)CF_MT_WORK * nt) {
        int want = (int)((double)job->rows * job->cols * (job->r + 8) / CF_MT_WORK);
        nt = want < 1 ? 1 : (want < nt ? want : nt);
    }
#ifndef CF_THREADS
    nt = 1;
#endif
    cf_job parts[64];
    if (nt > 64) nt = 64;
    size_t gr_n = (size_t)job->r * job->cols;
    float *gr_extra = NULL;
    if (grads && nt > 1) {
        gr_extra = (float *)malloc(sizeof(float) * gr_n * (nt - 1));
        if (!gr_extra) return -1;
    }
    for (int t = 0; t < nt; t++) {
        parts[t] = *job;
        parts[t].row0 = (int)((long long)job->rows * t / nt);
        parts[t].row1 = (int)((long long)job->rows * (t + 1) / nt);
        if (grads) parts[t].gR = t == 0 ? job->gR : gr_extra + gr_n * (t - 1);
    }
#ifdef CF_THREADS
    pthread_t tid[64];
    int started[64] = {0};
    for (int t = 1; t < nt; t++)
        started[t] = pthread_create(&tid[t], NULL, grads ? cf_thread_grads : cf_thread_form,
                                    &parts[t]) == 0;
    for (int t = 1; t < nt; t++)
        if (!started[t]) (grads ? cf_use->grads : cf_use->form)(&parts[t]);
#endif
    (grads ? cf_use->grads : cf_use->form)(&parts[0]);
#ifdef CF_THREADS
    for (int t = 1; t < nt; t++)
        if (started[t]) pthread_join(tid[t], NULL);
#endif
    if (grads && nt > 1) {
        for (int t = 1; t < nt; t++) {
            const float *src = gr_extra + gr_n * (t - 1);
            for (size_t i = 0; i < gr_n; i++) job->gR[i] += src[i];
        }
    }
    free(gr_extra);
    return 0;
}

static int cf_ptr(PyObject *o, void **out) {
    *out = PyLong_AsVoidPtr(o);
    return !(*out == NULL && PyErr_Occurred());
}

/* Run a checked job with the GIL released; None, or MemoryError if a thread could not start. */
static PyObject *cf_launch(cf_job *job, int grads, int nt) {
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = cf_run(job, grads, nt);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *cf_py_form(PyObject *self, PyObject *args) {
    PyObject *pw, *pl, *pr, *po;
    int mode, rows, cols, r, nt;
    void *w, *l, *rr, *o;
    (void)self;
    if (!PyArg_ParseTuple(args, "iiiiOOOOi", &mode, &rows, &cols, &r, &pw, &pl, &pr, &po, &nt))
        return NULL;
    if (!cf_ptr(pw, &w) || !cf_ptr(pl, &l) || !cf_ptr(pr, &rr) || !cf_ptr(po, &o)) return NULL;
    if ((mode != 0 && mode != 1) || rows < 1 || cols < 1 || r < 1 || r > CF_RMAX || !w || !l ||
        !rr || !o) {
        PyErr_SetString(PyExc_ValueError, "_cfused.form: bad arguments");
        return NULL;
    }
    cf_job job = {.mode = mode, .rows = rows, .cols = cols, .r = r, .W = (const float *)w,
                  .L = (const float *)l, .R = (const float *)rr, .out = (float *)o,
                  .row0 = 0, .row1 = rows};
    return cf_launch(&job, 0, nt);
}

static PyObject *cf_py_grads(PyObject *self, PyObject *args) {
    PyObject *pg, *pm, *pl, *pr, *pgl, *pgr;
    int mode, rows, cols, r, nt;
    void *g, *m, *l, *rr, *gl, *gr;
    (void)self;
    if (!PyArg_ParseTuple(args, "iiiiOOOOOOi", &mode, &rows, &cols, &r, &pg, &pm, &pl, &pr, &pgl,
                          &pgr, &nt))
        return NULL;
    if (!cf_ptr(pg, &g) || !cf_ptr(pm, &m) || !cf_ptr(pl, &l) || !cf_ptr(pr, &rr) ||
        !cf_ptr(pgl, &gl) || !cf_ptr(pgr, &gr))
        return NULL;
    if (mode < 0 || mode > 2 || rows < 1 || cols < 1 || r < 1 || r > CF_RMAX || !g ||
        (mode != 2 && !m) || !l || !rr || !gl || !gr) {
        PyErr_SetString(PyExc_ValueError, "_cfused.grads: bad arguments");
        return NULL;
    }
    cf_job job = {.mode = mode, .rows = rows, .cols = cols, .r = r, .M = (const float *)m,
                  .G = (const float *)g, .L = (const float *)l, .R = (const float *)rr,
                  .gL = (float *)gl, .gR = (float *)gr, .row0 = 0, .row1 = rows};
    return cf_launch(&job, 1, nt);
}

static PyObject *cf_py_isa(PyObject *self, PyObject *args) {
    const char *name = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "|s", &name)) return NULL;
    if (name && !cf_select(name)) {
        PyErr_Format(PyExc_ValueError,
                     "_cfused.isa: %s is not available here (baseline, avx2, avx512 or auto)", name);
        return NULL;
    }
    return PyUnicode_FromString(cf_use->name);
}

static PyMethodDef cf_methods[] = {
    {"form", cf_py_form, METH_VARARGS,
     "form(mode, rows, cols, r, w_ptr, l_ptr, r_ptr, out_ptr, threads): out = W * exp(L R) "
     "(mode 0) or W * (L R + 1) (mode 1); C-contiguous float32."},
    {"grads", cf_py_grads, METH_VARARGS,
     "grads(mode, rows, cols, r, g_ptr, m_ptr, l_ptr, r_ptr, gl_ptr, gr_ptr, threads): with "
     "D = G * M (mode 0), G * M * exp(L R) (mode 1) or G (mode 2; m_ptr unused), gl = D R^T "
     "(rows, r) and gr = L^T D (r, cols); C-contiguous float32, outputs overwritten."},
    {"isa", cf_py_isa, METH_VARARGS,
     "isa([name]) -> the instruction set in use ('baseline', 'avx2', 'avx512'); with name "
     "('auto', 'baseline', 'avx2', 'avx512') switch first (ValueError if this CPU lacks it)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef cf_module = {
    PyModuleDef_HEAD_INIT, "_cfused",
    "Compiled CPU kernel of LieRA's low-rank adapted weight W * exp(L R) and its factor "
    "gradients (float32).",
    -1, cf_methods,
};

PyMODINIT_FUNC PyInit__cfused(void) {
    PyObject *m = PyModule_Create(&cf_module);
    if (m == NULL) return NULL;
    cf_select("auto");
    if (PyModule_AddIntConstant(m, "R_MAX", CF_RMAX) < 0 ||
        PyModule_AddIntConstant(m, "MT_WORK", CF_MT_WORK) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

#else /* ================================================================ body */

#define VW (CF_VB / 4)
/* Ranks per group of the gradient kernel in this body: with 16 vector registers (baseline,
 * AVX2) a row pair's 2 x 8 accumulators and 8 vectors of R would spill, so 4. */
#define KG (CF_VB >= 64 ? CF_KG : CF_KG / 2)
typedef float CF_S(vf) __attribute__((vector_size(CF_VB)));
typedef int32_t CF_S(vi) __attribute__((vector_size(CF_VB)));
#define vf CF_S(vf)
#define vi CF_S(vi)

CF_FI vf CF_S(ld)(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}
CF_FI void CF_S(st)(float *p, vf v) { memcpy(p, &v, sizeof v); }
CF_FI vf CF_S(splat)(float s) { return (vf){0} + s; }
CF_FI vf CF_S(sel)(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

/* Whether every lane of the comparison mask m is set. */
CF_FI int CF_S(all)(vi m) {
#if CF_VB == 32 && defined(CF_X86_ISA)
    return _mm256_movemask_ps((__m256)m) == 0xFF;
#elif CF_VB == 64 && defined(CF_X86_ISA)
    return _mm512_movepi32_mask((__m512i)m) == 0xFFFF;
#else
    uint64_t b[CF_VB / 8], a = ~(uint64_t)0;
    memcpy(b, &m, sizeof b);
    for (int q = 0; q < CF_VB / 8; q++) a &= b[q];
    return a == ~(uint64_t)0;
#endif
}

/* n = round(x / ln2) (round to nearest even by the 1.5 * 2^23 shift). */
CF_FI vf CF_S(vexp_n)(vf x) {
    vf nf = x * 1.44269504088896341f + 12582912.0f;
    return nf - 12582912.0f;
}

/* exp(t) for the reduced argument t = x - n ln2 (n = nf), by Cephes' expf polynomial. */
CF_FI vf CF_S(vexp_poly)(vf x, vf nf) {
    vf t = x - nf * 0.693359375f;
    t = t - nf * -2.12194440e-4f;
    vf p = 1.9875691500e-4f * t + 1.3981999507e-3f;
    p = p * t + 8.3334519073e-3f;
    p = p * t + 4.1665795894e-2f;
    p = p * t + 1.6666665459e-1f;
    p = p * t + 5.0000001201e-1f;
    return p * (t * t) + t + 1.0f;
}

/* Whether every lane of x[0..nv) lies in [-87, 88] (NaN fails the test). */
CF_FI int CF_S(in_short_range)(const vf *x, const int nv) {
    vi m = (x[0] >= -87.0f) & (x[0] <= 88.0f);
    for (int v = 1; v < nv; v++) m &= (x[v] >= -87.0f) & (x[v] <= 88.0f);
    return CF_S(all)(m);
}

/* exp of x[0..nv) in place, every lane in [-87, 88]: n in [-126, 127], so 2^n is one normal
 * factor and y 2^n is exact. Each step runs over all nv vectors before the next, so that
 * their independent chains interleave; an entry sees the same operations whatever nv is. */
CF_FI void CF_S(vexp_short)(vf *x, const int nv) {
    vf nf[8]; /* nv <= 8 */
    for (int v = 0; v < nv; v++) nf[v] = CF_S(vexp_n)(x[v]);
    for (int v = 0; v < nv; v++)
        x[v] = CF_S(vexp_poly)(x[v], nf[v]) *
               (vf)((__builtin_convertvector(nf[v], vi) + 127) << 23);
}

/* exp(x), about 1 ulp: x = n ln2 + t, |t| <= ln2/2, exp(t) by Cephes' expf polynomial,
 * 2^n applied as two factors (n in [-150, 129] after clamping, each factor a normal).
 * A vector whose every lane lies in [-87, 88] takes vexp_short, which skips the clamps and
 * the NaN lane: the same bits as the general path, which scales a normal value exactly
 * there. */
CF_FI vf CF_S(vexp)(vf x) {
    if (CF_S(in_short_range)(&x, 1)) {
        CF_S(vexp_short)(&x, 1);
        return x;
    }
    x = CF_S(sel)(x > 89.0f, CF_S(splat)(89.0f), x);
    x = CF_S(sel)(x < -104.0f, CF_S(splat)(-104.0f), x);
    /* NaN: n = 0, no conversion of NaN to int */
    vf nf = CF_S(sel)(x == x, CF_S(vexp_n)(x), CF_S(splat)(0.0f));
    vf y = CF_S(vexp_poly)(x, nf);
#if CF_VB == 64 && defined(CF_X86_ISA)
    return (vf)_mm512_scalef_ps((__m512)y, (__m512)nf); /* y 2^n, one rounding */
#endif
    vi n = __builtin_convertvector(nf, vi);
    vi n1 = n >> 1;
    vi n2 = n - n1;
    vf s1 = (vf)((n1 + 127) << 23);
    vf s2 = (vf)((n2 + 127) << 23);
    return y * s1 * s2;
}

/* s[0..nv) in place: exp(s) (mode 0) or s + 1 (mode 1), the factor that multiplies W; with
 * every lane in the short range, one vexp_short over all nv vectors. */
CF_FI void CF_S(factor)(int mode, vf *s, const int nv) {
    if (mode != 0) {
        for (int v = 0; v < nv; v++) s[v] = s[v] + 1.0f;
    } else if (CF_S(in_short_range)(s, nv)) {
        CF_S(vexp_short)(s, nv);
    } else {
        for (int v = 0; v < nv; v++) s[v] = CF_S(vexp)(s[v]);
    }
}

/* Σ_k L[row, k] R[k, j..j+VW) for two column vectors. */
CF_FI void CF_S(dot2)(const float *CF_RESTRICT l, const float *CF_RESTRICT R, int cols, int r,
                      int j, vf *a0, vf *a1) {
    vf s0 = {0}, s1 = {0};
    for (int k = 0; k < r; k++) {
        const float lk = l[k];
        s0 += lk * CF_S(ld)(R + (size_t)k * cols + j);
        s1 += lk * CF_S(ld)(R + (size_t)k * cols + j + VW);
    }
    *a0 = s0;
    *a1 = s1;
}

CF_FI vf CF_S(dot1)(const float *CF_RESTRICT l, const float *CF_RESTRICT R, int cols, int r,
                    int j) {
    vf s = {0};
    for (int k = 0; k < r; k++) s += l[k] * CF_S(ld)(R + (size_t)k * cols + j);
    return s;
}

/* R[:, j..] for a tail of n < VW columns, zero-padded, into a (r, VW) array. */
CF_FI void CF_S(tail_r)(const float *R, int cols, int r, int j, int n, float *Rt) {
    for (int k = 0; k < r; k++) {
        memset(Rt + (size_t)k * VW, 0, sizeof(float) * VW);
        memcpy(Rt + (size_t)k * VW, R + (size_t)k * cols + j, sizeof(float) * n);
    }
}

CF_FI vf CF_S(ldn)(const float *p, int n) {
    float b[VW] = {0};
    memcpy(b, p, sizeof(float) * n);
    return CF_S(ld)(b);
}

CF_FI vf CF_S(apply)(int mode, vf w, vf s) {
    CF_S(factor)(mode, &s, 1);
    return w * s;
}

/* The four rows i..i+3 of W' over the vector columns [0, jv), pairs of vectors at a time: each
 * vector of R is loaded once for four rows (R is re-read from L2 once per block of rows);
 * each entry's arithmetic is the single-row one of form_rows. Operands come as values:
 * read through jb, every store to out would make the compiler reload them
 * (-fno-strict-aliasing). */
CF_FI void CF_S(form_four)(const int mode, const float *W, const float *l, const float *R,
                           float *out, int cols, int r, int jv, int prefetch) {
    for (int j = 0; j + 2 * VW <= jv; j += 2 * VW) {
        if (prefetch) /* the next four rows (as in grads) */
            for (int q = 4; q < 8; q++) {
                __builtin_prefetch(W + (size_t)q * cols + j, 0, 3);
                __builtin_prefetch(W + (size_t)q * cols + j + VW, 0, 3);
            }
        vf s[8];
        for (int v = 0; v < 8; v++) s[v] = (vf){0};
        for (int k = 0; k < r; k++) {
            const vf b0 = CF_S(ld)(R + (size_t)k * cols + j);
            const vf b1 = CF_S(ld)(R + (size_t)k * cols + j + VW);
            for (int q = 0; q < 4; q++) {
                const float lq = l[(size_t)q * r + k];
                s[2 * q] += lq * b0;
                s[2 * q + 1] += lq * b1;
            }
        }
        CF_S(factor)(mode, s, 8);
        for (int q = 0; q < 4; q++) {
            const size_t o = (size_t)q * cols + j;
            CF_S(st)(out + o, CF_S(ld)(W + o) * s[2 * q]);
            CF_S(st)(out + o + VW, CF_S(ld)(W + o + VW) * s[2 * q + 1]);
        }
    }
    for (int q = 0; q < 4; q++) {
        const float *lq = l + (size_t)q * r;
        const size_t o = (size_t)q * cols;
        for (int j = jv / (2 * VW) * (2 * VW); j < jv; j += VW)
            CF_S(st)(out + o + j,
                     CF_S(apply)(mode, CF_S(ld)(W + o + j), CF_S(dot1)(lq, R, cols, r, j)));
    }
}

CF_FN void CF_S(form_rows)(cf_job *jb) {
    const int cols = jb->cols, r = jb->r, mode = jb->mode;
    const float *R = jb->R;
    float Rtail[CF_RMAX * VW];
    const int tail = cols % VW, jv = cols - tail;
    if (tail) CF_S(tail_r)(R, cols, r, jv, tail, Rtail);
    int i = jb->row0;
    for (; i + 4 <= jb->row1; i += 4) {
        const size_t o = (size_t)i * cols;
        const int pf = i + 8 <= jb->row1;
        if (mode == 0)
            CF_S(form_four)(0, jb->W + o, jb->L + (size_t)i * r, R, jb->out + o, cols, r, jv, pf);
        else
            CF_S(form_four)(1, jb->W + o, jb->L + (size_t)i * r, R, jb->out + o, cols, r, jv, pf);
    }
    for (; i < jb->row1; i++) {
        const float *l = jb->L + (size_t)i * r, *w = jb->W + (size_t)i * cols;
        float *o = jb->out + (size_t)i * cols;
        int j = 0;
        for (; j + 2 * VW <= jv; j += 2 * VW) {
            vf s0, s1;
            CF_S(dot2)(l, R, cols, r, j, &s0, &s1);
            CF_S(st)(o + j, CF_S(apply)(mode, CF_S(ld)(w + j), s0));
            CF_S(st)(o + j + VW, CF_S(apply)(mode, CF_S(ld)(w + j + VW), s1));
        }
        for (; j < jv; j += VW)
            CF_S(st)(o + j, CF_S(apply)(mode, CF_S(ld)(w + j), CF_S(dot1)(l, R, cols, r, j)));
    }
    if (tail) {
        for (int i = jb->row0; i < jb->row1; i++) {
            const float *l = jb->L + (size_t)i * r, *w = jb->W + (size_t)i * cols;
            float b[VW];
            CF_S(st)(b, CF_S(apply)(mode, CF_S(ldn)(w + jv, tail), CF_S(dot1)(l, Rtail, VW, r, 0)));
            memcpy(jb->out + (size_t)i * cols + jv, b, sizeof(float) * tail);
        }
    }
}

CF_FI float CF_S(hsum)(vf v) {
    float b[VW], s = 0.0f;
    CF_S(st)(b, v);
    for (int q = 0; q < VW; q++) s += b[q];
    return s;
}

/* G_Δ for one column vector of row i (n valid columns, n = VW except at the tail). */
CF_FI vf CF_S(gdelta)(const cf_job *jb, int i, int j, int n, const float *Rsrc, int rstride,
                      int jr) {
    const size_t o = (size_t)i * jb->cols + j;
    vf g = n == VW ? CF_S(ld)(jb->G + o) : CF_S(ldn)(jb->G + o, n);
    if (jb->mode == 2) return g;
    vf m = n == VW ? CF_S(ld)(jb->M + o) : CF_S(ldn)(jb->M + o, n);
    g *= m;
    if (jb->mode == 1) g *= CF_S(vexp)(CF_S(dot1)(jb->L + (size_t)i * jb->r, Rsrc, rstride,
                                                  jb->r, jr));
    return g;
}

/* G_Δ of the row pair (i, i1) at the full column vector j into d0, d1 (d1 zero unless two):
 * gdelta's arithmetic per entry, the exact map's two exps in one vexp_short where both
 * vectors are in its range. */
CF_FI void CF_S(gdelta_pair)(const cf_job *jb, int i, int i1, int two, int j, float *d0,
                             float *d1) {
    if (jb->mode != 1) {
        CF_S(st)(d0, CF_S(gdelta)(jb, i, j, VW, jb->R, jb->cols, j));
        CF_S(st)(d1, two ? CF_S(gdelta)(jb, i1, j, VW, jb->R, jb->cols, j) : (vf){0});
        return;
    }
    const int cols = jb->cols, r = jb->r;
    const float *R = jb->R, *l0 = jb->L + (size_t)i * r, *l1 = jb->L + (size_t)i1 * r;
    vf e[2] = {{0}, {0}};
    for (int k = 0; k < r; k++) {
        const vf b = CF_S(ld)(R + (size_t)k * cols + j);
        e[0] += l0[k] * b;
        e[1] += l1[k] * b;
    }
    CF_S(factor)(0, e, 2);
    const size_t o0 = (size_t)i * cols + j, o1 = (size_t)i1 * cols + j;
    CF_S(st)(d0, CF_S(ld)(jb->G + o0) * CF_S(ld)(jb->M + o0) * e[0]);
    CF_S(st)(d1, two ? CF_S(ld)(jb->G + o1) * CF_S(ld)(jb->M + o1) * e[1] : (vf){0});
}

/* Column j of rows n0 and n1 of G (and M) towards the cache: a row's segment of a panel is
 * a stream of its own that the hardware prefetcher would start cold. */
CF_FI void CF_S(prefetch_rows)(const cf_job *jb, int n0, int n1, int j) {
    const size_t o0 = (size_t)n0 * jb->cols + j, o1 = (size_t)n1 * jb->cols + j;
    __builtin_prefetch(jb->G + o0, 0, 3);
    __builtin_prefetch(jb->G + o1, 0, 3);
    if (jb->mode != 2) {
        __builtin_prefetch(jb->M + o0, 0, 3);
        __builtin_prefetch(jb->M + o1, 0, 3);
    }
}

/* The row pair's start on a rank group k0..k0+KN-1: its L entries, zero ∂L/∂L accumulators. */
CF_FI void CF_S(pair_start)(const cf_job *jb, int i, int i1, int two, int k0, const int KN,
                            float *l0, float *l1, vf *a0, vf *a1) {
    for (int k = 0; k < KN; k++) {
        l0[k] = jb->L[(size_t)i * jb->r + k0 + k];
        l1[k] = two ? jb->L[(size_t)i1 * jb->r + k0 + k] : 0.0f;
        a0[k] = a1[k] = (vf){0};
    }
}

/* Columns j..j+VW of the pair's G_Δ (g0, g1) into the group: ∂L/∂R updated in place (two rows
 * per load and store), ∂L/∂L's partial vectors in registers. rv: R's vectors of the group. */
CF_FI void CF_S(pair_acc)(float *gR, int cols, int k0, const int KN, int j, const vf *rv, vf g0,
                          vf g1, const float *l0, const float *l1, vf *a0, vf *a1) {
    for (int k = 0; k < KN; k++) {
        float *pr = gR + (size_t)(k0 + k) * cols + j;
        a0[k] += g0 * rv[k];
        a1[k] += g1 * rv[k];
        CF_S(st)(pr, CF_S(ld)(pr) + l0[k] * g0 + l1[k] * g1);
    }
}

/* The same for the tail of n < VW columns at jv (R's tail vectors zero-padded in Rtail).
 * gR and cols come as values: read through jb, every store to gR would make the compiler
 * reload them (-fno-strict-aliasing). */
CF_FI void CF_S(pair_acc_tail)(float *gR, int cols, int k0, const int KN, int jv, int n,
                               const float *Rtail, vf g0, vf g1, const float *l0,
                               const float *l1, vf *a0, vf *a1) {
    for (int k = 0; k < KN; k++) {
        float *pr = gR + (size_t)(k0 + k) * cols + jv, b[VW];
        const vf rv = CF_S(ld)(Rtail + (size_t)(k0 + k) * VW);
        a0[k] += g0 * rv;
        a1[k] += g1 * rv;
        CF_S(st)(b, CF_S(ldn)(pr, n) + l0[k] * g0 + l1[k] * g1);
        memcpy(pr, b, sizeof(float) * n);
    }
}

/* The pair's ∂L/∂L partial sums of this panel into gL (zeroed by grads_rows). */
CF_FI void CF_S(pair_end)(const cf_job *jb, int i, int i1, int two, int k0, const int KN,
                          const vf *a0, const vf *a1) {
    for (int k = 0; k < KN; k++) {
        jb->gL[(size_t)i * jb->r + k0 + k] += CF_S(hsum)(a0[k]);
        if (two) jb->gL[(size_t)i1 * jb->r + k0 + k] += CF_S(hsum)(a1[k]);
    }
}

CF_FI void CF_S(load_r)(const float *R, int cols, int k0, const int KN, int j, vf *rv) {
    for (int k = 0; k < KN; k++) rv[k] = CF_S(ld)(R + (size_t)(k0 + k) * cols + j);
}

/* Rank r = KN <= KG (a compile-time constant after inlining): one pass over the rows, G_Δ
 * formed in registers per column vector. */
CF_FI void CF_S(grads_pass)(cf_job *jb, const int KN, const float *Rtail) {
    const int cols = jb->cols, tail = cols % VW, jv = cols - tail;
    const float *R = jb->R;
    float *gR = jb->gR;
    const int exact = jb->mode == 1;
    for (int p0 = 0; p0 < cols; p0 += CF_PANEL) {
        const int p1 = p0 + CF_PANEL < cols ? p0 + CF_PANEL : cols;
        const int pv = p1 < jv ? p1 : jv; /* vector part of this panel */
        for (int i = jb->row0; i < jb->row1; i += 2) {
            const int two = i + 1 < jb->row1, i1 = two ? i + 1 : i;
            float l0[CF_KG], l1[CF_KG];
            vf a0[CF_KG], a1[CF_KG];
            CF_S(pair_start)(jb, i, i1, two, 0, KN, l0, l1, a0, a1);
            /* prefetch the next row pair's segment of this panel: the pass is bound by
             * reading G and M, and the hardware prefetcher does not see the row jump */
            const int n0 = i + 2 < jb->row1 ? i + 2 : i, n1 = i + 3 < jb->row1 ? i + 3 : n0;
            for (int j = p0; j < pv; j += VW) {
                CF_S(prefetch_rows)(jb, n0, n1, j);
                vf rv[CF_KG], g0, g1;
                CF_S(load_r)(R, cols, 0, KN, j, rv);
                if (exact) { /* exp(L R) from the R vectors just loaded (dot1's sum) */
                    vf e[2] = {{0}, {0}};
                    for (int k = 0; k < KN; k++) {
                        e[0] += l0[k] * rv[k];
                        e[1] += l1[k] * rv[k];
                    }
                    CF_S(factor)(0, e, 2);
                    const size_t o0 = (size_t)i * cols + j, o1 = (size_t)i1 * cols + j;
                    g0 = CF_S(ld)(jb->G + o0) * CF_S(ld)(jb->M + o0) * e[0];
                    g1 = two ? CF_S(ld)(jb->G + o1) * CF_S(ld)(jb->M + o1) * e[1] : (vf){0};
                } else {
                    g0 = CF_S(gdelta)(jb, i, j, VW, R, cols, j);
                    g1 = two ? CF_S(gdelta)(jb, i1, j, VW, R, cols, j) : (vf){0};
                }
                CF_S(pair_acc)(gR, cols, 0, KN, j, rv, g0, g1, l0, l1, a0, a1);
            }
            if (tail && p1 == cols) {
                vf g0 = CF_S(gdelta)(jb, i, jv, tail, Rtail, VW, 0);
                vf g1 = two ? CF_S(gdelta)(jb, i1, jv, tail, Rtail, VW, 0) : (vf){0};
                CF_S(pair_acc_tail)(gR, cols, 0, KN, jv, tail, Rtail, g0, g1, l0, l1, a0, a1);
            }
            CF_S(pair_end)(jb, i, i1, two, 0, KN, a0, a1);
        }
    }
}

/* One rank group k0..k0+KN-1 of the row pair (i, i1) over a panel, from the pair's G_Δ in
 * gd0, gd1 (the tail vector zero-padded at pv - p0). */
CF_FI void CF_S(grads_group)(cf_job *jb, int k0, const int KN, int i, int i1, int two, int p0,
                             int pv, int with_tail, const float *gd0, const float *gd1,
                             const float *Rtail) {
    const int cols = jb->cols;
    const float *R = jb->R;
    float *gR = jb->gR;
    float l0[CF_KG], l1[CF_KG];
    vf a0[CF_KG], a1[CF_KG];
    CF_S(pair_start)(jb, i, i1, two, k0, KN, l0, l1, a0, a1);
    for (int j = p0; j < pv; j += VW) {
        vf rv[CF_KG];
        CF_S(load_r)(R, cols, k0, KN, j, rv);
        CF_S(pair_acc)(gR, cols, k0, KN, j, rv, CF_S(ld)(gd0 + (j - p0)),
                       CF_S(ld)(gd1 + (j - p0)), l0, l1, a0, a1);
    }
    if (with_tail)
        CF_S(pair_acc_tail)(gR, cols, k0, KN, pv, cols % VW, Rtail, CF_S(ld)(gd0 + (pv - p0)),
                            CF_S(ld)(gd1 + (pv - p0)), l0, l1, a0, a1);
    CF_S(pair_end)(jb, i, i1, two, k0, KN, a0, a1);
}

/* Ranks above KG (the accumulators of KG ranks fill the registers): G_Δ of a row pair's
 * panel is formed once into an L1 buffer (G and M read once, the exact map's exp(L R) over all
 * ranks computed once per entry) and every rank group runs on it; a pass per group over G and
 * M would read them and recompute exp once per group. For rank <= KG the one-pass kernel
 * above is faster (the buffer's cost is not repaid there). */
CF_FN void CF_S(grads_multi)(cf_job *jb, const float *Rtail) {
    const int cols = jb->cols, r = jb->r, tail = cols % VW, jv = cols - tail;
    float gd0[CF_PANEL + VW], gd1[CF_PANEL + VW];
    for (int p0 = 0; p0 < cols; p0 += CF_PANEL) {
        const int p1 = p0 + CF_PANEL < cols ? p0 + CF_PANEL : cols;
        const int pv = p1 < jv ? p1 : jv, with_tail = tail && p1 == cols;
        for (int i = jb->row0; i < jb->row1; i += 2) {
            const int two = i + 1 < jb->row1, i1 = two ? i + 1 : i;
            const int n0 = i + 2 < jb->row1 ? i + 2 : i, n1 = i + 3 < jb->row1 ? i + 3 : n0;
            for (int j = p0; j < pv; j += VW) {
                CF_S(prefetch_rows)(jb, n0, n1, j);
                CF_S(gdelta_pair)(jb, i, i1, two, j, gd0 + (j - p0), gd1 + (j - p0));
            }
            if (with_tail) {
                CF_S(st)(gd0 + (pv - p0), CF_S(gdelta)(jb, i, jv, tail, Rtail, VW, 0));
                CF_S(st)(gd1 + (pv - p0),
                         two ? CF_S(gdelta)(jb, i1, jv, tail, Rtail, VW, 0) : (vf){0});
            }
            for (int k0 = 0; k0 < r; k0 += KG) {
                const int kn = r - k0 < KG ? r - k0 : KG;
#define CF_GROUP(n) CF_S(grads_group)(jb, k0, n, i, i1, two, p0, pv, with_tail, gd0, gd1, Rtail)
                switch (kn) {
                case 1: CF_GROUP(1); break;
                case 2: CF_GROUP(2); break;
                case 3: CF_GROUP(3); break;
                case 4: CF_GROUP(4); break;
#if KG > 4
                case 5: CF_GROUP(5); break;
                case 6: CF_GROUP(6); break;
                case 7: CF_GROUP(7); break;
                default: CF_GROUP(8); break;
#endif
                }
#undef CF_GROUP
            }
        }
    }
}

/* ∂L/∂L gets one partial sum per row pair and column panel (deterministic for a given
 * instruction set and thread count). */
CF_FN void CF_S(grads_rows)(cf_job *jb) {
    const int cols = jb->cols, r = jb->r, tail = cols % VW;
    memset(jb->gR, 0, sizeof(float) * (size_t)r * cols);
    memset(jb->gL + (size_t)jb->row0 * r, 0, sizeof(float) * (size_t)(jb->row1 - jb->row0) * r);
    float Rtail[CF_RMAX * VW];
    if (tail) CF_S(tail_r)(jb->R, cols, r, cols - tail, tail, Rtail);
    if (r > KG) {
        CF_S(grads_multi)(jb, Rtail);
        return;
    }
    switch (r) {
    case 1: CF_S(grads_pass)(jb, 1, Rtail); break;
    case 2: CF_S(grads_pass)(jb, 2, Rtail); break;
    case 3: CF_S(grads_pass)(jb, 3, Rtail); break;
    case 4: CF_S(grads_pass)(jb, 4, Rtail); break;
#if KG > 4
    case 5: CF_S(grads_pass)(jb, 5, Rtail); break;
    case 6: CF_S(grads_pass)(jb, 6, Rtail); break;
    case 7: CF_S(grads_pass)(jb, 7, Rtail); break;
    default: CF_S(grads_pass)(jb, 8, Rtail); break;
#endif
    }
}

#undef vf
#undef vi
#undef KG
#undef VW
#endif
