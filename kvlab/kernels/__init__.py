"""Compiled kernels: C++ for CPU decode (cpu.py); the CUDA one is Triton, in kvlab/attention/backends."""
