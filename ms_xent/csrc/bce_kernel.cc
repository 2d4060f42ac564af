// Fused binary cross-entropy with logits (forward and backward) for MindSpore
// `ops.Custom(func_type="aot")` on CPU. All arithmetic is float32; the "sum" kernel adds in
// float32 within a segment of at most kChunk elements (one partial per SIMD lane) and in float64
// across segments.
//
// Per element, with logit x, target t in [0, 1], weight w and positive-class weight pw:
//   l = -w * ( pw * t * log(sigmoid(x)) + (1 - t) * log(1 - sigmoid(x)) )
//
// Softplus form. With sp(z) = log(1 + exp(z)):  log(sigmoid(x)) = -sp(-x), and
// log(1 - sigmoid(x)) = log(sigmoid(-x)) = -sp(x), so
//   l = w * ( pw * t * sp(-x) + (1 - t) * sp(x) ).                                        (1)
// With sp(x) = x + sp(-x) this is the form PyTorch evaluates,
//   l = w * ( (1 - t) * x + (1 + (pw - 1) * t) * sp(-x) ),
// but that one cancels for x << 0 and small t (x = -10, t = 0: -10 + 10.0000454 loses 5 digits).
// (1) has only non-negative terms for t in [0, 1], pw >= 0, so it keeps full relative accuracy.
// Both softplus values come from one exponential and one log1p, never from log(sigmoid):
//   a = |x|, e = exp(-a) in [0, 1], tail = log1p(e),
//   sp(x) = max(x, 0) + tail,  sp(-x) = max(-x, 0) + tail.
// At x = -120, pw = 3, t = 1: sp(-x) = 120 + log1p(exp(-120)) = 120 and l = 360, finite.
//
// Non-finite logits follow PyTorch (an infinite logit never yields a silent finite loss):
//   x = +inf: sp(x) = inf, sp(-x) = 0, so l = inf for t < 1 and (1 - t) * inf = NaN for t = 1.
//   x = -inf: PyTorch's (1 - t) * x + ... * sp(-x) is -inf + inf or 0 * inf, NaN for every t;
//             (1) would give inf for t > 0, so the kernel selects NaN there explicitly.
//   x = NaN: e, tail and every result are NaN.
//
// Gradient w.r.t. x. d sp(z)/dz = sigmoid(z), so from (1):
//   dl/dx = w * ( (1 - t) * sigmoid(x) - pw * t * sigmoid(-x) )                          (2)
// (equal to PyTorch's w * ((1 + (pw - 1) t) sigmoid(x) - pw t), using sigmoid(-x) = 1 - sigmoid(x),
// without its cancellation 1 - sigmoid(x) for x >> 0). From the same e = exp(-|x|), r = 1/(1 + e):
//   sigmoid(|x|) = r, sigmoid(-|x|) = e * r, picked by the sign of x; x = +inf gives (1, 0),
//   x = -inf gives (0, 1), as PyTorch.
//
// Gradient w.r.t. t (PyTorch differentiates the target too). From (1):
//   dl/dt = w * ( pw * sp(-x) - sp(x) )
//         = w * ( pw * max(-x, 0) - max(x, 0) + (pw - 1) * tail )                           (3)
// The second line never subtracts the two rounded softplus values: with pw = 1 it is exactly -x
// (PyTorch's result without pos_weight), and at x = -inf it gives pw * inf (NaN for pw = 0), at
// x = +inf -inf, matching PyTorch's log_sigmoid(-x) - pw * log_sigmoid(x).
//
// weight and pos_weight are float32 tensors of any shape that broadcasts to x (right-aligned,
// size-1 dims repeat). The kernel derives their strides from the shapes it is given at run time,
// merges dims that are contiguous for every operand, and walks x in fixed-size chunks (the
// parallel work items), split into segments at the ends of the innermost merged dim, along which
// each operand has stride 0 (repeated) or 1.

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "aot_abi.h"
#include "vec_math.h"
#include "dtype_dispatch.h"

namespace ms_xent {
namespace {

constexpr int kMaxRank = 16;
constexpr int64_t kChunk = 8192;               // elements per parallel work item
constexpr int64_t kParallelThreshold = 32768;  // below this, one thread

// Broadcast layout of weight and pos_weight over the (contiguous) elements of x.
struct Layout {
  int rank = 0;  // merged dims; the last one is the inner segment
  int64_t size[kMaxRank];
  int64_t w_stride[kMaxRank];
  int64_t pw_stride[kMaxRank];
  int64_t total = 1;
};

// Element strides of an operand broadcast to `shape` (right-aligned; 0 where it repeats).
// False when its shape does not broadcast to `shape`.
bool BroadcastStrides(int rank, const int64_t *shape, int op_rank, const int64_t *op_shape,
                      int64_t *strides) {
  if (op_rank > rank) return false;
  int64_t stride = 1;
  for (int i = rank - 1; i >= 0; --i) {
    const int j = i - (rank - op_rank);
    if (j < 0 || op_shape[j] == 1) {
      strides[i] = 0;
    } else if (op_shape[j] == shape[i]) {
      strides[i] = stride;
      stride *= op_shape[j];
    } else {
      return false;
    }
  }
  return true;
}

bool MakeLayout(int rank, const int64_t *shape, int w_rank, const int64_t *w_shape, int pw_rank,
                const int64_t *pw_shape, Layout *layout) {
  if (rank > kMaxRank) return false;
  int64_t ws[kMaxRank], ps[kMaxRank];
  if (!BroadcastStrides(rank, shape, w_rank, w_shape, ws) ||
      !BroadcastStrides(rank, shape, pw_rank, pw_shape, ps)) {
    return false;
  }
  Layout &out = *layout;
  out.rank = 0;
  out.total = NumElements(rank, shape);
  for (int i = 0; i < rank; ++i) {
    if (shape[i] == 1) continue;
    const int last = out.rank - 1;
    if (last >= 0 && out.w_stride[last] == ws[i] * shape[i] &&
        out.pw_stride[last] == ps[i] * shape[i]) {
      out.size[last] *= shape[i];
      out.w_stride[last] = ws[i];
      out.pw_stride[last] = ps[i];
    } else {
      out.size[out.rank] = shape[i];
      out.w_stride[out.rank] = ws[i];
      out.pw_stride[out.rank] = ps[i];
      ++out.rank;
    }
  }
  if (out.rank == 0) {
    out.rank = 1;
    out.size[0] = 1;
    out.w_stride[0] = 0;
    out.pw_stride[0] = 0;
  }
  return true;
}

// Calls body(offset, w_offset, pw_offset, count) for the inner segments covering [begin, end).
template <typename Body>
void ForEachSegment(const Layout &layout, int64_t begin, int64_t end, Body &&body) {
  const int inner_dim = layout.rank - 1;
  const int64_t inner = layout.size[inner_dim];
  int64_t index[kMaxRank];
  int64_t row = begin / inner;
  int64_t col = begin % inner;
  int64_t w_offset = 0, pw_offset = 0;
  for (int d = inner_dim - 1; d >= 0; --d) {
    index[d] = row % layout.size[d];
    row /= layout.size[d];
    w_offset += index[d] * layout.w_stride[d];
    pw_offset += index[d] * layout.pw_stride[d];
  }
  for (int64_t i = begin; i < end;) {
    const int64_t count = std::min(inner - col, end - i);
    body(i, w_offset + col * layout.w_stride[inner_dim],
         pw_offset + col * layout.pw_stride[inner_dim], count);
    i += count;
    col = 0;
    for (int d = inner_dim - 1; d >= 0; --d) {
      w_offset += layout.w_stride[d];
      pw_offset += layout.pw_stride[d];
      if (++index[d] < layout.size[d]) break;
      w_offset -= layout.w_stride[d] * layout.size[d];
      pw_offset -= layout.pw_stride[d] * layout.size[d];
      index[d] = 0;
    }
  }
}

template <typename Fn>
void ParallelChunks(int64_t total, Fn &&fn) {
  const int64_t chunks = (total + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (total > kParallelThreshold)
  for (int64_t c = 0; c < chunks; ++c) fn(c, c * kChunk, std::min(total, (c + 1) * kChunk));
}

// ---- per-element math (see the header for the derivations) --------------------------------------

inline float PositivePart(float v) { return v > 0.0f ? v : 0.0f; }

// Equation (1), with PyTorch's NaN at x = -inf.
inline float ElementLoss(float x, float t, float w, float pw) {
  const float tail = Log1pUnit(FastExp(-std::fabs(x)));
  const float sp_pos = PositivePart(x) + tail;   // sp(x)  = -log(1 - sigmoid(x))
  const float sp_neg = PositivePart(-x) + tail;  // sp(-x) = -log(sigmoid(x))
  const float loss = w * (pw * t * sp_neg + (1.0f - t) * sp_pos);
  return x == -std::numeric_limits<float>::infinity() ? std::numeric_limits<float>::quiet_NaN()
                                                       : loss;
}

// Equations (2) and (3), scaled by the upstream gradient g.
inline void ElementGrad(float x, float t, float w, float pw, float g, float *grad_x,
                        float *grad_t) {
  const float e = FastExp(-std::fabs(x));
  const float r = 1.0f / (1.0f + e);
  const bool positive = x >= 0.0f;
  const float sig_pos = positive ? r : e * r;  // sigmoid(x)
  const float sig_neg = positive ? e * r : r;  // sigmoid(-x)
  const float scale = g * w;
  *grad_x = scale * ((1.0f - t) * sig_pos - pw * t * sig_neg);
  *grad_t = scale * (pw * PositivePart(-x) - PositivePart(x) + (pw - 1.0f) * Log1pUnit(e));
}

// ---- inner segments: weight / pos_weight per element (kWVec / kPwVec) or repeated --------------

template <typename T, bool kWVec, bool kPwVec>
void LossSegment(const T *__restrict__ x, const T *__restrict__ t, const float *__restrict__ w,
                 const float *__restrict__ pw, int64_t count, T *__restrict__ out) {
  for (int64_t i = 0; i < count; ++i) {
    out[i] = FromFloat<T>(ElementLoss(ToFloat(x[i]), ToFloat(t[i]), kWVec ? w[i] : w[0],
                                      kPwVec ? pw[i] : pw[0]));
  }
}

// Sum over the segment in float32; `omp simd` lets the compiler keep one partial sum per vector
// lane (a segment is at most kChunk elements, so each lane adds a few hundred terms at most).
template <typename T, bool kWVec, bool kPwVec>
float LossSegmentSum(const T *__restrict__ x, const T *__restrict__ t,
                     const float *__restrict__ w, const float *__restrict__ pw, int64_t count) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < count; ++i) {
    sum += ElementLoss(ToFloat(x[i]), ToFloat(t[i]), kWVec ? w[i] : w[0], kPwVec ? pw[i] : pw[0]);
  }
  return sum;
}

// The upstream gradient is element-wise in T (g, "none") or one float32 value (g_scalar).
template <typename T, bool kElementGrad, bool kWVec, bool kPwVec>
void GradSegment(const T *__restrict__ x, const T *__restrict__ t, const float *__restrict__ w,
                 const float *__restrict__ pw, const T *__restrict__ g, float g_scalar,
                 int64_t count, T *__restrict__ grad_x, T *__restrict__ grad_t) {
  for (int64_t i = 0; i < count; ++i) {
    float gx, gt;
    ElementGrad(ToFloat(x[i]), ToFloat(t[i]), kWVec ? w[i] : w[0], kPwVec ? pw[i] : pw[0],
                kElementGrad ? ToFloat(g[i]) : g_scalar, &gx, &gt);
    grad_x[i] = FromFloat<T>(gx);
    grad_t[i] = FromFloat<T>(gt);
  }
}

// ---- whole tensors --------------------------------------------------------------------------

// Runs fn(std::bool_constant<w inner stride is 1>, std::bool_constant<pw inner stride is 1>).
template <typename Fn>
int DispatchInnerStrides(const Layout &layout, Fn &&fn) {
  const bool w_vec = layout.w_stride[layout.rank - 1] != 0;
  const bool pw_vec = layout.pw_stride[layout.rank - 1] != 0;
  if (w_vec && pw_vec) return fn(std::true_type{}, std::true_type{});
  if (w_vec) return fn(std::true_type{}, std::false_type{});
  if (pw_vec) return fn(std::false_type{}, std::true_type{});
  return fn(std::false_type{}, std::false_type{});
}

template <typename T>
int ForwardNone(const Layout &layout, const T *x, const T *t, const float *w, const float *pw,
                T *out) {
  return DispatchInnerStrides(layout, [&](auto w_vec, auto pw_vec) {
    ParallelChunks(layout.total, [&](int64_t, int64_t begin, int64_t end) {
      ForEachSegment(layout, begin, end, [&](int64_t i, int64_t wi, int64_t pi, int64_t count) {
        LossSegment<T, decltype(w_vec)::value, decltype(pw_vec)::value>(x + i, t + i, w + wi,
                                                                        pw + pi, count, out + i);
      });
    });
    return kOk;
  });
}

// One float64 partial per chunk, added in chunk order: the result does not depend on the
// number of threads.
template <typename T>
int ForwardSum(const Layout &layout, const T *x, const T *t, const float *w, const float *pw,
               float *out) {
  const int64_t chunks = (layout.total + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
  DispatchInnerStrides(layout, [&](auto w_vec, auto pw_vec) {
    ParallelChunks(layout.total, [&](int64_t chunk, int64_t begin, int64_t end) {
      double sum = 0.0;
      ForEachSegment(layout, begin, end, [&](int64_t i, int64_t wi, int64_t pi, int64_t count) {
        sum += LossSegmentSum<T, decltype(w_vec)::value, decltype(pw_vec)::value>(
            x + i, t + i, w + wi, pw + pi, count);
      });
      partial[chunk] = sum;
    });
    return kOk;
  });
  double total = 0.0;
  for (double value : partial) total += value;
  out[0] = static_cast<float>(total);
  return kOk;
}

// g is element-wise (T) when kElementGrad, else a single float32 value.
template <typename T, bool kElementGrad>
int Backward(const Layout &layout, const T *x, const T *t, const float *w, const float *pw,
             const void *g, T *grad_x, T *grad_t) {
  const T *g_elements = static_cast<const T *>(g);
  const float g_scalar = kElementGrad ? 0.0f : *static_cast<const float *>(g);
  return DispatchInnerStrides(layout, [&](auto w_vec, auto pw_vec) {
    ParallelChunks(layout.total, [&](int64_t, int64_t begin, int64_t end) {
      ForEachSegment(layout, begin, end, [&](int64_t i, int64_t wi, int64_t pi, int64_t count) {
        GradSegment<T, kElementGrad, decltype(w_vec)::value, decltype(pw_vec)::value>(
            x + i, t + i, w + wi, pw + pi, g_elements + i, g_scalar, count, grad_x + i,
            grad_t + i);
      });
    });
    return kOk;
  });
}

// ---- entry points -----------------------------------------------------------------------------


bool SameShape(int *ndims, int64_t **shapes, int a, int b) {
  return ndims[a] == ndims[b] && std::equal(shapes[a], shapes[a] + ndims[a], shapes[b]);
}

bool IsFloat32(const char *dtype) { return ParseDType(dtype) == DType::kFloat32; }

// Common checks of params 0..3 = input, target, weight, pos_weight. On success fills the layout.
int CheckOperands(const char *kernel, int *ndims, int64_t **shapes, const char **dtypes,
                  Layout *layout) {
  if (!SameShape(ndims, shapes, 0, 1) || std::strcmp(dtypes[0], dtypes[1]) != 0) {
    MS_XENT_REPORT(kernel, "`input` and `target` must have the same shape and dtype");
    return kBadArguments;
  }
  if (!IsFloat32(dtypes[2]) || !IsFloat32(dtypes[3]) ||
      !MakeLayout(ndims[0], shapes[0], ndims[2], shapes[2], ndims[3], shapes[3], layout)) {
    MS_XENT_REPORT(kernel, "`weight` and `pos_weight` must be float32 and broadcast to `input`");
    return kBadArguments;
  }
  return kOk;
}

// inputs: input, target (same shape and dtype), weight, pos_weight (float32, broadcastable);
// output: loss, the shape and dtype of input.
int ForwardNoneEntry(int nparam, void **params, int *ndims, int64_t **shapes,
                     const char **dtypes) {
  Layout layout;
  if (nparam != 5 || !SameShape(ndims, shapes, 0, 4)) return kBadArguments;
  if (int status = CheckOperands("bce_with_logits", ndims, shapes, dtypes, &layout)) return status;
  return DispatchFloat(dtypes[0], [&](auto *tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return ForwardNone<T>(layout, static_cast<const T *>(params[0]),
                          static_cast<const T *>(params[1]), static_cast<const float *>(params[2]),
                          static_cast<const float *>(params[3]), static_cast<T *>(params[4]));
  });
}

// Same inputs; output: the sum of the losses, float32 [1].
int ForwardSumEntry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  Layout layout;
  if (nparam != 5 || NumElements(ndims[4], shapes[4]) != 1 || !IsFloat32(dtypes[4])) {
    return kBadArguments;
  }
  if (int status = CheckOperands("bce_with_logits", ndims, shapes, dtypes, &layout)) return status;
  return DispatchFloat(dtypes[0], [&](auto *tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return ForwardSum<T>(layout, static_cast<const T *>(params[0]),
                         static_cast<const T *>(params[1]), static_cast<const float *>(params[2]),
                         static_cast<const float *>(params[3]), static_cast<float *>(params[4]));
  });
}

// inputs: input, target, weight, pos_weight, grad_loss (element-wise in the dtype of input when
// kElementGrad, else float32 [1]); outputs: grad_input, grad_target (shape and dtype of input).
template <bool kElementGrad>
int BackwardEntry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  Layout layout;
  if (nparam != 7 || !SameShape(ndims, shapes, 0, 5) || !SameShape(ndims, shapes, 0, 6)) {
    return kBadArguments;
  }
  const bool grad_ok = kElementGrad ? SameShape(ndims, shapes, 0, 4) &&
                                          std::strcmp(dtypes[0], dtypes[4]) == 0
                                    : NumElements(ndims[4], shapes[4]) == 1 && IsFloat32(dtypes[4]);
  if (!grad_ok) return kBadArguments;
  if (int status = CheckOperands("bce_with_logits_grad", ndims, shapes, dtypes, &layout)) {
    return status;
  }
  return DispatchFloat(dtypes[0], [&](auto *tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return Backward<T, kElementGrad>(layout, static_cast<const T *>(params[0]),
                          static_cast<const T *>(params[1]), static_cast<const float *>(params[2]),
                          static_cast<const float *>(params[3]), params[4],
                          static_cast<T *>(params[5]), static_cast<T *>(params[6]));
  });
}

std::vector<int64_t> ShapeOf(int *ndims, int64_t **shapes, int i) {
  return std::vector<int64_t>(shapes[i], shapes[i] + ndims[i]);
}

}  // namespace
}  // namespace ms_xent

// ---- exported symbols: <Name> and <Name>InferShape (no attributes) ------------------------------

extern "C" int BceWithLogitsForward(int nparam, void **params, int *ndims, int64_t **shapes,
                                    const char **dtypes, void *, void *) {
  return ms_xent::ForwardNoneEntry(nparam, params, ndims, shapes, dtypes);
}
extern "C" int BceWithLogitsForwardSum(int nparam, void **params, int *ndims, int64_t **shapes,
                                       const char **dtypes, void *, void *) {
  return ms_xent::ForwardSumEntry(nparam, params, ndims, shapes, dtypes);
}
extern "C" int BceWithLogitsBackward(int nparam, void **params, int *ndims, int64_t **shapes,
                                     const char **dtypes, void *, void *) {
  return ms_xent::BackwardEntry<true>(nparam, params, ndims, shapes, dtypes);
}
extern "C" int BceWithLogitsBackwardScalarGrad(int nparam, void **params, int *ndims,
                                               int64_t **shapes, const char **dtypes, void *,
                                               void *) {
  return ms_xent::BackwardEntry<false>(nparam, params, ndims, shapes, dtypes);
}

extern "C" std::vector<int64_t> BceWithLogitsForwardInferShape(int *ndims, int64_t **shapes,
                                                               AotExtra *) {
  return ms_xent::ShapeOf(ndims, shapes, 0);
}
extern "C" std::vector<int64_t> BceWithLogitsForwardSumInferShape(int *, int64_t **, AotExtra *) {
  return {1};
}
extern "C" std::vector<std::vector<int64_t>> BceWithLogitsBackwardInferShape(int *ndims,
                                                                             int64_t **shapes,
                                                                             AotExtra *) {
  return {ms_xent::ShapeOf(ndims, shapes, 0), ms_xent::ShapeOf(ndims, shapes, 0)};
}
extern "C" std::vector<std::vector<int64_t>> BceWithLogitsBackwardScalarGradInferShape(
    int *ndims, int64_t **shapes, AotExtra *) {
  return {ms_xent::ShapeOf(ndims, shapes, 0), ms_xent::ShapeOf(ndims, shapes, 0)};
}
