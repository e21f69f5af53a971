"""The device check: one script for a lent GPU, run in one call, stage by stage, each stage's result written to
--out as soon as it is known (a timeout still returns the earlier stages). See ../shared/device.md.

    PYTHONPATH=$PWD python bench/device_check.py --out $OUT                 # on the GPU machine (<= 9 minutes)
    python bench/device_check.py --dry-run --out /tmp/dc                    # on CPU: starts, fails clearly

Stages, in order:
1. kernels:  the Pallas GPU attention and KV write against the jnp reference, on the GPU, for the engine's shapes
   (page 16, head_dim 64/128, GQA 1-8, decode and prefill, partial pages); all outputs finite.
2. tiny:     a tiny random model's greedy tokens through the engine, Pallas GPU backend vs the reference.
3. engine:   a random-weight bf16 Llama-3-8B-shaped model through the real engine at batch 1/16/64/256 with
   ~1k-token contexts (admitted as already computed, so only the decode program compiles): compile time,
   whole engine step vs device-only step (forward + sampler on placed inputs), output tok/s, compiles while timed.
4. quant:    the same Llama-3-8B shape with its layers' matrices int8, then fp8 (random codes, one scale per output
   column, as `--quantization int8|fp8` stores them; embeddings and LM head bf16) at batch 1/16/64, each batch's
   tok/s also as a ratio to the engine stage's bf16 figure (vs_bf16).
5. gmm:      the grouped matmul of Qwen3-30B-A3B's experts (128 of hidden 2048 x 768, top 8) both ways,
   jax.lax.ragged_dot and the Pallas GPU kernel (kernels_pallas/grouped_matmul.py), at 8 / 128 / 512 / 8192 rows
   (decode batch 1 / 16 / 64, a 1024-token prefill), bf16 weights and int8 codes: µs per call, and the kernel's
   largest difference from ragged_dot. The MoE model runs ragged_dot until this says otherwise.
6. moe:      a random-weight bf16 Qwen3-30B-A3B-shaped mixture of experts (48 layers, 128 experts of 768, top 8;
   ~61 GB) through the engine likewise, at batch 1/16/64; its layers int8 where bf16 would fill more than 85% of
   the GPU's memory (an H100's 80 GB).
7. torch:    the same shapes as `engine` through transformers' LlamaForCausalLM (eager decode with a KV cache).
Each stage is skipped, with the reason recorded, when the time left (--budget) cannot hold it; where one call
cannot hold them all, split them (`--stages kernels tiny engine quant`, then `--stages gmm moe torch`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import sys
import tempfile
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
QWEN3_30B_A3B = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
                 "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
                 "num_experts_per_tok": 8, "norm_topk_prob": True, "num_hidden_layers": 48,
                 "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                 "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                 "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
BATCHES = (1, 16, 64, 256)
MOE_BATCHES = (1, 16, 64)
QUANT_BATCHES = (1, 16, 64)
GMM_ROWS = (8, 128, 512, 8192)
CONTEXT = 1024
KERNEL_CASES = [  # (q heads, kv heads, head_dim, tokens per sequence, context lengths)
    (8, 8, 64, [1, 1, 1], [17, 300, 16]),  # decode, MHA, partial pages
    (32, 8, 128, [1] * 8, [1024, 5, 700, 33, 16, 1, 999, 64]),  # decode, GQA 4 (Llama-3-8B)
    (8, 1, 128, [37, 1, 64], [37, 200, 64]),  # prefill chunks and decode mixed, MQA
    (16, 2, 64, [128], [1000]),  # a long prefill chunk at the end of a long context, GQA 8
]


class Report:
    """Stage results as JSON lines in out/device_check.jsonl, plus a running summary in out/summary.md."""

    def __init__(self, out: pathlib.Path, budget: float):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.budget = budget
        self.lines: list[str] = []
        self.tok_s: dict[tuple[str, int], float] = {}  # (stage, batch) -> the engine stages' output tok/s

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def write(self, stage: str, **result) -> None:
        result = {"stage": stage, "elapsed_s": round(time.monotonic() - self.start, 1), **result}
        with open(self.out / "device_check.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        self.lines.append(f"- {stage}: " + ", ".join(f"{k} {v}" for k, v in result.items() if k != "stage"))
        (self.out / "summary.md").write_text("\n".join(self.lines) + "\n")
        print(self.lines[-1], flush=True)


def stage_env(report: Report, dry_run: bool) -> bool:
    import jax

    backend = jax.default_backend()
    report.write("env", jax=jax.__version__, backend=backend, devices=[str(d) for d in jax.devices()],
                 python=sys.version.split()[0])
    if backend != "gpu":
        message = (f"needs a CUDA GPU: jax's default backend is {backend!r} (run this on the device machine with "
                   "PYTHONPATH set to the checkout, see ../shared/device.md)")
        report.write("gpu", ok=False, reason=message)
        if not dry_run:
            raise SystemExit(f"device_check: {message}")
        return False
    return True


def stage_kernels(report: Report) -> None:
    import jax
    import jax.numpy as jnp

    import kernels_pallas
    from kernels_pallas.random_batch import args, make_batch

    rng = np.random.default_rng(0)
    for hq, hkv, d, q_lens, kv_lens in KERNEL_CASES:
        for dtype, tol in ((jnp.float32, 2e-3), (jnp.bfloat16, 5e-2)):
            batch = make_batch(rng, q_lens=q_lens, kv_lens=kv_lens, page_size=16, hq=hq, hkv=hkv, d=d, dtype=dtype,
                               num_tokens=sum(q_lens) + 3, max_seqs=len(q_lens) + 1,
                               pages_per_seq=max(-(-n // 16) for n in kv_lens))  # with padding tokens and rows
            name = f"hq{hq}_hkv{hkv}_d{d}_q{sum(q_lens)}_{jnp.dtype(dtype).name}"
            try:
                outs = {b: jax.jit(lambda *a, b=b: kernels_pallas.ragged_paged_attention(
                    *a, sm_scale=d ** -0.5, backend=b))(*args(batch)) for b in ("reference", "pallas_gpu")}
                got, want = (np.asarray(outs[b][0], np.float32) for b in ("pallas_gpu", "reference"))
                err = float(np.max(np.abs(got - want)))
                finite = bool(np.isfinite(got).all())
                same_cache = bool(np.array_equal(np.asarray(outs["pallas_gpu"][1], np.float32),
                                                 np.asarray(outs["reference"][1], np.float32)))
                report.write("kernels.attention", case=name, max_abs_err=err, finite=finite, cache_equal=same_cache,
                             ok=finite and err < tol and same_cache)
            except Exception as e:  # a kernel that does not compile is a result, not the end of the check
                report.write("kernels.attention", case=name, ok=False, error=f"{type(e).__name__}: {e}"[:400])


def stage_tiny(report: Report) -> None:
    from host_overhead import make_model

    from jaxserve import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_model(pathlib.Path(tmp) / "tiny", vocab=512)
        prompts = [list(range(5, 5 + n)) for n in (3, 17, 40)]
        params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        tokens = {}
        for backend in ("reference", "pallas_gpu"):
            llm = LLM(str(folder), max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, page_size=16,
                      attention_backend=backend, dtype="float32", compile_cache_dir="", progress=False, warm_up=False)
            tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        report.write("tiny", ok=tokens["reference"] == tokens["pallas_gpu"], tokens=tokens["pallas_gpu"][0][:8])


def _random_model(cfg_dict: dict, dtype, quantization: str | None = None):
    """A LoadedModel with random weights made on the device (no host copy of 16 GB) and a word-level tokenizer;
    with `quantization` (a --quantization scheme) the fields it quantizes are QArrays of random codes, shaped and
    typed as the loader stores them, with scales that keep the weights near N(0, 0.02)."""
    import jax
    import jax.numpy as jnp
    from host_overhead import word_tokenizer

    from jaxserve.models import llama, moe
    from jaxserve.models.config import ModelConfig
    from jaxserve.quantization.schemes import WeightQuantization
    from jaxserve.weights.loader import LoadedModel

    cfg = ModelConfig.from_hf(cfg_dict)
    keys = iter(jax.random.split(jax.random.key(0), 16 + 16 * cfg.num_layers))
    quant = WeightQuantization(quantization) if quantization else None

    def codes(struct):
        """Random codes of struct's dtype, and the scale that maps them to a spread of about 0.02."""
        if jnp.issubdtype(struct.dtype, jnp.integer):
            info = jnp.iinfo(struct.dtype)
            return jax.random.randint(next(keys), struct.shape, info.min, info.max, struct.dtype), 0.02 / 74
        return jax.random.normal(next(keys), struct.shape, jnp.float32).astype(struct.dtype), 0.02

    def w(*shape, name=None):
        if quant is not None and quant.axis(name) is not None:
            q = quant.abstract(jax.ShapeDtypeStruct(shape, dtype), name)
            values, scale = codes(q.values)
            full = lambda s: jnp.full(s.shape, scale, s.dtype)  # noqa: E731
            return dataclasses.replace(q, values=values, scale=full(q.scale),
                                       offset=None if q.offset is None else full(q.offset))
        return (jax.random.normal(next(keys), shape, jnp.float32) * 0.02).astype(dtype)

    def ones(n):
        return jnp.ones((n,), dtype)

    h, inter = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    def layer(sparse: bool):
        attention = dict(attn_norm=ones(h), wqkv=w(h, q + 2 * kv, name="wqkv"), wo=w(q, h, name="wo"),
                         mlp_norm=ones(h))
        if cfg.qk_norm:
            attention |= dict(q_norm=ones(cfg.head_dim), k_norm=ones(cfg.head_dim))
        if not cfg.num_experts:
            return llama.Layer(**attention, w_gate_up=w(h, 2 * inter, name="w_gate_up"),
                               w_down=w(inter, h, name="w_down"))
        if not sparse:
            return moe.Layer(**attention, w_gate_up=w(h, 2 * inter, name="w_gate_up"),
                             w_down=w(inter, h, name="w_down"))
        e, m = cfg.num_experts, cfg.moe_intermediate_size
        return moe.Layer(**attention, router=w(h, e), w_gate_exps=w(e, h, m, name="w_gate_exps"),
                         w_up_exps=w(e, h, m, name="w_up_exps"), w_down_exps=w(e, m, h, name="w_down_exps"))

    layers = tuple(layer(cfg.moe_layers[i] if cfg.num_experts else False) for i in range(cfg.num_layers))
    params = llama.Params(embed=w(cfg.vocab_size, h), layers=layers, final_norm=ones(h),
                          lm_head=w(h, cfg.vocab_size))
    name = f"{cfg_dict['model_type']}-shaped"
    return LoadedModel(name, cfg, params, word_tokenizer(cfg.vocab_size), (2,), jnp.dtype(dtype))


def _admit_computed(engine, batch: int, context: int) -> None:
    """Adds `batch` requests whose first context-1 tokens count as computed (their pages allocated, their K/V
    left as the cache holds it), so the first step already decodes: no prefill program is compiled."""
    from jaxserve import SamplingParams
    from jaxserve.core.sequence import Status

    rng = np.random.default_rng(batch)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", rng.integers(3, 1000, context).tolist(),
                           SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))
    sched = engine.scheduler
    while sched.waiting:
        seq = sched.waiting.popleft()
        engine.block_manager.allocate(seq, context - 1)
        seq.num_computed_tokens = context - 1
        seq.slot, seq.slot_fresh, seq.status = sched.free_slots.pop(), True, Status.RUNNING
        sched.running.append(seq)


def stage_engine(report: Report, batches, context: int, steps: int, name: str = "engine", shape: dict = LLAMA_8B,
                 dtype: str = "bfloat16", min_left: float = 90, quantization: str | None = None) -> None:
    """Decode through the real engine at each batch, for a random-weight model of `shape` (a config.json dict),
    its layers' matrices quantized with `quantization` (a --quantization scheme) where given."""
    import jax
    import jax.numpy as jnp

    from jaxserve.core import compilation
    from jaxserve.engine import EngineConfig, LLMEngine
    from jaxserve.quantization import qarray

    start = time.perf_counter()
    model = _random_model(shape, jnp.dtype(dtype), quantization)
    jax.block_until_ready(model.params)
    report.write(f"{name}.weights", seconds=round(time.perf_counter() - start, 1),
                 weight_bytes=qarray.nbytes(model.params))
    for batch in batches:
        if report.left() < min_left:
            report.write(name, batch=batch, skipped=f"{report.left():.0f} s left")
            continue
        pages = batch * (-(-(context + steps + 16) // 16))
        engine = LLMEngine(model, config=EngineConfig(max_model_len=context + steps + 16, max_num_seqs=batch,
                                                      max_num_batched_tokens=max(batch, 16), num_kv_pages=pages,
                                                      compile_cache_dir="", warm_up=False), progress=False)
        _admit_computed(engine, batch, context)
        t0, c0 = time.perf_counter(), compilation.compile_count()
        engine.step()  # compiles the decode program for this batch
        compile_s, compiles = time.perf_counter() - t0, compilation.compile_count() - c0
        engine.step()
        before = compilation.compile_count()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        step_s = (time.perf_counter() - t0) / steps
        device_s = _device_step(engine, steps)
        report.tok_s[name, batch] = batch / step_s
        bf16 = {"vs_bf16": round(batch / step_s / report.tok_s["engine", batch], 3)} \
            if quantization and ("engine", batch) in report.tok_s else {}
        report.write(name, batch=batch, context=context, compile_s=round(compile_s, 1), programs=compiles,
                     engine_step_ms=round(step_s * 1e3, 2), device_step_ms=round(device_s * 1e3, 2),
                     host_share=round(1 - device_s / step_s, 3), tok_s=round(batch / step_s, 1),
                     compiles_while_timed=compilation.compile_count() - before, **bf16)
        del engine
    del model


def stage_quant(report: Report, batches, context: int, steps: int, shape: dict = LLAMA_8B,
                dtype: str = "bfloat16", min_left: float = 90) -> None:
    """The engine stage for `shape` with int8, then fp8 layer matrices; a scheme the GPU lacks is recorded as such."""
    import jax

    from jaxserve.quantization.schemes import check_backend

    device = jax.devices()[0]
    for scheme in ("int8", "fp8"):
        try:
            check_backend(scheme, device.platform, device.device_kind, getattr(device, "compute_capability", None))
        except ValueError as e:
            report.write(f"quant-{scheme}", skipped=str(e))
            continue
        stage_engine(report, batches, context, steps, f"quant-{scheme}", shape, dtype, min_left, scheme)


def stage_moe(report: Report, batches, context: int, steps: int, shape: dict = QWEN3_30B_A3B,
              dtype: str = "bfloat16", memory_bytes: int | None = None, min_left: float = 90) -> None:
    """The engine stage for a MoE shape in `dtype`, or with int8 layer matrices where those weights would take
    more than 85% of the device's memory (memory_bytes: the device's, by default what jax reports)."""
    import jax
    import jax.numpy as jnp

    from jaxserve.quantization import qarray

    if memory_bytes is None:
        memory_bytes = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    weights = qarray.nbytes(jax.eval_shape(lambda: _random_model(shape, jnp.dtype(dtype)).params))
    quantization = "int8" if memory_bytes and weights > 0.85 * memory_bytes else None
    report.write("moe.plan", weight_bytes=weights, device_bytes=memory_bytes, layers=quantization or dtype)
    stage_engine(report, batches, context, steps, "moe", shape, dtype, min_left, quantization)


def stage_gmm(report: Report, rows_list=GMM_ROWS, shape: dict = QWEN3_30B_A3B, repeats: int = 20,
              interpret: bool = False) -> None:
    """ragged_dot against the Pallas GPU grouped matmul on a MoE's expert matrices (gate/up: [hidden, moe
    intermediate] per expert; down: the transpose), rows routed to top-k distinct random experts."""
    import jax
    import jax.numpy as jnp

    from kernels_pallas import grouped_matmul

    e, k, h, m = (shape[f] for f in ("num_experts", "num_experts_per_tok", "hidden_size", "moe_intermediate_size"))
    rng = np.random.default_rng(0)
    ways = {"ragged_dot": jax.jit(grouped_matmul.reference),
            "pallas": jax.jit(functools.partial(grouped_matmul.pallas_gpu, interpret=interpret))}
    for w_dtype in (jnp.bfloat16, jnp.int8):
        for name, (d_in, d_out) in (("gate_up", (h, m)), ("down", (m, h))):
            w = jnp.clip(jax.random.normal(jax.random.key(1), (e, d_in, d_out)) * 30, -127, 127).astype(w_dtype)
            for rows in rows_list:
                experts = np.stack([rng.choice(e, k, replace=False) for _ in range(rows // k)]).reshape(-1)
                sizes = jnp.asarray(np.bincount(experts, minlength=e), jnp.int32)
                x = jax.random.normal(jax.random.key(rows), (rows, d_in), jnp.float32).astype(jnp.bfloat16) * 0.02
                outs, micros = {}, {}
                for way, fn in ways.items():
                    outs[way] = jax.block_until_ready(fn(x, w, sizes))  # compiles
                    t0 = time.perf_counter()
                    for _ in range(repeats):
                        out = fn(x, w, sizes)
                    jax.block_until_ready(out)
                    micros[way] = (time.perf_counter() - t0) / repeats * 1e6
                want = np.asarray(outs["ragged_dot"], np.float32)
                err = float(np.abs(np.asarray(outs["pallas"], np.float32) - want).max() / np.abs(want).max())
                report.write("gmm", matmul=name, w=jnp.dtype(w_dtype).name, rows=rows,
                             ragged_dot_us=round(micros["ragged_dot"], 1), pallas_us=round(micros["pallas"], 1),
                             pallas_over_ragged=round(micros["pallas"] / micros["ragged_dot"], 3),
                             rel_err=float(f"{err:.2e}"), ok=err < 2e-2)


def _device_step(engine, steps: int) -> float:
    """One decode step's forward + sampler on inputs already on the device, timed alone."""
    import jax

    from jaxserve.core.input_batch import build_step

    runner = engine.runner
    scheduled = [(seq, 1) for seq in engine.scheduler.running]
    for seq, _ in scheduled:
        engine.block_manager.allocate(seq, seq.num_computed_tokens + 1)
    num_tokens, num_seqs = runner._sizes(len(scheduled))
    step, *_ = build_step(scheduled, num_tokens, num_seqs, runner._max_writes(num_tokens))
    placed = runner._place(step)
    jax.block_until_ready(placed)

    def once():
        logits, runner.cache, runner.tables, runner.sampler_state, _ = runner._program("forward", num_tokens)(
            runner.params, runner.cache, runner.tables, runner.sampler_state, placed)
        tokens, _, runner.sampler_state = runner._program("sample", num_seqs)(logits, logits, runner.sampler_state,
                                                                              placed.rows)
        return tokens

    jax.block_until_ready(once())
    t0 = time.perf_counter()
    for _ in range(steps):
        out = once()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps


def stage_torch(report: Report, batches, context: int, steps: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in LLAMA_8B.items() if k != "architectures"})
    start = time.perf_counter()
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    report.write("torch.weights", seconds=round(time.perf_counter() - start, 1), torch=torch.__version__)
    for batch in batches:
        if report.left() < 45:
            report.write("torch", batch=batch, skipped=f"{report.left():.0f} s left")
            continue
        ids = torch.randint(3, 1000, (batch, context), device="cuda")
        with torch.no_grad():
            out = model(ids, use_cache=True, logits_to_keep=1)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(2):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
        step_s = (time.perf_counter() - t0) / steps
        report.write("torch", batch=batch, context=context, step_ms=round(step_s * 1e3, 2),
                     tok_s=round(batch / step_s, 1))
        del past, out
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "device_check_out"))
    p.add_argument("--budget", type=float, default=510, help="seconds for all stages (the call's limit minus slack)")
    p.add_argument("--dry-run", action="store_true", help="on CPU: check that the script starts and what it needs")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--context", type=int, default=CONTEXT)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--stages", nargs="+", default=["kernels", "tiny", "engine", "quant", "gmm", "moe", "torch"])
    args = p.parse_args(argv)
    report = Report(pathlib.Path(args.out), args.budget)
    report.write("plan", stages=args.stages, batches=args.batches, context=args.context, steps=args.steps,
                 budget_s=args.budget)
    if not stage_env(report, args.dry_run):
        for name in args.stages:
            report.write(name, skipped="needs a GPU")
        return 2
    stages = {"kernels": lambda: stage_kernels(report), "tiny": lambda: stage_tiny(report),
              "engine": lambda: stage_engine(report, args.batches, args.context, args.steps),
              "quant": lambda: stage_quant(report, QUANT_BATCHES, args.context, args.steps),
              "gmm": lambda: stage_gmm(report),
              "moe": lambda: stage_moe(report, MOE_BATCHES, args.context, args.steps),
              "torch": lambda: stage_torch(report, args.batches, args.context, args.steps)}
    failed = False
    for name in args.stages:
        try:
            stages[name]()
        except Exception as e:  # record and go on: later stages still measure something
            failed = True
            report.write(name, ok=False, error=f"{type(e).__name__}: {e}"[:400], trace=traceback.format_exc()[-1500:])
    report.write("done", failed=failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
