// The two row loops that dominate the cross-entropy kernels, in a portable form (auto-vectorised
// `omp simd` over vec_math.h's FastExp) and, when compiled for AVX-512 (F, BW, VL), in explicit
// 512-bit intrinsics:
//
//   SumExp(row, begin, end, shift)           = sum_{c in [begin, end)} exp(x[c] - shift)
//   WriteGradRow(row, C, shift, k, l, w, out): out[c] = exp(x[c] - shift) * k - l * w[c]
//                                              (w[c] = 1 when w is null)
//
// The AVX-512 exp uses the same range reduction and polynomial as FastExp
//   exp(x) = 2^k * exp(r), k = round(x log2 e), r = x - k ln 2, exp(r) by the Cephes polynomial,
// but applies 2^k with vscalefps, which saturates to +inf / 0 by itself. Inputs are first clamped
// to [-200, 200] with the NaN-preserving operand order (max/min return their second operand when
// either is NaN): -inf -> exp(-200) = 0 exactly (2^-289 underflows to 0), +inf -> inf, NaN -> NaN.
// That is ~12 vector instructions per 16 elements instead of ~40 for the selects and integer
// tricks the portable FastExp needs.
#pragma once

#include <cstdint>

#include "vec_math.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define MS_XENT_AVX512 1
#endif

namespace ms_xent {

#if defined(MS_XENT_AVX512)

inline __m512 Exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-200.0f), x);
  x = _mm512_min_ps(_mm512_set1_ps(200.0f), x);
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(k, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);
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

inline void Store16(float *p, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(p, mask, v); }
inline void Store16(_Float16 *p, __mmask16 mask, __m512 v) {
  _mm256_mask_storeu_epi16(p, mask, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// float32 -> bfloat16, round to nearest even, NaN kept quiet (as FromFloat<BFloat16>).
inline void Store16(BFloat16 *p, __mmask16 mask, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_or_epi32(rounded, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(rounded));
}

inline __mmask16 TailMask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF)
                         : static_cast<__mmask16>((1u << remaining) - 1u);
}

template <typename T>
inline float SumExp(const T *row, int64_t begin, int64_t end, float shift) {
  const __m512 vshift = _mm512_set1_ps(shift);
  __m512 acc0 = _mm512_setzero_ps();
  __m512 acc1 = _mm512_setzero_ps();
  int64_t c = begin;
  for (; c + 32 <= end; c += 32) {
    acc0 = _mm512_add_ps(acc0, Exp16(_mm512_sub_ps(Load16(row + c, 0xFFFF), vshift)));
    acc1 = _mm512_add_ps(acc1, Exp16(_mm512_sub_ps(Load16(row + c + 16, 0xFFFF), vshift)));
  }
  for (; c < end; c += 16) {
    const __mmask16 mask = TailMask(end - c);
    const __m512 e = Exp16(_mm512_sub_ps(Load16(row + c, mask), vshift));
    acc0 = _mm512_mask_add_ps(acc0, mask, acc0, e);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

template <typename T>
inline void WriteGradRow(const T *row, int64_t C, float shift, float k, float l,
                         const float *weight, T *out) {
  const __m512 vshift = _mm512_set1_ps(shift);
  const __m512 vk = _mm512_set1_ps(k);
  const __m512 vl = _mm512_set1_ps(l);
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 mask = TailMask(C - c);
    const __m512 p = Exp16(_mm512_sub_ps(Load16(row + c, mask), vshift));
    const __m512 lw = weight ? _mm512_mul_ps(vl, _mm512_maskz_loadu_ps(mask, weight + c)) : vl;
    Store16(out + c, mask, _mm512_fmsub_ps(p, vk, lw));
  }
}

#else  // portable

template <typename T>
inline float SumExp(const T *row, int64_t begin, int64_t end, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = begin; c < end; ++c) sum += FastExp(ToFloat(row[c]) - shift);
  return sum;
}

template <typename T>
inline void WriteGradRow(const T *row, int64_t C, float shift, float k, float l,
                         const float *weight, T *out) {
  if (weight) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] = FromFloat<T>(FastExp(ToFloat(row[c]) - shift) * k - l * weight[c]);
  } else {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] = FromFloat<T>(FastExp(ToFloat(row[c]) - shift) * k - l);
  }
}

#endif

}  // namespace ms_xent
