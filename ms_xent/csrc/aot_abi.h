// The calling convention MindSpore uses for `ops.Custom(func_type="aot")` kernels on CPU,
// and a standalone mirror of its `AotExtra` attribute accessor.
//
// MindSpore's own `custom_aot_extra.h` pulls in internal headers, so this file re-declares the
// class with the identical virtual-table and member layout. The library must be compiled with
// -D_GLIBCXX_USE_CXX11_ABI=0 because std::string crosses the boundary through virtual calls.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

class AotKernelData {
 public:
  AotKernelData() = default;
  virtual ~AotKernelData() = default;
};

class AotExtra {
 public:
  AotExtra() = default;
  virtual ~AotExtra() = default;
  virtual bool HasAttr(std::string name) = 0;

  template <typename T>
  T Attr(std::string name);

  void SetWorkSpace(const std::vector<size_t> &workspace) { workspace_ = workspace; }
  void SetKernelData(AotKernelData *kernel_data) { kernel_data_ = kernel_data; }
  const AotKernelData *KernelData() const { return kernel_data_; }

 private:
  // Order and signatures must match MindSpore's class exactly (vtable slots).
  virtual bool GetAttrBool(std::string name) = 0;
  virtual int64_t GetAttrInt(std::string name) = 0;
  virtual float GetAttrFloat(std::string name) = 0;
  virtual std::string GetAttrStr(std::string name) = 0;
  virtual std::vector<int64_t> GetAttrIntVec(std::string name) = 0;
  virtual std::vector<float> GetAttrFloatVec(std::string name) = 0;
  virtual std::vector<std::vector<int64_t>> GetAttrInt2DVec(std::string name) = 0;
  virtual std::vector<std::vector<float>> GetAttrFloat2DVec(std::string name) = 0;

  std::vector<size_t> workspace_;
  AotKernelData *kernel_data_{nullptr};
};

template <>
inline bool AotExtra::Attr<bool>(std::string name) { return GetAttrBool(name); }
template <>
inline int64_t AotExtra::Attr<int64_t>(std::string name) { return GetAttrInt(name); }
template <>
inline float AotExtra::Attr<float>(std::string name) { return GetAttrFloat(name); }
template <>
inline std::string AotExtra::Attr<std::string>(std::string name) { return GetAttrStr(name); }

namespace ms_xent {

// Element types MindSpore passes as dtype strings.
enum class DType { kFloat32, kFloat16, kBFloat16, kInt32, kInt64, kUnsupported };

inline DType ParseDType(const char *name) {
  if (std::strcmp(name, "float32") == 0) return DType::kFloat32;
  if (std::strcmp(name, "float16") == 0) return DType::kFloat16;
  if (std::strcmp(name, "bfloat16") == 0) return DType::kBFloat16;
  if (std::strcmp(name, "int32") == 0) return DType::kInt32;
  if (std::strcmp(name, "int64") == 0) return DType::kInt64;
  return DType::kUnsupported;
}

// Kernel return codes; MindSpore turns any non-zero value into a RuntimeError.
constexpr int kOk = 0;
constexpr int kBadArguments = 1;
constexpr int kTargetOutOfRange = 2;
constexpr int kWeightNotFinite = 3;

// The attributes a kernel's <Name>Init stored in `extra` (an AotExtra*), or the defaults of
// Attrs when there are none (extra is null, or Init did not run).
template <typename Attrs>
const Attrs &KernelAttrs(void *extra) {
  static const Attrs kDefaults;
  const AotKernelData *data = extra ? static_cast<AotExtra *>(extra)->KernelData() : nullptr;
  return data ? *static_cast<const Attrs *>(data) : kDefaults;
}

// Number of elements of a tensor given its shape.
inline int64_t NumElements(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

// Prints a message that starts with the kernel name, for errors that the Python layer
// could not catch before the kernel ran (graph mode, where values are unknown at trace time).
#define MS_XENT_REPORT(kernel, ...)                  \
  do {                                               \
    std::fprintf(stderr, "ms_xent %s: ", kernel);    \
    std::fprintf(stderr, __VA_ARGS__);               \
    std::fprintf(stderr, "\n");                      \
  } while (0)

}  // namespace ms_xent
