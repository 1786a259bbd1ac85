// SPDX-License-Identifier: Apache-2.0
//! \file gemm.cuh
//! Matrix products of the CUDA backend through cuBLASLt: a column-major strided-batched
//! D = alpha op(A) op(B) + beta C (+ bias per row of D), with the algorithm chosen once per
//! (shape, layout, alignment, epilogue) by cuBLASLt's heuristic and cached. fp32 operands compute
//! in exact fp32 unless the context opts into TF32; fp64 in fp64.
#pragma once

#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include "unidiffuser/backend/cuda/runtime.cuh"
#include "unidiffuser/core/dtype.hpp"

namespace unidiffuser::cuda_detail {

template <class T>
struct blas_traits;
template <>
struct blas_traits<float> {
  static constexpr cudaDataType_t data = CUDA_R_32F, scale = CUDA_R_32F;
  static cublasComputeType_t compute(bool tf32) {
    return tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  }
  using scalar = float;
};
template <>
struct blas_traits<double> {
  static constexpr cudaDataType_t data = CUDA_R_64F, scale = CUDA_R_64F;
  static cublasComputeType_t compute(bool) { return CUBLAS_COMPUTE_64F; }
  using scalar = double;
};

//! bf16 / fp16 storage with fp32 accumulation and fp32 scalars.
template <>
struct blas_traits<bfloat16_t> {
  static constexpr cudaDataType_t data = CUDA_R_16BF, scale = CUDA_R_32F;
  static cublasComputeType_t compute(bool) { return CUBLAS_COMPUTE_32F; }
  using scalar = float;
};
template <>
struct blas_traits<half_t> {
  static constexpr cudaDataType_t data = CUDA_R_16F, scale = CUDA_R_32F;
  static cublasComputeType_t compute(bool) { return CUBLAS_COMPUTE_32F; }
  using scalar = float;
};

//! One operand of a product: column-major [rows, cols] with leading dimension ld, batch stride.
template <class P>
struct Mat {
  P data;
  std::int64_t rows, cols, ld, stride;
};

//! D[m, n] = alpha op(A) op(B) + beta C, C = D (in place), `batch` products; bias (length m,
//! may be null) added to every column of D. A: op(A) is [m, k]; B: op(B) is [k, n]. Operands of
//! type TA, result and bias of type TD (bf16 / fp16 operands with an fp32 result: mixed).
template <class TA, class TD = TA>
struct Gemm {
  bool ta = false, tb = false;
  Mat<const TA*> a{}, b{};
  Mat<TD*> d{};
  std::int64_t batch = 1;
  double alpha = 1, beta = 0;
  const TD* bias = nullptr;
};

// Largest power of two (<= 256) dividing the address, the leading dimension and the batch stride
// in bytes: the alignment every row and every product of the batch has.
inline int alignment_of(const void* p, std::int64_t ld_bytes, std::int64_t stride_bytes = 0) {
  auto v = reinterpret_cast<std::uintptr_t>(p) | static_cast<std::uintptr_t>(ld_bytes) |
           static_cast<std::uintptr_t>(stride_bytes);
  int a = 256;
  while (a > 1 && (v % static_cast<std::uintptr_t>(a))) a >>= 1;
  return a;
}

struct GemmKey {
  int device, dtype, dtype_d, ta, tb, tf32, epi, beta1;
  std::int64_t ar, ac, alda, as, br, bc, bld, bs, dr, dc, dld, ds, batch;
  int al_a, al_b, al_d, al_bias;
  auto tie() const {
    return std::make_tuple(device, dtype, dtype_d, ta, tb, tf32, epi, beta1, ar, ac, alda, as, br,
                           bc, bld, bs, dr, dc, dld, ds, batch, al_a, al_b, al_d, al_bias);
  }
  bool operator<(const GemmKey& o) const { return tie() < o.tie(); }
};

struct LtObjects {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  ~LtObjects() {
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

inline constexpr std::size_t kGemmWorkspace = std::size_t(32) << 20;

template <class P>
void make_layout(cublasLtMatrixLayout_t* l, cudaDataType_t t, const Mat<P>& m, std::int64_t batch,
                 const char* op) {
  check_blas(cublasLtMatrixLayoutCreate(l, t, static_cast<std::uint64_t>(m.rows),
                                        static_cast<std::uint64_t>(m.cols), m.ld),
             op, "matrix layout");
  if (batch > 1) {
    const auto count = static_cast<std::int32_t>(batch);
    check_blas(cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count,
                                                sizeof(count)),
               op, "batch count");
    check_blas(cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                &m.stride, sizeof(m.stride)),
               op, "batch stride");
  }
}

//! Runs one (batched) product on the context's stream.
template <class T, class TD>
void gemm(const Context<cuda>& ctx, const Gemm<T, TD>& g, const char* op) {
  using tr = blas_traits<T>;
  using trd = blas_traits<TD>;
  const std::int64_t m = g.d.rows, n = g.d.cols;
  if (m == 0 || n == 0 || g.batch == 0) return;
  if (g.batch > INT32_MAX) throw error(op, "batch", "more than 2^31 - 1 products");
  LtObjects o;
  const bool tf32 = ctx.math == MathMode::tf32 && std::is_same_v<T, float>;
  const cublasComputeType_t ct = tr::compute(tf32);
  check_blas(cublasLtMatmulDescCreate(&o.op, ct, tr::scale), op, "matmul descriptor");
  const cublasOperation_t ta = g.ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                          tb = g.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  check_blas(cublasLtMatmulDescSetAttribute(o.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), op,
             "transa");
  check_blas(cublasLtMatmulDescSetAttribute(o.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), op,
             "transb");
  const cublasLtEpilogue_t epi = g.bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  check_blas(cublasLtMatmulDescSetAttribute(o.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)),
             op, "epilogue");
  if (g.bias) {
    check_blas(cublasLtMatmulDescSetAttribute(o.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias,
                                              sizeof(g.bias)),
               op, "bias pointer");
    const cudaDataType_t bt = trd::data;  // the bias has the result's type
    check_blas(
        cublasLtMatmulDescSetAttribute(o.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof(bt)),
        op, "bias type");
  }
  make_layout(&o.a, tr::data, g.a, g.batch, op);
  make_layout(&o.b, tr::data, g.b, g.batch, op);
  make_layout(&o.d, trd::data, g.d, g.batch, op);

  const GemmKey key{current_device(op),
                    static_cast<int>(tr::data),
                    static_cast<int>(trd::data),
                    g.ta,
                    g.tb,
                    tf32,
                    static_cast<int>(epi),
                    g.beta != 0,
                    g.a.rows,
                    g.a.cols,
                    g.a.ld,
                    g.a.stride,
                    g.b.rows,
                    g.b.cols,
                    g.b.ld,
                    g.b.stride,
                    g.d.rows,
                    g.d.cols,
                    g.d.ld,
                    g.d.stride,
                    g.batch,
                    alignment_of(g.a.data, g.a.ld * sizeof(T), g.a.stride * sizeof(T)),
                    alignment_of(g.b.data, g.b.ld * sizeof(T), g.b.stride * sizeof(T)),
                    alignment_of(g.d.data, g.d.ld * sizeof(TD), g.d.stride * sizeof(TD)),
                    g.bias ? alignment_of(g.bias, 0) : 256};
  static std::mutex mu;
  static std::map<GemmKey, cublasLtMatmulAlgo_t> algos;
  cublasLtMatmulAlgo_t algo;
  bool found = false;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = algos.find(key);
    if (it != algos.end()) {
      algo = it->second;
      found = true;
    }
  }
  if (!found) {
    cublasLtMatmulPreference_t pref = nullptr;
    check_blas(cublasLtMatmulPreferenceCreate(&pref), op, "preference");
    const std::uint64_t ws = kGemmWorkspace;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                         sizeof(ws));
    const std::uint32_t aa = static_cast<std::uint32_t>(key.al_a),
                        ab = static_cast<std::uint32_t>(key.al_b),
                        ad = static_cast<std::uint32_t>(key.al_d);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aa,
                                         sizeof(aa));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab,
                                         sizeof(ab));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ad,
                                         sizeof(ad));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ad,
                                         sizeof(ad));
    cublasLtMatmulHeuristicResult_t res{};
    int count = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt_handle(), o.op, o.a, o.b, o.d, o.d,
                                                             pref, 1, &res, &count);
    cublasLtMatmulPreferenceDestroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS || count == 0)
      throw error(op, "cuBLASLt",
                  "no algorithm for a [" + std::to_string(m) + ", " + std::to_string(n) +
                      "] product (k " + std::to_string(g.ta ? g.a.rows : g.a.cols) + ", batch " +
                      std::to_string(g.batch) + ")");
    algo = res.algo;
    std::lock_guard<std::mutex> lock(mu);
    algos.emplace(key, algo);
  }
  Scratch ws(ctx, kGemmWorkspace, op);
  const typename tr::scalar alpha = static_cast<typename tr::scalar>(g.alpha),
                            beta = static_cast<typename tr::scalar>(g.beta);
  check_blas(
      cublasLtMatmul(lt_handle(), o.op, &alpha, g.a.data, o.a, g.b.data, o.b, &beta, g.d.data, o.d,
                     g.d.data, o.d, &algo, ws.as<void>(), kGemmWorkspace, ctx.stream),
      op, "cublasLtMatmul");
}

}  // namespace unidiffuser::cuda_detail
