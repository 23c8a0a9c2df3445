// qjax native uint8 x int8 GEMM with int16 pair saturation (AVX2 / AVX-512BW), an XLA
// FFI call.
//
//   out[m, n] = sum_j sat16(x[m, 2j] * w[2j, n] + x[m, 2j+1] * w[2j+1, n])
//
// exactly what FBGEMM and oneDNN compute on CPUs without VNNI: vpmaddubsw multiplies
// unsigned by signed bytes and adds adjacent products with int16 saturation; two such
// pair sums are then added exactly into int32. K runs past its end with zeros (a zero
// pair adds 0), so any K works, odd included.
//
// Three code paths, one packed layout, the same integers (attribute "isa"):
//   0  AVX2:          vpmaddubsw ymm, vpmaddwd ymm (with ones), vpaddd ymm;
//   1  AVX-512BW:     vpmaddubsw zmm, vpmaddwd zmm (with ones), vpaddd zmm;
//   2  AVX-512-VNNI:  vpmaddubsw zmm, vpdpwssd zmm (with ones): acc + t[2i]*1 + t[2i+1]*1,
//                     non-saturating (vpdpwssds would saturate), i.e. the same wrapping
//                     int32 sum as vpmaddwd + vpaddd.
// vpmaddubsw is the same instruction per 128-bit lane at every width, so every path
// saturates the same pairs. The AVX-512 functions carry target attributes (the library
// is compiled with -mavx2 only and loads on AVX2 CPUs); a call asking for a path the CPU
// lacks (__builtin_cpu_supports) is refused with an error.
//
// Attribute "exact" = 1: the exact sums out[m, n] = sum_k x[m, k] * w[k, n] (int32,
// wrapping) on the same packed weight, for any uint8 codes. Each 32-bit lane's four
// bytes are widened in registers to two int16 pairs (bytes 0, 2 and bytes 1, 3: the
// weight's sign-extended, the codes zero-extended) and multiplied by two vpmaddwd, whose
// pair sums are exact int32 (|x·w| <= 255·128), on every path (the VNNI one included:
// vpdpwssd twice into one accumulator chains its latency, and vpdpbusd, VNNI's exact
// byte dot, measured slower in this blocking on the Zen 5 test host; VNNI CPUs run
// oneDNN's kernel). The same multiplies per multiply-add as the saturating path below
// VNNI, plus the widening shifts: ~1.4x its time at batch 256.
//
// x:   uint8 (..., M, K) row-major; with an unbatched weight every leading dim folds into
//      M (vmap's "expand_dims"); with a batch of B weights (convolution groups) x is
//      (..., B, M, K) and out (..., B, M, N).
// wp:  int8 (..., B, Nb, K4, 64) prepacked once by qjax, leading dims all 1:
//        wp[b, nb, k4, 4 * c + q] = w[b][4 * k4 + q, 16 * nb + c]
//      zero where the index runs past K or N. One (nb, k4) row is two ymm registers (the
//      four K values of eight columns each, the order vpmaddubsw + vpmaddwd sum), or one
//      zmm register holding all 16 columns.
// out: int32 (..., M, N).
//
// qjax_sat16_q8_gemm: the same sums through the requantize epilogue of qjax's other
// native kernels (epilogue.h, the formulas there), one unbatched weight, 8-bit codes out:
// each register block of at most 4 x 32 accumulators is stored to a stack tile and
// requantized at once (the AVX-512 epilogue on the AVX-512 paths, its AVX2 twin on the
// AVX2 path), so the int32 matrix is never written.
//
// qjax_sat16_q8_conv: the same for a 2-D conv with one group, the im2col rows read in
// place from the padded NHWC input (each output position's taps at their offsets), so
// the patches are never written either.
//
// Exactness: every pair sum is saturated exactly as the hardware does (it IS the
// hardware instruction); the int32 additions wrap, exact whenever the true sum fits,
// which qjax's overflow check guarantees at prepare time.
#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "epilogue.h"
#include "threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kNB = 16;   // output columns per packed block (two ymm of 8 int32)
constexpr int kMR = 4;    // rows per register block

// Where a register block's accumulators go: the int32 matrix (acc), or the epilogue into
// the codes (codes, e); n is the row stride of both.
// oneDNN's zero-point term over the valid taps only (accumulate="onednn_sat16"): the
// conv runs on the zero-padded input and the epilogue's ivec holds -zp_x * (sum over
// every tap), so an output position whose taps read padding gets zp_x * wtap[t, o] back
// for each such tap t (wtap[t, o] = sum_c w[t, c, o]): acc - zp_x * (sum over the valid
// taps), in wrapping int32 as XLA's. Interior positions are left alone.
struct Border {
  const int32_t* zwtap = nullptr;  // zp_x * wtap (kh * kw, O), wrapping
  const uint8_t* edge = nullptr;   // per output position: 1 where a tap reads padding
  int64_t o = 0, ohw = 0, ow = 0, kh = 0, kw = 0, sh = 0, sw = 0, dh = 0, dw = 0;
  int64_t pt = 0, pl = 0, h = 0, w = 0;  // padding top / left, unpadded height / width

  void Fix(int32_t* tile, int64_t ldt, int64_t rows, int64_t cols, int64_t pos,
           int64_t col) const {
    for (int64_t r = 0; r < rows; ++r) {
      if (!edge[pos + r]) continue;
      int64_t rem = (pos + r) % ohw;
      int64_t y0 = rem / ow * sh - pt, x0 = rem % ow * sw - pl;
      uint32_t* t = reinterpret_cast<uint32_t*>(tile + r * ldt);
      for (int64_t a = 0; a < kh; ++a) {
        for (int64_t b = 0; b < kw; ++b) {
          int64_t y = y0 + a * dh, x = x0 + b * dw;
          if (y >= 0 && y < h && x >= 0 && x < w) continue;
          const uint32_t* zw = reinterpret_cast<const uint32_t*>(zwtap + (a * kw + b) * o + col);
          for (int64_t c = 0; c < cols; ++c) t[c] += zw[c];
        }
      }
    }
  }
};

struct Sink {
  int32_t* acc = nullptr;
  uint8_t* codes = nullptr;
  const Epilogue* e = nullptr;
  const Border* border = nullptr;  // onednn_sat16 convs
  int64_t n = 0;
  int64_t row0 = 0;  // the output position of the sink's row 0 (Border)
  bool avx512 = false;  // the epilogue's AVX-512 code (else AVX2)

  // rows x cols of a tile (row stride ldt) are the accumulators of (row.., col..)
  void Requantize(int32_t* tile, int64_t ldt, int64_t rows, int64_t cols, int64_t row,
                  int64_t col) const {
    if (border != nullptr) border->Fix(tile, ldt, rows, cols, row0 + row, col);
    uint8_t* d = codes + row * n + col;
    if (avx512) Requant(tile, ldt, rows, cols, d, n, *e, col);
    else Requant256(tile, ldt, rows, cols, d, n, *e, col);
  }
};

inline __m256i Bcast4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Where the rows of x are. A GEMM's row i is at x + i * lda, its K values in one run.
// An implicit-im2col conv's row i is output position (n, oh, ow) at x + n * img +
// oh * rstep + ow * cstep of the padded NHWC input, its K values tap by tap (FBGEMM's
// im2col order): tap t's c4 groups of four channels at + tapoff[t]. A GEMM is one tap
// at offset 0 with c4 = K4.
struct XRows {
  const uint8_t* x = nullptr;
  int64_t lda = 0;
  const int64_t* tapoff = nullptr;
  int64_t ntaps = 1, c4 = 0;
  int64_t ohw = 0, ow = 0, img = 0, rstep = 0, cstep = 0;  // conv when ohw > 0

  // Rows i.. i + R - 1: divisions for the first only, then steps (a conv's division per
  // row cost more than the rest of its bookkeeping)
  template <int R>
  void Rows(int64_t i, const uint8_t** p) const {
    if (ohw == 0) {
      for (int r = 0; r < R; ++r) p[r] = x + (i + r) * lda;
      return;
    }
    const int64_t oh_n = ohw / ow;
    int64_t rem = i % ohw, oh = rem / ow, c = rem % ow;
    const uint8_t* line = x + i / ohw * img + oh * rstep;
    for (int r = 0; r < R; ++r) {
      p[r] = line + c * cstep;
      if (++c < ow) continue;
      c = 0;
      if (++oh < oh_n) {
        line += rstep;
      } else {  // the next image's first output row
        oh = 0;
        line += img - (oh_n - 1) * rstep;
      }
    }
  }
};

// R rows (R <= kMR) from row `row` of xr x 16 columns; weight block w (K4 x 64 bytes).
// Writes ncols (<= 16) columns per row.
template <int R, bool EXACT>
void Kernel(const XRows& xr, int64_t row, const int8_t* w, int32_t* out, int64_t ldo,
            int ncols) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i lo8 = _mm256_set1_epi16(0x00FF);
  const uint8_t* xp[R];
  xr.Rows<R>(row, xp);
  __m256i acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_si256();
  for (int64_t t = 0; t < xr.ntaps; ++t) {
    const int64_t off = xr.tapoff[t];
    for (int64_t k = 0; k < xr.c4; ++k, w += 64) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
      if constexpr (EXACT) {  // bytes 0, 2 / 1, 3 of each lane as int16 pairs
        const __m256i w0e = _mm256_srai_epi16(_mm256_slli_epi16(w0, 8), 8);
        const __m256i w0o = _mm256_srai_epi16(w0, 8);
        const __m256i w1e = _mm256_srai_epi16(_mm256_slli_epi16(w1, 8), 8);
        const __m256i w1o = _mm256_srai_epi16(w1, 8);
        for (int r = 0; r < R; ++r) {
          const __m256i xb = Bcast4(xp[r] + off + 4 * k);
          const __m256i xe = _mm256_and_si256(xb, lo8), xo = _mm256_srli_epi16(xb, 8);
          acc0[r] = _mm256_add_epi32(
              acc0[r], _mm256_add_epi32(_mm256_madd_epi16(xe, w0e), _mm256_madd_epi16(xo, w0o)));
          acc1[r] = _mm256_add_epi32(
              acc1[r], _mm256_add_epi32(_mm256_madd_epi16(xe, w1e), _mm256_madd_epi16(xo, w1o)));
        }
        continue;
      }
      for (int r = 0; r < R; ++r) {
        const __m256i xb = Bcast4(xp[r] + off + 4 * k);
        acc0[r] =
            _mm256_add_epi32(acc0[r], _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w0), ones));
        acc1[r] =
            _mm256_add_epi32(acc1[r], _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w1), ones));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    int32_t* o = out + r * ldo;
    if (ncols == kNB) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), acc0[r]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 8), acc1[r]);
    } else {
      alignas(32) int32_t tmp[kNB];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), acc0[r]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + 8), acc1[r]);
      std::memcpy(o, tmp, sizeof(int32_t) * ncols);
    }
  }
}

// Rows [row0 + i, ...) of xr into the sink's rows [i, ...).
template <int R, bool EXACT>
void Block(const XRows& xr, int64_t row0, const int8_t* w, int64_t i, int64_t col, int ncols,
           const Sink& s) {
  if (s.codes == nullptr)
    return Kernel<R, EXACT>(xr, row0 + i, w, s.acc + i * s.n + col, s.n, ncols);
  alignas(32) int32_t tile[R * kNB];
  Kernel<R, EXACT>(xr, row0 + i, w, tile, kNB, ncols);
  s.Requantize(tile, kNB, R, ncols, i, col);
}

// One GEMM: m rows of xr from row0, packed w (nb, k4, 64), n columns into s (its row 0
// is row0); column blocks [nb0, nb1).
template <bool EXACT>
void Gemm(const XRows& xr, int64_t row0, int64_t m, const int8_t* wp, int64_t k4, int64_t n,
          const Sink& s, int64_t nb0, int64_t nb1) {
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const int8_t* w = wp + nb * k4 * 64;
    int ncols = static_cast<int>(n - nb * kNB < kNB ? n - nb * kNB : kNB);
    int64_t col = nb * kNB, i = 0;
    for (; i + kMR <= m; i += kMR) Block<kMR, EXACT>(xr, row0, w, i, col, ncols, s);
    switch (m - i) {
      case 3: Block<3, EXACT>(xr, row0, w, i, col, ncols, s); break;
      case 2: Block<2, EXACT>(xr, row0, w, i, col, ncols, s); break;
      case 1: Block<1, EXACT>(xr, row0, w, i, col, ncols, s); break;
      default: break;
    }
  }
}

// ---- AVX-512BW: one zmm is one packed (nb, k4) row, 16 columns. NC (1 or 2) column
// blocks at a time, R rows; VNNI adds the pair sums with vpdpwssd instead of vpmaddwd +
// vpaddd. Only called after __builtin_cpu_supports said yes. Every function is compiled
// for AVX-512F/BW only; vpdpwssd is written as inline assembly, so the compiler cannot
// put a VNNI instruction into the path for CPUs without it.
#define QJAX_AVX512 __attribute__((target("avx512f,avx512bw")))

constexpr int kMR512 = 4;  // rows per register block (R x NC <= 8 accumulators)

template <bool VNNI>
struct Madd512;

template <>
struct Madd512<false> {
  static QJAX_AVX512 inline __m512i Step(__m512i acc, __m512i xb, __m512i w, __m512i ones) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(xb, w), ones));
  }
};

template <>
struct Madd512<true> {
  static QJAX_AVX512 inline __m512i Step(__m512i acc, __m512i xb, __m512i w, __m512i ones) {
    const __m512i t = _mm512_maddubs_epi16(xb, w);
    // acc[i] += t[2i] * 1 + t[2i+1] * 1, wrapping (AT&T operand order: src2, src1, dst)
    asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(t), "v"(ones));
    return acc;
  }
};

template <int R, int NC, bool VNNI, bool EXACT>
QJAX_AVX512 void Kernel512(const XRows& xr, int64_t row, const int8_t* w, int64_t wstride,
                           int32_t* out, int64_t ldo, int ncols_last) {
  const __m512i ones = _mm512_set1_epi16(1);
  const __m512i lo8 = _mm512_set1_epi16(0x00FF);
  const uint8_t* xp[R];
  xr.Rows<R>(row, xp);
  __m512i acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_setzero_si512();
  for (int64_t t = 0; t < xr.ntaps; ++t) {
    const int64_t off = xr.tapoff[t];
    for (int64_t k = 0; k < xr.c4; ++k, w += 64) {
      __m512i wv[NC], wo[NC];
      for (int c = 0; c < NC; ++c) wv[c] = _mm512_loadu_si512(w + c * wstride);
      if constexpr (EXACT) {  // bytes 0, 2 (wv) / 1, 3 (wo) as int16 pairs
        for (int c = 0; c < NC; ++c) {
          wo[c] = _mm512_srai_epi16(wv[c], 8);
          wv[c] = _mm512_srai_epi16(_mm512_slli_epi16(wv[c], 8), 8);
        }
      }
      for (int r = 0; r < R; ++r) {
        int32_t v;
        std::memcpy(&v, xp[r] + off + 4 * k, 4);
        const __m512i xb = _mm512_set1_epi32(v);
        if constexpr (EXACT) {
          const __m512i xe = _mm512_and_si512(xb, lo8), xo = _mm512_srli_epi16(xb, 8);
          for (int c = 0; c < NC; ++c)
            acc[r][c] = _mm512_add_epi32(
                acc[r][c],
                _mm512_add_epi32(_mm512_madd_epi16(xe, wv[c]), _mm512_madd_epi16(xo, wo[c])));
        } else {
          for (int c = 0; c < NC; ++c)
            acc[r][c] = Madd512<VNNI>::Step(acc[r][c], xb, wv[c], ones);
        }
      }
    }
  }
  const __mmask16 last = static_cast<__mmask16>((1u << ncols_last) - 1u);
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < NC; ++c) {
      int32_t* o = out + r * ldo + c * kNB;
      if (c == NC - 1 && ncols_last < kNB)
        _mm512_mask_storeu_epi32(o, last, acc[r][c]);
      else
        _mm512_storeu_si512(o, acc[r][c]);
    }
  }
}

template <int R, int NC, bool VNNI, bool EXACT>
QJAX_AVX512 void Block512(const XRows& xr, int64_t row0, const int8_t* w, int64_t wstride,
                          int64_t i, int64_t col, int ncols_last, const Sink& s) {
  if (s.codes == nullptr)
    return Kernel512<R, NC, VNNI, EXACT>(xr, row0 + i, w, wstride, s.acc + i * s.n + col, s.n,
                                         ncols_last);
  alignas(64) int32_t tile[R * NC * kNB];
  Kernel512<R, NC, VNNI, EXACT>(xr, row0 + i, w, wstride, tile, NC * kNB, ncols_last);
  s.Requantize(tile, NC * kNB, R, (NC - 1) * kNB + ncols_last, i, col);
}

template <int NC, bool VNNI, bool EXACT>
QJAX_AVX512 void Rows512(const XRows& xr, int64_t row0, int64_t m, const int8_t* w,
                         int64_t wstride, int64_t col, int ncols, const Sink& s) {
  int64_t i = 0;
  for (; i + kMR512 <= m; i += kMR512)
    Block512<kMR512, NC, VNNI, EXACT>(xr, row0, w, wstride, i, col, ncols, s);
  switch (m - i) {
    case 3: Block512<3, NC, VNNI, EXACT>(xr, row0, w, wstride, i, col, ncols, s); break;
    case 2: Block512<2, NC, VNNI, EXACT>(xr, row0, w, wstride, i, col, ncols, s); break;
    case 1: Block512<1, NC, VNNI, EXACT>(xr, row0, w, wstride, i, col, ncols, s); break;
    default: break;
  }
}

template <bool VNNI, bool EXACT>
QJAX_AVX512 void Gemm512(const XRows& xr, int64_t row0, int64_t m, const int8_t* wp,
                         int64_t k4, int64_t n, const Sink& s, int64_t nb0, int64_t nb1) {
  const int64_t wstride = k4 * 64;  // bytes between two column blocks
  for (int64_t nb = nb0; nb < nb1;) {
    const int8_t* w = wp + nb * wstride;
    if (nb + 2 <= nb1) {
      int last = static_cast<int>(n - (nb + 1) * kNB < kNB ? n - (nb + 1) * kNB : kNB);
      Rows512<2, VNNI, EXACT>(xr, row0, m, w, wstride, nb * kNB, last, s);
      nb += 2;
    } else {
      int last = static_cast<int>(n - nb * kNB < kNB ? n - nb * kNB : kNB);
      Rows512<1, VNNI, EXACT>(xr, row0, m, w, wstride, nb * kNB, last, s);
      nb += 1;
    }
  }
}

enum Isa : int64_t { kAvx2 = 0, kAvx512 = 1, kAvx512Vnni = 2 };

bool IsaSupported(int64_t isa) {
  __builtin_cpu_init();
  switch (isa) {
    case kAvx2: return __builtin_cpu_supports("avx2");
    case kAvx512: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    case kAvx512Vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vnni");
    default: return false;
  }
}

template <bool EXACT>
void GemmIsa(int64_t isa, const XRows& xr, int64_t row0, int64_t m, const int8_t* wp,
             int64_t k4, int64_t n, const Sink& s, int64_t nb0, int64_t nb1) {
  if (isa == kAvx512Vnni) Gemm512<true, EXACT>(xr, row0, m, wp, k4, n, s, nb0, nb1);
  else if (isa == kAvx512) Gemm512<false, EXACT>(xr, row0, m, wp, k4, n, s, nb0, nb1);
  else Gemm<EXACT>(xr, row0, m, wp, k4, n, s, nb0, nb1);
}

// More threads (threads.h) for calls of >= 2^24 MACs while the helpers sleep between
// calls: measured with a task on XLA's pool on the 2-core AMD EPYC (AVX-512 VNNI host,
// other work running), 784x1024 weight, median ms one / two threads: M=128 0.81 / 0.41,
// M=256 1.58 / 0.82; below ~2^24 MACs the hand-off did not pay (M=32: 0.20 / 0.20).
// From kSpinMacs while they spin (threads.h).
constexpr int64_t kParallelMacs = int64_t{1} << 24;

// Row chunks of tall calls (Dispatch): 128 rows of x (K <= 576 bytes each for a 3x3
// conv over 64 channels) stay in L2 while every column block passes over them.
constexpr int64_t kTallRows = 512;
constexpr int64_t kRowChunk = 128;

// Work items: at most 16 runs of Dispatch's (batch, row chunk, column block) units.
struct Sat16Work : Work {
  std::function<void(int64_t, int64_t)> run;
  int64_t total = 0, chunk = 1;
  void RunItem(int64_t i) override {
    int64_t b = i * chunk, e = b + chunk < total ? b + chunk : total;
    run(b, e);
  }
};

bool IsaError(int64_t isa, const std::string& who, ffi::Error* err) {
  if (IsaSupported(isa)) return false;
  *err = ffi::Error::InvalidArgument(who + ": isa " + std::to_string(isa) +
                                     " (0 avx2, 1 avx512bw, 2 avx512-vnni) is not supported "
                                     "by this CPU");
  return true;
}

// Runs every (batch, row chunk, column block) of `batches` GEMMs of m rows (batch bi's
// rows start at row bi * m of xr, its weight is packed weight bi % b) into s.
ffi::Error Dispatch(ffi::ThreadPool& pool, const std::string& who, const XRows& xr,
                    int64_t batches, int64_t m, int64_t b, const int8_t* w, int64_t nbk,
                    int64_t k4, int64_t n, int64_t k, Sink s, int64_t threads, int64_t isa,
                    bool exact) {
  s.n = n;
  s.avx512 = isa != kAvx2 && __builtin_cpu_supports("avx512vl");  // epilogue.h's Requant
  // Units (batch, row chunk, column block), row-major; a work item is a run of them.
  // Tall calls (a conv's rows: tens of thousands, few columns) take chunks of
  // kRowChunk rows, each with every column block, so a chunk of x is read from memory
  // once rather than once per column block; other calls keep all rows in one chunk and
  // split the column blocks.
  const int64_t mc = m > kTallRows ? kRowChunk : m;
  const int64_t rchunks = (m + mc - 1) / mc;
  auto run = [=](int64_t item0, int64_t item1) {
    for (int64_t it = item0; it < item1;) {
      int64_t bi = it / (rchunks * nbk), rc = it / nbk % rchunks, nb0 = it % nbk;
      int64_t nb1 = nbk;
      if (item1 - it < nb1 - nb0) nb1 = nb0 + (item1 - it);
      int64_t row0 = bi * m + rc * mc, rows = m - rc * mc < mc ? m - rc * mc : mc;
      Sink sb = s;
      if (sb.acc != nullptr) sb.acc += row0 * n;
      if (sb.codes != nullptr) sb.codes += row0 * n;
      sb.row0 = row0;
      const int8_t* wb = w + (bi % b) * nbk * k4 * 64;
      if (exact) GemmIsa<true>(isa, xr, row0, rows, wb, k4, n, sb, nb0, nb1);
      else GemmIsa<false>(isa, xr, row0, rows, wb, k4, n, sb, nb0, nb1);
      it += nb1 - nb0;
    }
  };
  auto job = std::make_shared<Sat16Work>();
  job->run = run;
  job->total = batches * rchunks * nbk;
  job->chunk = (job->total + 15) / 16;
  job->items = (job->total + job->chunk - 1) / job->chunk;
  job->macs = batches * m * n * k;
  if (threads < 2) {  // this thread only
    Drain(*job);
    return ffi::Error::Success();
  }
  return RunItems(pool, job, who.c_str(), kParallelMacs);
}

// One GEMM call: checks the shapes of x, the packed weight and out (od), then runs every
// (batch, column block) into s (s.acc for the int32 call; s.codes, unbatched, for q8).
ffi::Error Sat16Run(ffi::ThreadPool& pool, const std::string& who, ffi::Buffer<ffi::U8>& x,
                    ffi::Buffer<ffi::S8>& wp, ffi::AnyBuffer::Dimensions od, Sink s,
                    int64_t threads, int64_t isa, int64_t exact) {
  ffi::Error err;
  if (IsaError(isa, who, &err)) return err;
  auto xd = x.dimensions();
  auto wd = wp.dimensions();
  if (xd.size() < 1 || wd.size() < 4 || od.size() != xd.size())
    return ffi::Error::InvalidArgument(who + ": bad operand ranks");
  size_t r = wd.size();
  for (size_t i = 0; i + 4 < r; ++i)
    if (wd[i] != 1)
      return ffi::Error::InvalidArgument(who + ": a batched (vmapped) packed weight is not supported");
  int64_t b = wd[r - 4], nbk = wd[r - 3], k4 = wd[r - 2];
  int64_t k = xd.back(), n = od.back();
  if (wd[r - 1] != 64 || nbk != (n + kNB - 1) / kNB || k4 != (k + 3) / 4)
    return ffi::Error::InvalidArgument(who + ": packed weight shape does not match x (K) and out (N)");
  for (size_t i = 0; i + 1 < xd.size(); ++i)
    if (xd[i] != od[i]) return ffi::Error::InvalidArgument(who + ": x / out leading dims differ");
  if (s.codes != nullptr && b != 1)
    return ffi::Error::InvalidArgument(who + ": the fused epilogue takes one (unbatched) weight");
  // outer batches (vmap) x b weights x m rows
  int64_t m = 1, outer = 1;
  if (b == 1) {
    for (size_t i = 0; i + 1 < xd.size(); ++i) m *= xd[i];
  } else {
    if (xd.size() < 3 || xd[xd.size() - 3] != b)
      return ffi::Error::InvalidArgument(who + ": x must be (..., B, M, K) for B packed weights");
    m = xd[xd.size() - 2];
    for (size_t i = 0; i + 3 < xd.size(); ++i) outer *= xd[i];
  }
  XRows xr;
  xr.x = x.typed_data();
  int64_t total = outer * b * m;
  if (total == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    if (s.codes != nullptr)  // qjax refuses K = 0 layers before this
      return ffi::Error::InvalidArgument(who + ": K = 0");
    std::memset(s.acc, 0, sizeof(int32_t) * total * n);
    return ffi::Error::Success();
  }
  // K not a multiple of 4: one zero-padded copy of x, rows of 4 * k4 bytes.
  xr.lda = k;
  std::vector<uint8_t> pad;
  if (k % 4 != 0) {
    xr.lda = 4 * k4;
    pad.assign(total * xr.lda, 0);
    for (int64_t i = 0; i < total; ++i) std::memcpy(&pad[i * xr.lda], xr.x + i * k, k);
    xr.x = pad.data();
  }
  const int64_t zero = 0;
  xr.tapoff = &zero;
  xr.c4 = k4;
  return Dispatch(pool, who, xr, outer * b, m, b, wp.typed_data(), nbk, k4, n, k, s, threads,
                  isa, exact != 0);
}

ffi::Error Sat16GemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> x, ffi::Buffer<ffi::S8> wp,
                         ffi::ResultBuffer<ffi::S32> out, int64_t threads, int64_t isa,
                         int64_t exact) {
  Sink s;
  s.acc = out->typed_data();
  return Sat16Run(pool, "qjax_sat16_gemm", x, wp, out->dimensions(), s, threads, isa, exact);
}

// The sink of a fused call: its n output columns' epilogue e (checked operands) into
// out's 8-bit codes.
ffi::Error CodesSink(const std::string& who, ffi::Result<ffi::AnyBuffer>& out, int64_t n,
                     ffi::Buffer<ffi::S32>& ivec, ffi::Buffer<ffi::F32>& fvec,
                     ffi::Buffer<ffi::F32>& mult, ffi::Buffer<ffi::F32>& clamp,
                     ffi::Buffer<ffi::S32>& zp, Epilogue* e, Sink* s) {
  auto ot = out->element_type();
  if (ot != ffi::DataType::S8 && ot != ffi::DataType::U8)
    return ffi::Error::InvalidArgument(who + ": out must be int8 or uint8 codes");
  ffi::Error err = MakeEpilogue(who, static_cast<size_t>(n), ivec, fvec, mult, clamp, zp, e);
  if (err.failure()) return err;
  s->codes = static_cast<uint8_t*>(out->untyped_data());
  s->e = e;
  return ffi::Error::Success();
}

// Fused: 8-bit codes = epilogue(sums) (epilogue.h); out int8 or uint8; ivec int32 (N,),
// fvec / mult float32 (N,), clamp float32 (2,) = (lo - zp, hi - zp) or (5,) = (lo, hi,
// s_x', f32(1 / s_out), zp) for the "onednn" scheme, zp int32 (1,).
ffi::Error Sat16Q8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> x, ffi::Buffer<ffi::S8> wp,
                       ffi::Buffer<ffi::S32> ivec, ffi::Buffer<ffi::F32> fvec,
                       ffi::Buffer<ffi::F32> mult, ffi::Buffer<ffi::F32> clamp,
                       ffi::Buffer<ffi::S32> zp, ffi::Result<ffi::AnyBuffer> out,
                       int64_t threads, int64_t isa, int64_t exact) {
  const std::string who = "qjax_sat16_q8_gemm";
  auto od = out->dimensions();
  Epilogue e;
  Sink s;
  ffi::Error err = CodesSink(who, out, od.size() ? od.back() : 0, ivec, fvec, mult, clamp, zp,
                             &e, &s);
  if (err.failure()) return err;
  return Sat16Run(pool, who, x, wp, od, s, threads, isa, exact);
}

// Fused conv (implicit im2col): x the zero-point-padded NHWC uint8 codes (N, Hp, Wp, C)
// with C a multiple of 4, wp = pack of the (kh * kw * C, O) im2col weight (K index
// (a * kw + b) * C + c: FBGEMM's order, whose pairs never span two taps for even C),
// out (N, OH, OW, O) codes, one group; the epilogue as Sat16Q8Impl's. valid_taps = 1:
// oneDNN's pairs (accumulate="onednn_sat16"): x padded with zeros (pt rows on top, pl
// columns on the left of the unpadded h x w), and each border position's zero-point
// term taken over its valid taps only (Border, from wtap (kh·kw, O) and zx (1,)); with
// C % 4 == 0 oneDNN's per-tap pairs are FBGEMM's. valid_taps = 0: wtap, zx unused.
ffi::Error Sat16Q8ConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> x, ffi::Buffer<ffi::S8> wp,
                           ffi::Buffer<ffi::S32> ivec, ffi::Buffer<ffi::F32> fvec,
                           ffi::Buffer<ffi::F32> mult, ffi::Buffer<ffi::F32> clamp,
                           ffi::Buffer<ffi::S32> zp, ffi::Buffer<ffi::S32> wtap,
                           ffi::Buffer<ffi::S32> zx, ffi::Result<ffi::AnyBuffer> out,
                           int64_t threads, int64_t isa, int64_t exact, int64_t kh, int64_t kw,
                           int64_t sh,
                           int64_t sw, int64_t dh, int64_t dw, int64_t valid_taps, int64_t pt,
                           int64_t pl, int64_t h, int64_t w) {
  const std::string who = "qjax_sat16_q8_conv";
  ffi::Error err;
  if (IsaError(isa, who, &err)) return err;
  auto xd = x.dimensions();
  auto wd = wp.dimensions();
  auto od = out->dimensions();
  if (xd.size() != 4 || od.size() != 4 || wd.size() < 3)
    return ffi::Error::InvalidArgument(who + ": x and out must be NHWC, the weight packed");
  if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || dh < 1 || dw < 1)
    return ffi::Error::InvalidArgument(who + ": kernel, stride and dilation must be >= 1");
  int64_t n = xd[0], hp = xd[1], wpad = xd[2], c = xd[3], o = od[3];
  if (c % 4 != 0) return ffi::Error::InvalidArgument(who + ": C must be a multiple of 4");
  int64_t oh = hp >= (kh - 1) * dh + 1 ? (hp - (kh - 1) * dh - 1) / sh + 1 : 0;
  int64_t ow = wpad >= (kw - 1) * dw + 1 ? (wpad - (kw - 1) * dw - 1) / sw + 1 : 0;
  if (od[0] != n || od[1] != oh || od[2] != ow)
    return ffi::Error::InvalidArgument(who + ": out shape does not match the conv of x");
  size_t r = wd.size();
  for (size_t i = 0; i + 3 < r; ++i)
    if (wd[i] != 1) return ffi::Error::InvalidArgument(who + ": one unbatched weight");
  int64_t nbk = wd[r - 3], k4 = wd[r - 2], k = kh * kw * c;
  if (wd[r - 1] != 64 || nbk != (o + kNB - 1) / kNB || k4 != k / 4)
    return ffi::Error::InvalidArgument(who + ": packed weight shape does not match kh·kw·C and O");
  Epilogue e;
  Sink s;
  err = CodesSink(who, out, o, ivec, fvec, mult, clamp, zp, &e, &s);
  if (err.failure()) return err;
  int64_t m = n * oh * ow;
  if (m == 0 || o == 0) return ffi::Error::Success();
  std::vector<int64_t> tapoff(kh * kw);
  for (int64_t a = 0; a < kh; ++a)
    for (int64_t b = 0; b < kw; ++b) tapoff[a * kw + b] = (a * dh * wpad + b * dw) * c;
  XRows xr;
  xr.x = x.typed_data();
  xr.tapoff = tapoff.data();
  xr.ntaps = kh * kw;
  xr.c4 = c / 4;
  xr.ohw = oh * ow;
  xr.ow = ow;
  xr.img = hp * wpad * c;
  xr.rstep = sh * wpad * c;
  xr.cstep = sw * c;
  Border bd;
  std::vector<int32_t> zwtap;
  std::vector<uint8_t> edge;
  if (valid_taps) {
    if (wtap.element_count() != static_cast<size_t>(kh * kw * o) || zx.element_count() != 1)
      return ffi::Error::InvalidArgument(who + ": wtap must be (kh·kw, O), zx (1,)");
    if (pt < 0 || pl < 0 || h < 0 || w < 0 || pt + h > hp || pl + w > wpad)
      return ffi::Error::InvalidArgument(who + ": the padding does not fit x");
    const uint32_t z = static_cast<uint32_t>(zx.typed_data()[0]);
    const int32_t* wt = wtap.typed_data();
    zwtap.resize(kh * kw * o);
    for (size_t i = 0; i < zwtap.size(); ++i)
      zwtap[i] = static_cast<int32_t>(z * static_cast<uint32_t>(wt[i]));
    // the border positions, found once per call (the kernel's tiles skip the rest)
    edge.resize(m);
    for (int64_t i = 0, y = 0; y < oh; ++y) {
      bool ry = y * sh - pt >= 0 && y * sh - pt + (kh - 1) * dh < h;
      for (int64_t x = 0; x < ow; ++x, ++i) {
        bool rx = x * sw - pl >= 0 && x * sw - pl + (kw - 1) * dw < w;
        edge[i] = !(ry && rx);
      }
    }
    for (int64_t i = oh * ow; i < m; ++i) edge[i] = edge[i - oh * ow];  // every image alike
    bd = Border{zwtap.data(), edge.data(), o, oh * ow, ow, kh, kw, sh, sw, dh, dw, pt, pl, h, w};
    s.border = &bd;
  }
  return Dispatch(pool, who, xr, 1, m, 1, wp.typed_data(), nbk, k4, o, k, s, threads, isa,
                  exact != 0);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxSat16Gemm, Sat16GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("exact"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxSat16Q8Gemm, Sat16Q8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("exact"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxSat16Q8Conv, Sat16Q8ConvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("exact")
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("dh")
                                  .Attr<int64_t>("dw")
                                  .Attr<int64_t>("valid_taps")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("ih")
                                  .Attr<int64_t>("iw"));

// How many calls so far split their work over two threads (tests).
extern "C" int64_t qjax_sat16_parallel_calls() { return g_parallel_calls.load(); }

// How long (us) helpers spin for the next job before sleeping (qjax sets QJAX_SPIN_US);
// returns the old value (a negative argument only reads it).
extern "C" int64_t qjax_sat16_spin_us(int64_t us) {
  return us < 0 ? g_spin_us.load() : g_spin_us.exchange(us);
}
