"""The cpu backend: torch CPU kernels (oneDNN/MKL matmul, SDPA) and gloo collectives."""
