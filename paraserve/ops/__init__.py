"""Compiled CPU kernels (csrc/, one torch extension built on first use) and their Python entry
points in cpu.py. Everything here has a plain torch equivalent that the callers fall back to."""
