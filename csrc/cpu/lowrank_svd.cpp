// CPU kernel of the batched randomised low-rank SVD (docs/ops/lowrank_svd.md).
// The panels are kept transposed (q x d, q x n; row-major), so every product
// with A is a short-wide BLAS product (Yt = Zt A^T, Wt = Yt A), the shape MKL runs
// near its square-matrix rate. The products call BLAS on raw pointers (no
// tensors, no dispatcher) and each thread owns plain buffers allocated once, so
// the per-matrix overhead is the q x q work: Cholesky in double and an odd-even
// Jacobi eigensolver in A's dtype whose steps are vectorised row passes.
// OpenMP over the batch with single-threaded BLAS inside when the batch fills
// the threads, else threaded BLAS on one matrix at a time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "lowrank_svd.h"

// The Fortran BLAS that ATen itself calls (MKL, linked into libtorch_cpu; 32-bit
// integers). Declared weak: a torch build that does not export them leaves them
// null, and the products then go through at::mm_out instead.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace modalimmune {
namespace {

// One BLAS product in column-major Fortran terms; false when this BLAS is absent.
inline bool fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                         const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                         const int* ldc) {
  if (sgemm_ == nullptr) return false;
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  return true;
}
inline bool fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                         const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                         const double* beta, double* c, const int* ldc) {
  if (dgemm_ == nullptr) return false;
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  return true;
}

// Row-major C (m x n) = alpha op(A) op(B) + beta C, with op(X) = X^T when the flag is set;
// a, b, c are row-major with leading dimensions lda, ldb, ldc. BLAS is column-major, so it
// computes C^T = alpha op(B)^T op(A)^T + beta C^T.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
          int64_t ldb, T* c, int64_t ldc, T alpha = 1, T beta = 0) {
  const int mm = static_cast<int>(n), nn = static_cast<int>(m), kk = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  if (fortran_gemm(trans_b ? "T" : "N", trans_a ? "T" : "N", &mm, &nn, &kk, &alpha, b, &la, a, &lb, &beta, c, &lc))
    return;
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    const at::Tensor t = at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, options);
    return trans ? t.t() : t;
  };
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  const at::Tensor lhs = view(a, trans_a ? k : m, trans_a ? m : k, lda, trans_a);
  const at::Tensor rhs = view(b, trans_b ? n : k, trans_b ? k : n, ldb, trans_b);
  if (alpha == T(1) && beta == T(0))
    at::mm_out(out, lhs, rhs);
  else
    out.addmm_(lhs, rhs, beta, alpha);
}

// One thread's buffers, allocated once: panels Zt, Wt (q x d), Yt (q x n), the completions'
// columns (q x max(n, d)), the q x q matrices, the Ritz vectors (q x k) and the Jacobi step's
// 2 x 2 transforms.
template <typename T>
struct Workspace {
  int64_t n, d, q, k;
  std::vector<T> zt, wt, yt, basis, gram, inv, vt, eig, eig_scaled, coef;
  std::vector<T> coef_a, coef_b, coef_c, coef_d, diag_first, diag_second;  // one entry per pair
  std::vector<double> chol, chol_inv, vals;
  std::vector<int64_t> order;
  Workspace(int64_t n, int64_t d, int64_t q, int64_t k)
      : n(n), d(d), q(q), k(k), zt(q * d), wt(q * d), yt(q * n), basis(q * std::max(n, d)), gram(q * q),
        inv(q * q), vt(q * q), eig(q * k), eig_scaled(q * k), coef(q * q), coef_a(q / 2 + 1), coef_b(q / 2 + 1),
        coef_c(q / 2 + 1), coef_d(q / 2 + 1), diag_first(q / 2 + 1), diag_second(q / 2 + 1), chol(q * q),
        chol_inv(q * q), vals(k), order(q) {}
};

// out = R^{-T} X for the q x m panel X (q <= ws.q rows), with R^T R = X X^T + tau I,
// tau = eps tr(X X^T) + tiny: one shifted CholeskyQR step on X^T
// (docs/ops/lowrank_svd.md, "Orthonormalisation"). R and R^{-1} in double, both
// row by row as vectorised axpys; R^{-1} is applied (transposed) by BLAS in T.
template <typename T>
void cholqr_step(const T* x, int64_t q, int64_t m, T* out, Workspace<T>& ws) {
  gemm<T>(false, true, q, q, m, x, m, x, m, ws.gram.data(), q);
  double* r = ws.chol.data();  // upper factor, row-major; only j >= i is used
  double trace = 0.0;
  for (int64_t c = 0; c < q; ++c) trace += ws.gram[c * q + c];
  const double tau = std::numeric_limits<T>::epsilon() * trace + std::numeric_limits<T>::min();
  for (int64_t i = 0; i < q; ++i)
    for (int64_t j = i; j < q; ++j) r[i * q + j] = ws.gram[i * q + j] + (i == j ? tau : 0.0);
  for (int64_t c = 0; c < q; ++c) {  // right-looking: row c of R, then the trailing rows
    double* rc = r + c * q;
    const double diag = std::sqrt(std::max(rc[c], tau)), inv_diag = 1.0 / diag;
    // loops start where the previous writes to the row started: the vector loads then
    // line up with the stores they follow (no store-forwarding stalls)
    for (int64_t j = c; j < q; ++j) rc[j] *= inv_diag;
    rc[c] = diag;
    for (int64_t i = c + 1; i < q; ++i) {
      const double f = rc[i];
      double* ri = r + i * q;
#pragma omp simd
      for (int64_t j = i; j < q; ++j) ri[j] -= f * rc[j];
    }
  }
  // R^{-1} (upper) from the bottom row up: row i = (e_i - sum_{l>i} R[i][l] row l) / R[i][i]
  // (whole rows: the rows below are zero left of their diagonal)
  double* rinv = ws.chol_inv.data();
  for (int64_t i = q - 1; i >= 0; --i) {
    const double* ri = r + i * q;
    double* row = rinv + i * q;
    std::fill(row, row + q, 0.0);
    row[i] = 1.0;
    for (int64_t l = i + 1; l < q; ++l) {
      const double f = ri[l];
      const double* below = rinv + l * q;
#pragma omp simd
      for (int64_t j = 0; j < q; ++j) row[j] -= f * below[j];
    }
    const double inv_diag = 1.0 / ri[i];
    for (int64_t j = 0; j < q; ++j) row[j] *= inv_diag;
  }
  T* inv = ws.inv.data();
  for (int64_t i = 0; i < q * q; ++i) inv[i] = static_cast<T>(rinv[i]);
  gemm<T>(true, false, q, m, q, inv, q, x, m, out, m);
}

// Zt <- orth(Wt) (CholeskyQR2); Wt is overwritten.
template <typename T>
void orthonormalize(Workspace<T>& ws) {
  cholqr_step<T>(ws.wt.data(), ws.q, ws.d, ws.zt.data(), ws);
  cholqr_step<T>(ws.zt.data(), ws.q, ws.d, ws.wt.data(), ws);
  std::swap(ws.zt, ws.wt);
}

// Rows x, y <- a x + b y, c x + d y.
template <typename T>
inline void transform_rows(T* __restrict__ x, T* __restrict__ y, int64_t len, T a, T b, T c, T d) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const T u = x[j], w = y[j];
    x[j] = a * u + b * w;
    y[j] = c * u + d * w;
  }
}

// Adjacent entries v[2i], v[2i+1] <- a_i v[2i] + b_i v[2i+1], c_i v[2i] + d_i v[2i+1].
template <typename T>
inline void transform_pairs(T* __restrict__ v, int64_t pairs, const T* __restrict__ a, const T* __restrict__ b,
                            const T* __restrict__ c, const T* __restrict__ d) {
#pragma omp simd
  for (int64_t i = 0; i < pairs; ++i) {
    const T u = v[2 * i], w = v[2 * i + 1];
    v[2 * i] = a[i] * u + b[i] * w;
    v[2 * i + 1] = c[i] * u + d[i] * w;
  }
}

// Jacobi eigensolver on the symmetric q x q matrix ws.gram (destroyed), in T:
// the Gram matrix it diagonalises was formed in T, so T's precision is what it
// holds. Parallel odd-even ordering (docs/ops/lowrank_svd.md, "CPU kernel"):
// step s rotates the disjoint adjacent pairs (p, p + 1), p = s mod 2, s mod 2 + 2, ...,
// each rotation followed by a swap of p and p + 1, so that in q steps every pair of
// indices meets once (an odd-even transposition sort of the reversed order). Each
// step is then G <- J^T G J with J block diagonal on adjacent positions: contiguous
// row updates and one vectorised pass over each row, no transposes. Sweeps until the
// off-diagonal norm is below eps ||G||_F or no rotation is left to do. Writes the
// first k eigenvalues descending to ws.vals and their eigenvectors as the columns
// of ws.eig (q x k), each with its largest-magnitude entry positive (the sign
// convention of every backend).
template <typename T>
void jacobi_eig(Workspace<T>& ws) {
  const int64_t q = ws.q, k = ws.k;
  T* g = ws.gram.data();
  T* vt = ws.vt.data();  // eigenvectors as rows
  T *a = ws.coef_a.data(), *b = ws.coef_b.data(), *c = ws.coef_c.data(), *d = ws.coef_d.data();
  const T eps = std::numeric_limits<T>::epsilon();
  std::fill(ws.vt.begin(), ws.vt.end(), T(0));
  for (int64_t i = 0; i < q; ++i) vt[i * q + i] = T(1);
  T norm = 0;
  for (int64_t i = 0; i < q; ++i)
    for (int64_t j = 0; j < q; ++j) norm += i <= j ? g[i * q + j] * g[i * q + j] : g[j * q + i] * g[j * q + i];
  const T tol = eps * eps * norm;
  for (int sweep = 0; sweep < 30; ++sweep) {
    // the upper triangle is the matrix: symmetrise (a BLAS Gram matrix need not be
    // exactly symmetric, and the two passes round the two triangles differently)
    T off = 0;
    for (int64_t i = 0; i < q; ++i)
      for (int64_t j = i + 1; j < q; ++j) {
        g[j * q + i] = g[i * q + j];
        off += g[i * q + j] * g[i * q + j];
      }
    if (off <= tol) break;
    bool rotated = false;
    for (int64_t step = 0; step < q; ++step) {
      const int64_t first = step % 2, pairs = (q - first) / 2;
      for (int64_t i = 0; i < pairs; ++i) {
        const int64_t p = first + 2 * i;
        const T grr = g[p * q + p], gcc = g[(p + 1) * q + p + 1], grc = g[p * q + p + 1];
        // below the rounding of both diagonal entries: the rotation would change nothing; swap only
        if (std::fabs(grc) <= T(0.1) * eps * std::max(std::fabs(grr), std::fabs(gcc))) {
          a[i] = d[i] = T(0);
          b[i] = c[i] = T(1);
          ws.diag_first[i] = gcc;
          ws.diag_second[i] = grr;
          continue;
        }
        rotated = true;
        const T theta = (gcc - grr) / (T(2) * grc);
        const T t = (theta >= 0 ? T(1) : T(-1)) / (std::fabs(theta) + std::sqrt(theta * theta + T(1)));
        const T cs = T(1) / std::sqrt(t * t + T(1)), sn = t * cs;
        // rotation (p <- cs p - sn p', p' <- sn p + cs p'), then the swap
        a[i] = sn;
        b[i] = cs;
        c[i] = cs;
        d[i] = -sn;
        ws.diag_first[i] = gcc + t * grc;
        ws.diag_second[i] = grr - t * grc;
      }
      for (int64_t i = 0; i < pairs; ++i) {
        const int64_t p = first + 2 * i;
        transform_rows(g + p * q, g + (p + 1) * q, q, a[i], b[i], c[i], d[i]);
        transform_rows(vt + p * q, vt + (p + 1) * q, q, a[i], b[i], c[i], d[i]);
      }
      for (int64_t row = 0; row < q; ++row) transform_pairs(g + row * q + first, pairs, a, b, c, d);
      for (int64_t i = 0; i < pairs; ++i) {  // the transformed 2 x 2 blocks exactly
        const int64_t p = first + 2 * i;
        g[p * q + p] = ws.diag_first[i];
        g[(p + 1) * q + p + 1] = ws.diag_second[i];
        g[p * q + p + 1] = g[(p + 1) * q + p] = T(0);
      }
    }
    if (!rotated) break;
  }
  auto& order = ws.order;
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return g[x * q + x] > g[y * q + y]; });
  for (int64_t col = 0; col < k; ++col) {
    const T* v = vt + order[col] * q;
    ws.vals[col] = g[order[col] * q + order[col]];
    int64_t big = 0;
    for (int64_t m = 1; m < q; ++m)
      if (std::fabs(v[m]) > std::fabs(v[big])) big = m;
    const T sign = v[big] < 0 ? T(-1) : T(1);
    for (int64_t m = 0; m < q; ++m) ws.eig[m * k + col] = sign * v[m];
  }
}

// The number of columns of q_out (m x k, row-major) in the longest prefix of the first `resolved`
// that is orthonormal: column j is while max_{i <= j} |(Q^T Q)_ij - delta_ij| <= 4 q eps (k = q: all
// the triplets; docs/ops/lowrank_svd.md, "Degenerate inputs"). Uses ws.gram.
template <typename T>
int64_t orthonormal_prefix(const T* q_out, int64_t m, int64_t resolved, Workspace<T>& ws) {
  const int64_t k = ws.k;
  T* g = ws.gram.data();
  gemm<T>(true, false, k, k, m, q_out, k, q_out, k, g, k);
  const T tol = T(4) * static_cast<T>(k) * std::numeric_limits<T>::epsilon();
  for (int64_t j = 0; j < resolved; ++j)
    for (int64_t i = 0; i <= j; ++i)
      if (!(std::fabs(g[i * k + j] - (i == j ? T(1) : T(0))) <= tol)) return j;
  return resolved;
}

// Columns reliable..k-1 of q_out (m x k, row-major) become an orthonormal basis of part of the
// complement of columns 0..reliable-1 (orthonormal): the same columns of q_out itself where they
// are resolved (below `resolved`), else of the sketch omega (n x q; its rows repeated when m > n),
// projected out of those, normalised and orthonormalised, three times (docs/ops/lowrank_svd.md,
// "Degenerate inputs"). scratch: k x m, free for the call.
template <typename T>
void complete_basis(const T* omega, int64_t m, int64_t reliable, int64_t resolved, T* scratch, Workspace<T>& ws,
                    T* q_out) {
  const int64_t n = ws.n, q = ws.q, k = ws.k, c = k - reliable;
  T* x = ws.basis.data();  // the new columns as the rows of a c x m panel
  for (int64_t j = 0; j < c; ++j) {
    const int64_t col = reliable + j;
    for (int64_t i = 0; i < m; ++i) x[j * m + i] = col < resolved ? q_out[i * k + col] : omega[(i % n) * q + col];
  }
  for (int pass = 0; pass < 3; ++pass) {
    if (reliable > 0) {  // X <- X - (X Q_r) Q_r^T
      gemm<T>(false, false, c, reliable, m, x, m, q_out, k, ws.coef.data(), reliable);
      gemm<T>(false, true, c, m, reliable, ws.coef.data(), reliable, q_out, k, x, m, T(-1), T(1));
    }
    // unit rows: the shift of the step is relative to each of them, not to the longest
    for (int64_t j = 0; j < c; ++j) {
      T* row = x + j * m;
      T norm2 = 0;
      for (int64_t i = 0; i < m; ++i) norm2 += row[i] * row[i];
      const T scale = T(1) / std::sqrt(std::max(norm2, std::numeric_limits<T>::min()));
      for (int64_t i = 0; i < m; ++i) row[i] *= scale;
    }
    cholqr_step<T>(x, c, m, scratch, ws);
    std::copy(scratch, scratch + c * m, x);
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < c; ++j) q_out[i * k + reliable + j] = x[j * m + i];
}

// One matrix: a (n x d), omega (n x q) -> u (n x k), s (k), v (d x k), all row-major.
template <typename T>
void lowrank_svd_one(const T* a, const T* omega, int64_t niter, Workspace<T>& ws, T* u, T* s, T* v) {
  const int64_t n = ws.n, d = ws.d, q = ws.q, k = ws.k;
  // sketch from the row side: Z = orth(A^T Omega), then Z <- orth(A^T (A Z))
  gemm<T>(true, false, q, d, n, omega, q, a, d, ws.wt.data(), d);
  orthonormalize<T>(ws);
  for (int64_t it = 0; it < niter; ++it) {
    gemm<T>(false, true, q, n, d, ws.zt.data(), d, a, d, ws.yt.data(), n);
    gemm<T>(false, false, q, d, n, ws.yt.data(), n, a, d, ws.wt.data(), d);
    orthonormalize<T>(ws);
  }
  // Rayleigh-Ritz: Y = A Z, Y^T Y = E diag(lambda) E^T
  gemm<T>(false, true, q, n, d, ws.zt.data(), d, a, d, ws.yt.data(), n);
  gemm<T>(false, true, q, q, n, ws.yt.data(), n, ws.yt.data(), n, ws.gram.data(), q);
  jacobi_eig<T>(ws);
  for (int64_t c = 0; c < k; ++c) s[c] = static_cast<T>(std::sqrt(std::max(ws.vals[c], 0.0)));
  // U = Y E diag(1/S), V = Z E where s_c > eps s_1 (a prefix: S descends); a value at or below is
  // zero to working precision: its columns, and those from the first one that the Gram matrix left
  // not orthonormal on, complete the bases (docs/ops/lowrank_svd.md, "Degenerate inputs")
  const T eps = std::numeric_limits<T>::epsilon(), tiny = std::numeric_limits<T>::min();
  int64_t resolved = 0;
  for (int64_t c = 0; c < k; ++c) {
    const bool zero = !(s[c] > eps * s[0]);
    const T inv_sigma = zero ? T(0) : T(1) / std::max(s[c], tiny);
    resolved += zero ? 0 : 1;
    for (int64_t m = 0; m < q; ++m) ws.eig_scaled[m * k + c] = ws.eig[m * k + c] * inv_sigma;
  }
  gemm<T>(true, false, d, k, q, ws.zt.data(), d, ws.eig.data(), k, v, k);
  gemm<T>(true, false, n, k, q, ws.yt.data(), n, ws.eig_scaled.data(), k, u, k);
  // Y and W are no longer needed: scratch
  const int64_t u_reliable = orthonormal_prefix<T>(u, n, resolved, ws);
  if (u_reliable < k) complete_basis<T>(omega, n, u_reliable, resolved, ws.yt.data(), ws, u);
  const int64_t v_reliable = orthonormal_prefix<T>(v, d, resolved, ws);
  if (v_reliable < k) complete_basis<T>(omega, d, v_reliable, resolved, ws.wt.data(), ws, v);
}

template <typename T>
void lowrank_svd_batch(const at::Tensor& a, const at::Tensor& omega, int64_t k, int64_t niter, at::Tensor& U,
                       at::Tensor& S, at::Tensor& V) {
  const int64_t b = a.size(0), n = a.size(1), d = a.size(2), q = omega.size(2);
  const T* a_ptr = a.data_ptr<T>();
  const T* omega_ptr = omega.data_ptr<T>();
  T* u = U.data_ptr<T>();
  T* s = S.data_ptr<T>();
  T* v = V.data_ptr<T>();
  const auto one = [&](int64_t i, Workspace<T>& ws) {
    lowrank_svd_one<T>(a_ptr + i * n * d, omega_ptr + i * n * q, niter, ws, u + i * n * k, s + i * k, v + i * d * k);
  };
  const int threads = at::get_num_threads();
  if (b < threads) {  // too few matrices to share out: BLAS threads each product
    Workspace<T> ws(n, d, q, k);
    for (int64_t i = 0; i < b; ++i) one(i, ws);
    return;
  }
  // one matrix per thread at a time, BLAS single-threaded inside the parallel region;
  // each matrix is computed the same way whichever thread takes it
#pragma omp parallel num_threads(threads)
  {
    // the worker threads start without the caller's dispatch state; only the
    // at::mm_out fallback of gemm needs it: plain CPU kernels, below autograd
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    Workspace<T> ws(n, d, q, k);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < b; ++i) one(i, ws);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_svd_cpu(const at::Tensor& A, const at::Tensor& omega,
                                                              int64_t niter) {
  check_lowrank_svd_args(A, omega, niter);
  const int64_t b = A.size(0), n = A.size(1), d = A.size(2), k = omega.size(2);
  TORCH_CHECK(std::max(n, d) <= std::numeric_limits<int>::max(), "lowrank_svd: A: n and d must fit a 32-bit BLAS int");
  const at::Tensor a = A.detach().contiguous(), o = omega.detach().contiguous();
  at::Tensor U = at::empty({b, n, k}, A.options()), S = at::empty({b, k}, A.options()),
             V = at::empty({b, d, k}, A.options());
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "lowrank_svd_cpu",
                             [&] { lowrank_svd_batch<scalar_t>(a, o, k, niter, U, S, V); });
  return {U, S, V};
}

}  // namespace

TORCH_LIBRARY_IMPL(modalimmune, CPU, m) { m.impl("lowrank_svd", &lowrank_svd_cpu); }

}  // namespace modalimmune
