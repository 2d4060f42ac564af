// Fused linear + cross-entropy for MindSpore `ops.Custom(func_type="aot")` on CPU: the loss of
// the logits hidden @ weight^T (+ bias), and its gradients w.r.t. hidden, weight and bias, without
// ever holding the [N, V] logits. The matrix products go through oneDNN (onednn_gemm.h).
//
// Notation (all arithmetic in float32): hidden h [N, H], weight W [V, H], bias b [V],
// s = logit scale, cap = logit softcap (0: none), per row n: y = target[n],
// m_n = 1{y != ignore_index}, a_n = row_coef[n], c_n = z_coef[n] (the caller folds the
// reduction, the input mask and the "mean" denominator into them), class weights w (ones when
// absent), W_tot = sum_v w[v], eps = label smoothing.
//   z = s (h W^T + b)                    pre-softcap logits
//   x = cap tanh(z / cap)  (x = z when cap = 0)
//   lse_n = log sum_v exp(x[n, v])
//   l_n = m_n ((1-eps) w[y] (lse_n - x[n, y]) + (eps/V) sum_v w[v] (lse_n - x[n, v]))
//   value_n = a_n l_n + c_n lse_n^2        (the c_n term is exactly 0 when c_n = 0)
// The "sum" kernel returns sum_n value_n and its gradients; the "rows" kernel returns value_n.
//
// Gradients (p[n, v] = exp(x[n, v] - lse_n); see cross_entropy_kernel.cc for dl/dx):
//   dvalue_n/dx[n, v] = p K_n - a_n (eps/V) w[v] - 1{v = y} a_n (1-eps) w[y],
//     K_n = a_n ((1-eps) w[y] + (eps/V) W_tot) + 2 c_n lse_n
//   g = dL/dz = dL/dx * (1 - (x / cap)^2)           (d tanh(t)/dt = 1 - tanh(t)^2)
//   dL/dh = s g W,   dL/dW = s g^T h,   dL/db = s sum_n g[n, :]
//
// Loop order. The vocabulary is processed in blocks [v0, v1) of all N rows, so that only the
// [N, block] logits of one block exist at a time:
//   pass 1, per block: x = logits of the block (product 1); per row, fold the block into a
//     running log-sum-exp, pick x[n, y], and add sum_v w[v] x[n, v] (label smoothing).
//     -> lse_n and value_n.
//   pass 2 (gradients only), per block: recompute x (product 2), g in place, dL/db of the
//     block, dL/dW[v0:v1] = s g^T h (product 3, written once: nothing accumulates over V x H),
//     dL/dh += s g W[v0:v1] (product 4, into an [N, H] float32 accumulator).
// Four products instead of the unfused path's three, but on oneDNN's kernels on every core, and
// the only buffers besides the gradients are one block of logits and, for half types, the
// float32 [N, H] accumulator of dL/dh.
//
// dtypes: float32 products for float32 inputs; bfloat16 products (float32 accumulation) for
// bfloat16 inputs, with g rounded to bfloat16 as the operand of products 3 and 4 (as the unfused
// path's bfloat16 logits gradient is); float16 inputs are converted to float32 operands (a
// float32 copy of h, and of one block of W at a time). Gradients are returned in the input dtype.
//
// A target outside [0, V) that is not ignore_index is treated as ignored and makes the kernel
// return kTargetOutOfRange (it is never used as an index).

#include <omp.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "aot_abi.h"
#include "dtype_dispatch.h"
#include "onednn_gemm.h"
#include "row_kernels.h"
#include "vec_math.h"

namespace ms_xent {
namespace {

struct LinearAttrs : public AotKernelData {
  int64_t ignore_index = -100;
  float label_smoothing = 0.0f;
  bool weighted = false;
  bool has_bias = false;
  float logit_softcap = 0.0f;
  float logit_scale = 1.0f;
  int64_t vocab_block = 1;
  const OneDnnGemm *gemm = nullptr;
};

int ReadLinearAttrs(AotExtra *extra) {
  auto *attrs = new LinearAttrs;
  attrs->ignore_index = extra->Attr<int64_t>("ignore_index");
  attrs->label_smoothing = extra->Attr<float>("label_smoothing");
  attrs->weighted = extra->Attr<bool>("weighted");
  attrs->has_bias = extra->Attr<bool>("has_bias");
  attrs->logit_softcap = extra->Attr<float>("logit_softcap");
  attrs->logit_scale = extra->Attr<float>("logit_scale");
  attrs->vocab_block = extra->Attr<int64_t>("vocab_block");
  attrs->gemm = LoadOneDnnGemm(extra->Attr<std::string>("gemm_library"));
  extra->SetKernelData(attrs);
  return kOk;
}

// 64-byte-aligned scratch buffer of `count` elements (none when count is 0).
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t count)
      : count_(count),
        data_(count > 0 ? static_cast<T *>(std::aligned_alloc(
                              64, (count * static_cast<int64_t>(sizeof(T)) + 63) / 64 * 64))
                        : nullptr) {}
  ~Scratch() { std::free(data_); }
  Scratch(const Scratch &) = delete;
  Scratch &operator=(const Scratch &) = delete;
  T *get() const { return data_; }
  bool allocated() const { return count_ == 0 || data_ != nullptr; }

 private:
  int64_t count_;
  T *data_;
};

// Operand type of the products for input type T.
template <typename T>
using GemmOperand = std::conditional_t<std::is_same_v<T, BFloat16>, BFloat16, float>;

template <typename From, typename To>
void ConvertRows(const From *src, To *dst, int64_t count) {
#pragma omp parallel for schedule(static) if (count > 65536)
  for (int64_t i = 0; i < count; ++i) dst[i] = FromFloat<To>(ToFloat(src[i]));
}

// Per-row state of the log-sum-exp and the loss terms, folded block by block.
struct RowState {
  float max = -std::numeric_limits<float>::infinity();
  float sum_exp = 0.0f;       // sum exp(x - max) over the blocks seen
  float target_logit = 0.0f;  // x[n, y]
  float ref = 0.0f;           // first block's max: the smoothing sum is taken about it
  float dot = 0.0f;           // sum_v w[v] (x[n, v] - ref)
};

// Rows per OpenMP task in the per-row loops over a block (dynamic, for the reason given at
// kSlicesPerThread in onednn_gemm.h).
constexpr int64_t kRowsPerTask = 64;

template <typename T, typename Index, bool kWeighted>
class LinearCrossEntropy {
 public:
  using G = GemmOperand<T>;

  LinearCrossEntropy(const LinearAttrs &attrs, int64_t N, int64_t H, int64_t V, const T *hidden,
                     const T *weight, const T *bias, const Index *target,
                     const float *class_weight, const float *row_coef, const float *z_coef)
      : attrs_(attrs), N_(N), H_(H), V_(V),
        block_(attrs.vocab_block < 1 ? 1 : (attrs.vocab_block < V ? attrs.vocab_block : V)),
        hidden_(hidden), weight_(weight), bias_(bias), target_(target),
        class_weight_(class_weight), row_coef_(row_coef), z_coef_(z_coef),
        eps_(attrs.label_smoothing), smooth_(attrs.label_smoothing / static_cast<float>(V)),
        total_weight_(SumWeights(class_weight, V, kWeighted)),
        logits_(N * block_),
        hidden_f32_(std::is_same_v<T, _Float16> ? N * H : 0),
        weight_f32_(std::is_same_v<T, _Float16> ? block_ * H : 0),
        rows_(N), lse_(N) {}

  // Pass 1: lse_n, and value_n into `values` (when not null). Returns a kernel status.
  int Forward(float *values) {
    if (N_ == 0) return kOk;
    if (int status = Prepare(); status != kOk) return status;
    for (int64_t v0 = 0; v0 < V_; v0 += block_) {
      const int64_t width = v0 + block_ < V_ ? block_ : V_ - v0;
      if (int status = LogitsBlock(v0, width, WeightOperand(v0, width)); status != kOk) {
        return status;
      }
#pragma omp parallel for schedule(dynamic, kRowsPerTask) if (N_ * width > 32768)
      for (int64_t n = 0; n < N_; ++n) FoldBlock(n, v0, width);
    }
    std::atomic<bool> bad_target{false};
#pragma omp parallel for schedule(static) if (N_ > 4096)
    for (int64_t n = 0; n < N_; ++n) {
      const RowState &row = rows_[n];
      const float lse = (row.max == -std::numeric_limits<float>::infinity() ? 0.0f : row.max) +
                        std::log(row.sum_exp);
      lse_[n] = lse;
      const int64_t y = static_cast<int64_t>(target_[n]);
      const bool ignored = y == attrs_.ignore_index;
      if (!ignored && !IsValidTarget(y, V_)) bad_target.store(true);
      float loss = 0.0f;
      if (Counted(n)) {
        loss = (1.0f - eps_) * ClassWeight(y) * (lse - row.target_logit);
        if (eps_ > 0.0f) loss += smooth_ * (total_weight_ * (lse - row.ref) - row.dot);
      }
      const float z_loss = z_coef_[n] != 0.0f ? z_coef_[n] * lse * lse : 0.0f;
      if (values) values[n] = row_coef_[n] * loss + z_loss;
    }
    if (bad_target.load()) {
      ReportBadTarget();
      return kTargetOutOfRange;
    }
    return kOk;
  }

  // Both passes: total = sum_n value_n (summed in double) and its gradients. Rows with an
  // out-of-range target count as ignored; the call then returns kTargetOutOfRange.
  int SumWithGradients(float *total, T *grad_hidden, T *grad_weight, T *grad_bias) {
    for (int64_t v = 0; v < V_; ++v) grad_bias[v] = FromFloat<T>(0.0f);
    if (N_ == 0) {
      *total = 0.0f;
      for (int64_t i = 0; i < V_ * H_; ++i) grad_weight[i] = FromFloat<T>(0.0f);
      return kOk;
    }
    std::vector<float> values(N_);
    const int status = Forward(values.data());
    if (status != kOk && status != kTargetOutOfRange) return status;
    double sum = 0.0;
    for (int64_t n = 0; n < N_; ++n) sum += values[n];
    *total = static_cast<float>(sum);
    const int grad_status = Backward(grad_hidden, grad_weight, grad_bias);
    return status != kOk ? status : grad_status;
  }

 private:
  // Pass 2 (after Forward): the gradients of sum_n value_n, in the input dtype.
  int Backward(T *grad_hidden, T *grad_weight, T *grad_bias) {
    constexpr bool kFloat = std::is_same_v<T, float>;
    Scratch<float> hidden_acc(kFloat ? 0 : N_ * H_);       // dL/dh in float32
    Scratch<float> weight_block(kFloat ? 0 : block_ * H_);  // dL/dW[v0:v1] in float32
    Scratch<G> grad_operand(std::is_same_v<G, float> ? 0 : N_ * block_);
    Scratch<float> bias_partial(attrs_.has_bias ? omp_get_max_threads() * block_ : 0);
    if (!hidden_acc.allocated() || !weight_block.allocated() || !grad_operand.allocated() ||
        !bias_partial.allocated()) {
      return ReportOutOfMemory();
    }
    float *dh = kFloat ? reinterpret_cast<float *>(grad_hidden) : hidden_acc.get();
    const float scale = attrs_.logit_scale;
    for (int64_t v0 = 0; v0 < V_; v0 += block_) {
      const int64_t width = v0 + block_ < V_ ? block_ : V_ - v0;
      const G *weight_rows = WeightOperand(v0, width);  // for both products of the block
      if (int status = LogitsBlock(v0, width, weight_rows); status != kOk) return status;
#pragma omp parallel for schedule(dynamic, kRowsPerTask) if (N_ * width > 32768)
      for (int64_t n = 0; n < N_; ++n) GradRow(n, v0, width);
      if (attrs_.has_bias) BiasGradBlock(bias_partial.get(), v0, width, grad_bias);
      const G *g = GradOperand(grad_operand.get(), N_ * width);
      // dL/dW[v0:v1] = s g^T h: [width, H], written once.
      float *dw = kFloat ? reinterpret_cast<float *>(grad_weight) + v0 * H_ : weight_block.get();
      int status = ParallelGemm(*attrs_.gemm, true, false, width, H_, N_, scale, g, width,
                                HiddenOperand(), H_, 0.0f, dw, H_);
      if (!kFloat) ConvertRows(dw, grad_weight + v0 * H_, width * H_);
      // dL/dh += s g W[v0:v1]: [N, H].
      status |= ParallelGemm(*attrs_.gemm, false, false, N_, H_, width, scale, g, width,
                             weight_rows, H_, v0 == 0 ? 0.0f : 1.0f, dh, H_);
      if (status != 0) return ReportGemmFailure(status);
    }
    if (!kFloat) ConvertRows(dh, grad_hidden, N_ * H_);
    return kOk;
  }

  float ClassWeight(int64_t v) const { return kWeighted ? class_weight_[v] : 1.0f; }

  bool Counted(int64_t n) const {
    const int64_t y = static_cast<int64_t>(target_[n]);
    return y != attrs_.ignore_index && IsValidTarget(y, V_);
  }

  int Prepare() {
    if (attrs_.gemm == nullptr) {
      MS_XENT_REPORT("linear_cross_entropy", "the oneDNN matrix-product library is not loaded");
      return kBadArguments;
    }
    if (!logits_.allocated() || !hidden_f32_.allocated() || !weight_f32_.allocated()) {
      return ReportOutOfMemory();
    }
    if constexpr (std::is_same_v<T, _Float16>) ConvertRows(hidden_, hidden_f32_.get(), N_ * H_);
    return kOk;
  }

  const G *HiddenOperand() const {
    if constexpr (std::is_same_v<T, _Float16>) {
      return hidden_f32_.get();
    } else {
      return hidden_;
    }
  }

  // g (the block buffer) as a product operand: the buffer itself for float32 products, else
  // rounded into `converted`.
  const G *GradOperand(G *converted, int64_t count) {
    if constexpr (std::is_same_v<G, float>) {
      return logits_.get();
    } else {
      ConvertRows(logits_.get(), converted, count);
      return converted;
    }
  }

  // Rows [v0, v0 + width) of W as a product operand (converted to float32 for float16).
  const G *WeightOperand(int64_t v0, int64_t width) {
    if constexpr (std::is_same_v<T, _Float16>) {
      ConvertRows(weight_ + v0 * H_, weight_f32_.get(), width * H_);
      return weight_f32_.get();
    } else {
      return weight_ + v0 * H_;
    }
  }

  // logits_[N, width] = x of the block: s h W[v0:v1]^T (+ s b), softcapped; weight_rows is
  // WeightOperand(v0, width).
  int LogitsBlock(int64_t v0, int64_t width, const G *weight_rows) {
    float *x = logits_.get();
    const int status = ParallelGemm(*attrs_.gemm, false, true, N_, width, H_,
                                    attrs_.logit_scale, HiddenOperand(), H_, weight_rows, H_,
                                    0.0f, x, width);
    if (status != 0) return ReportGemmFailure(status);
    const bool has_bias = attrs_.has_bias;
    const float cap = attrs_.logit_softcap;
    if (!has_bias && cap <= 0.0f) return kOk;
    const float scale = attrs_.logit_scale;
    const float inv_cap = cap > 0.0f ? 1.0f / cap : 0.0f;
#pragma omp parallel for schedule(dynamic, kRowsPerTask) if (N_ * width > 32768)
    for (int64_t n = 0; n < N_; ++n) {
      float *row = x + n * width;
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) {
        float z = row[c];
        if (has_bias) z += scale * ToFloat(bias_[v0 + c]);
        row[c] = cap > 0.0f ? cap * FastTanh(z * inv_cap) : z;
      }
    }
    return kOk;
  }

  // Folds row n of the block into its running log-sum-exp (as RowLogSumExp in
  // cross_entropy_kernel.cc, with every block that raises the max summed against its own max):
  //   block max m_B > m:  s = s exp(m - m_B) + sum_B exp(x - m_B),  m = m_B
  //   otherwise:          s = s + sum_B exp(x - m)
  // While every element seen is -inf (or NaN) the max is -inf and the block is summed against
  // its own max (SumExpAtOwnMax: 0 in place of -inf), which keeps NaN and gives exp(-inf) = 0.
  void FoldBlock(int64_t n, int64_t v0, int64_t width) {
    const float *row = logits_.get() + n * width;
    RowState &state = rows_[n];
    const float kNegInf = -std::numeric_limits<float>::infinity();
    const float block_max = BlockMax(row, 0, width);
    if (v0 == 0) state.ref = std::isfinite(block_max) ? block_max : 0.0f;
    if (state.max == kNegInf) {
      state.sum_exp += SumExpAtOwnMax(row, 0, width, block_max);
      state.max = block_max;
    } else if (block_max > state.max) {
      state.sum_exp = state.sum_exp * FastExp(state.max - block_max) + SumExpAtOwnMax(row, 0, width, block_max);
      state.max = block_max;
    } else {
      state.sum_exp += SumExp(row, 0, width, state.max);
    }
    if (!Counted(n)) return;
    const int64_t y = static_cast<int64_t>(target_[n]);
    if (y >= v0 && y < v0 + width) state.target_logit = row[y - v0];
    if (eps_ > 0.0f) {
      const float ref = state.ref;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < width; ++c) dot += ClassWeight(v0 + c) * (row[c] - ref);
      state.dot += dot;
    }
  }

  // Row n of the block: x -> g = dL/dz in place (exact zeros for rows with a_n m_n = 0 and
  // c_n = 0, even when their logits are not finite).
  void GradRow(int64_t n, int64_t v0, int64_t width) {
    float *row = logits_.get() + n * width;
    const bool counted = Counted(n);
    const float a = counted ? row_coef_[n] : 0.0f;
    const float lse = lse_[n];
    const float b = z_coef_[n] != 0.0f ? 2.0f * z_coef_[n] * lse : 0.0f;
    if (a == 0.0f && b == 0.0f) {
      for (int64_t c = 0; c < width; ++c) row[c] = 0.0f;
      return;
    }
    const int64_t y = static_cast<int64_t>(target_[n]);
    const float w_y = counted ? ClassWeight(y) : 0.0f;
    const float k = a * ((1.0f - eps_) * w_y + smooth_ * total_weight_) + b;
    const float l = a * smooth_;
    const float cap = attrs_.logit_softcap;
    const float inv_cap = cap > 0.0f ? 1.0f / cap : 0.0f;
    auto softcap_factor = [&](float x) {
      const float ratio = x * inv_cap;
      return cap > 0.0f ? 1.0f - ratio * ratio : 1.0f;
    };
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) {
      const float x = row[c];
      row[c] = (FastExp(x - lse) * k - l * ClassWeight(v0 + c)) * softcap_factor(x);
    }
    if (counted && y >= v0 && y < v0 + width) {
      // The true-class term, with p[y] - 1 formed before the softcap factor.
      const float x_y = rows_[n].target_logit;
      row[y - v0] = (FastExp(x_y - lse) * k - l * w_y - a * (1.0f - eps_) * w_y) *
                    softcap_factor(x_y);
    }
  }

  // dL/db[v0:v1] = s sum_n g[n, :]: each thread sums its rows, then the partial sums are added.
  void BiasGradBlock(float *partial, int64_t v0, int64_t width, T *grad_bias) {
    const float *g = logits_.get();
    const int threads = omp_get_max_threads();
    for (int64_t i = 0; i < threads * width; ++i) partial[i] = 0.0f;
#pragma omp parallel num_threads(threads)
    {
      float *mine = partial + omp_get_thread_num() * width;
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N_; ++n) {
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) mine[c] += g[n * width + c];
      }
    }
    for (int64_t c = 0; c < width; ++c) {
      float total = 0.0f;
      for (int t = 0; t < threads; ++t) total += partial[t * width + c];
      grad_bias[v0 + c] = FromFloat<T>(attrs_.logit_scale * total);
    }
  }

  void ReportBadTarget() const {
    for (int64_t n = 0; n < N_; ++n) {
      const int64_t y = static_cast<int64_t>(target_[n]);
      if (y != attrs_.ignore_index && !IsValidTarget(y, V_)) {
        MS_XENT_REPORT("linear_cross_entropy",
                       "target[%lld] = %lld is outside [0, %lld) and is not ignore_index (%lld)",
                       static_cast<long long>(n), static_cast<long long>(y),
                       static_cast<long long>(V_), static_cast<long long>(attrs_.ignore_index));
        return;
      }
    }
  }

  static int ReportOutOfMemory() {
    MS_XENT_REPORT("linear_cross_entropy", "out of memory for the block buffers");
    return kBadArguments;
  }

  static int ReportGemmFailure(int status) {
    MS_XENT_REPORT("linear_cross_entropy", "oneDNN matrix product failed (status %d)", status);
    return kBadArguments;
  }

  const LinearAttrs &attrs_;
  const int64_t N_, H_, V_, block_;
  const T *hidden_;
  const T *weight_;
  const T *bias_;
  const Index *target_;
  const float *class_weight_;
  const float *row_coef_;
  const float *z_coef_;
  const float eps_, smooth_, total_weight_;
  Scratch<float> logits_;      // [N, block]: x of the current block, then g in place
  Scratch<float> hidden_f32_;  // float16 inputs: h in float32
  Scratch<float> weight_f32_;  // float16 inputs: W[v0:v1] in float32
  std::vector<RowState> rows_;
  std::vector<float> lse_;
};

// Shapes: hidden [N, H], weight [V, H], bias [V], target [N], class_weight [V], row_coef [N],
// z_coef [N]. Returns false on any mismatch.
bool ReadShapes(int *ndims, int64_t **shapes, int64_t *N, int64_t *H, int64_t *V) {
  if (ndims[0] != 2 || ndims[1] != 2) return false;
  *N = shapes[0][0];
  *H = shapes[0][1];
  *V = shapes[1][0];
  auto is_vector = [&](int i, int64_t size) { return ndims[i] == 1 && shapes[i][0] == size; };
  return shapes[1][1] == *H && *V > 0 && is_vector(2, *V) && is_vector(3, *N) &&
         is_vector(4, *V) && is_vector(5, *N) && is_vector(6, *N);
}

constexpr int kLinearInputs = 7;

// Checks a call with `outputs` outputs and runs fn(op, T *) with the kernel object for the
// dtypes of hidden (T) and target, and the class-weight flag; kBadArguments for a malformed call.
template <typename Fn>
int WithLinearKernel(int nparam, int outputs, void **params, int *ndims, int64_t **shapes,
                     const char **dtypes, void *extra, Fn &&fn) {
  int64_t N, H, V;
  if (nparam != kLinearInputs + outputs || !ReadShapes(ndims, shapes, &N, &H, &V)) {
    return kBadArguments;
  }
  const auto &attrs = KernelAttrs<LinearAttrs>(extra);
  return DispatchFloat(dtypes[0], [&](auto *t) {
    return DispatchIndex(dtypes[3], [&](auto *index) {
      using T = std::remove_pointer_t<decltype(t)>;
      using Index = std::remove_pointer_t<decltype(index)>;
      auto run = [&](auto weighted) {
        LinearCrossEntropy<T, Index, decltype(weighted)::value> op(
            attrs, N, H, V, static_cast<const T *>(params[0]), static_cast<const T *>(params[1]),
            static_cast<const T *>(params[2]), static_cast<const Index *>(params[3]),
            static_cast<const float *>(params[4]), static_cast<const float *>(params[5]),
            static_cast<const float *>(params[6]));
        return fn(op, t);
      };
      return attrs.weighted ? run(std::true_type{}) : run(std::false_type{});
    });
  });
}

// inputs: hidden, weight, bias, target, class_weight, row_coef, z_coef;
// output: value[N] float32.
int RowsEntry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
              void *extra) {
  return WithLinearKernel(nparam, 1, params, ndims, shapes, dtypes, extra, [&](auto &op, auto *) {
    return op.Forward(static_cast<float *>(params[kLinearInputs]));
  });
}

// inputs as RowsEntry; outputs: total[1] float32 (sum_n value_n), grad_hidden [N, H],
// grad_weight [V, H], grad_bias [V] (dtype of hidden).
int SumGradEntry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                 void *extra) {
  return WithLinearKernel(nparam, 4, params, ndims, shapes, dtypes, extra, [&](auto &op, auto *t) {
    using T = std::remove_pointer_t<decltype(t)>;
    return op.SumWithGradients(static_cast<float *>(params[kLinearInputs]),
                               static_cast<T *>(params[kLinearInputs + 1]),
                               static_cast<T *>(params[kLinearInputs + 2]),
                               static_cast<T *>(params[kLinearInputs + 3]));
  });
}

}  // namespace
}  // namespace ms_xent

// ---- exported symbols ---------------------------------------------------------------------------

extern "C" int XentLinearRowsInit(int *, int64_t **, const char **, AotExtra *extra) {
  return ms_xent::ReadLinearAttrs(extra);
}
extern "C" int XentLinearRows(int nparam, void **params, int *ndims, int64_t **shapes,
                              const char **dtypes, void *, void *extra) {
  return ms_xent::RowsEntry(nparam, params, ndims, shapes, dtypes, extra);
}
extern "C" std::vector<int64_t> XentLinearRowsInferShape(int *ndims, int64_t **shapes, AotExtra *) {
  return {ndims[0] == 2 ? shapes[0][0] : -1};
}

extern "C" int XentLinearSumGradInit(int *, int64_t **, const char **, AotExtra *extra) {
  return ms_xent::ReadLinearAttrs(extra);
}
extern "C" int XentLinearSumGrad(int nparam, void **params, int *ndims, int64_t **shapes,
                                 const char **dtypes, void *, void *extra) {
  return ms_xent::SumGradEntry(nparam, params, ndims, shapes, dtypes, extra);
}
extern "C" std::vector<std::vector<int64_t>> XentLinearSumGradInferShape(int *ndims,
                                                                        int64_t **shapes,
                                                                        AotExtra *) {
  std::vector<int64_t> hidden(shapes[0], shapes[0] + ndims[0]);
  std::vector<int64_t> weight(shapes[1], shapes[1] + ndims[1]);
  std::vector<int64_t> bias(shapes[2], shapes[2] + ndims[2]);
  return {{1}, hidden, weight, bias};
}
