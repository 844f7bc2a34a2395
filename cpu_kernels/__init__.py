"""C++ kernels for the CPU, called from jitted JAX code as XLA FFI custom calls."""
