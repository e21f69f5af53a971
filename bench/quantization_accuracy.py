"""How far each weight quantization moves a model: greedy tokens and logits against the unquantized model.

    python bench/quantization_accuracy.py                       # the default model (SmolLM2's GGUF)
    python bench/quantization_accuracy.py --model path/to/folder --schemes int8 int4 fp8 --tokens 32

The reference is the checkpoint loaded in float32 (a GGUF dequantized by the gguf package, as llama.cpp does).
Each scheme loads the same checkpoint with `--quantization <scheme>` (gguf: the file's own codes kept). For a fixed
set of chat prompts it prints: how many of the greedy tokens equal the reference's (position by position, until
and after the first difference), the mean length of the common prefix, and the logits' error relative to their
RMS along the reference's own tokens (teacher-forced: both models see the same context). On CPU the C++ kernels
run where they build, as when serving (matmuls over 4-bit and int8 codes, with int16 activations).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from paged import run_logits  # noqa: E402  (the test suite's driver of the paged forward pass)

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences what a hash table is.",
    "List three prime numbers greater than 50.",
    "Translate 'good morning' into Spanish and German.",
    "What does the Python function len do?",
    "Give me a short tip for sleeping better.",
    "Why is the sky blue? Answer briefly.",
]


def _greedy(model, prompts: list[list[int]], tokens: int, feed=None):
    """Greedy decoding (or `feed`'s tokens) through the model's forward pass: (tokens [S, n], logits [n, S, vocab])."""
    logits, ids = run_logits(model, prompts, decode_steps=tokens - 1, page_size=16, feed=feed)
    return ids, logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file or transformers folder (default: the default model)")
    ap.add_argument("--schemes", nargs="+", default=["gguf", "int8", "int4", "fp8"])
    ap.add_argument("--group-size", type=int, default=64, help="int4's group size")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()

    import jax

    import kernels_cpu
    from jaxserve.quantization import qarray
    from jaxserve.weights.default_model import cache_dir
    from jaxserve.weights.loader import load_model

    # As the engine does on CPU: the C++ kernels multiply 4-bit and int8 codes (int16 activations), where they build.
    kernels = jax.default_backend() == "cpu" and kernels_cpu.enable(cache_dir() / "kernels-cpu")
    reference = load_model(args.model, dtype="float32", quantization="none", progress=False)
    tok = reference.tokenizer
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False)["input_ids"] for p in PROMPTS]
    ref_ids, ref_logits = _greedy(reference, prompts, args.tokens)
    rms = np.sqrt(np.mean(ref_logits ** 2))
    print(f"model {reference.name}: {len(prompts)} prompts x {args.tokens} greedy tokens; reference float32, "
          f"{qarray.nbytes(reference.params) / 1e6:.0f} MB of weights; XLA:CPU kernels {'on' if kernels else 'off'}")
    print(f"{'scheme':8} {'weights MB':>10} {'tokens equal':>13} {'common prefix':>14} {'all equal':>10} "
          f"{'logit err / rms':>16}")
    for scheme in args.schemes:
        model = load_model(args.model, dtype="float32", quantization=scheme,
                           quantization_group_size=args.group_size, progress=False)
        ids, _ = _greedy(model, prompts, args.tokens)
        _, forced = _greedy(model, prompts, args.tokens, feed=ref_ids.tolist())
        equal = ids == ref_ids
        prefix = np.where(equal.all(1), args.tokens, np.argmin(equal, axis=1))
        error = np.sqrt(np.mean((forced - ref_logits) ** 2)) / rms
        print(f"{scheme:8} {qarray.nbytes(model.params) / 1e6:10.0f} {equal.mean():13.1%} {prefix.mean():14.1f} "
              f"{int(equal.all(1).sum()):>5}/{len(prompts):<4} {error:16.4f}")


if __name__ == "__main__":
    main()
