"""bench/device_check.py on CPU: it starts, writes each stage's record as it goes, and fails clearly where a GPU
is needed (the real run happens on a lent GPU, see ../shared/device.md)."""

import json
import subprocess
import sys


def test_dry_run_on_cpu_fails_clearly(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "bench/device_check.py", "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    records = [json.loads(line) for line in (out / "device_check.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in records] == ["plan", "env", "gpu", "kernels", "tiny", "engine", "quant", "gmm", "moe",
                                             "torch"]
    assert records[1]["backend"] == "cpu" and records[2]["ok"] is False and "needs a CUDA GPU" in records[2]["reason"]
    assert all(x["skipped"] == "needs a GPU" for x in records[3:])
    assert (out / "summary.md").read_text().count("\n") == len(records)
    # Without --dry-run it refuses at once, with the reason, instead of running GPU stages on the CPU.
    r = subprocess.run([sys.executable, "bench/device_check.py", "--out", str(tmp_path / "real")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "device_check: needs a CUDA GPU" in r.stderr


def test_the_engine_stages_run_dense_quantized_and_moe_shapes_on_cpu(tmp_path):
    """The engine stage's own code (random weights of a config's shape, sequences admitted as computed, timed decode
    steps) on CPU with tiny Llama (bf16 weights, then int8 and fp8 codes) and Qwen3-MoE shapes, so the GPU run does
    not find its bugs."""
    sys.path.insert(0, "bench")
    import device_check

    tiny = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16)
    report = device_check.Report(tmp_path, budget=600)
    device_check.stage_engine(report, [1, 4], 40, 2, "engine", dict(device_check.LLAMA_8B, **tiny), "float32", 0)
    moe = dict(device_check.QWEN3_30B_A3B, **tiny, num_experts=8, moe_intermediate_size=32, mlp_only_layers=[1])
    device_check.stage_moe(report, [2], 40, 2, moe, "float32", min_left=0)
    device_check.stage_moe(report, [2], 40, 2, moe, "float32", memory_bytes=100_000, min_left=0)  # int8 to fit
    device_check.stage_quant(report, [1, 2], 40, 2, dict(device_check.LLAMA_8B, **tiny), "float32", 0)
    records = [json.loads(line) for line in (tmp_path / "device_check.jsonl").read_text().splitlines()]
    rows = [(r["stage"], r["batch"]) for r in records if "batch" in r]
    assert rows == [("engine", 1), ("engine", 4), ("moe", 2), ("moe", 2), ("quant-int8", 1), ("quant-int8", 2),
                    ("quant-fp8", 1), ("quant-fp8", 2)]
    plans = [r for r in records if r["stage"] == "moe.plan"]
    assert [p["layers"] for p in plans] == ["float32", "int8"] and 0.85 * 100_000 < plans[0]["weight_bytes"]
    assert all(r["tok_s"] > 0 and r["compiles_while_timed"] == 0 for r in records if "batch" in r), records
    # Only a batch the bf16 stage measured has a ratio; int8 and fp8 layer matrices take the same bytes, fewer than
    # float32 ones (embeddings and LM head stay float).
    assert [("vs_bf16" in r) for r in records if r["stage"].startswith("quant-") and "batch" in r] == [True, False] * 2
    size = {r["stage"]: r["weight_bytes"] for r in records if r["stage"].endswith(".weights")}
    assert size["quant-int8.weights"] == size["quant-fp8.weights"] < size["engine.weights"]
    moe_sizes = [r["weight_bytes"] for r in records if r["stage"] == "moe.weights"]  # float32, then int8
    assert moe_sizes[1] < moe_sizes[0] == plans[0]["weight_bytes"]


def test_the_grouped_matmul_stage_runs_on_cpu(tmp_path):
    """The gmm stage's own code with a tiny MoE shape, the Pallas kernel in interpret mode: a record per matmul,
    weight dtype and row count, each with both timings and the kernel within bounds of ragged_dot."""
    sys.path.insert(0, "bench")
    import device_check

    report = device_check.Report(tmp_path, budget=600)
    shape = dict(num_experts=4, num_experts_per_tok=2, hidden_size=64, moe_intermediate_size=32)
    device_check.stage_gmm(report, rows_list=(8, 32), shape=shape, repeats=1, interpret=True)
    records = [json.loads(line) for line in (tmp_path / "device_check.jsonl").read_text().splitlines()]
    assert [(r["w"], r["matmul"], r["rows"]) for r in records] == [
        (w, m, rows) for w in ("bfloat16", "int8") for m in ("gate_up", "down") for rows in (8, 32)]
    assert all(r["ok"] and r["ragged_dot_us"] > 0 and r["pallas_us"] > 0 for r in records), records
