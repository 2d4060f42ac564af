// Fused linear + cross-entropy for MindSpore `ops.Custom(func_type="aot")` on CPU: the loss of
// the logits hidden @ weight^T (+ bias), and its gradients w.r.t. hidden, weight and bias, without
// ever holding the [N, V] logits. The matrix products go through oneDNN (onednn_gemm.h).
//
// Notation (all arithmetic in float32 unless said): hidden h [N, H], weight W [V, H], bias b [V],
// s = logit scale, cap = logit softcap (0: none), per row n: y = target[n],
// m_n = 1{y != ignore_index}, a_n = row_coef[n], c_n = z_coef[n] (the caller folds the
// reduction, the input mask and the "mean" denominator into them), class weights w (ones when
// absent), W_tot = sum_v w[v], eps = label smoothing.
//   z = s (h W^T + b)                    pre-softcap logits
//   x = cap tanh(z / cap)  (x = z when cap = 0)
//   M_n = max_v x[n, v],   lse_n = M_n + L_n,   L_n = log1p((k_n - 1) + sum_{v: x < M} exp(x - M))
//     (k_n elements equal the maximum: the split keeps the relative precision of a small L_n,
//     i.e. of confident rows, and never forms M_n + L_n where M_n is huge)
//   l_n = m_n ((1-eps) w[y] ((M_n - x[n, y]) + L_n) + (eps/V) (W_tot L_n + sum_v w[v] (M_n - x[n, v])))
//   value_n = a_n l_n + c_n lse_n^2        (the c_n term is exactly 0 when c_n = 0)
// The "sum" kernel returns sum_n value_n and its gradients; the "rows" kernel returns value_n.
// Both also return lse_n.
//
// Gradients (p[n, v] = exp(x[n, v] - M_n - L_n); see cross_entropy_kernel.cc for dl/dx):
//   dvalue_n/dx[n, v] = p K_n - a_n (eps/V) w[v] - 1{v = y} a_n (1-eps) w[y],
//     K_n = a_n ((1-eps) w[y] + (eps/V) W_tot) + 2 c_n lse_n
//   and at the target, with A = a_n (1-eps) w[y], the difference p_y K_n - A taken without
//   cancellation: -A (1 - p_y) + (K_n - A) p_y,  1 - p_y = -expm1(-((M_n - x[n, y]) + L_n)).
//   g = dL/dz = dL/dx * (1 - (x / cap)^2)           (d tanh(t)/dt = 1 - tanh(t)^2)
//   z[n, v] = s (sum_k h[n, k] W[v, k] + b[v]), so dz[n, v]/dh[n, k] = s W[v, k],
//   dz[n, v]/dW[v, k] = s h[n, k], dz[n, v]/db[v] = s, and by the chain rule
//   dL/dh = s g W,   dL/dW = s g^T h,   dL/db = s sum_n g[n, :]
//
// Loop order. The rows are processed in blocks [r0, r1) of R rows over the whole vocabulary, so
// that only the [R, V] logits of one row block exist at a time, and each block's logits are formed
// once:
//   x = logits of the block (product 1); per row, M_n, L_n, l_n, and (gradients) g in place;
//   dL/dh[r0:r1] = s g W (product 2, written once);
//   dL/dW += s g^T h[r0:r1] (product 3, accumulated in float32 over the row blocks, see below);
//   dL/db accumulated in float32.
// Three products, as the unfused path (logits, d hidden, d weight), on oneDNN's kernels on every
// core. Each row block streams W twice (products 1 and 2) and reads and writes the [V, H]
// accumulator of dL/dW once (product 3), so R trades memory (the [R, V] block) against that
// traffic; the caller chooses R.
//
// dtypes: float32 products for float32 inputs; bfloat16 products (float32 accumulation) for
// bfloat16 inputs, with g rounded to bfloat16 as the operand of products 2 and 3 (as the unfused
// path's bfloat16 logits gradient is; stored over the block's float32 logits, row by row);
// float16 inputs are converted to float32 operands (a float32 copy of W, and of one row block of
// h). Gradients are returned in the input dtype.
// The float32 accumulator of dL/dW: the float32 gradient output itself; for bfloat16 the float32
// value split into its upper 16 bits, kept in the bfloat16 output, and its lower 16 bits, in a
// [V, H] uint16 array (bit-exact float32 accumulation with half the memory of a float32 copy;
// product 3 runs per tile of vocabulary rows on a per-thread float32 tile that is joined before
// and split after, and the output is rounded to nearest bfloat16 at the end); for float16 a
// float32 [V, H] array.
//
// A target outside [0, V) that is not ignore_index is treated as ignored and makes the kernel
// return kTargetOutOfRange (it is never used as an index).

#include <omp.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
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
  int64_t row_block = 1;
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
  attrs->row_block = extra->Attr<int64_t>("row_block");
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

// Rounds a float32 row to bfloat16 over its own storage: element c moves from byte 4c to byte 2c.
// Each chunk is read before it is written, through a copy (memcpy may alias the floats), and a
// chunk's bfloat16 bytes end below the float32 bytes of every later chunk.
void RoundRowToBFloat16InPlace(float *row, int64_t count) {
  constexpr int64_t kChunk = 64;
  BFloat16 rounded[kChunk];
  auto *bytes = reinterpret_cast<unsigned char *>(row);
  for (int64_t c0 = 0; c0 < count; c0 += kChunk) {
    const int64_t size = c0 + kChunk < count ? kChunk : count - c0;
    for (int64_t c = 0; c < size; ++c) rounded[c] = FromFloat<BFloat16>(row[c0 + c]);
    std::memcpy(bytes + c0 * sizeof(BFloat16), rounded, size * sizeof(BFloat16));
  }
}

// The float32 value whose upper 16 bits are `high` and lower 16 bits `low`, and back.
inline float JoinHalves(BFloat16 high, uint16_t low) {
  return BitsToFloat(static_cast<uint32_t>(high.bits) << 16 | low);
}
inline void SplitHalves(float value, BFloat16 *high, uint16_t *low) {
  const uint32_t bits = FloatToBits(value);
  high->bits = static_cast<uint16_t>(bits >> 16);
  *low = static_cast<uint16_t>(bits);
}

// The split log-sum-exp of one row: lse = max + log_sum (see the header).
struct RowLse {
  float max;
  float log_sum;
};

template <typename T, typename Index, bool kWeighted>
class LinearCrossEntropy {
 public:
  using G = GemmOperand<T>;
  static constexpr bool kFloat = std::is_same_v<T, float>;
  static constexpr bool kHalf16 = std::is_same_v<T, _Float16>;
  static constexpr bool kBFloat16 = std::is_same_v<T, BFloat16>;
  // Vocabulary rows per tile of the split bfloat16 accumulation of product 3.
  static constexpr int64_t kWeightTile = 512;

  LinearCrossEntropy(const LinearAttrs &attrs, int64_t N, int64_t H, int64_t V, const T *hidden,
                     const T *weight, const T *bias, const Index *target,
                     const float *class_weight, const float *row_coef, const float *z_coef)
      : attrs_(attrs), N_(N), H_(H), V_(V),
        rows_(attrs.row_block < 1 ? 1 : (attrs.row_block < N ? attrs.row_block : (N > 0 ? N : 1))),
        hidden_(hidden), weight_(weight), bias_(bias), target_(target),
        class_weight_(class_weight), row_coef_(row_coef), z_coef_(z_coef),
        eps_(attrs.label_smoothing), smooth_(attrs.label_smoothing / static_cast<float>(V)),
        total_weight_(SumWeights(class_weight, V, kWeighted)) {}

  // value_n into `values` and lse_n into `lse`; with grad_hidden (then grad_weight and grad_bias
  // too) not null, also the gradients of sum_n value_n. Returns a kernel status.
  int Run(float *values, float *lse, T *grad_hidden, T *grad_weight, T *grad_bias) {
    const bool grads = grad_hidden != nullptr;
    if (attrs_.gemm == nullptr) {
      MS_XENT_REPORT("linear_cross_entropy", "the oneDNN matrix-product library is not loaded");
      return kBadArguments;
    }
    if (N_ == 0) {
      if (grads) {
        for (int64_t v = 0; v < V_; ++v) grad_bias[v] = FromFloat<T>(0.0f);
        for (int64_t i = 0; i < V_ * H_; ++i) grad_weight[i] = FromFloat<T>(0.0f);
      }
      return kOk;
    }
    Scratch<float> logits(rows_ * V_);                  // x, then g in place (bfloat16: over it)
    Scratch<float> hidden_f32(kHalf16 ? rows_ * H_ : 0);          // a row block of h
    Scratch<float> weight_f32(kHalf16 ? V_ * H_ : 0);             // W
    Scratch<float> grad_hidden_f32(grads && !kFloat ? rows_ * H_ : 0);
    Scratch<float> grad_weight_f32(grads && kHalf16 ? V_ * H_ : 0);
    Scratch<uint16_t> grad_weight_low(grads && kBFloat16 ? V_ * H_ : 0);
    Scratch<float> weight_tiles(grads && kBFloat16 ? omp_get_max_threads() * kWeightTile * H_ : 0);
    Scratch<float> grad_bias_f32(grads && attrs_.has_bias ? V_ : 0);
    std::vector<RowLse> row_lse(rows_);
    if (!logits.allocated() || !hidden_f32.allocated() || !weight_f32.allocated() ||
        !grad_hidden_f32.allocated() || !grad_weight_f32.allocated() ||
        !grad_weight_low.allocated() || !weight_tiles.allocated() || !grad_bias_f32.allocated()) {
      MS_XENT_REPORT("linear_cross_entropy", "out of memory for the block buffers");
      return kBadArguments;
    }
    const G *weight_operand = WeightOperand(weight_f32.get());
    float *dw = kFloat ? reinterpret_cast<float *>(grad_weight) : grad_weight_f32.get();
    float *db = grad_bias_f32.get();
    if (db) {
      for (int64_t v = 0; v < V_; ++v) db[v] = 0.0f;
    }
    const float scale = attrs_.logit_scale;
    float *x = logits.get();
    std::atomic<bool> bad_target{false};
    for (int64_t r0 = 0; r0 < N_; r0 += rows_) {
      const int64_t rows = r0 + rows_ < N_ ? rows_ : N_ - r0;
      const G *h = HiddenOperand(r0, rows, hidden_f32.get());
      int status = ParallelGemm(*attrs_.gemm, false, true, rows, V_, H_, scale, h, H_,
                                weight_operand, H_, 0.0f, x, V_);
      if (status != 0) return ReportGemmFailure(status);
      if (attrs_.has_bias || attrs_.logit_softcap > 0.0f) BiasAndSoftcap(x, rows);
#pragma omp parallel for schedule(dynamic, 1)
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t n = r0 + i;
        float *row = x + i * V_;
        const int64_t y = static_cast<int64_t>(target_[n]);
        if (y != attrs_.ignore_index && !IsValidTarget(y, V_)) bad_target.store(true);
        row_lse[i] = RowLogSumExp(row);
        lse[n] = row_lse[i].max + row_lse[i].log_sum;
        values[n] = RowValue(n, row, row_lse[i]);
        if (grads) GradRow(n, row, row_lse[i], lse[n]);
      }
      if (!grads) continue;
      if (db) AddColumnSums(x, rows, db);
      // g as the products' operand: the float32 block, or its rows rounded to bfloat16 in place
      // (a row of g then starts every 2V bfloat16 elements).
      int64_t ldg = V_;
      if constexpr (kBFloat16) {
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < rows; ++i) RoundRowToBFloat16InPlace(x + i * V_, V_);
        ldg = 2 * V_;
      }
      const G *g = reinterpret_cast<const G *>(x);
      // dL/dh[r0:r1] = s g W: [rows, H], written once.
      float *dh = kFloat ? reinterpret_cast<float *>(grad_hidden) + r0 * H_ : grad_hidden_f32.get();
      status = ParallelGemm(*attrs_.gemm, false, false, rows, H_, V_, scale, g, ldg,
                            weight_operand, H_, 0.0f, dh, H_);
      // dL/dW += s g^T h[r0:r1]: [V, H].
      const bool first = r0 == 0;
      if constexpr (kBFloat16) {
        status |= AccumulateSplitWeightGradient(g, ldg, h, rows, first, grad_weight,
                                                grad_weight_low.get(), weight_tiles.get());
      } else {
        status |= ParallelGemm(*attrs_.gemm, true, false, V_, H_, rows, scale, g, ldg, h, H_,
                               first ? 0.0f : 1.0f, dw, H_);
      }
      if (status != 0) return ReportGemmFailure(status);
      if (!kFloat) ConvertRows(dh, grad_hidden + r0 * H_, rows * H_);
    }
    if (grads) {
      if constexpr (kBFloat16) {
        RoundSplitWeightGradient(grad_weight, grad_weight_low.get());
      } else if constexpr (kHalf16) {
        ConvertRows(dw, grad_weight, V_ * H_);
      }
      for (int64_t v = 0; v < V_; ++v) grad_bias[v] = FromFloat<T>(db ? scale * db[v] : 0.0f);
    }
    if (bad_target.load()) {
      ReportBadTarget();
      return kTargetOutOfRange;
    }
    return kOk;
  }

 private:
  float ClassWeight(int64_t v) const { return kWeighted ? class_weight_[v] : 1.0f; }

  bool Counted(int64_t n) const {
    const int64_t y = static_cast<int64_t>(target_[n]);
    return y != attrs_.ignore_index && IsValidTarget(y, V_);
  }

  // Rows [r0, r0 + rows) of h as a product operand (converted to float32 for float16).
  const G *HiddenOperand(int64_t r0, int64_t rows, float *converted) const {
    if constexpr (kHalf16) {
      ConvertRows(hidden_ + r0 * H_, converted, rows * H_);
      return converted;
    } else {
      return hidden_ + r0 * H_;
    }
  }

  // W as a product operand (converted to float32 for float16).
  const G *WeightOperand(float *converted) const {
    if constexpr (kHalf16) {
      ConvertRows(weight_, converted, V_ * H_);
      return converted;
    } else {
      return weight_;
    }
  }

  // bfloat16: (high, low) += s g^T h over tiles of kWeightTile vocabulary rows, each joined into
  // the calling thread's float32 tile, accumulated by oneDNN and split back (`first`: no join,
  // the product is written). g is [rows, V] with row stride ldg, h is [rows, H].
  int AccumulateSplitWeightGradient(const G *g, int64_t ldg, const G *h, int64_t rows, bool first,
                                    T *high, uint16_t *low, float *tiles) const {
    const int64_t count = (V_ + kWeightTile - 1) / kWeightTile;
    int status = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : status)
    for (int64_t index = 0; index < count; ++index) {
      const int64_t v0 = index * kWeightTile;
      const int64_t size = (v0 + kWeightTile < V_ ? kWeightTile : V_ - v0) * H_;
      float *tile = tiles + omp_get_thread_num() * kWeightTile * H_;
      T *tile_high = high + v0 * H_;
      uint16_t *tile_low = low + v0 * H_;
      if (!first) {
#pragma omp simd
        for (int64_t i = 0; i < size; ++i) tile[i] = JoinHalves(tile_high[i], tile_low[i]);
      }
      status |= CallGemm(*attrs_.gemm, 'T', 'N', size / H_, H_, rows, attrs_.logit_scale,
                         g + v0, ldg, h, H_, first ? 0.0f : 1.0f, tile, H_);
#pragma omp simd
      for (int64_t i = 0; i < size; ++i) SplitHalves(tile[i], tile_high + i, tile_low + i);
    }
    return status;
  }

  // The split accumulator (high, low) rounded to nearest bfloat16 into `high`.
  void RoundSplitWeightGradient(T *high, const uint16_t *low) const {
    const int64_t count = V_ * H_;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; ++i) high[i] = FromFloat<T>(JoinHalves(high[i], low[i]));
  }

  // x[rows, V] += s b, then the softcap cap tanh(x / cap).
  void BiasAndSoftcap(float *x, int64_t rows) const {
    const bool has_bias = attrs_.has_bias;
    const float cap = attrs_.logit_softcap;
    const float scale = attrs_.logit_scale;
    const float inv_cap = cap > 0.0f ? 1.0f / cap : 0.0f;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      float *row = x + i * V_;
#pragma omp simd
      for (int64_t c = 0; c < V_; ++c) {
        float z = row[c];
        if (has_bias) z += scale * ToFloat(bias_[c]);
        row[c] = cap > 0.0f ? cap * FastTanh(z * inv_cap) : z;
      }
    }
  }

  // M and L of one row of logits. While the max is not finite (every element -inf or NaN, or a
  // +inf element) the row is summed as SumExpAtOwnMax does (-inf -> lse = -inf; NaN or +inf ->
  // NaN), with max 0 for an all -inf row.
  RowLse RowLogSumExp(const float *row) const {
    const float max = BlockMax(row, 0, V_);
    if (!std::isfinite(max)) {
      const bool all_minus_inf = max == -std::numeric_limits<float>::infinity();
      return {all_minus_inf ? 0.0f : max, std::log(SumExpAtOwnMax(row, 0, V_, max))};
    }
    float at_max = 0.0f;
    const float below = SumExpBelowMax(row, 0, V_, max, &at_max);
    return {max, std::log1p((at_max - 1.0f) + below)};
  }

  // value_n = a_n l_n + c_n lse_n^2 (see the header); the target's term in double.
  float RowValue(int64_t n, const float *row, RowLse s) const {
    const float lse = s.max + s.log_sum;
    const float z_loss = z_coef_[n] != 0.0f ? z_coef_[n] * lse * lse : 0.0f;
    if (!Counted(n)) return z_loss;
    const int64_t y = static_cast<int64_t>(target_[n]);
    const double target_term =
        (static_cast<double>(s.max) - row[y]) + static_cast<double>(s.log_sum);
    double loss = (1.0 - eps_) * ClassWeight(y) * target_term;
    if (eps_ > 0.0f) {
      // sum_v w[v] (M - x[v]): every term >= 0.
      float spread = 0.0f;
#pragma omp simd reduction(+ : spread)
      for (int64_t c = 0; c < V_; ++c) spread += ClassWeight(c) * (s.max - row[c]);
      loss += smooth_ * (static_cast<double>(total_weight_) * s.log_sum + spread);
    }
    return static_cast<float>(row_coef_[n] * loss) + z_loss;
  }

  // Row n of the block: x -> g = dL/dz in place (exact zeros for rows with a_n m_n = 0 and
  // c_n = 0, even when their logits are not finite).
  void GradRow(int64_t n, float *row, RowLse s, float lse) const {
    const bool counted = Counted(n);
    const float a = counted ? row_coef_[n] : 0.0f;
    const float b = z_coef_[n] != 0.0f ? 2.0f * z_coef_[n] * lse : 0.0f;
    if (a == 0.0f && b == 0.0f) {
      for (int64_t c = 0; c < V_; ++c) row[c] = 0.0f;
      return;
    }
    const int64_t y = static_cast<int64_t>(target_[n]);
    const float w_y = counted ? ClassWeight(y) : 0.0f;
    const float x_y = counted ? row[y] : 0.0f;
    const float true_class = a * (1.0f - eps_) * w_y;
    const float k = true_class + a * smooth_ * total_weight_ + b;
    const float l = a * smooth_;
    const float cap = attrs_.logit_softcap;
    if (cap > 0.0f) {
      const float inv_cap = 1.0f / cap;
      // p K = exp(x - M) * k exp(-L).
      const float k_scaled = k * std::exp(-s.log_sum);
#pragma omp simd
      for (int64_t c = 0; c < V_; ++c) {
        const float xc = row[c];
        const float ratio = xc * inv_cap;
        row[c] = (FastExp(xc - s.max) * k_scaled - l * ClassWeight(c)) * (1.0f - ratio * ratio);
      }
    } else {
      WriteGradRow(row, V_, s.max, s.log_sum, k, l, kWeighted ? class_weight_ : nullptr, row, false);
    }
    if (!counted) return;
    const double target_term =
        (static_cast<double>(s.max) - x_y) + static_cast<double>(s.log_sum);
    const double p_y = std::exp(-target_term);
    const double one_minus_p = -std::expm1(-target_term);
    const double grad = -static_cast<double>(true_class) * one_minus_p +
                        (static_cast<double>(k) - true_class) * p_y - static_cast<double>(l) * w_y;
    const float ratio = cap > 0.0f ? x_y / cap : 0.0f;
    row[y] = static_cast<float>(grad) * (1.0f - ratio * ratio);
  }

  // sums[v] += sum_i g[i, v] over the block's rows, each thread over its own columns.
  void AddColumnSums(const float *g, int64_t rows, float *sums) const {
    constexpr int64_t kColumns = 1024;
    const int64_t chunks = (V_ + kColumns - 1) / kColumns;
#pragma omp parallel for schedule(static)
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const int64_t c0 = chunk * kColumns;
      const int64_t c1 = c0 + kColumns < V_ ? c0 + kColumns : V_;
      for (int64_t i = 0; i < rows; ++i) {
        const float *row = g + i * V_;
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) sums[c] += row[c];
      }
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

  static int ReportGemmFailure(int status) {
    MS_XENT_REPORT("linear_cross_entropy", "oneDNN matrix product failed (status %d)", status);
    return kBadArguments;
  }

  const LinearAttrs &attrs_;
  const int64_t N_, H_, V_, rows_;
  const T *hidden_;
  const T *weight_;
  const T *bias_;
  const Index *target_;
  const float *class_weight_;
  const float *row_coef_;
  const float *z_coef_;
  const float eps_, smooth_, total_weight_;
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
        return fn(op, N, t);
      };
      return attrs.weighted ? run(std::true_type{}) : run(std::false_type{});
    });
  });
}

// inputs: hidden, weight, bias, target, class_weight, row_coef, z_coef;
// outputs: value[N], lse[N] float32.
int RowsEntry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
              void *extra) {
  return WithLinearKernel(nparam, 2, params, ndims, shapes, dtypes, extra,
                          [&](auto &op, int64_t, auto *t) {
    using T = std::remove_pointer_t<decltype(t)>;
    return op.Run(static_cast<float *>(params[kLinearInputs]),
                  static_cast<float *>(params[kLinearInputs + 1]), static_cast<T *>(nullptr),
                  static_cast<T *>(nullptr), static_cast<T *>(nullptr));
  });
}

// inputs as RowsEntry; outputs: total[1] float32 (sum_n value_n, summed in double), lse[N]
// float32, grad_hidden [N, H], grad_weight [V, H], grad_bias [V] (dtype of hidden).
int SumGradEntry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                 void *extra) {
  return WithLinearKernel(nparam, 5, params, ndims, shapes, dtypes, extra,
                          [&](auto &op, int64_t N, auto *t) {
    using T = std::remove_pointer_t<decltype(t)>;
    std::vector<float> values(N);
    const int status = op.Run(values.data(), static_cast<float *>(params[kLinearInputs + 1]),
                              static_cast<T *>(params[kLinearInputs + 2]),
                              static_cast<T *>(params[kLinearInputs + 3]),
                              static_cast<T *>(params[kLinearInputs + 4]));
    double sum = 0.0;
    for (int64_t n = 0; n < N; ++n) sum += values[n];
    *static_cast<float *>(params[kLinearInputs]) = static_cast<float>(sum);
    return status;
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
extern "C" std::vector<std::vector<int64_t>> XentLinearRowsInferShape(int *ndims,
                                                                     int64_t **shapes,
                                                                     AotExtra *) {
  const int64_t rows = ndims[0] == 2 ? shapes[0][0] : -1;
  return {{rows}, {rows}};
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
  const int64_t rows = ndims[0] == 2 ? shapes[0][0] : -1;
  return {{1}, {rows}, hidden, weight, bias};
}
