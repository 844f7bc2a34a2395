// The expert slots of a grouped call (cqjax.codebook.expert_slots) in one launch of one warp, as
// an XLA FFI custom call (wrapper: cuda_kernels/expert_slots.py):
//
//   sizes  int32 [e]      rows of each expert (the ragged_dot contract: rows sorted by expert)
//   slots  int32 [3, s]   (expert, first row, rows) of each expert with rows, compacted; slots past
//                         the last are (0, 0, 0), so that empty experts launch no work
//
// Why: XLA computes them in 3-5 one-block kernels ahead of every grouped call, each a launch and a
// round trip; at decode batch sizes that is a share of a MoE layer's time. On an H200 this kernel
// takes 9-11 us a computation against XLA's 11-16 (experiments/bench_expert_slots.py, BENCHMARKS.md
// session 37). Lane l takes a span of experts, counts its non-empty ones and sums its rows; two
// prefix sums over the lanes give each span's first slot and first row.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

__global__ void expert_slots_kernel(const int32_t* sizes, int experts, int32_t* slots, int num_slots) {
  const int lane = threadIdx.x, span = (experts + 31) / 32;
  const int e0 = min(experts, lane * span), e1 = min(experts, e0 + span);
  int filled = 0, rows = 0;
  for (int e = e0; e < e1; ++e) {
    filled += sizes[e] > 0;
    rows += sizes[e];
  }
  int slot = filled, start = rows;  // inclusive prefix sums over the lanes, then exclusive
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int f = __shfl_up_sync(0xffffffffu, slot, o), r = __shfl_up_sync(0xffffffffu, start, o);
    if (lane >= o) slot += f, start += r;
  }
  const int used = __shfl_sync(0xffffffffu, slot, 31);
  slot -= filled;
  start -= rows;
  for (int e = e0; e < e1; ++e) {
    const int g = sizes[e];
    if (g > 0) {
      if (slot < num_slots) slots[slot] = e, slots[num_slots + slot] = start, slots[2 * num_slots + slot] = g;
      ++slot;
    }
    start += g;
  }
  for (int i = used + lane; i < num_slots; i += 32) slots[i] = slots[num_slots + i] = slots[2 * num_slots + i] = 0;
}

ffi::Error ExpertSlotsImpl(cudaStream_t stream, ffi::Buffer<ffi::S32> sizes, ffi::Result<ffi::Buffer<ffi::S32>> slots) {
  const auto sd = slots->dimensions();
  if (sizes.dimensions().size() != 1 || sd.size() != 2 || sd[0] != 3)
    return ffi::Error::InvalidArgument("cqjax CUDA expert_slots: expected group sizes [e] and slots [3, s]");
  if (sd[1] == 0) return ffi::Error::Success();
  expert_slots_kernel<<<1, 32, 0, stream>>>(sizes.typed_data(), static_cast<int>(sizes.element_count()),
                                            slots->typed_data(), static_cast<int>(sd[1]));
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("cqjax CUDA expert_slots: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CqjaxExpertSlotsCuda, ExpertSlotsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>(),
                              {ffi::Traits::kCmdBufferCompatible});
