// Fused cross-entropy kernels (log_softmax + nll in one pass, and the backward) for
// MindSpore `ops.Custom(func_type="aot")` on CPU.
//
// Notation, per row n of the stored logits x[N, C] (all arithmetic in float32):
//   z[c] = map(x[c]), the logits the loss sees: z = s x (logit scale s), or z = cap tanh(s x / cap)
//          with a softcap cap > 0 (row_kernels.h, "logit maps"); z = x by default.
//   y = target[n], m_n = 1{y counts: y != ignore_index}, w = class weights (ones when absent),
//   W = sum_c w[c], eps = label smoothing, p[c] = softmax(z)[c].
//   M = max_c z[c], L = log sum_c exp(z[c] - M)   (split at the max: row_kernels.h, SplitSum)
//   lse = M + L,  -logp[c] = (M - z[c]) + L        (both terms >= 0: no cancellation)
//   l_n = m_n ( (1-eps) w[y] ((M - z[y]) + L) + (eps/C) sum_c w[c] ((M - z[c]) + L) )
//       = m_n ( (1-eps) w[y] ((M - z[y]) + L) + (eps/C) W L + (eps/C) sum_c w[c] (M - z[c]) )
//   Every term is >= 0 for w >= 0, so l_n has the relative precision of its parts: a large common
//   offset of the logits (1e6, 3e38) and a confident row (p[y] = 1 - 1e-7, where l_n ~ L ~ 1e-7)
//   keep their digits, which lse rounded to one float32 and lse - z[y] would not.
//
// Soft (probability) targets t[n, C], mixed with the uniform distribution first:
//   t'[c] = (1-eps) t[c] + eps/C,  v[c] = w[c] t'[c],  S = sum_c v[c]
//   l_n   = - sum_c v[c] logp[c] = S L + sum_c v[c] (M - z[c])
//
// The forward kernels return per-row float32 values: the loss l_n, lse_n = M + L, for class
// targets the row's share m_n w[y] of the "mean" denominator, and the state of the backward, M_n
// ("row_max"; 0 for a row without any element above -inf) and L_n ("row_log_sum"); optionally
// log_prob[N, C] = (z - M) - L, or the row's argmax (first index of the max of z, as
// torch.argmax; NaN counts as the largest). The Python op layer reduces them. The backward kernels
// take per-row gradients: a_n = dL/dl_n and b_n = dL/dlse_n, so that every reduction, z-loss
// (z_n = s lse_n^2 gives b_n = 2 s lse_n dL/dz_n) and masking is handled once, in Python.
//
// Gradient w.r.t. z, class targets (d lse / d z[c] = p[c]):
//   dl_n/dz[c] = (1-eps) w[y] (p[c] - 1{c=y}) + (eps/C) (W p[c] - w[c])
//   grad[c]    = a_n dl_n/dz[c] + b_n p[c]
//              = p[c] K - a_n (eps/C) w[c] - 1{c=y} a_n (1-eps) w[y],
//   with K     = a_n (1-eps) w[y] + K',  K' = a_n (eps/C) W + b_n.
//   At c = y it is written a_n (1-eps) w[y] (p[y] - 1) + p[y] K' - a_n (eps/C) w[y], with
//   p[y] - 1 = expm1((z[y] - M) - L): -(1 - p[y]) without the cancellation of p[y] - 1.
//   The (eps/C) terms are not evaluated when eps = 0 (an infinite W would make 0 * inf = NaN),
//   and (eps/C) W is formed in double (finite even when W overflows float32).
// Gradient w.r.t. z, soft targets:
//   dl_n/dz[c] = S p[c] - v[c]   so   grad[c] = p[c] (a_n S + b_n) - a_n v[c];
//   w.r.t. the targets (optional output): dl_n/dt[c] = -(1-eps) w[c] logp[c], times a_n.
// Gradient w.r.t. x: grad_z[c] dz/dx[c], dz/dx = s, or s (1 - (z / cap)^2) with the softcap.
//
// The backward reads x (logits with shift (M, L), or log-probabilities with shift (0, 0)) once
// and writes the gradient once: p[c] = exp((z[c] - M) - L).
//
// Every index into a row is 64-bit; a target outside [0, C) that is not ignore_index is never
// used as an index: the row is treated as ignored and the kernel returns kTargetOutOfRange.
// Class weights must be finite (any sign): otherwise the kernel names the first bad one on stderr
// and returns kWeightNotFinite.

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
  float logit_scale = 1.0f;
  float logit_softcap = 0.0f;  // 0: no softcap
};

int ReadAttrs(AotExtra *extra) {
  auto *attrs = new CrossEntropyAttrs;
  attrs->ignore_index = extra->Attr<int64_t>("ignore_index");
  attrs->label_smoothing = extra->Attr<float>("label_smoothing");
  attrs->weighted = extra->Attr<bool>("weighted");
  attrs->logit_scale = extra->Attr<float>("logit_scale");
  attrs->logit_softcap = extra->Attr<float>("logit_softcap");
  extra->SetKernelData(attrs);
  return kOk;
}

// Rejects non-finite class weights (checked by every kernel that reads them: in GRAPH_MODE the
// values are unknown to the Python layer).
template <bool kWeighted>
int CheckWeights(const float *weight, int64_t C) {
  if (!kWeighted) return kOk;
  const int64_t bad = FirstNonFiniteWeight(weight, C);
  if (bad < 0) return kOk;
  MS_XENT_REPORT("cross_entropy", "weight[%lld] = %g is not finite (class weights must be finite)",
                 static_cast<long long>(bad), static_cast<double>(weight[bad]));
  return kWeightNotFinite;
}

// Per-row state of the streaming passes that also need weighted sums (label smoothing, soft
// targets): the split log-sum-exp, and over the factor v[c] = w[c] (alpha t[c] + beta) (t absent
// for class targets: v[c] = w[c] beta)
//   dot = sum_c v[c] (M - z[c]),  mass = sum_c v[c].
// dot is accumulated against the running max and moved along when the max rises:
// sum v (M_new - z) = sum v (M_old - z) + mass (M_new - M_old), all terms >= 0 for v >= 0.
struct RowStats {
  SplitSum sum;
  double dot;
  double mass;
  int64_t max_begin;  // start of the block where the max was first reached
};

// Two passes over each L1-resident block: its max, then exp, count at the max, dot and mass.
template <typename T, bool kWeighted, bool kSoft, typename Map>
RowStats StreamRow(const T *row, int64_t C, const float *weight, const T *target_row, float alpha,
                   float beta, const Map &map) {
  const float kNegInf = -std::numeric_limits<float>::infinity();
  RowStats stats{SplitSum{}, 0.0, 0.0, 0};
  SplitSum &s = stats.sum;
  for (int64_t begin = 0; begin < C; begin += kBlock) {
    const int64_t end = begin + kBlock < C ? begin + kBlock : C;
    const float block_max = BlockMax(row, begin, end, map);
    if (block_max > s.max) {
      if (s.max != kNegInf) stats.dot += stats.mass * static_cast<double>(block_max - s.max);
      s.Raise(block_max, 0.0f, 0.0f);  // the elements at the new max are counted below
      stats.max_begin = begin;
    }
    const float shift = s.Shift();
    const bool count_at_max = std::isfinite(s.max);
    // dot and mass add up C terms of either size (the smoothing term of a row is ~ eps times the
    // mean of M - z over C classes): summed in double, so that their float32 rounding stays that
    // of one result whatever the summation order.
    float block_count = 0.0f, block_rest = 0.0f;
    double block_dot = 0.0, block_mass = 0.0;
#pragma omp simd reduction(+ : block_count, block_rest, block_dot, block_mass)
    for (int64_t c = begin; c < end; ++c) {
      const float z = map(ToFloat(row[c]));
      float v = kWeighted ? weight[c] : 1.0f;
      v *= kSoft ? alpha * ToFloat(target_row[c]) + beta : beta;
      const bool at_max = count_at_max && z == shift;
      block_count += at_max ? 1.0f : 0.0f;
      block_rest += at_max ? 0.0f : FastExp(z - shift);
      block_dot += static_cast<double>(v) * static_cast<double>(shift - z);
      block_mass += static_cast<double>(v);
    }
    s.count += block_count;
    s.rest += block_rest;
    stats.dot += block_dot;
    stats.mass += block_mass;
  }
  return stats;
}

// The split log-sum-exp of a row read once (FoldBlockSingleRead).
template <typename T, typename Map>
RowStats SingleReadRow(const T *row, int64_t C, const Map &map) {
  RowStats stats{SplitSum{}, 0.0, 0.0, 0};
  for (int64_t begin = 0; begin < C; begin += kBlock) {
    const int64_t end = begin + kBlock < C ? begin + kBlock : C;
    if (FoldBlockSingleRead(stats.sum, row, begin, end, map)) stats.max_begin = begin;
  }
  return stats;
}

// Rows of up to this many classes are summed in two passes (TwoPassRow), longer ones read once,
// block by block (SingleReadRow). The two-pass exp loop also counts the elements at the max
// (a compare and a masked add per 16 elements more than SingleReadRow's usual pass), which pays
// off while SingleReadRow's repeated blocks are a large share of the row: single-threaded forward
// over L3-resident logits, two-pass against single-read, C = 8080: -14% (bfloat16) and -22%
// (float32); C = 16384: +1% and -5%; C = 32000: +4% and -9%; C = 65536: +21% and +24%.
constexpr int64_t kTwoPassMaxClasses = 4 * kBlock;

// The split log-sum-exp of a row in two passes: its max, streamed from memory (a light loop that
// keeps up with memory), then the sum at that max (SumExpAtOwnMaxSplit) read back from L1/L2 while
// the same elements of next_row (optional) are prefetched into L2, so the exp pass, the heavy
// one, overlaps the next row's memory traffic. Exactly one exp per element, where SingleReadRow
// sums a block again each time it raises the running max (about ln(C / 2048) times a row for
// random logits: 27% more exps at C = 8080).
template <typename T, typename Map>
RowStats TwoPassRow(const T *row, int64_t C, const T *next_row, const Map &map) {
  RowStats stats{SplitSum{}, 0.0, 0.0, 0};
  const float max = BlockMax(row, 0, C, map);
  if (!std::isfinite(max)) {
    float count;
    const float rest = SumExpAtOwnMaxSplit(row, 0, C, max, &count, map);
    stats.sum.Raise(max, count, rest);
    return stats;
  }
  // Summed block by block (block sums added in float32), as SingleReadRow does: fewer terms per
  // float32 lane keep the rounding of a small rest (a confident row) at SingleReadRow's level.
  float count = 0.0f, rest = 0.0f;
  for (int64_t begin = 0; begin < C; begin += kBlock) {
    const int64_t end = begin + kBlock < C ? begin + kBlock : C;
    float block_count;
    rest += SumExpAtMaxSplitPrefetching(row, begin, end, max, &block_count, next_row, map);
    count += block_count;
  }
  stats.sum.Raise(max, count, rest);
  return stats;
}

// The split log-sum-exp of row n of x[N, C], by whichever of the two methods above suits C.
template <typename T, typename Map>
RowStats RowLogSumExp(const T *x, int64_t n, int64_t N, int64_t C, const Map &map) {
  const T *row = x + n * C;
  if (C > kTwoPassMaxClasses) return SingleReadRow(row, C, map);
  return TwoPassRow(row, C, n + 1 < N ? row + C : nullptr, map);
}

// Optional third kind of forward output after the per-row values.
enum class ForwardExtra { kNone, kLogProb, kArgmax };

// Where the forward kernels write; log_prob (dtype of x) or argmax (int32 / int64) as requested.
struct ForwardOutputs {
  float *loss_rows;
  float *lse;
  float *row_weight;  // class targets only
  float *row_max;
  float *row_log_sum;
  void *log_prob;
  void *argmax;
  bool argmax_int64;
};

// lse, the backward state, and the optional outputs of row n.
template <typename T, typename Map>
void WriteRowState(const ForwardOutputs &out, int64_t n, const T *row, int64_t C,
                   const RowStats &stats, const Map &map) {
  const float shift = stats.sum.Shift();
  const float log_sum = stats.sum.LogSum();
  out.row_max[n] = shift;
  out.row_log_sum[n] = log_sum;
  out.lse[n] = shift + log_sum;
  if (out.log_prob) {
    T *log_prob = static_cast<T *>(out.log_prob) + n * C;
    for (int64_t c = 0; c < C; ++c) log_prob[c] = FromFloat<T>((map(ToFloat(row[c])) - shift) - log_sum);
  }
  if (out.argmax) {
    const int64_t index = RowArgmax(row, C, stats.sum, log_sum, stats.max_begin, map);
    if (out.argmax_int64) {
      static_cast<int64_t *>(out.argmax)[n] = index;
    } else {
      static_cast<int32_t *>(out.argmax)[n] = static_cast<int32_t>(index);
    }
  }
}

// Gradients at least this large are written with streaming stores: far larger than the caches,
// so the stores skip reading the destination lines first (3 -> 2 bytes of memory traffic per byte
// of gradient). Backward measured here (scripts/bench_kernels.py): float32 8192 x 32000
// 78 -> 57 ms; bfloat16 2048 x 128256 40.5 -> 30.5 ms, 4096 x 151936 96 -> 70 ms. Smaller
// gradients stay cacheable for the next op to read.
constexpr int64_t kStreamingStoreBytes = int64_t{64} << 20;

// ---- class-index targets ------------------------------------------------------------------

template <typename T, typename Index, bool kWeighted, typename Map>
int HardForward(const CrossEntropyAttrs &attrs, const Map &map, int64_t N, int64_t C, const T *x,
                const Index *target, const float *weight, const ForwardOutputs &out) {
  if (const int status = CheckWeights<kWeighted>(weight, C); status != kOk) return status;
  const float eps = attrs.label_smoothing;
  const float smooth = eps / static_cast<float>(C);
  std::atomic<int64_t> bad_row{-1};
#pragma omp parallel for schedule(static) if (N * C > 32768)
  for (int64_t n = 0; n < N; ++n) {
    const T *row = x + n * C;
    const int64_t y = static_cast<int64_t>(target[n]);
    const bool ignored = y == attrs.ignore_index;
    if (!ignored && !IsValidTarget(y, C)) bad_row.store(n);
    const bool counted = !ignored && IsValidTarget(y, C);
    const bool smoothing = eps > 0.0f && counted;
    const RowStats stats = smoothing ? StreamRow<T, kWeighted, false>(row, C, weight, nullptr, 0.0f, smooth, map)
                                     : RowLogSumExp(x, n, N, C, map);
    WriteRowState(out, n, row, C, stats, map);
    if (!counted) {
      out.loss_rows[n] = 0.0f;
      out.row_weight[n] = 0.0f;
      continue;
    }
    const float w_y = kWeighted ? weight[y] : 1.0f;
    const float shift = stats.sum.Shift();
    const float log_sum = stats.sum.LogSum();
    float loss = (1.0f - eps) * w_y * ((shift - map(ToFloat(row[y]))) + log_sum);
    // (eps/C) (W L + sum_c w[c] (M - z[c])), with (eps/C) folded into v = mass and dot.
    if (smoothing) loss += static_cast<float>(stats.mass * log_sum + stats.dot);
    out.loss_rows[n] = loss;
    out.row_weight[n] = w_y;
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

template <typename T, typename Index, bool kWeighted, typename Map>
int HardBackward(const CrossEntropyAttrs &attrs, const Map &map, int64_t N, int64_t C, const T *x,
                 const Index *target, const float *weight, const float *shift_max,
                 const float *shift_log_sum, const float *row_grad, const float *row_grad_lse,
                 T *grad) {
  if (const int status = CheckWeights<kWeighted>(weight, C); status != kOk) return status;
  const float eps = attrs.label_smoothing;
  const bool smoothing = eps > 0.0f;
  const float smooth = eps / static_cast<float>(C);
  const float smooth_total = smoothing ? SmoothedWeightSum(weight, C, kWeighted, eps) : 0.0f;
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
    const float m = shift_max[n], log_sum = shift_log_sum[n];
    const float w_y = counted ? (kWeighted ? weight[y] : 1.0f) : 0.0f;
    const float target_coef = a * (1.0f - eps) * w_y;
    const float k_rest = smoothing ? a * smooth_total + b : b;  // K'
    const float l = smoothing ? a * smooth : 0.0f;
    WriteGradRow(row, C, m, log_sum, target_coef + k_rest, l, smoothing && kWeighted ? weight : nullptr,
                 out, stream, map);
    if (counted) {
      // The true-class term in float32 with p[y] - 1 = expm1(d): its digits survive a confident
      // row (p[y] ~ 1) and the rounding of out[y] in a half type.
      const float z_y = map(ToFloat(row[y]));
      const float d = (z_y - m) - log_sum;
      const float smoothing_term = smoothing ? l * w_y : 0.0f;
      out[y] = FromFloat<T>((target_coef * std::expm1(d) + std::exp(d) * k_rest - smoothing_term) *
                            map.Slope(z_y));
    }
  }
  return bad_row.load() >= 0 ? kTargetOutOfRange : kOk;
}

// ---- probability (soft) targets --------------------------------------------------------------

template <typename T, bool kWeighted, typename Map>
int SoftForward(const CrossEntropyAttrs &attrs, const Map &map, int64_t N, int64_t C, const T *x,
                const T *target, const float *weight, const ForwardOutputs &out) {
  if (const int status = CheckWeights<kWeighted>(weight, C); status != kOk) return status;
  const float alpha = 1.0f - attrs.label_smoothing;
  const float beta = attrs.label_smoothing / static_cast<float>(C);
#pragma omp parallel for schedule(static) if (N * C > 32768)
  for (int64_t n = 0; n < N; ++n) {
    const T *row = x + n * C;
    const RowStats stats = StreamRow<T, kWeighted, true>(row, C, weight, target + n * C, alpha, beta, map);
    WriteRowState(out, n, row, C, stats, map);
    // l_n = S L + sum_c v[c] (M - z[c])
    out.loss_rows[n] = static_cast<float>(stats.mass * stats.sum.LogSum() + stats.dot);
  }
  return kOk;
}

template <typename T, bool kWeighted, typename Map>
int SoftBackward(const CrossEntropyAttrs &attrs, const Map &map, int64_t N, int64_t C, const T *x,
                 const T *target, const float *weight, const float *shift_max,
                 const float *shift_log_sum, const float *row_grad, const float *row_grad_lse,
                 T *grad, T *grad_target) {
  if (const int status = CheckWeights<kWeighted>(weight, C); status != kOk) return status;
  const float alpha = 1.0f - attrs.label_smoothing;
  const float beta = attrs.label_smoothing / static_cast<float>(C);
#pragma omp parallel for schedule(static) if (N * C > 32768)
  for (int64_t n = 0; n < N; ++n) {
    const T *row = x + n * C;
    const T *t = target + n * C;
    T *out = grad + n * C;
    T *out_target = grad_target ? grad_target + n * C : nullptr;
    const float a = row_grad[n];
    const float b = row_grad_lse[n];
    if (a == 0.0f && b == 0.0f) {
      for (int64_t c = 0; c < C; ++c) out[c] = FromFloat<T>(0.0f);
    }
    if (a == 0.0f && out_target) {
      // The targets enter the loss only through a_n l_n.
      for (int64_t c = 0; c < C; ++c) out_target[c] = FromFloat<T>(0.0f);
    }
    if (a == 0.0f && b == 0.0f) continue;
    float mass = 0.0f;
#pragma omp simd reduction(+ : mass)
    for (int64_t c = 0; c < C; ++c) {
      mass += (kWeighted ? weight[c] : 1.0f) * (alpha * ToFloat(t[c]) + beta);
    }
    const float k = a * mass + b;
    const float m = shift_max[n], log_sum = shift_log_sum[n];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float z = map(ToFloat(row[c]));
      const float p = FastExp((z - m) - log_sum);
      const float v = (kWeighted ? weight[c] : 1.0f) * (alpha * ToFloat(t[c]) + beta);
      out[c] = FromFloat<T>((p * k - a * v) * map.Slope(z));
    }
    if (a != 0.0f && out_target) {
      const float coef = -a * alpha;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float log_p = (map(ToFloat(row[c])) - m) - log_sum;
        out_target[c] = FromFloat<T>(coef * (kWeighted ? weight[c] : 1.0f) * log_p);
      }
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

// All of params [first, last) are float32 [N].
bool AreFloatRows(int *ndims, int64_t **shapes, const char **dtypes, int first, int last, int64_t N) {
  for (int i = first; i < last; ++i) {
    if (!IsRowVector(ndims, shapes, i, N) || ParseDType(dtypes[i]) != DType::kFloat32) return false;
  }
  return true;
}

// Output shapes of the forward kernels: `rows` float32 [N] vectors, then log_prob [N, C] or the
// argmax [N]; {-2} (unknown rank) while the rank of x is unknown.
std::vector<std::vector<int64_t>> RowOutputs(int *ndims, int64_t **shapes, int rows, ForwardExtra extra) {
  const bool known = ndims[0] == 2;
  const std::vector<int64_t> row_shape = known ? std::vector<int64_t>{shapes[0][0]} : std::vector<int64_t>{-2};
  std::vector<std::vector<int64_t>> out(rows, row_shape);
  if (extra == ForwardExtra::kLogProb) {
    out.push_back(known ? std::vector<int64_t>{shapes[0][0], shapes[0][1]} : row_shape);
  } else if (extra == ForwardExtra::kArgmax) {
    out.push_back(row_shape);
  }
  return out;
}

std::vector<int64_t> SameShape(int *ndims, int64_t **shapes) {
  return std::vector<int64_t>(shapes[0], shapes[0] + ndims[0]);
}

// Runs fn(map) with the logit map the attributes select.
template <typename Fn>
int DispatchMap(const CrossEntropyAttrs &attrs, Fn &&fn) {
  if (attrs.logit_softcap > 0.0f) return fn(SoftcapMap(attrs.logit_scale, attrs.logit_softcap));
  if (attrs.logit_scale != 1.0f) return fn(ScaleMap{attrs.logit_scale});
  return fn(IdentityMap{});
}

// Runs fn(T *, Index *, weighted, map) with typed null pointers for the dtypes of x and of the
// class indices, std::true_type / std::false_type for attrs.weighted, and the logit map.
template <typename Fn>
int DispatchClassTargets(const char **dtypes, const CrossEntropyAttrs &attrs, Fn &&fn) {
  return DispatchFloat(dtypes[0], [&](auto *tag) {
    return DispatchIndex(dtypes[1], [&](auto *index_tag) {
      return DispatchMap(attrs, [&](const auto &map) {
        return attrs.weighted ? fn(tag, index_tag, std::true_type{}, map)
                              : fn(tag, index_tag, std::false_type{}, map);
      });
    });
  });
}

// Same for probability targets (same dtype as x): fn(T *, weighted, map).
template <typename Fn>
int DispatchSoftTargets(const char **dtypes, const CrossEntropyAttrs &attrs, Fn &&fn) {
  return DispatchFloat(dtypes[0], [&](auto *tag) {
    return DispatchMap(attrs, [&](const auto &map) {
      return attrs.weighted ? fn(tag, std::true_type{}, map) : fn(tag, std::false_type{}, map);
    });
  });
}

// The forward outputs from params[first...]: `rows` float32 [N] vectors (loss_rows, lse,
// [row_weight,] row_max, row_log_sum) then the extra output. False on a malformed call.
bool ForwardOutputsOf(void **params, int *ndims, int64_t **shapes, const char **dtypes, int first,
                      bool with_row_weight, ForwardExtra extra, int64_t N, int64_t C,
                      ForwardOutputs *out) {
  const int rows = with_row_weight ? 5 : 4;
  if (!AreFloatRows(ndims, shapes, dtypes, first, first + rows, N)) return false;
  float *const *p = reinterpret_cast<float *const *>(params + first);
  int i = 0;
  out->loss_rows = p[i++];
  out->lse = p[i++];
  out->row_weight = with_row_weight ? p[i++] : nullptr;
  out->row_max = p[i++];
  out->row_log_sum = p[i++];
  out->log_prob = nullptr;
  out->argmax = nullptr;
  out->argmax_int64 = false;
  const int last = first + rows;
  if (extra == ForwardExtra::kLogProb) {
    if (!IsMatrix(ndims, shapes, last, N, C) || std::strcmp(dtypes[last], dtypes[0]) != 0) return false;
    out->log_prob = params[last];
  } else if (extra == ForwardExtra::kArgmax) {
    const DType index = ParseDType(dtypes[last]);
    if (!IsRowVector(ndims, shapes, last, N) || (index != DType::kInt32 && index != DType::kInt64)) {
      return false;
    }
    out->argmax = params[last];
    out->argmax_int64 = index == DType::kInt64;
  }
  return true;
}

int ExtraCount(ForwardExtra extra) { return extra == ForwardExtra::kNone ? 0 : 1; }

// Class targets. inputs: x[N,C], target[N], weight[C]; outputs: loss_rows, lse, row_weight,
// row_max, row_log_sum (float32 [N]), then log_prob[N,C] (dtype of x) or argmax[N] (int32/int64).
template <ForwardExtra kExtra>
int HardForwardEntry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                     void *extra) {
  if (nparam != 8 + ExtraCount(kExtra) || ndims[0] != 2) return kBadArguments;
  const int64_t N = shapes[0][0], C = shapes[0][1];
  if (!IsRowVector(ndims, shapes, 1, N) || !IsRowVector(ndims, shapes, 2, C)) return kBadArguments;
  ForwardOutputs out;
  if (!ForwardOutputsOf(params, ndims, shapes, dtypes, 3, true, kExtra, N, C, &out)) return kBadArguments;
  const auto &attrs = KernelAttrs<CrossEntropyAttrs>(extra);
  return DispatchClassTargets(dtypes, attrs, [&](auto *tag, auto *index_tag, auto weighted, const auto &map) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Index = std::remove_pointer_t<decltype(index_tag)>;
    return HardForward<T, Index, decltype(weighted)::value>(
        attrs, map, N, C, static_cast<const T *>(params[0]), static_cast<const Index *>(params[1]),
        static_cast<const float *>(params[2]), out);
  });
}

// inputs: x[N,C] (logits or log-probabilities), target[N], weight[C], shift_max[N],
// shift_log_sum[N], row_grad[N], row_grad_lse[N]; output: grad[N,C] (dtype of x).
int HardBackwardEntry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                      void *extra) {
  if (nparam != 8 || ndims[0] != 2) return kBadArguments;
  const int64_t N = shapes[0][0], C = shapes[0][1];
  if (!IsRowVector(ndims, shapes, 1, N) || !IsRowVector(ndims, shapes, 2, C) ||
      !AreFloatRows(ndims, shapes, dtypes, 3, 7, N) || !IsMatrix(ndims, shapes, 7, N, C) ||
      std::strcmp(dtypes[7], dtypes[0]) != 0) {
    return kBadArguments;
  }
  const auto &attrs = KernelAttrs<CrossEntropyAttrs>(extra);
  return DispatchClassTargets(dtypes, attrs, [&](auto *tag, auto *index_tag, auto weighted, const auto &map) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Index = std::remove_pointer_t<decltype(index_tag)>;
    return HardBackward<T, Index, decltype(weighted)::value>(
        attrs, map, N, C, static_cast<const T *>(params[0]), static_cast<const Index *>(params[1]),
        static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
        static_cast<const float *>(params[4]), static_cast<const float *>(params[5]),
        static_cast<const float *>(params[6]), static_cast<T *>(params[7]));
  });
}

// Soft targets. inputs: x[N,C], t[N,C] (dtype of x), weight[C]; outputs: loss_rows, lse, row_max,
// row_log_sum (float32 [N]), then log_prob[N,C] or argmax[N].
template <ForwardExtra kExtra>
int SoftForwardEntry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                     void *extra) {
  if (nparam != 7 + ExtraCount(kExtra) || ndims[0] != 2) return kBadArguments;
  const int64_t N = shapes[0][0], C = shapes[0][1];
  if (!IsMatrix(ndims, shapes, 1, N, C) || !IsRowVector(ndims, shapes, 2, C)) return kBadArguments;
  if (std::strcmp(dtypes[0], dtypes[1]) != 0) return kBadArguments;
  ForwardOutputs out;
  if (!ForwardOutputsOf(params, ndims, shapes, dtypes, 3, false, kExtra, N, C, &out)) return kBadArguments;
  const auto &attrs = KernelAttrs<CrossEntropyAttrs>(extra);
  return DispatchSoftTargets(dtypes, attrs, [&](auto *tag, auto weighted, const auto &map) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return SoftForward<T, decltype(weighted)::value>(
        attrs, map, N, C, static_cast<const T *>(params[0]), static_cast<const T *>(params[1]),
        static_cast<const float *>(params[2]), out);
  });
}

// inputs: x[N,C], t[N,C], weight[C], shift_max[N], shift_log_sum[N], row_grad[N],
// row_grad_lse[N]; outputs: grad[N,C], and with kWithTarget grad_target[N,C] (dtype of x).
template <bool kWithTarget>
int SoftBackwardEntry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                      void *extra) {
  if (nparam != (kWithTarget ? 9 : 8) || ndims[0] != 2) return kBadArguments;
  const int64_t N = shapes[0][0], C = shapes[0][1];
  if (!IsMatrix(ndims, shapes, 1, N, C) || !IsRowVector(ndims, shapes, 2, C) ||
      !AreFloatRows(ndims, shapes, dtypes, 3, 7, N)) {
    return kBadArguments;
  }
  for (int i = 7; i < nparam; ++i) {
    if (!IsMatrix(ndims, shapes, i, N, C) || std::strcmp(dtypes[i], dtypes[0]) != 0) return kBadArguments;
  }
  if (std::strcmp(dtypes[0], dtypes[1]) != 0) return kBadArguments;
  const auto &attrs = KernelAttrs<CrossEntropyAttrs>(extra);
  return DispatchSoftTargets(dtypes, attrs, [&](auto *tag, auto weighted, const auto &map) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return SoftBackward<T, decltype(weighted)::value>(
        attrs, map, N, C, static_cast<const T *>(params[0]), static_cast<const T *>(params[1]),
        static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
        static_cast<const float *>(params[4]), static_cast<const float *>(params[5]),
        static_cast<const float *>(params[6]), static_cast<T *>(params[7]),
        kWithTarget ? static_cast<T *>(params[8]) : nullptr);
  });
}

}  // namespace
}  // namespace ms_xent

// ---- exported symbols: <Name>, <Name>Init (attributes), <Name>InferShape -------------------------

using ms_xent::ForwardExtra;
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

#define MS_XENT_FORWARD_KERNEL(Name, Entry, Rows, Extra)                                            \
  MS_XENT_AOT_KERNEL(Name, Entry<Extra>)                                                            \
  extern "C" std::vector<std::vector<int64_t>> Name##InferShape(int *ndims, int64_t **shapes,       \
                                                                AotExtra *) {                       \
    return RowOutputs(ndims, shapes, Rows, Extra);                                                  \
  }

#define MS_XENT_BACKWARD_KERNEL(Name, Entry)                                                        \
  MS_XENT_AOT_KERNEL(Name, Entry)                                                                   \
  extern "C" std::vector<int64_t> Name##InferShape(int *ndims, int64_t **shapes, AotExtra *) {      \
    return SameShape(ndims, shapes);                                                                \
  }

MS_XENT_FORWARD_KERNEL(XentHardForward, HardForwardEntry, 5, ForwardExtra::kNone)
MS_XENT_FORWARD_KERNEL(XentHardForwardLogProb, HardForwardEntry, 5, ForwardExtra::kLogProb)
MS_XENT_FORWARD_KERNEL(XentHardForwardArgmax, HardForwardEntry, 5, ForwardExtra::kArgmax)
MS_XENT_FORWARD_KERNEL(XentSoftForward, SoftForwardEntry, 4, ForwardExtra::kNone)
MS_XENT_FORWARD_KERNEL(XentSoftForwardLogProb, SoftForwardEntry, 4, ForwardExtra::kLogProb)
MS_XENT_FORWARD_KERNEL(XentSoftForwardArgmax, SoftForwardEntry, 4, ForwardExtra::kArgmax)
MS_XENT_BACKWARD_KERNEL(XentHardBackward, HardBackwardEntry)
MS_XENT_BACKWARD_KERNEL(XentSoftBackward, SoftBackwardEntry<false>)

// Two outputs (grad, grad_target), both of the shape of x.
MS_XENT_AOT_KERNEL(XentSoftBackwardTarget, SoftBackwardEntry<true>)
extern "C" std::vector<std::vector<int64_t>> XentSoftBackwardTargetInferShape(int *ndims, int64_t **shapes,
                                                                             AotExtra *) {
  return {SameShape(ndims, shapes), SameShape(ndims, shapes)};
}
