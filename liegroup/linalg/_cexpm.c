/*
 * Compiled CPU kernel of liegroup.linalg.expm and expm_frechet for small matrices.
 *
 * One matrix at a time, the algorithm of liegroup/linalg/expm.py and _expm_decide.py
 * (Al-Mohy & Higham, SIAM J. Matrix Anal. Appl. 31(3), 2009, Algorithm 5.1, and 30(4),
 * 2009, Algorithm 6.4 for the Fréchet derivative):
 *
 *   - prescaling by a power of two when ||A||_1 > 2^P (P = 100 float64, 12 float32);
 *   - degree m and scaling s from the exact 1-norms of A, A^2, A^4, A^6 (and A^8, A^10 when
 *     they can lower s) against the same theta tables, with the same exact-integer
 *     arithmetic (ceil(log2) from frexp, integer ceilings) as the Python decisions;
 *   - the guard l(A, m) from the exact ||(|A| 2^-e)^p||_1 = max(1^T (|A| 2^-e)^p), formed
 *     only when the bound mu^p does not settle it;
 *   - the Padé approximant r_m of 2^-s A, LU with partial pivoting, s squarings;
 *   - for upper-triangular A, the exact diagonal and first superdiagonal of every squared
 *     iterate (expm1-based sinh(x)/x, as the torch path); an A that a symmetric permutation
 *     makes upper triangular (lower-triangular ones among them) is computed permuted,
 *     exp(A) = P exp(P^T A P) P^T, L(A, E) = P L(P^T A P, P^T E P) P^T;
 *   - the Fréchet derivative L(A, E) with the same (m, s): derivatives of U and V, the
 *     same LU, and L <- R L + L R at each squaring.
 *
 * Each matrix is computed by the same sequence of operations whatever the batch it sits in
 * (no cross-matrix vectorisation), so results are batch-invariant by construction.
 *
 * The module takes raw data pointers (tensor.data_ptr()) of C-contiguous (B, n, n) arrays
 * and needs neither numpy's nor torch's C API. Small n get compile-time specialisations; on
 * x86-64 Linux (gcc/clang with ifunc) every entry point is cloned for x86-64-v4 (AVX-512),
 * x86-64-v3 (AVX2 + FMA) and the baseline, chosen at load time.
 *
 * The file includes itself once per element type (CEXPM_T): the part after the #else below
 * is the type-generic body.
 */
#ifndef CEXPM_BODY

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Largest n handled here (above, liegroup uses its torch path). */
#define CEXPM_N_MAX 64

/* Batches with at least this many multiply-adds (B * n^3) run without the GIL. */
#define CEXPM_NOGIL_WORK 20000

#define CX_RESTRICT __restrict__
#define CX_FI static inline __attribute__((always_inline)) CX_TGT /* inlined */
#define CX_FN static CX_TGT
#define CX_NOINL static __attribute__((noinline)) CX_TGT
/* Sizes with their own compiled copy of the matrix primitives (others: runtime n). */
#define CX_SIZES(CALL)    \
    switch (n) {          \
    case 5: CALL(5); break;   \
    case 6: CALL(6); break;   \
    case 7: CALL(7); break;   \
    case 8: CALL(8); break;   \
    case 10: CALL(10); break; \
    case 12: CALL(12); break; \
    case 16: CALL(16); break; \
    case 24: CALL(24); break; \
    case 32: CALL(32); break; \
    case 64: CALL(64); break; \
    default: CALL(n); break;  \
    }

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(CEXPM_NO_ISA)
#define CX_X86_ISA 1 /* extra bodies for AVX2+FMA and AVX-512, chosen at load time */
#endif

#define CX_NEG (-(1LL << 40)) /* "ceil(log2 0)" */

/* ------------------------------------------------------------------ decision constants */
/* Values (bit for bit) of liegroup.linalg._expm_decide._Consts; see there for derivations. */
typedef struct {
    int nc;            /* number of unscaled candidates */
    int degs[5];       /* candidate degrees, then the top degree */
    double K[5];       /* |c_{2m+1}| / u per degree */
    int qa[4], qb[4];  /* candidate tests N[qa] <= ta, N[qb] <= tb */
    double ta[4], tb[4];
    double thk[3];     /* theta_top^6, ^8, ^10 */
    int prescale;      /* ||A||_1 above 2^prescale is prescaled */
    int pmax;          /* largest p = 2m + 1 */
} cx_consts;

static const cx_consts CX_C64 = {
    4,
    {3, 5, 7, 9, 13},
    {0x1.4ce19ae67b348p+36, 0x1.b5393b6d08700p+19, 0x1.00e4b2189adb9p+1, 0x1.98cf0379bc15cp-20,
     0x1.7795c47994e9ap-64},
    {0, 0, 1, 1},
    {1, 1, 2, 2},
    {0x1.adc4b808e8bc0p-25, 0x1.1085e6f3dadcbp-8, 0x1.795c8c041aa87p-1, 0x1.54f5e26e922d9p+6},
    {0x1.89bf1f895213bp-37, 0x1.192e2831c1bf8p-12, 0x1.54de534ca2bb5p-1, 0x1.77238dd21147cp+8},
    {0x1.704f610000000p+12, 0x1.9fc99c8100000p+16, 0x1.d56299ada1000p+20},
    100,
    27,
};

static const cx_consts CX_C32 = {
    2,
    {3, 5, 7, 0, 0},
    {0x1.4ce19ae67b348p+7, 0x1.b5393b6d08700p-10, 0x1.00e4b2189adb9p-28, 0, 0},
    {0, 0, 0, 0},
    {1, 1, 0, 0},
    {0x1.0d785070ea450p-5, 0x1.8fdf944593292p+3, 0, 0},
    {0x1.86fc4657a8f64p-8, 0x1.6162afe354499p+5, 0, 0},
    {0x1.c98a4353ccd55p+11, 0x1.b8b4b722286c4p+15, 0x1.a87dba5b63750p+19},
    12,
    15,
};

/* Padé coefficients b_j = (2m-j)! / (j! (m-j)!) of degree 13 (lower degrees below). */
static const double CX_B3[4] = {120.0, 60.0, 12.0, 1.0};
static const double CX_B5[6] = {30240.0, 15120.0, 3360.0, 420.0, 30.0, 1.0};
static const double CX_B7[8] = {17297280.0, 8648640.0, 1995840.0, 277200.0,
                                25200.0,    1512.0,    56.0,      1.0};
static const double CX_B9[10] = {17643225600.0, 8821612800.0, 2075673600.0, 302702400.0,
                                 30270240.0,    2162160.0,    110880.0,     3960.0,
                                 90.0,          1.0};
static const double CX_B13[14] = {64764752532480000.0, 32382376266240000.0, 7771770303897600.0,
                                  1187353796428800.0,  129060195264000.0,   10559470521600.0,
                                  670442572800.0,      33522128640.0,       1323241920.0,
                                  40840800.0,          960960.0,            16380.0,
                                  182.0,               1.0};

static const double *cx_pade_b(int m) {
    switch (m) {
    case 3: return CX_B3;
    case 5: return CX_B5;
    case 7: return CX_B7;
    case 9: return CX_B9;
    default: return CX_B13;
    }
}

/* ------------------------------------------------------------------ exact host math */
/* ceil(log2 x) exactly for x > 0; CX_NEG for x <= 0. */
static inline long long cx_clog2(double x) {
    int ex;
    double mant;
    if (!(x > 0)) return CX_NEG;
    mant = frexp(x, &ex);
    return (long long)ex - (mant == 0.5);
}

/* ceil(a / k) for integers, k > 0. */
static inline long long cx_cdiv(long long a, long long k) {
    long long q = a / k;
    if (q * k != a && a > 0) q += 1;
    return q;
}

static inline long long cx_max(long long a, long long b) { return a > b ? a : b; }
static inline long long cx_min(long long a, long long b) { return a < b ? a : b; }

/* Scaling of the top degree from (bounds of) ||A^6||, ||A^8||, ||A^10||. */
static long long cx_s_top(double n6, double n8, double n10, const cx_consts *c) {
    long long s6 = cx_max(cx_cdiv(cx_clog2(n6 / c->thk[0]), 6), 0);
    long long s8 = cx_max(cx_cdiv(cx_clog2(n8 / c->thk[1]), 8), 0);
    long long s10 = cx_max(cx_cdiv(cx_clog2(n10 / c->thk[2]), 10), 0);
    return cx_min(cx_max(s6, s8), cx_max(s8, s10));
}

/* sinh(x)/x without cancellation (as liegroup.linalg._expm_pade._sinhc). */
static inline double cx_sinhc(double x) {
    if (fabs(x) < 1e-2) {
        double x2 = x * x;
        return 1 + x2 / 6 * (1 + x2 / 20);
    }
    return expm1(x) * (1 + exp(-x)) / (2 * x);
}

/* Work space (in elements) of one matrix of size n: see the body's slot list. */
#define CX_SLOTS 23
static size_t cx_work_elems(int n) { return (size_t)CX_SLOTS * n * n + 8 * (size_t)n + 64; }

/* ------------------------------------------------------------------ typed bodies */
/* The body is included once per (element type, instruction set): every function in it
 * carries CX_TGT, so the AVX2/AVX-512 copies are compiled for those instruction sets while
 * the module as a whole is built for the baseline (no -march flags). */
#define CEXPM_BODY
#define CX_TGT
#define CX_VBYTES 16
#define CX_T double
#define CX_TMAX 1.7976931348623157e308
#define CX_S(name) name##_f64_base
#include "_cexpm.c"
#undef CX_S
#undef CX_T
#undef CX_TMAX
#define CX_T float
#define CX_TMAX 3.4028234663852886e38f
#define CX_S(name) name##_f32_base
#include "_cexpm.c"
#undef CX_S
#undef CX_T
#undef CX_TMAX
#undef CX_TGT
#undef CX_VBYTES

#ifdef CX_X86_ISA
#define CX_VBYTES 32
#define CX_TGT __attribute__((target("avx2,fma")))
#define CX_T double
#define CX_TMAX 1.7976931348623157e308
#define CX_S(name) name##_f64_avx2
#include "_cexpm.c"
#undef CX_S
#undef CX_T
#undef CX_TMAX
#define CX_T float
#define CX_TMAX 3.4028234663852886e38f
#define CX_S(name) name##_f32_avx2
#include "_cexpm.c"
#undef CX_S
#undef CX_T
#undef CX_TMAX
#undef CX_TGT
#undef CX_VBYTES

#define CX_VBYTES 64
#define CX_TGT __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma")))
#define CX_T double
#define CX_TMAX 1.7976931348623157e308
#define CX_S(name) name##_f64_avx512
#include "_cexpm.c"
#undef CX_S
#undef CX_T
#undef CX_TMAX
#define CX_T float
#define CX_TMAX 3.4028234663852886e38f
#define CX_S(name) name##_f32_avx512
#include "_cexpm.c"
#undef CX_S
#undef CX_T
#undef CX_TMAX
#undef CX_TGT
#undef CX_VBYTES
#endif
#undef CEXPM_BODY

typedef long long (*cx_expm_fn)(void *, void *, void *, Py_ssize_t, int);
typedef long long (*cx_frechet_fn)(void *, void *, void *, void *, void *, Py_ssize_t, int, int);
typedef struct {
    cx_expm_fn expm_f64, expm_f32;
    cx_frechet_fn frechet_f64, frechet_f32;
} cx_bodies;

static const cx_bodies CX_BASE = {expm_batch_f64_base, expm_batch_f32_base, frechet_batch_f64_base,
                                  frechet_batch_f32_base};
#ifdef CX_X86_ISA
static const cx_bodies CX_AVX2 = {expm_batch_f64_avx2, expm_batch_f32_avx2, frechet_batch_f64_avx2,
                                  frechet_batch_f32_avx2};
static const cx_bodies CX_AVX512 = {expm_batch_f64_avx512, expm_batch_f32_avx512,
                                    frechet_batch_f64_avx512, frechet_batch_f32_avx512};
#endif

/* Bodies in use for n < CX_WIDE_N and for larger n: with "auto" on an AVX-512 machine the
 * AVX2 bodies take the small matrices (measured faster there: 64-byte vectors do not fit
 * their rows) and the AVX-512 ones the rest. */
#define CX_WIDE_N 16
static const cx_bodies *cx_small = &CX_BASE, *cx_wide = &CX_BASE;
static const char *cx_isa = "baseline";

/* Choose the bodies for this CPU (name: "auto", "baseline", "avx2", "avx512"); 0 if the
 * requested one is not available. */
static int cx_select(const char *name) {
    int want_auto = strcmp(name, "auto") == 0;
#ifdef CX_X86_ISA
    __builtin_cpu_init();
    int has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    int has512 = has2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                 __builtin_cpu_supports("avx512dq");
    if (want_auto && has512) {
        cx_small = &CX_AVX2;
        cx_wide = &CX_AVX512;
        cx_isa = "avx2+avx512";
        return 1;
    }
    if (strcmp(name, "avx512") == 0 && has512) {
        cx_small = cx_wide = &CX_AVX512;
        cx_isa = "avx512";
        return 1;
    }
    if ((want_auto && has2) || (strcmp(name, "avx2") == 0 && has2)) {
        cx_small = cx_wide = &CX_AVX2;
        cx_isa = "avx2";
        return 1;
    }
#endif
    if (want_auto || strcmp(name, "baseline") == 0) {
        cx_small = cx_wide = &CX_BASE;
        cx_isa = "baseline";
        return 1;
    }
    return 0;
}

/* ------------------------------------------------------------------ Python module */
static int cx_ptr(PyObject *o, void **out) {
    *out = PyLong_AsVoidPtr(o);
    return !(*out == NULL && PyErr_Occurred());
}

static PyObject *cx_py_expm(PyObject *self, PyObject *args) {
    PyObject *pa, *px, *pms;
    Py_ssize_t B, n;
    int dt;
    void *a, *x, *ms;
    long long bad;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOnni", &pa, &px, &pms, &B, &n, &dt)) return NULL;
    if (!cx_ptr(pa, &a) || !cx_ptr(px, &x) || !cx_ptr(pms, &ms)) return NULL;
    if (n < 1 || n > CEXPM_N_MAX || B < 0 || (dt != 0 && dt != 1) || !a || !x) {
        PyErr_SetString(PyExc_ValueError, "_cexpm.expm: bad arguments");
        return NULL;
    }
    const cx_bodies *bd = n < CX_WIDE_N ? cx_small : cx_wide;
    cx_expm_fn f = dt == 1 ? bd->expm_f64 : bd->expm_f32;
    if ((double)B * n * n * n >= CEXPM_NOGIL_WORK) {
        Py_BEGIN_ALLOW_THREADS
        bad = f(a, x, ms, B, (int)n);
        Py_END_ALLOW_THREADS
    } else {
        bad = f(a, x, ms, B, (int)n);
    }
    if (bad == -2) return PyErr_NoMemory();
    return PyLong_FromLongLong(bad);
}

static PyObject *cx_py_frechet(PyObject *self, PyObject *args) {
    PyObject *pa, *pe, *px, *pl, *pms;
    Py_ssize_t B, n;
    int dt, given;
    void *a, *e, *x, *l, *ms;
    long long bad;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOnnii", &pa, &pe, &px, &pl, &pms, &B, &n, &dt, &given))
        return NULL;
    if (!cx_ptr(pa, &a) || !cx_ptr(pe, &e) || !cx_ptr(px, &x) || !cx_ptr(pl, &l) ||
        !cx_ptr(pms, &ms))
        return NULL;
    if (n < 1 || n > CEXPM_N_MAX || B < 0 || (dt != 0 && dt != 1) || !a || !e || !l ||
        given < 0 || given > 3 || (given == 2) || ((given & 1) && !ms)) {
        PyErr_SetString(PyExc_ValueError, "_cexpm.frechet: bad arguments");
        return NULL;
    }
    const cx_bodies *bd = n < CX_WIDE_N ? cx_small : cx_wide;
    cx_frechet_fn f = dt == 1 ? bd->frechet_f64 : bd->frechet_f32;
    if ((double)B * n * n * n >= CEXPM_NOGIL_WORK / 3) {
        Py_BEGIN_ALLOW_THREADS
        bad = f(a, e, x, l, ms, B, (int)n, given);
        Py_END_ALLOW_THREADS
    } else {
        bad = f(a, e, x, l, ms, B, (int)n, given);
    }
    if (bad == -2) return PyErr_NoMemory();
    return PyLong_FromLongLong(bad);
}

static PyObject *cx_py_isa(PyObject *self, PyObject *args) {
    const char *name = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "|s", &name)) return NULL;
    if (name != NULL && !cx_select(name)) {
        PyErr_Format(PyExc_ValueError,
                     "_cexpm.isa: %s is not available here (baseline, avx2, avx512 or auto)", name);
        return NULL;
    }
    return PyUnicode_FromString(cx_isa);
}

static PyMethodDef cx_methods[] = {
    {"isa", cx_py_isa, METH_VARARGS,
     "isa([name]) -> the instruction set(s) in use ('baseline', 'avx2', 'avx512', or "
     "'avx2+avx512': AVX2 below n = 16, AVX-512 from there); with name ('auto', 'baseline', "
     "'avx2', 'avx512') switch first (ValueError if this CPU lacks it)."},
    {"expm", cx_py_expm, METH_VARARGS,
     "expm(a_ptr, x_ptr, ms_ptr, B, n, dtype) -> -1, or the index of the first matrix with "
     "non-finite entries. dtype: 0 float32, 1 float64; C-contiguous (B, n, n) arrays; ms_ptr "
     "(0 or int32[B, 2]) receives the degree and the total number of squarings."},
    {"frechet", cx_py_frechet, METH_VARARGS,
     "frechet(a_ptr, e_ptr, x_ptr, l_ptr, ms_ptr, B, n, dtype, given) -> -1 or the index of "
     "the first matrix with non-finite entries. L(A, E) into l_ptr, exp(A) into x_ptr (unless "
     "0). given = 0: decide the degree and squarings (written to ms_ptr unless 0); 1: read them "
     "from ms_ptr (int32[B, 2]); 3: read them and compute L(A^T, E)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef cx_module = {
    PyModuleDef_HEAD_INIT, "_cexpm",
    "Compiled CPU kernel of liegroup.linalg.expm / expm_frechet for small matrices.", -1,
    cx_methods,
};

PyMODINIT_FUNC PyInit__cexpm(void) {
    PyObject *m = PyModule_Create(&cx_module);
    if (m == NULL) return NULL;
    cx_select("auto");
    if (PyModule_AddIntConstant(m, "N_MAX", CEXPM_N_MAX) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

#else /* ================================================================ typed body */

#define T CX_T

/* C = A B (+ D E) (+ F), n x n row-major, each entry accumulated in the order F, then
 * k = 0..n-1 of A B, then of D E. For n >= 8 register-blocked: 4 rows x 64 bytes of C stay in
 * registers (explicit vectors of the instruction set's width, CX_VBYTES) while k runs, one
 * load of B per 4 rows. */
#define CX_RB 4
#define CX_VW (CX_VBYTES / (int)sizeof(T))
#define CX_JB (2 * CX_VW)
typedef T CX_S(vec) __attribute__((vector_size(CX_VBYTES)));

CX_FI CX_S(vec) CX_S(vload)(const T *p) {
    CX_S(vec) v;
    memcpy(&v, p, sizeof v);
    return v;
}

CX_FI void CX_S(vstore)(T *p, CX_S(vec) v) { memcpy(p, &v, sizeof v); }

/* One full block: rows i0..i0+3, columns j0 .. j0 + nv * CX_VW - 1 (nv = 1 or 2). */
CX_FI void CX_S(gemm_vblk)(int n, int i0, int j0, int nv, const T *CX_RESTRICT A,
                           const T *CX_RESTRICT Bm, const T *CX_RESTRICT D,
                           const T *CX_RESTRICT E, const T *CX_RESTRICT F, T *CX_RESTRICT C) {
    typedef CX_S(vec) V;
    V acc[2][CX_RB];
    for (int r = 0; r < CX_RB; r++)
        for (int v = 0; v < nv; v++)
            acc[v][r] = F ? CX_S(vload)(F + (size_t)(i0 + r) * n + j0 + v * CX_VW) : (V){0};
    for (int k = 0; k < n; k++) {
        V b[2];
        for (int v = 0; v < nv; v++) b[v] = CX_S(vload)(Bm + (size_t)k * n + j0 + v * CX_VW);
        for (int r = 0; r < CX_RB; r++) {
            const T a = A[(size_t)(i0 + r) * n + k];
            for (int v = 0; v < nv; v++) acc[v][r] += a * b[v];
        }
    }
    if (D) {
        for (int k = 0; k < n; k++) {
            V b[2];
            for (int v = 0; v < nv; v++) b[v] = CX_S(vload)(E + (size_t)k * n + j0 + v * CX_VW);
            for (int r = 0; r < CX_RB; r++) {
                const T d = D[(size_t)(i0 + r) * n + k];
                for (int v = 0; v < nv; v++) acc[v][r] += d * b[v];
            }
        }
    }
    for (int r = 0; r < CX_RB; r++)
        for (int v = 0; v < nv; v++)
            CX_S(vstore)(C + (size_t)(i0 + r) * n + j0 + v * CX_VW, acc[v][r]);
}

/* Any block (rb <= CX_RB rows, jb <= CX_JB columns), scalar. */
CX_FI void CX_S(gemm_blk)(int n, int i0, int j0, int rb, int jb, const T *CX_RESTRICT A,
                          const T *CX_RESTRICT Bm, const T *CX_RESTRICT D, const T *CX_RESTRICT E,
                          const T *CX_RESTRICT F, T *CX_RESTRICT C) {
    for (int r = 0; r < rb; r++) {
        T *c = C + (size_t)(i0 + r) * n + j0;
        const T *a = A + (size_t)(i0 + r) * n;
        for (int j = 0; j < jb; j++) c[j] = F ? F[(size_t)(i0 + r) * n + j0 + j] : (T)0;
        for (int k = 0; k < n; k++) {
            const T aik = a[k];
            const T *b = Bm + (size_t)k * n + j0;
            for (int j = 0; j < jb; j++) c[j] += aik * b[j];
        }
        if (D) {
            const T *d = D + (size_t)(i0 + r) * n;
            for (int k = 0; k < n; k++) {
                const T dik = d[k];
                const T *e = E + (size_t)k * n + j0;
                for (int j = 0; j < jb; j++) c[j] += dik * e[j];
            }
        }
    }
}

CX_FI void CX_S(gemm_impl)(int n, const T *CX_RESTRICT A, const T *CX_RESTRICT Bm,
                           const T *CX_RESTRICT D, const T *CX_RESTRICT E,
                           const T *CX_RESTRICT F, T *CX_RESTRICT C) {
    if (n < 8) {
        for (int i = 0; i < n; i++) {
            T *c = C + (size_t)i * n;
            const T *a = A + (size_t)i * n;
            for (int j = 0; j < n; j++) c[j] = F ? F[(size_t)i * n + j] : (T)0;
            for (int k = 0; k < n; k++) {
                const T aik = a[k];
                const T *b = Bm + (size_t)k * n;
                for (int j = 0; j < n; j++) c[j] += aik * b[j];
            }
            if (D) {
                const T *d = D + (size_t)i * n;
                for (int k = 0; k < n; k++) {
                    const T dik = d[k];
                    const T *e = E + (size_t)k * n;
                    for (int j = 0; j < n; j++) c[j] += dik * e[j];
                }
            }
        }
        return;
    }
    int i0 = 0;
    for (; i0 + CX_RB <= n; i0 += CX_RB) {
        int j0 = 0;
        for (; j0 + CX_JB <= n; j0 += CX_JB) CX_S(gemm_vblk)(n, i0, j0, 2, A, Bm, D, E, F, C);
        if (j0 + CX_VW <= n) {
            CX_S(gemm_vblk)(n, i0, j0, 1, A, Bm, D, E, F, C);
            j0 += CX_VW;
        }
        if (j0 < n) CX_S(gemm_blk)(n, i0, j0, CX_RB, n - j0, A, Bm, D, E, F, C);
    }
    for (; i0 < n; i0++) {
        int j0 = 0;
        for (; j0 + CX_JB <= n; j0 += CX_JB) CX_S(gemm_blk)(n, i0, j0, 1, CX_JB, A, Bm, D, E, F, C);
        if (j0 < n) CX_S(gemm_blk)(n, i0, j0, 1, n - j0, A, Bm, D, E, F, C);
    }
}
#undef CX_RB
#undef CX_JB
#undef CX_VW

CX_FI void CX_S(mm_impl)(int n, const T *CX_RESTRICT A, const T *CX_RESTRICT Bm,
                         T *CX_RESTRICT C) {
    CX_S(gemm_impl)(n, A, Bm, NULL, NULL, NULL, C);
}

CX_NOINL void CX_S(mm_rt)(int n, const T *CX_RESTRICT A, const T *CX_RESTRICT Bm, T *CX_RESTRICT C) {
#define CX_CALL(N) CX_S(mm_impl)(N, A, Bm, C)
    CX_SIZES(CX_CALL)
#undef CX_CALL
}

CX_FI void CX_S(mm)(int n, const T *CX_RESTRICT A, const T *CX_RESTRICT Bm, T *CX_RESTRICT C) {
    if (__builtin_constant_p(n))
        CX_S(mm_impl)(n, A, Bm, C);
    else
        CX_S(mm_rt)(n, A, Bm, C);
}

/* C = A B + D. */
CX_FI void CX_S(mm_add_impl)(int n, const T *CX_RESTRICT A, const T *CX_RESTRICT Bm,
                             const T *CX_RESTRICT D, T *CX_RESTRICT C) {
    CX_S(gemm_impl)(n, A, Bm, NULL, NULL, D, C);
}

CX_NOINL void CX_S(mm_add_rt)(int n, const T *CX_RESTRICT A, const T *CX_RESTRICT Bm, const T *CX_RESTRICT D, T *CX_RESTRICT C) {
#define CX_CALL(N) CX_S(mm_add_impl)(N, A, Bm, D, C)
    CX_SIZES(CX_CALL)
#undef CX_CALL
}

CX_FI void CX_S(mm_add)(int n, const T *CX_RESTRICT A, const T *CX_RESTRICT Bm, const T *CX_RESTRICT D, T *CX_RESTRICT C) {
    if (__builtin_constant_p(n))
        CX_S(mm_add_impl)(n, A, Bm, D, C);
    else
        CX_S(mm_add_rt)(n, A, Bm, D, C);
}

/* C = A B + D E + F (F may be NULL). */
CX_FI void CX_S(mm2_add_impl)(int n, const T *CX_RESTRICT A, const T *CX_RESTRICT Bm,
                              const T *CX_RESTRICT D, const T *CX_RESTRICT E,
                              const T *CX_RESTRICT F, T *CX_RESTRICT C) {
    CX_S(gemm_impl)(n, A, Bm, D, E, F, C);
}

CX_NOINL void CX_S(mm2_add_rt)(int n, const T *CX_RESTRICT A, const T *CX_RESTRICT Bm, const T *CX_RESTRICT D, const T *CX_RESTRICT E, const T *CX_RESTRICT F, T *CX_RESTRICT C) {
#define CX_CALL(N) CX_S(mm2_add_impl)(N, A, Bm, D, E, F, C)
    CX_SIZES(CX_CALL)
#undef CX_CALL
}

CX_FI void CX_S(mm2_add)(int n, const T *CX_RESTRICT A, const T *CX_RESTRICT Bm, const T *CX_RESTRICT D, const T *CX_RESTRICT E, const T *CX_RESTRICT F, T *CX_RESTRICT C) {
    if (__builtin_constant_p(n))
        CX_S(mm2_add_impl)(n, A, Bm, D, E, F, C);
    else
        CX_S(mm2_add_rt)(n, A, Bm, D, E, F, C);
}

/* 1-norm (largest column sum, rows added in order) as a double; +inf if any column sum is
 * not finite (NaN included). */
CX_FI double CX_S(norm1_impl)(int n, const T *CX_RESTRICT X, T *CX_RESTRICT cs) {
    for (int j = 0; j < n; j++) cs[j] = (T)fabs((double)X[j]);
    for (int i = 1; i < n; i++) {
        const T *x = X + (size_t)i * n;
        for (int j = 0; j < n; j++) cs[j] += x[j] < 0 ? -x[j] : x[j];
    }
    double m = 0;
    int bad = 0;
    for (int j = 0; j < n; j++) {
        const T v = cs[j];
        if (!(v <= CX_TMAX)) bad = 1;
        else if (v > m) m = v;
    }
    return bad ? INFINITY : m;
}

CX_NOINL double CX_S(norm1_rt)(int n, const T *CX_RESTRICT X, T *CX_RESTRICT cs) {
    double r;
#define CX_CALL(N) r = CX_S(norm1_impl)(N, X, cs)
    CX_SIZES(CX_CALL)
#undef CX_CALL
    return r;
}

CX_FI double CX_S(norm1)(int n, const T *CX_RESTRICT X, T *CX_RESTRICT cs) {
    if (__builtin_constant_p(n)) return CX_S(norm1_impl)(n, X, cs);
    return CX_S(norm1_rt)(n, X, cs);
}

/* X *= 2^-k (exact: powers of two, applied in steps that stay normal). */
CX_FI void CX_S(scale2)(int n, T *CX_RESTRICT X, long long k) {
    while (k > 0) {
        long long step = k > 60 ? 60 : k;
        const T f = (T)ldexp(1.0, (int)-step);
        for (int i = 0; i < n * n; i++) X[i] *= f;
        k -= step;
    }
}

/* Y = X 2^-k. */
CX_FI void CX_S(scale2_to)(int n, const T *CX_RESTRICT X, T *CX_RESTRICT Y, long long k) {
    memcpy(Y, X, sizeof(T) * (size_t)n * n);
    CX_S(scale2)(n, Y, k);
}

CX_FI int CX_S(is_upper)(int n, const T *CX_RESTRICT A) {
    if (n == 1) return 1;
    if (A[(size_t)(n - 1) * n] != 0) return 0;
    for (int i = 1; i < n; i++)
        for (int j = 0; j < i; j++)
            if (A[(size_t)i * n + j] != 0) return 0;
    return 1;
}

/* An order p of the indices with A[p[a], p[b]] == 0 for all a > b (P^T A P upper triangular,
 * P the permutation matrix of p), for an A that is not upper triangular: Kahn's topological
 * sort of the graph with an edge i -> j for every A[i, j] != 0, i != j. Returns 0 (p
 * undefined) when the graph has a cycle. O(n^2); a full matrix fails at the first step. */
CX_FI int CX_S(tri_order)(int n, const T *CX_RESTRICT A, int *CX_RESTRICT p) {
    int cnt[CEXPM_N_MAX];
    int placed = 0;
    for (int j = 0; j < n; j++) {
        int c = 0;
        for (int i = 0; i < n; i++) c += (i != j) & (A[(size_t)i * n + j] != 0);
        cnt[j] = c;
        if (c == 0) p[placed++] = j;
    }
    for (int head = 0; head < placed; head++) {
        const int i = p[head];
        for (int j = 0; j < n; j++)
            if (j != i && A[(size_t)i * n + j] != 0 && --cnt[j] == 0) p[placed++] = j;
    }
    return placed == n;
}

/* X <- P^T X P (X[p[a], p[b]] moved to [a, b]), through tmp. */
CX_FI void CX_S(permute)(int n, const int *p, T *CX_RESTRICT X, T *CX_RESTRICT tmp) {
    for (int a = 0; a < n; a++)
        for (int b = 0; b < n; b++) tmp[(size_t)a * n + b] = X[(size_t)p[a] * n + p[b]];
    memcpy(X, tmp, sizeof(T) * (size_t)n * n);
}

/* Y <- P X P^T ([a, b] moved back to [p[a], p[b]]). */
CX_FI void CX_S(unpermute_to)(int n, const int *p, const T *CX_RESTRICT X, T *CX_RESTRICT Y) {
    for (int a = 0; a < n; a++)
        for (int b = 0; b < n; b++) Y[(size_t)p[a] * n + p[b]] = X[(size_t)a * n + b];
}

CX_FI int CX_S(all_finite)(int n, const T *CX_RESTRICT A) {
    int ok = 1;
    for (int i = 0; i < n * n; i++) ok &= (A[i] - A[i]) == 0;
    return ok;
}

/* nu_p = ||(|A| 2^-e)^p||_1 for p in the degrees' 2m + 1, into nu[0..]. Row vectors
 * v3 = 1^T B B^2, v7 = v3 B^4, v11 = v7 B^4, ... (as _abs_power_norms_np). */
CX_FI void CX_S(abs_power_norms)(int n, const T *CX_RESTRICT A, int e, const cx_consts *c,
                                     double *nu, T *CX_RESTRICT B1, T *CX_RESTRICT B2,
                                     T *CX_RESTRICT B4, T *CX_RESTRICT v, T *CX_RESTRICT w) {
    const T f = (T)ldexp(1.0, -e);
    for (int i = 0; i < n * n; i++) B1[i] = (A[i] < 0 ? -A[i] : A[i]) * f;
    CX_S(mm)(n, B1, B1, B2);
    CX_S(mm)(n, B2, B2, B4);
    for (int j = 0; j < n; j++) w[j] = B1[j];
    for (int i = 1; i < n; i++)
        for (int j = 0; j < n; j++) w[j] += B1[(size_t)i * n + j];
    /* v = w B2 */
    for (int j = 0; j < n; j++) v[j] = w[0] * B2[j];
    for (int k = 1; k < n; k++)
        for (int j = 0; j < n; j++) v[j] += w[k] * B2[(size_t)k * n + j];
    int nd = c->nc + 1, idx = 0;
    for (int p = 3; p <= c->pmax; p += 4) {
        if (p > 3) {
            for (int j = 0; j < n; j++) w[j] = v[j];
            for (int j = 0; j < n; j++) v[j] = w[0] * B4[j];
            for (int k = 1; k < n; k++)
                for (int j = 0; j < n; j++) v[j] += w[k] * B4[(size_t)k * n + j];
        }
        /* record for the degrees with 2m + 1 == p */
        for (int d = idx; d < nd; d++) {
            if (2 * c->degs[d] + 1 == p) {
                double mx = 0;
                for (int j = 0; j < n; j++)
                    if ((double)v[j] > mx) mx = v[j];
                nu[d] = mx;
                idx = d + 1;
            }
        }
    }
}

/* Degree and scaling of one (prescaled) matrix from its four norms: _choose_scalar. */
CX_FI void CX_S(choose)(int n, const T *CX_RESTRICT A, const T *CX_RESTRICT A4,
                            const T *CX_RESTRICT A6, double nA, double n2, double n4, double n6,
                            const cx_consts *c, T *CX_RESTRICT wk, int *m_out, int *s_out) {
    const double n44 = n4 * n4;
    const double N[4] = {n4, n6, fmin(n44, n2 * n6), fmin(n4 * n6, n2 * n44)};
    int e;
    const double mu = frexp(nA, &e);
    const double q2 = mu * mu, q4 = q2 * q2, q8 = q4 * q4, q16 = q8 * q8;
    double rest[5];
    double nu[5];
    int have_nu = 0;
    const int nd = c->nc + 1;
    for (int j = 0; j < nd; j++) {
        switch (c->degs[j]) {
        case 3: rest[j] = q4; break;
        case 5: rest[j] = q8; break;
        case 7: rest[j] = q8 * q4; break;
        case 9: rest[j] = q16; break;
        default: rest[j] = q16 * q8; break;
        }
    }
    const size_t nn = (size_t)n * n;
#define CX_T_UP(j) \
    cx_cdiv(cx_clog2((rest[j] * q2) * c->K[j]) + 2LL * c->degs[j] * e, 2LL * c->degs[j])
#define CX_T_EX(j) \
    cx_min(cx_cdiv(cx_clog2((nu[j] / mu) * c->K[j]) + 2LL * c->degs[j] * e, 2LL * c->degs[j]), \
           CX_T_UP(j))
#define CX_FETCH()                                                                       \
    do {                                                                                 \
        CX_S(abs_power_norms)(n, A, e, c, nu, wk, wk + nn, wk + 2 * nn, wk + 3 * nn,     \
                              wk + 3 * nn + n);                                          \
        have_nu = 1;                                                                     \
    } while (0)
    for (int j = 0; j < c->nc; j++) {
        if (!(N[c->qa[j]] <= c->ta[j] && N[c->qb[j]] <= c->tb[j])) continue;
        if (!have_nu && CX_T_UP(j) > 0) CX_FETCH();
        long long t = have_nu ? CX_T_EX(j) : CX_T_UP(j);
        if (t <= 0) {
            *m_out = c->degs[j];
            *s_out = 0;
            return;
        }
    }
    const int top = c->nc;
    long long s_top = cx_s_top(N[1], N[2], N[3], c);
    if (s_top > 0) {
        T *P = wk, *cs = wk + nn;
        CX_S(mm)(n, A4, A4, P);
        const double e8 = CX_S(norm1)(n, P, cs);
        CX_S(mm)(n, A4, A6, P);
        const double e10 = CX_S(norm1)(n, P, cs);
        s_top = cx_s_top(n6, e8, e10, c);
    }
    if (!have_nu && CX_T_UP(top) > s_top) CX_FETCH();
    long long t = have_nu ? CX_T_EX(top) : CX_T_UP(top);
    *m_out = c->degs[top];
    *s_out = (int)(s_top + cx_max(t - s_top, 0));
#undef CX_T_UP
#undef CX_T_EX
#undef CX_FETCH
}

/* LU with partial pivoting of Q (row-major, in place), unit lower L. */
CX_FI void CX_S(lu_impl)(int n, T *CX_RESTRICT Q, int *CX_RESTRICT piv) {
    for (int k = 0; k < n; k++) {
        int p = k;
        T best = Q[(size_t)k * n + k] < 0 ? -Q[(size_t)k * n + k] : Q[(size_t)k * n + k];
        for (int i = k + 1; i < n; i++) {
            const T v = Q[(size_t)i * n + k] < 0 ? -Q[(size_t)i * n + k] : Q[(size_t)i * n + k];
            if (v > best) {
                best = v;
                p = i;
            }
        }
        piv[k] = p;
        if (p != k) {
            T *r1 = Q + (size_t)k * n, *r2 = Q + (size_t)p * n;
            for (int j = 0; j < n; j++) {
                const T t = r1[j];
                r1[j] = r2[j];
                r2[j] = t;
            }
        }
        const T d = Q[(size_t)k * n + k];
        const T *rk = Q + (size_t)k * n;
        for (int i = k + 1; i < n; i++) {
            T *ri = Q + (size_t)i * n;
            const T l = ri[k] / d;
            ri[k] = l;
            for (int j = k + 1; j < n; j++) ri[j] -= l * rk[j];
        }
    }
}

CX_NOINL void CX_S(lu_rt)(int n, T *CX_RESTRICT Q, int *CX_RESTRICT piv) {
#define CX_CALL(N) CX_S(lu_impl)(N, Q, piv)
    CX_SIZES(CX_CALL)
#undef CX_CALL
}

CX_FI void CX_S(lu)(int n, T *CX_RESTRICT Q, int *CX_RESTRICT piv) {
    if (__builtin_constant_p(n))
        CX_S(lu_impl)(n, Q, piv);
    else
        CX_S(lu_rt)(n, Q, piv);
}

/* Solve Q X = Bm in place (Bm: n x n right-hand sides, row-major) from lu(). */
/* Columns j0 .. j0 + nv * W - 1 of the triangular solves, one row at a time held in explicit
 * vectors (the rows of Bm alias each other, so the compiler would otherwise reload and store
 * the row for every k). Per entry the same operations in the same order as the scalar loops. */
CX_FI void CX_S(lu_solve_cols)(int n, const T *CX_RESTRICT LU, T *CX_RESTRICT Bm, int j0, int nv) {
    typedef CX_S(vec) V;
    const int W = CX_VBYTES / (int)sizeof(T);
    V a[2];
    for (int i = 1; i < n; i++) {
        const T *li = LU + (size_t)i * n;
        for (int v = 0; v < nv; v++) a[v] = CX_S(vload)(Bm + (size_t)i * n + j0 + v * W);
        for (int k = 0; k < i; k++) {
            const T l = li[k];
            for (int v = 0; v < nv; v++)
                a[v] -= l * CX_S(vload)(Bm + (size_t)k * n + j0 + v * W);
        }
        for (int v = 0; v < nv; v++) CX_S(vstore)(Bm + (size_t)i * n + j0 + v * W, a[v]);
    }
    for (int i = n - 1; i >= 0; i--) {
        const T *ui = LU + (size_t)i * n;
        for (int v = 0; v < nv; v++) a[v] = CX_S(vload)(Bm + (size_t)i * n + j0 + v * W);
        for (int k = i + 1; k < n; k++) {
            const T u = ui[k];
            for (int v = 0; v < nv; v++)
                a[v] -= u * CX_S(vload)(Bm + (size_t)k * n + j0 + v * W);
        }
        const T d = ui[i];
        for (int v = 0; v < nv; v++) CX_S(vstore)(Bm + (size_t)i * n + j0 + v * W, a[v] / d);
    }
}

CX_FI void CX_S(lu_solve_impl)(int n, const T *CX_RESTRICT LU, const int *CX_RESTRICT piv,
                              T *CX_RESTRICT Bm) {
    for (int k = 0; k < n; k++) {
        const int p = piv[k];
        if (p != k) {
            T *r1 = Bm + (size_t)k * n, *r2 = Bm + (size_t)p * n;
            for (int j = 0; j < n; j++) {
                const T t = r1[j];
                r1[j] = r2[j];
                r2[j] = t;
            }
        }
    }
    const int W = CX_VBYTES / (int)sizeof(T);
    int j0 = 0;
    if (n >= 8) {
        for (; j0 + 2 * W <= n; j0 += 2 * W) CX_S(lu_solve_cols)(n, LU, Bm, j0, 2);
        if (j0 + W <= n) {
            CX_S(lu_solve_cols)(n, LU, Bm, j0, 1);
            j0 += W;
        }
    }
    if (j0 == n) return;
    for (int i = 1; i < n; i++) {
        T *bi = Bm + (size_t)i * n;
        const T *li = LU + (size_t)i * n;
        for (int k = 0; k < i; k++) {
            const T l = li[k];
            const T *bk = Bm + (size_t)k * n;
            for (int j = j0; j < n; j++) bi[j] -= l * bk[j];
        }
    }
    for (int i = n - 1; i >= 0; i--) {
        T *bi = Bm + (size_t)i * n;
        const T *ui = LU + (size_t)i * n;
        for (int k = i + 1; k < n; k++) {
            const T u = ui[k];
            const T *bk = Bm + (size_t)k * n;
            for (int j = j0; j < n; j++) bi[j] -= u * bk[j];
        }
        const T d = ui[i];
        for (int j = j0; j < n; j++) bi[j] /= d;
    }
}

CX_NOINL void CX_S(lu_solve_rt)(int n, const T *CX_RESTRICT LU, const int *CX_RESTRICT piv, T *CX_RESTRICT Bm) {
#define CX_CALL(N) CX_S(lu_solve_impl)(N, LU, piv, Bm)
    CX_SIZES(CX_CALL)
#undef CX_CALL
}

CX_FI void CX_S(lu_solve)(int n, const T *CX_RESTRICT LU, const int *CX_RESTRICT piv, T *CX_RESTRICT Bm) {
    if (__builtin_constant_p(n))
        CX_S(lu_solve_impl)(n, LU, piv, Bm);
    else
        CX_S(lu_solve_rt)(n, LU, piv, Bm);
}

/* Exact diagonal and superdiagonal of exp(scale As) for upper-triangular As. */
CX_FI void CX_S(fix_tri)(int n, T *CX_RESTRICT X, const T *CX_RESTRICT As, double scale) {
    for (int i = 0; i < n; i++) X[(size_t)i * n + i] = (T)exp((double)As[(size_t)i * n + i] * scale);
    for (int i = 0; i + 1 < n; i++) {
        const double lam = (double)As[(size_t)i * n + i] * scale;
        const double mu = (double)As[(size_t)(i + 1) * n + i + 1] * scale;
        const double t = (double)As[(size_t)i * n + i + 1] * scale;
        const double h = (mu - lam) / 2;
        double sup;
        if (t == 0) /* an exact zero stays one (0 * inf would be NaN when exp overflows) */
            sup = t;
        else if (fabs(h) < 1)
            sup = t * exp((lam + mu) / 2) * cx_sinhc(h);
        else
            sup = t * (exp(mu) - exp(lam)) / (mu - lam);
        X[(size_t)i * n + i + 1] = (T)sup;
    }
}

/* X[i,i] += b */
CX_FI void CX_S(add_diag)(int n, T *CX_RESTRICT X, T b) {
    for (int i = 0; i < n; i++) X[(size_t)i * n + i] += b;
}

/* Y = c0 P0 + c1 P1 + c2 P2 (+ c3 P3 when P3) elementwise. */
CX_FI void CX_S(comb)(int n, T *CX_RESTRICT Y, T c0, const T *P0, T c1, const T *P1, T c2,
                          const T *P2, T c3, const T *P3) {
    const int nn = n * n;
    if (P3) {
        for (int i = 0; i < nn; i++) Y[i] = c0 * P0[i] + c1 * P1[i] + c2 * P2[i] + c3 * P3[i];
    } else if (P2) {
        for (int i = 0; i < nn; i++) Y[i] = c0 * P0[i] + c1 * P1[i] + c2 * P2[i];
    } else if (P1) {
        for (int i = 0; i < nn; i++) Y[i] = c0 * P0[i] + c1 * P1[i];
    } else {
        for (int i = 0; i < nn; i++) Y[i] = c0 * P0[i];
    }
}

/* The non-identity terms of W = b1 I + b3 X2 + b5 X4 + b7 X6 + b9 X8 and V = b0 I + b2 X2 +
 * b4 X4 + b6 X6 + b8 X8 for degree m in {3, 5, 7, 9} (X4, X6, X8 read only when m needs them).
 * Called with the powers of A for U, V and with their directional derivatives for Lu, Lv. */
CX_FI void CX_S(pade_wv)(int n, int m, const double *b, T *W, T *V, const T *X2, const T *X4,
                             const T *X6, const T *X8) {
#define B_(k) ((T)b[k])
    if (m == 3) {
        CX_S(comb)(n, W, B_(3), X2, 0, NULL, 0, NULL, 0, NULL);
        CX_S(comb)(n, V, B_(2), X2, 0, NULL, 0, NULL, 0, NULL);
    } else if (m == 5) {
        CX_S(comb)(n, W, B_(5), X4, B_(3), X2, 0, NULL, 0, NULL);
        CX_S(comb)(n, V, B_(4), X4, B_(2), X2, 0, NULL, 0, NULL);
    } else if (m == 7) {
        CX_S(comb)(n, W, B_(7), X6, B_(5), X4, B_(3), X2, 0, NULL);
        CX_S(comb)(n, V, B_(6), X6, B_(4), X4, B_(2), X2, 0, NULL);
    } else {
        CX_S(comb)(n, W, B_(9), X8, B_(7), X6, B_(5), X4, B_(3), X2);
        CX_S(comb)(n, V, B_(8), X8, B_(6), X6, B_(4), X4, B_(2), X2);
    }
#undef B_
}

/* Padé quotient: from the scaled A, A2, A4, A6 (A8 built for m = 9 into slot A8) form U, V
 * (and with E != NULL also their derivatives in direction E, from M2, M4, M6, M8), factor
 * V - U and write R = (V - U)^{-1}(V + U) into R, and L into Lo. */
CX_FI void CX_S(pade)(int n, int m, const T *As, const T *A2, const T *A4, const T *A6,
                          T *A8, const T *Es, const T *M2, const T *M4, const T *M6, T *M8,
                          T *R, T *Lo, T *w, int *piv) {
    const size_t nn = (size_t)n * n;
    T *W = w, *V = w + nn, *U = w + 2 * nn, *T1 = w + 3 * nn, *T2 = w + 4 * nn;
    T *Lw = w + 5 * nn, *Lv = w + 6 * nn, *Lu = w + 7 * nn, *T3 = w + 8 * nn, *T4 = w + 9 * nn;
    const double *b = cx_pade_b(m);
#define B_(k) ((T)b[k])
    if (m == 13) {
        /* W1 -> T1, Z1 -> T2 ; W2 -> W, Z2 -> V ; then W = A6 W1 + W2, V = A6 Z1 + Z2 */
        CX_S(comb)(n, T1, B_(13), A6, B_(11), A4, B_(9), A2, 0, NULL);
        CX_S(comb)(n, T2, B_(12), A6, B_(10), A4, B_(8), A2, 0, NULL);
        CX_S(comb)(n, T3, B_(7), A6, B_(5), A4, B_(3), A2, 0, NULL);
        CX_S(add_diag)(n, T3, B_(1));
        CX_S(comb)(n, T4, B_(6), A6, B_(4), A4, B_(2), A2, 0, NULL);
        CX_S(add_diag)(n, T4, B_(0));
        CX_S(mm_add)(n, A6, T1, T3, W);
        CX_S(mm_add)(n, A6, T2, T4, V);
        if (Es) {
            /* Lw = A6 Lw1 + M6 W1 + Lw2 ; Lv = A6 Lz1 + M6 Z1 + Lz2 */
            T *Lw1 = U, *Lw2 = Lu;
            CX_S(comb)(n, Lw1, B_(13), M6, B_(11), M4, B_(9), M2, 0, NULL);
            CX_S(comb)(n, Lw2, B_(7), M6, B_(5), M4, B_(3), M2, 0, NULL);
            CX_S(mm2_add)(n, A6, Lw1, M6, T1, Lw2, Lw);
            CX_S(comb)(n, Lw1, B_(12), M6, B_(10), M4, B_(8), M2, 0, NULL);
            CX_S(comb)(n, Lw2, B_(6), M6, B_(4), M4, B_(2), M2, 0, NULL);
            CX_S(mm2_add)(n, A6, Lw1, M6, T2, Lw2, Lv);
        }
    } else {
        if (m == 9) {
            CX_S(mm)(n, A4, A4, A8);
            if (Es) CX_S(mm2_add)(n, A4, M4, M4, A4, NULL, M8);
        }
        /* W = b1 I + b3 A2 + b5 A4 + b7 A6 + b9 A8 ; V = b0 I + b2 A2 + ... */
        CX_S(pade_wv)(n, m, b, W, V, A2, A4, A6, A8);
        CX_S(add_diag)(n, W, B_(1));
        CX_S(add_diag)(n, V, B_(0));
        if (Es) CX_S(pade_wv)(n, m, b, Lw, Lv, M2, M4, M6, M8); /* their derivatives */
    }
#undef B_
    CX_S(mm)(n, As, W, U);
    if (Es) CX_S(mm2_add)(n, As, Lw, Es, W, NULL, Lu); /* Lu = A Lw + E W */
    /* Q = V - U (into T1), R = V + U */
    for (size_t i = 0; i < nn; i++) {
        T1[i] = V[i] - U[i];
        R[i] = V[i] + U[i];
    }
    CX_S(lu)(n, T1, piv);
    CX_S(lu_solve)(n, T1, piv, R);
    if (Es) {
        /* L = Q^{-1} (Lu + Lv + (Lu - Lv) R) */
        for (size_t i = 0; i < nn; i++) {
            T2[i] = Lu[i] - Lv[i];
            T3[i] = Lu[i] + Lv[i];
        }
        CX_S(mm_add)(n, T2, R, T3, Lo);
        CX_S(lu_solve)(n, T1, piv, Lo);
    }
}

/* Work slots (each n x n): 0 A (prescaled copy), 1 A2, 2 A4, 3 A6, 4 A8, 5 R, 6 tmp,
 * 7..16 Padé scratch, 17..21 decision scratch (the norms of |A|^p, A^8, A^10) or, in the
 * Fréchet derivative, E, M2, M4, M6, M8; 22 L; then column sums and the pivots. */

/* Powers, prescaling, non-finite check and decisions of one matrix. Returns 1 when A has
 * non-finite entries. On return slot 0..3 hold the prescaled A, A^2, A^4, A^6 (slot 0 is
 * only written when prescaled: *Ap points at the prescaled matrix). */
CX_FI int CX_S(decide_one)(int n, const T *A, T *wk, const cx_consts *c, const T **Ap,
                               int *m, int *s, int *s0, int *tri) {
    const size_t nn = (size_t)n * n;
    T *A0 = wk, *A2 = wk + nn, *A4 = wk + 2 * nn, *A6 = wk + 3 * nn;
    T *cs = wk + CX_SLOTS * nn;
    double nA = CX_S(norm1)(n, A, cs);
    *s0 = 0;
    *Ap = A;
    if (!(nA <= ldexp(1.0, c->prescale))) {
        if (!CX_S(all_finite)(n, A)) return 1;
        long long cl;
        if (isinf(nA)) { /* finite entries whose column sums overflow: measure them scaled */
            double mx = 0;
            for (size_t i = 0; i < nn; i++) {
                const double v = fabs((double)A[i]);
                if (v > mx) mx = v;
            }
            int ex;
            frexp(mx, &ex);
            CX_S(scale2_to)(n, A, A0, ex);
            cl = cx_clog2(CX_S(norm1)(n, A0, cs)) + ex;
        } else {
            cl = cx_clog2(nA);
        }
        *s0 = (int)(cl - c->prescale);
        CX_S(scale2_to)(n, A, A0, *s0);
        *Ap = A0;
        nA = CX_S(norm1)(n, A0, cs);
    }
    A = *Ap;
    *tri = CX_S(is_upper)(n, A);
    if (n == 1) { /* exp(a) directly; the degree/scaling only serve the backward pass */
        A2[0] = A[0] * A[0];
        A4[0] = A2[0] * A2[0];
        A6[0] = A4[0] * A2[0];
    } else {
        CX_S(mm)(n, A, A, A2);
        CX_S(mm)(n, A2, A2, A4);
        CX_S(mm)(n, A4, A2, A6);
    }
    const double n2 = CX_S(norm1)(n, A2, cs);
    const double n4 = CX_S(norm1)(n, A4, cs);
    const double n6 = CX_S(norm1)(n, A6, cs);
    CX_S(choose)(n, A, A4, A6, nA, n2, n4, n6, c, wk + 17 * nn, m, s);
    return 0;
}

CX_FI int CX_S(expm_one)(int n, const T *A, T *X, int *ms, T *wk, const cx_consts *c) {
    const size_t nn = (size_t)n * n;
    const T *Ap;
    int m, s, s0, tri;
    if (CX_S(decide_one)(n, A, wk, c, &Ap, &m, &s, &s0, &tri)) return 1;
    const int st = s + s0;
    if (ms) {
        ms[0] = m;
        ms[1] = st;
    }
    if (n == 1) {
        X[0] = (T)exp((double)A[0]);
        return (X[0] - X[0]) == 0 ? 0 : 1; /* overflow: reported as in the general case */
    }
    T *As = wk, *A2 = wk + nn, *A4 = wk + 2 * nn, *A6 = wk + 3 * nn, *A8 = wk + 4 * nn;
    T *R = wk + 5 * nn, *tmp = wk + 6 * nn;
    if (Ap != As) memcpy(As, Ap, sizeof(T) * nn);
    /* triangular after a symmetric permutation: the same approximant (r_m(P^T A P) =
     * P^T r_m(A) P; the norms, hence m and s, are permutation invariant) on P^T A P, which
     * gets the exact diagonal and superdiagonal; permuted back at the end */
    int p[CEXPM_N_MAX];
    const int perm = !tri && CX_S(tri_order)(n, As, p);
    if (perm) {
        CX_S(permute)(n, p, As, tmp);
        CX_S(permute)(n, p, A2, tmp);
        CX_S(permute)(n, p, A4, tmp);
        CX_S(permute)(n, p, A6, tmp);
    }
    const int up = tri || perm;
    if (s > 0) {
        CX_S(scale2)(n, As, s);
        CX_S(scale2)(n, A2, 2LL * s);
        CX_S(scale2)(n, A4, 4LL * s);
        CX_S(scale2)(n, A6, 6LL * s);
    }
    int *piv = (int *)(wk + CX_SLOTS * nn + 2 * (size_t)n + 8);
    CX_S(pade)(n, m, As, A2, A4, A6, A8, NULL, NULL, NULL, NULL, NULL, R, NULL, wk + 7 * nn,
               piv);
    if (up) CX_S(fix_tri)(n, R, As, 1.0);
    for (int k = 0; k < st; k++) {
        T *out = (k == st - 1) ? X : tmp;
        CX_S(mm)(n, R, R, out);
        if (up) CX_S(fix_tri)(n, out, As, ldexp(1.0, k + 1));
        if (out == tmp) {
            T *t = R;
            R = tmp;
            tmp = t;
        }
    }
    if (st == 0) memcpy(X, R, sizeof(T) * nn);
    if (perm) {
        memcpy(tmp, X, sizeof(T) * nn);
        CX_S(unpermute_to)(n, p, tmp, X);
    }
    /* a finite A whose exponential overflows the dtype: reported like a non-finite A (the
     * caller tells the two apart by checking A) instead of returning inf/NaN */
    return CX_S(all_finite)(n, X) ? 0 : 1;
}

/* Fréchet derivative L(A, E) (L(A^T, E) with transA) of one matrix with degree m and total
 * squarings st (applied to the unprescaled A). X may be NULL. */
CX_FI void CX_S(frechet_one)(int n, const T *A, const T *E, T *X, T *L, int m, int st,
                                 int transA, T *wk) {
    const size_t nn = (size_t)n * n;
    if (n == 1) {
        const T ex = (T)exp((double)A[0]);
        if (X) X[0] = ex;
        L[0] = ex * E[0];
        return;
    }
    T *As = wk, *A2 = wk + nn, *A4 = wk + 2 * nn, *A6 = wk + 3 * nn, *A8 = wk + 4 * nn;
    T *R = wk + 5 * nn, *tmp = wk + 6 * nn;
    T *Es = wk + 17 * nn, *M2 = wk + 18 * nn, *M4 = wk + 19 * nn, *M6 = wk + 20 * nn,
      *M8 = wk + 21 * nn;
    T *Lc = wk + 22 * nn;
    int *piv = (int *)(wk + CX_SLOTS * nn + 2 * (size_t)n + 8);
    if (transA) { /* L(A^T, E) from A as stored */
        for (int i = 0; i < n; i++)
            for (int j = 0; j < n; j++) As[(size_t)i * n + j] = A[(size_t)j * n + i];
    } else {
        memcpy(As, A, sizeof(T) * nn);
    }
    /* triangular after a symmetric permutation: L(A, E) = P L(P^T A P, P^T E P) P^T */
    int p[CEXPM_N_MAX];
    const int upper = CX_S(is_upper)(n, As);
    const int perm = !upper && CX_S(tri_order)(n, As, p);
    const int tri = upper || perm;
    if (perm) CX_S(permute)(n, p, As, tmp);
    CX_S(scale2)(n, As, st);
    CX_S(scale2_to)(n, E, Es, st);
    if (perm) CX_S(permute)(n, p, Es, tmp);
    CX_S(mm)(n, As, As, A2);
    CX_S(mm2_add)(n, As, Es, Es, As, NULL, M2);
    CX_S(mm)(n, A2, A2, A4);
    CX_S(mm2_add)(n, A2, M2, M2, A2, NULL, M4);
    CX_S(mm)(n, A4, A2, A6);
    CX_S(mm2_add)(n, A4, M2, M4, A2, NULL, M6);
    CX_S(pade)(n, m, As, A2, A4, A6, A8, Es, M2, M4, M6, M8, R, Lc, wk + 7 * nn, piv);
    if (tri) CX_S(fix_tri)(n, R, As, 1.0);
    T *Lt = A2; /* A2.. no longer needed */
    for (int k = 0; k < st; k++) {
        /* L <- R L + L R ; R <- R R */
        CX_S(mm2_add)(n, R, Lc, Lc, R, NULL, Lt);
        T *t = Lc;
        Lc = Lt;
        Lt = t;
        CX_S(mm)(n, R, R, tmp);
        if (tri) CX_S(fix_tri)(n, tmp, As, ldexp(1.0, k + 1));
        t = R;
        R = tmp;
        tmp = t;
    }
    if (perm) {
        CX_S(unpermute_to)(n, p, Lc, L);
        if (X) CX_S(unpermute_to)(n, p, R, X);
    } else {
        memcpy(L, Lc, sizeof(T) * nn);
        if (X) memcpy(X, R, sizeof(T) * nn);
    }
}

/* ---- batch entry points, with compile-time sizes for small n */
#define CX_DEF_EXPM_N(NN)                                                                   \
    CX_FI long long CX_S(expm_loop_##NN)(const T *A, T *X, int32_t *ms, Py_ssize_t B,     \
                                          int n, T *wk) {                                   \
        const cx_consts *c = sizeof(T) == 8 ? &CX_C64 : &CX_C32;                            \
        const int nv = NN > 0 ? NN : n;                                                     \
        const size_t nn = (size_t)nv * nv;                                                  \
        int msb[2];                                                                         \
        for (Py_ssize_t b = 0; b < B; b++) {                                                \
            if (CX_S(expm_one)(nv, A + b * nn, X + b * nn, ms ? msb : NULL, wk, c))         \
                return b;                                                                   \
            if (ms) {                                                                       \
                ms[2 * b] = msb[0];                                                         \
                ms[2 * b + 1] = msb[1];                                                     \
            }                                                                               \
        }                                                                                   \
        return -1;                                                                          \
    }                                                                                       \
    CX_FI long long CX_S(frechet_loop_##NN)(const T *A, const T *E, T *X, T *L,           \
                                             int32_t *ms, Py_ssize_t B, int n, int given,   \
                                             T *wk) {                                       \
        const cx_consts *c = sizeof(T) == 8 ? &CX_C64 : &CX_C32;                            \
        const int nv = NN > 0 ? NN : n;                                                     \
        const size_t nn = (size_t)nv * nv;                                                  \
        for (Py_ssize_t b = 0; b < B; b++) {                                                \
            int m, st;                                                                      \
            if (given & 1) {                                                                \
                m = ms[2 * b];                                                              \
                st = ms[2 * b + 1];                                                         \
            } else {                                                                        \
                const T *Ap;                                                                \
                int s, s0, tri;                                                             \
                if (CX_S(decide_one)(nv, A + b * nn, wk, c, &Ap, &m, &s, &s0, &tri))        \
                    return b;                                                               \
                st = s + s0;                                                                \
                if (ms) {                                                                   \
                    ms[2 * b] = m;                                                          \
                    ms[2 * b + 1] = st;                                                     \
                }                                                                           \
            }                                                                               \
            CX_S(frechet_one)(nv, A + b * nn, E + b * nn, X ? X + b * nn : NULL, L + b * nn, \
                              m, st, (given & 2) != 0, wk);                                 \
            /* forward (not the backward pass): an overflowing exp(A) or L(A, E) is reported */ \
            if (!(given & 1) && ((X && !CX_S(all_finite)(nv, X + b * nn)) ||                \
                                 !CX_S(all_finite)(nv, L + b * nn)))                        \
                return b;                                                                   \
        }                                                                                   \
        return -1;                                                                          \
    }

CX_DEF_EXPM_N(0)
CX_DEF_EXPM_N(2)
CX_DEF_EXPM_N(3)
CX_DEF_EXPM_N(4)
#undef CX_DEF_EXPM_N

CX_FN long long CX_S(expm_batch)(void *A, void *X, void *ms, Py_ssize_t B, int n) {
    T *wk = (T *)malloc(sizeof(T) * cx_work_elems(n) + 64);
    long long r;
    if (!wk) return -2;
    switch (n) {
    case 2: r = CX_S(expm_loop_2)(A, X, ms, B, n, wk); break;
    case 3: r = CX_S(expm_loop_3)(A, X, ms, B, n, wk); break;
    case 4: r = CX_S(expm_loop_4)(A, X, ms, B, n, wk); break;
    default: r = CX_S(expm_loop_0)(A, X, ms, B, n, wk); break;
    }
    free(wk);
    return r;
}

CX_FN long long CX_S(frechet_batch)(void *A, void *E, void *X, void *L, void *ms,
                                               Py_ssize_t B, int n, int given) {
    T *wk = (T *)malloc(sizeof(T) * cx_work_elems(n) + 64);
    long long r;
    if (!wk) return -2;
    switch (n) {
    case 2: r = CX_S(frechet_loop_2)(A, E, X, L, ms, B, n, given, wk); break;
    case 3: r = CX_S(frechet_loop_3)(A, E, X, L, ms, B, n, given, wk); break;
    case 4: r = CX_S(frechet_loop_4)(A, E, X, L, ms, B, n, given, wk); break;
    default: r = CX_S(frechet_loop_0)(A, E, X, L, ms, B, n, given, wk); break;
    }
    free(wk);
    return r;
}

#undef T
#endif /* CEXPM_BODY */
