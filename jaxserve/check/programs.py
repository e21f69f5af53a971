"""Every serving program of a model, built from its config alone with abstract weights, compiled for a target
(TPU) or lowered for it (CUDA: compiling needs the GPU).

The programs are the engine's own (`StepPrograms`, model_runner.py) with the engine's shapes: the token-count
buckets, the KV cache sized by the engine's rule (kv_memory.py) from the chip's memory and the compiled peak of
the largest step, and the same shardings. Nothing is allocated: weights, cache and step inputs are
ShapeDtypeStructs placed on the target's devices.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import models
from jaxserve.check.targets import Target
from jaxserve.core import kv_memory
from jaxserve.core.engine_core import EngineConfig, step_token_budget
from jaxserve.core.input_batch import num_table_writes
from jaxserve.core.model_runner import StepPrograms, abstract, compile_bucket, token_buckets
from jaxserve.core.sampler import SamplerState
from jaxserve.models import attention
from jaxserve.models.base import KVCache, kv_code_dtype, layer_cache
from jaxserve.models.config import ModelConfig
from jaxserve.parallel import sharding
from jaxserve.quantization.schemes import WeightQuantization


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One compiled program: what the compiler says it needs per chip and does per call."""

    name: str  # forward | sample | masks | prompt_logprobs | init_slot | write_tables
    bucket: str  # "T=256 S=256", or "" for programs compiled once
    seconds: float  # compile time
    argument_bytes: int  # per chip: inputs (weights, KV cache, state, step)
    output_bytes: int
    alias_bytes: int  # outputs written in place of donated inputs
    temp_bytes: int  # activations and scratch
    flops: float  # per chip per call, from the compiled cost analysis
    bytes_accessed: float
    error: str = ""  # the compiler's refusal, when it failed
    live_bytes: int = 0  # other programs' outputs alive meanwhile: the bucket's logits and hidden states
    collective_bytes: int = 0  # per chip: results of cross-chip collectives, each counted once (not per loop trip)
    compiled: bool = True  # False when only lowered: no temporaries or collectives known, cost before partitioning

    @property
    def overhead_bytes(self) -> int:
        """What running it adds on a chip to what always stays there: temporaries, the outputs not written in
        place, and the forward pass's outputs still alive."""
        return self.temp_bytes + self.output_bytes - self.alias_bytes + self.live_bytes

    def peak_bytes(self, resident: int) -> int:
        """Live at once on a chip while it runs; resident: the weights, KV cache, tables and sampler state."""
        return max(self.argument_bytes, resident) + self.overhead_bytes

    def seconds_at_roofline(self, flops_per_s: float, bytes_per_s: float) -> float:
        return max(self.flops / flops_per_s, self.bytes_accessed / bytes_per_s)


def _cost(stage) -> dict:
    cost = stage.cost_analysis() or {}
    return cost[0] if isinstance(cost, list) else cost


def _compile(name: str, bucket: str, jitted, *args) -> tuple[Compiled, object]:
    """Compiles for the args' devices. Returns (its figures, its outputs' ShapeDtypeStructs); a failure is
    returned (error set, no outputs), not raised."""
    start = time.perf_counter()
    try:
        exe = jitted.trace(*args).lower().compile()
    except Exception as e:  # the compiler's refusal (out of SMEM/VMEM, an unsupported op) is the finding
        return _failed(name, bucket, start, e), None
    seconds = time.perf_counter() - start
    mem, cost = exe.memory_analysis(), _cost(exe)
    stats = Compiled(name, bucket, seconds, mem.argument_size_in_bytes, mem.output_size_in_bytes,
                     mem.alias_size_in_bytes, mem.temp_size_in_bytes, float(cost.get("flops", 0.0)),
                     float(cost.get("bytes accessed", 0.0)), collective_bytes=collective_bytes(exe.as_text()))
    return stats, exe.out_info


def _lower(mesh, name: str, bucket: str, jitted, *args) -> tuple[Compiled, object]:
    """Lowers for CUDA on an abstract mesh, as _compile does for TPU. Without the compiler, memory comes from the
    placed shapes (arguments, outputs, the donated inputs they replace) and FLOPs from XLA's analysis of the
    program before partitioning, divided by the GPUs. Its bytes are not kept: before optimization every op counts
    each buffer it touches whole (the in-place KV write, the whole cache twice per layer)."""
    start = time.perf_counter()
    try:
        with jax.sharding.use_abstract_mesh(mesh):  # where the Pallas Triton lowering reads the GPU it lowers for
            lowered = jitted.trace(*args).lower(lowering_platforms=("cuda",))
    except Exception as e:  # a kernel the Triton lowering refuses (block shapes, dtypes) is the finding
        return _failed(name, bucket, start, e), None
    seconds = time.perf_counter() - start
    donated = [a for a, info in zip(jax.tree.leaves(args), jax.tree.leaves(lowered.args_info)) if info.donated]
    outputs, cost = lowered.out_info, _cost(lowered)
    stats = Compiled(name, bucket, seconds, per_chip_bytes(args), per_chip_bytes(outputs), per_chip_bytes(donated),
                     0, float(cost.get("flops", 0.0)) / mesh.size, 0.0, compiled=False)
    return stats, outputs


def _failed(name: str, bucket: str, start: float, e: Exception) -> Compiled:
    return Compiled(name, bucket, time.perf_counter() - start, 0, 0, 0, 0, 0.0, 0.0,
                    f"{type(e).__name__}: {e}".splitlines()[0])


_COLLECTIVE = re.compile(r"= ([^=\n]+?) (?:all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                         r"(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")


def collective_bytes(hlo: str) -> int:
    """Bytes of the results of the cross-device collectives in compiled HLO text: the largest array of each
    collective's result (an async start's tuple holds its operand too)."""
    total = 0
    for result in _COLLECTIVE.findall(hlo):
        sizes = [math.prod(int(d) for d in dims.split(",") if d) * (1 if kind == "pred" else int(kind.lstrip("sufb")) // 8)
                 for kind, dims in _ARRAY.findall(result)]
        total += max(sizes, default=0)
    return total


def abstract_params(cfg: ModelConfig, dtype, mesh, quantize: WeightQuantization | None = None):
    """The family's params pytree as ShapeDtypeStructs, sharded as loading would, and the configuration they
    compute with: params_from_hf runs over zero-stride arrays (no memory) and places each field abstractly, quantized
    as `quantize` would at load."""
    family = models.family(cfg.model_type)
    zero = np.zeros((), dtype)
    tensors = {name: np.broadcast_to(zero, shape) for name, shape in family.hf_shapes(cfg).items()}
    placed = sharding.placed(mesh, cfg)

    def place(array, name):
        shape = sharding.fused_shape(array, name, cfg, placed) if isinstance(array, tuple) else array.shape
        struct = jax.ShapeDtypeStruct(shape, array[0].dtype if isinstance(array, tuple) else array.dtype)
        struct = quantize.abstract(struct, name) if quantize else struct
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(
            s.shape, s.dtype, sharding=sharding.param_sharding(mesh, placed, name, s.shape)), struct)

    return family.params_from_hf(tensors, cfg, dtype, put=place), placed


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a tree of placed ShapeDtypeStructs (the most any chip holds; an unplaced one whole)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape) if x.sharding else x.shape) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


class CompileFailed(RuntimeError):
    """A program the KV-cache sizing needs did not compile."""


@dataclasses.dataclass
class Serving:
    """The serving state of one configuration on one target, abstract."""

    cfg: ModelConfig
    config: EngineConfig
    target: Target
    dtype: jnp.dtype
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh  # abstract for a lowered-only (CUDA) target
    params: object
    max_model_len: int
    kv_pages: int = 0
    kv_source: str = ""
    kv_layout: kv_memory.Layout | None = None  # what a pool page and the rings cost per chip

    @classmethod
    def build(cls, cfg: ModelConfig, config: EngineConfig, target: Target, dtype,
              quantize: WeightQuantization | None = None) -> "Serving":
        mesh = target.mesh(config.tensor_parallel_size, config.enable_expert_parallel)
        config = config.on(target.chip.platform)
        max_model_len = config.context_length(cfg)
        params, cfg = abstract_params(cfg, dtype, mesh, quantize)
        serving = cls(cfg, config, target, jnp.dtype(dtype), mesh, params, max_model_len)
        serving.kv_layout = kv_memory.Layout.of(cfg, sharding.kv_heads_per_device(mesh, cfg), config.page_size,
                                                serving.dtype, kv_code_dtype(config.kv_cache_dtype),
                                                config.max_num_seqs, step_token_budget(config))
        return serving

    @property
    def page_bytes(self) -> int:
        return self.kv_layout.page_bytes

    @property
    def pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.config.page_size)

    @property
    def buckets(self) -> list[int]:
        return token_buckets(step_token_budget(self.config))

    def state(self, num_pages: int):
        """Abstract (cache, tables, sampler state) with a cache of num_pages."""
        cfg, rep = self.cfg, sharding.replicated(self.mesh)
        code = kv_code_dtype(self.config.kv_cache_dtype)
        ring = self.kv_layout.ring_pages * self.config.max_num_seqs

        def layer(i):
            shapes = layer_cache(cfg, ring if cfg.ringed(i) else num_pages, self.config.page_size, self.dtype, code)
            return jax.tree.map(lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where), shapes,
                                sharding.layer_cache_sharding(self.mesh, cfg, shapes))

        cache = KVCache(kv=tuple(layer(i) for i in range(cfg.num_layers)))
        tables = jax.ShapeDtypeStruct((self.config.max_num_seqs, self.pages_per_seq), jnp.int32, sharding=rep)
        placement = SamplerState.placement(rep, sharding.by_vocab(self.mesh, cfg.vocab_size))
        state = jax.tree.map(abstract, jax.eval_shape(lambda: SamplerState.zeros(self.config.max_num_seqs,
                                                                                  cfg.vocab_size)), placement)
        return cache, tables, state

    def programs(self, cache, state) -> StepPrograms:
        kernel = {"tpu": "pallas_tpu", "cuda": "pallas_gpu"}[self.target.chip.platform]
        backend = attention.resolve_backend(kernel, self.mesh, self.target.device_kind(self.mesh))
        return StepPrograms.build(self.cfg, backend, sharding.replicated(self.mesh),
                                  jax.tree.map(lambda x: x.sharding, cache), jax.tree.map(lambda x: x.sharding, state),
                                  state.counts.sharding)  # the logits split as the sampler's [slots, V] rows are

    def compile_bucket(self, programs: StepPrograms, cache, tables, state, num_tokens: int) -> list[Compiled]:
        """The bucket's forward, sampler, grammar-mask and prompt-logprob programs (only the forward when it
        failed: the others take its outputs)."""
        label = f"T={num_tokens} S={min(num_tokens, self.config.max_num_seqs)}"
        forward, *rest = compile_bucket(programs, self.params, cache, tables, state, self.mesh, num_tokens,
                                        self.config.max_num_seqs, self.config.page_size, self.cfg.vocab_size,
                                        lambda name, jitted, *args: self._build(name, label, jitted, *args))
        live = forward.output_bytes - forward.alias_bytes  # its logits and hidden states, read by the others
        return [forward] + [dataclasses.replace(c, live_bytes=live) for c in rest]

    def _build(self, name: str, bucket: str, jitted, *args) -> tuple[Compiled, object]:
        if self.target.lowers_only:
            return _lower(self.mesh, name, bucket, jitted, *args)
        return _compile(name, bucket, jitted, *args)

    def compile_once(self, programs: StepPrograms, tables, state) -> list[Compiled]:
        """The programs outside the step: a slot's admission and the overflow block-table writes."""
        rep = sharding.replicated(self.mesh)
        v = self.cfg.vocab_size
        row = lambda dt: jax.ShapeDtypeStruct((v,), dt, sharding=rep)
        slot = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
        init, _ = self._build("init_slot", "", programs.init_slot, state, slot, row(jnp.int32), row(jnp.bool_),
                           row(jnp.float32), row(jnp.bool_))
        largest = self.buckets[-1]
        writes = jax.ShapeDtypeStruct((num_table_writes(largest, min(largest, self.config.max_num_seqs),
                                                        self.config.page_size), 3), jnp.int32, sharding=rep)
        tables_prog, _ = self._build("write_tables", "", programs.write_tables, tables, writes)
        return [init, tables_prog]

    def size_kv_cache(self) -> list[Compiled]:
        """Sets kv_pages by the engine's rule; where the chip's memory decides, the largest bucket is compiled
        with a cache of one sequence and its peak is what a step needs on top of the weights (vLLM's profile,
        read from the compiler instead of the allocator). Returns what it compiled."""
        c = self.config
        explicit = kv_memory.explicit_pages(c.num_kv_pages, c.kv_cache_memory_gb, c.gpu_memory_utilization,
                                            self.page_bytes, self.kv_layout.ring_bytes)
        profiled = []
        if explicit is not None:
            self.kv_pages, self.kv_source = explicit
        else:
            cache, tables, state = self.state(self.pages_per_seq)
            profiled = self.compile_bucket(self.programs(cache, state), cache, tables, state, self.buckets[-1])
            failed = [p for p in profiled if p.error]
            if failed:
                raise CompileFailed(f"{failed[0].name} {failed[0].bucket}: {failed[0].error}")
            in_use = per_chip_bytes((self.params, cache, tables, state))
            step = max(p.overhead_bytes for p in profiled)
            limit = self.target.chip.hbm_bytes
            before = kv_memory.DeviceMemory(limit, in_use, in_use)
            after = kv_memory.DeviceMemory(limit, in_use, in_use + step)
            self.kv_pages = kv_memory.pages_for_utilization([before], [after], c.gpu_memory_utilization,
                                                            self.page_bytes, self.pages_per_seq * self.page_bytes)
            self.kv_source = f"gpu_memory_utilization {c.gpu_memory_utilization:g} of {limit / kv_memory.GIB:.2f} GiB"
        kv_memory.check_fits(self.kv_pages, c.page_size, self.max_model_len, self.page_bytes, self.kv_source)
        self.kv_pages = min(self.kv_pages, self.pages_per_seq * c.max_num_seqs)  # more could never be used
        return profiled

    def compile_all(self, buckets: list[int], workers: int = 1) -> list[Compiled]:
        """Every program of these buckets, then the once-only ones; buckets compile on `workers` threads, as
        warm-up does (the table keeps bucket order)."""
        cache, tables, state = self.state(self.kv_pages)
        programs = self.programs(cache, state)
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            per_bucket = list(pool.map(lambda b: self.compile_bucket(programs, cache, tables, state, b), buckets))
        return [c for bucket in per_bucket for c in bucket] + self.compile_once(programs, tables, state)
