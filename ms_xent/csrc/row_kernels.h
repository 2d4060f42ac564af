// The row loops that dominate the cross-entropy kernels, in a portable form (auto-vectorised
// `omp simd` over vec_math.h's FastExp) and, when compiled for AVX-512 (F, BW, VL), in explicit
// 512-bit intrinsics. Every function reads z = map(x) in place of the stored logit x (a logit
// map, below; the identity by default):
//
//   BlockMax(row, begin, end)                = max_{c in [begin, end)} z[c]
//   SumExp(row, begin, end, shift)           = sum_{c in [begin, end)} exp(z[c] - shift)
//   SumExpMax(row, begin, end, shift, &max)  = SumExp, and BlockMax of the same elements from
//                                              the same read
//   SumExpAtMaxSplit(row, begin, end, max, &count)
//                                            = SumExp with shift = the (finite) BlockMax, over the
//                                              elements below it; the elements equal to it are
//                                              counted (exactly) in count instead, so no float32
//                                              lane holds a 1.0 that would swallow small addends
//   SumExpAtMaxSplitPrefetching(..., next, map)
//                                            = SumExpAtMaxSplit, prefetching the same elements of
//                                              another row into L2 (AVX-512 builds)
//   SumExpAtMax(...)                         = count + SumExpAtMaxSplit(...)
//   WriteGradRow(row, C, m, L, k, l, w, out): out[c] = (exp((z[c] - m) - L) * k - l * w[c])
//                                              * dz/dx[c]   (w[c] = 1 when w is null)
//
// The streaming loops prefetch kPrefetchBytes ahead in software. On these 2-core VMs the hardware
// prefetchers alone do not keep enough cache lines in flight while the core is busy with the
// exp polynomial: at 8192 x 32000 on 2 threads the exp pass read 12.7 GB/s (float32) and
// 3.9 GB/s (bfloat16) without, 22-25 and 14 GB/s with a 2 KiB lead (scalar loads and
// prefetches never fault, so a lead past the end of a row or buffer is harmless).
//
// The AVX-512 exp uses the same range reduction and polynomial as FastExp
//   exp(x) = 2^k * exp(r), k = round(x log2 e), r = x - k ln 2, exp(r) = 1 + r (1 + r P(r)),
// but applies 2^k with vscalefps, which saturates to +inf / 0 by itself. Inputs are first clamped
// to [-200, 200] with the NaN-preserving operand order (max/min return their second operand when
// either is NaN): -inf -> exp(-200) = 0 exactly (2^-289 underflows to 0), +inf -> inf, NaN -> NaN.
// That is ~14 vector instructions per 16 elements instead of ~40 for the selects and integer
// tricks the portable FastExp needs.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "vec_math.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define MS_XENT_AVX512 1
#endif

namespace ms_xent {

#if defined(MS_XENT_AVX512)

constexpr int kPrefetchBytes = 2048;

// Prefetches the cache line(s) kPrefetchBytes past the 32 elements starting at p (one line for
// 2-byte types, two for float32).
template <typename T>
inline void PrefetchAhead32(const T *p) {
  const char *ahead = reinterpret_cast<const char *>(p) + kPrefetchBytes;
  _mm_prefetch(ahead, _MM_HINT_T0);
  if (sizeof(T) == 4) _mm_prefetch(ahead + 64, _MM_HINT_T0);
}

// Which polynomial P of vec_math.h an exp uses, by what its result feeds.
enum class ExpUse {
  kFloat,      // float32 results: kExpP*, degree 4
  kHalfInput,  // sums over float16 / bfloat16 inputs: kExpHalfInputP*, degree 3
  kHalfOutput  // results rounded to float16 / bfloat16 next (the backward's gradient in those
               // dtypes): kExpHalfP*, degree 2
};

// The ExpUse of sums of exp over elements of type T.
template <typename T>
constexpr ExpUse kSumExpUse = sizeof(T) == 2 ? ExpUse::kHalfInput : ExpUse::kFloat;

// kClampAbove = false skips the upper clamp: only for callers that discard the result whenever an
// input exceeds 200 (then +inf, or for inputs beyond ~2^23 any non-finite value, comes out).
template <bool kClampAbove = true, ExpUse kUse = ExpUse::kFloat>
inline __m512 Exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-200.0f), x);
  if (kClampAbove) x = _mm512_min_ps(_mm512_set1_ps(200.0f), x);
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(k, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p;
  if (kUse == ExpUse::kHalfOutput) {
    p = _mm512_set1_ps(kExpHalfP2);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpHalfP1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpHalfP0));
  } else if (kUse == ExpUse::kHalfInput) {
    p = _mm512_set1_ps(kExpHalfInputP3);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpHalfInputP2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpHalfInputP1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpHalfInputP0));
  } else {
    p = _mm512_set1_ps(kExpP4);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP0));
  }
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);
}

// Prefetches into L2 the cache line(s) of the 32 elements at p.
template <typename T>
inline void PrefetchToL2_32(const T *p) {
  _mm_prefetch(reinterpret_cast<const char *>(p), _MM_HINT_T1);
  if (sizeof(T) == 4) _mm_prefetch(reinterpret_cast<const char *>(p) + 64, _MM_HINT_T1);
}

// 16 elements (or the first popcount(mask) of them) widened to float32; masked-off lanes are 0.
inline __m512 Load16(const float *p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 Load16(const _Float16 *p, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
}
inline __m512 Load16(const BFloat16 *p, __mmask16 mask) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// 32 elements widened to float32 in an order that only sums and maxima may rely on: for
// bfloat16, interleaving zeros below each 16-bit value (vpunpck{l,h}wd) places the 32 values,
// permuted within 128-bit lanes, in two float32 vectors at 1 instruction per 16 instead of 2.
template <typename T>
inline void Load32Unordered(const T *p, __m512 &x0, __m512 &x1) {
  x0 = Load16(p, 0xFFFF);
  x1 = Load16(p + 16, 0xFFFF);
}
inline void Load32Unordered(const BFloat16 *p, __m512 &x0, __m512 &x1) {
  const __m512i v = _mm512_loadu_si512(p);
  x0 = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), v));
  x1 = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), v));
}

// float32 -> float16 / bfloat16 bit patterns (round to nearest even; NaN stays a quiet NaN).
inline __m256i ToHalfBits(_Float16 *, __m512 v) {
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// bfloat16 as FromFloat<BFloat16> does it, in the low 16 bits of each 32-bit lane.
inline __m512i BFloat16BitsInDwords(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_or_epi32(rounded, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
}
// With AVX512-BF16 one vcvtneps2bf16 does it (it also flushes float32 denormals, |v| < 1.2e-38,
// to zero, which FromFloat would round to a bfloat16 denormal).
inline __m256i ToHalfBits(BFloat16 *, __m512 v) {
#if defined(__AVX512BF16__)
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
  return _mm512_cvtepi32_epi16(BFloat16BitsInDwords(v));
#endif
}

inline void Store16(float *p, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(p, mask, v); }
template <typename Half>
inline void Store16(Half *p, __mmask16 mask, __m512 v) {
  _mm256_mask_storeu_epi16(p, mask, ToHalfBits(p, v));
}

// Streaming (non-temporal) store of 16 results to a 64-byte (float32) / 32-byte (2-byte types)
// aligned address: written to memory without first reading the destination lines in.
inline void StreamStore16(float *p, __m512 v) { _mm512_stream_ps(p, v); }
template <typename Half>
inline void StreamStore16(Half *p, __m512 v) {
  _mm256_stream_si256(reinterpret_cast<__m256i *>(p), ToHalfBits(p, v));
}

// The inverse of Load32Unordered for bfloat16: 32 results, in the order Load32Unordered
// produced them, stored as bfloat16 in element order (p 64-byte aligned when kStream).
template <bool kStream>
inline void Store32Unordered(BFloat16 *p, __m512 v0, __m512 v1) {
#if defined(__AVX512BF16__)
  // vcvtne2ps2bf16 puts v0's 16 values in words 0-15 and v1's in 16-31; element 8j + q (lane j,
  // q < 4) came from v0's dword 4j + q, element 8j + 4 + q from v1's dword 4j + q.
  const __m512i from = _mm512_set_epi16(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8,
                                        23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i packed = _mm512_permutexvar_epi16(
      from, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(v1, v0)));
#else
  // vpackusdw interleaves per 128-bit lane exactly as vpunpck{l,h}wd split them.
  const __m512i packed = _mm512_packus_epi32(BFloat16BitsInDwords(v0), BFloat16BitsInDwords(v1));
#endif
  if (kStream) {
    _mm512_stream_si512(reinterpret_cast<__m512i *>(p), packed);
  } else {
    _mm512_storeu_si512(p, packed);
  }
}

// tanh(t) for 16 lanes, as vec_math.h's FastTanh: the Cephes odd polynomial for |t| < 0.625,
// 1 - 2 / (e^2t + 1) above (saturating to +-1; NaN -> NaN).
inline __m512 Tanh16(__m512 t) {
  const __m512 t2 = _mm512_mul_ps(t, t);
  __m512 p = _mm512_set1_ps(-5.70498872745e-3f);
  p = _mm512_fmadd_ps(p, t2, _mm512_set1_ps(2.06390887954e-2f));
  p = _mm512_fmadd_ps(p, t2, _mm512_set1_ps(-5.37397155531e-2f));
  p = _mm512_fmadd_ps(p, t2, _mm512_set1_ps(1.33314422036e-1f));
  p = _mm512_fmadd_ps(p, t2, _mm512_set1_ps(-3.33332819422e-1f));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(t, t2), p, t);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = Exp16(_mm512_add_ps(t, t));
  const __m512 large = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
  const __mmask16 is_small = _mm512_cmp_ps_mask(_mm512_abs_ps(t), _mm512_set1_ps(0.625f), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(is_small, large, small);
}

#endif

// ---- logit maps --------------------------------------------------------------------------------
// The row functions read z = map(x) in place of each stored logit x, so that a scale or a softcap
// costs no [N, C] tensor:
//   IdentityMap  z = x
//   ScaleMap     z = s x                         dz/dx = s
//   SoftcapMap   z = cap tanh(s x / cap)         dz/dx = s (1 - tanh^2) = s (1 - (z / cap)^2)
// Slope(z) is dz/dx written with z, which the gradient loops already hold.
struct IdentityMap {
  static constexpr bool kIdentity = true;
  float operator()(float x) const { return x; }
  float Slope(float) const { return 1.0f; }
#if defined(MS_XENT_AVX512)
  __m512 operator()(__m512 x) const { return x; }
  __m512 Slope(__m512) const { return _mm512_set1_ps(1.0f); }
#endif
};

struct ScaleMap {
  static constexpr bool kIdentity = false;
  float scale;
  float operator()(float x) const { return scale * x; }
  float Slope(float) const { return scale; }
#if defined(MS_XENT_AVX512)
  __m512 operator()(__m512 x) const { return _mm512_mul_ps(_mm512_set1_ps(scale), x); }
  __m512 Slope(__m512) const { return _mm512_set1_ps(scale); }
#endif
};

struct SoftcapMap {
  static constexpr bool kIdentity = false;
  float scale, cap, scale_over_cap, inv_cap;
  SoftcapMap(float scale_, float cap_)
      : scale(scale_), cap(cap_), scale_over_cap(scale_ / cap_), inv_cap(1.0f / cap_) {}
  float operator()(float x) const { return cap * FastTanh(scale_over_cap * x); }
  float Slope(float z) const {
    const float r = z * inv_cap;
    return scale * (1.0f - r * r);
  }
#if defined(MS_XENT_AVX512)
  __m512 operator()(__m512 x) const {
    return _mm512_mul_ps(_mm512_set1_ps(cap), Tanh16(_mm512_mul_ps(_mm512_set1_ps(scale_over_cap), x)));
  }
  __m512 Slope(__m512 z) const {
    const __m512 r = _mm512_mul_ps(z, _mm512_set1_ps(inv_cap));
    return _mm512_mul_ps(_mm512_set1_ps(scale), _mm512_fnmadd_ps(r, r, _mm512_set1_ps(1.0f)));
  }
#endif
};

#if defined(MS_XENT_AVX512)

inline __mmask16 TailMask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF)
                         : static_cast<__mmask16>((1u << remaining) - 1u);
}

// Largest z (NaN lanes are skipped: vmaxps returns its second operand, the running max, when the
// element is NaN; callers see the NaN through the sum of exponentials instead).
template <typename T, typename Map = IdentityMap>
inline float BlockMax(const T *row, int64_t begin, int64_t end, const Map &map = Map()) {
  __m512 max0 = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 max1 = max0;
  int64_t c = begin;
  for (; c + 32 <= end; c += 32) {
    PrefetchAhead32(row + c);
    __m512 x0, x1;
    Load32Unordered(row + c, x0, x1);
    max0 = _mm512_max_ps(map(x0), max0);
    max1 = _mm512_max_ps(map(x1), max1);
  }
  for (; c < end; c += 16) {
    const __mmask16 mask = TailMask(end - c);
    max0 = _mm512_mask_max_ps(max0, mask, map(Load16(row + c, mask)), max0);
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(max0, max1));
}

// What a SumExp pass computes besides sum exp(z - shift).
enum class SumExpMode {
  kPlain,
  kWithMax,     // also max(z) of the same elements, into *aux_out
  kCountShift,  // shift is the max of these elements: each element equal to it is counted into
                // *aux_out instead of adding a 1.0 to a float32 lane
};

// prefetch_row (optional): the elements [begin, end) of another row are prefetched into L2 (one
// cache line per 64 bytes read), e.g. the next row while this one is summed from L2.
template <SumExpMode kMode, typename T, typename Map>
inline float SumExpImpl(const T *row, int64_t begin, int64_t end, float shift, float *aux_out,
                        const Map &map, const T *prefetch_row = nullptr) {
  const __m512 vshift = _mm512_set1_ps(shift);
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  __m512 aux0, aux1;  // running max (kWithMax) or count of elements equal to shift (kCountShift)
  aux0 = aux1 = kMode == SumExpMode::kWithMax ? _mm512_set1_ps(-std::numeric_limits<float>::infinity())
                                              : _mm512_setzero_ps();
  auto add16 = [&](__m512 x, __mmask16 mask, __m512 &acc, __m512 &aux) {
    const __m512 z = map(x);
    // kWithMax: a sum with any z > shift is discarded by the caller (FoldBlockSingleRead), so the
    // upper clamp is not needed.
    const __m512 e = Exp16<kMode != SumExpMode::kWithMax, kSumExpUse<T>>(_mm512_sub_ps(z, vshift));
    if (kMode == SumExpMode::kCountShift) {
      const __mmask16 at_shift = _mm512_mask_cmp_ps_mask(mask, z, vshift, _CMP_EQ_OQ);
      aux = _mm512_mask_add_ps(aux, at_shift, aux, one);
      mask &= ~at_shift;
    }
    if (kMode == SumExpMode::kWithMax) aux = _mm512_mask_max_ps(aux, mask, z, aux);
    acc = _mm512_mask_add_ps(acc, mask, acc, e);
  };
  int64_t c = begin;
  for (; c + 32 <= end; c += 32) {
    PrefetchAhead32(row + c);
    if (prefetch_row) PrefetchToL2_32(prefetch_row + c);
    __m512 x0, x1;
    Load32Unordered(row + c, x0, x1);
    add16(x0, 0xFFFF, acc0, aux0);
    add16(x1, 0xFFFF, acc1, aux1);
  }
  for (; c < end; c += 16) {
    const __mmask16 mask = TailMask(end - c);
    add16(Load16(row + c, mask), mask, acc0, aux0);
  }
  if (kMode == SumExpMode::kWithMax) *aux_out = _mm512_reduce_max_ps(_mm512_max_ps(aux0, aux1));
  if (kMode == SumExpMode::kCountShift) *aux_out = _mm512_reduce_add_ps(_mm512_add_ps(aux0, aux1));
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

template <typename T, typename Map = IdentityMap>
inline float SumExp(const T *row, int64_t begin, int64_t end, float shift, const Map &map = Map()) {
  return SumExpImpl<SumExpMode::kPlain>(row, begin, end, shift, nullptr, map);
}

template <typename T, typename Map = IdentityMap>
inline float SumExpMax(const T *row, int64_t begin, int64_t end, float shift, float *block_max,
                       const Map &map = Map()) {
  return SumExpImpl<SumExpMode::kWithMax>(row, begin, end, shift, block_max, map);
}

template <typename T, typename Map = IdentityMap>
inline float SumExpAtMaxSplit(const T *row, int64_t begin, int64_t end, float max, float *count,
                              const Map &map = Map()) {
  return SumExpImpl<SumExpMode::kCountShift>(row, begin, end, max, count, map);
}

template <typename T, typename Map>
inline float SumExpAtMaxSplitPrefetching(const T *row, int64_t begin, int64_t end, float max,
                                         float *count, const T *prefetch_row, const Map &map) {
  return SumExpImpl<SumExpMode::kCountShift>(row, begin, end, max, count, map, prefetch_row);
}

// Elements of out before its first 64-byte-aligned one (C if an element never is: a buffer not
// aligned to its element size).
template <typename T>
inline int64_t StreamingHead(const T *out, int64_t C) {
  const auto misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) % 64);
  if (misaligned % static_cast<int64_t>(sizeof(T)) != 0) return C;
  const int64_t head = misaligned == 0 ? 0 : (64 - misaligned) / static_cast<int64_t>(sizeof(T));
  return head < C ? head : C;
}

// kStream: the 64-byte-aligned body of the row is written with streaming stores (the head
// before the first aligned address and the tail with ordinary masked stores), then sfence'd.
template <bool kStream, typename T, typename Map>
inline void WriteGradRowImpl(const T *row, int64_t C, float shift_max, float shift_log_sum, float k,
                             float l, const float *weight, T *out, const Map &map) {
  const __m512 vmax = _mm512_set1_ps(shift_max);
  const __m512 vlog_sum = _mm512_set1_ps(shift_log_sum);
  const __m512 vk = _mm512_set1_ps(k);
  const __m512 vl = _mm512_set1_ps(l);
  constexpr bool kHalf = !std::is_same_v<T, float>;
  auto grad_of = [&](__m512 x, __m512 lw) {
    const __m512 z = map(x);
    const __m512 p = Exp16<true, kHalf ? ExpUse::kHalfOutput : ExpUse::kFloat>(
        _mm512_sub_ps(_mm512_sub_ps(z, vmax), vlog_sum));
    const __m512 g = _mm512_fmsub_ps(p, vk, lw);
    if constexpr (Map::kIdentity) {
      return g;
    } else {
      return _mm512_mul_ps(g, map.Slope(z));
    }
  };
  auto grad16 = [&](int64_t c, __mmask16 mask) {
    const __m512 lw = weight ? _mm512_mul_ps(vl, _mm512_maskz_loadu_ps(mask, weight + c)) : vl;
    return grad_of(Load16(row + c, mask), lw);
  };
  auto store16 = [&](int64_t c, __m512 v) {
    if (kStream) {
      StreamStore16(out + c, v);
    } else {
      Store16(out + c, 0xFFFF, v);
    }
  };
  int64_t c = 0;
  if (kStream) {
    // Ordinary stores up to the first 64-byte-aligned element.
    c = StreamingHead(out, C);
    for (int64_t h = 0; h < c; h += 16) {
      const __mmask16 mask = TailMask(c - h);
      Store16(out + h, mask, grad16(h, mask));
    }
  }
  for (; c + 32 <= C; c += 32) {
    PrefetchAhead32(row + c);
    if constexpr (std::is_same_v<T, BFloat16>) {
      if (!weight) {
        __m512 x0, x1;
        Load32Unordered(row + c, x0, x1);
        Store32Unordered<kStream>(out + c, grad_of(x0, vl), grad_of(x1, vl));
        continue;
      }
    }
    store16(c, grad16(c, 0xFFFF));
    store16(c + 16, grad16(c + 16, 0xFFFF));
  }
  if (kStream) _mm_sfence();
  for (; c < C; c += 16) {
    const __mmask16 mask = TailMask(C - c);
    Store16(out + c, mask, grad16(c, mask));
  }
}

template <typename T, typename Map = IdentityMap>
inline void WriteGradRow(const T *row, int64_t C, float shift_max, float shift_log_sum, float k,
                         float l, const float *weight, T *out, bool stream, const Map &map = Map()) {
  if (stream) {
    WriteGradRowImpl<true>(row, C, shift_max, shift_log_sum, k, l, weight, out, map);
  } else {
    WriteGradRowImpl<false>(row, C, shift_max, shift_log_sum, k, l, weight, out, map);
  }
}

#else  // portable

template <typename T, typename Map = IdentityMap>
inline float BlockMax(const T *row, int64_t begin, int64_t end, const Map &map = Map()) {
  float block_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : block_max)
  for (int64_t c = begin; c < end; ++c) {
    const float v = map(ToFloat(row[c]));
    block_max = v > block_max ? v : block_max;
  }
  return block_max;
}

template <typename T, typename Map = IdentityMap>
inline float SumExp(const T *row, int64_t begin, int64_t end, float shift, const Map &map = Map()) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = begin; c < end; ++c) sum += FastExp(map(ToFloat(row[c])) - shift);
  return sum;
}

template <typename T, typename Map = IdentityMap>
inline float SumExpMax(const T *row, int64_t begin, int64_t end, float shift, float *block_max,
                       const Map &map = Map()) {
  *block_max = BlockMax(row, begin, end, map);
  return SumExp(row, begin, end, shift, map);
}

template <typename T, typename Map = IdentityMap>
inline float SumExpAtMaxSplit(const T *row, int64_t begin, int64_t end, float max, float *count,
                              const Map &map = Map()) {
  float sum = 0.0f, at_max_count = 0.0f;
#pragma omp simd reduction(+ : sum, at_max_count)
  for (int64_t c = begin; c < end; ++c) {
    const float z = map(ToFloat(row[c]));
    const bool at_max = z == max;
    at_max_count += at_max ? 1.0f : 0.0f;
    sum += at_max ? 0.0f : FastExp(z - max);
  }
  *count = at_max_count;
  return sum;
}

template <typename T, typename Map>
inline float SumExpAtMaxSplitPrefetching(const T *row, int64_t begin, int64_t end, float max,
                                         float *count, const T * /* prefetch_row: AVX-512 builds */,
                                         const Map &map) {
  return SumExpAtMaxSplit(row, begin, end, max, count, map);
}

template <typename T, typename Map = IdentityMap>
inline void WriteGradRow(const T *row, int64_t C, float shift_max, float shift_log_sum, float k,
                         float l, const float *weight, T *out,
                         bool /* stream: AVX-512 builds only */, const Map &map = Map()) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const float z = map(ToFloat(row[c]));
    const float lw = weight ? l * weight[c] : l;
    out[c] = FromFloat<T>((FastExp((z - shift_max) - shift_log_sum) * k - lw) * map.Slope(z));
  }
}

#endif

template <typename T, typename Map = IdentityMap>
inline float SumExpAtMax(const T *row, int64_t begin, int64_t end, float max, const Map &map = Map()) {
  float count;
  const float rest = SumExpAtMaxSplit(row, begin, end, max, &count, map);
  return count + rest;
}

// sum_{c in [begin, end)} exp(z[c] - block_max) against the block's own max, split as
// count + returned rest (SumExpAtMaxSplit) when that max is finite; while every element is -inf
// (or NaN) the max is -inf and the block is summed against 0 instead (exp(-inf) = 0, NaN stays
// NaN, where -inf - (-inf) would make NaN); a +inf max makes the sum NaN (inf - inf), as
// log_softmax does. count is 0 in those two cases.
template <typename T, typename Map = IdentityMap>
inline float SumExpAtOwnMaxSplit(const T *row, int64_t begin, int64_t end, float block_max,
                                 float *count, const Map &map = Map()) {
  if (std::isfinite(block_max)) return SumExpAtMaxSplit(row, begin, end, block_max, count, map);
  *count = 0.0f;
  const bool all_minus_inf = block_max == -std::numeric_limits<float>::infinity();
  return SumExp(row, begin, end, all_minus_inf ? 0.0f : block_max, map);
}

// count + rest of SumExpAtOwnMaxSplit, as one float.
template <typename T, typename Map = IdentityMap>
inline float SumExpAtOwnMax(const T *row, int64_t begin, int64_t end, float block_max,
                            const Map &map = Map()) {
  float count;
  const float rest = SumExpAtOwnMaxSplit(row, begin, end, block_max, &count, map);
  return count + rest;
}

// ---- log-sum-exp split at the row maximum ------------------------------------------------------
//
// A row's sum_c exp(z[c] - m), m = max_c z[c], is kept as count + rest: count is the number of
// elements equal to m (exact: a small integer), rest the sum over the others. Then
//   L = log(count + rest) = log1p((count - 1) + rest),   lse = m + L,
// and L keeps its full relative precision when the max carries nearly all the probability mass
// (count = 1, rest << 1: L ~ rest, while log(1 + rest) in float32 would keep only the digits of
// rest above 2^-24). lse is never needed as one float: the loss is (m - z[y]) + L and the softmax
// exp((z - m) - L), so a large common offset of the logits (all equal to 1e6, or 3e38) costs no
// digits either.
struct SplitSum {
  float max = -std::numeric_limits<float>::infinity();  // -inf while no element above -inf
  float count = 0.0f;
  float rest = 0.0f;

  // The shift the sums are taken against: the max, or 0 while it is -inf (exp(-inf - 0) = 0,
  // where exp(-inf - (-inf)) would be NaN).
  float Shift() const { return max == -std::numeric_limits<float>::infinity() ? 0.0f : max; }

  // L = log sum exp(z - Shift()): log1p((count - 1) + rest) when the max is finite (count >= 1);
  // log(rest) otherwise (-inf for a row of -inf, NaN when it holds NaN or +inf).
  float LogSum() const { return count > 0.0f ? std::log1p((count - 1.0f) + rest) : std::log(rest); }

  // Folds in a block whose elements are summed against their own max block_max (count and rest
  // from SumExpAtOwnMaxSplit). Only for block_max > max (or max = -inf): the old sum is rescaled,
  // exp(z - max) = exp(z - block_max) exp(max - block_max), and its 1.0s join rest.
  void Raise(float block_max, float block_count, float block_rest) {
    if (max == -std::numeric_limits<float>::infinity()) {
      rest += block_rest;  // 0, or NaN when an earlier element was NaN
    } else {
      rest = (count + rest) * FastExp(max - block_max) + block_rest;
    }
    max = block_max;
    count = block_count;
  }
};

// Folds the block [begin, end) of a row into s, reading it once when it does not raise the max:
// the block is summed against the running max while its own max comes from the same read; a block
// whose max is above the running one (at most a few per row: the running max of random logits is
// raised about ln(blocks) times) is summed again, L1-resident, against its own max, so that an
// element that becomes the new max is counted rather than added as a rounded exp(z - old max)
// scaled back. Returns true when the block raised the max (or set the first one).
template <typename T, typename Map>
inline bool FoldBlockSingleRead(SplitSum &s, const T *row, int64_t begin, int64_t end, const Map &map) {
  float block_max, block_count, block_rest;
  if (s.max == -std::numeric_limits<float>::infinity()) {
    block_max = BlockMax(row, begin, end, map);
  } else {
    const float block_exp = SumExpMax(row, begin, end, s.max, &block_max, map);
    if (!(block_max > s.max)) {
      s.rest += block_exp;
      return false;
    }
  }
  block_rest = SumExpAtOwnMaxSplit(row, begin, end, block_max, &block_count, map);
  const bool raised = block_max > s.max;
  s.Raise(block_max, block_count, block_rest);
  return raised;
}

// The first index c in [begin, C) with z[c] == value; -1 when there is none.
template <typename T, typename Map>
inline int64_t FirstIndexOf(const T *row, int64_t begin, int64_t C, float value, const Map &map) {
  for (int64_t c = begin; c < C; ++c) {
    if (map(ToFloat(row[c])) == value) return c;
  }
  return -1;
}

// argmax_c z[c] as torch.argmax: the first index of the max; NaN counts as the largest value (the
// first NaN wins). `max_begin` is the start of the block in which the max was first reached
// (blocks before it hold smaller values). A row of -inf gives 0.
template <typename T, typename Map>
inline int64_t RowArgmax(const T *row, int64_t C, const SplitSum &s, float log_sum,
                         int64_t max_begin, const Map &map) {
  if (std::isnan(log_sum)) {
    for (int64_t c = 0; c < C; ++c) {
      if (std::isnan(map(ToFloat(row[c])))) return c;
    }
  }
  const int64_t at = FirstIndexOf(row, max_begin, C, s.max, map);
  return at < 0 ? 0 : at;
}

// ---- class weights and class-index targets, shared by the cross-entropy kernels ----------------

// A class index usable as an index into a row of C classes.
template <typename Index>
inline bool IsValidTarget(Index y, int64_t C) {
  return static_cast<int64_t>(y) >= 0 && static_cast<int64_t>(y) < C;
}

// W = sum_c w[c] (C without class weights), summed in double.
inline float SumWeights(const float *weight, int64_t C, bool weighted) {
  if (!weighted) return static_cast<float>(C);
  double total = 0.0;
  for (int64_t c = 0; c < C; ++c) total += weight[c];
  return static_cast<float>(total);
}

// (eps / C) W in double, rounded once: finite whenever the weights are, even when W itself would
// overflow float32 (C weights of 1e37).
inline float SmoothedWeightSum(const float *weight, int64_t C, bool weighted, float eps) {
  if (!weighted) return eps;
  double total = 0.0;
  for (int64_t c = 0; c < C; ++c) total += weight[c];
  return static_cast<float>(static_cast<double>(eps) / static_cast<double>(C) * total);
}

// The first c with a weight that is not finite, or -1.
inline int64_t FirstNonFiniteWeight(const float *weight, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    if (!std::isfinite(weight[c])) return c;
  }
  return -1;
}

}  // namespace ms_xent
