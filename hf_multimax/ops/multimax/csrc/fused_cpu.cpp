// MultiMax attention on CPU, forward and backward, fused in the FlashAttention-2 way: one task per
// block of queries walks the keys in blocks, multiplies tiles (forward: oneDNN's brgemm micro-kernel
// over K transposed once, see KeyPanels; backward and calls of a few queries: MKL's sgemm), applies softcap / bias / affine / the MultiMax modulator / masks in one vectorised pass over
// the tile while it is in cache, and keeps an online softmax. The backward recomputes each tile from
// the row log-sum-exp and accumulates the gradients of q, k, v and of the scalars. SparseMix's
// block-sparse forward and (softmax) backward run the same row code over gathered selected blocks,
// multiplied mostly with oneDNN's batch-reduce GEMM micro-kernel (see `sparse_forward`).
//
// Inputs are fp32 and contiguous (the Python side converts); the scalars arrive as [8, 1] (shared) or
// [8, H] (per head), the affine as [2, 1] or [2, H] (zeros without affine). The maths is the one of ops/multimax/naive.py.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Row-major C[m, n] = alpha * op(A) op(B) + beta * C, through column-major BLAS: C^T = op(B)^T op(A)^T.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
  sgemm_(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
}

inline float relu(float x) { return x > 0.f ? x : 0.f; }
inline Vec relu(const Vec& x) { return at::vec::clamp_min(x, Vec(0.f)); }
inline float hsum(const Vec& v) {
  float buf[Vec::size()];
  v.store(buf);
  float s = 0.f;
  for (int i = 0; i < Vec::size(); ++i) s += buf[i];
  return s;
}
inline float hmax(const Vec& v) {
  float buf[Vec::size()];
  v.store(buf);
  float m = buf[0];
  for (int i = 1; i < Vec::size(); ++i) m = std::max(m, buf[i]);
  return m;
}
inline float min0(float x) { return x < 0.f ? x : 0.f; }
inline Vec min0(const Vec& x) { return at::vec::minimum(x, Vec(0.f)); }
inline float lt(float x, float y) { return x < y ? 1.f : 0.f; }
inline Vec lt(const Vec& x, const Vec& y) { return x.lt(y); }
inline float tanh_(float x) { return std::tanh(x); }
inline Vec tanh_(const Vec& x) { return x.tanh(); }
inline float exp_(float x) { return std::exp(x); }
inline Vec exp_(const Vec& x) { return x.exp_u20(); }

// One head's scalars, as float or as broadcast vectors.
template <typename T>
struct Scalars {
  T t1, t2, t3, t4, b1, d1, b2, d2, scale_a, shift_c;
  // Column h of theta [8, n] and affine [2, m] (n, m: 1 for shared scalars).
  Scalars(const float* theta, int64_t n, const float* affine, int64_t m)
      : t1(theta[0 * n]), t2(theta[1 * n]), t3(theta[2 * n]), t4(theta[3 * n]), b1(theta[4 * n]), d1(theta[5 * n]),
        b2(theta[6 * n]), d2(theta[7 * n]), scale_a(1.f + affine[0]), shift_c(affine[m]),
        identity(theta[0 * n] == 0.f && theta[1 * n] == 0.f && theta[2 * n] == 0.f && theta[3 * n] == 0.f &&
                 affine[0] == 0.f && affine[m] == 0.f) {}
  // The modulator changes nothing (softmax, or MultiMax at its zero start): the tile skips it.
  bool identity;
  // Query head h's scalars: its column, or the one column shared by every head (n or m == 1).
  static Scalars of_head(const float* theta, int64_t n, const float* affine, int64_t m, int64_t h) {
    return Scalars(theta + (n > 1 ? h : 0), n, affine + (m > 1 ? h : 0), m);
  }
};

// Everything about a call that is not a tensor of scores.
struct Problem {
  int64_t B, H, Hkv, Q, K, D, Dv;
  bool causal;
  int64_t offset;  // causal: key j is visible to query i when j <= i + offset
  float scale, softcap;
  bool has_affine;
  const float* mask;  // 0 / -inf added after the modulator, [B, H, Q, K] strides (0 where broadcast)
  int64_t mask_s[3];
  const float* bias;
  int64_t bias_s[3];
  // Elements between consecutive (batch, key/value head) rows of K and V: K * D when contiguous; a
  // static KV cache's buffer cut at its real length has the buffer's length instead.
  int64_t k_head, v_head;

  int64_t key_end(int64_t last_row) const { return causal ? std::min(K, std::max<int64_t>(0, last_row + offset + 1)) : K; }
  // How many of the n keys from c0 on query row r may see (causal frontier).
  int64_t visible(int64_t r, int64_t c0, int64_t n) const { return std::clamp<int64_t>(causal ? r + offset + 1 - c0 : n, 0, n); }
  // Row r of (batch b, head h) of the mask / bias from key c0 on; nullptr without one.
  const float* mask_row(int64_t b, int64_t h, int64_t r, int64_t c0) const {
    return mask ? mask + b * mask_s[0] + h * mask_s[1] + r * mask_s[2] + c0 : nullptr;
  }
  const float* bias_row(int64_t b, int64_t h, int64_t r, int64_t c0) const {
    return bias ? bias + b * bias_s[0] + h * bias_s[1] + r * bias_s[2] + c0 : nullptr;
  }
};

// Pre-softcap scaled score u -> score s the modulator reads (softcap, then bias).
template <typename T>
inline T capped(T u, const Problem& p, T cap, T inv_cap) {
  return p.softcap > 0.f ? cap * tanh_(u * inv_cap) : u;
}

// sigma(x), x = (1 + a) s + c.
template <typename T>
inline T modulate(T s, const Scalars<T>& m) {
  T x = m.scale_a * s + m.shift_c;
  T lo1 = relu(m.b1 - x), hi1 = relu(x - m.d1), lo2 = relu(m.b2 - x), hi2 = relu(x - m.d2);
  return x + m.t1 * lo1 + m.t2 * hi1 + m.t3 * lo2 * lo2 + m.t4 * hi2 * hi2;
}

// Maximum of a row. Four running maxima: one would chain every load behind the previous maximum's
// latency, which made this pass cost two thirds of the exponentials.
float row_max(const float* row, int64_t n) {
  constexpr int64_t V = Vec::size();
  Vec m0(kNegInf), m1(kNegInf), m2(kNegInf), m3(kNegInf);
  int64_t j = 0;
  for (; j + 4 * V <= n; j += 4 * V) {
    m0 = at::vec::maximum(m0, Vec::loadu(row + j));
    m1 = at::vec::maximum(m1, Vec::loadu(row + j + V));
    m2 = at::vec::maximum(m2, Vec::loadu(row + j + 2 * V));
    m3 = at::vec::maximum(m3, Vec::loadu(row + j + 3 * V));
  }
  for (; j + V <= n; j += V) m0 = at::vec::maximum(m0, Vec::loadu(row + j));
  float mx = hmax(at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3)));
  for (; j < n; ++j) mx = std::max(mx, row[j]);
  return mx;
}

// Row i of a tile: in place, pre-softcap scores -> modulated scores y (masked keys -> -inf).
// Returns the row maximum.
float forward_row(float* row, int64_t n, const Problem& p, const Scalars<float>& ms, const Scalars<Vec>& mv,
                  const float* bias_row, const float* mask_row, int64_t visible) {
  const Vec cap_v(p.softcap), inv_cap_v(p.softcap > 0.f ? 1.f / p.softcap : 0.f);
  const float cap = p.softcap, inv_cap = p.softcap > 0.f ? 1.f / p.softcap : 0.f;
  int64_t j = 0;
  Vec vmax(kNegInf);
  const int64_t vn = std::min(n, visible) - (std::min(n, visible) % Vec::size());
  if (ms.identity && p.softcap <= 0.f && !bias_row && !mask_row) {  // plain scores: only the maximum
    vmax = Vec(row_max(row, vn));
    j = vn;
  }
  for (; j < vn; j += Vec::size()) {
    Vec s = capped(Vec::loadu(row + j), p, cap_v, inv_cap_v);
    if (bias_row) s = s + Vec::loadu(bias_row + j);
    Vec y = modulate(s, mv);
    if (mask_row) y = y + Vec::loadu(mask_row + j);
    y.store(row + j);
    vmax = at::vec::maximum(vmax, y);
  }
  float mx = hmax(vmax);
  for (; j < n; ++j) {
    if (j >= visible) {
      row[j] = kNegInf;
      continue;
    }
    float s = capped(row[j], p, cap, inv_cap);
    if (bias_row) s += bias_row[j];
    row[j] = modulate(s, ms) + (mask_row ? mask_row[j] : 0.f);
    mx = std::max(mx, row[j]);
  }
  return mx;
}

// row <- exp(row - m) (masked -inf -> 0); returns the sum.
float exp_row(float* row, int64_t n, float m) {
  const Vec mv(m);
  Vec vsum(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec e = exp_(Vec::loadu(row + j) - mv);
    e.store(row + j);
    vsum = vsum + e;
  }
  float sum = hsum(vsum);
  for (; j < n; ++j) {
    row[j] = std::exp(row[j] - m);
    sum += row[j];
  }
  return sum;
}

// One row's online-softmax step, given the maximum `mx` of its modulated scores row[0, n) and of
// the running maximum m: row <- exp(row - mx), the running sum l and the accumulator acc[0, dv)
// rescaled to the new maximum. A row with nothing visible yet (mx = -inf) contributes zeros.
inline void online_softmax_row(float* row, int64_t n, float mx, float& m, float& l, float* acc, int64_t dv) {
  if (mx == kNegInf) {
    std::fill(row, row + n, 0.f);
    return;
  }
  const float corr = std::exp(m - mx);  // 0 when m was -inf
  l = l * corr + exp_row(row, n, mx);
  if (corr != 1.f) {
    for (int64_t d = 0; d < dv; ++d) acc[d] *= corr;
  }
  m = mx;
}

bool tile_is_masked(const Problem& p, int64_t b, int64_t h, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  if (!p.mask) return false;
  if (p.mask_s[2] == 0) r1 = r0 + 1;  // one row for all queries (a padding mask)
  for (int64_t r = r0; r < r1; ++r) {
    const float* m = p.mask_row(b, h, r, 0);
    for (int64_t c = c0; c < c1; ++c)
      if (m[c] == 0.f) return false;
  }
  return true;
}

// One query row (decoding): a BLAS call's fixed cost is larger than a 1 x 64 x 64 product.
inline float dot(const float* a, const float* b, int64_t d) {
  Vec s(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= d; i += Vec::size()) s = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), s);
  float r = hsum(s);
  for (; i < d; ++i) r += a[i] * b[i];
  return r;
}

inline void axpy(float alpha, const float* x, float* y, int64_t d) {
  int64_t i = 0;
  for (; i + Vec::size() <= d; i += Vec::size()) at::vec::fmadd(Vec(alpha), Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  for (; i < d; ++i) y[i] += alpha * x[i];
}

// dst[0, n) = alpha * src[0, n): the brgemm micro-kernel (below) takes no alpha, so the scale goes into
// the queries (rows x D) rather than into the rows x cols scores.
inline void scale_rows(const float* src, int64_t n, float alpha, float* dst) {
  const Vec a(alpha);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(src + i) * a).store(dst + i);
  for (; i < n; ++i) dst[i] = src[i] * alpha;
}

// forward_row for the dense forward's common tile: no softcap, bias or mask, the modulator not the
// identity (a trained model's scalars). forward_row tests softcap, bias and mask per vector and
// always applies the affine; this loop does none of it (without affine) and keeps four running
// maxima, as row_max does, instead of one chain.
float modulated_row(float* row, int64_t n, const Scalars<float>& ms, const Scalars<Vec>& mv, bool affine, int64_t visible) {
  constexpr int64_t V = Vec::size();
  const int64_t vis = std::clamp<int64_t>(visible, 0, n), vn = vis - vis % V;
  const auto sigma = [&](Vec x) {
    if (affine) x = at::vec::fmadd(mv.scale_a, x, mv.shift_c);
    const Vec lo2 = relu(mv.b2 - x), hi2 = relu(x - mv.d2);
    Vec y = at::vec::fmadd(mv.t1, relu(mv.b1 - x), x);
    y = at::vec::fmadd(mv.t2, relu(x - mv.d1), y);
    y = at::vec::fmadd(mv.t3 * lo2, lo2, y);
    return at::vec::fmadd(mv.t4 * hi2, hi2, y);
  };
  Vec m0(kNegInf), m1(kNegInf);
  int64_t j = 0;
  for (; j + 2 * V <= vn; j += 2 * V) {
    const Vec y0 = sigma(Vec::loadu(row + j)), y1 = sigma(Vec::loadu(row + j + V));
    y0.store(row + j);
    y1.store(row + j + V);
    m0 = at::vec::maximum(m0, y0);
    m1 = at::vec::maximum(m1, y1);
  }
  for (; j < vn; j += V) {
    const Vec y = sigma(Vec::loadu(row + j));
    y.store(row + j);
    m0 = at::vec::maximum(m0, y);
  }
  float mx = hmax(at::vec::maximum(m0, m1));
  for (; j < vis; ++j) {
    row[j] = modulate(row[j], ms);
    mx = std::max(mx, row[j]);
  }
  std::fill(row + vis, row + n, kNegInf);
  return mx;
}

// Rows [r0, r0 + rows) of one (batch, head) against keys [c0, c0 + n) (the dense forward): the score
// tile, the elementwise pass, the online-softmax update of (m, l, acc) and P.V into acc. With a key
// panel (`KeyPanels`) both products run on the brgemm micro-kernel and q_rows are already scaled;
// without one (fewer than kMinPanelRows queries: decoding, short chunks) through dot/axpy or BLAS.
void attend_tile(const Problem& p, int64_t b, int64_t h, int64_t r0, int64_t rows, int64_t c0, int64_t n,
                 const float* q_rows, const float* k_head, const float* kt_panel, int64_t kt_ld, const float* v_head,
                 const Scalars<float>& ms, const Scalars<Vec>& mv, float* tile, float* acc, float* m, float* l) {
  if (kt_panel) {
    at::native::cpublas::brgemm(rows, n, p.D, p.D, kt_ld, n, false, q_rows, kt_panel, tile, false);
  } else if (rows == 1) {
    for (int64_t j = 0; j < n; ++j) tile[j] = p.scale * dot(q_rows, k_head + (c0 + j) * p.D, p.D);
  } else {
    gemm(false, true, rows, n, p.D, p.scale, q_rows, p.D, k_head + c0 * p.D, p.D, 0.f, tile, n);
  }
  const bool plain = !ms.identity && p.softcap <= 0.f && !p.bias && !p.mask;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t r = r0 + i;
    float* row = tile + i * n;
    const float* bias_row = p.bias_row(b, h, r, c0);
    const float* mask_row = p.mask_row(b, h, r, c0);
    const int64_t visible = p.visible(r, c0, n);
    const float row_mx = plain ? modulated_row(row, n, ms, mv, p.has_affine, visible)
                               : forward_row(row, n, p, ms, mv, bias_row, mask_row, visible);
    const float mx = std::max(m[i], row_mx);
    online_softmax_row(row, n, mx, m[i], l[i], acc + i * p.Dv, p.Dv);
  }
  if (kt_panel) {
    at::native::cpublas::brgemm(rows, p.Dv, n, n, p.Dv, p.Dv, true, tile, v_head + c0 * p.Dv, acc, false);
  } else if (rows == 1) {
    for (int64_t j = 0; j < n; ++j) {
      if (tile[j] != 0.f) axpy(tile[j], v_head + (c0 + j) * p.Dv, acc, p.Dv);
    }
  } else {
    gemm(false, false, rows, p.Dv, n, 1.f, tile, n, v_head + c0 * p.Dv, p.Dv, 1.f, acc, p.Dv);
  }
}

constexpr int64_t kQueryBlock = 64;
constexpr int64_t kFloatsPerLine = 64 / sizeof(float);  // a 64-byte cache line

inline void prefetch_line(const float* x) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(x, 0, 3);
#endif
}
constexpr int64_t kMinParallelWork = 1 << 16;  // multiply-adds per thread worth a fork (~10 us)

int64_t grain_for(int64_t task_work) { return std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(1, task_work)); }
constexpr int64_t kKeyBlock = 512;

// K transposed once per call into panels of kKeyBlock keys, [B * Hkv, key blocks, D, ld], so that
// the score product runs on the brgemm micro-kernel, which takes no transpose and reads its operands
// as they lie. Profiled (1 thread, AVX2, L=4096): MKL's sgemm spent about a fifth of the dense forward
// repacking K and V and scaling (scopy_*, mscale) on every 64 x 512 tile, work that grows with the
// number of query blocks; this transposition is done once per key. The panel rows are padded past a
// power of two (kPanelPad): at a stride of 2 KiB every row of a D x 512 panel would fall on the same
// few L1 sets.
constexpr int64_t kPanelPad = 16;
// Fewer queries than this keep the BLAS / dot path: transposing every key once costs as much as the
// repacking it saves only when a call has several query blocks (a decoding step has one row).
constexpr int64_t kMinPanelRows = 32;

struct KeyPanels {
  int64_t blocks = 0, ld = 0, panel = 0;  // key blocks per head, row stride, floats per panel
  std::unique_ptr<float[]> data;

  // Panels of `heads` heads of `rows` rows of `width` floats, head h at x + h * head_step.
  KeyPanels(int64_t heads, int64_t rows, int64_t width, const float* x, int64_t head_step) {
    const int64_t cols = std::min(kKeyBlock, std::max<int64_t>(1, rows));
    blocks = (rows + kKeyBlock - 1) / kKeyBlock;
    ld = cols + kPanelPad;
    panel = width * ld;
    data.reset(new float[heads * blocks * panel]);
    at::parallel_for(0, heads * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t h = task / blocks, c0 = (task % blocks) * kKeyBlock, n = std::min(kKeyBlock, rows - c0);
        transpose(x + h * head_step + c0 * width, width, data.get() + task * panel, ld, n, width);
      }
    });
  }
  // The panel holding keys [c0, c0 + kKeyBlock) of head h: key c0 + j in column j.
  const float* at(int64_t h, int64_t c0) const { return data.get() + (h * blocks + c0 / kKeyBlock) * panel; }

  // dst[j, i] = src[i, j] for i < m, j < n: 8 x 8 blocks in registers where ATen vectorises them
  // (the generic transpose_mxn is a scalar loop).
  static void transpose(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t m, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= m; i += 8) {
      int64_t j = 0;
      for (; j + 8 <= n; j += 8) at::vec::transpose_mxn<float, 8, 8>(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
      if (j < n) at::vec::transpose_mxn<float>(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst, 8, n - j);
    }
    if (i < m) at::vec::transpose_mxn<float>(src + i * ld_src, ld_src, dst + i, ld_dst, m - i, n);
  }
};

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Problem& p,
                                const at::Tensor& theta, const at::Tensor& affine) {
  auto out = at::empty({p.B, p.H, p.Q, p.Dv}, q.options());
  auto lse = at::empty({p.B, p.H, p.Q}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *tp = theta.data_ptr<float>(), *ap = affine.data_ptr<float>();
  const int64_t tn = theta.size(1), an = affine.size(1);
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  const int64_t q_blocks = (p.Q + kQueryBlock - 1) / kQueryBlock, group = p.H / p.Hkv;

  // Small calls (decoding: one query against a short cache) run on one thread: waking the others
  // costs more than the work, and a busy core would stall every call.
  const int64_t task_work = std::min(kQueryBlock, p.Q) * p.key_end(p.Q - 1) * (p.D + p.Dv);
  const std::unique_ptr<KeyPanels> panels(p.Q >= kMinPanelRows ? new KeyPanels(p.B * p.Hkv, p.K, p.D, kp, p.k_head) : nullptr);
  at::parallel_for(0, p.B * p.H * q_blocks, grain_for(task_work), [&](int64_t begin, int64_t end) {
    // Sized for this call, uninitialised (every entry is written before it is read): a decoding step
    // needs one row of a few hundred keys, not a 64 x 512 tile.
    const int64_t max_rows = std::min(kQueryBlock, p.Q), max_cols = std::min(kKeyBlock, std::max<int64_t>(1, p.K));
    std::unique_ptr<float[]> tile_buf(new float[max_rows * max_cols]), acc_buf(new float[max_rows * p.Dv]),
        qbuf(new float[panels ? max_rows * p.D : 0]);
    float *tile = tile_buf.get(), *acc = acc_buf.get();
    std::vector<float> m(max_rows), l(max_rows);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / q_blocks, b = bh / p.H, h = bh % p.H, r0 = (task % q_blocks) * kQueryBlock;
      const int64_t r1 = std::min(p.Q, r0 + kQueryBlock), rows = r1 - r0;
      const int64_t kvh = b * p.Hkv + h / group;
      const float* qb = qp + (bh * p.Q + r0) * p.D;
      if (panels) {  // the micro-kernel takes no alpha: the scale goes into the rows x D queries
        scale_rows(qb, rows * p.D, p.scale, qbuf.get());
        qb = qbuf.get();
      }
      const float *kb = kp + kvh * p.k_head, *vb = vp + kvh * p.v_head;
      const auto ms = Scalars<float>::of_head(tp, tn, ap, an, h);
      const auto mv = Scalars<Vec>::of_head(tp, tn, ap, an, h);
      std::fill(acc, acc + rows * p.Dv, 0.f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      const int64_t c_end = p.key_end(r1 - 1);
      for (int64_t c0 = 0; c0 < c_end; c0 += kKeyBlock) {
        const int64_t c1 = std::min(c_end, c0 + kKeyBlock), n = c1 - c0;
        if (tile_is_masked(p, b, h, r0, r1, c0, c1)) continue;
        attend_tile(p, b, h, r0, rows, c0, n, qb, kb, panels ? panels->at(kvh, c0) : nullptr, panels ? panels->ld : 0,
                    vb, ms, mv, tile, acc, m.data(), l.data());
      }
      for (int64_t i = 0; i < rows; ++i) {
        float* o = op + (bh * p.Q + r0 + i) * p.Dv;
        const bool any = l[i] > 0.f;
        const float inv = any ? 1.f / l[i] : 0.f;
        for (int64_t d = 0; d < p.Dv; ++d) o[d] = acc[i * p.Dv + d] * inv;
        // +inf makes the backward's recomputed probabilities of an empty row exactly zero.
        lp[bh * p.Q + r0 + i] = any ? m[i] + std::log(l[i]) : kInf;
      }
    }
  });
  return {out, lse};
}

// SparseMix's exact attention over selected key blocks. One task per (batch, key/value head, block of
// queries): each query head of the group multiplies its rows with the selected key blocks, one block
// after another into one row of scores per query, applies masks and causality per block (segment) of
// that row, takes one softmax over the whole row, then multiplies it with each block's V. A one-row
// block of queries (decoding) walks the blocks with the dot/axpy tile. Queries sit at absolute
// positions i + q_offset; query block qb covers absolute block qb + q_offset / bs. It also returns the
// rows' log-sum-exp, from which `sparse_backward` (softmax) recomputes the tiles.
//
// The products go through torch's `cpublas::brgemm`: oneDNN's brgemm micro-kernel where oneDNN has one
// for fp32 (x86 with AVX2 or later, unless torch.backends.mkldnn is switched off), else the same BLAS
// gemm. The micro-kernel reads both operands where they lie and costs little per call, where sgemm
// repacks both on every call; it takes no transpose and no alpha, so the scores read each key block
// as a [D, bs] tile of K^T (`TransposedHead`) and each head's query rows are scaled once. One call per
// block reads K^T tiles and V rows in place: copying the selected blocks side by side first, for one
// wide product each, moved ~160 KB per query block and took ~12% more time at 16k (1 thread, AVX2).
constexpr int64_t kGatherColumns = 1024;  // keys per run of blocks: the row of scores a run fills

// One key/value head's rows transposed block by block (block i as a [D, bs] tile, key j of it in
// column j), each block transposed the first time it is asked for. The products' micro-kernel reads
// K^T (and the backward's V^T), and at::vec has no AVX2 float transpose: transposing every selected
// block again, with a scalar loop, for each query block selecting it took ~20% of the 16k forward. A
// thread keeps the head it is on (tasks run head after head), so a block is transposed about once per
// call. Tiles rather than one [D, K] matrix: writing a column of that jumps K floats per element, a
// page apart at 16k.
struct TransposedHead {
  std::unique_ptr<float[]> tiles;  // uninitialised: a tile is written before it is read
  std::vector<uint8_t> done;
  int64_t head = -1, K = 0, D = 0, bs = 1;

  TransposedHead(int64_t K_, int64_t D_, int64_t bs_, bool used)
      : tiles(used ? new float[(K_ + bs_ - 1) / bs_ * bs_ * D_] : nullptr), done(used ? (K_ + bs_ - 1) / bs_ : 0),
        K(K_), D(D_), bs(bs_) {}

  void use_head(int64_t h) {
    if (h == head) return;
    head = h;
    std::fill(done.begin(), done.end(), 0);
  }

  // The [D, bs] tile of the block of keys from k0 (a multiple of bs) of the current head, whose rows
  // (width D) are `rows`.
  const float* tile(const float* rows, int64_t k0) {
    const int64_t blk = k0 / bs;
    float* dst = tiles.get() + blk * bs * D;
    if (!done[blk]) {
      const int64_t n = std::min(bs, K - k0);
      for (int64_t j = 0; j < n; ++j) {
        const float* src = rows + (k0 + j) * D;
        for (int64_t d = 0; d < D; ++d) dst[d * bs + j] = src[d];
      }
      done[blk] = 1;
    }
    return dst;
  }
};

// What one SparseMix task covers (the forward's and the backward's tasks are the same): key/value
// head kvh (of batch b; query heads h0 .. h0 + group), query block qb of the call, whose rows are
// [r0, r1) (queries sit at absolute positions i + q_offset; query block qb covers absolute block
// qb + q_offset / bs, so the first and last blocks may hold fewer rows, or none).
struct SparseTask {
  int64_t kvh, qb, b, h0, r0, r1;
  SparseTask(int64_t task, int64_t nQB, const Problem& p, int64_t bs, int64_t q_offset, int64_t group)
      : kvh(task / nQB), qb(task % nQB), b(kvh / p.Hkv), h0((kvh % p.Hkv) * group),
        r0(std::max<int64_t>(0, (qb + q_offset / bs) * bs - q_offset)),
        r1(std::min<int64_t>(p.Q, (qb + q_offset / bs + 1) * bs - q_offset)) {}
};

// The key blocks one SparseMix task (query rows [r0, r1) of batch b, query heads h0 .. h0 + group
// sharing one key/value head) attends: selected, valid, not past the causal frontier and not masked
// for every head of the group. A run of them holding at most max_cols keys fills one row of scores.
struct SelectedBlocks {
  std::vector<int64_t> c0, n;  // first key and key count of each attended block
  int64_t count = 0;
  bool whole_rows = false;  // every row's visible keys are a prefix of it, and no mask or bias
  int64_t partial = 0;  // blocks some row sees only in part, at the end
  std::vector<int64_t> spare_c0, spare_n;

  explicit SelectedBlocks(int64_t slots) : c0(slots), n(slots), spare_c0(slots), spare_n(slots) {}

  void collect(const Problem& p, const int64_t* slots, const bool* ok, int64_t S, int64_t bs, int64_t b, int64_t h0,
               int64_t group, int64_t r0, int64_t r1) {
    count = 0;
    for (int64_t s = 0; s < S; ++s) {
      if (!ok[s]) continue;
      const int64_t k0 = slots[s] * bs, k1 = std::min(p.K, k0 + bs);
      if (k1 <= k0 || (p.causal && k0 > r1 - 1 + p.offset)) continue;
      bool seen = false;
      for (int64_t h = h0; h < h0 + group && !seen; ++h) seen = !tile_is_masked(p, b, h, r0, r1, k0, k1);
      if (!seen) continue;
      c0[count] = k0;
      n[count++] = k1 - k0;
    }
    // Blocks some row sees only in part (past the causal frontier: the local block) go last, so a row
    // of scores is visible up to one point: without a mask or bias, a row's elementwise passes then
    // run once over the whole row instead of once per block (20 calls per row at the defaults).
    int64_t w = 0;
    for (int pass = 0; pass < 2; ++pass) {  // stable: the whole blocks, then the partial ones
      for (int64_t s = 0; s < count; ++s) {
        if ((p.visible(r0, c0[s], n[s]) == n[s]) != (pass == 0)) continue;
        spare_c0[w] = c0[s];
        spare_n[w++] = n[s];
      }
      if (pass == 0) partial = count - w;
    }
    std::swap(c0, spare_c0);
    std::swap(n, spare_n);
    whole_rows = !p.mask && !p.bias && partial <= 1;
  }

  // Keys of row r visible among blocks [first, last) when `whole_rows`: a prefix of the row.
  int64_t visible_prefix(const Problem& p, int64_t r, int64_t first, int64_t last) const {
    int64_t cols = 0;
    for (int64_t s = first; s < last; ++s) cols += p.visible(r, c0[s], n[s]);
    return cols;
  }

  // The end of the run of blocks from `first` holding at most max_cols keys; their keys in `cols`.
  int64_t run_end(int64_t first, int64_t max_cols, int64_t& cols) const {
    int64_t last = first;
    for (cols = 0; last < count && cols + n[last] <= max_cols; ++last) cols += n[last];
    return last;
  }
};

// A one-row SparseMix task (a decoding step, or a query block holding one row) of one key/value head
// group: the scores of every selected key in one row, one softmax over it, then P.V, so the
// accumulator is not rescaled block by block (with blocks of 32 that bookkeeping cost about as much
// as the products); (m, l, acc) of each head of the group as the multi-row path leaves them.
void decode_row(const Problem& p, const SelectedBlocks& seg, int64_t b, int64_t h0, int64_t group, int64_t r0,
                const float* qp, const float* kb, const float* vb, const float* tp, int64_t tn, const float* ap,
                int64_t an, float* row, float* acc, float* m, float* l) {
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = h0 + g, bh = b * p.H + h;
    const float* q_row = qp + (bh * p.Q + r0) * p.D;
    const auto ms = Scalars<float>::of_head(tp, tn, ap, an, h);
    const auto mv = Scalars<Vec>::of_head(tp, tn, ap, an, h);
    float mx = kNegInf;
    int64_t cols = 0;
    for (int64_t s = 0; s < seg.count; cols += seg.n[s++]) {
      const int64_t c0 = seg.c0[s], n = seg.n[s];
      for (int64_t j = 0; j < n; ++j) row[cols + j] = p.scale * dot(q_row, kb + (c0 + j) * p.D, p.D);
      mx = std::max(mx, forward_row(row + cols, n, p, ms, mv, p.bias_row(b, h, r0, c0), p.mask_row(b, h, r0, c0),
                                    p.visible(r0, c0, n)));
    }
    float* acc_h = acc + g * p.Dv;
    std::fill(acc_h, acc_h + p.Dv, 0.f);
    m[g] = mx;
    l[g] = 0.f;
    if (mx == kNegInf) continue;  // sees no key: zeros
    l[g] = exp_row(row, cols, mx);
    for (int64_t s = 0, c = 0; s < seg.count; c += seg.n[s++]) {
      const float* v_rows = vb + seg.c0[s] * p.Dv;
      for (int64_t j = 0; j < seg.n[s]; ++j) {
        if (row[c + j] != 0.f) axpy(row[c + j], v_rows + j * p.Dv, acc_h, p.Dv);
      }
    }
  }
}

std::vector<at::Tensor> sparse_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Problem& p,
                                       const at::Tensor& theta, const at::Tensor& affine, const at::Tensor& block_idx,
                                       const at::Tensor& block_valid, int64_t bs, int64_t q_offset, bool heads_last) {
  // heads_last: written as [B, Q, H, Dv], the layout attention functions return, and handed back as
  // its [B, H, Q, Dv] view, so the caller's transpose(1, 2).contiguous() is free instead of another
  // pass over the output; else contiguous [B, H, Q, Dv] (what a training forward saves). Every row
  // is written (rows that see no key get zeros).
  auto out = heads_last ? at::empty({p.B, p.Q, p.H, p.Dv}, q.options()) : at::empty({p.B, p.H, p.Q, p.Dv}, q.options());
  // Elements between consecutive query rows, and between heads, of the output.
  const int64_t row_step = heads_last ? p.H * p.Dv : p.Dv, head_step = heads_last ? p.Dv : p.Q * p.Dv;
  auto lse = at::empty({p.B, p.H, p.Q}, q.options());  // what a backward recomputing the tiles needs
  float* lp = lse.data_ptr<float>();
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *tp = theta.data_ptr<float>(), *ap = affine.data_ptr<float>();
  const int64_t tn = theta.size(1), an = affine.size(1);
  const int64_t* ip = block_idx.data_ptr<int64_t>();
  const bool* okp = block_valid.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const int64_t nQB = block_idx.size(2), S = block_idx.size(3), group = p.H / p.Hkv;
  const int64_t max_cols = std::max(bs, kGatherColumns / bs * bs);
  at::parallel_for(0, p.B * p.Hkv * nQB, grain_for(group * bs * S * bs * (p.D + p.Dv)), [&](int64_t begin, int64_t end) {
    // A one-row task's row (a decoding step) holds the scores of every selected key (at most S blocks).
    const int64_t tile_cols = p.Q > 1 ? max_cols : 0;
    std::unique_ptr<float[]> tile(new float[std::max(bs * std::max(bs, tile_cols), S * bs)]),
        acc(new float[group * bs * p.Dv]), qbuf(new float[bs * p.D]);
    std::vector<float> m(group * bs), l(group * bs);
    SelectedBlocks seg(S);
    TransposedHead key_cols(p.K, p.D, bs, p.Q > 1);
    // A decoding step reads each selected block once, from memory. Jumping block to block, the
    // hardware prefetcher restarts at every block and the reads wait on memory a page at a time; so
    // the next task's blocks are requested while this task computes (the first task's at the start).
    auto prefetch_task = [&](int64_t task) {
      const int64_t kvh = task / nQB, *slots = ip + task * S;
      const bool* ok = okp + task * S;
      for (int64_t s = 0; s < S; ++s) {
        if (!ok[s]) continue;
        const int64_t k0 = slots[s] * bs, k1 = std::min(p.K, k0 + bs);
        for (int64_t i = k0 * p.D; i < k1 * p.D; i += kFloatsPerLine) prefetch_line(kp + kvh * p.k_head + i);
        for (int64_t i = k0 * p.Dv; i < k1 * p.Dv; i += kFloatsPerLine) prefetch_line(vp + kvh * p.v_head + i);
      }
    };
    if (p.Q == 1 && begin < end) prefetch_task(begin);
    for (int64_t task = begin; task < end; ++task) {
      if (p.Q == 1 && task + 1 < end) prefetch_task(task + 1);
      const SparseTask t(task, nQB, p, bs, q_offset, group);
      const int64_t kvh = t.kvh, qb = t.qb, b = t.b, h0 = t.h0, r0 = t.r0, r1 = t.r1, rows = r1 - r0;
      if (rows <= 0) continue;
      const float *kb = kp + kvh * p.k_head, *vb = vp + kvh * p.v_head;
      seg.collect(p, ip + (kvh * nQB + qb) * S, okp + (kvh * nQB + qb) * S, S, bs, b, h0, group, r0, r1);
      if (rows == 1) {
        decode_row(p, seg, b, h0, group, r0, qp, kb, vb, tp, tn, ap, an, tile.get(), acc.get(), m.data(), l.data());
      } else {
        std::fill(acc.get(), acc.get() + group * rows * p.Dv, 0.f);
        std::fill(m.begin(), m.end(), kNegInf);
        std::fill(l.begin(), l.end(), 0.f);
        for (int64_t first = 0, last, cols; first < seg.count; first = last) {
          last = seg.run_end(first, max_cols, cols);
          key_cols.use_head(kvh);
          for (int64_t g = 0; g < group; ++g) {
            const int64_t h = h0 + g, bh = b * p.H + h;
            const float* q_rows = qp + (bh * p.Q + r0) * p.D;
            const auto ms = Scalars<float>::of_head(tp, tn, ap, an, h);
            const auto mv = Scalars<Vec>::of_head(tp, tn, ap, an, h);
            float *acc_h = acc.get() + g * rows * p.Dv, *m_h = m.data() + g * rows, *l_h = l.data() + g * rows;
            scale_rows(q_rows, rows * p.D, p.scale, qbuf.get());
            // Scores block by block, each a product with the block's K^T tile where it lies.
            for (int64_t s = first, c = 0; s < last; c += seg.n[s++])
              at::native::cpublas::brgemm(rows, seg.n[s], p.D, p.D, bs, cols, false, qbuf.get(), key_cols.tile(kb, seg.c0[s]),
                                          tile.get() + c, false);
            const bool plain = ms.identity && p.softcap <= 0.f && !p.bias && !p.mask;
            for (int64_t i = 0; i < rows; ++i) {
              const int64_t r = r0 + i;
              float* row = tile.get() + i * cols;
              float mx = m_h[i];
              if (seg.whole_rows) {  // one pass over the row, visible up to `visible`
                const int64_t visible = seg.visible_prefix(p, r, first, last);
                if (plain) {
                  std::fill(row + visible, row + cols, kNegInf);
                  mx = std::max(mx, row_max(row, cols));
                } else {
                  mx = std::max(mx, forward_row(row, cols, p, ms, mv, nullptr, nullptr, visible));
                }
                online_softmax_row(row, cols, mx, m_h[i], l_h[i], acc_h + i * p.Dv, p.Dv);
                continue;
              }
              for (int64_t s = first, c = 0; s < last; c += seg.n[s++]) {
                const int64_t c0 = seg.c0[s], n = seg.n[s];
                const int64_t visible = p.visible(r, c0, n);
                if (plain) {  // plain scores: only the keys past the causal frontier change (to -inf)
                  std::fill(row + c + visible, row + c + n, kNegInf);
                  continue;
                }
                const float* bias_row = p.bias_row(b, h, r, c0);
                const float* mask_row = p.mask_row(b, h, r, c0);
                mx = std::max(mx, forward_row(row + c, n, p, ms, mv, bias_row, mask_row, visible));
              }
              if (plain) mx = std::max(mx, row_max(row, cols));
              online_softmax_row(row, cols, mx, m_h[i], l_h[i], acc_h + i * p.Dv, p.Dv);
            }
            // P.V block by block, each block's V rows read where they lie, summed into acc.
            for (int64_t s = first, c = 0; s < last; c += seg.n[s++])
              at::native::cpublas::brgemm(rows, p.Dv, seg.n[s], cols, p.Dv, p.Dv, true, tile.get() + c, vb + seg.c0[s] * p.Dv,
                                          acc_h, false);
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t i = 0; i < rows; ++i) {
          float* o = op + b * p.H * p.Q * p.Dv + (r0 + i) * row_step + (h0 + g) * head_step;
          const float li = l[g * rows + i], inv = li > 0.f ? 1.f / li : 0.f;
          for (int64_t d = 0; d < p.Dv; ++d) o[d] = acc[(g * rows + i) * p.Dv + d] * inv;
          // +inf: a row that sees no key gets exactly zero recomputed probabilities.
          lp[((b * p.H + h0 + g) * p.Q) + r0 + i] = li > 0.f ? m[g * rows + i] + std::log(li) : kInf;
        }
      }
    }
  });
  return {heads_last ? out.transpose(1, 2) : out, lse};
}

// row[0, n) <- softmax probabilities recomputed from the row's log-sum-exp: exp(score + mask - lse),
// zero past `visible` (causal) and where masked; a row that saw no key has lse = +inf, so zeros.
void probs_row(float* row, int64_t n, float lse, int64_t visible, const float* mask_row) {
  const Vec l(lse);
  int64_t j = 0;
  for (; j + Vec::size() <= visible; j += Vec::size()) {
    Vec x = Vec::loadu(row + j);
    if (mask_row) x = x + Vec::loadu(mask_row + j);
    exp_(x - l).store(row + j);
  }
  for (; j < visible; ++j) row[j] = std::exp(row[j] + (mask_row ? mask_row[j] : 0.f) - lse);
  std::fill(row + j, row + n, 0.f);
}

// Gradient of the 10 scalars (t1..t4, b1, d1, b2, d2, a, c) accumulated over one tile row.
template <typename T>
struct ScalarGrads {
  T g[10];
  ScalarGrads() {
    for (auto& x : g) x = T(0.f);
  }
};

// One score of the backward, in place: `s_io` holds the pre-softcap scaled score and becomes dS
// (w.r.t. q.k), `dp_io` holds dP = dO.V^T and becomes P.
template <typename T>
inline void backward_elem(T u, T bias, T post, T lse, T delta, T& dp_io, T& s_io, const Scalars<T>& m, const Problem& p,
                          T cap, T inv_cap, T scale, ScalarGrads<T>& acc, bool has_affine) {
  T t = p.softcap > 0.f ? tanh_(u * inv_cap) : T(0.f);
  T s = (p.softcap > 0.f ? cap * t : u) + bias;
  T x = m.scale_a * s + m.shift_c;
  T lo1 = relu(m.b1 - x), hi1 = relu(x - m.d1), lo2 = relu(m.b2 - x), hi2 = relu(x - m.d2);
  // A masked key has post = -inf: probability 0, so dy = 0 and every term below vanishes.
  T y = x + m.t1 * lo1 + m.t2 * hi1 + m.t3 * lo2 * lo2 + m.t4 * hi2 * hi2 + post;
  // Kept keys have y <= lse; the clamp keeps a masked key's probability finite (its dy is 0 anyway).
  T prob = exp_(min0(y - lse));
  T dy = prob * (dp_io - delta);
  T below1 = lt(x, m.b1), above1 = lt(m.d1, x);
  acc.g[0] = acc.g[0] + dy * lo1;
  acc.g[1] = acc.g[1] + dy * hi1;
  acc.g[2] = acc.g[2] + dy * lo2 * lo2;
  acc.g[3] = acc.g[3] + dy * hi2 * hi2;
  acc.g[4] = acc.g[4] + dy * below1;
  acc.g[5] = acc.g[5] + dy * above1;
  acc.g[6] = acc.g[6] + dy * lo2;
  acc.g[7] = acc.g[7] + dy * hi2;
  T dx = dy * (T(1.f) - m.t1 * below1 + m.t2 * above1 - T(2.f) * m.t3 * lo2 + T(2.f) * m.t4 * hi2);
  if (has_affine) {
    acc.g[8] = acc.g[8] + dx * s;
    acc.g[9] = acc.g[9] + dx;
    dx = dx * m.scale_a;
  }
  if (p.softcap > 0.f) dx = dx * (T(1.f) - t * t);
  dp_io = prob;
  s_io = dx * scale;
}

void backward_row(float* s_row, float* dp_row, int64_t n, const Problem& p, const Scalars<float>& ms,
                  const Scalars<Vec>& mv, const float* bias_row, const float* mask_row, int64_t visible, float lse,
                  float delta, ScalarGrads<float>& gs, ScalarGrads<Vec>& gv) {
  const float inv_cap = p.softcap > 0.f ? 1.f / p.softcap : 0.f;
  // Keys past the causal limit: no probability, no gradient.
  const int64_t vis = std::max<int64_t>(0, std::min(n, visible));
  int64_t j = 0;
  const Vec lse_v(lse), delta_v(delta), cap_v(p.softcap), inv_cap_v(inv_cap), scale_v(p.scale), zero(0.f);
  const int64_t vn = vis - vis % Vec::size();
  for (; j < vn; j += Vec::size()) {
    Vec dp = Vec::loadu(dp_row + j), s = Vec::loadu(s_row + j);
    Vec bias = bias_row ? Vec::loadu(bias_row + j) : zero, post = mask_row ? Vec::loadu(mask_row + j) : zero;
    backward_elem<Vec>(s, bias, post, lse_v, delta_v, dp, s, mv, p, cap_v, inv_cap_v, scale_v, gv, p.has_affine);
    dp.store(dp_row + j);
    s.store(s_row + j);
  }
  for (; j < vis; ++j) {
    backward_elem<float>(s_row[j], bias_row ? bias_row[j] : 0.f, mask_row ? mask_row[j] : 0.f, lse, delta, dp_row[j], s_row[j], ms, p, p.softcap,
                         inv_cap, p.scale, gs, p.has_affine);
  }
  for (; j < n; ++j) dp_row[j] = s_row[j] = 0.f;
}

// The backward stays on BLAS: the same panels for its five products (dK, dV accumulated transposed)
// measured 1.10x slower at L=8192 forward+backward (1 thread, AVX2, same process), and cost a V^T
// copy and a head's dK^T, dV^T per thread.
std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Problem& p,
                                 const at::Tensor& theta, const at::Tensor& affine, const at::Tensor& dout,
                                 const at::Tensor& lse, const at::Tensor& delta) {
  auto dq = at::zeros({p.B, p.H, p.Q, p.D}, q.options());
  auto dk = at::zeros({p.B, p.H, p.K, p.D}, q.options());  // per query head; GQA groups summed by the caller
  auto dv = at::zeros({p.B, p.H, p.K, p.Dv}, q.options());
  auto dscalars = at::zeros({p.B, p.H, 10}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *tp = theta.data_ptr<float>(), *ap = affine.data_ptr<float>();
  const int64_t tn = theta.size(1), an = affine.size(1);
  const float *dop = dout.data_ptr<float>(), *lp = lse.data_ptr<float>(), *delp = delta.data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  float* dsp = dscalars.data_ptr<float>();
  const int64_t group = p.H / p.Hkv;

  at::parallel_for(0, p.B * p.H, grain_for(3 * p.Q * p.key_end(p.Q - 1) * (p.D + p.Dv)), [&](int64_t begin, int64_t end) {
    const int64_t max_rows = std::min(kQueryBlock, p.Q), max_cols = std::min(kKeyBlock, std::max<int64_t>(1, p.K));
    std::vector<float> s_tile(max_rows * max_cols), dp_tile(max_rows * max_cols);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H, kvh = b * p.Hkv + h / group;
      const float *kb = kp + kvh * p.k_head, *vb = vp + kvh * p.v_head;
      const auto ms = Scalars<float>::of_head(tp, tn, ap, an, h);
      const auto mv = Scalars<Vec>::of_head(tp, tn, ap, an, h);
      // The scalars' gradients sum a term per score of the head (millions of them). Each tile row's
      // terms are summed in fp32 (at most kKeyBlock / lanes + lanes + a tail of additions in a chain),
      // then added into fp64 totals: the rounding error is then bounded by the row's length, not by
      // the number of scores, and no longer depends on the vector width's summation order.
      double total[10] = {};
      for (int64_t r0 = 0; r0 < p.Q; r0 += kQueryBlock) {
        const int64_t r1 = std::min(p.Q, r0 + kQueryBlock), rows = r1 - r0;
        const float *qb = qp + (bh * p.Q + r0) * p.D, *dob = dop + (bh * p.Q + r0) * p.Dv;
        float* dqb = dqp + (bh * p.Q + r0) * p.D;
        const int64_t c_end = p.key_end(r1 - 1);
        for (int64_t c0 = 0; c0 < c_end; c0 += kKeyBlock) {
          const int64_t c1 = std::min(c_end, c0 + kKeyBlock), n = c1 - c0;
          if (tile_is_masked(p, b, h, r0, r1, c0, c1)) continue;
          gemm(false, true, rows, n, p.D, p.scale, qb, p.D, kb + c0 * p.D, p.D, 0.f, s_tile.data(), n);
          gemm(false, true, rows, n, p.Dv, 1.f, dob, p.Dv, vb + c0 * p.Dv, p.Dv, 0.f, dp_tile.data(), n);
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t r = r0 + i;
            float *s_row = s_tile.data() + i * n, *dp_row = dp_tile.data() + i * n;
            const float* bias_row = p.bias_row(b, h, r, c0);
            const float* mask_row = p.mask_row(b, h, r, c0);
            const int64_t visible = p.visible(r, c0, n);
            const float row_lse = lp[bh * p.Q + r];
            if (row_lse == kInf) {  // nothing to attend: no gradient
              std::fill(s_row, s_row + n, 0.f);
              std::fill(dp_row, dp_row + n, 0.f);
              continue;
            }
            ScalarGrads<float> gs;
            ScalarGrads<Vec> gv;
            backward_row(s_row, dp_row, n, p, ms, mv, bias_row, mask_row, visible, row_lse, delp[bh * p.Q + r], gs, gv);
            for (int g = 0; g < (p.has_affine ? 10 : 8); ++g) total[g] += static_cast<double>(gs.g[g]) + hsum(gv.g[g]);
          }
          gemm(false, false, rows, p.D, n, 1.f, s_tile.data(), n, kb + c0 * p.D, p.D, 1.f, dqb, p.D);
          gemm(true, false, n, p.D, rows, 1.f, s_tile.data(), n, qb, p.D, 1.f, dkp + (bh * p.K + c0) * p.D, p.D);
          gemm(true, false, n, p.Dv, rows, 1.f, dp_tile.data(), n, dob, p.Dv, 1.f, dvp + (bh * p.K + c0) * p.Dv, p.Dv);
        }
      }
      float* out = dsp + bh * 10;
      // The accumulators hold dy*[x<b1], dy*[x>d1], dy*relu(b2-x), dy*relu(x-d2): the gradients of
      // b1, d1, b2, d2 are these times t1, -t2, 2*t3, -2*t4.
      total[4] *= ms.t1;
      total[5] *= -ms.t2;
      total[6] *= 2.0 * ms.t3;
      total[7] *= -2.0 * ms.t4;
      for (int g = 0; g < 10; ++g) out[g] = static_cast<float>(total[g]);
    }
  });
  return {dq, dk, dv, dscalars};
}

// SparseMix's backward over the same blocks as `sparse_forward`, from its output and log-sum-exp
// (FlashAttention-2's recipe): per task and head, the score and dO.V^T products, then dS (softmax:
// P * (dP - rowsum(dO * O)); MultiMax (`modulated`): `backward_row`, which also sums the scalars'
// gradients), then dQ = dS.K, and dK += dS^T.Q, dV += P^T.dO into per-run buffers. The first three
// products run on the brgemm micro-kernel block by block as in the forward, reading K^T and V^T tiles
// and K's rows in place; the last two read their left operand transposed, which it does not take,
// and stay on BLAS. dK, dV and the scalars' sums are added to the key/value head's under its lock
// (query blocks of one head run in parallel and may share key blocks). out and dout may be strided
// views ([B, Q, H, D] memory).
std::vector<at::Tensor> sparse_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Problem& p,
                                        const at::Tensor& theta, const at::Tensor& affine, bool modulated,
                                        const at::Tensor& out, const at::Tensor& dout, const at::Tensor& lse,
                                        const at::Tensor& block_idx, const at::Tensor& block_valid, int64_t bs,
                                        int64_t q_offset) {
  auto dq = at::empty({p.B, p.H, p.Q, p.D}, q.options());
  const float *tp = theta.data_ptr<float>(), *ap = affine.data_ptr<float>();
  const int64_t tn = theta.size(1), an = affine.size(1);
  // The scalars' gradients per (batch, query head), summed in fp64 across tile rows as in `backward`.
  std::vector<double> scalar_totals(modulated ? p.B * p.H * 10 : 0, 0.0);
  auto dk = at::zeros({p.B, p.Hkv, p.K, p.D}, q.options());
  auto dv = at::zeros({p.B, p.Hkv, p.K, p.Dv}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *o_p = out.data_ptr<float>(), *do_p = dout.data_ptr<float>(), *lp = lse.data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  const int64_t os[3] = {out.stride(0), out.stride(1), out.stride(2)}, ds_[3] = {dout.stride(0), dout.stride(1), dout.stride(2)};
  const int64_t* ip = block_idx.data_ptr<int64_t>();
  const bool* okp = block_valid.data_ptr<bool>();
  const int64_t nQB = block_idx.size(2), S = block_idx.size(3), group = p.H / p.Hkv;
  const int64_t max_cols = std::max(bs, kGatherColumns / bs * bs);
  std::vector<std::mutex> head_locks(p.B * p.Hkv);
  at::parallel_for(0, p.B * p.Hkv * nQB, grain_for(group * bs * S * bs * 3 * (p.D + p.Dv)), [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> prob(new float[bs * max_cols]), dscore(new float[bs * max_cols]),
        qbuf(new float[bs * p.D]), dkbuf(new float[max_cols * p.D]), dvbuf(new float[max_cols * p.Dv]);
    SelectedBlocks seg(S);
    TransposedHead key_cols(p.K, p.D, bs, true), value_cols(p.K, p.Dv, bs, true);
    for (int64_t task = begin; task < end; ++task) {
      const SparseTask t(task, nQB, p, bs, q_offset, group);
      const int64_t kvh = t.kvh, qb = t.qb, b = t.b, h0 = t.h0, r0 = t.r0, r1 = t.r1, rows = r1 - r0;
      if (rows <= 0) continue;
      const float *kb = kp + kvh * p.k_head, *vb = vp + kvh * p.v_head;
      // The blocks the forward attended (tiles it skipped hold zero probabilities).
      seg.collect(p, ip + (kvh * nQB + qb) * S, okp + (kvh * nQB + qb) * S, S, bs, b, h0, group, r0, r1);
      for (int64_t g = 0; g < group; ++g) {  // dQ of rows that attend nothing stays zero
        float* dq_rows = dqp + ((b * p.H + h0 + g) * p.Q + r0) * p.D;
        std::fill(dq_rows, dq_rows + rows * p.D, 0.f);
      }
      for (int64_t first = 0, last, cols; first < seg.count; first = last) {
        last = seg.run_end(first, max_cols, cols);
        // The scores read K^T tiles, dP = dO.V^T reads V^T tiles, dQ = dS.K reads K's rows in place:
        // the products the micro-kernel takes without a transpose, one call per block as in the forward.
        key_cols.use_head(kvh);
        value_cols.use_head(kvh);
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = h0 + g, bh = b * p.H + h;
          const float* q_rows = qp + (bh * p.Q + r0) * p.D;
          const float* o_rows = o_p + b * os[0] + h * os[1] + r0 * os[2];
          const float* do_rows = do_p + b * ds_[0] + h * ds_[1] + r0 * ds_[2];
          float* dq_rows = dqp + (bh * p.Q + r0) * p.D;
          // The group's first head writes the run's dK/dV buffers, the others add (no zeroing pass).
          const bool first_head = g == 0;
          scale_rows(q_rows, rows * p.D, p.scale, qbuf.get());
          for (int64_t s = first, c = 0; s < last; c += seg.n[s++]) {
            at::native::cpublas::brgemm(rows, seg.n[s], p.D, p.D, bs, cols, false, qbuf.get(), key_cols.tile(kb, seg.c0[s]),
                                        prob.get() + c, false);
            at::native::cpublas::brgemm(rows, seg.n[s], p.Dv, ds_[2], bs, cols, false, do_rows,
                                        value_cols.tile(vb, seg.c0[s]), dscore.get() + c, false);
          }
          if (modulated) {
            // MultiMax: each row's scores become scale * dS in place (prob) and its dP becomes P
            // (dscore), as in `backward`; the products below then read them swapped.
            const auto ms = Scalars<float>::of_head(tp, tn, ap, an, h);
            const auto mv = Scalars<Vec>::of_head(tp, tn, ap, an, h);
            double total[10] = {};
            for (int64_t i = 0; i < rows; ++i) {
              const int64_t r = r0 + i;
              float *sr = prob.get() + i * cols, *dr = dscore.get() + i * cols;
              const float l = lp[bh * p.Q + r];
              if (l == kInf) {  // nothing attended: no gradient
                std::fill(sr, sr + cols, 0.f);
                std::fill(dr, dr + cols, 0.f);
                continue;
              }
              const float dl = dot(do_rows + i * ds_[2], o_rows + i * os[2], p.Dv);  // rowsum(dO * O)
              ScalarGrads<float> gs;
              ScalarGrads<Vec> gv;
              if (seg.whole_rows) {
                backward_row(sr, dr, cols, p, ms, mv, nullptr, nullptr, seg.visible_prefix(p, r, first, last), l, dl, gs, gv);
              } else {
                for (int64_t s = first, c = 0; s < last; c += seg.n[s++]) {
                  const int64_t c0 = seg.c0[s], n = seg.n[s];
                  backward_row(sr + c, dr + c, n, p, ms, mv, nullptr, p.mask_row(b, h, r, c0), p.visible(r, c0, n), l,
                               dl, gs, gv);
                }
              }
              for (int g2 = 0; g2 < (p.has_affine ? 10 : 8); ++g2) total[g2] += static_cast<double>(gs.g[g2]) + hsum(gv.g[g2]);
            }
            {
              std::lock_guard<std::mutex> hold(head_locks[kvh]);
              for (int g2 = 0; g2 < 10; ++g2) scalar_totals[bh * 10 + g2] += total[g2];
            }
            for (int64_t s = first, c = 0; s < last; c += seg.n[s++])
              at::native::cpublas::brgemm(rows, p.D, seg.n[s], cols, p.D, p.D, true, prob.get() + c,
                                          kb + seg.c0[s] * p.D, dq_rows, false);
            gemm(true, false, cols, p.D, rows, 1.f, prob.get(), cols, q_rows, p.D, first_head ? 0.f : 1.f, dkbuf.get(), p.D);
            gemm(true, false, cols, p.Dv, rows, 1.f, dscore.get(), cols, do_rows, ds_[2], first_head ? 0.f : 1.f,
                 dvbuf.get(), p.Dv);
            continue;
          }
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t r = r0 + i;
            float *pr = prob.get() + i * cols, *dr = dscore.get() + i * cols;
            const float l = lp[bh * p.Q + r];
            if (seg.whole_rows) {
              probs_row(pr, cols, l, seg.visible_prefix(p, r, first, last), nullptr);
            } else {
              for (int64_t s = first, c = 0; s < last; c += seg.n[s++]) {
                const int64_t c0 = seg.c0[s], n = seg.n[s];
                probs_row(pr + c, n, l, p.visible(r, c0, n), p.mask_row(b, h, r, c0));
              }
            }
            const float dl = dot(do_rows + i * ds_[2], o_rows + i * os[2], p.Dv);  // rowsum(dO * O)
            // scale * dS: both products below take the scale from here.
            const Vec dlt(dl), sv(p.scale);
            int64_t j = 0;
            for (; j + Vec::size() <= cols; j += Vec::size())
              (Vec::loadu(pr + j) * (Vec::loadu(dr + j) - dlt) * sv).store(dr + j);
            for (; j < cols; ++j) dr[j] = pr[j] * (dr[j] - dl) * p.scale;
          }
          for (int64_t s = first, c = 0; s < last; c += seg.n[s++])
            at::native::cpublas::brgemm(rows, p.D, seg.n[s], cols, p.D, p.D, true, dscore.get() + c, kb + seg.c0[s] * p.D,
                                        dq_rows, false);
          gemm(true, false, cols, p.D, rows, 1.f, dscore.get(), cols, q_rows, p.D, first_head ? 0.f : 1.f, dkbuf.get(), p.D);
          gemm(true, false, cols, p.Dv, rows, 1.f, prob.get(), cols, do_rows, ds_[2], first_head ? 0.f : 1.f, dvbuf.get(),
               p.Dv);
        }
        {
          std::lock_guard<std::mutex> hold(head_locks[kvh]);
          for (int64_t s = first, c = 0; s < last; c += seg.n[s++]) {
            axpy(1.f, dkbuf.get() + c * p.D, dkp + (kvh * p.K + seg.c0[s]) * p.D, seg.n[s] * p.D);
            axpy(1.f, dvbuf.get() + c * p.Dv, dvp + (kvh * p.K + seg.c0[s]) * p.Dv, seg.n[s] * p.Dv);
          }
        }
      }
    }
  });
  // [B, H, 10] as `backward` returns them: the accumulators of b1, d1, b2, d2 times t1, -t2, 2 t3, -2 t4.
  auto dscalars = at::zeros({p.B, p.H, modulated ? 10 : 0}, q.options());
  float* dsp = dscalars.data_ptr<float>();
  for (int64_t bh = 0; modulated && bh < p.B * p.H; ++bh) {
    const auto ms = Scalars<float>::of_head(tp, tn, ap, an, bh % p.H);
    double* t = scalar_totals.data() + bh * 10;
    t[4] *= ms.t1;
    t[5] *= -ms.t2;
    t[6] *= 2.0 * ms.t3;
    t[7] *= -2.0 * ms.t4;
    for (int g = 0; g < 10; ++g) dsp[bh * 10 + g] = static_cast<float>(t[g]);
  }
  return {dq, dk, dv, dscalars};
}

// Elements between consecutive (batch, key/value head) row blocks of t [B, Hkv, K, D], which the
// kernel addresses as (b * Hkv + h) * step + row * D: each block's K rows of D lie contiguously and the
// blocks follow each other at one stride (a contiguous tensor, or a prefix along K of one, as a static
// cache cut at its length is). The stride of a size-1 dimension is never read: torch leaves any value
// there (k.transpose(1, 2) of a one-token [B, 1, H, D] has stride H * D on K) and still calls the
// tensor contiguous. -1 when t cannot be addressed so.
int64_t head_step(const at::Tensor& t) {
  if (t.dim() != 4) return -1;
  const int64_t B = t.size(0), H = t.size(1), K = t.size(2), D = t.size(3);
  if ((D > 1 && t.stride(3) != 1) || (K > 1 && t.stride(2) != D)) return -1;
  const int64_t step = H > 1 ? t.stride(1) : B > 1 ? t.stride(0) : K * D;
  if (step < K * D || (H > 1 && B > 1 && t.stride(0) != H * step)) return -1;
  return step;
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask,
                     const c10::optional<at::Tensor>& bias, bool causal, double scale, double softcap, bool has_affine) {
  TORCH_CHECK(q.dtype() == at::kFloat && k.dtype() == at::kFloat && v.dtype() == at::kFloat, "fp32 q, k, v expected");
  TORCH_CHECK(q.is_contiguous() && head_step(k) >= 0 && head_step(v) >= 0,
              "contiguous q, and k, v whose (batch, head) rows are contiguous, expected");
  Problem p{};
  p.B = q.size(0); p.H = q.size(1); p.Q = q.size(2); p.D = q.size(3);
  p.Hkv = k.size(1); p.K = k.size(2); p.Dv = v.size(3);
  p.k_head = head_step(k);
  p.v_head = head_step(v);
  TORCH_CHECK(p.H % p.Hkv == 0, "query heads must be a multiple of key/value heads");
  p.causal = causal;
  p.offset = p.K - p.Q;
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.has_affine = has_affine;
  p.mask = nullptr;
  p.bias = nullptr;
  if (mask.has_value()) {
    const auto& m = *mask;
    TORCH_CHECK(m.dtype() == at::kFloat && m.dim() == 4 && (m.size(3) == 1 || m.stride(3) == 1), "fp32 0/-inf [B, H, Q, K] mask with contiguous keys expected");
    p.mask = m.data_ptr<float>();
    for (int d = 0; d < 3; ++d) p.mask_s[d] = m.stride(d);
  }
  if (bias.has_value()) {
    const auto& t = *bias;
    TORCH_CHECK(t.dtype() == at::kFloat && t.dim() == 4 && (t.size(3) == 1 || t.stride(3) == 1), "fp32 [B, H, Q, K] bias with contiguous keys expected");
    p.bias = t.data_ptr<float>();
    for (int d = 0; d < 3; ++d) p.bias_s[d] = t.stride(d);
  }
  return p;
}

std::vector<at::Tensor> forward_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& theta,
                                   const at::Tensor& affine, const c10::optional<at::Tensor>& mask,
                                   const c10::optional<at::Tensor>& bias, bool causal, double scale, double softcap,
                                   bool has_affine) {
  const Problem p = make_problem(q, k, v, mask, bias, causal, scale, softcap, has_affine);
  return forward(q, k, v, p, theta.contiguous(), affine.contiguous());
}

std::vector<at::Tensor> backward_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& theta,
                                    const at::Tensor& affine, const c10::optional<at::Tensor>& mask,
                                    const c10::optional<at::Tensor>& bias, bool causal, double scale, double softcap,
                                    bool has_affine, const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& delta) {
  const Problem p = make_problem(q, k, v, mask, bias, causal, scale, softcap, has_affine);
  return backward(q, k, v, p, theta.contiguous(), affine.contiguous(), dout.contiguous(), lse.contiguous(),
                  delta.contiguous());
}

std::vector<at::Tensor> sparse_forward_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& theta, const at::Tensor& affine,
                                          const c10::optional<at::Tensor>& mask, const at::Tensor& block_idx,
                                          const at::Tensor& block_valid, int64_t block_size, int64_t q_offset,
                                          bool causal, double scale, bool has_affine, bool heads_last) {
  const Problem p = make_problem(q, k, v, mask, c10::nullopt, causal, scale, 0.0, has_affine);
  TORCH_CHECK(block_idx.dtype() == at::kLong && block_valid.dtype() == at::kBool && block_idx.is_contiguous() &&
              block_valid.is_contiguous(), "contiguous int64 block_idx and bool block_valid expected");
  return sparse_forward(q, k, v, p, theta.contiguous(), affine.contiguous(), block_idx, block_valid, block_size, q_offset,
                        heads_last);
}

std::vector<at::Tensor> sparse_backward_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& theta, const at::Tensor& affine, bool has_affine,
                                           bool modulated, const c10::optional<at::Tensor>& mask,
                                           const at::Tensor& block_idx, const at::Tensor& block_valid,
                                           int64_t block_size, int64_t q_offset, bool causal, double scale,
                                           const at::Tensor& out, const at::Tensor& dout, const at::Tensor& lse) {
  const Problem p = make_problem(q, k, v, mask, c10::nullopt, causal, scale, 0.0, has_affine);
  TORCH_CHECK(block_idx.dtype() == at::kLong && block_valid.dtype() == at::kBool && block_idx.is_contiguous() &&
              block_valid.is_contiguous(), "contiguous int64 block_idx and bool block_valid expected");
  TORCH_CHECK(out.dtype() == at::kFloat && dout.dtype() == at::kFloat && out.stride(3) == 1 && dout.stride(3) == 1 &&
              lse.dtype() == at::kFloat && lse.is_contiguous(), "fp32 out, dout with contiguous rows and contiguous lse expected");
  return sparse_backward(q, k, v, p, theta.contiguous(), affine.contiguous(), modulated, out, dout, lse, block_idx,
                         block_valid, block_size, q_offset);
}

// SparseMix's top-k block selection (ops/sparsemix/selection.py `select_blocks`, the reference) in one
// call: per row of block scores, the k best blocks that are neither hidden (future, or forced) nor
// NaN, best first (ties: the lower block), after the two fixed slots (sink, local). While decoding the
// reference's ten small tensor ops cost more than the selection itself.
std::vector<at::Tensor> select_top_blocks_op(const at::Tensor& scores, const at::Tensor& hidden,
                                             const at::Tensor& fixed_idx, const at::Tensor& fixed_ok, int64_t k) {
  TORCH_CHECK(scores.dim() == 4 && scores.dtype() == at::kFloat && scores.stride(3) == 1,
              "fp32 scores [B, Hkv, nQB, nKB] with contiguous rows expected");
  const int64_t B = scores.size(0), H = scores.size(1), nQB = scores.size(2), nKB = scores.size(3);
  TORCH_CHECK(hidden.dtype() == at::kBool && hidden.is_contiguous() && hidden.size(0) == nQB && hidden.size(1) == nKB,
              "contiguous bool hidden [nQB, nKB] expected");
  TORCH_CHECK(fixed_idx.dtype() == at::kLong && fixed_ok.dtype() == at::kBool && fixed_idx.is_contiguous() &&
              fixed_ok.is_contiguous() && fixed_idx.numel() == 2 * nQB && fixed_ok.numel() == 2 * nQB,
              "contiguous int64 fixed_idx and bool fixed_ok [nQB, 2] expected");
  TORCH_CHECK(0 <= k && k <= nKB, "0 <= k <= nKB expected");
  const int64_t S = 2 + k;
  at::Tensor idx = at::empty({B, H, nQB, S}, scores.options().dtype(at::kLong));
  at::Tensor ok = at::empty({B, H, nQB, S}, scores.options().dtype(at::kBool));
  const float* sc = scores.data_ptr<float>();
  const bool* hid = hidden.data_ptr<bool>();
  const int64_t* fi = fixed_idx.data_ptr<int64_t>();
  const bool* fo = fixed_ok.data_ptr<bool>();
  int64_t* out_idx = idx.data_ptr<int64_t>();
  bool* out_ok = ok.data_ptr<bool>();
  const int64_t s0 = scores.stride(0), s1 = scores.stride(1), s2 = scores.stride(2);
  at::parallel_for(0, B * H * nQB, 16, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> cand(std::max<int64_t>(k, 1));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t a = row % nQB, h = row / nQB % H, b = row / nQB / H;
      const float* r = sc + b * s0 + h * s1 + a * s2;
      const bool* hr = hid + a * nKB;
      // The k best so far, best first, in one scan: a block enters only if it beats the worst kept
      // (`bar`; -inf until k are kept), which after the first few dozen blocks few do, so the scan
      // tests a vector of scores at a time and looks closer only where one passes (a partial sort
      // of every candidate took 17 ms of a 16k forward's ~60 ms selection). NaN and -inf never pass.
      // Blocks come in increasing order, so on a tie the one kept (the lower block) stays ahead.
      int64_t take = 0;
      float bar = kNegInf;
      auto offer = [&](int64_t j) {
        const float x = r[j];
        if (hr[j] || !(x > bar)) return;
        int64_t pos = take < k ? take++ : k - 1;
        for (; pos > 0 && r[cand[pos - 1]] < x; --pos) cand[pos] = cand[pos - 1];
        cand[pos] = j;
        if (take == k) bar = r[cand[k - 1]];
      };
      int64_t j = 0;
      for (; k > 0 && j + Vec::size() <= nKB; j += Vec::size()) {
        const int passing = (Vec::loadu(r + j) > Vec(bar)).zero_mask() ^ ((1 << Vec::size()) - 1);
        for (int lane = 0; lane < Vec::size(); ++lane)
          if (passing & (1 << lane)) offer(j + lane);
      }
      for (; k > 0 && j < nKB; ++j) offer(j);
      int64_t* oi = out_idx + row * S;
      bool* oo = out_ok + row * S;
      for (int s = 0; s < 2; ++s) oi[s] = fi[a * 2 + s], oo[s] = fo[a * 2 + s];
      for (int64_t s = 0; s < k; ++s) oi[2 + s] = s < take ? cand[s] : 0, oo[2 + s] = s < take;
    }
  });
  return {idx, ok};
}

// The block scorer's statistics in one pass over x [B, H, L, D] (rows at any stride) (ops/sparsemix/selection.py
// `block_statistics`, the reference): per block of bs rows (the first starting front_pad rows before
// row 0; rows outside [0, L) left out), the mean and the maximum of the rows, and with pair_norms the
// same of each row's rotary pair norms sqrt(x_i^2 + x_{i+D/2}^2), i < D/2. Written [.., mean | max]
// ([B, H, n, 2D]) and [.., norm mean | norm max] ([B, H, n, D]). The reference's tensor ops read x
// about ten times (norms, sums as a product, maxima, concatenations): ~70 ms of a 16k forward's
// ~90 ms selection, against one read here.
std::vector<at::Tensor> block_statistics_op(const at::Tensor& x, int64_t bs, int64_t front_pad, bool pair_norms) {
  TORCH_CHECK(x.dim() == 4 && x.dtype() == at::kFloat && (x.size(3) <= 1 || x.stride(3) == 1),
              "fp32 x [B, H, L, D] with contiguous features expected");
  TORCH_CHECK(bs > 0 && 0 <= front_pad && front_pad < bs, "0 <= front_pad < block_size expected");
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3), half = D / 2;
  TORCH_CHECK(!pair_norms || D % 2 == 0, "an even head size expected for pair norms");
  const int64_t n_blocks = (front_pad + L + bs - 1) / bs;
  at::Tensor raw = at::empty({B, H, n_blocks, 2 * D}, x.options());
  at::Tensor norms = at::empty({B, H, n_blocks, pair_norms ? D : 0}, x.options());
  const float* xp = x.data_ptr<float>();
  float *rp = raw.data_ptr<float>(), *np = norms.data_ptr<float>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);  // any layout of rows ([B, L, H, D] memory)
  at::parallel_for(0, B * H * n_blocks, std::max<int64_t>(1, 4096 / (bs * D)), [&](int64_t begin, int64_t end) {
    std::vector<float> nrm(half);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t blk = task % n_blocks, bh = task / n_blocks, b = bh / H, h = bh % H;
      const int64_t r0 = std::max<int64_t>(0, blk * bs - front_pad), r1 = std::min(L, (blk + 1) * bs - front_pad);
      const float* rows = xp + b * xs0 + h * xs1;
      float *sum = rp + task * 2 * D, *peak = sum + D;
      float *nsum = pair_norms ? np + task * D : nullptr, *npeak = nsum ? nsum + half : nullptr;
      std::fill(sum, sum + D, 0.f);
      std::fill(peak, peak + D, kNegInf);
      if (nsum) {
        std::fill(nsum, nsum + half, 0.f);
        std::fill(npeak, npeak + half, kNegInf);
      }
      for (int64_t r = r0; r < r1; ++r) {
        const float* row = rows + r * xs2;
        int64_t d = 0;
        for (; d + Vec::size() <= D; d += Vec::size()) {
          const Vec v = Vec::loadu(row + d);
          (Vec::loadu(sum + d) + v).store(sum + d);
          at::vec::maximum(Vec::loadu(peak + d), v).store(peak + d);
        }
        for (; d < D; ++d) sum[d] += row[d], peak[d] = std::max(peak[d], row[d]);
        if (!nsum) continue;
        int64_t i = 0;
        for (; i + Vec::size() <= half; i += Vec::size()) {
          const Vec a = Vec::loadu(row + i), c = Vec::loadu(row + half + i);
          const Vec n = (a * a + c * c).sqrt();
          (Vec::loadu(nsum + i) + n).store(nsum + i);
          at::vec::maximum(Vec::loadu(npeak + i), n).store(npeak + i);
        }
        for (; i < half; ++i) {
          const float n = std::sqrt(row[i] * row[i] + row[half + i] * row[half + i]);
          nsum[i] += n, npeak[i] = std::max(npeak[i], n);
        }
      }
      const float inv = 1.f / static_cast<float>(std::max<int64_t>(1, r1 - r0));
      for (int64_t d = 0; d < D; ++d) sum[d] *= inv;
      if (nsum)
        for (int64_t i = 0; i < half; ++i) nsum[i] *= inv;
    }
  });
  return {raw, norms};
}

// SparseMix's decoding step in one call per layer: the block scorer's query features, the block
// scores against the cache's block summaries, the top-k selection and the one-row kernel, for each
// (batch, key/value head). Selecting head t + 1 and requesting its blocks from memory happen before
// head t's kernel runs, so the selector's reads and the next head's block fetches overlap the
// kernel. Twin of `scorer_block_scores` (its Q == 1 path) + `select_blocks` + `sparse_forward`
// (ops/sparsemix/fused.py `fused_sparsemix_decode`; references in selection.py and naive.py).
enum class DecodeFeatures : int64_t { kBlock = 0, kNorms = 1, kRotary = 2 };

// The learned term's input for one decoding query of a key/value head group (`_scorer_inputs` with one
// query: its mean and max are itself): `pq` is the group's mean query [D], `nm` the group's mean of the
// per-head rotary pair norms [D / 2]; `in` gets the input w_query reads ([win]).
void decode_learned_input(DecodeFeatures kind, const float* pq, const float* nm, int64_t D, int64_t slow, float* in) {
  const int64_t half = D / 2;
  switch (kind) {
    case DecodeFeatures::kBlock:  // [mean, max] of the raw query
      std::memcpy(in, pq, D * sizeof(float));
      std::memcpy(in + D, pq, D * sizeof(float));
      return;
    case DecodeFeatures::kNorms:  // [mean, max] of the norms
      std::memcpy(in, nm, half * sizeof(float));
      std::memcpy(in + half, nm, half * sizeof(float));
      return;
    case DecodeFeatures::kRotary:  // [norms, slow pairs of the mean] then [norms, slow pairs of the max]
      for (int64_t part = 0, o = 0; part < 2; ++part) {
        std::memcpy(in + o, nm, half * sizeof(float));
        o += half;
        std::memcpy(in + o, pq + half - slow, slow * sizeof(float));
        o += slow;
        std::memcpy(in + o, pq + D - slow, slow * sizeof(float));
        o += slow;
      }
      return;
  }
}

// The k best candidate blocks of one row of scores, best first (ties: the lower block), after the two
// fixed slots: what `select_top_blocks_op` does per row.
void decode_top_blocks(const float* r, const bool* hidden, int64_t nKB, const int64_t* fixed_idx, const bool* fixed_ok,
                       int64_t k, std::vector<int64_t>& cand, int64_t* oi, bool* oo) {
  int64_t n = 0;
  for (int64_t j = 0; j < nKB; ++j)
    if (!hidden[j] && !std::isnan(r[j]) && r[j] > kNegInf) cand[n++] = j;
  const int64_t take = std::min(n, k);
  const auto better = [r](int64_t x, int64_t y) { return r[x] > r[y] || (r[x] == r[y] && x < y); };
  std::partial_sort(cand.begin(), cand.begin() + take, cand.begin() + n, better);
  for (int s = 0; s < 2; ++s) oi[s] = fixed_idx[s], oo[s] = fixed_ok[s];
  for (int64_t s = 0; s < k; ++s) oi[2 + s] = s < take ? cand[s] : 0, oo[2 + s] = s < take;
}

// The selected key and value blocks of a decoding step, in the order the one-row kernel reads them
// (per key/value head: its key blocks, then its value blocks), requested from memory a fixed distance
// ahead of the read, rather than a whole head's blocks at once (`sparse_forward`'s decoding prefetch:
// 320 KB at top-18, blocks of 32, D = 64, more than a core's outstanding misses can hold, and beside
// the head being read a good part of L2). One 16k layer, 1 thread: ~815 -> ~740 us per call (noisy).
struct BlockStream {
  static constexpr size_t kAhead = 12;  // blocks in flight: 96 KB of 8 KB blocks (L2: 512 KB)
  std::vector<const float*> start;
  std::vector<int64_t> floats;
  size_t issued = 0, read = 0;

  void add(const float* x, int64_t n) {
    start.push_back(x);
    floats.push_back(n);
  }
  // One more block read: keep kAhead requested past it (into L2: they would not fit L1).
  void advance() {
    ++read;
    for (const size_t until = std::min(start.size(), read + kAhead); issued < until; ++issued) {
      for (int64_t i = 0; i < floats[issued]; i += kFloatsPerLine) {
#if defined(__GNUC__) || defined(__clang__)
        __builtin_prefetch(start[issued] + i, 0, 2);
#endif
      }
    }
  }
};

// Scores of n keys of D_ = NV vectors (scale * q.k), four keys at a time: `dot`'s one accumulator
// chain waits on each multiply-add's latency; four independent chains do not (the same sums).
template <int64_t NV>
inline void scores_of_block(const float* q, const float* k, int64_t n, float scale, float* out) {
  constexpr int64_t V = Vec::size(), D = NV * V;
  Vec qv[NV];
  for (int64_t v = 0; v < NV; ++v) qv[v] = Vec::loadu(q + v * V);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* k0 = k + j * D;
    Vec a0 = qv[0] * Vec::loadu(k0), a1 = qv[0] * Vec::loadu(k0 + D), a2 = qv[0] * Vec::loadu(k0 + 2 * D),
        a3 = qv[0] * Vec::loadu(k0 + 3 * D);
    for (int64_t v = 1; v < NV; ++v) {
      a0 = at::vec::fmadd(qv[v], Vec::loadu(k0 + v * V), a0);
      a1 = at::vec::fmadd(qv[v], Vec::loadu(k0 + D + v * V), a1);
      a2 = at::vec::fmadd(qv[v], Vec::loadu(k0 + 2 * D + v * V), a2);
      a3 = at::vec::fmadd(qv[v], Vec::loadu(k0 + 3 * D + v * V), a3);
    }
    out[j] = scale * hsum(a0), out[j + 1] = scale * hsum(a1), out[j + 2] = scale * hsum(a2), out[j + 3] = scale * hsum(a3);
  }
  for (; j < n; ++j) out[j] = scale * dot(q, k + j * D, D);
}

// acc (NV vectors, in registers) += sum_j p[j] v[j] over n value rows: `axpy` per row loads and stores
// the accumulator, one chain through memory per key.
template <int64_t NV>
inline void accumulate_block(const float* pr, const float* v, int64_t n, Vec* acc) {
  constexpr int64_t V = Vec::size(), D = NV * V;
  for (int64_t j = 0; j < n; ++j) {
    if (pr[j] == 0.f) continue;
    const Vec pj(pr[j]);
    for (int64_t u = 0; u < NV; ++u) acc[u] = at::vec::fmadd(pj, Vec::loadu(v + j * D + u * V), acc[u]);
  }
}

// `decode_row` with softmax only and its first head's block reads counted in `stream` (the other heads
// of a group read the same blocks again, from cache). NV > 0: D = Dv = NV vectors, the scores four
// keys at a time and the accumulator in registers; NV = 0: any head size, `dot` and `axpy`.
template <int64_t NV>
void decode_row_streamed(const Problem& p, const SelectedBlocks& seg, int64_t b, int64_t h0, int64_t group,
                         const float* qp, const float* kb, const float* vb, const Scalars<float>& ms,
                         const Scalars<Vec>& mv, float* row, float* acc, float* m, float* l, BlockStream& stream) {
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = h0 + g, bh = b * p.H + h;
    const float* q_row = qp + bh * p.D;
    float mx = kNegInf;
    int64_t cols = 0;
    for (int64_t s = 0; s < seg.count; cols += seg.n[s++]) {
      const int64_t c0 = seg.c0[s], n = seg.n[s];
      if constexpr (NV > 0) {
        scores_of_block<NV>(q_row, kb + c0 * p.D, n, p.scale, row + cols);
      } else {
        for (int64_t j = 0; j < n; ++j) row[cols + j] = p.scale * dot(q_row, kb + (c0 + j) * p.D, p.D);
      }
      mx = std::max(mx, forward_row(row + cols, n, p, ms, mv, nullptr, p.mask_row(b, h, 0, c0), p.visible(0, c0, n)));
      if (g == 0) stream.advance();
    }
    float* acc_h = acc + g * p.Dv;
    std::fill(acc_h, acc_h + p.Dv, 0.f);
    m[g] = mx;
    l[g] = 0.f;
    if (mx != kNegInf) l[g] = exp_row(row, cols, mx);
    Vec acc_v[NV > 0 ? NV : 1];
    for (int64_t u = 0; u < NV; ++u) acc_v[u] = Vec(0.f);
    for (int64_t s = 0, c = 0; s < seg.count; c += seg.n[s++]) {
      const float* v_rows = vb + seg.c0[s] * p.Dv;
      if (mx != kNegInf) {
        if constexpr (NV > 0) {
          accumulate_block<NV>(row + c, v_rows, seg.n[s], acc_v);
        } else {
          for (int64_t j = 0; j < seg.n[s]; ++j) {
            if (row[c + j] != 0.f) axpy(row[c + j], v_rows + j * p.Dv, acc_h, p.Dv);
          }
        }
      }
      if (g == 0) stream.advance();
    }
    for (int64_t u = 0; u < NV; ++u) acc_v[u].store(acc_h + u * Vec::size());
  }
}

std::vector<at::Tensor> sparse_decode_step_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const c10::optional<at::Tensor>& mask, const at::Tensor& key_features,
                                              const at::Tensor& w_query, int64_t features, int64_t slow_pairs,
                                              const at::Tensor& hidden, const at::Tensor& fixed_idx,
                                              const at::Tensor& fixed_ok, int64_t top_k, int64_t bs, bool causal,
                                              double scale) {
  const Problem p = make_problem(q, k, v, mask, c10::nullopt, causal, scale, 0.0, false);
  TORCH_CHECK(p.Q == 1, "sparse_decode_step takes one query row, got ", p.Q);
  const int64_t nKB = (p.K + bs - 1) / bs, D = p.D, group = p.H / p.Hkv;
  TORCH_CHECK(key_features.dtype() == at::kFloat && key_features.dim() == 4 && key_features.size(0) == p.B &&
              key_features.size(1) == p.Hkv && key_features.size(2) == nKB && key_features.stride(3) == 1 &&
              key_features.stride(2) == key_features.size(3),
              "fp32 key_features [B, Hkv, nKB, F] with contiguous rows expected");
  const int64_t F = key_features.size(3);
  TORCH_CHECK(w_query.dtype() == at::kFloat && w_query.is_contiguous() && w_query.dim() == 3 && w_query.size(0) == p.Hkv &&
              F == D + w_query.size(2), "fp32 contiguous w_query [Hkv, in, r] with key_features of width D + r expected");
  const auto kind = static_cast<DecodeFeatures>(features);
  const int64_t win = w_query.size(1), r = w_query.size(2);
  TORCH_CHECK((kind == DecodeFeatures::kBlock && win == 2 * D) || (kind == DecodeFeatures::kNorms && D % 2 == 0 && win == D) ||
              (kind == DecodeFeatures::kRotary && D % 2 == 0 && 0 <= slow_pairs && 2 * slow_pairs <= D &&
               win == D + 4 * slow_pairs),
              "w_query's input size does not match the selector's features");
  TORCH_CHECK(hidden.dtype() == at::kBool && hidden.is_contiguous() && hidden.numel() == nKB && fixed_idx.dtype() == at::kLong &&
              fixed_ok.dtype() == at::kBool && fixed_idx.is_contiguous() && fixed_ok.is_contiguous() &&
              fixed_idx.numel() == 2 && fixed_ok.numel() == 2, "one query block's slot layout expected");
  TORCH_CHECK(0 <= top_k && top_k <= nKB, "0 <= top_k <= nKB expected");
  const int64_t S = 2 + top_k;
  auto out = at::empty({p.B, 1, p.H, p.Dv}, q.options());
  auto lse = at::empty({p.B, p.H, 1}, q.options());
  auto idx = at::empty({p.B, p.Hkv, 1, S}, q.options().dtype(at::kLong));
  auto ok = at::empty({p.B, p.Hkv, 1, S}, q.options().dtype(at::kBool));
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *kfp = key_features.data_ptr<float>(), *wp = w_query.data_ptr<float>();
  const int64_t kf0 = key_features.stride(0), kf1 = key_features.stride(1);
  const bool* hid = hidden.data_ptr<bool>();
  const int64_t* fi = fixed_idx.data_ptr<int64_t>();
  const bool* fo = fixed_ok.data_ptr<bool>();
  int64_t* ip = idx.data_ptr<int64_t>();
  bool* okp = ok.data_ptr<bool>();
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  // Softmax: no modulator (zero scalars, shared by all heads).
  const float theta[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, affine[2] = {0.f, 0.f};
  const auto ms = Scalars<float>::of_head(theta, 1, affine, 1, 0);
  const auto mv = Scalars<Vec>::of_head(theta, 1, affine, 1, 0);
  const float inv_group = 1.f / static_cast<float>(group);
  // Head sizes of 4, 8 or 16 vectors (32 to 256 floats by the build's vector width) take the register path.
  const int64_t vectors = p.D == p.Dv && p.D % Vec::size() == 0 ? p.D / Vec::size() : 0;
  at::parallel_for(0, p.B * p.Hkv, grain_for(group * S * bs * (p.D + p.Dv) + nKB * F), [&](int64_t begin, int64_t end) {
    std::vector<float> pq(D), nm(D / 2 + 1), in(win), qf(F), scores(nKB), row(S * bs), acc(group * p.Dv), m(group), l(group);
    std::vector<int64_t> cand(nKB);
    std::vector<SelectedBlocks> segs(end - begin, SelectedBlocks(S));
    BlockStream stream;
    // Scores and top-k of task t (batch b, key/value head kvh = t), then its blocks queued for the stream.
    auto select = [&](int64_t t) {
      const int64_t b = t / p.Hkv, hk = t % p.Hkv;
      std::fill(pq.begin(), pq.end(), 0.f);
      std::fill(nm.begin(), nm.end(), 0.f);
      for (int64_t g = 0; g < group; ++g) {
        const float* x = qp + (b * p.H + hk * group + g) * D;
        for (int64_t d = 0; d < D; ++d) pq[d] += x[d];
        if (kind != DecodeFeatures::kBlock)
          for (int64_t d = 0; d < D / 2; ++d) nm[d] += std::sqrt(x[d] * x[d] + x[d + D / 2] * x[d + D / 2]);
      }
      for (int64_t d = 0; d < D; ++d) pq[d] *= inv_group;
      for (int64_t d = 0; d < D / 2; ++d) nm[d] *= inv_group;
      decode_learned_input(kind, pq.data(), nm.data(), D, slow_pairs, in.data());
      for (int64_t d = 0; d < D; ++d) qf[d] = pq[d] * static_cast<float>(scale);
      std::fill(qf.begin() + D, qf.end(), 0.f);
      const float* w = wp + hk * win * r;
      for (int64_t i = 0; i < win; ++i) axpy(in[i], w + i * r, qf.data() + D, r);
      const float* kf = kfp + b * kf0 + hk * kf1;
      for (int64_t j = 0; j < nKB; ++j) scores[j] = dot(qf.data(), kf + j * F, F);
      int64_t* oi = ip + t * S;
      bool* oo = okp + t * S;
      decode_top_blocks(scores.data(), hid, nKB, fi, fo, top_k, cand, oi, oo);
      // Its blocks join the stream in the kernel's reading order (the blocks `collect` keeps).
      segs[t - begin].collect(p, oi, oo, S, bs, b, hk * group, group, 0, 1);
      const SelectedBlocks& sel = segs[t - begin];
      for (int64_t s = 0; s < sel.count; ++s) stream.add(kp + t * p.k_head + sel.c0[s] * p.D, sel.n[s] * p.D);
      for (int64_t s = 0; s < sel.count; ++s) stream.add(vp + t * p.v_head + sel.c0[s] * p.Dv, sel.n[s] * p.Dv);
    };
    if (begin < end) {
      select(begin);
      stream.advance();  // the first blocks requested (the count of blocks read stays one ahead: harmless)
    }
    for (int64_t t = begin; t < end; ++t) {
      if (t + 1 < end) select(t + 1);  // scored while this head's blocks arrive
      const int64_t b = t / p.Hkv, h0 = (t % p.Hkv) * group;
      const float *kb = kp + t * p.k_head, *vb = vp + t * p.v_head;
      const SelectedBlocks& sel = segs[t - begin];
      if (vectors == 4) {
        decode_row_streamed<4>(p, sel, b, h0, group, qp, kb, vb, ms, mv, row.data(), acc.data(), m.data(), l.data(), stream);
      } else if (vectors == 8) {
        decode_row_streamed<8>(p, sel, b, h0, group, qp, kb, vb, ms, mv, row.data(), acc.data(), m.data(), l.data(), stream);
      } else if (vectors == 16) {
        decode_row_streamed<16>(p, sel, b, h0, group, qp, kb, vb, ms, mv, row.data(), acc.data(), m.data(), l.data(), stream);
      } else {
        decode_row_streamed<0>(p, sel, b, h0, group, qp, kb, vb, ms, mv, row.data(), acc.data(), m.data(), l.data(), stream);
      }
      for (int64_t g = 0; g < group; ++g) {
        float* o = op + (b * p.H + h0 + g) * p.Dv;
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
        for (int64_t d = 0; d < p.Dv; ++d) o[d] = acc[g * p.Dv + d] * inv;
        lp[b * p.H + h0 + g] = l[g] > 0.f ? m[g] + std::log(l[g]) : kInf;
      }
    }
  });
  return {out.transpose(1, 2), lse, idx, ok};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward_op, "MultiMax attention forward: (out, lse)");
  m.def("sparse_forward", &sparse_forward_op, "SparseMix attention over selected key blocks, forward: (out, lse)");
  m.def("sparse_backward", &sparse_backward_op,
        "SparseMix attention over selected key blocks, backward: (dq, dk, dv, d scalars [B, H, 10] when modulated)");
  m.def("block_statistics", &block_statistics_op, "SparseMix block scorer statistics: ([mean | max], [norm mean | norm max])");
  m.def("select_top_blocks", &select_top_blocks_op, "SparseMix top-k block selection: (block_idx, block_valid)");
  m.def("sparse_decode_step", &sparse_decode_step_op,
        "SparseMix decoding step (block scores, top-k, one-row kernel): (out, lse, block_idx, block_valid)");
  m.def("backward", &backward_op, "MultiMax attention backward: (dq, dk per query head, dv per query head, d scalars [B, H, 10])");
}
