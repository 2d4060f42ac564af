// Matrix products for the fused linear + cross-entropy kernel, through the oneDNN library that
// ships inside the MindSpore wheel (mindspore/lib/libdnnl.so.3), opened at run time with dlopen:
// the kernel library itself does not link against it, so the other kernels load without it.
//
// oneDNN's C API computes, row-major,
//   C[M, N] = alpha * op(A)[M, K] @ op(B)[K, N] + beta * C,   op(X) = X ('N') or X^T ('T'),
// with float32 operands (dnnl_sgemm) or bfloat16 operands and float32 accumulation and result
// (dnnl_gemm_bf16bf16f32; AMX / AVX512-BF16 where the CPU has them). beta = 1 accumulates in
// place, which MindSpore's CPU MatMul cannot do.
//
// The copy in MindSpore 2.9's wheel runs single-threaded when called this way (measured here:
// 160 GFLOP/s float32 on one core with OMP_NUM_THREADS 1 or 2). ParallelGemm therefore splits a
// product into slices shared by the OpenMP threads (about 290 GFLOP/s on the 2 cores).
#pragma once

#include <dlfcn.h>
#include <omp.h>

#include <cstdint>
#include <cstdio>
#include <mutex>
#include <string>
#include <type_traits>

#include "vec_math.h"

namespace ms_xent {

struct OneDnnGemm {
  using Sgemm = int (*)(char, char, int64_t, int64_t, int64_t, float, const float *, int64_t,
                        const float *, int64_t, float, float *, int64_t);
  using Bf16Gemm = int (*)(char, char, int64_t, int64_t, int64_t, float, const uint16_t *,
                           int64_t, const uint16_t *, int64_t, float, float *, int64_t);
  Sgemm sgemm = nullptr;
  Bf16Gemm bf16_gemm = nullptr;
};

// The two entry points of the library at `path`, or null (with a message on stderr) when it
// cannot be opened or lacks them. Opened once per process; a second path is refused.
inline const OneDnnGemm *LoadOneDnnGemm(const std::string &path) {
  static std::mutex mutex;
  static std::string loaded_path;
  static OneDnnGemm gemm;
  std::lock_guard<std::mutex> lock(mutex);
  if (!loaded_path.empty()) return path == loaded_path ? &gemm : nullptr;
  void *handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    std::fprintf(stderr, "ms_xent linear_cross_entropy: cannot open %s: %s\n", path.c_str(),
                 dlerror());
    return nullptr;
  }
  gemm.sgemm = reinterpret_cast<OneDnnGemm::Sgemm>(dlsym(handle, "dnnl_sgemm"));
  gemm.bf16_gemm = reinterpret_cast<OneDnnGemm::Bf16Gemm>(dlsym(handle, "dnnl_gemm_bf16bf16f32"));
  if (gemm.sgemm == nullptr || gemm.bf16_gemm == nullptr) {
    std::fprintf(stderr, "ms_xent linear_cross_entropy: %s lacks dnnl_sgemm / "
                 "dnnl_gemm_bf16bf16f32\n", path.c_str());
    return nullptr;
  }
  loaded_path = path;
  return &gemm;
}

// Operand types the products take: float32, or bfloat16 (with float32 accumulation).
inline int CallGemm(const OneDnnGemm &lib, char trans_a, char trans_b, int64_t M, int64_t N,
                    int64_t K, float alpha, const float *A, int64_t lda, const float *B,
                    int64_t ldb, float beta, float *C, int64_t ldc) {
  return lib.sgemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

inline int CallGemm(const OneDnnGemm &lib, char trans_a, char trans_b, int64_t M, int64_t N,
                    int64_t K, float alpha, const BFloat16 *A, int64_t lda, const BFloat16 *B,
                    int64_t ldb, float beta, float *C, int64_t ldc) {
  return lib.bf16_gemm(trans_a, trans_b, M, N, K, alpha, reinterpret_cast<const uint16_t *>(A),
                       lda, reinterpret_cast<const uint16_t *>(B), ldb, beta, C, ldc);
}

// Slices per OpenMP thread in ParallelGemm: taken dynamically, so that a thread the OS takes
// off its core (MindSpore's PyNative main thread spins while it waits for a kernel) leaves its
// share to the others instead of holding everyone at the end of the product.
constexpr int64_t kSlicesPerThread = 2;
constexpr int64_t kMinSlice = 64;

// C[M, N] = alpha * op(A) @ op(B) + beta * C, the larger of M and N cut into slices (whole
// multiples of 16, so each call keeps full vector tiles), one single-threaded oneDNN call per
// slice. A slice of rows of C is a slice of rows of op(A) (rows of A, or columns of A when
// transposed); a slice of columns of C is a slice of columns of op(B). Returns 0 or the
// bitwise or of the non-zero oneDNN statuses.
template <typename G>
int ParallelGemm(const OneDnnGemm &lib, bool trans_a, bool trans_b, int64_t M, int64_t N,
                 int64_t K, float alpha, const G *A, int64_t lda, const G *B, int64_t ldb,
                 float beta, float *C, int64_t ldc) {
  const char op_a = trans_a ? 'T' : 'N';
  const char op_b = trans_b ? 'T' : 'N';
  const bool split_rows = M >= N;
  const int64_t extent = split_rows ? M : N;
  const int64_t slices = omp_get_max_threads() * kSlicesPerThread;
  int64_t slice = ((extent + slices - 1) / slices + 15) / 16 * 16;
  slice = slice < kMinSlice ? kMinSlice : slice;
  const int64_t count = (extent + slice - 1) / slice;
  int status = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : status) if (count > 1)
  for (int64_t index = 0; index < count; ++index) {
    const int64_t begin = index * slice;
    const int64_t size = begin + slice < extent ? slice : extent - begin;
    if (split_rows) {
      const G *a = trans_a ? A + begin : A + begin * lda;
      status |= CallGemm(lib, op_a, op_b, size, N, K, alpha, a, lda, B, ldb, beta,
                         C + begin * ldc, ldc);
    } else {
      const G *b = trans_b ? B + begin * ldb : B + begin;
      status |= CallGemm(lib, op_a, op_b, M, size, K, alpha, A, lda, b, ldb, beta, C + begin,
                         ldc);
    }
  }
  return status;
}

}  // namespace ms_xent
