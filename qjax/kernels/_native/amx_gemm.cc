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

// Everything one call shares between the caller thread and a pool task. Held by a
// shared_ptr: a task that starts after the caller finished finds no work and returns.
struct Job {
  const int8_t* x = nullptr;   // A source rows, stride lda
  int64_t lda = 0;
  const int8_t* tail = nullptr;  // last, partial 16-row block (zero-padded), or null
  int64_t full_blocks = 0;     // 16-row blocks read from x directly
  int64_t m = 0, n = 0, kt = 0, nt = 0;
  const int8_t* wp = nullptr;
  int32_t* out = nullptr;
  int64_t chunk_pairs = 0;     // n-tile pairs per work item
  int64_t items = 0;
  std::vector<int8_t> a_pad;   // padded copy of A when K % 64 != 0
  std::vector<int8_t> a_tail;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

inline const int8_t* ABlock(const Job& j, int64_t mb, int64_t* stride) {
  if (mb < j.full_blocks) {
    *stride = j.lda;
    return j.x + mb * kTileRows * j.lda;
  }
  *stride = j.kt * kTileK;
  return j.tail;
}

// C tile `T` -> out rows [m0, m0+16) cols [n0, n0+16), clipped to (M, N).
template <int T>
inline void StoreC(const Job& j, int64_t m0, int64_t n0) {
  bool full = m0 + kTileRows <= j.m && n0 + kTileN <= j.n;
  alignas(64) int32_t buf[kTileRows * kTileN];
  int32_t* dst = full ? j.out + m0 * j.n + n0 : buf;
  int64_t stride = full ? j.n * 4 : kTileN * 4;
  // the tile number must be an immediate
  if constexpr (T == 0) _tile_stored(0, dst, stride);
  if constexpr (T == 1) _tile_stored(1, dst, stride);
  if constexpr (T == 2) _tile_stored(2, dst, stride);
  if constexpr (T == 3) _tile_stored(3, dst, stride);
  if (full) return;
  int64_t rows = j.m - m0 < kTileRows ? j.m - m0 : kTileRows;
  int64_t cols = j.n - n0 < kTileN ? j.n - n0 : kTileN;
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(j.out + (m0 + r) * j.n + n0, buf + r * kTileN, cols * 4);
}

// One 32x32 (or smaller) output block: two A row blocks x two B column tiles.
template <bool kTwoM, bool kTwoN>
void Block(const Job& j, int64_t mb, int64_t nb) {
  int64_t sa0 = 0, sa1 = 0;
  const int8_t* a0 = ABlock(j, mb, &sa0);
  const int8_t* a1 = kTwoM ? ABlock(j, mb + 1, &sa1) : nullptr;
  const int8_t* b0 = j.wp + nb * j.kt * 1024;
  const int8_t* b1 = b0 + j.kt * 1024;
  _tile_zero(0);
  if (kTwoN) _tile_zero(1);
  if (kTwoM) _tile_zero(2);
  if (kTwoM && kTwoN) _tile_zero(3);
  for (int64_t k = 0; k < j.kt; ++k) {
    _tile_loadd(4, a0 + k * kTileK, sa0);
    _tile_loadd(6, b0 + k * 1024, 64);
    _tile_dpbssd(0, 4, 6);
    if (kTwoN) {
      _tile_loadd(7, b1 + k * 1024, 64);
      _tile_dpbssd(1, 4, 7);
    }
    if (kTwoM) {
      _tile_loadd(5, a1 + k * kTileK, sa1);
      _tile_dpbssd(2, 5, 6);
      if (kTwoN) _tile_dpbssd(3, 5, 7);
    }
  }
  int64_t m0 = mb * kTileRows, n0 = nb * kTileN;
  StoreC<0>(j, m0, n0);
  if (kTwoN) StoreC<1>(j, m0, n0 + kTileN);
  if (kTwoM) StoreC<2>(j, m0 + kTileRows, n0);
  if (kTwoM && kTwoN) StoreC<3>(j, m0 + kTileRows, n0 + kTileN);
}

// Work item i: n tiles [2 * chunk_pairs * i, ...) for every row block.
void RunItem(const Job& j, int64_t i) {
  int64_t mt = (j.m + kTileRows - 1) / kTileRows;
  int64_t nb_begin = 2 * j.chunk_pairs * i;
  int64_t nb_end = nb_begin + 2 * j.chunk_pairs;
  if (nb_end > j.nt) nb_end = j.nt;
  for (int64_t mb = 0; mb < mt; mb += 2) {
    bool two_m = mb + 1 < mt;
    for (int64_t nb = nb_begin; nb < nb_end; nb += 2) {
      bool two_n = nb + 1 < nb_end;
      if (two_m && two_n) Block<true, true>(j, mb, nb);
      else if (two_m) Block<true, false>(j, mb, nb);
      else if (two_n) Block<false, true>(j, mb, nb);
      else Block<false, false>(j, mb, nb);
    }
  }
}

void Drain(Job& j) {
  bool configured = false;
  for (;;) {
    int64_t i = j.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= j.items) break;
    if (!configured) {
      ConfigureTiles();  // per thread: the tile config is thread state
      configured = true;
    }
    RunItem(j, i);
    j.done.fetch_add(1, std::memory_order_release);
  }
  if (configured) _tile_release();
}

// A second thread pays off above about this many multiply-adds (the pool hand-off
// costs a few microseconds; AMX does up to ~1000 MAC per cycle), or when the packed
// weight is large enough that streaming it from L3 dominates (a few rows, K*N >= 512K):
// two cores pull it in at twice the bandwidth.
constexpr int64_t kParallelMacs = int64_t{1} << 24;
constexpr int64_t kParallelWeightBytes = int64_t{1} << 19;

ffi::Error AmxGemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x,
                       ffi::Buffer<ffi::S8> wp, ffi::ResultBuffer<ffi::S32> out) {
  auto xd = x.dimensions();
  auto wd = wp.dimensions();
  auto od = out->dimensions();
  if (xd.size() < 1 || wd.size() < 4 || od.size() != xd.size())
    return ffi::Error::InvalidArgument("qjax_amx_s8_gemm: bad operand ranks");
  for (size_t i = 0; i + 4 < wd.size(); ++i)
    if (wd[i] != 1)
      return ffi::Error::InvalidArgument(
          "qjax_amx_s8_gemm: a batched (vmapped) packed weight is not supported");
  int64_t k = xd.back();
  int64_t n = od.back();
  int64_t m = 1;
  for (size_t i = 0; i + 1 < xd.size(); ++i) {
    m *= xd[i];
    if (xd[i] != od[i])
      return ffi::Error::InvalidArgument("qjax_amx_s8_gemm: x / out leading dims differ");
  }
  size_t r = wd.size();
  int64_t nt = wd[r - 4], kt = wd[r - 3];
  if (wd[r - 2] != 16 || wd[r - 1] != 64 || nt != (n + kTileN - 1) / kTileN ||
      kt != (k + kTileK - 1) / kTileK)
    return ffi::Error::InvalidArgument(
        "qjax_amx_s8_gemm: packed weight shape does not match x (K) and out (N)");
  if (m == 0 || n == 0) return ffi::Error::Success();
  int32_t* o = out->typed_data();
  if (k == 0) {
    std::memset(o, 0, sizeof(int32_t) * m * n);
    return ffi::Error::Success();
  }

  auto job = std::make_shared<Job>();
  Job& j = *job;
  j.m = m;
  j.n = n;
  j.kt = kt;
  j.nt = nt;
  j.wp = wp.typed_data();
  j.out = o;
  const int8_t* xs = x.typed_data();
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
  bool big = m * n * k >= kParallelMacs || nt * kt * 1024 >= kParallelWeightBytes;
  bool parallel = big && pairs >= 2 && pool.num_threads() >= 2;
  // Several items per thread so an uneven start evens out; each keeps >= 2 pairs.
  j.chunk_pairs = parallel ? (pairs + 7) / 8 : pairs;
  if (j.chunk_pairs < 1) j.chunk_pairs = 1;
  j.items = (pairs + j.chunk_pairs - 1) / j.chunk_pairs;
  if (parallel) pool.Schedule([job] { Drain(*job); });
  Drain(j);
  // Items claimed by the pool task are running; wait for them (no new ones start).
  // Yield rather than spin: on 2 busy cores the task may need this very core.
  for (int spins = 0; j.done.load(std::memory_order_acquire) < j.items; ++spins) {
    if (spins < 64) _mm_pause();
    else std::this_thread::yield();
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxAmxS8Gemm, AmxGemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// Once per process: ask the kernel for the AMX tile-data state. Returns 0 or errno.
extern "C" int qjax_amx_init() {
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return errno;
  return 0;
}
