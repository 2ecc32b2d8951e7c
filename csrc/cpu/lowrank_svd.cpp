// CPU kernel of the batched randomised low-rank SVD (docs/ops/lowrank_svd.md).
// The panels are kept transposed (q x d, q x n; row-major), so every product
// with A is a short-wide BLAS product (Yt = Zt A^T, Wt = Yt A), the shape MKL runs
// near its square-matrix rate. OpenMP over the batch with single-threaded BLAS
// inside when the batch fills the threads, else threaded BLAS on one matrix at a
// time. The q x q work (Cholesky in double, cyclic Jacobi in A's dtype) is ours.
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

namespace modalimmune {
namespace {

// One thread's buffers: panels Zt, Wt (q x d), Yt (q x n) and q x q matrices.
struct Workspace {
  at::Tensor zt, wt, yt, gram, tri, eig, eig_scaled;
  Workspace(int64_t n, int64_t d, int64_t q, int64_t k, const at::TensorOptions& options)
      : zt(at::empty({q, d}, options)), wt(at::empty({q, d}, options)), yt(at::empty({q, n}, options)),
        gram(at::empty({q, q}, options)), tri(at::zeros({q, q}, options)), eig(at::empty({q, k}, options)),
        eig_scaled(at::empty({q, k}, options)) {}
};

// out = L^{-1} X for the q x m panel X = Wt, with L L^T = X X^T + tau I,
// tau = eps tr(X X^T) + tiny: one shifted CholeskyQR step on W = X^T
// (docs/ops/lowrank_svd.md, "Orthonormalisation"). The Cholesky is in double.
template <typename T>
void cholqr_step(const at::Tensor& x, at::Tensor& out, Workspace& ws) {
  const int64_t q = x.size(0);
  at::mm_out(ws.gram, x, x.t());
  const T* gram = ws.gram.data_ptr<T>();
  std::vector<double> l(gram, gram + q * q);  // lower factor L in place
  double trace = 0.0;
  for (int64_t c = 0; c < q; ++c) trace += l[c * q + c];
  const double tau = std::numeric_limits<T>::epsilon() * trace + std::numeric_limits<T>::min();
  for (int64_t c = 0; c < q; ++c) {
    double diag = l[c * q + c] + tau;
    for (int64_t m = 0; m < c; ++m) diag -= l[c * q + m] * l[c * q + m];
    diag = std::sqrt(std::max(diag, tau));
    l[c * q + c] = diag;
    for (int64_t r = c + 1; r < q; ++r) {
      double v = l[r * q + c];
      for (int64_t m = 0; m < c; ++m) v -= l[r * q + m] * l[c * q + m];
      l[r * q + c] = v / diag;
    }
  }
  // L^{-1} (lower) by forward substitution, column by column
  T* inv = ws.tri.data_ptr<T>();
  std::vector<double> col(q);
  for (int64_t c = 0; c < q; ++c) {
    for (int64_t r = c; r < q; ++r) {
      double v = r == c ? 1.0 : 0.0;
      for (int64_t m = c; m < r; ++m) v -= l[r * q + m] * col[m];
      col[r] = v / l[r * q + r];
      inv[r * q + c] = static_cast<T>(col[r]);
    }
  }
  at::mm_out(out, ws.tri, x);
}

// Zt <- orth(Wt) (CholeskyQR2); Wt is overwritten.
template <typename T>
void orthonormalize(Workspace& ws) {
  cholqr_step<T>(ws.wt, ws.zt, ws);
  cholqr_step<T>(ws.zt, ws.wt, ws);
  std::swap(ws.zt, ws.wt);
}

// Cyclic Jacobi on the symmetric q x q matrix g (destroyed), in T: the Gram
// matrix it diagonalises was formed in T, so T's precision is what it holds.
// Sweeps until the off-diagonal norm is below eps ||G||_F (or no rotation is
// left to do). Writes the first k eigenvalues descending to vals and their
// eigenvectors as the columns of vecs (q x k), each with its largest-magnitude
// entry positive (the sign convention of every backend).
template <typename T>
void jacobi_eig(std::vector<T>& g, int64_t q, int64_t k, double* vals, T* vecs) {
  const T eps = std::numeric_limits<T>::epsilon();
  std::vector<T> vt(q * q, T(0));  // eigenvectors as rows
  for (int64_t i = 0; i < q; ++i) vt[i * q + i] = T(1);
  for (int64_t r = 0; r < q; ++r)  // a BLAS Gram matrix need not be exactly symmetric
    for (int64_t c = r + 1; c < q; ++c) g[r * q + c] = g[c * q + r];
  T norm = 0;
  for (T e : g) norm += e * e;
  const T tol = eps * eps * norm;
  for (int sweep = 0; sweep < 30; ++sweep) {
    T off = 0;
    for (int64_t r = 0; r < q; ++r)
      for (int64_t c = r + 1; c < q; ++c) off += g[r * q + c] * g[r * q + c];
    if (off <= tol) break;
    bool rotated = false;
    for (int64_t r = 0; r < q; ++r)
      for (int64_t c = r + 1; c < q; ++c) {
        const T grc = g[r * q + c];
        // below the rounding of both diagonal entries: the rotation would change nothing
        if (std::fabs(grc) <= T(0.1) * eps * std::max(std::fabs(g[r * q + r]), std::fabs(g[c * q + c]))) {
          g[r * q + c] = g[c * q + r] = T(0);
          continue;
        }
        rotated = true;
        const T theta = (g[c * q + c] - g[r * q + r]) / (T(2) * grc);
        const T t = (theta >= 0 ? T(1) : T(-1)) / (std::fabs(theta) + std::sqrt(theta * theta + T(1)));
        const T cs = T(1) / std::sqrt(t * t + T(1)), sn = t * cs;
        // G <- J^T G J on rows r, c (contiguous), mirrored into columns r, c
        T* gr = g.data() + r * q;
        T* gc = g.data() + c * q;
        const T grr = gr[r] - t * grc, gcc = gc[c] + t * grc;
        for (int64_t m = 0; m < q; ++m) {
          const T a = gr[m], b = gc[m];
          gr[m] = cs * a - sn * b;
          gc[m] = sn * a + cs * b;
        }
        for (int64_t m = 0; m < q; ++m) {
          g[m * q + r] = gr[m];
          g[m * q + c] = gc[m];
        }
        gr[r] = grr;
        gc[c] = gcc;
        gr[c] = gc[r] = T(0);
        T* vr = vt.data() + r * q;
        T* vc = vt.data() + c * q;
        for (int64_t m = 0; m < q; ++m) {
          const T a = vr[m], b = vc[m];
          vr[m] = cs * a - sn * b;
          vc[m] = sn * a + cs * b;
        }
      }
    if (!rotated) break;
  }
  std::vector<int64_t> order(q);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return g[x * q + x] > g[y * q + y]; });
  for (int64_t c = 0; c < k; ++c) {
    const T* v = vt.data() + order[c] * q;
    vals[c] = g[order[c] * q + order[c]];
    int64_t big = 0;
    for (int64_t m = 1; m < q; ++m)
      if (std::fabs(v[m]) > std::fabs(v[big])) big = m;
    const T sign = v[big] < 0 ? T(-1) : T(1);
    for (int64_t m = 0; m < q; ++m) vecs[m * k + c] = sign * v[m];
  }
}

// One matrix: a (n x d), omega (n x q) -> u (n x k), s (k), v (d x k).
template <typename T>
void lowrank_svd_one(const at::Tensor& a, const at::Tensor& omega, int64_t k, int64_t niter, Workspace& ws,
                     at::Tensor u, T* s, at::Tensor v) {
  const int64_t q = omega.size(1);
  // sketch from the row side: Z = orth(A^T Omega), then Z <- orth(A^T (A Z))
  at::mm_out(ws.wt, omega.t(), a);
  orthonormalize<T>(ws);
  for (int64_t it = 0; it < niter; ++it) {
    at::mm_out(ws.yt, ws.zt, a.t());
    at::mm_out(ws.wt, ws.yt, a);
    orthonormalize<T>(ws);
  }
  // Rayleigh-Ritz: Y = A Z, Y^T Y = E diag(lambda) E^T
  at::mm_out(ws.yt, ws.zt, a.t());
  at::mm_out(ws.gram, ws.yt, ws.yt.t());
  const T* gram = ws.gram.data_ptr<T>();
  std::vector<T> g(gram, gram + q * q);
  std::vector<double> vals(k);
  T* eig = ws.eig.data_ptr<T>();
  jacobi_eig<T>(g, q, k, vals.data(), eig);
  T* scaled = ws.eig_scaled.data_ptr<T>();
  for (int64_t c = 0; c < k; ++c) {
    const double sigma = std::sqrt(std::max(vals[c], 0.0));
    s[c] = static_cast<T>(sigma);
    const T inv_sigma = static_cast<T>(1.0 / std::max(sigma, static_cast<double>(std::numeric_limits<T>::min())));
    for (int64_t m = 0; m < q; ++m) scaled[m * k + c] = eig[m * k + c] * inv_sigma;
  }
  at::mm_out(v, ws.zt.t(), ws.eig);
  at::mm_out(u, ws.yt.t(), ws.eig_scaled);
}

template <typename T>
void lowrank_svd_batch(const at::Tensor& a, const at::Tensor& omega, int64_t k, int64_t niter, at::Tensor& U,
                       at::Tensor& S, at::Tensor& V) {
  const int64_t b = a.size(0), n = a.size(1), d = a.size(2), q = omega.size(2);
  const int threads = at::get_num_threads();
  T* s = S.data_ptr<T>();
  if (b < threads) {  // too few matrices to share out: BLAS threads each product
    Workspace ws(n, d, q, k, a.options());
    for (int64_t i = 0; i < b; ++i) lowrank_svd_one<T>(a[i], omega[i], k, niter, ws, U[i], s + i * k, V[i]);
    return;
  }
  // one matrix per thread at a time, BLAS single-threaded inside the parallel region;
  // each matrix is computed the same way whichever thread takes it
#pragma omp parallel num_threads(threads)
  {
    // the worker threads start without the caller's dispatch state: the products
    // here are plain CPU kernels, below autograd
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    Workspace ws(n, d, q, k, a.options());
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < b; ++i) lowrank_svd_one<T>(a[i], omega[i], k, niter, ws, U[i], s + i * k, V[i]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_svd_cpu(const at::Tensor& A, const at::Tensor& omega,
                                                              int64_t k, int64_t niter) {
  check_lowrank_svd_args(A, omega, k, niter);
  const int64_t b = A.size(0), n = A.size(1), d = A.size(2);
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
