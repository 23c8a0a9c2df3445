// qjax int8 matmul on oneDNN, an XLA FFI call: uint8 x int8 -> int32, exact where the
// CPU has VNNI (or AMX).
//
//   out[m, n] = sum_k x[m, k] * w[k, n]
//
// x:      uint8 (..., K) row-major; every leading dim folds into M (vmap "expand_dims").
// packed: uint8 (S,) the weight reordered once by qjax_onednn_pack into the layout
//         oneDNN's matmul prefers on this CPU (format_tag::any); S = packed_size(K, N).
// out:    int32 (..., N).
//
// The zero points are not oneDNN's business: qjax subtracts zp_x * sum_k w and the
// weight zero-point terms in its own XLA epilogue, the same as on its XLA path, so the
// int32 accumulator (and then every scheme's codes) are the same integers.
//
// Exactness: on CPUs with VNNI (avx2_vnni, avx512_core_vnni and above, AMX) oneDNN's
// int8 matmul multiplies with vpdpbusd / tdpbusd, which add every u8*s8 product into
// int32 exactly. Below VNNI it uses vpmaddubsw, whose int16 pair sums saturate; qjax
// only calls this kernel where qjax_onednn_isa() says VNNI, and a primitive whose
// implementation is not the brgemm matmul at a VNNI/AMX ISA is refused with an error,
// never run.
//
// The weight layout is fixed at pack time (from a reference M) and every later matmul
// is created with it, so one packed weight serves every batch size; primitives are
// cached per (M, K, N).
#include <oneapi/dnnl/dnnl.hpp>

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

constexpr int64_t kRefM = 32;  // the M whose preferred weight layout is packed

std::mutex g_mu;
std::unique_ptr<dnnl::engine> g_engine;
std::string g_error;

struct Entry {
  dnnl::matmul prim;
  memory::desc a, b, c;
  std::string impl;
};
std::map<std::tuple<int64_t, int64_t, int64_t>, std::shared_ptr<Entry>> g_cache;

memory::desc RowMajor(int64_t r, int64_t c, memory::data_type dt) {
  return memory::desc({r, c}, dt, memory::format_tag::ab);
}

memory::desc WeightsDesc(int64_t k, int64_t n) {
  dnnl::matmul::primitive_desc pd(*g_engine, RowMajor(kRefM, k, memory::data_type::u8),
                                  memory::desc({k, n}, memory::data_type::s8,
                                               memory::format_tag::any),
                                  RowMajor(kRefM, n, memory::data_type::s32));
  return pd.weights_desc();
}

// brgemm matmul at a VNNI or AMX ISA: exact u8*s8 -> s32 (see the top of the file).
bool ExactImpl(const std::string& impl) {
  return impl.rfind("brg_matmul:", 0) == 0 &&
         (impl.find("vnni") != std::string::npos || impl.find("amx") != std::string::npos ||
          impl.find("avx10") != std::string::npos);
}

// The primitive for (m, k, n), created on first use; the caller holds no lock.
std::shared_ptr<Entry> Get(int64_t m, int64_t k, int64_t n, std::string* err) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto key = std::make_tuple(m, k, n);
  auto it = g_cache.find(key);
  if (it != g_cache.end()) return it->second;
  auto e = std::make_shared<Entry>();
  try {
    e->a = RowMajor(m, k, memory::data_type::u8);
    e->b = WeightsDesc(k, n);
    e->c = RowMajor(m, n, memory::data_type::s32);
    dnnl::matmul::primitive_desc pd(*g_engine, e->a, e->b, e->c);
    e->impl = pd.impl_info_str();
    if (!ExactImpl(e->impl)) {
      *err = "oneDNN chose " + e->impl + " for M=" + std::to_string(m) + " K=" +
             std::to_string(k) + " N=" + std::to_string(n) +
             ", not an exact (VNNI/AMX brgemm) kernel";
      return nullptr;
    }
    e->prim = dnnl::matmul(pd);
  } catch (const dnnl::error& ex) {
    *err = std::string("oneDNN matmul M=") + std::to_string(m) + " K=" + std::to_string(k) +
           " N=" + std::to_string(n) + ": " + ex.what();
    return nullptr;
  }
  g_cache.emplace(key, e);
  return e;
}

ffi::Error MatmulImpl(ffi::Buffer<ffi::U8> x, ffi::Buffer<ffi::U8> packed,
                      ffi::ResultBuffer<ffi::S32> out) {
  const std::string who = "qjax_onednn_u8s8_matmul";
  if (!g_engine) return ffi::Error::Internal(who + ": oneDNN engine not initialised");
  auto xd = x.dimensions();
  auto od = out->dimensions();
  if (xd.size() < 1 || od.size() != xd.size())
    return ffi::Error::InvalidArgument(who + ": bad operand ranks");
  int64_t k = xd.back(), n = od.back(), m = 1;
  for (size_t i = 0; i + 1 < xd.size(); ++i) {
    if (xd[i] != od[i]) return ffi::Error::InvalidArgument(who + ": x / out leading dims differ");
    m *= xd[i];
  }
  int32_t* o = out->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(o, 0, sizeof(int32_t) * m * n);
    return ffi::Error::Success();
  }
  std::string err;
  auto e = Get(m, k, n, &err);
  if (!e) return ffi::Error::InvalidArgument(who + ": " + err);
  if (packed.element_count() != static_cast<int64_t>(e->b.get_size()))
    return ffi::Error::InvalidArgument(who + ": packed weight has " +
                                       std::to_string(packed.element_count()) + " bytes, want " +
                                       std::to_string(e->b.get_size()) + " for K=" +
                                       std::to_string(k) + " N=" + std::to_string(n));
  try {
    // a stream per thread: XLA may run several calls at once, a stream is not shared
    thread_local std::unique_ptr<dnnl::stream> s;
    if (!s) s = std::make_unique<dnnl::stream>(*g_engine);
    memory ma(e->a, *g_engine, const_cast<uint8_t*>(x.typed_data()));
    memory mb(e->b, *g_engine, const_cast<uint8_t*>(packed.typed_data()));
    memory mc(e->c, *g_engine, o);
    e->prim.execute(*s, {{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mb}, {DNNL_ARG_DST, mc}});
    s->wait();
  } catch (const dnnl::error& ex) {
    return ffi::Error::Internal(who + ": " + ex.what());
  }
  return ffi::Error::Success();
}

void SetError(char* buf, int64_t size, const std::string& msg) {
  if (size <= 0) return;
  std::strncpy(buf, msg.c_str(), size - 1);
  buf[size - 1] = '\0';
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxOnednnMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// Create the CPU engine; 0 on success, else 1 with the reason in err.
extern "C" int qjax_onednn_init(char* err, int64_t size) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_engine) return 0;
  try {
    g_engine = std::make_unique<dnnl::engine>(dnnl::engine::kind::cpu, 0);
  } catch (const dnnl::error& ex) {
    SetError(err, size, std::string("oneDNN CPU engine: ") + ex.what());
    return 1;
  }
  return 0;
}

// The ISA oneDNN dispatches to (dnnl_cpu_isa_t; ONEDNN_MAX_CPU_ISA lowers it).
extern "C" int64_t qjax_onednn_isa() { return static_cast<int64_t>(dnnl_get_effective_cpu_isa()); }

// oneDNN's version as major * 10000 + minor * 100 + patch.
extern "C" int64_t qjax_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

// Bytes of a packed (K, N) weight; -1 with the reason in err on failure.
extern "C" int64_t qjax_onednn_packed_size(int64_t k, int64_t n, char* err, int64_t size) {
  std::lock_guard<std::mutex> lock(g_mu);
  try {
    return static_cast<int64_t>(WeightsDesc(k, n).get_size());
  } catch (const dnnl::error& ex) {
    SetError(err, size, std::string("oneDNN weight layout: ") + ex.what());
    return -1;
  }
}

// Reorder a row-major int8 (K, N) weight into out (packed_size bytes); 0 on success.
extern "C" int qjax_onednn_pack(int64_t k, int64_t n, const int8_t* w, uint8_t* out, char* err,
                                int64_t size) {
  std::lock_guard<std::mutex> lock(g_mu);
  try {
    memory::desc src = RowMajor(k, n, memory::data_type::s8);
    memory::desc dst = WeightsDesc(k, n);
    memory ms(src, *g_engine, const_cast<int8_t*>(w));
    memory md(dst, *g_engine, out);
    dnnl::stream s(*g_engine);
    dnnl::reorder(ms, md).execute(s, ms, md);
    s.wait();
  } catch (const dnnl::error& ex) {
    SetError(err, size, std::string("oneDNN weight reorder: ") + ex.what());
    return 1;
  }
  return 0;
}

// The implementation oneDNN picks for (M, K, N) into buf; 0 when it is exact (VNNI/AMX
// brgemm), 1 when not, -1 on failure (the reason in buf).
extern "C" int qjax_onednn_impl(int64_t m, int64_t k, int64_t n, char* buf, int64_t size) {
  std::string err;
  auto e = Get(m, k, n, &err);
  if (e) {
    SetError(buf, size, e->impl);
    return 0;
  }
  SetError(buf, size, err);
  return err.rfind("oneDNN chose ", 0) == 0 ? 1 : -1;
}
