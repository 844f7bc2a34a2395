"""CUDA GPU kernels (XLA FFI custom calls): see README.md."""
