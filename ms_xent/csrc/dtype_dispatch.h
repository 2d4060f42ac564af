// Maps MindSpore's dtype strings to C++ element types for the kernel templates.
#pragma once

#include "aot_abi.h"
#include "vec_math.h"

namespace ms_xent {

// Runs fn with a typed null pointer for the floating dtype named by `dtype`
// (float32 / float16 / bfloat16); kBadArguments for any other dtype.
template <typename Fn>
int DispatchFloat(const char *dtype, Fn &&fn) {
  switch (ParseDType(dtype)) {
    case DType::kFloat32: return fn(static_cast<float *>(nullptr));
    case DType::kFloat16: return fn(static_cast<_Float16 *>(nullptr));
    case DType::kBFloat16: return fn(static_cast<BFloat16 *>(nullptr));
    default: return kBadArguments;
  }
}

// Same for the integer class-index dtypes (int32 / int64).
template <typename Fn>
int DispatchIndex(const char *dtype, Fn &&fn) {
  switch (ParseDType(dtype)) {
    case DType::kInt32: return fn(static_cast<int32_t *>(nullptr));
    case DType::kInt64: return fn(static_cast<int64_t *>(nullptr));
    default: return kBadArguments;
  }
}

}  // namespace ms_xent
