// qjax int8 linear layers on oneDNN's brgemm ukernel, XLA FFI calls: uint8 x int8 -> int32,
// exact where oneDNN runs the kernel (AVX-512-VNNI or AMX).
//
//   acc[m, n]  = sum_k x[m, k] * w[k, n]                         (qjax_onednn_uk_matmul)
//   code[m, n] = epilogue(acc[m, n]) in 8 bits                    (qjax_onednn_uk_q8_linear)
//
// Why the ukernel: oneDNN's matmul primitive of the PyPI onednn wheel runs every call
// through a SYCL queue (~40 us per call); the ukernel (dnnl::ukernel::brgemm) is the same
// JIT-generated brgemm kernel called directly on this thread with raw pointers. The PyPI
// onednn 2026.1 wheel is built without DNNL_EXPERIMENTAL_UKERNEL (no dnnl_brgemm_*
// symbols), so qjax uses the build inside PyTorch's CPU wheel (oneDNN with the ukernel
// enabled), through the entry point torch's own generated C++ kernels (inductor) call:
// at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add_C, const uint8*, const int8*,
// int32*, is_vnni). torch caches one generated kernel per (M, N, K, ld*) per thread, and
// runs it only where oneDNN's ISA is avx512_core_vnni or above (it throws otherwise):
// vpdpbusd / tdpbusd add every u8*s8 product into int32 exactly.
//
// x:      uint8 (..., K) row-major; every leading dim folds into M ("expand_dims").
// packed: uint8 (S,), S = ceil(N / 64) * Kp * 64, Kp = K rounded up to 4: the weight in
//         the ukernel's VNNI layout, 64 columns per block, zero-padded in K and N:
//           packed[((nb * Kp / 4 + k / 4) * 64 + j) * 4 + k % 4] = w[k, nb * 64 + j]
//         so block nb is a (Kp / 4, 64, 4) array with ld_b = 64 (qjax_onednn_uk_pack).
//
// The zero points are not the kernel's business: qjax subtracts zp_x * sum_k w (and the
// weight zero-point terms) in its epilogue, as on its XLA path, so the int32 accumulator
// and every scheme's codes are the same integers.
//
// Work items: (64-column block, chunk of at most 64 rows); helper threads (threads.h) take items
// only for calls of at least g_parallel_macs multiply-adds.
#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "epilogue.h"
#include "threads.h"
#include "xla/ffi/api/ffi.h"

namespace at::native::cpublas {
// torch/include/ATen/native/CPUBlas.h (TORCH_API), declared here so the shim needs no
// ATen headers.
void brgemm(int64_t M, int64_t N, int64_t K, int64_t ld_a, int64_t ld_b, int64_t ld_c,
            bool add_C, const unsigned char* A, const signed char* B, int32_t* C,
            bool is_vnni);
void brgemm_release(bool is_vnni);
}  // namespace at::native::cpublas

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kNB = 64;  // columns per packed block (one brgemm call's N)
constexpr int64_t kMB = 64;  // rows per brgemm call
constexpr int64_t kIm2colMaxK = 256;  // the conv im2col buffer's K (kh·kw·Cg, rounded to 4)

int64_t RoundK(int64_t k) { return (k + 3) / 4 * 4; }
int64_t Blocks(int64_t n) { return (n + kNB - 1) / kNB; }
int64_t PackedSize(int64_t k, int64_t n) { return Blocks(n) * RoundK(k) * kNB; }

// On AMX the ukernel leaves its tile configuration loaded and torch remembers it per
// thread; qjax's own AMX kernels configure tiles too, so hand the state back each call.
struct UkWork : Work {
  void Release() override { at::native::cpublas::brgemm_release(true); }
};

struct Job : UkWork {
  const uint8_t* x = nullptr;
  const int8_t* wp = nullptr;
  int64_t m = 0, k = 0, n = 0, kp = 0, nblocks = 0, mchunks = 0, mb = kMB;
  int32_t* acc = nullptr;  // int32 output, or
  uint8_t* q = nullptr;    // 8-bit codes through the epilogue
  Epilogue epi{};

  // Item i: rows [mb * (i % mchunks), ...) of column block i / mchunks, so consecutive
  // items reuse one weight block from cache.
  void RunItem(int64_t i) override {
    int64_t nb = i / mchunks, m0 = (i % mchunks) * mb;
    int64_t rows = m - m0 < mb ? m - m0 : mb;
    int64_t n0 = nb * kNB, cols = n - n0 < kNB ? n - n0 : kNB;
    const uint8_t* a = x + m0 * k;
    const int8_t* b = wp + nb * kp * kNB;
    if (q == nullptr) {
      at::native::cpublas::brgemm(rows, cols, k, k, kNB, n, false, a, b, acc + m0 * n + n0,
                                  true);
      return;
    }
    alignas(64) int32_t tile[kMB * kNB];
    at::native::cpublas::brgemm(rows, cols, k, k, kNB, kNB, false, a, b, tile, true);
    Requant(tile, kNB, rows, cols, q + m0 * n + n0, n, epi, n0);
  }
};

// More threads only for calls of at least 2^22 multiply-adds while helpers sleep between
// calls (QJAX_SPIN_US=0; threads.h while they spin). Measured on the 2-core AMD EPYC
// (AVX-512-VNNI), load average ~1.3 from other work, K = N = 1024, interleaved medians in
// one process, us at M = 1 / 8 / 32 / 256: one thread 25 / 38 / 88 / 568; with the
// helper thread 29 / 30 / 56 / 301; with a task on XLA's pool instead 32 / 42 / 68 / 313
// (torch fbgemm, 2 threads: 69 / 82 / 110 / 354).
std::atomic<int64_t> g_parallel_macs{int64_t{1} << 22};

ffi::Error RunItems(ffi::ThreadPool& pool, const std::shared_ptr<Work>& job, const char* who) {
  return RunItems(pool, job, who, g_parallel_macs.load(std::memory_order_relaxed));
}

ffi::Error Run(ffi::ThreadPool& pool, const std::shared_ptr<Job>& job, const char* who) {
  if (job->m == 0 || job->n == 0) return ffi::Error::Success();
  if (job->k == 0) {  // no products: a zero accumulator (the epilogue path never gets here)
    if (job->acc != nullptr) std::memset(job->acc, 0, sizeof(int32_t) * job->m * job->n);
    return ffi::Error::Success();
  }
  job->kp = RoundK(job->k);
  job->nblocks = Blocks(job->n);
  // Fewer column blocks than threads (a classifier's few outputs over a long K, e.g. the
  // int8 CNN's FC 12544 -> 10 at M = 64): shorter row chunks, so every thread gets items.
  int64_t threads = 1 + Helpers::Get().count();
  while (job->mb > 16 && job->nblocks * ((job->m + job->mb - 1) / job->mb) < threads) job->mb /= 2;
  job->mchunks = (job->m + job->mb - 1) / job->mb;
  job->items = job->nblocks * job->mchunks;
  job->macs = job->m * job->n * job->k;
  return RunItems(pool, job, who);
}

// Shapes of x (..., K), packed (S,) and out (..., N); M folds every leading dim.
ffi::Error Shapes(const char* who, ffi::AnyBuffer::Dimensions xd, int64_t packed,
                  ffi::AnyBuffer::Dimensions od, int64_t* m, int64_t* k, int64_t* n) {
  if (xd.size() < 1 || od.size() != xd.size())
    return ffi::Error::InvalidArgument(std::string(who) + ": bad operand ranks");
  *k = xd.back();
  *n = od.back();
  *m = 1;
  for (size_t i = 0; i + 1 < xd.size(); ++i) {
    if (xd[i] != od[i])
      return ffi::Error::InvalidArgument(std::string(who) + ": x / out leading dims differ");
    *m *= xd[i];
  }
  if (packed != PackedSize(*k, *n))
    return ffi::Error::InvalidArgument(
        std::string(who) + ": packed weight has " + std::to_string(packed) + " bytes, want " +
        std::to_string(PackedSize(*k, *n)) + " for K=" + std::to_string(*k) +
        " N=" + std::to_string(*n));
  return ffi::Error::Success();
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> x, ffi::Buffer<ffi::U8> packed,
                      ffi::ResultBuffer<ffi::S32> out) {
  const char* who = "qjax_onednn_uk_matmul";
  auto job = std::make_shared<Job>();
  ffi::Error err = Shapes(who, x.dimensions(), packed.element_count(), out->dimensions(),
                          &job->m, &job->k, &job->n);
  if (err.failure()) return err;
  job->x = x.typed_data();
  job->wp = reinterpret_cast<const int8_t*>(packed.typed_data());
  job->acc = out->typed_data();
  return Run(pool, job, who);
}

// Fused: 8-bit codes = epilogue(x . w) (Epilogue above); out int8 or uint8; ivec int32
// (N,), fvec/mult float32 (N,), clamp float32 (2,) = (lo - zp, hi - zp), zp int32 (1,).
ffi::Error Q8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> x, ffi::Buffer<ffi::U8> packed,
                  ffi::Buffer<ffi::S32> ivec, ffi::Buffer<ffi::F32> fvec,
                  ffi::Buffer<ffi::F32> mult, ffi::Buffer<ffi::F32> clamp,
                  ffi::Buffer<ffi::S32> zp, ffi::Result<ffi::AnyBuffer> out) {
  const char* who = "qjax_onednn_uk_q8_linear";
  auto ot = out->element_type();
  if (ot != ffi::DataType::S8 && ot != ffi::DataType::U8)
    return ffi::Error::InvalidArgument(std::string(who) + ": out must be int8 or uint8 codes");
  auto job = std::make_shared<Job>();
  ffi::Error err = Shapes(who, x.dimensions(), packed.element_count(), out->dimensions(),
                          &job->m, &job->k, &job->n);
  if (err.failure()) return err;
  err = MakeEpilogue(who, static_cast<size_t>(job->n), ivec, fvec, mult, clamp, zp, &job->epi);
  if (err.failure()) return err;
  if (job->k == 0)  // qjax refuses K = 0 layers before this; keep the kernel total anyway
    return ffi::Error::InvalidArgument(std::string(who) + ": K = 0");
  job->x = x.typed_data();
  job->wp = reinterpret_cast<const int8_t*>(packed.typed_data());
  job->q = static_cast<uint8_t*>(out->untyped_data());
  return Run(pool, job, who);
}

// ---------------------------------------------------------------------------------------
// 2-D convolution (qjax_onednn_uk_conv2d, qjax_onednn_uk_q8_conv2d): NHWC uint8 codes,
// already padded with the input zero point (a VALID conv), HWIO int8 weight, groups:
//
//   acc[n, i, j, g·Og + o] = Σ_{a, b, c} x[n, i·sh + a·dh, j·sw + b·dw, g·Cg + c]
//                                        · w[a, b, c, g·Og + o]
//
// in int32 tiles of at most 64 output channels of one group x 64 output positions (up to
// 256 for fewer channels: TileShape), then copied out (acc) or requantized (Requant,
// epilogue.h). Three ways to feed the ukernel, chosen per layer by qjax (attribute
// "feed"):
//
// * kernel rows (feed = 2, groups 1, C % 4 = 0, dilation 1 along W): one brgemm call per
//   kernel row a with K = kw·C, the row's kw·C input bytes being contiguous in NHWC, read
//   in place like the taps below (lda = sw·C; the A rows overlap); with dilation along W
//   (feed = 3) the same packed rows, one call per tap on its C rows of them (whole VNNI
//   groups of 4, as C % 4 = 0);
// * taps (feed = 0): one brgemm call per kernel tap (a, b) with K = Cg, accumulating
//   into the tile (add_C after the first), A read in place from the padded input: the
//   rows of a tile are output positions p, p + 1, ... at the input address
//   p·sw·C + tap offset, so lda = sw·C. Positions run over a "virtual" row width
//   Wv = sh·Wp / sw when that is an integer and wastes little (wide = 1: tiles span
//   output rows; the Wv - OW positions past each row's end are computed from bytes inside
//   the image and dropped), else one output row per tile (wide = 0).
// * im2col (feed = 1, small Cg, e.g. a first layer with C = 1): the tile's rows, output
//   positions over the whole batch, are gathered into a (rows, Kp) buffer in (a, b, c)
//   order, then one call with K = kh·kw·Cg.
//
// packed: for each group g, for each segment s (a kernel row with K = kw·C, a tap with
// K = Cg, or the whole im2col K = kh·kw·Cg), the (K, Og) matrix in the linear layout
// (qjax_onednn_uk_pack), blocks of PackedSize(K, Og) bytes at
// ((g · segments) + s) · PackedSize(K, Og).
struct ConvJob : UkWork {
  const uint8_t* x = nullptr;
  const int8_t* wp = nullptr;
  int64_t hp = 0, wpad = 0, c = 0, kh = 0, kw = 0, sh = 1, sw = 1, dh = 1, dw = 1;
  int64_t groups = 1, cg = 0, og = 0, o = 0, oh = 0, ow = 0;
  bool im2col = false, rows_feed = false, rows_taps = false, wide = false;
  int64_t kseg = 0, kpad = 0, seg_bytes = 0, segments = 0, nblocks = 0;
  int64_t wv = 0, positions = 0, chunks = 0;  // tile rows come from positions
  int64_t mb = kMB, ldt = kNB;  // rows per tile, the int32 tile's row stride (TileShape)
  int32_t* acc = nullptr;
  uint8_t* q = nullptr;
  Epilogue epi{};

  // Output position index p of a tile row -> (i, j) in its image; valid when j < OW.
  void Pos(int64_t p, int64_t* i, int64_t* j) const {
    if (wide) {
      *i = p / wv;
      *j = p % wv;
    } else {
      *i = p / ow;
      *j = p % ow;
    }
  }

  // im2col: the rows of a tile are gathered, so its positions run over the whole batch
  // (p = (img · OH + i) · OW + j, every one valid; small images fill whole tiles) and the
  // tile is one contiguous run of the output. A row is S segments of L input bytes: the
  // kh kernel rows of kw·C contiguous bytes (dw = 1, Cg = C), else the kh·kw taps' Cg
  // bytes. Each segment is one masked load (no byte past it is read) and one full store
  // of v = 16, 32 or 64 bytes (v >= L + the K padding; longer segments in 60-byte
  // pieces): the zeros past a segment are overwritten by the next one, the last one
  // writes the row's K padding, and buf has 64 bytes of slack. Byte loops took ~40% of a
  // C = 1 conv (stores of one byte, and a memset call per row).
  __attribute__((target("avx512f,avx512bw,avx512vl"))) void Gather(int64_t g, int64_t p0,
                                                                     int64_t rows,
                                                                     uint8_t* buf) const {
    bool contiguous = dw == 1 && cg == c;
    int64_t seg = contiguous ? kw * cg : cg, nseg = contiguous ? kh : kh * kw;
    int64_t pad = kpad - kseg;  // < 4
    int64_t v = seg + pad <= 16 ? 16 : seg + pad <= 32 ? 32 : 64;
    int64_t piece = seg + pad <= 64 ? seg : 60;  // longer segments go in 60-byte pieces
    int64_t off[kIm2colMaxK];                     // each segment's input offset, nseg <= K
    for (int64_t t = 0; t < nseg; ++t) {
      int64_t a = contiguous ? t : t / kw, b = contiguous ? 0 : t % kw;
      off[t] = (a * dh * wpad + b * dw) * c;
    }
    const uint64_t m = piece >= 64 ? ~uint64_t{0} : (uint64_t{1} << piece) - 1;
    const __mmask16 m16 = static_cast<__mmask16>(m);
    const __mmask32 m32 = static_cast<__mmask32>(m);
    int64_t img = p0 / (oh * ow), i = p0 % (oh * ow) / ow, j = p0 % ow;
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* xi = x + img * hp * wpad * c + g * cg + (i * sh * wpad + j * sw) * c;
      uint8_t* dst = buf + r * kpad;
      if (v == 16) {
        for (int64_t t = 0; t < nseg; ++t)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + t * seg),
                           _mm_maskz_loadu_epi8(m16, xi + off[t]));
      } else if (v == 32) {
        for (int64_t t = 0; t < nseg; ++t)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + t * seg),
                              _mm256_maskz_loadu_epi8(m32, xi + off[t]));
      } else {
        for (int64_t t = 0; t < nseg; ++t)
          for (int64_t o0 = 0; o0 < seg; o0 += piece) {
            int64_t len = seg - o0 < piece ? seg - o0 : piece;
            uint64_t mk = len == piece ? m : (uint64_t{1} << len) - 1;
            __m512i bytes = _mm512_maskz_loadu_epi8(mk, xi + off[t] + o0);
            _mm512_storeu_si512(dst + t * seg + o0, bytes);
          }
      }
      if (++j == ow) {
        j = 0;
        if (++i == oh) i = 0, ++img;
      }
    }
  }

  // Item: ((image · groups + g) · nblocks + nb) · chunks + chunk; im2col: one "image",
  // the whole batch (Gather).
  void RunItem(int64_t it) override {
    int64_t chunk = it % chunks, rest = it / chunks;
    int64_t nb = rest % nblocks;
    rest /= nblocks;
    int64_t g = rest % groups, img = rest / groups;
    int64_t cols = og - nb * kNB < kNB ? og - nb * kNB : kNB;
    int64_t p0, rows;
    if (wide || im2col) {
      p0 = chunk * mb;
      rows = positions - p0 < mb ? positions - p0 : mb;
    } else {  // one output row per chunk group: chunk = row · ceil(OW / mb) + part
      int64_t parts = (ow + mb - 1) / mb;
      int64_t row = chunk / parts, j0 = (chunk % parts) * mb;
      p0 = row * ow + j0;
      rows = ow - j0 < mb ? ow - j0 : mb;
    }
    const int8_t* wg = wp + (g * segments) * seg_bytes + nb * kpad * kNB;
    alignas(64) int32_t tile[kMB * kNB];
    int64_t col = g * og + nb * kNB;
    if (im2col) {
      alignas(64) uint8_t buf[kMB * kIm2colMaxK + 64];  // + the slack of Gather's stores
      Gather(g, p0, rows, buf);
      at::native::cpublas::brgemm(rows, cols, kseg, kpad, kNB, ldt, false, buf, wg, tile, true);
      Store(tile, 0, rows, cols, p0 * o + col, col);
      return;
    }
    const uint8_t* xi = x + img * hp * wpad * c + g * cg;
    int64_t i0, j0;
    Pos(p0, &i0, &j0);
    const uint8_t* base = xi + (i0 * sh * wpad + j0 * sw) * c;
    if (rows_feed) {
      for (int64_t a = 0; a < kh; ++a)
        at::native::cpublas::brgemm(rows, cols, kseg, sw * c, kNB, ldt, a > 0,
                                    base + a * dh * wpad * c, wg + a * seg_bytes, tile, true);
    } else if (rows_taps) {
      for (int64_t a = 0; a < kh; ++a)
        for (int64_t b = 0; b < kw; ++b)
          at::native::cpublas::brgemm(rows, cols, cg, sw * c, kNB, ldt, a + b > 0,
                                      base + (a * dh * wpad + b * dw) * c,
                                      wg + a * seg_bytes + b * cg * kNB, tile, true);
    } else {
      for (int64_t a = 0; a < kh; ++a)
        for (int64_t b = 0; b < kw; ++b) {
          const uint8_t* at = base + (a * dh * wpad + b * dw) * c;
          at::native::cpublas::brgemm(rows, cols, cg, sw * c, kNB, ldt, a + b > 0, at,
                                      wg + (a * kw + b) * seg_bytes, tile, true);
        }
    }
    // Write the valid rows, in runs that are contiguous in the output.
    for (int64_t r = 0; r < rows;) {
      int64_t i, j;
      Pos(p0 + r, &i, &j);
      if (j >= ow) {  // a wide tile's row past the end of an output row
        ++r;
        continue;
      }
      int64_t run = ow - j < rows - r ? ow - j : rows - r;
      Store(tile, r, run, cols, ((img * oh + i) * ow + j) * o + col, col);
      r += run;
    }
  }

  // Tile rows r.. r + run of cols columns -> the output at element off (row stride O).
  void Store(const int32_t* tile, int64_t r, int64_t run, int64_t cols, int64_t off,
             int64_t col) const {
    if (q != nullptr) {
      Requant(tile + r * ldt, ldt, run, cols, q + off, o, epi, col);
    } else {
      for (int64_t rr = 0; rr < run; ++rr)
        std::memcpy(acc + off + rr * o, tile + (r + rr) * ldt, sizeof(int32_t) * cols);
    }
  }
};

// Tiles of a layer with few output channels per group are taller: the int32 tile keeps
// kMB · kNB elements, its row stride the columns rounded up to 16 (one zmm), so a layer
// of 16 channels makes a quarter of the ukernel calls (their fixed cost dominated small
// convs, e.g. the demo's). The im2col buffer bounds im2col tiles too.
void TileShape(ConvJob& j) {
  int64_t cols = j.og < kNB ? j.og : kNB;
  j.ldt = (cols + 15) / 16 * 16;
  j.mb = kMB * kNB / j.ldt;
  if (j.mb > 4 * kMB) j.mb = 4 * kMB;
  if (j.im2col && j.mb * j.kpad > kMB * kIm2colMaxK) j.mb = kMB * kIm2colMaxK / j.kpad;
}

bool Im2colFits(int64_t k) { return RoundK(k) <= kIm2colMaxK; }

// Shapes and geometry of a conv call; fills the job.
ffi::Error ConvSetup(const char* who, ConvJob& j, ffi::AnyBuffer::Dimensions xd, int64_t packed,
                     ffi::AnyBuffer::Dimensions od, int64_t kh, int64_t kw, int64_t sh,
                     int64_t sw, int64_t dh, int64_t dw, int64_t groups, int64_t feed) {
  auto bad = [&](const std::string& m) { return ffi::Error::InvalidArgument(who + (": " + m)); };
  if (xd.size() != 4 || od.size() != 4) return bad("x and out must be NHWC (rank 4)");
  if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || dh < 1 || dw < 1 || groups < 1)
    return bad("kernel, stride, dilation and groups must be positive");
  j.hp = xd[1], j.wpad = xd[2], j.c = xd[3];
  j.kh = kh, j.kw = kw, j.sh = sh, j.sw = sw, j.dh = dh, j.dw = dw, j.groups = groups;
  j.o = od[3];
  if (j.c % groups || j.o % groups) return bad("C and O must be divisible by groups");
  j.cg = j.c / groups, j.og = j.o / groups;
  int64_t eh = (kh - 1) * dh + 1, ew = (kw - 1) * dw + 1;
  if (j.hp < eh || j.wpad < ew) return bad("the dilated kernel is larger than the input");
  j.oh = (j.hp - eh) / sh + 1, j.ow = (j.wpad - ew) / sw + 1;
  if (od[0] != xd[0] || od[1] != j.oh || od[2] != j.ow)
    return bad("out must be (N, OH, OW, O) of the VALID conv");
  if (j.cg == 0) return bad("C / groups = 0");
  if (feed < 0 || feed > 3) return bad("feed must be 0 (taps), 1 (im2col), 2 or 3 (rows)");
  j.im2col = feed == 1;
  j.rows_feed = feed == 2;
  j.rows_taps = feed == 3;
  bool rows = j.rows_feed || j.rows_taps;
  if (rows && (groups != 1 || j.cg % 4 != 0)) return bad("feeds 2, 3 need groups 1, C % 4 = 0");
  if (j.rows_feed && dw != 1) return bad("feed 2 needs dilation 1 along W");
  j.kseg = j.im2col ? kh * kw * j.cg : rows ? kw * j.cg : j.cg;
  if (j.im2col && !Im2colFits(j.kseg)) return bad("im2col K too large");
  j.kpad = RoundK(j.kseg);
  j.segments = j.im2col ? 1 : rows ? kh : kh * kw;
  j.seg_bytes = PackedSize(j.kseg, j.og);
  int64_t want = groups * j.segments * j.seg_bytes;
  if (packed != want)
    return bad("packed weight has " + std::to_string(packed) + " bytes, want " +
               std::to_string(want));
  j.nblocks = Blocks(j.og);
  // Tiles over a virtual row width Wv = sh·Wp / sw when integral and at most 1/4 wasted.
  j.wide = false;
  if (!j.im2col && (sh * j.wpad) % sw == 0) {
    int64_t wv = sh * j.wpad / sw;
    int64_t span = (j.oh - 1) * wv + j.ow;
    if (4 * span <= 5 * j.oh * j.ow) j.wide = true, j.wv = wv, j.positions = span;
  }
  if (!j.wide) j.positions = j.oh * j.ow;
  TileShape(j);
  int64_t images = xd[0];
  if (j.im2col) j.positions *= images, images = 1;  // tiles span images (Gather)
  if (j.wide || j.im2col) j.chunks = (j.positions + j.mb - 1) / j.mb;
  else j.chunks = j.oh * ((j.ow + j.mb - 1) / j.mb);
  j.items = images * groups * j.nblocks * j.chunks;
  j.macs = xd[0] * j.oh * j.ow * j.o * kh * kw * j.cg;
  return ffi::Error::Success();
}

ffi::Error ConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> x, ffi::Buffer<ffi::U8> packed,
                    ffi::ResultBuffer<ffi::S32> out, int64_t kh, int64_t kw, int64_t sh,
                    int64_t sw, int64_t dh, int64_t dw, int64_t groups, int64_t feed) {
  const char* who = "qjax_onednn_uk_conv2d";
  auto job = std::make_shared<ConvJob>();
  ffi::Error err = ConvSetup(who, *job, x.dimensions(), packed.element_count(),
                             out->dimensions(), kh, kw, sh, sw, dh, dw, groups, feed);
  if (err.failure()) return err;
  job->x = x.typed_data();
  job->wp = reinterpret_cast<const int8_t*>(packed.typed_data());
  job->acc = out->typed_data();
  if (job->items == 0) return ffi::Error::Success();
  return RunItems(pool, job, who);
}

ffi::Error Q8ConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> x, ffi::Buffer<ffi::U8> packed,
                      ffi::Buffer<ffi::S32> ivec, ffi::Buffer<ffi::F32> fvec,
                      ffi::Buffer<ffi::F32> mult, ffi::Buffer<ffi::F32> clamp,
                      ffi::Buffer<ffi::S32> zp, ffi::Result<ffi::AnyBuffer> out, int64_t kh,
                      int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw,
                      int64_t groups, int64_t feed) {
  const char* who = "qjax_onednn_uk_q8_conv2d";
  auto ot = out->element_type();
  if (ot != ffi::DataType::S8 && ot != ffi::DataType::U8)
    return ffi::Error::InvalidArgument(std::string(who) + ": out must be int8 or uint8 codes");
  auto job = std::make_shared<ConvJob>();
  ffi::Error err = ConvSetup(who, *job, x.dimensions(), packed.element_count(),
                             out->dimensions(), kh, kw, sh, sw, dh, dw, groups, feed);
  if (err.failure()) return err;
  err = MakeEpilogue(who, static_cast<size_t>(job->o), ivec, fvec, mult, clamp, zp, &job->epi);
  if (err.failure()) return err;
  job->x = x.typed_data();
  job->wp = reinterpret_cast<const int8_t*>(packed.typed_data());
  job->q = static_cast<uint8_t*>(out->untyped_data());
  if (job->items == 0) return ffi::Error::Success();
  return RunItems(pool, job, who);
}

void SetError(char* buf, int64_t size, const std::string& msg) {
  if (size <= 0) return;
  std::strncpy(buf, msg.c_str(), size - 1);
  buf[size - 1] = '\0';
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxOnednnUkMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxOnednnUkQ8Linear, Q8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxOnednnUkConv2d, ConvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("dh")
                                  .Attr<int64_t>("dw")
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("feed"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxOnednnUkQ8Conv2d, Q8ConvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("dh")
                                  .Attr<int64_t>("dw")
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("feed"));

// Run one small u8*s8 brgemm and compare it with the exact sums: 0 when the ukernel
// runs and is exact here, else 1 with the reason in err (torch's message when it refuses
// the ISA, e.g. below avx512_core_vnni or with ONEDNN_MAX_CPU_ISA lowered).
extern "C" int qjax_onednn_uk_init(char* err, int64_t size) {
  constexpr int64_t m = 3, k = 8, n = 5;
  uint8_t x[m * k];
  int8_t w[k * n];
  for (int64_t i = 0; i < m * k; ++i) x[i] = static_cast<uint8_t>(255 - 7 * i);
  for (int64_t i = 0; i < k * n; ++i) w[i] = static_cast<int8_t>(i % 2 ? 127 : -128 + i);
  std::vector<int8_t> packed(PackedSize(k, n), 0);
  for (int64_t kk = 0; kk < k; ++kk)
    for (int64_t j = 0; j < n; ++j) packed[((kk / 4) * kNB + j) * 4 + kk % 4] = w[kk * n + j];
  int32_t got[m * n];
  try {
    at::native::cpublas::brgemm(m, n, k, k, kNB, n, false, x, packed.data(), got, true);
    at::native::cpublas::brgemm_release(true);
  } catch (const std::exception& e) {
    std::string what = e.what();  // torch's message, then its backtrace: keep the message
    SetError(err, size, "oneDNN brgemm ukernel refused u8*s8: " + what.substr(0, what.find('\n')));
    return 1;
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      int64_t s = 0;
      for (int64_t kk = 0; kk < k; ++kk) s += int64_t{x[i * k + kk]} * w[kk * n + j];
      if (got[i * n + j] != s) {
        SetError(err, size, "oneDNN brgemm ukernel: u8*s8 sums are not exact here");
        return 1;
      }
    }
  return 0;
}

// Bytes of a packed (K, N) weight.
extern "C" int64_t qjax_onednn_uk_packed_size(int64_t k, int64_t n) { return PackedSize(k, n); }

// Reorder a row-major int8 (K, N) weight into out (packed_size bytes; layout at the top).
extern "C" void qjax_onednn_uk_pack(int64_t k, int64_t n, const int8_t* w, uint8_t* out) {
  int64_t kp = RoundK(k);
  std::memset(out, 0, PackedSize(k, n));
  for (int64_t kk = 0; kk < k; ++kk)
    for (int64_t j = 0; j < n; ++j) {
      int64_t nb = j / kNB;
      out[((nb * kp / 4 + kk / 4) * kNB + j % kNB) * 4 + kk % 4] =
          static_cast<uint8_t>(w[kk * n + j]);
    }
}

// The largest im2col K (kh·kw·Cg) the conv kernel takes.
extern "C" int64_t qjax_onednn_uk_im2col_max_k() { return kIm2colMaxK; }

// Multiply-adds from which a call hands items to a second thread; returns the old value
// (a negative argument only reads it).
extern "C" int64_t qjax_onednn_uk_parallel_macs(int64_t macs) {
  return macs < 0 ? g_parallel_macs.load() : g_parallel_macs.exchange(macs);
}

// How many calls so far scheduled a second thread (lets tests see that path run).
extern "C" int64_t qjax_onednn_uk_parallel_calls() { return g_parallel_calls.load(); }

// 1: parallel calls use qjax's helper threads, 0: XLA's intra-op pool; returns the old
// value (a negative argument only reads it).
extern "C" int qjax_onednn_uk_use_helpers(int on) {
  return on < 0 ? g_use_helpers.load() : g_use_helpers.exchange(on);
}

// How long (us) helpers spin for the next job before sleeping (qjax sets QJAX_SPIN_US);
// returns the old value (a negative argument only reads it).
extern "C" int64_t qjax_onednn_uk_spin_us(int64_t us) {
  return us < 0 ? g_spin_us.load() : g_spin_us.exchange(us);
}
