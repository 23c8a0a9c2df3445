// qjax native uint8 x int8 GEMM with int16 pair saturation (AVX2), an XLA FFI call.
//
//   out[m, n] = sum_j sat16(x[m, 2j] * w[2j, n] + x[m, 2j+1] * w[2j+1, n])
//
// exactly what FBGEMM and oneDNN compute on CPUs without VNNI: vpmaddubsw multiplies
// unsigned by signed bytes and adds adjacent products with int16 saturation, vpmaddwd
// with ones then adds two such pair sums exactly into int32. K runs past its end with
// zeros (a zero pair adds 0), so any K works, odd included.
//
// x:   uint8 (..., M, K) row-major; with an unbatched weight every leading dim folds into
//      M (vmap's "expand_dims"); with a batch of B weights (convolution groups) x is
//      (..., B, M, K) and out (..., B, M, N).
// wp:  int8 (..., B, Nb, K4, 64) prepacked once by qjax, leading dims all 1:
//        wp[b, nb, k4, 4 * c + q] = w[b][4 * k4 + q, 16 * nb + c]
//      zero where the index runs past K or N. One (nb, k4) row is two ymm registers: the
//      four K values of eight columns each, the order vpmaddubsw + vpmaddwd sum.
// out: int32 (..., M, N).
//
// Exactness: every pair sum is saturated exactly as the hardware does (it IS the
// hardware instruction); the int32 additions wrap, exact whenever the true sum fits,
// which qjax's overflow check guarantees at prepare time. Compiled with -mavx2 only.
#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kNB = 16;   // output columns per packed block (two ymm of 8 int32)
constexpr int kMR = 4;    // rows per register block

inline __m256i Bcast4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// R rows (R <= kMR) x 16 columns over K4 steps; x rows at x + r * lda (K4 * 4 readable
// bytes each), weight block w (K4 x 64 bytes). Writes ncols (<= 16) columns per row.
template <int R>
void Kernel(const uint8_t* x, int64_t lda, const int8_t* w, int64_t k4, int32_t* out,
            int64_t ldo, int ncols) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_si256();
  for (int64_t k = 0; k < k4; ++k) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * k));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * k + 32));
    for (int r = 0; r < R; ++r) {
      const __m256i xb = Bcast4(x + r * lda + 4 * k);
      acc0[r] = _mm256_add_epi32(acc0[r], _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w0), ones));
      acc1[r] = _mm256_add_epi32(acc1[r], _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w1), ones));
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

// One GEMM: x (m, lda >= 4 * k4), packed w (nb, k4, 64), out (m, n); column blocks
// [nb0, nb1).
void Gemm(const uint8_t* x, int64_t lda, int64_t m, const int8_t* wp, int64_t k4, int64_t n,
          int32_t* out, int64_t nb0, int64_t nb1) {
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const int8_t* w = wp + nb * k4 * 64;
    int ncols = static_cast<int>(n - nb * kNB < kNB ? n - nb * kNB : kNB);
    int32_t* o = out + nb * kNB;
    int64_t i = 0;
    for (; i + kMR <= m; i += kMR) Kernel<kMR>(x + i * lda, lda, w, k4, o + i * n, n, ncols);
    switch (m - i) {
      case 3: Kernel<3>(x + i * lda, lda, w, k4, o + i * n, n, ncols); break;
      case 2: Kernel<2>(x + i * lda, lda, w, k4, o + i * n, n, ncols); break;
      case 1: Kernel<1>(x + i * lda, lda, w, k4, o + i * n, n, ncols); break;
      default: break;
    }
  }
}

// A second thread (a task on XLA's intra-op pool) for calls of >= 2^24 MACs: measured
// on the 2-core AMD EPYC (AVX-512 VNNI host, other work running), 784x1024 weight,
// median ms one / two threads: M=128 0.81 / 0.41, M=256 1.58 / 0.82; below ~2^24 MACs
// the hand-off does not pay (M=32: 0.20 / 0.20).
constexpr int64_t kParallelMacs = int64_t{1} << 24;
std::atomic<int64_t> g_parallel_calls{0};

ffi::Error Sat16GemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> x, ffi::Buffer<ffi::S8> wp,
                         ffi::ResultBuffer<ffi::S32> out, int64_t threads) {
  const std::string who = "qjax_sat16_gemm";
  auto xd = x.dimensions();
  auto wd = wp.dimensions();
  auto od = out->dimensions();
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
  int32_t* o = out->typed_data();
  const uint8_t* xs = x.typed_data();
  int64_t total = outer * b * m;
  if (total == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(o, 0, sizeof(int32_t) * total * n);
    return ffi::Error::Success();
  }
  // K not a multiple of 4: one zero-padded copy of x, rows of 4 * k4 bytes.
  int64_t lda = k;
  std::vector<uint8_t> pad;
  if (k % 4 != 0) {
    lda = 4 * k4;
    pad.assign(total * lda, 0);
    for (int64_t i = 0; i < total; ++i) std::memcpy(&pad[i * lda], xs + i * k, k);
    xs = pad.data();
  }
  const int8_t* w = wp.typed_data();
  // Work items: (batch, column-block range) pairs, split in two halves when parallel.
  int64_t batches = outer * b;
  auto run = [&](int64_t item0, int64_t item1) {
    // items enumerate (batch, nb) row-major
    for (int64_t it = item0; it < item1;) {
      int64_t bi = it / nbk, nb0 = it % nbk;
      int64_t nb1 = nbk;
      if (item1 - it < nb1 - nb0) nb1 = nb0 + (item1 - it);
      Gemm(xs + bi * m * lda, lda, m, w + (bi % b) * nbk * k4 * 64, k4, n, o + bi * m * n,
           nb0, nb1);
      it += nb1 - nb0;
    }
  };
  int64_t items = batches * nbk;
  bool parallel = threads >= 2 && items >= 2 && total * n * k >= kParallelMacs &&
                  pool.num_threads() >= 1;
  if (!parallel) {
    run(0, items);
    return ffi::Error::Success();
  }
  g_parallel_calls.fetch_add(1, std::memory_order_relaxed);
  // Claimed in chunks from an atomic counter: a pool task that starts late only leaves
  // more to the caller; shared_ptr state so a task starting after return does nothing.
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t items = 0, chunk = 1;
    std::function<void(int64_t, int64_t)> run;
  };
  auto st = std::make_shared<State>();
  st->items = items;
  st->chunk = (items + 7) / 8;
  st->run = run;
  auto drain = [](State& s) {
    for (;;) {
      int64_t i = s.next.fetch_add(s.chunk, std::memory_order_relaxed);
      if (i >= s.items) break;
      int64_t e = i + s.chunk < s.items ? i + s.chunk : s.items;
      s.run(i, e);
      s.done.fetch_add(e - i, std::memory_order_release);
    }
  };
  pool.Schedule([st, drain] { drain(*st); });
  drain(*st);
  for (int spins = 0; st->done.load(std::memory_order_acquire) < st->items; ++spins) {
    if (spins < 64) _mm_pause();
    else std::this_thread::yield();
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxSat16Gemm, Sat16GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("threads"));

// How many calls so far split their work over two threads (tests).
extern "C" int64_t qjax_sat16_parallel_calls() { return g_parallel_calls.load(); }
