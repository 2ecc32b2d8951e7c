// CPU kernel of the batched randomised low-rank SVD (docs/ops/lowrank_svd.md).
// OpenMP over the batch: one thread runs the whole algorithm on one matrix, so
// its q-wide panels (Z, W, Y) stay in that core's caches. The passes over A go
// four rows at a time with register tiles of q-columns; the power step
// W = A^T (A Z) reads each block of rows once and uses it twice. The small
// q x q work (Cholesky, Jacobi eigensolver) is done in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace modalimmune {
namespace {

constexpr int kBytes = 32;  // one AVX register; GCC splits it where AVX is missing
constexpr int kRows = 4;    // rows of A per register tile

template <typename T>
struct Lanes {
  typedef T vec __attribute__((vector_size(kBytes), aligned(sizeof(T))));
  static constexpr int64_t kWidth = kBytes / sizeof(T);
  static vec load(const T* p) {
    vec v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(T* p, vec v) { std::memcpy(p, &v, sizeof(v)); }
};

// The panels have a padded row stride qp (a multiple of the lane count; the
// padding columns stay zero).
template <typename T>
struct Panels {
  int64_t n, d, q, qp;
  std::vector<T> z, w, y, tile;
};

// Rows [i, i + R) of A: tile = A_rows Z (or X_rows when Z is null), copied to
// Y when given, and W += A_rows^T tile when W is given.
template <typename T, int R, int CV>
void row_tile(const T* a, int64_t d, int64_t qp, int64_t c0, const T* z, T* tile, T* w) {
  using L = Lanes<T>;
  using vec = typename L::vec;
  vec acc[R][CV];
  if (z != nullptr) {
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < CV; ++v) acc[r][v] = vec{};
    for (int64_t j = 0; j < d; ++j) {
      vec zj[CV];
      for (int v = 0; v < CV; ++v) zj[v] = L::load(z + j * qp + c0 + v * L::kWidth);
      for (int r = 0; r < R; ++r) {
        const T arj = a[r * d + j];
        for (int v = 0; v < CV; ++v) acc[r][v] += arj * zj[v];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < CV; ++v) L::store(tile + r * qp + c0 + v * L::kWidth, acc[r][v]);
  } else {
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < CV; ++v) acc[r][v] = L::load(tile + r * qp + c0 + v * L::kWidth);
  }
  if (w == nullptr) return;
  for (int64_t j = 0; j < d; ++j) {
    T* wj = w + j * qp + c0;
    vec sum[CV];
    for (int v = 0; v < CV; ++v) sum[v] = L::load(wj + v * L::kWidth);
    for (int r = 0; r < R; ++r) {
      const T arj = a[r * d + j];
      for (int v = 0; v < CV; ++v) sum[v] += arj * acc[r][v];
    }
    for (int v = 0; v < CV; ++v) L::store(wj + v * L::kWidth, sum[v]);
  }
}

template <typename T, int R>
void row_block(const T* a, int64_t d, int64_t qp, const T* z, T* tile, T* w) {
  const int64_t width = Lanes<T>::kWidth;
  int64_t c0 = 0;
  for (; c0 + 2 * width <= qp; c0 += 2 * width) row_tile<T, R, 2>(a, d, qp, c0, z, tile, w);
  if (c0 < qp) row_tile<T, R, 1>(a, d, qp, c0, z, tile, w);
}

// One pass over A (n x d): with z, Y = A Z (kept when y is given); without z,
// the rows come from x (n x qp). With w, W = A^T Y.
template <typename T>
void sweep(const T* a, const Panels<T>& p, const T* z, const T* x, T* y, T* w, T* tile) {
  if (w != nullptr) std::fill(w, w + p.d * p.qp, T(0));
  int64_t i = 0;
  for (; i < p.n; i += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, p.n - i));
    T* out = y != nullptr ? y + i * p.qp : tile;
    if (z == nullptr) std::memcpy(out, x + i * p.qp, rows * p.qp * sizeof(T));
    if (rows == kRows)
      row_block<T, kRows>(a + i * p.d, p.d, p.qp, z, out, w);
    else
      for (int r = 0; r < rows; ++r) row_block<T, 1>(a + (i + r) * p.d, p.d, p.qp, z, out + r * p.qp, w);
  }
}

// G = X^T X over the first q columns of the rows x qp panel X.
template <typename T>
std::vector<double> gram(const T* x, int64_t rows, const Panels<T>& p) {
  std::vector<T> g(p.q * p.qp, T(0));
  for (int64_t i = 0; i < rows; ++i) {
    const T* xi = x + i * p.qp;
    for (int64_t r = 0; r < p.q; ++r) {
      const T xr = xi[r];
      T* gr = g.data() + r * p.qp;
#pragma omp simd
      for (int64_t c = 0; c < p.qp; ++c) gr[c] += xr * xi[c];
    }
  }
  std::vector<double> out(p.q * p.q);
  for (int64_t r = 0; r < p.q; ++r)
    for (int64_t c = 0; c < p.q; ++c) out[r * p.q + c] = g[r * p.qp + c];
  return out;
}

// One shifted CholeskyQR step in place: X <- X R^{-1}, R^T R = G + tau I,
// tau = eps tr(G) + tiny (docs/ops/lowrank_svd.md, "Orthonormalisation").
template <typename T>
void cholqr_step(T* x, int64_t rows, const Panels<T>& p) {
  const int64_t q = p.q;
  std::vector<double> g = gram(x, rows, p);
  double trace = 0.0;
  for (int64_t c = 0; c < q; ++c) trace += g[c * q + c];
  const double tau = std::numeric_limits<T>::epsilon() * trace + std::numeric_limits<T>::min();
  for (int64_t c = 0; c < q; ++c) g[c * q + c] += tau;
  // upper R with R^T R = g, stored in g's upper triangle
  for (int64_t c = 0; c < q; ++c) {
    double diag = g[c * q + c];
    for (int64_t m = 0; m < c; ++m) diag -= g[m * q + c] * g[m * q + c];
    diag = std::sqrt(std::max(diag, tau));
    g[c * q + c] = diag;
    for (int64_t e = c + 1; e < q; ++e) {
      double v = g[c * q + e];
      for (int64_t m = 0; m < c; ++m) v -= g[m * q + c] * g[m * q + e];
      g[c * q + e] = v / diag;
    }
  }
  // R^{-1} (upper), padded to qp columns
  std::vector<double> inv(q * q, 0.0);
  for (int64_t c = 0; c < q; ++c) {
    inv[c * q + c] = 1.0 / g[c * q + c];
    for (int64_t r = c - 1; r >= 0; --r) {
      double v = 0.0;
      for (int64_t m = r + 1; m <= c; ++m) v += g[r * q + m] * inv[m * q + c];
      inv[r * q + c] = -v / g[r * q + r];
    }
  }
  std::vector<T> rinv(q * p.qp, T(0)), row(p.qp);
  for (int64_t r = 0; r < q; ++r)
    for (int64_t c = r; c < q; ++c) rinv[r * p.qp + c] = static_cast<T>(inv[r * q + c]);
  for (int64_t i = 0; i < rows; ++i) {
    T* xi = x + i * p.qp;
    std::fill(row.begin(), row.end(), T(0));
    for (int64_t m = 0; m < q; ++m) {
      const T xm = xi[m];
      const T* rm = rinv.data() + m * p.qp;
#pragma omp simd
      for (int64_t c = 0; c < p.qp; ++c) row[c] += xm * rm[c];
    }
    std::copy(row.begin(), row.end(), xi);
  }
}

// Cyclic Jacobi on the symmetric q x q matrix g (destroyed). Returns the
// eigenvalues descending and the eigenvectors as the columns of vecs, each
// with its largest-magnitude entry positive (the sign convention of every backend).
void jacobi_eig(std::vector<double>& g, int64_t q, std::vector<double>& vals, std::vector<double>& vecs) {
  std::vector<double> v(q * q, 0.0);
  for (int64_t i = 0; i < q; ++i) v[i * q + i] = 1.0;
  double norm = 0.0;
  for (double e : g) norm += e * e;
  const double tol = 1e-30 * norm;  // (1e-15 ||G||_F)^2
  for (int sweep = 0; sweep < 30; ++sweep) {
    double off = 0.0;
    for (int64_t r = 0; r < q; ++r)
      for (int64_t c = r + 1; c < q; ++c) off += g[r * q + c] * g[r * q + c];
    if (off <= tol) break;
    for (int64_t r = 0; r < q; ++r)
      for (int64_t c = r + 1; c < q; ++c) {
        const double grc = g[r * q + c];
        // below the rounding of both diagonal entries: the rotation would change nothing
        if (std::fabs(grc) <= 1e-17 * std::max(std::fabs(g[r * q + r]), std::fabs(g[c * q + c]))) {
          g[r * q + c] = g[c * q + r] = 0.0;
          continue;
        }
        const double theta = (g[c * q + c] - g[r * q + r]) / (2.0 * grc);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
        const double cs = 1.0 / std::sqrt(t * t + 1.0), sn = t * cs;
        for (int64_t m = 0; m < q; ++m) {  // columns r, c
          const double gr = g[m * q + r], gc = g[m * q + c];
          g[m * q + r] = cs * gr - sn * gc;
          g[m * q + c] = sn * gr + cs * gc;
        }
        for (int64_t m = 0; m < q; ++m) {  // rows r, c
          const double gr = g[r * q + m], gc = g[c * q + m];
          g[r * q + m] = cs * gr - sn * gc;
          g[c * q + m] = sn * gr + cs * gc;
        }
        for (int64_t m = 0; m < q; ++m) {
          const double vr = v[m * q + r], vc = v[m * q + c];
          v[m * q + r] = cs * vr - sn * vc;
          v[m * q + c] = sn * vr + cs * vc;
        }
      }
  }
  std::vector<int64_t> order(q);
  for (int64_t i = 0; i < q; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return g[x * q + x] > g[y * q + y]; });
  vals.assign(q, 0.0);
  vecs.assign(q * q, 0.0);
  for (int64_t c = 0; c < q; ++c) {
    const int64_t src = order[c];
    vals[c] = g[src * q + src];
    int64_t big = 0;
    for (int64_t m = 1; m < q; ++m)
      if (std::fabs(v[m * q + src]) > std::fabs(v[big * q + src])) big = m;
    const double sign = v[big * q + src] < 0 ? -1.0 : 1.0;
    for (int64_t m = 0; m < q; ++m) vecs[m * q + c] = sign * v[m * q + src];
  }
}

// out (rows x k) = X (rows x qp panel, first q columns) * E (q x q, first k columns) / scale
template <typename T>
void combine(const T* x, int64_t rows, const Panels<T>& p, const std::vector<double>& e, int64_t k,
             const std::vector<T>& inv_scale, T* out) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < k; ++c) {
      double s = 0.0;
      for (int64_t m = 0; m < p.q; ++m) s += static_cast<double>(x[i * p.qp + m]) * e[m * p.q + c];
      out[i * k + c] = static_cast<T>(s) * inv_scale[c];
    }
}

template <typename T>
void lowrank_svd_one(const T* a, const T* omega, Panels<T>& p, int64_t k, int64_t niter, T* u, T* s, T* v) {
  // sketch from the row side: Z = A^T Omega, then Z <- orth(A^T A Z) niter times
  T* x = p.y.data();
  for (int64_t i = 0; i < p.n; ++i) std::copy(omega + i * p.q, omega + (i + 1) * p.q, x + i * p.qp);
  sweep<T>(a, p, nullptr, x, nullptr, p.z.data(), p.tile.data());
  for (int64_t it = 0; it <= niter; ++it) {
    if (it > 0) sweep<T>(a, p, p.w.data(), nullptr, nullptr, p.z.data(), p.tile.data());
    cholqr_step(p.z.data(), p.d, p);
    cholqr_step(p.z.data(), p.d, p);
    std::swap(p.z, p.w);  // the orthonormal basis lives in w
  }
  // Rayleigh-Ritz: Y = A Z, Y^T Y = W diag(lambda) W^T
  sweep<T>(a, p, p.w.data(), nullptr, p.y.data(), nullptr, p.tile.data());
  std::vector<double> g = gram(p.y.data(), p.n, p), vals, vecs;
  jacobi_eig(g, p.q, vals, vecs);
  std::vector<T> ones(k, T(1)), inv_sigma(k);
  for (int64_t c = 0; c < k; ++c) {
    const double sigma = std::sqrt(std::max(vals[c], 0.0));
    s[c] = static_cast<T>(sigma);
    inv_sigma[c] = static_cast<T>(1.0 / std::max(sigma, static_cast<double>(std::numeric_limits<T>::min())));
  }
  combine(p.w.data(), p.d, p, vecs, k, ones, v);
  combine(p.y.data(), p.n, p, vecs, k, inv_sigma, u);
}

template <typename T>
void lowrank_svd_batch(const T* a, const T* omega, int64_t b, int64_t n, int64_t d, int64_t q, int64_t k,
                       int64_t niter, T* u, T* s, T* v) {
  const int64_t width = Lanes<T>::kWidth;
  const int64_t qp = (q + width - 1) / width * width;
#pragma omp parallel
  {
    Panels<T> p{n, d, q, qp};
    p.z.assign(d * qp, 0);
    p.w.assign(d * qp, 0);
    p.y.assign(n * qp, 0);
    p.tile.assign(kRows * qp, 0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < b; ++i)
      lowrank_svd_one(a + i * n * d, omega + i * n * q, p, k, niter, u + i * n * k, s + i * k, v + i * d * k);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_svd_cpu(const at::Tensor& A, const at::Tensor& omega,
                                                              int64_t k, int64_t niter) {
  TORCH_CHECK(A.dim() == 3 && omega.dim() == 3 && A.size(0) == omega.size(0) && A.size(1) == omega.size(1),
              "lowrank_svd: expected A (b, n, d) and omega (b, n, q)");
  TORCH_CHECK(A.scalar_type() == omega.scalar_type() &&
                  (A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble),
              "lowrank_svd: A and omega must both be float32 or both float64");
  const int64_t b = A.size(0), n = A.size(1), d = A.size(2), q = omega.size(2);
  TORCH_CHECK(1 <= k && k <= q && q <= std::min(n, d) && niter >= 0, "lowrank_svd: need 1 <= k <= q <= min(n, d)");
  const at::Tensor a = A.contiguous(), o = omega.contiguous();
  at::Tensor U = at::empty({b, n, k}, A.options()), S = at::empty({b, k}, A.options()),
             V = at::empty({b, d, k}, A.options());
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "lowrank_svd_cpu", [&] {
    lowrank_svd_batch(a.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), b, n, d, q, k, niter, U.data_ptr<scalar_t>(),
                      S.data_ptr<scalar_t>(), V.data_ptr<scalar_t>());
  });
  return {U, S, V};
}

}  // namespace

TORCH_LIBRARY_IMPL(modalimmune, CPU, m) { m.impl("lowrank_svd", &lowrank_svd_cpu); }

}  // namespace modalimmune
