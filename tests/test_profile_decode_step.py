"""experiments.profile_decode_step: the work of a compiled module's entry computation, and the
device kernels of a profiler trace."""
import jax
import jax.numpy as jnp

from experiments.profile_decode_step import device_kernel_times, entry_work, traced_kernels

_HLO = """HloModule jit_step

%fused_computation (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %neg = f32[4]{0} negate(%p)
}

ENTRY %main (a: f32[4], b: s32[8]) -> (f32[4], s32[3,8]) {
  %a = f32[4]{0} parameter(0)
  %b = s32[8]{0} parameter(1)
  %c = f32[] constant(1)
  %fusion = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused_computation
  %slots = s32[3,8]{1,0} custom-call(%b), custom_call_target="cqjax_cuda_expert_slots", api_version=API_VERSION_TYPED_FFI
  %gemm = (f32[4]{0}, s8[0]{0}) custom-call(%fusion), custom_call_target="__cublas$gemm"
  %gte = f32[4]{0} get-tuple-element(%gemm), index=0
  %copy = f32[4]{0} copy(%gte)
  ROOT %t = (f32[4]{0}, s32[3,8]{1,0}) tuple(%copy, %slots)
}
"""


def test_counts_the_entry_work_by_opcode_and_target():
  assert dict(entry_work(_HLO)) == {"fusion": 1, "custom-call:cqjax_cuda_expert_slots": 1,
                                    "custom-call:__cublas$gemm": 1, "copy": 1}


def test_reads_a_compiled_module():
  text = jax.jit(lambda a, b: (jnp.sin(a) @ b, a + 1)).lower(jnp.ones((3, 4)), jnp.ones((4, 5))).compile().as_text()
  counts = entry_work(text)
  assert sum(counts.values()) >= 1 and not {"parameter", "tuple", "constant"} & set(counts)


def test_sums_the_device_kernels_of_a_trace_by_name():
  trace = {"traceEvents": [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
      {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
      {"ph": "X", "pid": 1, "tid": 1, "name": "PjitFunction(step)", "ts": 0, "dur": 90.0},
      {"ph": "X", "pid": 7, "tid": 3, "name": "int8_kernel", "ts": 10, "dur": 4.5},
      {"ph": "X", "pid": 7, "tid": 3, "name": "loop_fusion", "ts": 20, "dur": 1.25},
      {"ph": "X", "pid": 7, "tid": 4, "name": "int8_kernel", "ts": 30, "dur": 5.5},
      {"ph": "i", "pid": 7, "tid": 4, "name": "marker", "ts": 40},
  ]}
  assert device_kernel_times(trace) == {"int8_kernel": [2, 10.0], "loop_fusion": [1, 1.25]}


def test_a_cpu_trace_holds_no_device_kernels():
  assert traced_kernels(jax.jit(lambda a: jnp.sin(a @ a)), (jnp.ones((8, 8)),)) == {}
