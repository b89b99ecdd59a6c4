// Compiled kernels of the fitting engine (robust_rlhf.theory.kernels), parallel over replications in the
// OpenMP runtime torch has already loaded (same soname), so they share torch's threads.
//
// rr_logistic_eval: for replication r with features x_{r,i,:} = X[r, i, :] (R x P x d, row-major; each block
// of pairs transposed in the thread's L1 cache), coefficients a_ri, b_ri and a point theta_r:
//   u_i = x_i . theta_r,  value_r = sum_i a_i softplus(u_i) - b_i u_i,
//   grad_r = sum_i (a_i sigmoid(u_i) - b_i) x_i,  hess_r = sum_i a_i sigmoid(u_i) sigmoid(-u_i) x_i x_i^T,
// in one pass over blocks of pairs whose rows stay in the L1 cache (pair_range): margins, the elementwise terms,
// the gradient, and the Hessian's 4 x 4 tiles of the upper triangle (the diagonal tiles form their upper halves
// only: 55 entries for d = 10), whose eight-lane sums are kept across the blocks and summed once; with
// `accumulate` the results are added to the outputs. A replication's pairs are split over threads when there are
// fewer replications than threads.
// rr_margins: u = X theta. rr_cluster_moments: the cluster sandwich's meat as a quadratic in lambda;
// rr_logistic_cluster_moments: the same for the logistic loss, its coefficients formed from the margins in the same pass.
// rr_logistic_newton: fitting's damped Newton on the logistic VR objective, one replication per thread, until it
// converges or needs the caller's safeguards (backtracking, damping, certificates); on request also the sandwich's
// meat at the estimate, from the last evaluation's coefficients while the replication is in the cache, and a
// pre-step with a shared Hessian (the mean of other replications' at their estimates) from a gradient alone.
// rr_spd_factor: whether small symmetric matrices are positive definite, and their inverses (the sandwich's bread).
// rr_policy_regret: the per-prompt regret of the greedy or KL policy of each theta_r (robust_rlhf.theory.policies).
#include <algorithm>
#include <cmath>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace {

constexpr int64_t kChunk = 64;

struct Partial {
  double value;
  std::vector<double> grad, hess;  // d, d * d (upper triangle used)
  std::vector<double> coef;         // empty, or every pair's c_i = a_i sigmoid(u_i) - b_i (labelled, then reference)
  double rec = 0.0, absu = 0.0;     // recession slope sum_i a_i [u_i]_+ - b_i u_i, and sum_i |u_i|
  double against = 0.0;             // pairs with y_i u_i < 0
};

// Eight doubles: a 512-bit register with AVX-512, two 256-bit ones otherwise (GCC and Clang vector extension).
typedef double v8d __attribute__((vector_size(64)));
constexpr int64_t kLanes = 8;

inline v8d load8(const double* p) {
  v8d v;
  std::memcpy(&v, p, sizeof v);  // unaligned load
  return v;
}

inline void store8(double* p, v8d v) { std::memcpy(p, &v, sizeof v); }

// 1 / x for x in [1, 2]: with AVX-512 a 14-bit estimate and two Newton steps r (2 - x r) (error below 2^-52
// relative, against 16 cycles of the eight-lane division), else the division.
inline v8d reciprocal(v8d x) {
#ifdef __AVX512F__
  v8d r = reinterpret_cast<v8d>(_mm512_rcp14_pd(reinterpret_cast<__m512d>(x)));
  r = r * (2.0 - x * r);
  return r * (2.0 - x * r);
#else
  return 1.0 / x;
#endif
}

// u[i] = sum_j th_j X[j s + i] for i < m (rows of X at stride s): 32 pairs at a time in four eight-lane sums
// held in registers over the d rows.
inline void block_margins(const double* X, int64_t s, int64_t d, const double* th, int64_t m, double* u) {
  int64_t i = 0;
  for (; i + 32 <= m; i += 32) {
    v8d s0{}, s1{}, s2{}, s3{};
    for (int64_t j = 0; j < d; ++j) {
      const double* x = X + j * s + i;
      const double t = th[j];
      s0 += t * load8(x);
      s1 += t * load8(x + 8);
      s2 += t * load8(x + 16);
      s3 += t * load8(x + 24);
    }
    store8(u + i, s0);
    store8(u + i + 8, s1);
    store8(u + i + 16, s2);
    store8(u + i + 24, s3);
  }
  for (; i < m; ++i) {
    double t = 0.0;
    for (int64_t j = 0; j < d; ++j) t += th[j] * X[j * s + i];
    u[i] = t;
  }
}

// acc += sum_{i < m} c_i x_i (eight lanes; four partial sums, so the additions do not wait on each other), and
// with hx, hx[i] = h_i x_i.
inline void weighted_sum(const double* c, const double* x, const double* h, int64_t m, v8d& acc, double* hx) {
  v8d s0 = acc, s1{}, s2{}, s3{};
  int64_t i = 0;
  for (; i + 32 <= m; i += 32) {
    const v8d x0 = load8(x + i), x1 = load8(x + i + 8), x2 = load8(x + i + 16), x3 = load8(x + i + 24);
    s0 += load8(c + i) * x0;
    s1 += load8(c + i + 8) * x1;
    s2 += load8(c + i + 16) * x2;
    s3 += load8(c + i + 24) * x3;
    if (hx) {
      store8(hx + i, load8(h + i) * x0);
      store8(hx + i + 8, load8(h + i + 8) * x1);
      store8(hx + i + 16, load8(h + i + 16) * x2);
      store8(hx + i + 24, load8(h + i + 24) * x3);
    }
  }
  for (; i < m; ++i) {
    s0[0] += c[i] * x[i];
    if (hx)
      hx[i] = h[i] * x[i];
  }
  acc = (s0 + s1) + (s2 + s3);
}

// xt[k * stride + i] = X[i * d + k] for the m rows of X (row-major).
inline void transpose_rows(const double* X, int64_t m, int64_t d, double* xt, int64_t stride) {
  for (int64_t k = 0; k < d; ++k)
    for (int64_t i = 0; i < m; ++i) xt[k * stride + i] = X[i * d + k];
}

// acc[p][q] += sum_{i < m} h_i u[p][i] v[q][i] (h null: 1) for NJ rows u and NK rows v, eight lanes per entry
// (acc: NJ x 4 of them), q >= p only when TRI (a diagonal tile of a symmetric product): the accumulators stay
// in registers over the m pairs (a multiple of 8), NJ + NK loads per NJ NK multiply-adds.
template <int NJ, int NK, bool TRI>
void gram_tile(const double* const* u, const double* const* v, const double* h, int64_t m, v8d* acc) {
  v8d t[NJ][NK];
  for (int p = 0; p < NJ; ++p)
    for (int q = 0; q < NK; ++q) t[p][q] = acc[p * 4 + q];
  for (int64_t i = 0; i < m; i += kLanes) {
    v8d a[NJ], b[NK];
    const v8d w = h ? load8(h + i) : v8d{} + 1.0;
#pragma GCC unroll 4
    for (int p = 0; p < NJ; ++p) a[p] = h ? load8(u[p] + i) * w : load8(u[p] + i);
#pragma GCC unroll 4
    for (int q = 0; q < NK; ++q) b[q] = load8(v[q] + i);
#pragma GCC unroll 4
    for (int p = 0; p < NJ; ++p)
#pragma GCC unroll 4
      for (int q = 0; q < NK; ++q)
        if (!TRI || q >= p) t[p][q] += a[p] * b[q];
  }
  for (int p = 0; p < NJ; ++p)
    for (int q = 0; q < NK; ++q) acc[p * 4 + q] = t[p][q];
}

template <int NJ, bool TRI>
void gram_tile_rows(int nk, const double* const* u, const double* const* v, const double* h, int64_t m, v8d* acc) {
  switch (nk) {
    case 1: return gram_tile<NJ, 1, TRI>(u, v, h, m, acc);
    case 2: return gram_tile<NJ, 2, TRI>(u, v, h, m, acc);
    case 3: return gram_tile<NJ, 3, TRI>(u, v, h, m, acc);
    default: return gram_tile<NJ, 4, TRI>(u, v, h, m, acc);
  }
}

template <bool TRI>
void gram_tile_of(int nj, int nk, const double* const* u, const double* const* v, const double* h, int64_t m,
                  v8d* acc) {
  switch (nj) {
    case 1: return gram_tile_rows<1, TRI>(nk, u, v, h, m, acc);
    case 2: return gram_tile_rows<2, TRI>(nk, u, v, h, m, acc);
    case 3: return gram_tile_rows<3, TRI>(nk, u, v, h, m, acc);
    default: return gram_tile_rows<4, TRI>(nk, u, v, h, m, acc);
  }
}

// Eight-lane accumulators of a d x d product in 4 x 4 tiles: tile (jb, kb) holds entries (4 jb + p, 4 kb + q)
// at (jb nb + kb) 16 + 4 p + q.
struct Tiles {
  int64_t d, nb;
  v8d* acc;
  std::vector<v8d> own;
  explicit Tiles(int64_t d_) : d(d_), nb((d_ + 3) / 4), own(nb * nb * 16, v8d{}) { acc = own.data(); }
  // zeroed accumulators in `store` (kept by the caller, so a hot loop does not allocate)
  Tiles(int64_t d_, std::vector<v8d>& store) : d(d_), nb((d_ + 3) / 4) {
    store.assign(nb * nb * 16, v8d{});
    acc = store.data();
  }
  v8d& entry(int64_t j, int64_t k) const { return acc[((j / 4) * nb + k / 4) * 16 + (j % 4) * 4 + k % 4]; }

  // += sum_{i < m} h_i U[j][i] V[k][i] (rows at strides su, sv), every tile over these m pairs in turn (so a
  // block that fits the L1 cache is read from memory or L2 once); with `upper` the product is symmetric
  // (U = V, or U = h V taken with h null) and only the entries k >= j are formed.
  void add(const double* U, int64_t su, const double* V, int64_t sv, const double* h, int64_t m, bool upper) {
    const int64_t full = m / kLanes * kLanes;
    for (int64_t j = 0; j < d; ++j)  // the last m % 8 pairs, to lane 0
      for (int64_t k = upper ? j : 0; k < d; ++k)
        for (int64_t i = full; i < m; ++i) entry(j, k)[0] += (h ? h[i] : 1.0) * U[j * su + i] * V[k * sv + i];
    m = full;
    const double* u[4];
    const double* v[4];
    for (int64_t jb = 0; jb < nb; ++jb) {
      const int nj = static_cast<int>(std::min<int64_t>(4, d - 4 * jb));
      for (int p = 0; p < nj; ++p) u[p] = U + (4 * jb + p) * su;
      for (int64_t kb = upper ? jb : 0; kb < nb; ++kb) {
        const int nk = static_cast<int>(std::min<int64_t>(4, d - 4 * kb));
        for (int q = 0; q < nk; ++q) v[q] = V + (4 * kb + q) * sv;
        v8d* t = acc + (jb * nb + kb) * 16;
        if (upper && kb == jb)
          gram_tile_of<true>(nj, nk, u, v, h, m, t);
        else
          gram_tile_of<false>(nj, nk, u, v, h, m, t);
      }
    }
  }

  // out[j][k] += the lanes' sum of entry (j, k), for k >= j only when `upper`.
  void sum_into(double* out, bool upper) const {
    for (int64_t j = 0; j < d; ++j)
      for (int64_t k = upper ? j : 0; k < d; ++k) {
        const v8d& e = entry(j, k);
        double s = 0.0;
        for (int l = 0; l < kLanes; ++l) s += e[l];
        out[j * d + k] += s;
      }
  }
};

// Pairs per block of the tiled products, for d features and `rows` rows of eight bytes per pair: up to d = 10,
// as many as fit the L1 cache (at least 64); beyond, longer runs per tile (fewer loads and stores of its
// eight-lane sums per pair) pay more than rows kept in L1: 256 pairs, and kMaxBlock from d = 40 (measured on one
// replication in cache, n = 2000: the L1 rule lost 7-28 % at d = 11-100 against the unblocked tiles of stop 32;
// these blocks are within 2 % of them at d = 11-40, 3-6 % faster at d = 50-100, 30 % at d = 200).
constexpr int64_t kMaxBlock = 512;
inline int64_t tile_block(int64_t d, int64_t rows) {
  if (d >= 40)
    return kMaxBlock;
  if (d > 10)
    return 256;
  return std::clamp<int64_t>((24576 / (8 * rows)) / kLanes * kLanes, 64, kMaxBlock);
}

// out[j][k] += sum_{i < m} h_i U[j][i] V[k][i] (h null: 1; rows of U, V at strides su, sv), for k >= j only
// when `upper` (U = V; the other triangle is left alone), in tiles of 4 x 4 entries over blocks of pairs
// whose rows fit the L1 cache (tile by tile over all m pairs, each tile would stream the rows from L2 again).
void gram(const double* U, int64_t su, const double* V, int64_t sv, const double* h, int64_t m, int64_t d,
          bool upper, double* out) {
  const int64_t block = tile_block(d, U == V && su == sv ? d + 1 : 2 * d + 1);
  Tiles tiles(d);
  for (int64_t i0 = 0; i0 < m; i0 += block)
    tiles.add(U + i0, su, V + i0, sv, h ? h + i0 : nullptr, std::min(block, m - i0), upper);
  tiles.sum_into(out, upper);
}

// Sums over pairs [lo, hi) of replication r into p (mode 0: value, 1: + gradient, 2: + Hessian), in blocks of
// pairs whose rows stay in the L1 cache from the margins to the Hessian: margins, then the elementwise terms,
// then the gradient sum_i c_i x_i and (mode 2) the rows h x_j, whose products with the rows x_k the Hessian's
// tiles accumulate. With coef, the pairs' gradient coefficients c_i = a_i sigmoid(u_i) - b_i go to coef[i - lo].
// Without `value` the softplus terms (a log1p per pair) are skipped and p.value is not the objective. Xt holds
// the features transposed (row j, coordinate j of every pair, at Xt + j P), or with `row_major` as they come
// (pair i at Xt + i d), each block then transposed into the thread's L1 scratch first.
void pair_range(int64_t P, int64_t d, const double* Xt, const double* a, const double* b, const double* th,
                const double* y, int mode, bool recession, int64_t lo, int64_t hi, Partial& p,
                double* coef = nullptr, bool value = true, bool row_major = false) {
  const int64_t block = tile_block(d, 2 * d + 3);
  alignas(64) double u[kMaxBlock], chunk_c[kMaxBlock], h[kMaxBlock], e[kMaxBlock], soft[kMaxBlock];
  // the thread's scratch, kept from call to call: the rows h x_j (64-byte aligned: no load spans two cache
  // lines), the gradient's and the Hessian's eight-lane sums
  thread_local std::vector<v8d> hx_lines, gacc, tile_store, xb_lines;
  hx_lines.resize(mode >= 2 ? d * block / kLanes : 0);
  xb_lines.resize(row_major ? d * block / kLanes : 0);
  double* hx = reinterpret_cast<double*>(hx_lines.data());
  gacc.assign(mode >= 1 ? d : 0, v8d{});
  Tiles tiles(mode >= 2 ? d : 0, tile_store);
  for (int64_t i0 = lo; i0 < hi; i0 += block) {
    const int64_t m = std::min(block, hi - i0);
    const double* ai = a + i0;
    const double* bi = b + i0;
    double* c = coef ? coef + (i0 - lo) : chunk_c;
    const double* xs = Xt + i0;  // the block's rows: xs + j stride
    int64_t stride = P;
    if (row_major) {
      xs = reinterpret_cast<double*>(xb_lines.data());
      stride = block;
      transpose_rows(Xt + i0 * d, m, d, reinterpret_cast<double*>(xb_lines.data()), block);
    }
    block_margins(xs, stride, d, th, m, u);
    double curved = 0.0;  // pairs with a != 0 (none: VRPO's labelled pairs at lam = 1)
#pragma omp simd reduction(+ : curved)
    for (int64_t i = 0; i < m; ++i) curved += ai[i] != 0.0 ? 1.0 : 0.0;
    double val = 0.0;
    if (curved == 0.0) {
#pragma omp simd reduction(+ : val)
      for (int64_t i = 0; i < m; ++i) {
        val -= bi[i] * u[i];
        c[i] = -bi[i];
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) e[i] = std::exp(-std::fabs(u[i]));  // glibc's vector exp (libmvec)
      if (value) {
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) soft[i] = std::fmax(u[i], 0.0) + std::log1p(e[i]);  // softplus(u)
      }
      const int64_t full = m / kLanes * kLanes;
      v8d vals{};
      for (int64_t i = 0; i < full; i += kLanes) {
        const v8d ui = load8(u + i), ei = load8(e + i), av = load8(ai + i), bv = load8(bi + i);
        const v8d inv = reciprocal(1.0 + ei);
        const v8d sig = ui >= 0.0 ? inv : ei * inv;  // sigmoid(u)
        if (value)
          vals += av * load8(soft + i) - bv * ui;
        store8(h + i, av * ei * inv * inv);  // a sigmoid(u) sigmoid(-u)
        store8(c + i, av * sig - bv);
      }
      for (int64_t l = 0; l < kLanes; ++l) val += vals[l];
      for (int64_t i = full; i < m; ++i) {
        const double inv = 1.0 / (1.0 + e[i]);
        if (value)
          val += ai[i] * soft[i] - bi[i] * u[i];
        h[i] = ai[i] * e[i] * inv * inv;
        c[i] = ai[i] * (u[i] >= 0.0 ? inv : e[i] * inv) - bi[i];
      }
    }
    p.value += val;
    if (recession) {
      double slope = 0.0, size = 0.0;
#pragma omp simd reduction(+ : slope, size)
      for (int64_t i = 0; i < m; ++i) {
        slope += ai[i] * std::fmax(u[i], 0.0) - bi[i] * u[i];
        size += std::fabs(u[i]);
      }
      p.rec += slope;
      p.absu += size;
    }
    if (y) {
      double count = 0.0;
#pragma omp simd reduction(+ : count)
      for (int64_t i = 0; i < m; ++i) count += y[i0 + i] * u[i] < 0.0 ? 1.0 : 0.0;
      p.against += count;
    }
    if (mode < 1)
      continue;
    const bool hessian = mode >= 2 && curved != 0.0;
    for (int64_t j = 0; j < d; ++j)
      weighted_sum(c, xs + j * stride, h, m, gacc[j], hessian ? hx + j * block : nullptr);
    if (hessian)
      tiles.add(hx, block, xs, stride, nullptr, m, true);
  }
  for (int64_t j = 0; j < (mode >= 1 ? d : 0); ++j) {
    double s = 0.0;
    for (int l = 0; l < kLanes; ++l) s += gacc[j][l];
    p.grad[j] += s;
  }
  if (mode >= 2)
    tiles.sum_into(p.hess.data(), true);
}

// Writes (or, with `accumulate`, adds) replication r's sums; the Hessian mirrored from its upper triangle.
void store(const Partial& p, int64_t r, int64_t d, int mode, bool accumulate, double* value, double* grad,
           double* hess, double* rec, double* absu, double* against) {
  auto put = [accumulate](double& out, double v) { out = accumulate ? out + v : v; };
  put(value[r], p.value);
  if (rec) {
    put(rec[r], p.rec);
    put(absu[r], p.absu);
  }
  if (against)
    put(against[r], p.against);
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


// X (P x d, row-major) transposed into xt (row k at xt + k stride), chunk by chunk of kChunk rows; returns
// max_i ||x_i||, the squares summed from the transposed chunk while it is in the L1 cache.
double transpose_norms(const double* X, int64_t P, int64_t d, double* xt, int64_t stride) {
  alignas(64) double sq[kChunk];
  double top = 0.0;
  for (int64_t i0 = 0; i0 < P; i0 += kChunk) {
    const int64_t m = std::min(kChunk, P - i0);
    transpose_rows(X + i0 * d, m, d, xt + i0, stride);
    std::fill(sq, sq + m, 0.0);
    for (int64_t k = 0; k < d; ++k) {
      const double* x = xt + k * stride + i0;
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) sq[i] += x[i] * x[i];
    }
    for (int64_t i = 0; i < m; ++i) top = std::max(top, sq[i]);
  }
  return std::sqrt(top);
}

// u_i = x_i . theta for the P rows of X (row-major, P x d): each row by 8-lane products against theta in blocks
// of 8 (zero-padded), summed across the lanes. A row's last block may read the next row's first entries, which
// meet the zero padding (finite features: 0 x = 0); the rows whose last block would read past X are summed
// one entry at a time.
void row_margins(const double* X, const double* th, int64_t P, int64_t d, double* u) {
  const int64_t blocks = (d + kLanes - 1) / kLanes;
  std::vector<v8d> tv(blocks);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t l = 0; l < kLanes; ++l) tv[b][l] = b * kLanes + l < d ? th[b * kLanes + l] : 0.0;
  const int64_t safe = P * d >= blocks * kLanes ? std::min(P, (P * d - blocks * kLanes) / d + 1) : 0;
  for (int64_t i = 0; i < safe; ++i) {
    const double* xi = X + i * d;
    v8d acc = load8(xi) * tv[0];
    for (int64_t b = 1; b < blocks; ++b) acc += load8(xi + b * kLanes) * tv[b];
    double total = 0.0;
    for (int64_t l = 0; l < kLanes; ++l) total += acc[l];
    u[i] = total;
  }
  for (int64_t i = safe; i < P; ++i) {
    double total = 0.0;
    for (int64_t k = 0; k < d; ++k) total += X[i * d + k] * th[k];
    u[i] = total;
  }
}

// s_i = sigmoid(x_i . theta) for the P rows of X (row-major, P x d): the margins, then the exponentials
// over all of them at once (vectorised; exp of -|u| only, so nothing overflows).
void sigmoid_margins(const double* X, const double* th, int64_t P, int64_t d, double* s) {
  row_margins(X, th, P, d, s);
#pragma omp simd
  for (int64_t i = 0; i < P; ++i) {
    const double u = s[i];
    const double e = std::exp(-std::fabs(u));
    const double inv = 1.0 / (1.0 + e);
    s[i] = u >= 0.0 ? inv : e * inv;
  }
}

// The centred cross-products of the clusters [lo, hi) of a replication, from their sums stored transposed
// (At, Bt: d x C, row k holding coordinate k of every cluster; null: zero), which are centred in place:
// out_AA += f sum_c (A_c - Abar)(A_c - Abar)^T and likewise AB, BB, f = C_p / (C_p - 1) the small-sample factor
// of the part's C_p = hi - lo clusters.
void centred_moments(double* At, double* Bt, int64_t C, int64_t lo, int64_t hi, int64_t d, double* AA, double* AB,
                     double* BB) {
  const int64_t count = hi - lo;
  if (count <= 0)
    return;
  for (double* T : {At, Bt}) {
    if (!T)
      continue;
    for (int64_t k = 0; k < d; ++k) {
      double* row = T + k * C + lo;
      double mean = 0.0;
#pragma omp simd reduction(+ : mean)
      for (int64_t c = 0; c < count; ++c) mean += row[c];
      mean /= count;
#pragma omp simd
      for (int64_t c = 0; c < count; ++c) row[c] -= mean;
    }
  }
  std::vector<double> sAA(d * d, 0.0), sAB(d * d, 0.0), sBB(d * d, 0.0);
  if (At && AA)
    gram(At + lo, C, At + lo, C, nullptr, count, d, true, sAA.data());
  if (At && Bt && AB)
    gram(At + lo, C, Bt + lo, C, nullptr, count, d, false, sAB.data());
  if (Bt && BB)
    gram(Bt + lo, C, Bt + lo, C, nullptr, count, d, true, sBB.data());
  const double f = count / static_cast<double>(std::max<int64_t>(count - 1, 1));
  for (int64_t j = 0; j < d; ++j)
    for (int64_t k = 0; k < d; ++k) {
      const int64_t up = j <= k ? j * d + k : k * d + j;
      if (AA) AA[j * d + k] += f * sAA[up];
      if (AB) AB[j * d + k] += f * sAB[j * d + k];
      if (BB) BB[j * d + k] += f * sBB[up];
    }
}

// Per-thread partial sums for centred_gram (slot t of the team's thread t), added in thread order: the results
// depend on the number of threads, not on the schedule.
struct TeamSums {
  std::vector<double> sums, grams, mean;
  TeamSums(int threads, int64_t d) : sums(threads * d), grams(threads * d * d), mean(d) {}
};

// out (upper triangle) += f sum_{c in [lo, hi)} (y_c - ybar)(y_c - ybar)^T, y_c = (y(c, 0), ..., y(c, d - 1)),
// f = m / (m - 1) over the m = hi - lo rows: the mean first, then the centred rows transposed chunk by chunk into
// the L1 cache for the Gram's tiles (no m x d scratch). Called by every thread of the enclosing parallel region,
// which share its loops (or outside one, by a single thread).
template <class Y>
void centred_gram(const Y& y, int64_t lo, int64_t hi, int64_t d, TeamSums& team, double* out) {
  const int t = omp_get_thread_num();
  std::vector<double> acc(d, 0.0);
#pragma omp for schedule(static)
  for (int64_t c = lo; c < hi; ++c)
    for (int64_t k = 0; k < d; ++k) acc[k] += y(c, k);
  std::copy(acc.begin(), acc.end(), team.sums.begin() + t * d);
#pragma omp barrier
#pragma omp single
  {
    std::fill(team.mean.begin(), team.mean.end(), 0.0);
    for (int u = 0; u < omp_get_num_threads(); ++u)
      for (int64_t k = 0; k < d; ++k) team.mean[k] += team.sums[u * d + k];
    for (int64_t k = 0; k < d; ++k) team.mean[k] /= static_cast<double>(std::max<int64_t>(hi - lo, 1));
  }
  const double* mean = team.mean.data();
  const int64_t block = tile_block(d, d + 1);
  std::vector<v8d> yt_lines(d * block / kLanes);
  double* yt = reinterpret_cast<double*>(yt_lines.data());
  Tiles tiles(d);
#pragma omp for schedule(static)
  for (int64_t c0 = lo; c0 < hi; c0 += block) {
    const int64_t m = std::min(block, hi - c0);
    for (int64_t k = 0; k < d; ++k)
      for (int64_t i = 0; i < m; ++i) yt[k * block + i] = y(c0 + i, k) - mean[k];
    tiles.add(yt, block, yt, block, nullptr, m, true);
  }
  double* mine = team.grams.data() + t * d * d;
  std::fill(mine, mine + d * d, 0.0);
  tiles.sum_into(mine, true);
#pragma omp barrier
#pragma omp single
  {
    const double f = (hi - lo) / static_cast<double>(std::max<int64_t>(hi - lo - 1, 1));
    for (int u = 0; u < omp_get_num_threads(); ++u)
      for (int64_t j = 0; j < d; ++j)
        for (int64_t k = j; k < d; ++k) out[j * d + k] += f * team.grams[(u * d + j) * d + k];
  }
}

// out's lower triangle from its upper one.
void mirror(double* out, int64_t d) {
  for (int64_t j = 0; j < d; ++j)
    for (int64_t k = 0; k < j; ++k) out[j * d + k] = out[k * d + j];
}

// The meat without control terms, where the n labelled pairs are the clusters: out = f sum_i (y_i - ybar)
// (y_i - ybar)^T over y_i = cA_i x_i (X row-major, n x d), f = n / (n - 1) (centred_gram), split over `threads`.
void labelled_moments(int64_t n, int64_t d, const double* X, const double* cA, double* out, int threads = 1) {
  TeamSums team(threads, d);
  std::fill(out, out + d * d, 0.0);
#pragma omp parallel num_threads(threads) if (threads > 1)
  centred_gram([&](int64_t i, int64_t k) { return cA[i] * X[i * d + k]; }, 0, n, d, team, out);
  mirror(out, d);
}

// Replication r's cluster moments (rr_cluster_moments); without cB the labelled pairs alone (labelled_moments, over
// `threads`).
// With cB, scratch At and Bt (d x C): the cluster sums formed transposed. B is formed first in rows, in At's space (a reference
// pair adds to one row of d contiguous entries; added straight into Bt, each would touch d cache lines), then
// transposed into Bt; A then overwrites At, chunk by chunk of rows transposed in the cache.
void replication_moments(int64_t n, int64_t N, int64_t d, int64_t C, const double* Xr, const double* cA,
                         const double* cB, const double* Xq, const double* cR, const int64_t* cluster,
                         std::vector<double>& At, std::vector<double>& Bt, double* aa, double* ab, double* bb,
                         int threads = 1) {
  if (!cB) {
    labelled_moments(n, d, Xr, cA, aa, threads);
    return;
  }
  double* rows = At.data();  // C x d
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) rows[i * d + k] = cB[i] * Xr[i * d + k];
  std::fill(rows + n * d, rows + C * d, 0.0);  // the other prompts: reference pairs only
  for (int64_t j = 0; j < N; ++j) {
    const double cj = cR[j];
    const double* xj = Xq + j * d;
    double* row = rows + cluster[j] * d;
    for (int64_t k = 0; k < d; ++k) row[k] += cj * xj[k];
  }
  for (int64_t c0 = 0; c0 < C; c0 += kChunk)
    transpose_rows(rows + c0 * d, std::min(kChunk, C - c0), d, Bt.data() + c0, C);
  std::vector<double> xt(d * kChunk);
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t m = std::min(kChunk, n - i0);
    transpose_rows(Xr + i0 * d, m, d, xt.data(), kChunk);
    for (int64_t k = 0; k < d; ++k) {
      const double* xk = xt.data() + k * kChunk;
      double* ak = At.data() + k * C + i0;
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) ak[i] = cA[i0 + i] * xk[i];
    }
  }
  std::fill(aa, aa + d * d, 0.0);
  std::fill(ab, ab + d * d, 0.0);
  std::fill(bb, bb + d * d, 0.0);
  centred_moments(At.data(), Bt.data(), C, 0, n, d, aa, ab, bb);
  centred_moments(nullptr, Bt.data(), C, n, C, d, nullptr, nullptr, bb);
}

// The meat V(lam) of one replication of the logistic VR objective at th (rr_logistic_cluster_moments with lam): the
// cluster sums S_c = (cA_c + lam cB_c) x_c [c < n] + lam sum_{j: cluster(j) = c} cR_j xref_j formed from the
// margins chunk by chunk in rows (C x d scratch), then each part's (labelled prompts [0, n), others [n, C))
// centred_gram. With `threads` > 1 the pairs and clusters of this replication are split over them (one large
// replication); the reference pairs then by runs when cluster(j) = j / group (group > 0), else by one thread.
void fused_meat(int64_t n, int64_t N, int64_t d, int64_t C, const double* X, const double* z, const double* g,
                const double* Xq, const double* gq, const double* wq, const int64_t* cluster, int64_t group,
                const double* th, double lam, int threads, double* rows, double* out) {
  TeamSums team(threads, d);
  std::fill(out, out + d * d, 0.0);
  const double inv_n = 1.0 / static_cast<double>(n), w_all = N ? 1.0 / static_cast<double>(N) : 0.0;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    alignas(64) double s[kChunk];
#pragma omp for schedule(static)
    for (int64_t i0 = 0; i0 < n; i0 += kChunk) {  // labelled rows: (cA + lam cB) x = ((1 - lam) s - z + lam g) x / n
      const int64_t m = std::min(kChunk, n - i0);
      sigmoid_margins(X + i0 * d, th, m, d, s);
      for (int64_t i = 0; i < m; ++i) {
        const double c = ((1.0 - lam) * s[i] - z[i0 + i] + lam * g[i0 + i]) * inv_n;
        for (int64_t k = 0; k < d; ++k) rows[(i0 + i) * d + k] = c * X[(i0 + i) * d + k];
      }
    }
#pragma omp for schedule(static)
    for (int64_t c = n; c < C; ++c) std::fill(rows + c * d, rows + c * d + d, 0.0);
    // reference pairs: lam cR_j xref_j added to their clusters' rows, cR_j = w_j (s_j - gref_j)
    const auto add_refs = [&](int64_t lo, int64_t hi) {
      for (int64_t j0 = lo; j0 < hi; j0 += kChunk) {
        const int64_t m = std::min(kChunk, hi - j0);
        sigmoid_margins(Xq + j0 * d, th, m, d, s);
        for (int64_t j = 0; j < m; ++j) {
          const double c = lam * (wq ? wq[j0 + j] : w_all) * (s[j] - gq[j0 + j]);
          double* row = rows + cluster[j0 + j] * d;
          for (int64_t k = 0; k < d; ++k) row[k] += c * Xq[(j0 + j) * d + k];
        }
      }
    };
    if (group > 0) {
      const int64_t runs = N / group, per = std::max<int64_t>(1, kChunk / group);
#pragma omp for schedule(static)
      for (int64_t r0 = 0; r0 < runs; r0 += per) add_refs(r0 * group, std::min(runs, r0 + per) * group);
    } else {
#pragma omp single
      add_refs(0, N);
    }
    // each part's centred Gram
    const auto row = [&](int64_t c, int64_t k) { return rows[c * d + k]; };
    centred_gram(row, 0, n, d, team, out);
    centred_gram(row, n, C, d, team, out);
  }
  mirror(out, d);
}

// L L^T = A for the symmetric d x d matrix A (row-major, upper triangle read), L lower triangular (row-major);
// false where A is not positive definite (or not finite).
bool cholesky(const double* A, int64_t d, double* L) {
  for (int64_t j = 0; j < d; ++j) {
    double s = A[j * d + j];
    for (int64_t k = 0; k < j; ++k) s -= L[j * d + k] * L[j * d + k];
    if (!(s > 0.0) || !std::isfinite(s))
      return false;
    const double ljj = std::sqrt(s);
    L[j * d + j] = ljj;
    for (int64_t i = j + 1; i < d; ++i) {
      double t = A[j * d + i];
      for (int64_t k = 0; k < j; ++k) t -= L[i * d + k] * L[j * d + k];
      L[i * d + j] = t / ljj;
    }
  }
  return true;
}

// Whether the n entries of A are finite, read from their bits (-ffast-math lets the compiler assume finite values,
// so std::isfinite and comparisons with NaN may not be evaluated).
bool all_finite(const double* A, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) {
    uint64_t bits;
    std::memcpy(&bits, A + i, sizeof bits);
    ok &= (bits & 0x7ff0000000000000ULL) != 0x7ff0000000000000ULL;
  }
  return ok;
}

// x = -(L L^T)^{-1} g.
void newton_step(const double* L, const double* g, int64_t d, double* x) {
  for (int64_t i = 0; i < d; ++i) {
    double t = -g[i];
    for (int64_t k = 0; k < i; ++k) t -= L[i * d + k] * x[k];
    x[i] = t / L[i * d + i];
  }
  for (int64_t i = d - 1; i >= 0; --i) {
    double t = x[i];
    for (int64_t k = i + 1; k < d; ++k) t -= L[k * d + i] * x[k];
    x[i] = t / L[i * d + i];
  }
}

// One replication's logistic VR objective at th: value, gradient and Hessian (upper triangle) over the labelled
// pairs and, with Xq, the reference pairs; with `cert`, whether th certifies that no minimiser exists (the overlap
// condition without reference pairs, a negative recession slope with them: fitting._kernel_evaluate's rules).
// X and Xq hold the features transposed, row j (coordinate j of every pair) at X + j sx and Xq + j sq.
struct Objective {
  int64_t n, N, d, sx, sq;
  const double *X, *a, *b, *y, *Xq, *aq, *bq;
  double lam;

  // with `value` false, p.value is left undefined (no softplus terms: see rr_logistic_newton's certificate)
  bool eval(const double* th, bool cert, Partial& p, bool value = true) const {
    p.value = p.rec = p.absu = p.against = 0.0;
    std::fill(p.grad.begin(), p.grad.end(), 0.0);
    std::fill(p.hess.begin(), p.hess.end(), 0.0);
    const bool ref = Xq != nullptr;
    double* coef = p.coef.empty() ? nullptr : p.coef.data();
    pair_range(sx, d, X, a, b, th, cert && !ref ? y : nullptr, 2, cert && ref, 0, n, p, coef, value);
    if (!ref) {
      bool moved = false;
      for (int64_t j = 0; j < d; ++j) moved |= th[j] != 0.0;
      return cert && moved && p.against == 0.0;
    }
    const double rec = p.rec, size = p.absu / static_cast<double>(n);
    Partial q{0.0, std::vector<double>(d, 0.0), std::vector<double>(d * d, 0.0)};
    pair_range(sq, d, Xq, aq, bq, th, nullptr, 2, cert, 0, N, q, coef ? coef + n : nullptr, value);
    p.value += q.value;
    for (int64_t j = 0; j < d; ++j) p.grad[j] += q.grad[j];
    for (int64_t j = 0; j < d * d; ++j) p.hess[j] += q.hess[j];
    return cert && rec + q.rec < -1e-9 * (size + std::fabs(lam) * q.absu / static_cast<double>(N));
  }

  // the gradient at th alone (no Hessian, no values) into p.grad
  void gradient_at(const double* th, Partial& p) const {
    std::fill(p.grad.begin(), p.grad.end(), 0.0);
    pair_range(sx, d, X, a, b, th, nullptr, 1, false, 0, n, p, nullptr, false);
    if (Xq)
      pair_range(sq, d, Xq, aq, bq, th, nullptr, 1, false, 0, N, p, nullptr, false);
  }

  // the objective at th alone
  double value_at(const double* th) const {
    Partial p{0.0, {}, {}};
    pair_range(sx, d, X, a, b, th, nullptr, 0, false, 0, n, p);
    if (Xq)
      pair_range(sq, d, Xq, aq, bq, th, nullptr, 0, false, 0, N, p);
    return p.value;
  }
};

// The reference pairs' clusters as runs of `group` pairs, cluster(j) = j / group (fitting's layout: each prompt's
// pairs in a row): that group, or 0 for any other layout.
int64_t run_group(const int64_t* cluster, int64_t N) {
  if (N <= 0 || cluster[N - 1] < 0 || N % (cluster[N - 1] + 1) != 0)
    return 0;
  const int64_t group = N / (cluster[N - 1] + 1);
  for (int64_t j = 0; j < N; ++j)
    if (cluster[j] != j / group)
      return 0;
  return group;
}

// sum_{m < group} c[r group + m] x[r group + m] added to s[r] for each run r (G: group known at compile time).
template <int G>
void run_sums(const double* c, const double* x, int64_t runs, int64_t group, double* s) {
  const int64_t g = G > 0 ? G : group;
  for (int64_t r = 0; r < runs; ++r) {
    double t = 0.0;
    for (int64_t m = 0; m < g; ++m) t += c[r * g + m] * x[r * g + m];
    s[r] += t;
  }
}

// The sandwich's meat V(lam) at the point whose coefficients c (labelled, then reference) f.eval stored: the
// centred Gram of the cluster sums S_c = c_i x_i [c = i < n] + sum_{j: cluster(j) = c} c_j xref_j, each part
// (labelled prompts, other clusters) on its own mean with factor C_p / (C_p - 1), as replication_moments with
// lam (a_i sigmoid(u_i) - b_i is the cluster's cA + lam cB, and a_ref sigmoid - b_ref its lam cR). grad: the
// gradient at that point. St: scratch of d x C.
// Without reference pairs the n labelled pairs are the clusters, and the meat is one weighted Gram:
// f (sum_i c_i^2 x_i x_i^T - grad grad^T / n), grad = sum_i c_i x_i.
// With group > 0 the clusters are runs of reference pairs, cluster(j) = j / group (fitting's layout: each prompt's
// pairs in a row), and each run is summed in turn; else pair by pair.
void newton_meat(const Objective& f, const double* c, const double* grad, const int64_t* cluster, int64_t group,
                 int64_t C, std::vector<double>& St, double* out) {
  const int64_t n = f.n, N = f.N, d = f.d;
  std::fill(out, out + d * d, 0.0);
  if (!f.Xq) {
    double* h = St.data();
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) h[i] = c[i] * c[i];
    gram(f.X, f.sx, f.X, f.sx, h, n, d, true, out);
    const double scale = n / static_cast<double>(std::max<int64_t>(n - 1, 1));
    for (int64_t j = 0; j < d; ++j)
      for (int64_t k = j; k < d; ++k)
        out[j * d + k] = out[k * d + j] = scale * (out[j * d + k] - grad[j] * grad[k] / n);
    return;
  }
  for (int64_t k = 0; k < d; ++k) {
    const double* xk = f.X + k * f.sx;
    double* sk = St.data() + k * C;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) sk[i] = c[i] * xk[i];
    std::fill(sk + n, sk + C, 0.0);
  }
  if (group > 0) {
    for (int64_t k = 0; k < d; ++k) {
      const double* xk = f.Xq + k * f.sq;
      double* sk = St.data() + k * C;
      switch (group) {
        case 1: run_sums<1>(c + n, xk, N, 1, sk); break;
        case 2: run_sums<2>(c + n, xk, N / 2, 2, sk); break;
        case 4: run_sums<4>(c + n, xk, N / 4, 4, sk); break;
        default: run_sums<0>(c + n, xk, N / group, group, sk);
      }
    }
  } else {
    // reference pair by pair, its d coordinates at once: the d sums of its cluster are independent chains (a
    // coordinate at a time, consecutive pairs of one prompt would chain through one sum)
    for (int64_t j = 0; j < N; ++j) {
      const double cj = c[n + j];
      double* sc = St.data() + cluster[j];
      for (int64_t k = 0; k < d; ++k) sc[k * C] += cj * f.Xq[k * f.sq + j];
    }
  }
  centred_moments(St.data(), nullptr, C, 0, n, d, out, nullptr, nullptr);
  centred_moments(St.data(), nullptr, C, n, C, d, out, nullptr, nullptr);
}

// Scratch of the cluster-moment kernels (each vector sized by its caller).
struct MomentScratch {
  std::vector<double> A, B, cA, cB, cR, s;
};

// body(scratch, r, inner) for r < R, with scratch = make() per thread: one replication per thread (inner = 1), or,
// with fewer replications than threads, one after another with inner = threads, so that a body's own parallel
// regions are top-level teams (torch's threads; a team nested in an inactive region would be a second set of
// threads, competing for the cores with torch's, which spin for a while after each of its operations).
template <class Make, class Body>
void over_replications(int64_t R, int threads, const Make& make, const Body& body) {
  if (R < threads) {
    auto scratch = make();
    for (int64_t r = 0; r < R; ++r) body(scratch, r, threads);
    return;
  }
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    auto scratch = make();
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < R; ++r) body(scratch, r, 1);
  }
}

}  // namespace

extern "C" {

int rr_kernel_version() { return 29; }

// value (R), grad (R x d), hess (R x d x d) may be null when `mode` does not ask for them; rec and absu (R)
// receive the recession slope sum_i a_i [u_i]_+ - b_i u_i (the objective's
// lim_t L(t theta) / t) and sum_i |u_i|, when not null; with y (R x P), against (R) counts the pairs with
// y_i u_i < 0. With rows (R), replication r reads row rows[r] of X, a, b and y (the inputs may hold more
// rows than R; theta and the outputs have R).
void rr_logistic_eval(int64_t R, int64_t P, int64_t d, const double* X, const double* a, const double* b,
                      const double* theta, int mode, int accumulate, int threads, double* value, double* grad,
                      double* hess, double* rec, double* absu, const double* y,
                      double* against, const int64_t* rows) {
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
    const int64_t q = rows ? rows[r] : r;  // the replication's row in X, a, b, y
    pair_range(P, d, X + q * P * d, a + q * P, b + q * P, theta + r * d, y ? y + q * P : nullptr, mode,
               rec != nullptr, lo, hi, local, nullptr, true, true);
    if (splits > 1) {
      parts[it] = std::move(local);
      continue;
    }
    store(local, r, d, mode, accumulate, value, grad, hess, rec, absu, against);
  }
  if (splits == 1)
    return;
  for (int64_t r = 0; r < R; ++r) {  // fixed order: the result does not depend on the schedule
    Partial& first = parts[r * splits];
    for (int64_t s = 1; s < splits; ++s) {
      const Partial& q = parts[r * splits + s];
      first.value += q.value;
      first.rec += q.rec;
      first.absu += q.absu;
      first.against += q.against;
      for (size_t j = 0; j < q.grad.size(); ++j) first.grad[j] += q.grad[j];
      for (size_t j = 0; j < q.hess.size(); ++j) first.hess[j] += q.hess[j];
    }
    store(first, r, d, mode, accumulate, value, grad, hess, rec, absu, against);
  }
}

// Damped Newton on each replication's logistic VR objective (fitting._newton_block's fast path), from theta (R x d,
// updated in place): full Newton steps while the Hessian has a Cholesky factor and the step passes the Armijo test
// (value <= value + 1e-4 slope + 1e-12 max(|value|, 1)), until |grad| < tol. status[r] = 0: converged, with
// grad and hess (mirrored) at theta; 1: handed back to the caller at the last accepted theta (a backtracked step,
// an indefinite Hessian, a certificate that no minimiser exists, |theta| > theta_max or max_iter). Certificates as
// in the caller: at every evaluation without reference pairs; with them ("lazy") not at the start and not at steps
// whose decrease -slope is at most 1e-8 max(|value|, 1). iters: steps taken; evals: evaluations. The features
// X (S x n x d) and Xq (S x N x d) are row-major; each thread transposes its replication into its own buffers once
// and iterates there (in its cache). The objective's coefficients are formed there too, from the data they are
// made of (fitting._KernelTerms): without g (the MLE) a_i = 1 / n and b_i = z_i / n; with g, at lam_r,
// a_i = (1 - lam_r) / n, b_i = (z_i - lam_r g_i) / n and, with reference pairs Xq, a_ref_j = lam_r w_j and
// b_ref_j = lam_r w_j gref_j (w: wref, or 1 / N where null); y_i = 2 z_i - 1 (the overlap certificate). z and g
// are S x n, gref and wref S x N. With meat (R x d x d), a converged replication's sandwich meat at theta from
// the last evaluation (newton_meat; cluster (N) and C as in rr_cluster_moments); others' are left alone.
// The Armijo test needs no objective values (and so no log1p per pair) where the step is certified: with every
// weight a_i >= 0, the logistic terms are generalised self-concordant (|softplus^(3)| <= softplus^(2)), so
// f(theta + p) <= f(theta) + g'p + psi(nu) p'Hp with psi(nu) = (e^nu - 1 - nu) / nu^2 increasing and nu >= max_i
// |x_i'p| (Bach 2010, Prop. 1); with nu = max_i ||x_i|| ||p|| <= 1 (psi(1) = e - 2) and p'Hp <= 1.3 |g'p|
// (a Newton step has p'Hp = -g'p), f(theta + p) - f(theta) <= (1 - 0.93) g'p <= 1e-4 g'p. Values are formed
// only for the steps not certified so (at both ends); the lazy certificates' scale max(|value|, 1) is the last
// value formed.
void rr_logistic_newton(int64_t R, int64_t n, int64_t N, int64_t d, const double* X, const double* z,
                        const double* g, const double* Xq, const double* gref, const double* wref,
                        const int64_t* rows, const double* lam, int certificate, double tol,
                        double theta_max, int64_t max_iter, int threads, double* theta, double* grad,
                        double* hess, int64_t* iters, int64_t* evals, int32_t* status, const int64_t* cluster,
                        int64_t C, double* meat, const double* pre, int8_t* prestep) {
  const bool ref = Xq != nullptr;
  const int64_t group = meat && ref ? run_group(cluster, N) : 0;
#pragma omp parallel num_threads(threads) if (R > 1 && threads > 1)
  {
    // the transposed features, each row padded to whole 64-byte lines (no load spans two)
    const int64_t sx = (n + kLanes - 1) / kLanes * kLanes, sq = (N + kLanes - 1) / kLanes * kLanes;
    std::vector<v8d> xt_lines(d * sx / kLanes), xq_lines(ref ? d * sq / kLanes : 0);
    double* xt = reinterpret_cast<double*>(xt_lines.data());
    double* xq = reinterpret_cast<double*>(xq_lines.data());
    std::vector<double> L(d * d), step(d), trial(d), St(meat ? (ref ? d * C : n) : 0);
    std::vector<double> ca(n), cb(n), cy(certificate && !ref ? n : 0), cq(ref ? N : 0), cbq(ref ? N : 0);
    std::vector<double> L0(pre ? d * d : 0);
    const bool pre_ok = pre && cholesky(pre, d, L0.data());
    Partial gp{0.0, std::vector<double>(pre_ok ? d : 0), {}};
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t q = rows ? rows[r] : r;
      // the features transposed, and the largest norm (the self-concordance certificate below)
      double xmax = transpose_norms(X + q * n * d, n, d, xt, sx);
      if (ref)
        xmax = std::max(xmax, transpose_norms(Xq + q * N * d, N, d, xq, sq));
      const double l = g ? lam[r] : 0.0, inv_n = 1.0 / static_cast<double>(n);
      const double* zq = z + q * n;
      const double* gq = g ? g + q * n : nullptr;
      std::fill(ca.begin(), ca.end(), g ? (1.0 - l) * inv_n : inv_n);
      for (int64_t i = 0; i < n; ++i) cb[i] = (g ? zq[i] - l * gq[i] : zq[i]) * inv_n;
      for (size_t i = 0; i < cy.size(); ++i) cy[i] = 2.0 * zq[i] - 1.0;
      for (int64_t j = 0; ref && j < N; ++j) {
        cq[j] = l * (wref ? wref[q * N + j] : 1.0 / static_cast<double>(N));
        cbq[j] = cq[j] * gref[q * N + j];
      }
      const Objective f{n, ref ? N : 0, d, sx, sq, xt, ca.data(), cb.data(), cy.empty() ? nullptr : cy.data(),
                        ref ? xq : nullptr, ref ? cq.data() : nullptr, ref ? cbq.data() : nullptr, l};
      const bool lazy = certificate && ref;
      double* th = theta + r * d;
      // the self-concordance certificate: all weights a_i >= 0
      const auto nonnegative = [](double v) { return v >= 0.0; };
      const bool convex = std::all_of(f.a, f.a + n, nonnegative) && std::all_of(f.aq, f.aq + f.N, nonnegative);
      if (pre_ok) {  // the pre-step theta - pre^{-1} grad (no line search: the Newton loop's safeguards follow)
        f.gradient_at(th, gp);
        double g2 = 0.0;
        for (int64_t j = 0; j < d; ++j) g2 += gp.grad[j] * gp.grad[j];
        if (std::sqrt(g2) >= tol) {
          newton_step(L0.data(), gp.grad.data(), d, step.data());
          for (int64_t j = 0; j < d; ++j) th[j] += step[j];
        }
      }
      if (prestep)
        prestep[r] = pre_ok;
      Partial cur{0.0, std::vector<double>(d), std::vector<double>(d * d),
                  std::vector<double>(meat ? n + (ref ? N : 0) : 0)};
      Partial nxt = cur;
      bool sep = f.eval(th, certificate && !lazy, cur);
      bool known = true;  // cur.value is the objective at th
      double scale = std::max(std::fabs(cur.value), 1.0);
      int64_t it = 0, ev = 1;
      int32_t st = 1;
      for (;;) {
        double g2 = 0.0, t2 = 0.0;
        for (int64_t j = 0; j < d; ++j) {
          g2 += cur.grad[j] * cur.grad[j];
          t2 += th[j] * th[j];
        }
        if (std::sqrt(g2) < tol) {
          st = 0;
          break;
        }
        if (sep || std::sqrt(t2) > theta_max || it >= max_iter)
          break;
        for (int64_t j = 0; j < d; ++j)  // mirror the upper triangle for the factorisation
          for (int64_t k = j + 1; k < d; ++k) cur.hess[k * d + j] = cur.hess[j * d + k];
        if (!cholesky(cur.hess.data(), d, L.data()))
          break;
        newton_step(L.data(), cur.grad.data(), d, step.data());
        double slope = 0.0, curve = 0.0, p2 = 0.0;
        for (int64_t j = 0; j < d; ++j) {
          slope += cur.grad[j] * step[j];
          trial[j] = th[j] + step[j];
          p2 += step[j] * step[j];
          for (int64_t k = 0; k < d; ++k) curve += step[j] * cur.hess[j * d + k] * step[k];
        }
        const bool certified = convex && slope < 0.0 && xmax * std::sqrt(p2) <= 1.0 && curve <= -1.3 * slope;
        if (!certified && !known) {  // the value at th, for the Armijo test
          cur.value = f.value_at(th);
          known = true;
          scale = std::max(std::fabs(cur.value), 1.0);
        }
        const bool check = certificate && !(lazy && -slope <= 1e-8 * scale);
        const bool trial_sep = f.eval(trial.data(), check, nxt, !certified);
        ++ev;
        if (!certified && !(nxt.value <= cur.value + 1e-4 * slope + 1e-12 * scale))
          break;
        std::copy(trial.begin(), trial.end(), th);
        std::swap(cur, nxt);
        sep = trial_sep;
        known = !certified;
        if (known)
          scale = std::max(std::fabs(cur.value), 1.0);
        ++it;
      }
      iters[r] = it;
      evals[r] = ev;
      status[r] = st;
      if (meat && st == 0)
        newton_meat(f, cur.coef.data(), cur.grad.data(), cluster, group, C, St, meat + r * d * d);
      for (int64_t j = 0; j < d; ++j) grad[r * d + j] = cur.grad[j];
      for (int64_t j = 0; j < d; ++j)
        for (int64_t k = j; k < d; ++k)
          hess[r * d * d + j * d + k] = hess[r * d * d + k * d + j] = cur.hess[j * d + k];
    }
  }
}

// u[r, i] = X[r, i, :] . theta[r] for row-major X (R x P x d).
void rr_margins(int64_t R, int64_t P, int64_t d, const double* X, const double* theta, int threads, double* u) {
#pragma omp parallel for schedule(static) num_threads(threads) if (R > 1 && threads > 1)
  for (int64_t r = 0; r < R; ++r) row_margins(X + r * P * d, theta + r * d, P, d, u + r * P);
}

// The sandwich's cluster moments. Clusters 0..n-1 are the labelled rows, n..C-1 the other prompts; the
// gradient sum of cluster c is A_c + lam B_c with A_i = cA_i x_i (labelled rows only),
// B_i = cB_i x_i + sum_{j: cluster(j) = i} cR_j xref_j. Writes VAA and, when cB is not null, VAB and VBB
// (R x d x d): the centred cross-products of each part (labelled / other clusters) with factor C_p/(C_p-1).
void rr_cluster_moments(int64_t R, int64_t n, int64_t N, int64_t d, int64_t C, const double* X, const double* cA,
                        const double* cB, const double* Xref, const double* cR, const int64_t* cluster, int threads,
                        double* VAA, double* VAB, double* VBB) {
  over_replications(
      R, threads, [&] { return MomentScratch{std::vector<double>(cB ? C * d : 0), std::vector<double>(cB ? C * d : 0)}; },
      [&](MomentScratch& m, int64_t r, int inner) {
        replication_moments(n, N, d, C, X + r * n * d, cA + r * n, cB ? cB + r * n : nullptr,
                            cB ? Xref + r * N * d : nullptr, cB ? cR + r * N : nullptr, cluster, m.A, m.B,
                            VAA + r * d * d, cB ? VAB + r * d * d : nullptr, cB ? VBB + r * d * d : nullptr, inner);
      });
}

// rr_cluster_moments for the logistic loss at theta_r (R x d), with the coefficients formed from the margins
// in the same pass: s = sigmoid(x . theta_r), cA_i = (s_i - z_i) / n, and when g is not null (the control
// terms) cB_i = -(s_i - g_i) / n, cR_j = w_j (s_j - gref_j) on the reference pairs (w: wref, or 1/N when null).
// With lam (R, and g), VAA receives the meat V(lam_r) itself (fused_meat) and VAB, VBB are not written.
void rr_logistic_cluster_moments(int64_t R, int64_t n, int64_t N, int64_t d, int64_t C, const double* X,
                                 const double* z, const double* g, const double* Xref, const double* gref,
                                 const double* wref, const int64_t* cluster, const double* theta, const double* lam,
                                 int threads, double* VAA, double* VAB, double* VBB) {
  if (g && lam) {
    const int64_t group = run_group(cluster, N);
    over_replications(
        R, threads, [&] { return std::unique_ptr<double[]>(new double[C * d]); },  // each entry written before read
        [&](std::unique_ptr<double[]>& rows, int64_t r, int inner) {
          fused_meat(n, N, d, C, X + r * n * d, z + r * n, g + r * n, Xref ? Xref + r * N * d : nullptr,
                     gref ? gref + r * N : nullptr, wref ? wref + r * N : nullptr, cluster, group, theta + r * d,
                     lam[r], inner, rows.get(), VAA + r * d * d);
        });
    return;
  }
  const auto make = [&] {
    return MomentScratch{std::vector<double>(g ? C * d : 0), std::vector<double>(g ? C * d : 0),
                         std::vector<double>(n), std::vector<double>(g ? n : 0), std::vector<double>(g ? N : 0),
                         std::vector<double>(std::max(n, N))};
  };
  over_replications(R, threads, make, [&](MomentScratch& m, int64_t r, int inner) {
    const double* Xr = X + r * n * d;
    const double* th = theta + r * d;
    const double inv_n = 1.0 / static_cast<double>(n);
    double *s = m.s.data(), *cA = m.cA.data(), *cB = m.cB.data(), *cR = m.cR.data();
    sigmoid_margins(Xr, th, n, d, s);
    const double* zr = z + r * n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) cA[i] = (s[i] - zr[i]) * inv_n;
    if (g) {
      const double* gr = g + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) cB[i] = (gr[i] - s[i]) * inv_n;
      const double* Xq = Xref + r * N * d;
      sigmoid_margins(Xq, th, N, d, s);
      const double* gq = gref + r * N;
      if (wref) {
        const double* wq = wref + r * N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) cR[j] = wq[j] * (s[j] - gq[j]);
      } else {
        const double w = 1.0 / static_cast<double>(N);
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) cR[j] = w * (s[j] - gq[j]);
      }
    }
    replication_moments(n, N, d, C, Xr, cA, g ? cB : nullptr, g ? Xref + r * N * d : nullptr, g ? cR : nullptr,
                        cluster, m.A, m.B, VAA + r * d * d, g ? VAB + r * d * d : nullptr,
                        g ? VBB + r * d * d : nullptr, inner);
  });
}

// For each theta_r (R x d) and prompt p (features phiT, d x (P K): column p K + a is phi(x_p, a)): rewards
// v_a = theta_r . phi_pa, the policy (greedy: uniform over {a: v_a >= max v - tie max_a |v_a|}; KL,
// policy_beta > 0: pi_a ~ exp(log_ref_pa + v_a / policy_beta) on ref_support) and out[r, p] = its regret:
// measure_beta = 0 gives sum_a pi_a target_pa (target = max U - U); measure_beta > 0 gives
// measure_beta KL(pi || opt) with log opt_pa = target_pa and opt_pa = exp(target_pa) on opt_support (clamped
// at 0; -1 when pi leaves that support, where the regret is infinite). Masks and a sentinel instead of
// infinities: -ffast-math assumes finite values. The elementwise work runs over all P K entries of a replication
// at once (the exponentials vectorise); K is a few responses.
void rr_policy_regret(int64_t R, int64_t P, int64_t K, int64_t d, const double* theta, const double* phiT,
                      const double* log_ref, const uint8_t* ref_support, double policy_beta, const double* target,
                      const double* opt, const uint8_t* opt_support, double measure_beta, double tie, int threads,
                      double* out) {
  const int64_t PK = P * K;
#pragma omp parallel num_threads(threads) if (R > 1 && R * PK > 16384 && threads > 1)
  {
    std::vector<double> v(PK), pol(PK), logpol(PK), total(P), log_total(P), log_count(K + 1);
    for (int64_t c = 1; c <= K; ++c) log_count[c] = std::log(static_cast<double>(c));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      const double* th = theta + r * d;
      double* vv = v.data();
      std::fill(v.begin(), v.end(), 0.0);
      for (int64_t k = 0; k < d; ++k) {
        const double t = th[k];
        const double* col = phiT + k * PK;
#pragma omp simd
        for (int64_t i = 0; i < PK; ++i) vv[i] += t * col[i];
      }
      if (policy_beta > 0.0) {
        const double inv = 1.0 / policy_beta;
        for (int64_t p = 0; p < P; ++p) {
          double top = 0.0;
          bool any = false;
          for (int64_t i = p * K; i < p * K + K; ++i) {
            vv[i] = log_ref[i] + vv[i] * inv;
            if (ref_support[i]) {
              top = any ? std::max(top, vv[i]) : vv[i];
              any = true;
            }
          }
          for (int64_t i = p * K; i < p * K + K; ++i) vv[i] = ref_support[i] ? vv[i] - top : 0.0;
        }
        double* w = pol.data();
#pragma omp simd
        for (int64_t i = 0; i < PK; ++i) w[i] = std::exp(vv[i]);
        for (int64_t p = 0; p < P; ++p) {
          double acc = 0.0;
          for (int64_t i = p * K; i < p * K + K; ++i) {
            w[i] = ref_support[i] ? w[i] : 0.0;
            acc += w[i];
          }
          total[p] = acc;
        }
        const double* tot = total.data();
        double* lt = log_total.data();
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) lt[p] = std::log(tot[p]);
        for (int64_t p = 0; p < P; ++p) {
          for (int64_t i = p * K; i < p * K + K; ++i) {
            logpol[i] = vv[i] - lt[p];
            w[i] /= tot[p];
          }
        }
      } else {
        for (int64_t p = 0; p < P; ++p) {
          const double* vp = vv + p * K;
          double top = vp[0], size = std::abs(vp[0]);
          for (int64_t a = 1; a < K; ++a) {
            top = std::max(top, vp[a]);
            size = std::max(size, std::abs(vp[a]));
          }
          const double cut = top - tie * size;
          int64_t count = 0;
          for (int64_t a = 0; a < K; ++a) count += vp[a] >= cut;
          const double share = 1.0 / static_cast<double>(count);
          for (int64_t a = 0; a < K; ++a) {
            pol[p * K + a] = vp[a] >= cut ? share : 0.0;
            logpol[p * K + a] = -log_count[count];
          }
        }
      }
      double* o = out + r * P;
      double* term = v.data();  // the KL terms, where the rewards were (no longer needed)
      if (measure_beta > 0.0) {
        // KL = sum_{pi > 0} pi (r + e^-r - 1) + opt's mass where pi is 0, r = log pi - log opt: every term is
        // >= 0, so a policy close to opt keeps the KL's relative precision (the plain sum_a pi r adds terms of
        // order r to a total of order r^2); where e^-r would overflow, pi e^-r = opt. One vectorised pass over
        // the P K entries (target is 0 and opt = exp(target) is 0 off opt's support), then the sums per prompt.
#pragma omp simd
        for (int64_t i = 0; i < PK; ++i) {
          const double rr = logpol[i] - target[i];
          const double t = rr > -700.0 ? pol[i] * (rr + std::expm1(-std::max(rr, -700.0)))
                                       : pol[i] * rr + opt[i] - pol[i];
          term[i] = opt_support[i] ? (pol[i] > 0.0 ? t : opt[i]) : 0.0;
        }
      }
      for (int64_t p = 0; p < P; ++p) {
        double reg = 0.0;
        if (measure_beta > 0.0) {
          bool outside = false;
          for (int64_t i = p * K; i < p * K + K; ++i) {
            outside |= pol[i] > 0.0 && !opt_support[i];
            reg += term[i];
          }
          reg = outside ? -1.0 : measure_beta * std::max(reg, 0.0);
        } else {
          for (int64_t i = p * K; i < p * K + K; ++i) reg += pol[i] * target[i];
        }
        o[p] = reg;
      }
    }
  }
}

// ok[r]: whether the symmetric A_r (R x d x d, upper triangle read) is finite with a Cholesky factor (positive
// definite); with inv (R x d x d), also A_r^{-1} = L^-T L^-1 where ok[r] (other rows left alone).
void rr_spd_factor(int64_t R, int64_t d, const double* A, int threads, int8_t* ok, double* inv) {
#pragma omp parallel num_threads(threads) if (R > 64 && threads > 1)
  {
    std::vector<double> L(d * d), M(d * d);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      const double* a = A + r * d * d;
      bool good = all_finite(a, d * d) && cholesky(a, d, L.data());
      for (int64_t j = 0; good && j < d; ++j)  // an overflow inside the factorisation
        good = all_finite(L.data() + j * d, j + 1);
      ok[r] = good;
      if (!inv || !good)
        continue;
      // M = L^-1 (lower triangular), column by column by forward substitution
      std::fill(M.begin(), M.end(), 0.0);
      for (int64_t c = 0; c < d; ++c) {
        M[c * d + c] = 1.0 / L[c * d + c];
        for (int64_t i = c + 1; i < d; ++i) {
          double t = 0.0;
          for (int64_t k = c; k < i; ++k) t -= L[i * d + k] * M[k * d + c];
          M[i * d + c] = t / L[i * d + i];
        }
      }
      double* out = inv + r * d * d;  // (M^T M)[j][k] = sum_{i >= max(j, k)} M[i][j] M[i][k]
      for (int64_t j = 0; j < d; ++j)
        for (int64_t k = j; k < d; ++k) {
          double t = 0.0;
          for (int64_t i = k; i < d; ++i) t += M[i * d + j] * M[i * d + k];
          out[j * d + k] = out[k * d + j] = t;
        }
    }
  }
}

}  // extern "C"
