// qjax native boundary quantize (torch's per-tensor quantize_per_tensor, rule 1), an XLA
// FFI call:
//
//   v    = fma(x, inv, zf)                 float32, rounded once (the FMA instruction)
//   r    = rint(v)                          round half to even
//   code = NaN(r) ? nan_code : clamp(r, qmin, qmax)     as int8 / uint8
//
// exactly qjax.quantize(x, qp, compat="torch") for a per-tensor 8-bit spec, whose XLA
// formulation emulates the single rounding of the fma in float64 (round to odd), about
// 6x the time of a plain float pass. inv = f32(1/s) and zf (the zero point as float32)
// come in as buffers of c values each, so traced qparams work: c = 1 for one tensor, or
// under vmap (broadcast_all) one pair per batch element, element i of the n then using
// pair i / (n / c). Compiled with
// -mavx2 -mfma -ffp-contract=off: the fma is the explicit intrinsic, nothing else is
// contracted.
//
// x:   float32, any shape; out: uint8 or int8 of the same shape.
// Attributes: qmin, qmax, nan_code (int64; within the output dtype's range).
//
// qjax_quantize_product is qjax.quantize(x, qp) (compat "qjax", half-even rounding; what
// a converted Flax model's quantize step computes), the same call with two roundings:
//
//   r    = rint(f32(x · inv)) + zf          the product rounded, then the integer added
//
// (the sum is exact where it is kept: |r| < 2^24, anything larger clamps either way).
//
// And the boundary dequantize (torch's dequantize, rule 3), qjax_dequantize:
//
//   y = f32(int32(q) - zp) · s                 float32, one rounding (the product)
//
// exactly qjax.dequantize's XLA formula: the difference is exact in int32 (wrapping like
// XLA's), its conversion to float32 rounds to nearest even like XLA's convert, and one
// float32 multiply. scale (float32) and zp (int32) come as c values each, like inv / zf
// above. Its reason to exist is not the pass itself (a few µs either way) but XLA's CPU
// client: a program whose XLA ops count fewer than 1000 flops runs on the calling thread,
// any other is handed to XLA's thread pool and the caller waits for it (~40 µs on the
// 2-core host), so a program of native layers stays on the caller with this as its last
// step.
//
// q: uint8 or int8, any shape; out: float32 of the same shape.
//
// And the zero-point padding of a native conv's input, qjax_pad_nhwc: x (N, H, W, C) of
// 8-bit codes -> out (N, lo_h + H + hi_h, lo_w + W + hi_w, C), the border holding the
// code `value` (a buffer: the zero point may be traced), the rest x; rows are copied
// whole (memset + memcpy per row), where XLA's pad fusion took 75-110 us for the
// int8 CNN's 64x28x28x32 input (its loop split over the thread pool) against ~20 here.
//
// And the max pool of 8-bit codes, qjax_max_pool_nhwc: x (N, H, W, C) -> out (N, OH, OW, C),
//
//   out[n, oh, ow, c] = max x[n, oh·sh - ph + i·dh, ow·sw - pw + j·dw, c]   (i < kh, j < kw)
//
// over the window positions inside the input (padding never wins, torch's max pool; a
// window with none inside gives the dtype's minimum, XLA's reduce_window from its init),
// the channels contiguous: 32 (then 16) codes per max instruction. Exact either way (a
// max); its reasons are XLA's reduce_window on 8-bit codes (the digits CNN's 256x8x8x32
// pool) and, as for the dequantize, keeping a program of native steps on the caller.
//
// And the quantized ReLU on codes, qjax_relu_codes: out = max(x, lo) elementwise (rule
// 17: lo the zero point, a one-element buffer of x's dtype since it may be traced), 32
// codes per max instruction. Exact (a max); its reason is the dequantize's: a torch
// model's nn.ReLU modules not fused into their layers (torch's fuse_modules) are steps of
// their own, and as XLA ops they hand the whole program to XLA's pool (the int8 MLP of
// int8_sat16.py at batch 32: 286 us, 164 us with the ReLUs fused).
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// 8 floats -> 8 codes (int32 in [qmin, qmax], so the saturating packs are exact).
template <bool Signed, bool Fma>
inline void Eight(const float* x, __m256 inv, __m256 zf, __m256 lo, __m256 hi, __m256 nanv,
                  uint8_t* out) {
  constexpr int kRint = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  __m256 r;
  if (Fma) {
    r = _mm256_round_ps(_mm256_fmadd_ps(_mm256_loadu_ps(x), inv, zf), kRint);
  } else {
    r = _mm256_add_ps(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x), inv), kRint), zf);
  }
  __m256 nan = _mm256_cmp_ps(r, r, _CMP_UNORD_Q);
  __m256 c = _mm256_min_ps(_mm256_max_ps(r, lo), hi);  // r is not NaN where c is kept
  c = _mm256_blendv_ps(c, nanv, nan);
  __m256i i = _mm256_cvtps_epi32(c);
  __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
  __m128i b = Signed ? _mm_packs_epi16(w, w) : _mm_packus_epi16(w, w);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), b);
}

template <bool Signed, bool Fma>
void Quantize(const float* x, int64_t n, float inv, float zf, float lo, float hi, float nanc,
              uint8_t* out) {
  const __m256 vi = _mm256_set1_ps(inv), vz = _mm256_set1_ps(zf);
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi), vn = _mm256_set1_ps(nanc);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) Eight<Signed, Fma>(x + i, vi, vz, vlo, vhi, vn, out + i);
  if (i < n) {  // the tail through an 8-wide buffer: one formula for every element
    alignas(32) float buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    uint8_t codes[8];
    std::memcpy(buf, x + i, sizeof(float) * (n - i));
    Eight<Signed, Fma>(buf, vi, vz, vlo, vhi, vn, codes);
    std::memcpy(out + i, codes, n - i);
  }
}

// The c parameter pairs of a call (one per tensor, or one per batch element under vmap:
// pair b for elements [b·n/c, (b+1)·n/c)) and an output of the input's n elements.
ffi::Error Pairs(const std::string& who, const char* names, int64_t n, size_t c1, size_t c2,
                 size_t n_out, int64_t* c) {
  *c = static_cast<int64_t>(c1);
  if (*c < 1 || c2 != c1 || n % *c != 0)
    return ffi::Error::InvalidArgument(who + ": " + names +
                                       " must hold c values each, c dividing the input's size");
  if (static_cast<int64_t>(n_out) != n)
    return ffi::Error::InvalidArgument(who + ": the output and the input differ in size");
  return ffi::Error::Success();
}

template <bool Fma>
ffi::Error QuantizeImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> inv,
                        ffi::Buffer<ffi::F32> zf, ffi::Result<ffi::AnyBuffer> out,
                        int64_t qmin, int64_t qmax, int64_t nan_code) {
  const std::string who = Fma ? "qjax_quantize_fma" : "qjax_quantize_product";
  auto t = out->element_type();
  bool is_signed = t == ffi::DataType::S8;
  if (!is_signed && t != ffi::DataType::U8)
    return ffi::Error::InvalidArgument(who + ": out must be int8 or uint8");
  int64_t n = static_cast<int64_t>(x.element_count()), c = 0;
  ffi::Error err = Pairs(who, "inv and zf", n, inv.element_count(), zf.element_count(),
                         out->element_count(), &c);
  if (err.failure()) return err;
  int64_t lo = is_signed ? -128 : 0, hi = is_signed ? 127 : 255;
  if (qmin < lo || qmax > hi || qmin > qmax || nan_code < lo || nan_code > hi)
    return ffi::Error::InvalidArgument(who + ": qmin, qmax and nan_code must fit the codes");
  auto* o = static_cast<uint8_t*>(out->untyped_data());
  int64_t block = n / c;
  for (int64_t b = 0; b < c; ++b) {
    const float* xb = x.typed_data() + b * block;
    float i = inv.typed_data()[b], z = zf.typed_data()[b];
    if (is_signed)
      Quantize<true, Fma>(xb, block, i, z, qmin, qmax, nan_code, o + b * block);
    else
      Quantize<false, Fma>(xb, block, i, z, qmin, qmax, nan_code, o + b * block);
  }
  return ffi::Error::Success();
}

template <bool Signed>
void Dequantize(const uint8_t* q, int64_t n, int32_t zp, float scale, float* out) {
  const __m256i vz = _mm256_set1_epi32(zp);
  const __m256 vs = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i));
    __m256i v = Signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
    __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(v, vz));  // wraps, like XLA's s32
    _mm256_storeu_ps(out + i, _mm256_mul_ps(f, vs));
  }
  for (; i < n; ++i) {  // the same operations one element at a time
    int32_t v = Signed ? static_cast<int8_t>(q[i]) : q[i];
    int32_t d = static_cast<int32_t>(static_cast<uint32_t>(v) - static_cast<uint32_t>(zp));
    out[i] = static_cast<float>(d) * scale;
  }
}

ffi::Error DequantizeImpl(ffi::AnyBuffer q, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::S32> zp,
                          ffi::ResultBuffer<ffi::F32> out) {
  const std::string who = "qjax_dequantize";
  auto t = q.element_type();
  bool is_signed = t == ffi::DataType::S8;
  if (!is_signed && t != ffi::DataType::U8)
    return ffi::Error::InvalidArgument(who + ": codes must be int8 or uint8");
  int64_t n = static_cast<int64_t>(q.element_count()), c = 0;
  ffi::Error err = Pairs(who, "scale and zp", n, scale.element_count(), zp.element_count(),
                         out->element_count(), &c);
  if (err.failure()) return err;
  const auto* codes = static_cast<const uint8_t*>(q.untyped_data());
  int64_t block = n / c;
  for (int64_t b = 0; b < c; ++b) {
    float s = scale.typed_data()[b];
    int32_t z = zp.typed_data()[b];
    float* o = out->typed_data() + b * block;
    if (is_signed)
      Dequantize<true>(codes + b * block, block, z, s, o);
    else
      Dequantize<false>(codes + b * block, block, z, s, o);
  }
  return ffi::Error::Success();
}

ffi::Error PadImpl(ffi::AnyBuffer x, ffi::AnyBuffer value, ffi::Result<ffi::AnyBuffer> out,
                   int64_t lo_h, int64_t hi_h, int64_t lo_w, int64_t hi_w) {
  const std::string who = "qjax_pad_nhwc";
  auto t = x.element_type();
  if ((t != ffi::DataType::U8 && t != ffi::DataType::S8) || value.element_type() != t ||
      out->element_type() != t || value.element_count() != 1)
    return ffi::Error::InvalidArgument(who + ": x, value (one code) and out must be 8-bit");
  auto xd = x.dimensions(), od = out->dimensions();
  if (xd.size() != 4 || od.size() != 4)
    return ffi::Error::InvalidArgument(who + ": x and out must be NHWC (rank 4)");
  if (lo_h < 0 || hi_h < 0 || lo_w < 0 || hi_w < 0)
    return ffi::Error::InvalidArgument(who + ": negative padding");
  int64_t n = xd[0], h = xd[1], w = xd[2], c = xd[3];
  int64_t hp = lo_h + h + hi_h, wp = lo_w + w + hi_w;
  if (od[0] != n || od[1] != hp || od[2] != wp || od[3] != c)
    return ffi::Error::InvalidArgument(who + ": out must be (N, lo_h + H + hi_h, lo_w + W + "
                                             "hi_w, C)");
  const auto* src = static_cast<const uint8_t*>(x.untyped_data());
  auto* dst = static_cast<uint8_t*>(out->untyped_data());
  int v = *static_cast<const uint8_t*>(value.untyped_data());
  int64_t row = wp * c, in_row = w * c;
  for (int64_t b = 0; b < n; ++b) {
    std::memset(dst, v, lo_h * row);
    dst += lo_h * row;
    for (int64_t i = 0; i < h; ++i, dst += row, src += in_row) {
      std::memset(dst, v, lo_w * c);
      std::memcpy(dst + lo_w * c, src, in_row);
      std::memset(dst + lo_w * c + in_row, v, hi_w * c);
    }
    std::memset(dst, v, hi_h * row);
    dst += hi_h * row;
  }
  return ffi::Error::Success();
}

// Signed and unsigned codes through one loop: signed ones are compared with their top bit
// flipped (x ^ 0x80 orders int8 as uint8), flipped back when stored.
struct Pool {
  int64_t h, w, c, oh, ow, kh, kw, sh, sw, dh, dw, ph, pw;
};

template <uint8_t Flip>
void MaxPoolImage(const uint8_t* x, const Pool& p, uint8_t* out) {
  const __m256i f32 = _mm256_set1_epi8(static_cast<char>(Flip));
  const __m128i f16 = _mm_set1_epi8(static_cast<char>(Flip));
  const int64_t row = p.w * p.c;
  for (int64_t oy = 0; oy < p.oh; ++oy) {
    for (int64_t ox = 0; ox < p.ow; ++ox, out += p.c) {
      // the window positions inside the input, as offsets into the image
      int64_t offs[64], n = 0;
      for (int64_t i = 0; i < p.kh; ++i) {
        int64_t iy = oy * p.sh - p.ph + i * p.dh;
        if (iy < 0 || iy >= p.h) continue;
        for (int64_t j = 0; j < p.kw; ++j) {
          int64_t ix = ox * p.sw - p.pw + j * p.dw;
          if (ix >= 0 && ix < p.w) offs[n++] = iy * row + ix * p.c;
        }
      }
      int64_t c = 0;
      for (; c + 32 <= p.c; c += 32) {
        __m256i m = _mm256_setzero_si256();  // the flipped minimum
        for (int64_t k = 0; k < n; ++k) {
          __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + offs[k] + c));
          m = _mm256_max_epu8(m, _mm256_xor_si256(v, f32));
        }
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), _mm256_xor_si256(m, f32));
      }
      for (; c + 16 <= p.c; c += 16) {
        __m128i m = _mm_setzero_si128();
        for (int64_t k = 0; k < n; ++k) {
          __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + offs[k] + c));
          m = _mm_max_epu8(m, _mm_xor_si128(v, f16));
        }
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c), _mm_xor_si128(m, f16));
      }
      for (; c < p.c; ++c) {
        uint8_t m = 0;
        for (int64_t k = 0; k < n; ++k) {
          uint8_t v = x[offs[k] + c] ^ Flip;
          m = v > m ? v : m;
        }
        out[c] = m ^ Flip;
      }
    }
  }
}

ffi::Error MaxPoolImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out, int64_t kh, int64_t kw,
                       int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t ph, int64_t pw) {
  const std::string who = "qjax_max_pool_nhwc";
  auto t = x.element_type();
  if ((t != ffi::DataType::U8 && t != ffi::DataType::S8) || out->element_type() != t)
    return ffi::Error::InvalidArgument(who + ": x and out must be 8-bit codes of one dtype");
  auto xd = x.dimensions(), od = out->dimensions();
  if (xd.size() != 4 || od.size() != 4)
    return ffi::Error::InvalidArgument(who + ": x and out must be NHWC (rank 4)");
  // offsets of one window live on the stack: at most 64 positions
  if (kh < 1 || kw < 1 || kh * kw > 64 || sh < 1 || sw < 1 || dh < 1 || dw < 1 || ph < 0 ||
      pw < 0)
    return ffi::Error::InvalidArgument(
        who + ": window (at most 64 positions), strides and dilation must be positive, "
              "padding not negative");
  Pool p{xd[1], xd[2], xd[3], od[1], od[2], kh, kw, sh, sw, dh, dw, ph, pw};
  if (od[0] != xd[0] || od[3] != p.c)
    return ffi::Error::InvalidArgument(who + ": out must be (N, OH, OW, C) of x's N and C");
  const auto* src = static_cast<const uint8_t*>(x.untyped_data());
  auto* dst = static_cast<uint8_t*>(out->untyped_data());
  for (int64_t b = 0; b < xd[0]; ++b) {
    const uint8_t* xb = src + b * p.h * p.w * p.c;
    uint8_t* ob = dst + b * p.oh * p.ow * p.c;
    if (t == ffi::DataType::S8)
      MaxPoolImage<0x80>(xb, p, ob);
    else
      MaxPoolImage<0x00>(xb, p, ob);
  }
  return ffi::Error::Success();
}

template <bool Signed>
void ReluCodes(const uint8_t* x, uint8_t lo, int64_t n, uint8_t* out) {
  const __m256i l = _mm256_set1_epi8(static_cast<char>(lo));
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    v = Signed ? _mm256_max_epi8(v, l) : _mm256_max_epu8(v, l);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), v);
  }
  for (; i < n; ++i) {
    bool above = Signed ? static_cast<int8_t>(x[i]) > static_cast<int8_t>(lo) : x[i] > lo;
    out[i] = above ? x[i] : lo;
  }
}

ffi::Error ReluImpl(ffi::AnyBuffer x, ffi::AnyBuffer lo, ffi::Result<ffi::AnyBuffer> out) {
  const std::string who = "qjax_relu_codes";
  auto t = x.element_type();
  if ((t != ffi::DataType::U8 && t != ffi::DataType::S8) || out->element_type() != t ||
      lo.element_type() != t)
    return ffi::Error::InvalidArgument(who + ": x, lo and out must be 8-bit codes of one dtype");
  if (lo.element_count() != 1 || out->element_count() != x.element_count())
    return ffi::Error::InvalidArgument(who + ": lo must be one code and out x's shape");
  const auto* src = static_cast<const uint8_t*>(x.untyped_data());
  const uint8_t l = *static_cast<const uint8_t*>(lo.untyped_data());
  auto* dst = static_cast<uint8_t*>(out->untyped_data());
  const auto n = static_cast<int64_t>(x.element_count());
  if (t == ffi::DataType::S8) ReluCodes<true>(src, l, n, dst);
  else ReluCodes<false>(src, l, n, dst);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxReluCodes, ReluImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxMaxPoolNhwc, MaxPoolImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("dh")
                                  .Attr<int64_t>("dw")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxPadNhwc, PadImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("lo_h")
                                  .Attr<int64_t>("hi_h")
                                  .Attr<int64_t>("lo_w")
                                  .Attr<int64_t>("hi_w"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxDequantize, DequantizeImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

#define QJAX_QUANTIZE_HANDLER(name, fma)                                      \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, QuantizeImpl<fma>,                      \
                                ffi::Ffi::Bind()                              \
                                    .Arg<ffi::Buffer<ffi::F32>>()             \
                                    .Arg<ffi::Buffer<ffi::F32>>()             \
                                    .Arg<ffi::Buffer<ffi::F32>>()             \
                                    .Ret<ffi::AnyBuffer>()                    \
                                    .Attr<int64_t>("qmin")                    \
                                    .Attr<int64_t>("qmax")                    \
                                    .Attr<int64_t>("nan_code"));

QJAX_QUANTIZE_HANDLER(QjaxQuantizeFma, true)
QJAX_QUANTIZE_HANDLER(QjaxQuantizeProduct, false)
