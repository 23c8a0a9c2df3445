// Probe for issue 16 (not part of `qjax bench`, not built by the tests): how fast and how
// exact is oneDNN's int8 matmul on this CPU, before a jax.ffi backend is built on it.
//
// One u8 x s8 -> s32 matmul, M x 1024 x 1024 for M = 1, 32, 256, with a source zero point
// (128), weights reordered once into oneDNN's own layout, 60 runs, median; a sample of the
// outputs is checked against an exact int64 sum of (a - 128) * b over full-range codes, so
// the int16 pair saturation of the AVX2 kernels shows up as mismatches.
//
// Build and run against the PyPI wheels (a SYCL build: its CPU engine needs the OpenCL CPU
// runtime that the wheels ship, and the wheel's ICD file points at a build path):
//   python3.11 -m venv /tmp/dnnl && /tmp/dnnl/bin/pip install onednn==2026.1.0 onednn-devel==2026.1.0
//   g++ -O2 -std=c++17 onednn_matmul.cc -I/tmp/dnnl/include -L/tmp/dnnl/lib \
//     -Wl,-rpath-link,/tmp/dnnl/lib -ldnnl -o mm
//   LD_LIBRARY_PATH=/tmp/dnnl/lib OCL_ICD_FILENAMES=/tmp/dnnl/lib/libintelocl.so \
//     ONEAPI_DEVICE_SELECTOR=opencl:cpu ./mm          # add ONEDNN_MAX_CPU_ISA=AVX2 for AVX2
// Measured 2026-12-06, AMD EPYC (AVX-512-VNNI), 2 cores: brg_matmul:avx512_core_vnni
// 58 / 123 / 405 us, exact; AVX2 gemm:jit 122 / 237 / 1185 us, 4/11, 16/44, 16/44 sampled
// outputs differ; XLA's s8 dot in the same shapes 171 / 277 / 1552 us.
#include <oneapi/dnnl/dnnl.hpp>
#include <chrono>
#include <cstdio>
#include <vector>
#include <algorithm>
using namespace dnnl;
int main(int argc, char** argv) {
  engine eng(engine::kind::cpu, 0);
  stream s(eng);
  for (int M : {1, 32, 256}) {
    int K = 1024, N = 1024;
    memory::desc a_md({M, K}, memory::data_type::u8, memory::format_tag::ab);
    memory::desc b_md({K, N}, memory::data_type::s8, memory::format_tag::any);
    memory::desc c_md({M, N}, memory::data_type::s32, memory::format_tag::ab);
    primitive_attr attr;
    attr.set_zero_points_mask(DNNL_ARG_SRC, 0);
    matmul::primitive_desc pd(eng, a_md, b_md, c_md, attr);
    std::printf("M=%d impl=%s\n", M, pd.impl_info_str());
    memory A(a_md, eng), C(c_md, eng);
    memory Bp(pd.weights_desc(), eng);
    memory B(memory::desc({K, N}, memory::data_type::s8, memory::format_tag::ab), eng);
    uint8_t* a = (uint8_t*)A.get_data_handle(); for (int i = 0; i < M*K; i++) a[i] = (i*7)%256;
    int8_t* b = (int8_t*)B.get_data_handle(); for (int i = 0; i < K*N; i++) b[i] = (int8_t)((i*13)%256 - 128);
    reorder(B, Bp).execute(s, B, Bp);
    memory zp(memory::desc({1}, memory::data_type::s32, memory::format_tag::x), eng);
    ((int32_t*)zp.get_data_handle())[0] = 128;
    matmul mm(pd);
    std::vector<double> ts;
    for (int r = 0; r < 60; r++) {
      auto t0 = std::chrono::high_resolution_clock::now();
      mm.execute(s, {{DNNL_ARG_SRC, A}, {DNNL_ARG_WEIGHTS, Bp}, {DNNL_ARG_DST, C},
                     {DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_SRC, zp}});
      s.wait();
      auto t1 = std::chrono::high_resolution_clock::now();
      ts.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    }
    std::sort(ts.begin(), ts.end());
    // exactness check of a few entries
    int32_t* c = (int32_t*)C.get_data_handle(); long bad = 0;
    for (int i = 0; i < M; i += std::max(1, M/4)) for (int j = 0; j < N; j += 97) {
      long acc = 0; for (int k = 0; k < K; k++) acc += (long)((int)a[i*K+k]-128) * b[k*N+j];
      bad += (acc != c[i*N+j]);
    }
    std::printf("M=%d median %.1f us, exact-check mismatches %ld\n", M, ts[ts.size()/2], bad);
  }
}
