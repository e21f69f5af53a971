// Matmuls of float32 activations with integer weight codes, for XLA:CPU (which converts codes to floats in memory
// before its dot instead of fusing the conversion): y [T, out] = x [T, in] times w, where each group of `group`
// consecutive inputs has a scale (and an offset) per output:  w = scale * (code - zero) + offset.
//
// Activations are quantized per 32 inputs to int16 (x ~ dx * qx, dx = amax / 32767), so a block of 32 contributes
// scale * dx * sum(code * qx) + (offset - scale * zero) * dx * sum(qx): exactly w times the quantized x, whose error
// is at most sum(|w| * dx / 2). (Taking the offset term from the exact sum(x) instead would leave the error of
// sum(code * qx), which grows with the codes' magnitude, not the weights': 3x the RMS error on SmolLM2's Q4_1
// layers with int8 activations.)
// The integer products are AVX2 madd_epi16 (16-bit times 16-bit, pairs summed to 32 bits; AVX-512 VNNI's dpwssd in
// the 4-bit kernel where the build targets it, see TileCodes): the codes are widened to 16 bits once per block (and
// tile of outputs) for all activation rows. (int8 activations, as llama.cpp's
// maddubs matmuls use, change SmolLM2's greedy answers; 16 bits leave 1/256 of that error.)
//
// Two layouts, the two the models hold:
//   Packed4Columns: 4-bit codes [in / 2, out], two inputs (2i low nibble, 2i + 1 high) per byte, scales [in / group,
//     out]: a linear weight [in, out]. Per tile of 32 outputs and block of 32 inputs the 16 packed rows are
//     unpacked once into 16-bit pairs (code 2i, code 2i + 1) per output, then each activation row multiplies them
//     by its broadcast pair (qx 2i, qx 2i + 1).
//   Int8Rows: int8 codes [out, in], scales [out, in / group], no offset: an embedding table used as the LM head
//     (x times its transpose). Per output row and block the codes are loaded once for up to 4 activation rows.
// Work is split over outputs on XLA's CPU thread pool. Built only where the compiler targets AVX2, FMA and
// F16C (kernels_cpu/build.py compiles for the host's CPU); elsewhere the handlers are absent and callers use XLA.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
// Any rank: x and y [..., T, features] are taken as [rows, features]; the weights as their last two dimensions
// (under vmap XLA may add leading dimensions of 1 to them).
using Floats = ffi::Buffer<ffi::F32>;
using Codes4 = ffi::Buffer<ffi::U8>;
using Codes8 = ffi::Buffer<ffi::S8>;

namespace {

constexpr int64_t kBlock = 32;
// Multiply-accumulates per part below which splitting over the pool costs more than it saves.
constexpr int64_t kMinTaskWork = int64_t{1} << 16;
// Blocks of 32 inputs ahead that the 4-bit kernel prefetches.
constexpr int64_t kAhead = 2;

// x [T, in] quantized per block of 32: codes [T, in], scales [T, in / 32], and per weight group the sum of the
// quantized values (dx * qx) [T, in / group].
struct Activations {
  int64_t rows, in, group;
  std::vector<int16_t> codes;
  std::vector<float> scales, sums;
};

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float HorizontalMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

Activations Quantize(const float* x, int64_t rows, int64_t in, int64_t group) {
  Activations a{rows, in, group, std::vector<int16_t>(rows * in), std::vector<float>(rows * in / kBlock),
                std::vector<float>(rows * in / group, 0.0f)};
  const __m256 sign = _mm256_set1_ps(-0.0f);

  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t b = 0; b < in / kBlock; ++b) {
      const float* v = x + t * in + b * kBlock;
      __m256 part[4], amax = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        part[j] = _mm256_loadu_ps(v + 8 * j);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, part[j]));
      }
      const float m = HorizontalMax(amax);
      const __m256 inverse = _mm256_set1_ps(m > 0 ? 32767.0f / m : 0.0f);
      __m256i q[4];
      for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(part[j], inverse));  // nearest, even ties
      for (int j = 0; j < 2; ++j) {
        // packs_epi32 interleaves the 128-bit lanes; the permute puts the 16 codes back in order.
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2 * j], q[2 * j + 1]), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(&a.codes[t * in + b * kBlock + 16 * j]), packed);
      }
      const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      a.scales[t * (in / kBlock) + b] = m / 32767.0f;
      a.sums[t * (in / group) + b * kBlock / group] += m / 32767.0f * HorizontalSum(_mm256_cvtepi32_ps(sum));
    }
  }
  return a;
}

inline float ToFloat(float v) { return v; }
inline float ToFloat(uint16_t h) { return _cvtsh_ss(h); }
inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 Load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// A block's 16 packed rows of codes for a tile of 32 outputs, widened to 16-bit pairs (code 2r, code 2r + 1) per
// output, and their products with one activation row's 16 pairs (qx 2r, qx 2r + 1) summed to 32 bits per output.
// `first` and `second` hold a packed row's pairs as bytes: outputs 0-7 and 16-23, then 8-15 and 24-31 (the 128-bit
// lanes of the byte interleave). With AVX-512 VNNI (vpdpwssd multiplies and adds in one instruction, 16 outputs
// a register) a row takes 2 registers instead of 4 and half the instructions.
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
struct TileCodes {
  __m512i pairs[16][2];  // [row][outputs 0-7 and 16-23, 8-15 and 24-31]

  void Set(int r, __m256i first, __m256i second) {
    pairs[r][0] = _mm512_cvtepu8_epi16(first);
    pairs[r][1] = _mm512_cvtepu8_epi16(second);
  }

  // i32: outputs 0-7, 8-15, 16-23, 24-31
  void Dot(const int16_t* qx, __m256i i32[4]) const {
    __m512i even[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()}, odd[2] = {even[0], even[1]};
    for (int r = 0; r < 16; r += 2) {  // two chains of sums per register, so the adds need not wait on each other
      int32_t pair[2];
      std::memcpy(pair, qx + 2 * r, 8);
      const __m512i x0 = _mm512_set1_epi32(pair[0]), x1 = _mm512_set1_epi32(pair[1]);
      for (int k = 0; k < 2; ++k) {
        even[k] = _mm512_dpwssd_epi32(even[k], pairs[r][k], x0);
        odd[k] = _mm512_dpwssd_epi32(odd[k], pairs[r + 1][k], x1);
      }
    }
    const __m512i a = _mm512_add_epi32(even[0], odd[0]), b = _mm512_add_epi32(even[1], odd[1]);
    i32[0] = _mm512_castsi512_si256(a);
    i32[1] = _mm512_castsi512_si256(b);
    i32[2] = _mm512_extracti64x4_epi64(a, 1);
    i32[3] = _mm512_extracti64x4_epi64(b, 1);
  }
};
#else
struct TileCodes {
  __m256i pairs[16][4];  // [row][outputs 0-7, 8-15, 16-23, 24-31]

  void Set(int r, __m256i first, __m256i second) {
    pairs[r][0] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(first));
    pairs[r][1] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(second));
    pairs[r][2] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(first, 1));
    pairs[r][3] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(second, 1));
  }

  void Dot(const int16_t* qx, __m256i i32[4]) const {
    for (int k = 0; k < 4; ++k) i32[k] = _mm256_setzero_si256();
    for (int r = 0; r < 16; ++r) {
      int32_t pair;
      std::memcpy(&pair, qx + 2 * r, 4);
      const __m256i xr = _mm256_set1_epi32(pair);
      for (int k = 0; k < 4; ++k) i32[k] = _mm256_add_epi32(i32[k], _mm256_madd_epi16(pairs[r][k], xr));
    }
  }
};
#endif

// Outputs [o_begin, o_end) (multiples of 32) of y [T, out] for 4-bit codes [in / 2, out] with Scale scales and
// offsets [in / group, out] (offset null: none), a tile of 32 outputs at a time.
template <typename Scale>
void Packed4Tiles(const Activations& a, const uint8_t* codes, const Scale* scale, const Scale* offset, float zero,
                  int64_t out, int64_t o_begin, int64_t o_end, float* y) {
  const int64_t rows = a.rows, in = a.in, blocks = in / kBlock, per_group = a.group / kBlock;
  const __m256i low = _mm256_set1_epi8(0x0F);
  std::vector<float> acc(rows * 32);  // [T, 32] for the current tile
  TileCodes tile;
  for (int64_t o = o_begin; o < o_end; o += 32) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t g = b / per_group;
      for (int r = 0; r < 16; ++r) {
        const uint8_t* row = codes + (b * 16 + r) * out + o;
        // The tile's rows are `out` bytes apart, a pattern the hardware prefetcher does not follow far enough.
        _mm_prefetch(reinterpret_cast<const char*>(row + kAhead * 16 * out), _MM_HINT_T0);
        const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
        const __m256i lo = _mm256_and_si256(p, low), hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), low);
        tile.Set(r, _mm256_unpacklo_epi8(lo, hi), _mm256_unpackhi_epi8(lo, hi));
      }
      __m256 s[4], c[4];
      for (int k = 0; k < 4; ++k) {
        s[k] = Load8(scale + g * out + o + 8 * k);
        c[k] = _mm256_mul_ps(s[k], _mm256_set1_ps(-zero));
        if (offset != nullptr) c[k] = _mm256_add_ps(c[k], Load8(offset + g * out + o + 8 * k));
      }
      const bool group_start = b % per_group == 0;
      for (int64_t t = 0; t < rows; ++t) {
        __m256i i32[4];
        tile.Dot(&a.codes[t * in + b * kBlock], i32);
        const __m256 dx = _mm256_set1_ps(a.scales[t * blocks + b]);
        float* at = &acc[t * 32];
        for (int k = 0; k < 4; ++k) {
          __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32[k]), _mm256_mul_ps(s[k], dx), _mm256_loadu_ps(at + 8 * k));
          if (group_start) v = _mm256_fmadd_ps(c[k], _mm256_set1_ps(a.sums[t * (in / a.group) + g]), v);
          _mm256_storeu_ps(at + 8 * k, v);
        }
      }
    }
    for (int64_t t = 0; t < rows; ++t) std::memcpy(y + t * out + o, &acc[t * 32], 32 * sizeof(float));
  }
}

// Outputs [o_begin, o_end) of y [T, out] for int8 codes [out, in] with scales [out, in / group]: per code row and
// block, the codes are loaded once for up to kRows activation rows (their accumulators stay in registers).
template <typename Scale>
void Int8Rows(const Activations& a, const int8_t* codes, const Scale* scale, int64_t out, int64_t o_begin,
              int64_t o_end, float* y) {
  constexpr int kRows = 4;
  const int64_t rows = a.rows, in = a.in, blocks = in / kBlock, groups = in / a.group, per_group = a.group / kBlock;
  for (int64_t o = o_begin; o < o_end; ++o) {
    const int8_t* w = codes + o * in;
    for (int64_t t0 = 0; t0 < rows; t0 += kRows) {
      const int n = static_cast<int>(std::min<int64_t>(kRows, rows - t0));
      __m256 acc[kRows];
      for (int j = 0; j < kRows; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {
        const float sw = ToFloat(scale[o * groups + g]);
        for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
          const __m128i* wp = reinterpret_cast<const __m128i*>(w + b * kBlock);
          const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(wp));
          const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(wp + 1));
          for (int j = 0; j < n; ++j) {
            const int64_t t = t0 + j;
            const __m256i* xp = reinterpret_cast<const __m256i*>(&a.codes[t * in + b * kBlock]);
            const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(xp)),
                                               _mm256_madd_epi16(w1, _mm256_loadu_si256(xp + 1)));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(sw * a.scales[t * blocks + b]), acc[j]);
          }
        }
      }
      for (int j = 0; j < n; ++j) y[(t0 + j) * out + o] = HorizontalSum(acc[j]);
    }
  }
}

bool IsF16(const ffi::AnyBuffer& b) { return b.element_type() == ffi::DataType::F16; }

// A buffer's shape as a matrix: [product of the leading dimensions, last]; for weights (matrix false) the last two,
// with any leading dimensions required to be 1 (else rows is -1).
template <typename Dims>
std::pair<int64_t, int64_t> Matrix(const Dims& dims, bool weights) {
  const int64_t n = static_cast<int64_t>(dims.size());
  if (n < 2) return {-1, -1};
  int64_t lead = 1;
  for (int64_t i = 0; i < n - 2; ++i) lead *= dims[i];
  if (weights) return {lead == 1 ? dims[n - 2] : -1, dims[n - 1]};
  return {lead * dims[n - 2], dims[n - 1]};
}

ffi::Error Packed4ColumnsImpl(ffi::ThreadPool pool, Floats x, Codes4 codes, ffi::AnyBuffer scale,
                              ffi::AnyBuffer offset, ffi::Result<Floats> y, int64_t group, int64_t zero,
                              bool has_offset) {
  const auto [rows, in] = Matrix(x.dimensions(), false);
  const auto [half_in, out] = Matrix(codes.dimensions(), true);
  const auto [groups, scale_out] = Matrix(scale.dimensions(), true);
  const bool f16 = IsF16(scale);
  const bool offset_matches =
      !has_offset || (offset.element_type() == scale.element_type() && offset.element_count() == scale.element_count());
  if (group <= 0 || half_in * 2 != in || in % group || group % kBlock || out % 32 || groups != in / group ||
      scale_out != out || !offset_matches || (!f16 && scale.element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("quantized_linear: packed 4-bit shapes or dtypes do not match");
  }
  const Activations a = Quantize(x.typed_data(), rows, in, group);
  const uint8_t* w = codes.typed_data();
  float* yp = y->typed_data();
  jaxserve::SplitOverPool(pool, out / 32, rows * in * out / kMinTaskWork, [&](int64_t begin, int64_t end) {
    if (f16) {
      const auto* s = static_cast<const uint16_t*>(scale.untyped_data());
      Packed4Tiles(a, w, s, has_offset ? static_cast<const uint16_t*>(offset.untyped_data()) : nullptr,
                   static_cast<float>(zero), out, begin * 32, end * 32, yp);
    } else {
      const auto* s = static_cast<const float*>(scale.untyped_data());
      Packed4Tiles(a, w, s, has_offset ? static_cast<const float*>(offset.untyped_data()) : nullptr,
                   static_cast<float>(zero), out, begin * 32, end * 32, yp);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Int8RowsImpl(ffi::ThreadPool pool, Floats x, Codes8 codes, ffi::AnyBuffer scale,
                        ffi::Result<Floats> y) {
  const auto [rows, in] = Matrix(x.dimensions(), false);
  const auto [out, codes_in] = Matrix(codes.dimensions(), true);
  const auto [scale_out, groups] = Matrix(scale.dimensions(), true);
  const bool f16 = IsF16(scale);
  if (codes_in != in || groups <= 0 || in % groups || (in / groups) % kBlock || scale_out != out ||
      (!f16 && scale.element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("quantized_linear: int8 row shapes or dtypes do not match");
  }
  const Activations a = Quantize(x.typed_data(), rows, in, in / groups);
  const int8_t* w = codes.typed_data();
  float* yp = y->typed_data();
  jaxserve::SplitOverPool(pool, out, rows * in * out / kMinTaskWork, [&](int64_t begin, int64_t end) {
    if (f16) {
      Int8Rows(a, w, static_cast<const uint16_t*>(scale.untyped_data()), out, begin, end, yp);
    } else {
      Int8Rows(a, w, static_cast<const float*>(scale.untyped_data()), out, begin, end, yp);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QuantizedLinearPacked4, Packed4ColumnsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Floats>()
                                  .Arg<Codes4>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<Floats>()
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("zero")
                                  .Attr<bool>("has_offset"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QuantizedLinearInt8Rows, Int8RowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Floats>()
                                  .Arg<Codes8>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<Floats>());

#endif  // AVX2, FMA, F16C
