"""experiments.device_trace: the device kernels of a jax.profiler trace."""
import jax
import jax.numpy as jnp

from experiments.device_trace import device_kernel_times, print_kernels, traced_kernels


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


def test_prints_the_kernels_per_unit_against_the_wall_time(capsys):
  print_kernels({"int8_kernel": [4, 10.0], "loop_fusion": [2, 30.0]}, per=2, label="a token", wall_us=40.0, top=1)
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "  a token: 40.0 us wall, 3 kernels taking 20.0 us (50% busy)"
  assert lines[1:] == ["      15.00 us  x  1.0  loop_fusion"]
