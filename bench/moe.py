"""A mixture-of-experts decode step against a dense model with the same active parameters, on this machine.

Both are random float32 models with the same attention and hidden size; the MoE (Qwen3-MoE layout) has `--experts`
experts of `--moe-intermediate` columns and routes each token to `--top-k` of them; the dense one (Qwen3) has an
MLP of top_k * moe_intermediate columns, so each token multiplies by as many weights in both. Each step decodes
one token for every one of `batch` sequences holding `--context` tokens of cache; the two models take turns, and
the median of `--steps` timed steps (after a compile and a warm-up step) gives tokens/s.

    python bench/moe.py                             # batch 1, 16 and 64
    python bench/moe.py --batches 1 64 --steps 20
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import models
from jaxserve.models import base
from jaxserve.models.attention import resolve_backend
from jaxserve.models.config import ModelConfig
from jaxserve.parallel import sharding


def configs(args) -> tuple[ModelConfig, ModelConfig]:
    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=args.hidden // 8, max_position_embeddings=4096, rms_norm_eps=1e-6,
                  tie_word_embeddings=False)
    moe = ModelConfig.from_hf(dict(common, model_type="qwen3_moe", intermediate_size=args.top_k * args.moe_intermediate,
                                   num_experts=args.experts, num_experts_per_tok=args.top_k,
                                   moe_intermediate_size=args.moe_intermediate, norm_topk_prob=True))
    dense = ModelConfig.from_hf(dict(common, model_type="qwen3", intermediate_size=args.top_k * args.moe_intermediate))
    return moe, dense


def random_params(cfg: ModelConfig, seed: int):
    """The family's params from random transformers tensors, N(0, 0.05) matrices and unit norms, on one device."""
    rng = np.random.default_rng(seed)
    family = models.family(cfg.model_type)
    tensors = {name: (rng.normal(0, 0.05, shape) if len(shape) > 1 else np.ones(shape)).astype(np.float32)
               for name, shape in family.hf_shapes(cfg).items()}
    return family.params_from_hf(tensors, cfg, jnp.float32, sharding.param_put(sharding.make_mesh(1), cfg))


def decode_step(cfg: ModelConfig, batch: int, context: int, page_size: int = 16):
    """The jitted forward and one decode batch: `batch` sequences, each one new token after `context` cached."""
    pages = -(-(context + 1) // page_size)
    tables = np.arange(batch * pages, dtype=np.int32).reshape(batch, pages)
    positions = np.full(batch, context, np.int32)
    slots = tables[:, context // page_size] * page_size + context % page_size
    i32 = lambda x: np.asarray(x, np.int32)  # noqa: E731
    step = base.Batch(token_ids=i32(np.arange(batch) % cfg.vocab_size + 3), positions=positions,
                      slot_mapping=i32(slots), kv_lens=i32(np.full(batch, context + 1)), block_tables=tables,
                      cu_q_lens=i32(np.arange(batch + 1)), num_seqs=i32([batch]), logits_indices=i32(np.arange(batch)))
    cache = base.init_cache(cfg, batch * pages, page_size, jnp.float32)
    attn = resolve_backend("reference")
    forward = jax.jit(lambda p, c, b: models.forward(p, c, b, cfg, attn), donate_argnums=1)
    return forward, cache, step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--moe-intermediate", type=int, default=512)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", action="store_true", help="also print one JSON line with every number")
    args = p.parse_args()

    moe, dense = configs(args)
    params = {"moe": random_params(moe, 0), "dense": random_params(dense, 0)}
    active = {"moe": base.count_params(params["moe"]) - moe.num_layers * (moe.num_experts - moe.num_experts_per_tok)
              * 3 * moe.hidden_size * moe.moe_intermediate_size, "dense": base.count_params(params["dense"])}
    print(f"{jax.devices()[0].device_kind}; hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
          f"MoE {args.experts} experts x {args.moe_intermediate}, top {args.top_k} "
          f"({base.count_params(params['moe']) / 1e6:.1f}M parameters, {active['moe'] / 1e6:.1f}M active) vs dense "
          f"MLP {args.top_k * args.moe_intermediate} ({active['dense'] / 1e6:.1f}M); context {args.context}")
    results = {}
    for batch in args.batches:
        runs = {}
        for name, cfg in (("moe", moe), ("dense", dense)):
            forward, cache, step = decode_step(cfg, batch, args.context)
            logits, cache = forward(params[name], cache, step)  # compile
            logits, cache = forward(params[name], cache, step)  # warm up
            jax.block_until_ready(logits)
            runs[name] = [forward, cache, step, []]
        for _ in range(args.steps):  # the two models take turns, so drifts in machine load hit both alike
            for name, run in runs.items():
                forward, cache, step, times = run
                start = time.perf_counter()
                logits, run[1] = forward(params[name], cache, step)
                jax.block_until_ready(logits)
                times.append(time.perf_counter() - start)
        rates = {name: batch / float(np.median(run[3])) for name, run in runs.items()}
        results[batch] = rates
        print(f"batch {batch:3d}: MoE {rates['moe']:8.1f} tokens/s, dense {rates['dense']:8.1f} tokens/s, "
              f"MoE/dense {rates['moe'] / rates['dense']:.2f}")
    if args.json:
        print(json.dumps({"args": vars(args), "tokens_per_s": results}))


if __name__ == "__main__":
    main()
