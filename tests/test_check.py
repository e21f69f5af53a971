"""`jaxserve check`: a small model's every serving program compiled for a TPU v5e topology with libtpu, on this
CPU-only machine, and lowered for 4 H100s; a configuration that cannot fit refused. (The abstract weights'
shapes are checked against transformers' models in test_model_parity.py.)"""

import json
import pathlib
import re
import subprocess
import sys

import pytest

from jaxserve.check import libtpu

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = {"model_type": "qwen2", "vocab_size": 32000, "hidden_size": 256, "intermediate_size": 512,
         "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
         "max_position_embeddings": 4096, "tie_word_embeddings": False}


def check(config: dict, tmp_path, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return subprocess.run([sys.executable, "-m", "server.cli", "check", str(path), *args], cwd=REPO,
                          env=libtpu.environment(REPO), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def small_check(tmp_path_factory):
    return check(SMALL, tmp_path_factory.mktemp("check"), "--target", "tpu-v5e-4", "-tp", "4", "--max-model-len",
                 "2048", "--max-num-seqs", "16", "--max-num-batched-tokens", "64")


def test_every_program_compiles_and_fits(small_check):
    out = small_check.stdout
    assert small_check.returncode == 0, out + small_check.stderr[-3000:]
    lines = out.strip().splitlines()
    assert lines[-1].startswith("check: OK: 10 programs compiled for tpu-v5e-4 (2 of 5 buckets)"), lines[-1]
    rows = [line.split() for line in lines if re.match(r"(forward|sample|masks|prompt_logprobs) +T=", line)]
    # The smallest and largest bucket (1 and 64 tokens; 16 rows at most), four programs each, in order.
    assert [r[:3] for r in rows] == [[p, f"T={t}", f"S={s}"] for t, s in ((1, 1), (64, 16))
                                     for p in ("forward", "sample", "masks", "prompt_logprobs")]
    assert [line.split()[0] for line in lines if line.startswith(("init_slot", "write_tables"))] == \
        ["init_slot", "write_tables"]
    forward, sample = rows[4], rows[5]
    # Per chip: a quarter of the 2-layer model's bf16 weights (tp 4) + its KV cache share, and real work.
    assert float(forward[4]) > 0 and float(forward[7]) > 0 and float(forward[8]) > 0, forward
    # Logits stay split over the vocabulary. Gathering them would put one [16, 32000] float32 all-gather (2 MB) in
    # the forward pass; its collectives are the row-parallel layers' all-reduces alone. The sampler's are per-row
    # reductions and candidate exchanges ([16, 64]-sized), together well under one gather of the logits.
    logits_mb = 16 * 32000 * 4 / 1e6
    assert 0 < float(forward[9]) < logits_mb / 4 and float(sample[9]) < logits_mb / 2, (forward, sample)
    kv = re.search(r"KV cache: (\d+) pages of 128 tokens", out)  # the TPU default page
    assert kv and int(kv.group(1)) == 16 * 2048 // 128  # all 16 sequences at full length fit in 16 GiB


@pytest.fixture(scope="module")
def cuda_check(tmp_path_factory):
    return check(SMALL, tmp_path_factory.mktemp("check"), "--target", "cuda-h100-4", "-tp", "4", "--max-model-len",
                 "2048", "--max-num-seqs", "16", "--max-num-batched-tokens", "64")


def test_a_cuda_target_lowers_every_program(cuda_check):
    """The same programs lowered for 4 H100s (an abstract mesh: no GPU here), with what is known without compiling
    in the columns and "-" for the rest."""
    out = cuda_check.stdout
    assert cuda_check.returncode == 0, out + cuda_check.stderr[-3000:]
    lines = out.strip().splitlines()
    assert lines[-1] == ("check: OK: 10 programs lowered for cuda-h100-4 (2 of 5 buckets) and fit in 74.506 GiB "
                         "per chip (without temporaries: compiling needs the GPU)"), lines[-1]
    assert lines[2].split() == ["program", "bucket", "lower", "s", "args", "GiB", "temp", "GiB", "peak", "GiB",
                                "GFLOP", "GB", "moved", "coll", "MB", "est", "ms"]
    rows = [line.split() for line in lines if re.match(r"(forward|sample|masks|prompt_logprobs) +T=", line)]
    assert [r[:3] for r in rows] == [[p, f"T={t}", f"S={s}"] for t, s in ((1, 1), (64, 16))
                                     for p in ("forward", "sample", "masks", "prompt_logprobs")]
    forward = rows[4]
    # A quarter of the weights and the KV cache per GPU; the 64-token step's matmuls, a quarter of them per GPU:
    # 2 layers x 64 tokens x 2 FLOPs x (q/k/v/o 256x(256+128+128+256) + MLP 3x256x512), plus the LM head 256x32000.
    assert float(forward[4]) > 0 and forward[5] == "-" and forward[8:] == ["-", "-", "-"], forward
    matmuls = 2 * 64 * 2 * (256 * 768 + 3 * 256 * 512) + 16 * 2 * 256 * 32000
    assert 0.9 * matmuls / 4 <= float(forward[7]) * 1e9 < 1.5 * matmuls / 4, (forward, matmuls)  # 2 decimals
    kv = re.search(r"KV cache: (\d+) pages of 16 tokens", out)  # the GPU default page
    assert kv and int(kv.group(1)) == 16 * 2048 // 16
    assert "(lowered only: temporaries, memory traffic and collectives are known after compiling" in out


def test_the_gpu_kernel_is_lowered(tmp_path):
    """What is lowered is the Pallas GPU kernel (the reference would take any head size): a head of 40, which
    Triton's power-of-two tiles cannot hold in pieces of 16 or more, fails the check with the kernel's refusal."""
    proc = check(dict(SMALL, head_dim=40), tmp_path, "--target", "cuda-h200-1", "--max-model-len", "2048")
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == ("check: FAILED: forward T=512 S=64: ValueError: the Pallas GPU "
                                                    "attention needs a head_dim that is a multiple of 16, not 40")


def test_a_context_that_cannot_fit_is_refused(tmp_path):
    proc = check(SMALL, tmp_path, "--target", "tpu-v5e-1", "--max-model-len", "4096", "--kv-cache-memory-gb",
                 "0.001")
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("check: FAILED: the KV cache (kv_cache_memory_gb 0.001:"), last
    assert "Lower --max-model-len to at most" in last


def test_an_unknown_target_is_named(tmp_path):
    proc = check(SMALL, tmp_path, "--target", "tpu-v9-3")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("check: unknown target 'tpu-v9-3'; choose one of tpu-v5e-1, tpu-v5e-4")


def test_a_cache_that_leaves_no_room_for_a_step_fails(tmp_path):
    """A KV cache of nearly all of a v5e's 16 GiB passes the sizing rule but not the fit: weights + cache + what a
    step adds exceed the chip, and the rows that do say so."""
    wide = dict(SMALL, num_key_value_heads=8, num_attention_heads=8, head_dim=256)  # 2 MiB per 128-token page
    proc = check(wide, tmp_path, "--target", "tpu-v5e-1", "--max-model-len", "4096", "--max-num-seqs", "256",
                 "--kv-cache-memory-gb", "15.99", "--max-num-batched-tokens", "256")
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("check: FAILED: some program did not compile or needs more than the 16.000 GiB"), \
        lines[-1]
    # The compiler refuses the forward pass itself (libtpu knows the chip's usable HBM); the small programs compile,
    # and the resident weights and cache plus what they add are over.
    forward = [line for line in lines if line.startswith("forward ")]
    assert len(forward) == 2 and all("RESOURCE_EXHAUSTED" in line or line.endswith("OVER HBM") for line in forward)
    assert [line.split()[0] for line in lines if line.endswith("OVER HBM")][-2:] == ["init_slot", "write_tables"]


def test_quantized_weights_and_cache_lower_for_cuda(tmp_path):
    """int4 weights and an int8 KV cache on one H100: the weights' bytes per chip and the cache's page size are those
    of codes and scales, and every program lowers (the GPU kernel reading the quantized cache)."""
    proc = check(SMALL, tmp_path, "--target", "cuda-h100-1", "--max-model-len", "2048", "--max-num-seqs", "16",
                 "--max-num-batched-tokens", "64", "--quantization", "int4", "--quantization-group-size", "64",
                 "--kv-cache-dtype", "int8")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    header = proc.stdout.splitlines()[0]
    # layers' matrices: 2 x (256 x 768 + 3 x 256 x 512) as 4-bit codes plus a float32 scale and offset per 64;
    # embeddings and LM head 2 x 32000 x 256 in bfloat16; norms
    matrices = 2 * (256 * 768 + 3 * 256 * 512)
    expected = matrices / 2 + matrices / 64 * 8 + 2 * 32000 * 256 * 2 + (2 * 2 + 1) * 256 * 2 + 2 * 768 * 2
    weights = float(re.search(r"([\d.]+) GiB of weights per chip", header).group(1)) * 2**30
    assert "bfloat16 with int4 weights" in header and abs(weights - expected) < 0.001 * 2**30, (header, expected)
    assert proc.stdout.strip().splitlines()[-1].startswith("check: OK: 10 programs lowered for cuda-h100-1")


def test_a_quantized_cache_compiles_for_tpu(tmp_path):
    """An fp8 KV cache on one v5e chip (which has no fp8 unit: the kernel converts the codes) at 3 kv heads (a
    block of 6 rows per token, not a whole 8-bit sublane group): every program compiles, the TPU kernel reading and
    writing the codes and scales."""
    proc = check(dict(SMALL, num_key_value_heads=3, num_attention_heads=6, head_dim=128), tmp_path, "--target",
                 "tpu-v5e-1", "--max-model-len", "2048", "--max-num-seqs", "16", "--max-num-batched-tokens", "64",
                 "--kv-cache-dtype", "fp8")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("check: OK: 10 programs compiled for tpu-v5e-1")


def test_a_moe_with_expert_parallel_lowers_for_cuda(tmp_path):
    """A Qwen3-MoE config with --enable-expert-parallel on 4 GPUs: every program lowers, each GPU holding a quarter
    of the experts (whole ones) and of the rest."""
    moe = dict(SMALL, model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
               norm_topk_prob=True)
    proc = check(moe, tmp_path, "--target", "cuda-h100-4", "-tp", "4", "--enable-expert-parallel",
                 "--max-model-len", "2048", "--max-num-seqs", "16", "--max-num-batched-tokens", "64")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    header, *_, last = proc.stdout.strip().splitlines()
    assert "tp 4 (expert parallel)" in header and last.startswith("check: OK: 10 programs lowered for cuda-h100-4")
    h, v, layers = 256, 32000, 2
    experts = layers * 8 * 3 * h * 128  # gate, up, down of every expert
    rest = 2 * v * h + layers * (h * (8 + 2 * 4) * 32 + 8 * 32 * h + h * 8 + 2 * h + 2 * 32) + h
    weights = float(re.search(r"([\d.]+) GiB of weights per chip", header).group(1)) * 2**30
    assert abs(weights - 2 * (experts + rest) / 4) < 0.001 * 2**30, header


@pytest.mark.parametrize("args,message", [
    (("--target", "tpu-v5e-1", "--quantization", "fp8"), "check: fp8 weights need TPU v6e or later (TPU v5e has no "
                                                         "fp8 matmul); use --quantization int8"),
])
def test_what_a_target_cannot_run_is_refused(tmp_path, args, message):
    proc = check(SMALL, tmp_path, *args)
    assert proc.returncode == 2 and proc.stderr.strip() == message, proc.stderr[-2000:]
