// The `width` largest values of each row of x [S, V] float32, descending, with their indices (ties in ascending
// index order, as lax.top_k), given the maxima of the row's groups of `group` consecutive values [S, G].
//
// Per row: a lower bound on the width-th largest group maximum (from a histogram of the maxima), the values at or
// above it in the groups whose maximum reaches it (about width groups, prefetched one row ahead), then a
// selection and a sort of those few as (value, index) integer keys. Rows are split over XLA's CPU thread pool.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// (Aliases: a comma inside the handler macro's arguments would split them.)
using Floats = ffi::Buffer<ffi::F32, 2>;
using Ints = ffi::Buffer<ffi::S32, 2>;

namespace {

// float -> uint32 in the same order, so (value, index) pairs compare as integers.
inline uint32_t OrderKey(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return (bits >> 31) ? ~bits : (bits | 0x80000000u);
}

inline float FromOrderKey(uint32_t key) {
  const uint32_t bits = (key >> 31) ? (key & 0x7FFFFFFFu) : ~key;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// Descending keys order values descending, then indices ascending.
inline uint64_t Key(float value, int64_t index) {
  return uint64_t{OrderKey(value)} << 32 | (0xFFFFFFFFu - static_cast<uint32_t>(index));
}

// A value at or below the width-th largest of the maxima m [groups] (-inf when it cannot be bounded): every
// maximum in the histogram bins that hold the width largest lies at or above it.
float Bound(const float* m, int64_t groups, int64_t width) {
  float lo = INFINITY, hi = -INFINITY;
  for (int64_t g = 0; g < groups; ++g) {
    if (m[g] > -INFINITY) {
      lo = std::min(lo, m[g]);
      hi = std::max(hi, m[g]);
    }
  }
  if (!(hi > lo) || !std::isfinite(hi - lo)) return -INFINITY;
  int counts[256] = {0};
  const float scale = 256.0f / (hi - lo);
  for (int64_t g = 0; g < groups; ++g) {
    if (m[g] >= lo) counts[std::min(255, static_cast<int>((m[g] - lo) * scale))]++;
  }
  int64_t above = 0;
  int bin = 255;
  for (; bin >= 0; --bin) {
    above += counts[bin];
    if (above >= width) break;
  }
  if (bin < 0) return -INFINITY;
  // A bin's members lie at or above its lower edge up to rounding: the edge one bin lower is safe.
  return bin <= 1 ? lo : lo + (bin - 1) / scale;
}

void Rows(const float* x, const float* maxima, float* values, int32_t* ids, int64_t begin, int64_t end,
          int64_t vocab, int64_t groups, int64_t group, int64_t width) {
  std::vector<uint64_t> found(vocab + width);
  std::vector<int32_t> picked[2] = {std::vector<int32_t>(groups), std::vector<int32_t>(groups)};
  int64_t num_picked[2] = {0, 0};
  float bounds[2] = {0, 0};
  // A row's groups are picked and prefetched while the row before is read.
  auto pick = [&](int64_t r) {
    const float* m = maxima + r * groups;
    const float bound = Bound(m, groups, width);
    int32_t* out = picked[r & 1].data();
    int64_t n = 0;
    for (int64_t g = 0; g < groups; ++g) {
      out[n] = static_cast<int32_t>(g);
      n += m[g] >= bound;
    }
    const float* row = x + r * vocab;
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t i = 0; i < group; i += 16) __builtin_prefetch(row + out[j] * group + i);
    }
    num_picked[r & 1] = n;
    bounds[r & 1] = bound;
  };
  if (begin < end) pick(begin);
  for (int64_t r = begin; r < end; ++r) {
    if (r + 1 < end) pick(r + 1);
    const float* row = x + r * vocab;
    const float bound = bounds[r & 1];
    int64_t n = 0;
    for (int64_t j = 0; j < num_picked[r & 1]; ++j) {
      const int64_t g = picked[r & 1][j];
      for (int64_t i = g * group, stop = std::min(vocab, (g + 1) * group); i < stop; ++i) {
        found[n] = Key(row[i], i);
        n += row[i] >= bound;
      }
    }
    for (; n < width; ++n) found[n] = Key(-INFINITY, 0);  // only where NaNs leave too few values
    if (n > width) std::nth_element(found.begin(), found.begin() + (width - 1), found.begin() + n, std::greater<>());
    std::sort(found.begin(), found.begin() + width, std::greater<>());
    for (int64_t j = 0; j < width; ++j) {
      values[r * width + j] = FromOrderKey(static_cast<uint32_t>(found[j] >> 32));
      ids[r * width + j] = static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(found[j]));
    }
  }
}

ffi::Error TopCandidatesImpl(ffi::ThreadPool pool, Floats x, Floats maxima, ffi::Result<Floats> values,
                             ffi::Result<Ints> ids, int64_t group) {
  const int64_t rows = x.dimensions()[0], vocab = x.dimensions()[1], groups = maxima.dimensions()[1];
  const int64_t width = values->dimensions()[1];
  if (maxima.dimensions()[0] != rows || groups * group < vocab || (groups - 1) * group >= vocab || width > vocab ||
      width < 1) {
    return ffi::Error::InvalidArgument("top_candidates: shapes do not match");
  }
  const float* xp = x.typed_data();
  const float* mp = maxima.typed_data();
  float* vp = values->typed_data();
  int32_t* ip = ids->typed_data();
  // Rows split over the pool's threads, one part on this one (at least 16 rows each: a task costs microseconds).
  jaxserve::SplitOverPool(pool, rows, rows / 16, [&](int64_t begin, int64_t end) {
    Rows(xp, mp, vp, ip, begin, end, vocab, groups, group, width);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TopCandidates, TopCandidatesImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Floats>()
                                  .Arg<Floats>()
                                  .Ret<Floats>()
                                  .Ret<Ints>()
                                  .Attr<int64_t>("group"));
