// qjax native int8 GEMM on Intel AMX, as an XLA FFI custom call.
//
//   out[m, n] = sum_k x[m, k] * w[k, n]      int8 x int8 -> int32, exact
//
// x: int8 (..., M, K) row-major, every leading dimension folded into M (vmap's
// "expand_dims" adds leading dims). wp: the weight prepacked once by qjax into AMX's
// VNNI tile layout, int8 (..., Nt, Kt, 16, 64) with leading dims all 1:
//   wp[nt, kt, r, 4 * c + q] = w[64 * kt + 4 * r + q, 16 * nt + c]
// zero where k >= K or n >= N, so every (nt, kt) block is one 16x64 B tile stored
// contiguously (stride 64 bytes). out: int32 (..., M, N).
//
// Exactness: tdpbssd multiplies int8 pairs and adds four products per int32 lane
// with wrap-around int32 additions; the sum is exact whenever the true sum fits in
// int32, which qjax's overflow check guarantees at prepare time. Padding rows and
// columns are zeros, so they add nothing; tail rows/columns are never written back.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "epilogue.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTileRows = 16;   // rows of A and C tiles, K/4 rows of a B tile
constexpr int kTileK = 64;      // int8 along K per A tile row
constexpr int kTileN = 16;      // int32 columns per C tile
constexpr long kArchReqXcompPerm = 0x1023;
constexpr long kXfeatureXtiledata = 18;

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-3: C (2 x 2 blocks of 16x16 int32); 4-5: A (16x64 int8); 6-7: B (16x64).
void ConfigureTiles() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = kTileRows;
  }
  _tile_loadconfig(&cfg);
}

// One 32x32 (or smaller) output block: A row blocks a0 (and a1) times the B column
// tiles b0 (and b1), summed over kt K tiles; A tile k sits at a + aoff[k] (row stride
// sa), B tile k at b + 1024 k. Results in C tiles 0-3 (a0b0, a0b1, a1b0, a1b1).
struct Operands {
  const int8_t* a0;
  const int8_t* a1;
  int64_t sa0, sa1;
  const int64_t* aoff;
  int64_t kt;
  const int8_t* b0;
  const int8_t* b1;
};

// kU: A holds uint8 codes (tdpbusd, unsigned x signed), else int8 (tdpbssd).
template <bool kU>
inline void Dp0() { if constexpr (kU) _tile_dpbusd(0, 4, 6); else _tile_dpbssd(0, 4, 6); }
template <bool kU>
inline void Dp1() { if constexpr (kU) _tile_dpbusd(1, 4, 7); else _tile_dpbssd(1, 4, 7); }
template <bool kU>
inline void Dp2() { if constexpr (kU) _tile_dpbusd(2, 5, 6); else _tile_dpbssd(2, 5, 6); }
template <bool kU>
inline void Dp3() { if constexpr (kU) _tile_dpbusd(3, 5, 7); else _tile_dpbssd(3, 5, 7); }

template <bool kTwoM, bool kTwoN, bool kU>
void Accumulate(const Operands& t) {
  _tile_zero(0);
  if (kTwoN) _tile_zero(1);
  if (kTwoM) _tile_zero(2);
  if (kTwoM && kTwoN) _tile_zero(3);
  for (int64_t k = 0; k < t.kt; ++k) {
    _tile_loadd(4, t.a0 + t.aoff[k], t.sa0);
    _tile_loadd(6, t.b0 + k * 1024, 64);
    Dp0<kU>();
    if (kTwoN) {
      _tile_loadd(7, t.b1 + k * 1024, 64);
      Dp1<kU>();
    }
    if (kTwoM) {
      _tile_loadd(5, t.a1 + t.aoff[k], t.sa1);
      Dp2<kU>();
      if (kTwoN) Dp3<kU>();
    }
  }
}

template <int T>
inline void TileStore(void* p, int64_t stride) {
  // the tile number must be an immediate
  if constexpr (T == 0) _tile_stored(0, p, stride);
  if constexpr (T == 1) _tile_stored(1, p, stride);
  if constexpr (T == 2) _tile_stored(2, p, stride);
  if constexpr (T == 3) _tile_stored(3, p, stride);
}

// int32 output (the plain dot): C tile T -> c[r.., col..] (row stride ld int32), only
// the first rows x cols values.
struct I32Out {
  int32_t* c;
  int64_t ld;
  template <int T>
  void Put(int64_t r, int64_t col, int64_t rows, int64_t cols) const {
    int32_t* dst = c + r * ld + col;
    if (rows >= kTileRows && cols >= kTileN) {
      TileStore<T>(dst, ld * 4);
      return;
    }
    alignas(64) int32_t buf[kTileRows * kTileN];
    TileStore<T>(buf, kTileN * 4);
    if (rows > kTileRows) rows = kTileRows;
    if (cols > kTileN) cols = kTileN;
    for (int64_t i = 0; i < rows; ++i) std::memcpy(dst + i * ld, buf + i * kTileN, cols * 4);
  }
};

// 8-bit output through the epilogue: C tile T -> codes c[r.., col..] (row stride ld).
struct Q8Out {
  uint8_t* c;
  int64_t ld;
  const Epilogue* e;
  template <int T>
  void Put(int64_t r, int64_t col, int64_t rows, int64_t cols) const {
    if (rows <= 0 || cols <= 0) return;
    alignas(64) int32_t buf[kTileRows * kTileN];
    TileStore<T>(buf, kTileN * 4);
    if (rows > kTileRows) rows = kTileRows;
    if (cols > kTileN) cols = kTileN;
    Requant(buf, kTileN, rows, cols, c + r * ld + col, ld, *e, col);
  }
};

// Output block at rows [0, 32) of out, columns n0.. of n; rows0/rows1 valid rows of
// the two row blocks.
template <bool kTwoM, bool kTwoN, bool kU, class Out>
void Block(const Operands& t, const Out& out, int64_t rows0, int64_t rows1, int64_t n0,
           int64_t n) {
  Accumulate<kTwoM, kTwoN, kU>(t);
  out.template Put<0>(0, n0, rows0, n - n0);
  if (kTwoN) out.template Put<1>(0, n0 + kTileN, rows0, n - n0 - kTileN);
  if (kTwoM) out.template Put<2>(kTileRows, n0, rows1, n - n0);
  if (kTwoM && kTwoN) out.template Put<3>(kTileRows, n0 + kTileN, rows1, n - n0 - kTileN);
}

// Every n-tile pair of [nb_begin, nb_end) for one pair of A row blocks.
template <bool kU, class Out>
void RowBlocks(Operands t, bool two_m, const Out& out, int64_t rows0, int64_t rows1,
               int64_t nb_begin, int64_t nb_end, const int8_t* wp, int64_t n) {
  for (int64_t nb = nb_begin; nb < nb_end; nb += 2) {
    bool two_n = nb + 1 < nb_end;
    t.b0 = wp + nb * t.kt * 1024;
    t.b1 = t.b0 + t.kt * 1024;
    int64_t n0 = nb * kTileN;
    if (two_m && two_n) Block<true, true, kU>(t, out, rows0, rows1, n0, n);
    else if (two_m) Block<true, false, kU>(t, out, rows0, rows1, n0, n);
    else if (two_n) Block<false, true, kU>(t, out, rows0, rows1, n0, n);
    else Block<false, false, kU>(t, out, rows0, rows1, n0, n);
  }
}

// Work shared by the caller thread and one pool task: items are claimed from an atomic
// counter, so a task that starts late (or never) only leaves more to the caller. Held
// by a shared_ptr: a task that starts after the caller returned finds nothing to do.
struct Job {
  virtual ~Job() = default;
  virtual void RunItem(int64_t i) = 0;
  int64_t items = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void Drain(Job& j) {
  bool configured = false;
  for (;;) {
    int64_t i = j.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= j.items) break;
    if (!configured) {
      ConfigureTiles();  // per thread: the tile config is thread state
      configured = true;
    }
    j.RunItem(i);
    j.done.fetch_add(1, std::memory_order_release);
  }
  if (configured) _tile_release();
}

// A second thread (a task on XLA's intra-op pool) only for very large calls. Measured on
// the 2-core AMX machine while other work ran, same process, interleaved (median us,
// K=N=1024): one thread M=1 32, M=32 40, M=256 ~300; two threads 75, 92, ~420; the
// 64x28x28 3x3 32->64 conv: 9.0 vs 9.2 ms. The other core is rarely idle (XLA's own
// threads, other processes), so the hand-off mostly adds latency.
constexpr int64_t kParallelMacs = int64_t{1} << 31;

std::atomic<int64_t> g_parallel_calls{0};  // calls that handed work to the pool (tests)

void Run(ffi::ThreadPool& pool, const std::shared_ptr<Job>& job, bool parallel) {
  if (parallel) {
    g_parallel_calls.fetch_add(1, std::memory_order_relaxed);
    pool.Schedule([job] { Drain(*job); });
  }
  Drain(*job);
  // Items claimed by the pool task are running; wait for them (no new ones start).
  // Yield rather than spin: on 2 busy cores the task may need this very core.
  for (int spins = 0; job->done.load(std::memory_order_acquire) < job->items; ++spins) {
    if (spins < 64) _mm_pause();
    else std::this_thread::yield();
  }
}

// ---------------------------------------------------------------------------------
// GEMM: out (M, N) = x (M, K) . w (K, N)

struct GemmJob : Job {
  const int8_t* x = nullptr;  // A rows, stride lda
  int64_t lda = 0;
  const int8_t* tail = nullptr;  // last, partial 16-row block (zero-padded), or null
  int64_t full_blocks = 0;       // 16-row blocks read from x directly
  int64_t m = 0, n = 0, kt = 0, nt = 0;
  const int8_t* wp = nullptr;
  int32_t* out = nullptr;  // int32 output, or
  uint8_t* q = nullptr;    // 8-bit codes through the epilogue
  Epilogue epi{};
  bool unsigned_a = false;  // A holds uint8 codes
  int64_t chunk_pairs = 0;  // n-tile pairs per work item
  std::vector<int64_t> aoff;
  std::vector<int8_t> a_pad;  // padded copy of A when K % 64 != 0
  std::vector<int8_t> a_tail;

  const int8_t* ABlock(int64_t mb, int64_t* stride) const {
    if (mb < full_blocks) {
      *stride = lda;
      return x + mb * kTileRows * lda;
    }
    *stride = kt * kTileK;
    return tail;
  }

  // Work item i: n tiles [2 * chunk_pairs * i, ...) for every row block.
  void RunItem(int64_t i) override {
    int64_t mt = (m + kTileRows - 1) / kTileRows;
    int64_t nb_begin = 2 * chunk_pairs * i;
    int64_t nb_end = nb_begin + 2 * chunk_pairs;
    if (nb_end > nt) nb_end = nt;
    Operands t{};
    t.aoff = aoff.data();
    t.kt = kt;
    for (int64_t mb = 0; mb < mt; mb += 2) {
      bool two_m = mb + 1 < mt;
      t.a0 = ABlock(mb, &t.sa0);
      if (two_m) t.a1 = ABlock(mb + 1, &t.sa1);
      int64_t m0 = mb * kTileRows;
      int64_t r0 = m - m0, r1 = m - m0 - kTileRows;
      if (q == nullptr) {
        RowBlocks<false>(t, two_m, I32Out{out + m0 * n, n}, r0, r1, nb_begin, nb_end, wp, n);
      } else {
        Q8Out o{q + m0 * n, n, &epi};
        if (unsigned_a) RowBlocks<true>(t, two_m, o, r0, r1, nb_begin, nb_end, wp, n);
        else RowBlocks<false>(t, two_m, o, r0, r1, nb_begin, nb_end, wp, n);
      }
    }
  }
};

// Shapes of x (..., K), the packed weight (..., Nt, Kt, 16, 64) and out (..., N);
// sets m, k, n, kt, nt or returns the error.
ffi::Error GemmShapes(const char* who, ffi::AnyBuffer::Dimensions xd,
                      ffi::AnyBuffer::Dimensions wd, ffi::AnyBuffer::Dimensions od, int64_t* m,
                      int64_t* k, int64_t* n, int64_t* kt, int64_t* nt) {
  std::string w(who);
  if (xd.size() < 1 || wd.size() < 4 || od.size() != xd.size())
    return ffi::Error::InvalidArgument(w + ": bad operand ranks");
  for (size_t i = 0; i + 4 < wd.size(); ++i)
    if (wd[i] != 1)
      return ffi::Error::InvalidArgument(
          w + ": a batched (vmapped) packed weight is not supported");
  *k = xd.back();
  *n = od.back();
  *m = 1;
  for (size_t i = 0; i + 1 < xd.size(); ++i) {
    *m *= xd[i];
    if (xd[i] != od[i]) return ffi::Error::InvalidArgument(w + ": x / out leading dims differ");
  }
  size_t r = wd.size();
  *nt = wd[r - 4];
  *kt = wd[r - 3];
  if (wd[r - 2] != 16 || wd[r - 1] != 64 || *nt != (*n + kTileN - 1) / kTileN ||
      *kt != (*k + kTileK - 1) / kTileK)
    return ffi::Error::InvalidArgument(
        w + ": packed weight shape does not match x (K) and out (N)");
  return ffi::Error::Success();
}

// Fills the A-side of the job (x rows, K tail copy, M tail block) and runs it.
void RunGemm(ffi::ThreadPool& pool, const std::shared_ptr<GemmJob>& job, const int8_t* xs,
             int64_t k) {
  GemmJob& j = *job;
  int64_t m = j.m, kt = j.kt, nt = j.nt;
  j.aoff.resize(kt);
  for (int64_t i = 0; i < kt; ++i) j.aoff[i] = i * kTileK;
  int64_t kp = kt * kTileK;
  int64_t mt = (m + kTileRows - 1) / kTileRows;
  if (k % kTileK != 0) {
    // K tail: one zero-padded copy of A (rows padded to 16 too), read with stride Kp.
    j.a_pad.assign(mt * kTileRows * kp, 0);
    for (int64_t i = 0; i < m; ++i) std::memcpy(&j.a_pad[i * kp], xs + i * k, k);
    j.x = j.a_pad.data();
    j.lda = kp;
    j.full_blocks = mt;
  } else {
    j.x = xs;
    j.lda = k;
    j.full_blocks = m / kTileRows;
    if (m % kTileRows != 0) {
      j.a_tail.assign(kTileRows * kp, 0);
      std::memcpy(j.a_tail.data(), xs + j.full_blocks * kTileRows * k,
                  (m % kTileRows) * k);
      j.tail = j.a_tail.data();
    }
  }
  int64_t pairs = (nt + 1) / 2;
  bool parallel = m * j.n * k >= kParallelMacs && pairs >= 2 && pool.num_threads() >= 2;
  // Several items per thread so an uneven start evens out.
  j.chunk_pairs = parallel ? (pairs + 7) / 8 : pairs;
  if (j.chunk_pairs < 1) j.chunk_pairs = 1;
  j.items = (pairs + j.chunk_pairs - 1) / j.chunk_pairs;
  Run(pool, job, parallel);
}

ffi::Error AmxGemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x,
                       ffi::Buffer<ffi::S8> wp, ffi::ResultBuffer<ffi::S32> out) {
  int64_t m, k, n, kt, nt;
  ffi::Error err = GemmShapes("qjax_amx_s8_gemm", x.dimensions(), wp.dimensions(),
                              out->dimensions(), &m, &k, &n, &kt, &nt);
  if (err.failure()) return err;
  if (m == 0 || n == 0) return ffi::Error::Success();
  int32_t* o = out->typed_data();
  if (k == 0) {
    std::memset(o, 0, sizeof(int32_t) * m * n);
    return ffi::Error::Success();
  }
  auto job = std::make_shared<GemmJob>();
  job->m = m;
  job->n = n;
  job->kt = kt;
  job->nt = nt;
  job->wp = wp.typed_data();
  job->out = o;
  RunGemm(pool, job, x.typed_data(), k);
  return ffi::Error::Success();
}

// Fused: 8-bit codes = epilogue(x . w) in one pass (Epilogue above). x int8 or uint8
// (as they are: uint8 goes through tdpbusd); out int8 or uint8; ivec int32 (N,),
// fvec/mult float32 (N,), clamp float32 (2,) = (lo - zp, hi - zp), zp int32 (1,).
ffi::Error AmxGemmQImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S8> wp,
                        ffi::Buffer<ffi::S32> ivec, ffi::Buffer<ffi::F32> fvec,
                        ffi::Buffer<ffi::F32> mult, ffi::Buffer<ffi::F32> clamp,
                        ffi::Buffer<ffi::S32> zp, ffi::Result<ffi::AnyBuffer> out) {
  const char* who = "qjax_amx_q8_gemm";
  auto xt = x.element_type();
  auto ot = out->element_type();
  if ((xt != ffi::DataType::S8 && xt != ffi::DataType::U8) ||
      (ot != ffi::DataType::S8 && ot != ffi::DataType::U8))
    return ffi::Error::InvalidArgument(
        "qjax_amx_q8_gemm: x and out must be int8 or uint8 codes");
  int64_t m, k, n, kt, nt;
  ffi::Error err =
      GemmShapes(who, x.dimensions(), wp.dimensions(), out->dimensions(), &m, &k, &n, &kt, &nt);
  if (err.failure()) return err;
  if (ivec.element_count() != static_cast<size_t>(n) ||
      fvec.element_count() != static_cast<size_t>(n) ||
      mult.element_count() != static_cast<size_t>(n) || clamp.element_count() != 2 ||
      zp.element_count() != 1)
    return ffi::Error::InvalidArgument(
        "qjax_amx_q8_gemm: epilogue vectors must be (N,), clamp (2,), zp (1,)");
  if (m == 0 || n == 0) return ffi::Error::Success();
  auto job = std::make_shared<GemmJob>();
  job->m = m;
  job->n = n;
  job->kt = kt;
  job->nt = nt;
  job->wp = wp.typed_data();
  job->q = static_cast<uint8_t*>(out->untyped_data());
  job->unsigned_a = xt == ffi::DataType::U8;
  job->epi = Epilogue{ivec.typed_data(), fvec.typed_data(), mult.typed_data(),
                      clamp.typed_data()[0], clamp.typed_data()[1], zp.typed_data()[0]};
  const int8_t* xs = static_cast<const int8_t*>(x.untyped_data());
  if (k == 0) {
    // no K tiles: an all-zero accumulator through the same epilogue
    std::vector<int8_t> zero(kTileK * m, 0);
    std::vector<int8_t> wz(nt * 1024, 0);
    job->kt = 1;
    job->wp = wz.data();
    RunGemm(pool, job, zero.data(), kTileK);
    return ffi::Error::Success();
  }
  RunGemm(pool, job, xs, k);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------
// 2-D convolution, NHWC, groups 1, dilation 1, as an implicit GEMM:
//   out[n, oh, ow, o] = sum_{kh, kw, c} x[n, oh*sh + kh, ow*sw + kw, c] * w[kh, kw, c, o]
// x is the already padded input (N, Hp, Wp, C). For one tap row kh the (kw, c) values
// of an output position are kw*C consecutive bytes of x, so an A tile row reads them in
// place (row stride sw*C); the K segment per kh is padded to a multiple of 64 with zero
// weights, so whatever bytes an A tile reads past kw*C are multiplied by 0, and rows
// past OW in a tile are never stored. The last output rows would read past the end of
// x: they read from a copy of x's end followed by zeros instead.

struct ConvJob : Job {
  const int8_t* x = nullptr;
  int64_t hp = 0, wp_ = 0, c = 0, oh = 0, ow = 0, sh = 0, sw = 0, kt = 0, nt = 0, o = 0;
  const int8_t* wp = nullptr;
  int32_t* out = nullptr;  // int32 output, or
  uint8_t* q = nullptr;    // 8-bit codes through the epilogue
  Epilogue epi{};
  bool unsigned_a = false;  // x holds uint8 codes
  int64_t rows_per_item = 0, total_rows = 0;
  int64_t first_tail_row = 0, tail_start = 0;  // rows >= first_tail_row read `tail`
  std::vector<int8_t> tail;
  std::vector<int64_t> aoff;

  int64_t RowStart(int64_t row) const {  // byte offset of the first tap row in x
    return ((row / oh) * hp + (row % oh) * sh) * wp_ * c;
  }

  void RunItem(int64_t i) override {
    int64_t r_begin = i * rows_per_item;
    int64_t r_end = r_begin + rows_per_item;
    if (r_end > total_rows) r_end = total_rows;
    Operands t{};
    t.aoff = aoff.data();
    t.kt = kt;
    t.sa0 = t.sa1 = sw * c;
    for (int64_t row = r_begin; row < r_end; ++row) {  // row = n * OH + oh
      const int8_t* xrow = row < first_tail_row ? x + RowStart(row)
                                                 : tail.data() + (RowStart(row) - tail_start);
      for (int64_t w0 = 0; w0 < ow; w0 += 2 * kTileRows) {
        bool two_m = w0 + kTileRows < ow;
        t.a0 = xrow + w0 * sw * c;
        t.a1 = t.a0 + kTileRows * sw * c;
        int64_t at = (row * ow + w0) * o, r0 = ow - w0, r1 = ow - w0 - kTileRows;
        if (q == nullptr) {
          RowBlocks<false>(t, two_m, I32Out{out + at, o}, r0, r1, 0, nt, wp, o);
        } else {
          Q8Out qo{q + at, o, &epi};
          if (unsigned_a) RowBlocks<true>(t, two_m, qo, r0, r1, 0, nt, wp, o);
          else RowBlocks<false>(t, two_m, qo, r0, r1, 0, nt, wp, o);
        }
      }
    }
  }
};

// Checks the shapes (x (N, Hp, Wp, C), out (N, OH, OW, O), packed weight) and runs the
// job, whose output (out or q, epi) the caller has set.
ffi::Error RunConv(const char* who, ffi::ThreadPool& pool, const std::shared_ptr<ConvJob>& job,
                   const int8_t* xs, ffi::AnyBuffer::Dimensions xd,
                   ffi::AnyBuffer::Dimensions wd, ffi::AnyBuffer::Dimensions od, int64_t kh,
                   int64_t kw, int64_t sh, int64_t sw) {
  std::string w(who);
  if (xd.size() != 4 || od.size() != 4 || wd.size() != 4 || wd[2] != 16 || wd[3] != 64)
    return ffi::Error::InvalidArgument(w + ": bad operand ranks");
  int64_t n = od[0], oh = od[1], ow = od[2], o = od[3];
  int64_t hp = xd[1], wpad = xd[2], c = xd[3];
  if (xd[0] != n || kh > hp || kw > wpad)
    return ffi::Error::InvalidArgument(w + ": x / out shapes differ");
  int64_t seg = (kw * c + kTileK - 1) / kTileK;  // K tiles per kernel row
  if (wd[0] != (o + kTileN - 1) / kTileN || wd[1] != kh * seg)
    return ffi::Error::InvalidArgument(w + ": packed weight shape does not match the conv");
  if (oh != (hp - kh) / sh + 1 || ow != (wpad - kw) / sw + 1)
    return ffi::Error::InvalidArgument(w + ": output size mismatch");
  if (n * oh * ow * o == 0) return ffi::Error::Success();

  ConvJob& j = *job;
  j.x = xs;
  j.hp = hp;
  j.wp_ = wpad;
  j.c = c;
  j.oh = oh;
  j.ow = ow;
  j.sh = sh;
  j.sw = sw;
  j.kt = kh * seg;
  j.nt = wd[0];
  j.o = o;
  j.aoff.resize(j.kt);
  for (int64_t r = 0; r < kh; ++r)
    for (int64_t s = 0; s < seg; ++s) j.aoff[r * seg + s] = r * wpad * c + s * kTileK;
  j.total_rows = n * oh;
  // The furthest byte an output row's tiles read: its last tap row, the last 32-row
  // block (rows up to 31 past its start) and a whole K segment.
  int64_t total = n * hp * wpad * c;
  int64_t reach = (kh - 1) * wpad * c + ((ow - 1) / 32 * 32 + 31) * sw * c + seg * kTileK;
  j.first_tail_row = j.total_rows;
  while (j.first_tail_row > 0 && j.RowStart(j.first_tail_row - 1) + reach > total)
    --j.first_tail_row;
  if (j.first_tail_row < j.total_rows) {
    j.tail_start = j.RowStart(j.first_tail_row);
    j.tail.assign(total - j.tail_start + reach, 0);
    std::memcpy(j.tail.data(), j.x + j.tail_start, total - j.tail_start);
  }
  int64_t macs = n * oh * ow * o * kh * kw * c;
  bool parallel = macs >= kParallelMacs && j.total_rows >= 2 && pool.num_threads() >= 2;
  j.rows_per_item = parallel ? (j.total_rows + 15) / 16 : j.total_rows;
  j.items = (j.total_rows + j.rows_per_item - 1) / j.rows_per_item;
  Run(pool, job, parallel);
  return ffi::Error::Success();
}

ffi::Error AmxConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x,
                       ffi::Buffer<ffi::S8> wp, ffi::ResultBuffer<ffi::S32> out,
                       int64_t kh, int64_t kw, int64_t sh, int64_t sw) {
  auto job = std::make_shared<ConvJob>();
  job->wp = wp.typed_data();
  job->out = out->typed_data();
  return RunConv("qjax_amx_s8_conv2d", pool, job, x.typed_data(), x.dimensions(),
                 wp.dimensions(), out->dimensions(), kh, kw, sh, sw);
}

// Fused conv: 8-bit codes = epilogue(conv) (Epilogue above, column = output channel);
// operands as AmxGemmQImpl's, x the padded NHWC int8 or uint8 codes.
ffi::Error AmxConvQImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S8> wp,
                        ffi::Buffer<ffi::S32> ivec, ffi::Buffer<ffi::F32> fvec,
                        ffi::Buffer<ffi::F32> mult, ffi::Buffer<ffi::F32> clamp,
                        ffi::Buffer<ffi::S32> zp, ffi::Result<ffi::AnyBuffer> out,
                        int64_t kh, int64_t kw, int64_t sh, int64_t sw) {
  auto xt = x.element_type();
  auto ot = out->element_type();
  if ((xt != ffi::DataType::S8 && xt != ffi::DataType::U8) ||
      (ot != ffi::DataType::S8 && ot != ffi::DataType::U8))
    return ffi::Error::InvalidArgument(
        "qjax_amx_q8_conv2d: x and out must be int8 or uint8 codes");
  auto od = out->dimensions();
  size_t o = od.size() == 4 ? static_cast<size_t>(od[3]) : 0;
  if (ivec.element_count() != o || fvec.element_count() != o || mult.element_count() != o ||
      clamp.element_count() != 2 || zp.element_count() != 1)
    return ffi::Error::InvalidArgument(
        "qjax_amx_q8_conv2d: epilogue vectors must be (O,), clamp (2,), zp (1,)");
  auto job = std::make_shared<ConvJob>();
  job->wp = wp.typed_data();
  job->q = static_cast<uint8_t*>(out->untyped_data());
  job->unsigned_a = xt == ffi::DataType::U8;
  job->epi = Epilogue{ivec.typed_data(), fvec.typed_data(), mult.typed_data(),
                      clamp.typed_data()[0], clamp.typed_data()[1], zp.typed_data()[0]};
  return RunConv("qjax_amx_q8_conv2d", pool, job, static_cast<const int8_t*>(x.untyped_data()),
                 x.dimensions(), wp.dimensions(), od, kh, kw, sh, sw);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxAmxS8Gemm, AmxGemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxAmxQ8Gemm, AmxGemmQImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxAmxS8Conv2d, AmxConvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxAmxQ8Conv2d, AmxConvQImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw"));

// Once per process: ask the kernel for the AMX tile-data state. Returns 0 or errno.
extern "C" int qjax_amx_init() {
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return errno;
  return 0;
}

// How many calls so far scheduled a second thread (lets tests see that path run).
extern "C" int64_t qjax_amx_parallel_calls() { return g_parallel_calls.load(); }
