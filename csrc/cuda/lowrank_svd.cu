// CUDA implementation of the batched randomised low-rank SVD (docs/ops/lowrank_svd.md).
// The tall-skinny products and Gram matrices go to cuBLAS (batched, through
// at::bmm); the CholeskyQR steps use the batched tiny Cholesky and triangular
// solve of ATen; the Rayleigh-Ritz eigenproblem is solved by our batched
// Jacobi kernel: one thread block per q x q matrix, held with its eigenvectors
// in shared memory (double), parallel cyclic Jacobi in round-robin order
// (q/2 disjoint rotations per step).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "lowrank_svd.h"

namespace modalimmune {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxJacobi = 96;  // larger q: at::linalg_eigh (shared memory would not hold it)
constexpr int kMaxSweeps = 30;

__global__ void __launch_bounds__(kThreads)
    jacobi_eig_kernel(const double* __restrict__ gram, double* __restrict__ vals, double* __restrict__ vecs, int q) {
  extern __shared__ double smem[];
  const int m = q + (q & 1);  // even, with a dummy index q when q is odd
  double* a = smem;           // q x q
  double* v = a + q * q;      // q x q
  double* cs = v + q * q;     // m / 2 rotations
  double* sn = cs + m / 2;
  int* pair_p = reinterpret_cast<int*>(sn + m / 2);
  int* pair_r = pair_p + m / 2;
  __shared__ double off, norm;
  const int tid = threadIdx.x;
  const double* g = gram + static_cast<int64_t>(blockIdx.x) * q * q;
  for (int i = tid; i < q * q; i += blockDim.x) {
    a[i] = g[i];
    v[i] = (i / q == i % q) ? 1.0 : 0.0;
  }
  if (tid == 0) norm = 0.0;
  __syncthreads();
  double local = 0.0;
  for (int i = tid; i < q * q; i += blockDim.x) local += a[i] * a[i];
  atomicAdd(&norm, local);
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    if (tid == 0) off = 0.0;
    __syncthreads();
    local = 0.0;
    for (int i = tid; i < q * q; i += blockDim.x)
      if (i / q != i % q) local += a[i] * a[i];
    atomicAdd(&off, local);
    __syncthreads();
    if (off <= 1e-30 * norm) break;  // off-diagonal below 1e-15 ||G||_F
    for (int step = 0; step < m - 1; ++step) {
      if (tid < m / 2) {  // circle method: (m-1, step) and ((step+i), (step-i)) mod (m-1)
        int p = tid == 0 ? m - 1 : (step + tid) % (m - 1);
        int r = tid == 0 ? step : (step - tid + m - 1) % (m - 1);
        if (p > r) { const int t = p; p = r; r = t; }
        double c = 1.0, s = 0.0;
        if (r < q && a[p * q + r] != 0.0) {
          const double theta = (a[r * q + r] - a[p * q + p]) / (2.0 * a[p * q + r]);
          const double t = (theta >= 0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0));
          c = rsqrt(t * t + 1.0);
          s = t * c;
        }
        pair_p[tid] = p;
        pair_r[tid] = r < q ? r : -1;
        cs[tid] = c;
        sn[tid] = s;
      }
      __syncthreads();
      for (int i = tid; i < (m / 2) * q; i += blockDim.x) {  // rows p, r
        const int k = i / q, col = i % q, p = pair_p[k], r = pair_r[k];
        if (r < 0) continue;
        const double ap = a[p * q + col], ar = a[r * q + col];
        a[p * q + col] = cs[k] * ap - sn[k] * ar;
        a[r * q + col] = sn[k] * ap + cs[k] * ar;
      }
      __syncthreads();
      for (int i = tid; i < (m / 2) * q; i += blockDim.x) {  // columns p, r of a and v
        const int k = i / q, row = i % q, p = pair_p[k], r = pair_r[k];
        if (r < 0) continue;
        const double ap = a[row * q + p], ar = a[row * q + r];
        a[row * q + p] = cs[k] * ap - sn[k] * ar;
        a[row * q + r] = sn[k] * ap + cs[k] * ar;
        const double vp = v[row * q + p], vr = v[row * q + r];
        v[row * q + p] = cs[k] * vp - sn[k] * vr;
        v[row * q + r] = sn[k] * vp + cs[k] * vr;
      }
      __syncthreads();
    }
  }
  // descending order (rank by counting; ties by index) and the sign convention:
  // each eigenvector's largest-magnitude entry is positive
  for (int c = tid; c < q; c += blockDim.x) {
    const double lam = a[c * q + c];
    int rank = 0;
    for (int j = 0; j < q; ++j) {
      const double other = a[j * q + j];
      rank += (other > lam) || (other == lam && j < c);
    }
    int big = 0;
    for (int j = 1; j < q; ++j)
      if (fabs(v[j * q + c]) > fabs(v[big * q + c])) big = j;
    const double sign = v[big * q + c] < 0 ? -1.0 : 1.0;
    const int64_t base = static_cast<int64_t>(blockIdx.x) * q;
    vals[base + rank] = lam;
    for (int j = 0; j < q; ++j) vecs[(base + j) * q + rank] = sign * v[j * q + c];
  }
}

size_t jacobi_smem(int64_t q) {
  const int64_t m = q + (q & 1);
  return (2 * q * q + m) * sizeof(double) + m * sizeof(int);
}

// (eigenvalues descending (b, q), eigenvectors as columns (b, q, q)), float64
std::tuple<at::Tensor, at::Tensor> sorted_eig(const at::Tensor& gram) {
  const at::Tensor g = gram.to(at::kDouble).contiguous();
  const int64_t b = g.size(0), q = g.size(1);
  if (q > kMaxJacobi) {
    auto [vals, vecs] = at::linalg_eigh(g);
    vals = vals.flip(-1);
    vecs = vecs.flip(-1);
    const at::Tensor pivot = vecs.gather(-2, vecs.abs().argmax(-2, true));
    return {vals, vecs * at::where(pivot < 0, -1.0, 1.0)};
  }
  at::Tensor vals = at::empty({b, q}, g.options()), vecs = at::empty({b, q, q}, g.options());
  if (b == 0) return {vals, vecs};
  const size_t smem = jacobi_smem(q);
  C10_CUDA_CHECK(cudaFuncSetAttribute(jacobi_eig_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  jacobi_eig_kernel<<<b, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      g.data_ptr<double>(), vals.data_ptr<double>(), vecs.data_ptr<double>(), static_cast<int>(q));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {vals, vecs};
}

// One shifted CholeskyQR step: Y R^{-1}, R^T R = G + tau I, tau = eps tr(G) + tiny.
at::Tensor cholqr_step(const at::Tensor& y, const at::Tensor& gram, double eps, double tiny) {
  const at::Tensor g = gram.to(at::kDouble);
  const at::Tensor tau = g.diagonal(0, -2, -1).sum(-1) * eps + tiny;
  const at::Tensor eye = at::eye(g.size(-1), g.options());
  const at::Tensor lower = std::get<0>(at::linalg_cholesky_ex(g + tau.unsqueeze(-1).unsqueeze(-1) * eye));
  return at::linalg_solve_triangular(lower.mT().to(y.scalar_type()), y, /*upper=*/true, /*left=*/false);
}

at::Tensor orthonormalize(const at::Tensor& y, const at::Tensor& gram, double eps, double tiny) {
  const at::Tensor q1 = cholqr_step(y, gram, eps, tiny);
  return cholqr_step(q1, at::bmm(q1.mT(), q1), eps, tiny);
}

// q_in (b, m, q) with its columns outside `reliable` (b, q; a prefix of each row) replaced by the
// same columns of `source`, projected out of the others, normalised and orthonormalised, three
// times: the reliable columns of x stay exactly zero, so a fully reliable q_in comes back unchanged
// (docs/ops/lowrank_svd.md, "Degenerate inputs").
at::Tensor complete_basis(const at::Tensor& q_in, const at::Tensor& reliable, const at::Tensor& source, double eps,
                          double tiny) {
  const at::Tensor keep = reliable.unsqueeze(-2).to(q_in.scalar_type());
  const at::Tensor q_kept = q_in * keep;
  at::Tensor x = source * (1 - keep);
  for (int pass = 0; pass < 3; ++pass) {
    x = x - at::bmm(q_kept, at::bmm(q_kept.mT(), x));
    // unit columns: the shift of the step is relative to each of them, not to the longest
    x = x * x.square().sum(-2, /*keepdim=*/true).clamp_min(tiny).rsqrt();
    x = cholqr_step(x, at::bmm(x.mT(), x), eps, tiny);
  }
  return q_kept + x;
}

// The longest prefix of the `resolved` columns (a prefix) of q_in (b, m, q) that is orthonormal, as a
// (b, q) mask: column j is while max_{i <= j} |(Q^T Q)_ij - delta_ij| <= 4 q eps; the columns from
// the first other one on complete the basis, from their own directions where resolved, else from
// `sketch` (docs/ops/lowrank_svd.md, "Degenerate inputs").
at::Tensor finish_factor(const at::Tensor& q_in, const at::Tensor& resolved, const at::Tensor& sketch, double eps,
                         double tiny) {
  const int64_t q = q_in.size(-1);
  const at::Tensor deviation = (at::bmm(q_in.mT(), q_in) - at::eye(q, q_in.options())).abs().triu().amax(-2);
  const at::Tensor reliable = at::logical_and(resolved, deviation <= 4.0 * q * eps).cumprod(-1).to(at::kBool);
  return complete_basis(q_in, reliable, at::where(resolved.unsqueeze(-2), q_in, sketch), eps, tiny);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_svd_cuda(const at::Tensor& A, const at::Tensor& omega,
                                                               int64_t niter) {
  check_lowrank_svd_args(A, omega, niter);
  const c10::cuda::CUDAGuard guard(A.device());
  const bool single = A.scalar_type() == at::kFloat;
  const double eps = single ? std::numeric_limits<float>::epsilon() : std::numeric_limits<double>::epsilon();
  const double tiny = single ? std::numeric_limits<float>::min() : std::numeric_limits<double>::min();
  const at::Tensor a = A.contiguous(), a_t = a.mT(), sketch = omega.contiguous();
  // sketch from the row side: Z = orth(A^T Omega), then Z <- orth(A^T (A Z))
  at::Tensor z = at::bmm(a_t, sketch);
  z = orthonormalize(z, at::bmm(z.mT(), z), eps, tiny);
  for (int64_t it = 0; it < niter; ++it) {
    const at::Tensor w = at::bmm(a_t, at::bmm(a, z));
    z = orthonormalize(w, at::bmm(w.mT(), w), eps, tiny);
  }
  const at::Tensor y = at::bmm(a, z);
  auto [vals, vecs] = sorted_eig(at::bmm(y.mT(), y));
  const at::Tensor w = vecs.to(A.scalar_type());
  const at::Tensor s = vals.clamp_min(0).sqrt().to(A.scalar_type());
  // s_i <= eps s_1 is zero to working precision: no division by it; the columns of U and V of
  // those values, and of values whose vectors the Gram matrix left not orthonormal, complete the
  // bases (docs/ops/lowrank_svd.md, "Degenerate inputs"), from the sketch (its rows repeated for V)
  const at::Tensor resolved = s > s.narrow(-1, 0, 1) * eps;
  const at::Tensor inverse = at::where(resolved, s.clamp_min(tiny).reciprocal(), 0);
  const int64_t n = A.size(1), d = A.size(2);
  const at::Tensor rows = at::arange(d, sketch.options().dtype(at::kLong)).remainder(n);
  const at::Tensor u = finish_factor(at::bmm(y, w) * inverse.unsqueeze(-2), resolved, sketch, eps, tiny);
  const at::Tensor v = finish_factor(at::bmm(z, w), resolved, sketch.index_select(1, rows), eps, tiny);
  return {u, s.contiguous(), v};
}

}  // namespace

TORCH_LIBRARY_IMPL(modalimmune, CUDA, m) { m.impl("lowrank_svd", &lowrank_svd_cuda); }

}  // namespace modalimmune
