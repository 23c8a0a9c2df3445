// The fused requantize epilogue of qjax's native int8 kernels (amx_gemm.cc,
// onednn_ukernel.cc): int32 accumulators -> 8-bit codes, per output column n, one
// implementation of qjax.kernels._schemes._apply_fbgemm, step for step:
//   a = acc + ivec[n]                       int32, wrapping (XLA's int32 add)
//   y = f32(a) + fvec[n]                    (round to nearest even)
//   r = rint(f32(y * mult[n]))              round half to even
//   v = NaN ? 0 : min(max(r, flo), fhi)     jnp.clip then astype(int32): NaN -> 0
//   code = (int8/uint8)(int32(v) + zp)      the low byte (XLA's integer convert)
// "qnnpack" is the same with ivec = corr + b_q and fvec = 0 (f32(a) + 0 == f32(a)).
// kind 1, "onednn" (rule 13; qjax.kernels._schemes._apply_onednn; oneDNN ukernel only):
//   y = f32(f32(f32(a) * sx) * mult[n]) + fvec[n]     (mult = s_w', fvec = b or 0)
//   r = rint(f32(f32(y * inv_so) + zpf))              the zero point before rounding
//   code = (int8/uint8)(int32(NaN ? 0 : min(max(r, flo), fhi)))   zp = 0
// Plain AVX-512 operations under the thread's MXCSR (as XLA's own code); every library
// including this is built with -ffp-contract=off, so y * mult is never fused into the add.
// Requant256 is the same steps on AVX2 registers (the saturating kernel's AVX2 path,
// sat16_gemm.cc, for CPUs without AVX-512), 8 columns at a time.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "xla/ffi/api/ffi.h"

struct Epilogue {
  const int32_t* ivec;
  const float* fvec;
  const float* mult;
  float flo, fhi;
  int32_t zp;
  int kind = 0;  // 0: fbgemm / qnnpack, 1: onednn (the fields below)
  float sx = 0.0f, inv_so = 0.0f, zpf = 0.0f;
};

// The epilogue of a call from its operands, checked against its n output columns:
// ivec int32 (n,), fvec / mult float32 (n,), zp int32 (1,); clamp float32 (2,) = (lo - zp,
// hi - zp) for fbgemm / qnnpack (kind 0), (5,) = (lo, hi, s_x', f32(1 / s_out), zp as
// float) for onednn (kind 1, zp = 0).
inline xla::ffi::Error MakeEpilogue(const std::string& who, size_t n,
                                    xla::ffi::Buffer<xla::ffi::S32>& ivec,
                                    xla::ffi::Buffer<xla::ffi::F32>& fvec,
                                    xla::ffi::Buffer<xla::ffi::F32>& mult,
                                    xla::ffi::Buffer<xla::ffi::F32>& clamp,
                                    xla::ffi::Buffer<xla::ffi::S32>& zp, Epilogue* e) {
  if (ivec.element_count() != n || fvec.element_count() != n || mult.element_count() != n ||
      (clamp.element_count() != 2 && clamp.element_count() != 5) || zp.element_count() != 1)
    return xla::ffi::Error::InvalidArgument(
        who + ": epilogue vectors must be (N,) for N = " + std::to_string(n) +
        " output columns, clamp (2,) or (5,), zp (1,)");
  const float* c = clamp.typed_data();
  *e = Epilogue{ivec.typed_data(), fvec.typed_data(), mult.typed_data(), c[0], c[1],
                zp.typed_data()[0]};
  if (clamp.element_count() == 5) e->kind = 1, e->sx = c[2], e->inv_so = c[3], e->zpf = c[4], e->zp = 0;
  return xla::ffi::Error::Success();
}

// acc: rows x cols int32 (row stride lda) of the layer's columns col.. col + cols;
// dst: their codes (row stride ld). AVX-512 by attribute: the libraries that include this
// stay loadable on CPUs without it and call it only where it runs.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void Requant(
    const int32_t* acc, int64_t lda, int64_t rows, int64_t cols, uint8_t* dst, int64_t ld,
    const Epilogue& e, int64_t col) {
  for (int64_t c0 = 0; c0 < cols; c0 += 16) {
    int64_t w = cols - c0 < 16 ? cols - c0 : 16;
    __mmask16 m = static_cast<__mmask16>((1u << w) - 1);
    __m512i iv = _mm512_maskz_loadu_epi32(m, e.ivec + col + c0);
    __m512 fv = _mm512_maskz_loadu_ps(m, e.fvec + col + c0);
    __m512 mu = _mm512_maskz_loadu_ps(m, e.mult + col + c0);
    __m512 lo = _mm512_set1_ps(e.flo);
    __m512 hi = _mm512_set1_ps(e.fhi);
    __m512i zp = _mm512_set1_epi32(e.zp);
    __m512 sx = _mm512_set1_ps(e.sx), inv_so = _mm512_set1_ps(e.inv_so);
    __m512 zpf = _mm512_set1_ps(e.zpf);
    for (int64_t i = 0; i < rows; ++i) {
      __m512i a = _mm512_add_epi32(_mm512_maskz_loadu_epi32(m, acc + i * lda + c0), iv);
      __m512 r;
      if (e.kind == 1) {
        __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a), sx), mu);
        y = _mm512_add_ps(y, fv);
        __m512 p = _mm512_add_ps(_mm512_mul_ps(y, inv_so), zpf);
        r = _mm512_roundscale_ps(p, _MM_FROUND_TO_NEAREST_INT);
      } else {
        __m512 y = _mm512_add_ps(_mm512_cvtepi32_ps(a), fv);
        r = _mm512_roundscale_ps(_mm512_mul_ps(y, mu), _MM_FROUND_TO_NEAREST_INT);
      }
      __mmask16 nan = _mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q);
      __m512 v = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
      __m512i q = _mm512_maskz_mov_epi32(static_cast<__mmask16>(~nan), _mm512_cvttps_epi32(v));
      // narrowed in a register, then one plain 16-byte store for a whole block: the
      // masked vpmovdb to memory was the epilogue's bottleneck on AMD Zen 5
      __m128i b = _mm512_cvtepi32_epi8(_mm512_add_epi32(q, zp));
      if (w == 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i * ld + c0), b);
      else _mm_mask_storeu_epi8(dst + i * ld + c0, m, b);
    }
  }
}

// Requant on AVX2 registers: the same steps in the same order, 8 columns at a time; the
// low byte of each int32 code gathered by a byte shuffle (what vpmovdb stores).
__attribute__((target("avx2"))) inline void Requant256(
    const int32_t* acc, int64_t lda, int64_t rows, int64_t cols, uint8_t* dst, int64_t ld,
    const Epilogue& e, int64_t col) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  // bytes 0, 4, 8, 12 of each 128-bit lane, then both lanes' four side by side
  const __m256i low = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                       -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1,
                                       -1, -1, -1, -1);
  const __m256i join = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
  const __m256 lo = _mm256_set1_ps(e.flo), hi = _mm256_set1_ps(e.fhi);
  const __m256i zp = _mm256_set1_epi32(e.zp);
  const __m256 sx = _mm256_set1_ps(e.sx), inv_so = _mm256_set1_ps(e.inv_so);
  const __m256 zpf = _mm256_set1_ps(e.zpf);
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t c0 = 0; c0 < cols; c0 += 8) {
    int64_t w = cols - c0 < 8 ? cols - c0 : 8;
    __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(w)), lanes);
    __m256i iv = _mm256_maskload_epi32(e.ivec + col + c0, m);
    __m256 fv = _mm256_maskload_ps(e.fvec + col + c0, m);
    __m256 mu = _mm256_maskload_ps(e.mult + col + c0, m);
    for (int64_t i = 0; i < rows; ++i) {
      __m256i a = _mm256_add_epi32(_mm256_maskload_epi32(acc + i * lda + c0, m), iv);
      __m256 r;
      if (e.kind == 1) {
        __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a), sx), mu);
        y = _mm256_add_ps(y, fv);
        r = _mm256_round_ps(_mm256_add_ps(_mm256_mul_ps(y, inv_so), zpf), kRound);
      } else {
        __m256 y = _mm256_add_ps(_mm256_cvtepi32_ps(a), fv);
        r = _mm256_round_ps(_mm256_mul_ps(y, mu), kRound);
      }
      __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(r, r, _CMP_UNORD_Q));
      __m256 v = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
      __m256i q = _mm256_andnot_si256(nan, _mm256_cvttps_epi32(v));
      __m256i b = _mm256_permutevar8x32_epi32(
          _mm256_shuffle_epi8(_mm256_add_epi32(q, zp), low), join);
      int64_t bytes = _mm_cvtsi128_si64(_mm256_castsi256_si128(b));
      std::memcpy(dst + i * ld + c0, &bytes, static_cast<size_t>(w));
    }
  }
}
