/* The Tucker generator's factors (_ctucker.c), called from _cfused.c's module. */
#ifndef LIEGROUP_CTUCKER_H
#define LIEGROUP_CTUCKER_H
#include <stddef.h>

#define CT_MAX_MODES 8

/* a core (r[0], …, r[N−1]) and factors U[m] (n[m], r[m]), 2 <= N <= CT_MAX_MODES,
 * 1 <= r[m] <= n[m] for m >= 2, all C-contiguous float32 */
typedef struct {
    int N;
    int n[CT_MAX_MODES], r[CT_MAX_MODES];
    const float *core;
    const float *U[CT_MAX_MODES];
} ct_shape;

/* K = n[2]⋯n[N−1]: R is (r[0], n[1]·K) */
static inline size_t ct_kernel_size(const ct_shape *sh) {
    size_t K = 1;
    for (int m = 2; m < sh->N; m++) K *= (size_t)sh->n[m];
    return K;
}

/* Kr = r[2]⋯r[N−1]: the core is (r[0]·r[1], Kr) */
static inline size_t ct_kernel_rank(const ct_shape *sh) {
    size_t K = 1;
    for (int m = 2; m < sh->N; m++) K *= (size_t)sh->r[m];
    return K;
}

/* L = s·U[0] (n[0], r[0]), R = unfold₀(core ×₁ U[1] ⋯) (r[0], n[1]·K); 0, or -1 (no memory) */
int ct_forward(const ct_shape *sh, float s, float *L, float *R);

/* gU[0] = s·gL, and gU[1..N), gcore from gR (all outputs overwritten); 0, or -1 (no memory) */
int ct_backward(const ct_shape *sh, float s, const float *gL, const float *gR, float *gcore,
                float *const *gU);
#endif
