// Fused evaluation of a logistic objective over replications (robust_rlhf.theory.kernels).
//
// For replication r with features stored transposed, x_{r,:,i} = Xt[r, :, i] (R x d x P), coefficients
// a_ri, b_ri and a point theta_r:
//   u_i = x_i . theta_r,  value_r = sum_i a_i softplus(u_i) - b_i u_i,
//   grad_r = sum_i (a_i sigmoid(u_i) - b_i) x_i,  hess_r = sum_i a_i sigmoid(u_i) sigmoid(-u_i) x_i x_i^T.
// One pass over the pairs per replication, in chunks that stay in the L1 cache; only the Hessian's
// distinct entries (k >= j) are formed. With `accumulate` the results are added to the outputs.
// Parallel over replications (and over pair ranges when there are fewer replications than threads) in
// the OpenMP runtime torch has already loaded (same soname), so it shares torch's threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kChunk = 64;

struct Partial {
  double value;
  std::vector<double> grad, hess;  // d, d * d (upper triangle used)
};

// Sums over pairs [lo, hi) of replication r into p (mode 0: value, 1: + gradient, 2: + Hessian).
void pair_range(int64_t P, int64_t d, const double* Xt, const double* a, const double* b, const double* th,
                int mode, int64_t lo, int64_t hi, double* u_out, Partial& p) {
  alignas(64) double u[kChunk], c[kChunk], h[kChunk], w[kChunk];
  for (int64_t i0 = lo; i0 < hi; i0 += kChunk) {
    const int64_t m = std::min(kChunk, hi - i0);
    const double* ai = a + i0;
    const double* bi = b + i0;
    for (int64_t i = 0; i < m; ++i) u[i] = 0.0;
    for (int64_t j = 0; j < d; ++j) {
      const double t = th[j];
      const double* xj = Xt + j * P + i0;
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) u[i] += t * xj[i];
    }
    if (u_out)
      std::memcpy(u_out + i0, u, sizeof(double) * m);
    bool linear = true;  // a = 0 on the whole chunk (VRPO's labelled pairs at lam = 1)
    for (int64_t i = 0; i < m; ++i) linear &= ai[i] == 0.0;
    double val = 0.0;
    if (linear) {
#pragma omp simd reduction(+ : val)
      for (int64_t i = 0; i < m; ++i) {
        val -= bi[i] * u[i];
        c[i] = -bi[i];
      }
    } else {
#pragma omp simd reduction(+ : val)
      for (int64_t i = 0; i < m; ++i) {
        const double e = std::exp(-std::fabs(u[i]));
        const double inv = 1.0 / (1.0 + e);
        const double s = u[i] >= 0.0 ? inv : e * inv;  // sigmoid(u)
        val += ai[i] * (std::fmax(u[i], 0.0) + std::log1p(e)) - bi[i] * u[i];
        c[i] = ai[i] * s - bi[i];
        h[i] = ai[i] * e * inv * inv;  // a sigmoid(u) sigmoid(-u)
      }
    }
    p.value += val;
    if (mode < 1)
      continue;
    for (int64_t j = 0; j < d; ++j) {
      const double* xj = Xt + j * P + i0;
      double acc = 0.0;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < m; ++i) acc += c[i] * xj[i];
      p.grad[j] += acc;
    }
    if (mode < 2 || linear)
      continue;
    for (int64_t j = 0; j < d; ++j) {
      const double* xj = Xt + j * P + i0;
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) w[i] = h[i] * xj[i];
      double* hj = p.hess.data() + j * d;
      int64_t k = j;
      for (; k + 4 <= d; k += 4) {  // four dot products share the loads of w
        const double *x0 = Xt + k * P + i0, *x1 = x0 + P, *x2 = x1 + P, *x3 = x2 + P;
        double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t i = 0; i < m; ++i) {
          s0 += w[i] * x0[i];
          s1 += w[i] * x1[i];
          s2 += w[i] * x2[i];
          s3 += w[i] * x3[i];
        }
        hj[k] += s0;
        hj[k + 1] += s1;
        hj[k + 2] += s2;
        hj[k + 3] += s3;
      }
      for (; k < d; ++k) {
        const double* xk = Xt + k * P + i0;
        double acc = 0.0;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < m; ++i) acc += w[i] * xk[i];
        hj[k] += acc;
      }
    }
  }
}

// Writes (or, with `accumulate`, adds) replication r's sums; the Hessian mirrored from its upper triangle.
void store(const Partial& p, int64_t r, int64_t d, int mode, bool accumulate, double* value, double* grad,
           double* hess) {
  auto put = [accumulate](double& out, double v) { out = accumulate ? out + v : v; };
  put(value[r], p.value);
  for (int64_t j = 0; j < (mode >= 1 ? d : 0); ++j) put(grad[r * d + j], p.grad[j]);
  if (mode < 2)
    return;
  double* H = hess + r * d * d;
  for (int64_t j = 0; j < d; ++j)
    for (int64_t k = j; k < d; ++k) {
      put(H[j * d + k], p.hess[j * d + k]);
      if (k != j)
        put(H[k * d + j], p.hess[j * d + k]);
    }
}

}  // namespace

extern "C" {

int rr_kernel_version() { return 1; }

// value (R), grad (R x d), hess (R x d x d) may be null when `mode` does not ask for them; u_out (R x P)
// receives the margins when not null.
void rr_logistic_eval(int64_t R, int64_t P, int64_t d, const double* Xt, const double* a, const double* b,
                      const double* theta, int mode, int accumulate, int threads, double* value, double* grad,
                      double* hess, double* u_out) {
  // Split each replication's pairs into `splits` ranges when there are fewer replications than threads.
  int64_t splits = 1;
  if (R < threads && P >= 8 * kChunk)
    splits = std::min<int64_t>((threads + R - 1) / R, P / (4 * kChunk));
  const int64_t items = R * splits;
  const int64_t span = ((P + splits - 1) / splits + kChunk - 1) / kChunk * kChunk;
  std::vector<Partial> parts(splits > 1 ? items : 0);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (items > 1 && threads > 1)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t r = it / splits, s = it % splits;
    const int64_t lo = std::min(P, s * span), hi = std::min(P, lo + span);
    Partial local{0.0, std::vector<double>(mode >= 1 ? d : 0, 0.0), std::vector<double>(mode >= 2 ? d * d : 0, 0.0)};
    pair_range(P, d, Xt + r * d * P, a + r * P, b + r * P, theta + r * d, mode, lo, hi,
               u_out ? u_out + r * P : nullptr, local);
    if (splits > 1) {
      parts[it] = std::move(local);
      continue;
    }
    store(local, r, d, mode, accumulate, value, grad, hess);
  }
  if (splits == 1)
    return;
  for (int64_t r = 0; r < R; ++r) {  // fixed order: the result does not depend on the schedule
    Partial& first = parts[r * splits];
    for (int64_t s = 1; s < splits; ++s) {
      const Partial& q = parts[r * splits + s];
      first.value += q.value;
      for (size_t j = 0; j < q.grad.size(); ++j) first.grad[j] += q.grad[j];
      for (size_t j = 0; j < q.hess.size(); ++j) first.hess[j] += q.hess[j];
    }
    store(first, r, d, mode, accumulate, value, grad, hess);
  }
}

}  // extern "C"
