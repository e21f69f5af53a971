// Attention of each query token over a paged float32 KV cache, for XLA:CPU, where XLA runs the reference
// (kernels_pallas/reference.py) as a loop of gathers and many tiny batched matmuls. A token's arithmetic does not
// depend on the other tokens of its batch, so outputs do not change with how steps are composed.
//
// One work item is a query token and kv head: its G = Hq / Hkv query heads read the head's K and V rows of every
// position the token sees (causal, within the sliding window), each row once for all G heads, straight from the
// pages the block table names. Scores for the whole range are kept (G x positions floats), so the softmax is two
// passes over them instead of an online rescaling per row. Items are split over XLA's CPU thread pool.
//
// Cache layout as kernels_pallas: [pages, page_size, 2 * Hkv, D], K of head h at 2h and V at 2h + 1.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 8;  // partial sums per dot product: independent lanes the compiler vectorizes
// K/V floats (positions x kv heads x D) per part below which a second thread costs more than it saves (a
// single token at ~100 positions and more already gains from one).
constexpr int64_t kMinPartWork = 16384;

// Two chains of kLanes partial sums, so consecutive multiply-adds do not wait on each other.
inline float Dot(const float* a, const float* b, int64_t d) {
  float even[kLanes] = {}, odd[kLanes] = {};
  int64_t i = 0;
  for (; i + 2 * kLanes <= d; i += 2 * kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      even[l] += a[i + l] * b[i + l];
      odd[l] += a[i + kLanes + l] * b[i + kLanes + l];
    }
  }
  for (; i < d; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) even[l] += a[i + l] * b[i + l];
  }
  float s = 0;
  for (int64_t l = 0; l < kLanes; ++l) s += even[l] + odd[l];
  return s;
}

// e^x for x <= 0 (scores minus their maximum), elementwise over n floats in place: Cephes' expf (x = k ln2 + r,
// |r| <= ln2 / 2, e^r by a degree-5 polynomial in r, relative error ~1e-7) as a plain loop the compiler vectorizes,
// where std::exp is a call per score.
inline void ExpInPlace(float* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j] < -87.0f ? -87.0f : x[j];
    const float k = std::floor(v * 1.44269504088896341f + 0.5f);
    const float r = v - k * 0.693359375f + k * 2.12194440e-4f;  // ln 2 split in two for an exact product
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    x[j] = x[j] < -87.0f ? 0.0f : p * scale;
  }
}

// Sum and maximum of n floats in kLanes partial results (a single running one does not vectorize).
inline float Sum(const float* x, int64_t n) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += x[j + l];
  }
  float s = 0;
  for (; j < n; ++j) s += x[j];
  for (int64_t l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

inline float Max(const float* x, int64_t n) {
  float lanes[kLanes];
  std::fill(lanes, lanes + kLanes, -INFINITY);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] = std::max(lanes[l], x[j + l]);
  }
  float m = -INFINITY;
  for (; j < n; ++j) m = std::max(m, x[j]);
  for (int64_t l = 0; l < kLanes; ++l) m = std::max(m, lanes[l]);
  return m;
}

struct Shape {
  int64_t tokens, q_heads, kv_heads, d, pages, page_size, seqs, pages_per_seq;
};

// Calls row(j, kv) for positions lo + j, j in [0, pos - lo], with kv the cache row [2 * Hkv, D] holding them, a
// page's rows at a time (no division per row).
template <typename Row>
inline void ForEachRow(const Shape& s, const float* cache, const int32_t* table, int64_t lo, int64_t pos,
                       const Row& row) {
  const int64_t row_stride = 2 * s.kv_heads * s.d;  // floats per (page, offset) row of the cache
  for (int64_t p = lo; p <= pos;) {
    const int64_t page = std::clamp<int64_t>(table[p / s.page_size], 0, s.pages - 1), first = p % s.page_size;
    const int64_t count = std::min(s.page_size - first, pos - p + 1);
    const float* kv = cache + (page * s.page_size + first) * row_stride;
    for (int64_t r = 0; r < count; ++r) row(p - lo + r, kv + r * row_stride);
    p += count;
  }
}

// out[token, h * G + g, :] for g < G from the K/V rows of kv head h at positions [lo, pos] of sequence seq.
void AttendOne(const Shape& s, const float* q, const float* cache, const int32_t* table, int64_t token,
               int64_t h, int64_t lo, int64_t pos, float sm_scale, float soft_cap, std::vector<float>& scores,
               std::vector<float>& total, float* out) {
  const int64_t g_count = s.q_heads / s.kv_heads, n = pos - lo + 1, d = s.d;
  scores.resize(g_count * n);
  const float* qh = q + (token * s.q_heads + h * g_count) * d;
  ForEachRow(s, cache, table, lo, pos, [&](int64_t j, const float* kv) {
    const float* k = kv + 2 * h * d;
    for (int64_t g = 0; g < g_count; ++g) {
      float x = Dot(qh + g * d, k, d) * sm_scale;
      if (soft_cap > 0) x = soft_cap * std::tanh(x / soft_cap);
      scores[g * n + j] = x;
    }
  });
  float* o = out + (token * s.q_heads + h * g_count) * d;
  std::fill(o, o + g_count * d, 0.0f);
  total.resize(g_count);
  for (int64_t g = 0; g < g_count; ++g) {
    float* sg = scores.data() + g * n;
    const float top = Max(sg, n);
    for (int64_t j = 0; j < n; ++j) sg[j] -= top;
    ExpInPlace(sg, n);
    total[g] = Sum(sg, n);
  }
  ForEachRow(s, cache, table, lo, pos, [&](int64_t j, const float* kv) {
    const float* v = kv + (2 * h + 1) * d;
    for (int64_t g = 0; g < g_count; ++g) {
      const float p = scores[g * n + j];
      float* og = o + g * d;
      for (int64_t i = 0; i < d; ++i) og[i] += p * v[i];
    }
  });
  for (int64_t g = 0; g < g_count; ++g) {
    const float inv = 1.0f / total[g];
    for (int64_t i = 0; i < d; ++i) o[g * d + i] *= inv;
  }
}

ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> cache,
                              ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> seq, ffi::Buffer<ffi::S32> pos,
                              ffi::Result<ffi::Buffer<ffi::F32>> out, float sm_scale, int64_t window,
                              float soft_cap) {
  const auto qd = q.dimensions(), cd = cache.dimensions(), td = tables.dimensions();
  if (qd.size() != 3 || cd.size() != 4 || td.size() != 2) {
    return ffi::Error::InvalidArgument("paged_attention: q [T, Hq, D], cache [P, page, 2 Hkv, D], tables [S, pages]");
  }
  const Shape s{qd[0], qd[1], cd[2] / 2, qd[2], cd[0], cd[1], td[0], td[1]};
  if (cd[3] != s.d || cd[2] % 2 || s.q_heads % s.kv_heads || s.d % kLanes || seq.element_count() != s.tokens ||
      pos.element_count() != s.tokens) {
    return ffi::Error::InvalidArgument("paged_attention: shapes do not match");
  }
  const float* qp = q.typed_data();
  const float* cp = cache.typed_data();
  const int32_t* tp = tables.typed_data();
  const int32_t* seqp = seq.typed_data();
  const int32_t* posp = pos.typed_data();
  float* op = out->typed_data();
  int64_t work = 0;  // positions read, to size the split
  for (int64_t t = 0; t < s.tokens; ++t) work += std::max<int32_t>(posp[t] + 1, 0);
  jaxserve::SplitOverPool(pool, s.tokens * s.kv_heads, work * s.kv_heads * s.d / kMinPartWork,
                          [&](int64_t begin, int64_t end) {
    std::vector<float> scores, total;  // per thread, reused across its items
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / s.kv_heads, h = item % s.kv_heads, p = posp[t];
      const int64_t g_count = s.q_heads / s.kv_heads;
      const int64_t sq = std::clamp<int64_t>(seqp[t], 0, s.seqs - 1);
      if (p < 0 || p >= s.pages_per_seq * s.page_size) {  // a padding token: zero rows
        float* o = op + (t * s.q_heads + h * g_count) * s.d;
        std::fill(o, o + g_count * s.d, 0.0f);
        continue;
      }
      const int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
      AttendOne(s, qp, cp, tp + sq * s.pages_per_seq, t, h, lo, p, sm_scale, soft_cap, scores, total, op);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedAttention, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("sm_scale")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("soft_cap"));
