"""The engine's own cost per step, with a model that is nearly free: a 2-layer, hidden-64 random Llama with a
32k vocabulary. 256 requests of 32-token prompts and 64 new tokens through `LLM.generate`, greedy and then with
`temperature 0.8, top_p 0.95, top_k 50` (what OpenAI clients send), timed after an untimed warm-up run of each,
the two settings taking turns.

    python bench/host_overhead.py                       # both settings, 256 streams
    python bench/host_overhead.py --streams 64 --runs 3

Prints output tokens/s and milliseconds per step (one step decodes every stream once) for each setting, the
sampled/greedy cost ratio, the compile count across the timed runs (it must not move), and the share of step
time spent blocked on the device's results (jaxserve_step_device_seconds against _host_seconds). Runs against
an older checkout too: `PYTHONPATH=<checkout> python bench/host_overhead.py`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import numpy as np


def word_tokenizer(vocab: int):
    """A word-level tokenizer of `vocab` tokens ("w3", "w4", ...; 0-2 are <unk>, <s>, </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_model(folder: pathlib.Path, vocab: int = 32000, seed: int = 0) -> pathlib.Path:
    """A random Llama checkpoint with a word-level tokenizer of `vocab` tokens (no torch needed)."""
    from safetensors.numpy import save_file

    hidden, inter, layers, heads, kv_heads, head_dim = 64, 128, 2, 4, 2, 16
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.normal(0, 0.2, shape).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": np.ones(hidden, np.float32),
               "lm_head.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
                    p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
                    p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
                    p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
                    p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
                    p + "mlp.down_proj.weight": w(hidden, inter),
                    p + "input_layernorm.weight": np.ones(hidden, np.float32),
                    p + "post_attention_layernorm.weight": np.ones(hidden, np.float32)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
              "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(config))
    word_tokenizer(vocab).save_pretrained(folder)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    from jaxserve import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_model(pathlib.Path(tmp) / "model")
        llm = LLM(str(folder), max_model_len=args.prompt_len + args.output_len + 8, max_num_seqs=args.streams,
                  max_num_batched_tokens=max(512, args.streams), page_size=16, compile_cache_dir="", progress=False)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, 32000, args.prompt_len).tolist() for _ in range(args.streams)]
        settings = {"greedy": dict(temperature=0.0),
                    "sampled": dict(temperature=0.8, top_p=0.95, top_k=50)}
        params = {name: [SamplingParams(max_tokens=args.output_len, ignore_eos=True, seed=i, **sampling)
                         for i in range(args.streams)] for name, sampling in settings.items()}
        for name in settings:  # warm-up: every bucket the runs need is compiled
            llm.generate(prompts, params[name], use_tqdm=False)
        # The settings take turns, run by run, so that a host slowing down for a while (a shared VM) slows both.
        times = {name: [] for name in settings}
        totals = {name: dict.fromkeys(("compile_count", "step_device_seconds", "step_host_seconds", "output_seconds"), 0.0)
                  for name in settings}
        for _ in range(args.runs):
            for name in settings:
                before = llm.engine.stats()
                start = time.perf_counter()
                outs = llm.generate(prompts, params[name], use_tqdm=False)
                times[name].append(time.perf_counter() - start)
                assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
                after = llm.engine.stats()
                for key in totals[name]:  # (older checkouts do not report every counter)
                    totals[name][key] += after.get(key, 0.0) - before.get(key, 0.0)
        results = {}
        tokens = args.streams * args.output_len
        for name in settings:
            total = totals[name]
            # Time step() spent blocked on the device's results vs the rest (host work): with overlapped steps the
            # device runs during the host part, so the blocked share is what the host could not hide.
            blocked, host = total["step_device_seconds"], total["step_host_seconds"]
            results[name] = {"tok_s": [round(tokens / t, 1) for t in times[name]],
                             "ms_per_step": [round(t / args.output_len * 1e3, 2) for t in times[name]],
                             "compiles": int(total["compile_count"]),
                             "blocked_share": round(blocked / (blocked + host), 3) if blocked + host else float("nan"),
                             # The text side's part of the host work (detokenization, stop strings, output
                             # objects): what moving the core into a process of its own would take off its thread.
                             "output_ms_per_step": round(total["output_seconds"] / (args.runs * args.output_len) * 1e3, 2)}
            print(f"{name:8s} {args.streams} streams: {', '.join(f'{x:,.0f}' for x in results[name]['tok_s'])} "
                  f"output tok/s; {', '.join(map(str, results[name]['ms_per_step']))} ms per step; "
                  f"{results[name]['compiles']} compilations while timed; {results[name]['blocked_share']:.0%} of "
                  f"step time blocked on the device; output processor {results[name]['output_ms_per_step']} ms per "
                  "step")
        ratio = min(results["sampled"]["ms_per_step"]) / min(results["greedy"]["ms_per_step"])
        turns = [s / g for s, g in zip(times["sampled"], times["greedy"])]
        print(f"sampled / greedy step time: {ratio:.2f} (fastest runs); per turn {', '.join(f'{r:.2f}' for r in turns)}")
        if args.json:
            print(json.dumps(results | {"sampled_over_greedy": round(ratio, 3)}))


if __name__ == "__main__":
    main()
