// What a launch of a kernel may take on the current device, shared by lut_matmul.cu and
// lut_matmul_int8.cu.
#pragma once

#include <cuda_runtime.h>

namespace cqjax_cuda {

// What a launch of kKernel may take on the current device, found once per device and kernel: the
// dynamic shared memory a block may use (opted in above 48 KB: the opt-in limit, which covers
// static and dynamic together, less the static), the shared memory of an SM, the SM count, and
// the blocks an SM holds at `threads` threads by registers alone.
struct LaunchLimits {
  int smem = 0, sm_smem = 0, sms = 0, fit = 0, major = 0;
};

template <auto kKernel>
cudaError_t launch_limits(int threads, LaunchLimits& out) {
  static LaunchLimits cache[64];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 64 && cache[device].smem > 0) {
    out = cache[device];
    return cudaSuccess;
  }
  cudaFuncAttributes attr;
  err = cudaDeviceGetAttribute(&out.smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&out.sm_smem, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&out.sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&out.major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, kKernel);
  if (err != cudaSuccess) return err;
  out.smem -= static_cast<int>(attr.sharedSizeBytes);
  err = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, out.smem);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&out.fit, kKernel, threads, 0);
  if (err != cudaSuccess) return err;
  if (device < 64) cache[device] = out;
  return cudaSuccess;
}

}  // namespace cqjax_cuda
