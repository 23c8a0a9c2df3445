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
#pragma once

#include <immintrin.h>

#include <cstdint>

struct Epilogue {
  const int32_t* ivec;
  const float* fvec;
  const float* mult;
  float flo, fhi;
  int32_t zp;
  int kind = 0;  // 0: fbgemm / qnnpack, 1: onednn (the fields below)
  float sx = 0.0f, inv_so = 0.0f, zpf = 0.0f;
};

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
