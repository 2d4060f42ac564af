// Fused cross-entropy kernels (log_softmax + nll in one pass, and the backward) for
// MindSpore `ops.Custom(func_type="aot")` on CPU.
//
// Notation, per row n of the logits x[N, C] (all arithmetic in float32):
//   y = target[n], m_n = 1{y != ignore_index}, w = class weights (ones when absent),
//   W = sum_c w[c], eps = label smoothing, p[c] = softmax(x)[c] = exp(x[c] - lse).
//   lse       = log sum_c exp(x[c])      (max-subtracted, computed in one streaming pass)
//   logp[c]   = x[c] - lse
//   l_n       = m_n * ( (1-eps) * w[y] * (lse - x[y]) + (eps/C) * sum_c w[c] * (lse - x[c]) )
//
// Soft (probability) targets t[n, C], mixed with the uniform distribution first:
//   t'[c] = (1-eps) * t[c] + eps/C,  S = sum_c w[c] t'[c]
//   l_n   = - sum_c w[c] t'[c] logp[c] = S * lse - sum_c w[c] t'[c] x[c]
//
// The forward kernels return per-row float32 values (loss l_n, lse_n, and for class targets the
// row's share m_n * w[y] of the "mean" denominator); the Python op layer reduces them. The backward
// kernels take per-row gradients: a_n = dL/dl_n and b_n = dL/dlse_n, so that every reduction,
// z-loss (z_n = s * lse_n^2 gives b_n = 2 s lse_n dL/dz_n) and masking is handled once, in Python.
//
// Gradient, class targets (d lse / d x[c] = p[c]):
//   dl_n/dx[c] = (1-eps) w[y] (p[c] - 1{c=y}) + (eps/C) (W p[c] - w[c])
//   grad[c]    = a_n dl_n/dx[c] + b_n p[c]
//              = p[c] * K - a_n (eps/C) w[c] - 1{c=y} a_n (1-eps) w[y],
//   with K     = a_n ((1-eps) w[y] + (eps/C) W) + b_n.
// Gradient, soft targets:
//   dl_n/dx[c] = S p[c] - w[c] t'[c]   so   grad[c] = p[c] (a_n S + b_n) - a_n w[c] t'[c].
//
// The backward reads x (logits with shift = lse, or log-probabilities with shift = 0) once and
// writes the gradient once: p[c] = exp(x[c] - shift).
//
// Every index into a row is 64-bit; a target outside [0, C) that is not ignore_index is never
// used as an index: the row is treated as ignored and the kernel returns kTargetOutOfRange.

#include <omp.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>

#include "aot_abi.h"
#include "vec_math.h"
#include "dtype_dispatch.h"
#include "row_kernels.h"

namespace ms_xent {
namespace {

struct CrossEntropyAttrs : public AotKernelData {
  int64_t ignore_index = -100;
  float label_smoothing = 0.0f;
  bool weighted = false;
};

int ReadAttrs(AotExtra *extra) {
  auto *attrs = new CrossEntropyAttrs;
  attrs->ignore_index = extra->Attr<int64_t>("ignore_index");
  attrs->label_smoothing = extra->Attr<float>("label_smoothing");
  attrs->weighted = extra->Attr<bool>("weighted");
  extra->SetKernelData(attrs);
  return kOk;
}

// Single-read log-sum-exp threshold (see RowLogSumExp). A block is first summed against the
// running max m_old of the blocks before it, while its own max m_B is found from the same read.
// When m_B > m_old + kDominantMargin the block is summed again against m_B, with SumExpAtMax:
// - its max may carry nearly all the probability mass (p >= 1 / (1 + e^-4) = 0.982 when it is the
//   only large term), and 1 - p (the loss and the true-class gradient when it is the target)
//   must keep its digits. Below the margin 1 - p > 0.018 and float32 lane rounding (a few 2^-24
//   relative to the largest term) stays below 1e-5 relative.
// - the first sum may have overflowed; every kept partial sum has x - m_old <= 4, so none can
//   (2048 * e^4 << FLT_MAX).
constexpr float kDominantMargin = 4.0f;

// lse = log sum_c exp(x[c]) of one row, reading each element once from memory (later blocks are
// summed while the next are prefetched; only the first block and the rare blocks above take a
// second, L1-resident pass). With m_old, s_old = sum exp(x - m_old) over the blocks before and a
// block B with max m_B:
//   m_B <= m_old:  s = s_old + sum_B exp(x - m_old)
//   m_B >  m_old:  s = (s_old + sum_B exp(x - m_old)) * exp(m_old - m_B),  m = m_B
// so at the end s = sum_c exp(x[c] - max), lse = max + log s, as in the two-pass form.
// While every element seen is -inf (or NaN) the max is -inf; the block is then summed against 0
// (exp(-inf) = 0, NaN stays NaN) instead of -inf - (-inf) = NaN. A +inf max keeps shift = +inf,
// which makes the sum NaN (inf - inf), as log_softmax does.
template <typename T>
float RowLogSumExp(const T *row, int64_t C) {
  const float kNegInf = -std::numeric_limits<float>::infinity();
  float running_max = kNegInf;
  float sum_exp = 0.0f;
  for (int64_t begin = 0; begin < C; begin += kBlock) {
    const int64_t end = begin + kBlock < C ? begin + kBlock : C;
    if (running_max == kNegInf) {
      running_max = BlockMax(row, begin, end);
      sum_exp += SumExpAtOwnMax(row, begin, end, running_max);
      continue;
    }
    float block_max;
    const float block_exp = SumExpMax(row, begin, end, running_max, &block_max);
    if (block_max > running_max + kDominantMargin) {
      sum_exp = sum_exp * FastExp(running_max - block_max) + SumExpAtOwnMax(row, begin, end, block_max);
      running_max = block_max;
    } else if (block_max > running_max) {
      sum_exp = (sum_exp + block_exp) * FastExp(running_max - block_max);
      running_max = block_max;
    } else {
      sum_exp += block_exp;
    }
  }
  return (running_max == kNegInf ? 0.0f : running_max) + std::log(sum_exp);
}

// Streaming log-sum-exp of one row (two passes over each L1-resident block: max, then exp) with
// weighted sums that share the same read:
//   sum_c v[c] * (x[c] - ref), where v[c] = w[c] (class targets, smoothing term) or
//   v[c] = w[c] * t'[c] (soft targets). `ref` (the first block's max) keeps that sum free of
//   cancellation when all logits carry a large common offset.
struct RowStats {
  float lse;
  float ref;
  float dot;   // sum_c v[c] (x[c] - ref)
  float mass;  // sum_c v[c]
};

// Coefficients of the per-class factor v[c] = w[c] * (alpha * t[c] + beta); t is absent
// (class targets) when target_row is null, in which case v[c] = w[c].
template <typename T, bool kWeighted, bool kSoft>
RowStats StreamRow(const T *row, int64_t C, const float *weight, const T *target_row, float alpha,
                   float beta) {
  const float kNegInf = -std::numeric_limits<float>::infinity();
  float running_max = kNegInf;
  float sum_exp = 0.0f;
  float ref = 0.0f;
  float dot = 0.0f;
  float mass = 0.0f;
  for (int64_t begin = 0; begin < C; begin += kBlock) {
    const int64_t end = begin + kBlock < C ? begin + kBlock : C;
    const float block_max = BlockMax(row, begin, end);
    if (begin == 0) ref = std::isfinite(block_max) ? block_max : 0.0f;
    if (block_max > running_max) {
      // Rescale what was summed against the old max: exp(x - old) = exp(x - new) * exp(old - new).
      sum_exp *= FastExp(running_max - block_max);
      running_max = block_max;
    }
    // While every element seen is -inf (or NaN) the max is -inf; exponentiate against 0 then,
    // which gives exp(-inf) = 0 and keeps NaN, instead of -inf - (-inf) = NaN.
    const float shift = running_max == kNegInf ? 0.0f : running_max;
    float block_exp = 0.0f, block_dot = 0.0f, block_mass = 0.0f;
#pragma omp simd reduction(+ : block_exp, block_dot, block_mass)
    for (int64_t c = begin; c < end; ++c) {
      const float x = ToFloat(row[c]);
      float v = kWeighted ? weight[c] : 1.0f;
      if (kSoft) v *= alpha * ToFloat(target_row[c]) + beta;
      block_exp += FastExp(x - shift);
      block_dot += v * (x - ref);
      block_mass += v;
    }
    sum_exp += block_exp;
    dot += block_dot;
    mass += block_mass;
  }
  const float shift = running_max == kNegInf ? 0.0f : running_max;
  return RowStats{shift + std::log(sum_exp), ref, dot, mass};
}

template <typename T>
void WriteLogProb(const T *row, int64_t C, float lse, T *out) {
  for (int64_t c = 0; c < C; ++c) out[c] = FromFloat<T>(ToFloat(row[c]) - lse);
}

// Gradients at least this large are written with streaming stores: far larger than the caches,
// so the stores skip reading the destination lines first (3 -> 2 bytes of memory traffic per byte
// of gradient). Backward measured here (scripts/bench_kernels.py): float32 8192 x 32000
// 78 -> 57 ms; bfloat16 2048 x 128256 40.5 -> 30.5 ms, 4096 x 151936 96 -> 70 ms. Smaller
// gradients stay cacheable for the next op to read.
constexpr int64_t kStreamingStoreBytes = int64_t{64} << 20;

// ---- class-index targets ------------------------------------------------------------------

template <typename T, typename Index, bool kWeighted>
int HardForward(const CrossEntropyAttrs &attrs, int64_t N, int64_t C, const T *x,
                const Index *target, const float *weight, float *loss_rows, float *lse_rows,
                float *row_weight, T *log_prob) {
  const float eps = attrs.label_smoothing;
  const float total_weight = SumWeights(weight, C, kWeighted);
  std::atomic<int64_t> bad_row{-1};
#pragma omp parallel for schedule(static) if (N * C > 32768)
  for (int64_t n = 0; n < N; ++n) {
    const T *row = x + n * C;
    const int64_t y = static_cast<int64_t>(target[n]);
    const bool ignored = y == attrs.ignore_index;
    if (!ignored && !IsValidTarget(y, C)) bad_row.store(n);
    const bool counted = !ignored && IsValidTarget(y, C);
    RowStats stats = eps > 0.0f && counted
                         ? StreamRow<T, kWeighted, false>(row, C, weight, nullptr, 0, 0)
                         : RowStats{RowLogSumExp(row, C), 0.0f, 0.0f, 0.0f};
    lse_rows[n] = stats.lse;
    if (log_prob) WriteLogProb(row, C, stats.lse, log_prob + n * C);
    if (!counted) {
      loss_rows[n] = 0.0f;
      row_weight[n] = 0.0f;
      continue;
    }
    const float w_y = kWeighted ? weight[y] : 1.0f;
    float loss = (1.0f - eps) * w_y * (stats.lse - ToFloat(row[y]));
    if (eps > 0.0f) {
      // sum_c w[c] (lse - x[c]) = W (lse - ref) - sum_c w[c] (x[c] - ref)
      loss += eps / static_cast<float>(C) * (total_weight * (stats.lse - stats.ref) - stats.dot);
    }
    loss_rows[n] = loss;
    row_weight[n] = w_y;
  }
  if (bad_row.load() >= 0) {
    const int64_t n = bad_row.load();
    MS_XENT_REPORT("cross_entropy", "target[%lld] = %lld is outside [0, %lld) and is not ignore_index (%lld)",
                   static_cast<long long>(n), static_cast<long long>(target[n]),
                   static_cast<long long>(C), static_cast<long long>(attrs.ignore_index));
    return kTargetOutOfRange;
  }
  return kOk;
}

template <typename T, typename Index, bool kWeighted>
int HardBackward(const CrossEntropyAttrs &attrs, int64_t N, int64_t C, const T *x,
                 const Index *target, const float *weight, const float *shift_rows,
                 const float *row_grad, const float *row_grad_lse, T *grad) {
  const float eps = attrs.label_smoothing;
  const float smooth = eps / static_cast<float>(C);
  const float total_weight = SumWeights(weight, C, kWeighted);
  const bool stream = N * C * static_cast<int64_t>(sizeof(T)) >= kStreamingStoreBytes;
  std::atomic<int64_t> bad_row{-1};
#pragma omp parallel for schedule(static) if (N * C > 32768)
  for (int64_t n = 0; n < N; ++n) {
    const T *row = x + n * C;
    T *out = grad + n * C;
    const int64_t y = static_cast<int64_t>(target[n]);
    const bool ignored = y == attrs.ignore_index;
    if (!ignored && !IsValidTarget(y, C)) bad_row.store(n);
    const bool counted = !ignored && IsValidTarget(y, C);
    const float a = counted ? row_grad[n] : 0.0f;
    const float b = row_grad_lse[n];
    if (a == 0.0f && b == 0.0f) {
      // Ignored rows (and rows with zero upstream gradient) get exact zeros, even for NaN logits.
      for (int64_t c = 0; c < C; ++c) out[c] = FromFloat<T>(0.0f);
      continue;
    }
    const float shift = shift_rows[n];
    const float w_y = counted ? (kWeighted ? weight[y] : 1.0f) : 0.0f;
    const float k = a * ((1.0f - eps) * w_y + smooth * total_weight) + b;
    const float l = a * smooth;
    WriteGradRow(row, C, shift, k, l, kWeighted ? weight : nullptr, out, stream);
    if (counted) {
      // The true-class term, recomputed in float32 so that p[y] - 1 does not lose its digits to
      // the rounding of out[y] in a half type.
      const float p_y = FastExp(ToFloat(row[y]) - shift);
      out[y] = FromFloat<T>(p_y * k - l * w_y - a * (1.0f - eps) * w_y);
    }
  }
  return bad_row.load() >= 0 ? kTargetOutOfRange : kOk;
}

// ---- probability (soft) targets --------------------------------------------------------------

template <typename T, bool kWeighted>
int SoftForward(const CrossEntropyAttrs &attrs, int64_t N, int64_t C, const T *x, const T *target,
                const float *weight, float *loss_rows, float *lse_rows, T *log_prob) {
  const float alpha = 1.0f - attrs.label_smoothing;
  const float beta = attrs.label_smoothing / static_cast<float>(C);
#pragma omp parallel for schedule(static) if (N * C > 32768)
  for (int64_t n = 0; n < N; ++n) {
    const T *row = x + n * C;
    RowStats stats = StreamRow<T, kWeighted, true>(row, C, weight, target + n * C, alpha, beta);
    lse_rows[n] = stats.lse;
    // l_n = S lse - sum_c v[c] x[c] = S (lse - ref) - sum_c v[c] (x[c] - ref)
    loss_rows[n] = stats.mass * (stats.lse - stats.ref) - stats.dot;
    if (log_prob) WriteLogProb(row, C, stats.lse, log_prob + n * C);
  }
  return kOk;
}

template <typename T, bool kWeighted>
int SoftBackward(const CrossEntropyAttrs &attrs, int64_t N, int64_t C, const T *x, const T *target,
                 const float *weight, const float *shift_rows, const float *row_grad,
                 const float *row_grad_lse, T *grad) {
  const float alpha = 1.0f - attrs.label_smoothing;
  const float beta = attrs.label_smoothing / static_cast<float>(C);
#pragma omp parallel for schedule(static) if (N * C > 32768)
  for (int64_t n = 0; n < N; ++n) {
    const T *row = x + n * C;
    const T *t = target + n * C;
    T *out = grad + n * C;
    const float a = row_grad[n];
    const float b = row_grad_lse[n];
    if (a == 0.0f && b == 0.0f) {
      for (int64_t c = 0; c < C; ++c) out[c] = FromFloat<T>(0.0f);
      continue;
    }
    float mass = 0.0f;
#pragma omp simd reduction(+ : mass)
    for (int64_t c = 0; c < C; ++c) {
      mass += (kWeighted ? weight[c] : 1.0f) * (alpha * ToFloat(t[c]) + beta);
    }
    const float k = a * mass + b;
    const float shift = shift_rows[n];
    for (int64_t c = 0; c < C; ++c) {
      const float p = FastExp(ToFloat(row[c]) - shift);
      const float v = (kWeighted ? weight[c] : 1.0f) * (alpha * ToFloat(t[c]) + beta);
      out[c] = FromFloat<T>(p * k - a * v);
    }
  }
  return kOk;
}

// ---- shape checks shared by the entry points ---------------------------------------------------

bool IsMatrix(int *ndims, int64_t **shapes, int i, int64_t N, int64_t C) {
  return ndims[i] == 2 && shapes[i][0] == N && shapes[i][1] == C;
}

bool IsRowVector(int *ndims, int64_t **shapes, int i, int64_t N) {
  return ndims[i] == 1 && shapes[i][0] == N;
}

// Output shapes of the forward kernels; {-2} (unknown rank) while the rank of x is unknown.
std::vector<std::vector<int64_t>> RowOutputs(int *ndims, int64_t **shapes, int count,
                                             bool with_log_prob) {
  const bool known = ndims[0] == 2;
  const std::vector<int64_t> rows = known ? std::vector<int64_t>{shapes[0][0]} : std::vector<int64_t>{-2};
  std::vector<std::vector<int64_t>> out(count, rows);
  if (with_log_prob) out.push_back(known ? std::vector<int64_t>{shapes[0][0], shapes[0][1]} : rows);
  return out;
}

std::vector<int64_t> SameShape(int *ndims, int64_t **shapes) {
  return std::vector<int64_t>(shapes[0], shapes[0] + ndims[0]);
}

// Runs fn(T *, Index *, weighted) with typed null pointers for the dtypes of x and of the class
// indices, and std::true_type / std::false_type for attrs.weighted.
template <typename Fn>
int DispatchClassTargets(const char **dtypes, const CrossEntropyAttrs &attrs, Fn &&fn) {
  return DispatchFloat(dtypes[0], [&](auto *tag) {
    return DispatchIndex(dtypes[1], [&](auto *index_tag) {
      return attrs.weighted ? fn(tag, index_tag, std::true_type{})
                            : fn(tag, index_tag, std::false_type{});
    });
  });
}

// Same for probability targets (same dtype as x): fn(T *, weighted).
template <typename Fn>
int DispatchSoftTargets(const char **dtypes, const CrossEntropyAttrs &attrs, Fn &&fn) {
  return DispatchFloat(dtypes[0], [&](auto *tag) {
    return attrs.weighted ? fn(tag, std::true_type{}) : fn(tag, std::false_type{});
  });
}

// Class targets. inputs: x[N,C], target[N], weight[C]; outputs: loss_rows[N], lse[N],
// row_weight[N] (float32), and log_prob[N,C] (dtype of x) when nparam == 7.
int HardForwardEntry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                     void *extra) {
  if ((nparam != 6 && nparam != 7) || ndims[0] != 2) return kBadArguments;
  const int64_t N = shapes[0][0], C = shapes[0][1];
  if (!IsRowVector(ndims, shapes, 1, N) || !IsRowVector(ndims, shapes, 2, C)) return kBadArguments;
  const auto &attrs = KernelAttrs<CrossEntropyAttrs>(extra);
  return DispatchClassTargets(dtypes, attrs, [&](auto *tag, auto *index_tag, auto weighted) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Index = std::remove_pointer_t<decltype(index_tag)>;
    return HardForward<T, Index, decltype(weighted)::value>(
        attrs, N, C, static_cast<const T *>(params[0]), static_cast<const Index *>(params[1]),
        static_cast<const float *>(params[2]), static_cast<float *>(params[3]),
        static_cast<float *>(params[4]), static_cast<float *>(params[5]),
        nparam == 7 ? static_cast<T *>(params[6]) : nullptr);
  });
}

// inputs: x[N,C] (logits or log-probabilities), target[N], weight[C], shift[N], row_grad[N],
// row_grad_lse[N]; output: grad[N,C] (dtype of x).
int HardBackwardEntry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                      void *extra) {
  if (nparam != 7 || ndims[0] != 2) return kBadArguments;
  const int64_t N = shapes[0][0], C = shapes[0][1];
  if (!IsRowVector(ndims, shapes, 1, N) || !IsRowVector(ndims, shapes, 2, C) ||
      !IsRowVector(ndims, shapes, 3, N) || !IsRowVector(ndims, shapes, 4, N) ||
      !IsRowVector(ndims, shapes, 5, N) || !IsMatrix(ndims, shapes, 6, N, C)) {
    return kBadArguments;
  }
  const auto &attrs = KernelAttrs<CrossEntropyAttrs>(extra);
  return DispatchClassTargets(dtypes, attrs, [&](auto *tag, auto *index_tag, auto weighted) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Index = std::remove_pointer_t<decltype(index_tag)>;
    return HardBackward<T, Index, decltype(weighted)::value>(
        attrs, N, C, static_cast<const T *>(params[0]), static_cast<const Index *>(params[1]),
        static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
        static_cast<const float *>(params[4]), static_cast<const float *>(params[5]),
        static_cast<T *>(params[6]));
  });
}

// Soft targets. inputs: x[N,C], t[N,C] (dtype of x), weight[C]; outputs: loss_rows[N], lse[N]
// (float32), and log_prob[N,C] when nparam == 6.
int SoftForwardEntry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                     void *extra) {
  if ((nparam != 5 && nparam != 6) || ndims[0] != 2) return kBadArguments;
  const int64_t N = shapes[0][0], C = shapes[0][1];
  if (!IsMatrix(ndims, shapes, 1, N, C) || !IsRowVector(ndims, shapes, 2, C)) return kBadArguments;
  if (std::strcmp(dtypes[0], dtypes[1]) != 0) return kBadArguments;
  const auto &attrs = KernelAttrs<CrossEntropyAttrs>(extra);
  return DispatchSoftTargets(dtypes, attrs, [&](auto *tag, auto weighted) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return SoftForward<T, decltype(weighted)::value>(
        attrs, N, C, static_cast<const T *>(params[0]), static_cast<const T *>(params[1]),
        static_cast<const float *>(params[2]), static_cast<float *>(params[3]),
        static_cast<float *>(params[4]), nparam == 6 ? static_cast<T *>(params[5]) : nullptr);
  });
}

// inputs: x[N,C], t[N,C], weight[C], shift[N], row_grad[N], row_grad_lse[N]; output grad[N,C].
int SoftBackwardEntry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                      void *extra) {
  if (nparam != 7 || ndims[0] != 2) return kBadArguments;
  const int64_t N = shapes[0][0], C = shapes[0][1];
  if (!IsMatrix(ndims, shapes, 1, N, C) || !IsRowVector(ndims, shapes, 2, C) ||
      !IsRowVector(ndims, shapes, 3, N) || !IsRowVector(ndims, shapes, 4, N) ||
      !IsRowVector(ndims, shapes, 5, N) || !IsMatrix(ndims, shapes, 6, N, C)) {
    return kBadArguments;
  }
  if (std::strcmp(dtypes[0], dtypes[1]) != 0) return kBadArguments;
  const auto &attrs = KernelAttrs<CrossEntropyAttrs>(extra);
  return DispatchSoftTargets(dtypes, attrs, [&](auto *tag, auto weighted) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return SoftBackward<T, decltype(weighted)::value>(
        attrs, N, C, static_cast<const T *>(params[0]), static_cast<const T *>(params[1]),
        static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
        static_cast<const float *>(params[4]), static_cast<const float *>(params[5]),
        static_cast<T *>(params[6]));
  });
}

}  // namespace
}  // namespace ms_xent

// ---- exported symbols: <Name>, <Name>Init (attributes), <Name>InferShape -------------------------

using ms_xent::ReadAttrs;
using ms_xent::RowOutputs;
using ms_xent::SameShape;

#define MS_XENT_AOT_KERNEL(Name, Entry)                                                             \
  extern "C" int Name##Init(int *, int64_t **, const char **, AotExtra *extra) {                    \
    return ReadAttrs(extra);                                                                        \
  }                                                                                                 \
  extern "C" int Name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, \
                      void *, void *extra) {                                                        \
    return ms_xent::Entry(nparam, params, ndims, shapes, dtypes, extra);                            \
  }

MS_XENT_AOT_KERNEL(XentHardForward, HardForwardEntry)
MS_XENT_AOT_KERNEL(XentHardForwardLogProb, HardForwardEntry)
MS_XENT_AOT_KERNEL(XentHardBackward, HardBackwardEntry)
MS_XENT_AOT_KERNEL(XentSoftForward, SoftForwardEntry)
MS_XENT_AOT_KERNEL(XentSoftForwardLogProb, SoftForwardEntry)
MS_XENT_AOT_KERNEL(XentSoftBackward, SoftBackwardEntry)

extern "C" std::vector<std::vector<int64_t>> XentHardForwardInferShape(int *ndims, int64_t **shapes, AotExtra *) {
  return RowOutputs(ndims, shapes, 3, false);
}
extern "C" std::vector<std::vector<int64_t>> XentHardForwardLogProbInferShape(int *ndims, int64_t **shapes, AotExtra *) {
  return RowOutputs(ndims, shapes, 3, true);
}
extern "C" std::vector<std::vector<int64_t>> XentSoftForwardInferShape(int *ndims, int64_t **shapes, AotExtra *) {
  return RowOutputs(ndims, shapes, 2, false);
}
extern "C" std::vector<std::vector<int64_t>> XentSoftForwardLogProbInferShape(int *ndims, int64_t **shapes, AotExtra *) {
  return RowOutputs(ndims, shapes, 2, true);
}
extern "C" std::vector<int64_t> XentHardBackwardInferShape(int *ndims, int64_t **shapes, AotExtra *) {
  return SameShape(ndims, shapes);
}
extern "C" std::vector<int64_t> XentSoftBackwardInferShape(int *ndims, int64_t **shapes, AotExtra *) {
  return SameShape(ndims, shapes);
}
