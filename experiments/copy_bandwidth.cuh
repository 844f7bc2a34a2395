// The device-to-device copy rate, the reference the stand-alone kernel probes of experiments/
// print beside their own rates (BENCHMARKS.md: "% of copy").
#pragma once

#include <cuda_runtime.h>

#include <cstdio>

// One 256 MB device-to-device copy, timed over 5 repeats after a warm-up; read + write counted.
inline void print_copy_bandwidth() {
  void *src, *dst;
  const size_t bytes = 256u << 20;
  cudaMalloc(&src, bytes), cudaMalloc(&dst, bytes);
  cudaEvent_t a, b;
  cudaEventCreate(&a), cudaEventCreate(&b);
  cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice);
  cudaEventRecord(a);
  for (int i = 0; i < 5; ++i) cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice);
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms;
  cudaEventElapsedTime(&ms, a, b);
  std::printf("device copy: %.0f GB/s (read + write)\n", 2.0 * bytes * 5 / (ms * 1e-3) / 1e9);
  cudaFree(src), cudaFree(dst);
}
