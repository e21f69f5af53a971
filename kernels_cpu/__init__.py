"""XLA:CPU kernels in C++ (XLA FFI custom calls), for work that XLA's CPU code generator does slowly; each beside
a plain-jnp reference with the same signature, which TPU and GPU use (their XLA does that work well).

The kernels are compiled on first use with the system's C++ compiler (`$CXX`, else `c++`) into a cache folder
and registered with XLA's CPU backend (`enable`); where that fails, or with JAXSERVE_CPU_KERNELS=0, callers use
the references. Imports only jax.
"""

from kernels_cpu.build import enable, enabled
from kernels_cpu.paged_attention import paged_attention
from kernels_cpu.quantized_linear import activation_error, int8_rows, packed4_columns
from kernels_cpu.top_candidates import grouped, top_candidates, top_candidates_reference

__all__ = ["activation_error", "enable", "enabled", "grouped", "int8_rows", "packed4_columns", "paged_attention",
           "top_candidates", "top_candidates_reference"]
