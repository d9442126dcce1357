/*
 * Compiled factors of LieRA's Tucker generator and their gradients (float32, CPU).
 *
 * The generator's weight update is ΔW = s·(G ×₀ U₀ ×₁ U₁ ⋯ ×_{N−1} U_{N−1}) for a core G of
 * shape (r₀, …, r_{N−1}) and factors U_m (n_m, r_m); the fused layer takes it as the low-rank
 * pair
 *
 *   L = s·U₀                                   (n₀, r₀)
 *   R = unfold₀(G ×₁ U₁ ×₂ U₂ ⋯ ×_{N−1} U_{N−1})   (r₀, n₁·K),  K = n₂⋯n_{N−1}
 *
 * computed here as S = G ×₂ U₂ ⋯ ×_{N−1} U_{N−1} (the kernel modes, small: r₀·r₁·K entries)
 * with Kron = U₂ ⊗ ⋯ ⊗ U_{N−1} (S = G·Kronᵀ, G as (r₀r₁, r₂⋯r_{N−1})),
 * and R[a, c, k] = Σ_b U₁[c, b] S[a, b, k], the only product whose size grows with the
 * weight (r₀·r₁·n₁·K multiply-adds). Its loops run along c, contiguous in U₁ᵀ, in vectors;
 * on x86-64 Linux with gcc or clang they are compiled for AVX-512, AVX2 and the baseline
 * (target_clones, chosen by the loader). The backward forms, from ∂L/∂L and ∂L/∂R,
 *
 *   ∂U₀ = s·∂L,   ∂U₁[c, b] = Σ_{a,k} ∂R[a, c, k] S[a, b, k],   ∂S[a, b, k] = Σ_c U₁[c, b] ∂R[a, c, k],
 *   ∂G = ∂S · Kron,   ∂Kron = ∂Sᵀ · G,   ∂U_m[k_m, j_m] = Σ ∂Kron[k, j] Π_{m'≠m} U_m'[k_m', j_m'],
 *
 * where torch's autograd runs some twenty small ops (kron, linear, a broadcast matmul and
 * their backward nodes) whose dispatch, not their arithmetic, dominates a 3×3 conv layer's
 * step. Here: S by one product with the kernel modes' Kronecker
 * factor (as the torch formulation's kron + linear), then blocked products of four rows by
 * sixteen columns in registers (with transposes between the (a, c, k) layout of R and the
 * (a, k, c) one the products run in). Every sum runs in a fixed order:
 * the results are deterministic and agree with the torch ops to float32 rounding.
 *
 * Called from _cfused.c's module (its Python functions tucker and tucker_grads); all arrays
 * are C-contiguous float32.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "_ctucker.h"

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define CT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CT_CLONES
#endif

/* sixteen floats: one AVX-512 register, two AVX2 or four SSE ones, as the clone has them */
typedef float ct_v __attribute__((vector_size(64)));

static inline ct_v ct_ld(const float *p) {
    ct_v v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void ct_st(float *p, ct_v v) { memcpy(p, &v, sizeof v); }

/* Rows i..i+q of C (q ≤ 4) at the sixteen columns c.. of B, whose row stride is ldb: every
 * entry is Σ_p A[i, p]·B[p, c] summed in order p = 0.. */
static inline void ct_block4(const float *const a[4], size_t P, const float *B, size_t ldb,
                             ct_v acc[4]) {
    for (int t = 0; t < 4; t++) acc[t] = (ct_v){0};
    for (size_t p = 0; p < P; p++) {
        const ct_v b = ct_ld(B + p * ldb);
        for (int t = 0; t < 4; t++) acc[t] += a[t][p] * b;
    }
}

/* C = A·B for A (M × P), B (P × n), C (M × n), all row-major: four rows of C and sixteen
 * columns at a time in registers, the last n mod 16 columns from a zero-padded copy of B's.
 * Returns 0, or -1 when the copy could not be allocated. */
CT_CLONES static int ct_gemm_nn(size_t M, size_t P, size_t n, const float *A, const float *B,
                                float *C) {
    const size_t nv = n - n % 16, tail = n - nv;
    float *Bt = NULL;
    if (tail) {
        Bt = calloc(P * 16, sizeof(float));
        if (!Bt) return -1;
        for (size_t p = 0; p < P; p++) memcpy(Bt + p * 16, B + p * n + nv, sizeof(float) * tail);
    }
    for (size_t i = 0; i < M; i += 4) {
        const size_t q = M - i < 4 ? M - i : 4;
        const float *a[4];
        ct_v acc[4];
        for (size_t t = 0; t < 4; t++) a[t] = A + (i + (t < q ? t : 0)) * P; /* pad: row i */
        for (size_t c = 0; c < nv; c += 16) {
            ct_block4(a, P, B + c, n, acc);
            for (size_t t = 0; t < q; t++) ct_st(C + (i + t) * n + c, acc[t]);
        }
        if (tail) {
            ct_block4(a, P, Bt, 16, acc);
            for (size_t t = 0; t < q; t++) memcpy(C + (i + t) * n + nv, &acc[t], sizeof(float) * tail);
        }
    }
    free(Bt);
    return 0;
}

/* C = A·Bᵀ for A (M × n), B (N × n), C (M × N): C[i, j] = Σ_c A[i, c]·B[j, c], as sixteen
 * partial sums over the columns (added in a fixed order), four j at a time. */
CT_CLONES static void ct_gemm_nt(size_t M, size_t N, size_t n, const float *A, const float *B,
                                 float *C) {
    const size_t nv = n - n % 16;
    for (size_t i = 0; i < M; i++) {
        const float *ai = A + i * n;
        for (size_t j = 0; j < N; j += 4) {
            const size_t q = N - j < 4 ? N - j : 4;
            const float *b[4];
            for (size_t t = 0; t < 4; t++) b[t] = B + (j + (t < q ? t : 0)) * n;
            ct_v acc[4] = {{0}};
            for (size_t c = 0; c < nv; c += 16) {
                const ct_v x = ct_ld(ai + c);
                for (int t = 0; t < 4; t++) acc[t] += x * ct_ld(b[t] + c);
            }
            for (size_t t = 0; t < q; t++) {
                float s = 0.0f;
                for (int l = 0; l < 16; l++) s += acc[t][l];
                for (size_t c = nv; c < n; c++) s += ai[c] * b[t][c];
                C[i * N + j + t] = s;
            }
        }
    }
}

/* dst (cols × rows) = srcᵀ for src (rows × cols); `count` such matrices one after another */
static void ct_transpose(const float *src, float *dst, size_t count, size_t rows, size_t cols) {
    for (size_t m = 0; m < count; m++, src += rows * cols, dst += rows * cols)
        for (size_t i = 0; i < rows; i++)
            for (size_t j = 0; j < cols; j++) dst[j * rows + i] = src[i * cols + j];
}

/* Digits of the kernel multi-indices: kd[k·(N−2) + m − 2] = k_m for k < K (sizes n), and jd
 * likewise for j < Kr (sizes r); row-major over the modes 2..N−1. */
static void ct_digits(const ct_shape *sh, const int *size, size_t count, int *d) {
    const int nm = sh->N - 2;
    for (size_t k = 0; k < count; k++) {
        size_t kk = k;
        for (int m = sh->N - 1; m >= 2; m--) {
            d[k * nm + m - 2] = (int)(kk % (size_t)size[m]);
            kk /= (size_t)size[m];
        }
    }
}

/* The kernel modes' Kronecker product Kron[k, j] = Π_{m≥2} U_m[k_m, j_m] (K × Kr), in the
 * torch formulation's order (kron(U₂, U₃) first, then ⊗ U₄, ...), and its transpose. */
static void ct_kron(const ct_shape *sh, size_t K, size_t Kr, const int *kd, const int *jd,
                    float *Kron, float *KronT) {
    const int nm = sh->N - 2;
    for (size_t k = 0; k < K; k++)
        for (size_t j = 0; j < Kr; j++) {
            float v = 1.0f; /* 1·U₂ is exact: then the same products as kron(kron(U₂, U₃), …) */
            for (int m = 2; m < sh->N; m++)
                v *= sh->U[m][(size_t)kd[k * nm + m - 2] * sh->r[m] + jd[j * nm + m - 2]];
            Kron[k * Kr + j] = KronT[j * K + k] = v;
        }
}

/* Scratch of one call: S = core ×₂ U₂ ⋯ (r₀r₁ × K) and its layouts, the Kronecker factors. */
typedef struct {
    size_t K, Kr, rows, n1;
    float *S, *S2, *Kron, *KronT, *U1t;
    int *kd, *jd;
} ct_work;

/* Allocate `extra` more floats after the common part (returned in *more); 0, or -1. */
static int ct_setup(const ct_shape *sh, ct_work *w, size_t extra, float **more, void **mem) {
    const int nm = sh->N - 2, r1 = sh->r[1];
    w->K = ct_kernel_size(sh);
    w->Kr = ct_kernel_rank(sh);
    w->rows = (size_t)sh->r[0] * r1;
    w->n1 = (size_t)sh->n[1];
    const size_t rs = w->rows * w->K, kk = w->K * w->Kr;
    const size_t nf = 2 * rs + 2 * kk + (size_t)r1 * w->n1 + extra;
    const size_t ni = (w->K + w->Kr) * (size_t)(nm > 0 ? nm : 1);
    float *buf = malloc(sizeof(float) * nf + sizeof(int) * ni);
    if (!buf) return -1;
    *mem = buf;
    w->S = buf;
    w->S2 = w->S + rs;
    w->Kron = w->S2 + rs;
    w->KronT = w->Kron + kk;
    w->U1t = w->KronT + kk;
    *more = w->U1t + (size_t)r1 * w->n1;
    w->kd = (int *)(buf + nf);
    w->jd = w->kd + w->K * (size_t)nm;
    ct_digits(sh, sh->n, w->K, w->kd);
    ct_digits(sh, sh->r, w->Kr, w->jd);
    ct_kron(sh, w->K, w->Kr, w->kd, w->jd, w->Kron, w->KronT);
    /* S = core (r₀r₁ × Kr) · Kronᵀ, as the torch formulation's kron + linear; S2 = S as
     * (r₀, K, r₁): row (a, k) holds S[a, :, k] */
    if (ct_gemm_nn(w->rows, w->Kr, w->K, sh->core, w->KronT, w->S)) {
        free(buf);
        return -1;
    }
    ct_transpose(w->S, w->S2, (size_t)sh->r[0], (size_t)r1, w->K);
    ct_transpose(sh->U[1], w->U1t, 1, w->n1, (size_t)r1);
    return 0;
}

int ct_forward(const ct_shape *sh, float s, float *L, float *R) {
    ct_work w;
    float *Rt;
    void *mem;
    const size_t r0 = (size_t)sh->r[0];
    if (ct_setup(sh, &w, r0 * (size_t)sh->n[1] * ct_kernel_size(sh), &Rt, &mem)) return -1;
    /* Rt (r₀K × n₁) = S2 (r₀K × r₁) · U₁ᵀ, then R[a] (n₁ × K) = Rt[a]ᵀ */
    int rc = ct_gemm_nn(r0 * w.K, (size_t)sh->r[1], w.n1, w.S2, w.U1t, w.K == 1 ? R : Rt);
    if (w.K > 1) ct_transpose(Rt, R, r0, w.K, w.n1);
    const size_t nl = (size_t)sh->n[0] * r0;
    for (size_t i = 0; i < nl; i++) L[i] = s * sh->U[0][i];
    free(mem);
    return rc;
}

int ct_backward(const ct_shape *sh, float s, const float *gL, const float *gR, float *gcore,
                float *const *gU) {
    ct_work w;
    float *more;
    void *mem;
    const int N = sh->N;
    const size_t r0 = (size_t)sh->r[0], r1 = (size_t)sh->r[1], K = ct_kernel_size(sh);
    const size_t rk = r0 * K * r1, kk = K * ct_kernel_rank(sh);
    /* ∂Rt (r₀K × n₁), S2ᵀ, ∂S2, ∂S, ∂Sᵀ, ∂U₁ᵀ, ∂Kron */
    const size_t extra = r0 * K * sh->n[1] + 4 * rk + r1 * sh->n[1] + kk;
    if (ct_setup(sh, &w, extra, &more, &mem)) return -1;
    float *gRt = more, *S2t = gRt + r0 * K * w.n1, *gS2 = S2t + rk, *gS = gS2 + rk;
    float *gSt = gS + rk, *gU1t = gSt + rk, *gKron = gU1t + r1 * w.n1;

    const size_t nl = (size_t)sh->n[0] * r0;
    for (size_t i = 0; i < nl; i++) gU[0][i] = s * gL[i];

    /* ∂Rt[(a, k), c] = ∂R[a, c, k]; ∂U₁ᵀ (r₁ × n₁) = S2ᵀ · ∂Rt; ∂S2 (r₀K × r₁) = ∂Rt · U₁ */
    const float *gRt_ = gR;
    if (K > 1) {
        ct_transpose(gR, gRt, r0, w.n1, K);
        gRt_ = gRt;
    }
    ct_transpose(w.S2, S2t, 1, r0 * K, r1);
    int rc = ct_gemm_nn(r1, r0 * K, w.n1, S2t, gRt_, gU1t);
    ct_transpose(gU1t, gU[1], 1, r1, w.n1);
    ct_gemm_nt(r0 * K, r1, w.n1, gRt_, w.U1t, gS2);
    ct_transpose(gS2, gS, r0, K, r1); /* ∂S (r₀r₁ × K) */

    /* ∂core = ∂S · Kron (r₀r₁ × Kr); ∂Kron = ∂Sᵀ · core (K × Kr) */
    rc |= ct_gemm_nn(w.rows, K, w.Kr, gS, w.Kron, gcore);
    ct_transpose(gS, gSt, 1, w.rows, K);
    rc |= ct_gemm_nn(K, w.rows, w.Kr, gSt, sh->core, gKron);

    /* ∂U_m[k_m, j_m] += ∂Kron[k, j]·Π_{m' ≠ m} U_m'[k_m', j_m'] */
    const int nm = N - 2;
    for (int m = 2; m < N; m++) memset(gU[m], 0, sizeof(float) * sh->n[m] * sh->r[m]);
    for (size_t k = 0; k < K; k++)
        for (size_t j = 0; j < w.Kr; j++) {
            float u[CT_MAX_MODES];
            size_t idx[CT_MAX_MODES];
            for (int m = 2; m < N; m++) {
                idx[m] = (size_t)w.kd[k * nm + m - 2] * sh->r[m] + w.jd[j * nm + m - 2];
                u[m] = sh->U[m][idx[m]];
            }
            const float g = gKron[k * w.Kr + j];
            for (int m = 2; m < N; m++) {
                float v = g;
                for (int q = 2; q < N; q++)
                    if (q != m) v *= u[q];
                gU[m][idx[m]] += v;
            }
        }
    free(mem);
    return rc ? -1 : 0;
}
