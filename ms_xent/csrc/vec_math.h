// Scalar building blocks written so that GCC's vectoriser turns loops over them into SIMD code
// for whatever ISA the library is compiled for (-march=native at first use): branch-free
// float32 arithmetic, integer bit tricks and selects, no library calls.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace ms_xent {

// Rows are processed in blocks that stay in L1 between two passes over them.
constexpr int64_t kBlock = 2048;

struct BFloat16 {
  uint16_t bits;
};

inline float BitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t FloatToBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float ToFloat(float x) { return x; }
inline float ToFloat(_Float16 x) { return static_cast<float>(x); }
inline float ToFloat(BFloat16 x) { return BitsToFloat(static_cast<uint32_t>(x.bits) << 16); }

template <typename T>
inline T FromFloat(float x);

template <>
inline float FromFloat<float>(float x) { return x; }

template <>
inline _Float16 FromFloat<_Float16>(float x) { return static_cast<_Float16>(x); }

// float32 -> bfloat16 with round-to-nearest-even; NaN stays a (quiet) NaN.
template <>
inline BFloat16 FromFloat<BFloat16>(float x) {
  uint32_t u = FloatToBits(x);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan_bits = (u >> 16) | 0x40u;
  bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return BFloat16{static_cast<uint16_t>(is_nan ? nan_bits : rounded)};
}

// exp(r) = 1 + r (1 + r P(r)) for r in [-ln2/2, ln2/2], P of degree 4: a relative-error minimax
// fit (3.1e-9 in exact arithmetic); evaluated in float32 the whole exp below is within 1.14 ulp
// of the float64 exp over [-87, 88] (the Cephes degree-7 polynomial, one term more: 1.15).
constexpr float kExpP0 = 0.4999999403953552f;
constexpr float kExpP1 = 0.1666652113199234f;
constexpr float kExpP2 = 0.041668377816677094f;
constexpr float kExpP3 = 0.008368723094463348f;
constexpr float kExpP4 = 0.0013815228594467044f;

// P of degree 3 for sums of exp over float16 / bfloat16 inputs (row_kernels.h): 1.05e-7 relative
// in exact arithmetic (fitted the same way), below one float32 ulp (1.19e-7). A sum of such terms
// is off by at most that relative amount, so L = log(sum) by at most ~1e-7 absolute: the size of
// the float32 rounding of L itself, and far below the rounding of the half-precision inputs
// (2^-9 relative for bfloat16). One FMA less than kExpP*: the half-precision forward is bound by
// this polynomial, not by memory.
constexpr float kExpHalfInputP0 = 0.499992311000824f;
constexpr float kExpHalfInputP1 = 0.16667114198207855f;
constexpr float kExpHalfInputP2 = 0.04189011827111244f;
constexpr float kExpHalfInputP3 = 0.00831252709031105f;

// P of degree 2 for results rounded to float16 / bfloat16 right after (row_kernels.h): 5.4e-6
// relative in exact arithmetic (fitted the same way), 45x below half an ulp of float16 (2^-12).
constexpr float kExpHalfP0 = 0.5000512003898621f;
constexpr float kExpHalfP1 = 0.16753439605236053f;
constexpr float kExpHalfP2 = 0.04127739369869232f;

// exp(x) in float32, max relative error ~2 ulp, vectorisable.
//   exp(x) = 2^k * exp(r),  k = round(x / ln 2),  r = x - k ln 2 in [-ln2/2, ln2/2]
//   (ln 2 split in two parts so that r is exact to float32), exp(r) by the polynomial above,
//   2^k applied as 2^(k/2) * 2^(k - k/2) so that k = 128 (x close to ln FLT_MAX) stays finite.
// Results below FLT_MIN are flushed to 0 (no denormal slow paths); -inf -> 0, +inf -> +inf,
// NaN -> NaN (comparisons with NaN are false, so NaN flows through every select).
inline float FastExp(float x) {
  constexpr float kMin = -87.33654f;  // ln(FLT_MIN)
  constexpr float kMax = 88.72283f;   // ln(FLT_MAX)
  float xc = x < kMin ? kMin : x;
  xc = xc > kMax ? kMax : xc;
  // Round-to-nearest by the 1.5 * 2^23 trick: the integer lands in the low mantissa bits.
  constexpr float kShifter = 12582912.0f;
  float shifted = xc * 1.44269504088896341f + kShifter;
  float k = shifted - kShifter;
  int32_t ki = static_cast<int32_t>(FloatToBits(shifted) - FloatToBits(kShifter));
  float r = xc - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  float p = kExpP4;
  p = p * r + kExpP3;
  p = p * r + kExpP2;
  p = p * r + kExpP1;
  p = p * r + kExpP0;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t k_half = ki >> 1;
  float scale_a = BitsToFloat(static_cast<uint32_t>(k_half + 127) << 23);
  float scale_b = BitsToFloat(static_cast<uint32_t>(ki - k_half + 127) << 23);
  float result = p * scale_a * scale_b;
  result = x < kMin ? 0.0f : result;
  result = x > kMax ? std::numeric_limits<float>::infinity() : result;
  return result;
}

// tanh(t) in float32, vectorisable: an odd polynomial for |t| < 0.625 (where 1 - 2 / (e^2t + 1)
// would lose the small result to cancellation), else 1 - 2 / (e^2t + 1), which saturates to +-1
// (e^2t = inf or 0). The polynomial is the Cephes tanhf one (about 2 ulp). NaN -> NaN.
inline float FastTanh(float t) {
  const float t2 = t * t;
  float p = -5.70498872745e-3f;
  p = p * t2 + 2.06390887954e-2f;
  p = p * t2 - 5.37397155531e-2f;
  p = p * t2 + 1.33314422036e-1f;
  p = p * t2 - 3.33332819422e-1f;
  const float small = t + t * t2 * p;
  const float large = 1.0f - 2.0f / (FastExp(2.0f * t) + 1.0f);
  return std::fabs(t) < 0.625f ? small : large;
}

// log(1 + u) for u in [0, 1] in float32, vectorisable (one division, no library call).
//   log(1 + u) = 2 atanh(s),  s = u / (2 + u) in [0, 1/3],
//   2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ... + s^14/15)   (Taylor, truncated);
//   the first omitted term is below (1/9)^8 / 17 < 4e-9 relative. Error measured against double
//   over 2^24 points of [0, 1]: at most 2 ulp (from rounding s and the Horner steps). Relative
//   accuracy holds for tiny u too (log1p(u) = u to first order), unlike log(1 + u).
//   u = 0 -> 0, NaN -> NaN. Meant for u = exp(-|x|), i.e. softplus tails.
inline float Log1pUnit(float u) {
  const float s = u / (2.0f + u);
  const float s2 = s * s;
  float p = 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  return 2.0f * s + 2.0f * s * (p * s2);
}

}  // namespace ms_xent
