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
    assert [x["stage"] for x in records] == ["plan", "env", "gpu", "kernels", "tiny", "engine", "torch"]
    assert records[1]["backend"] == "cpu" and records[2]["ok"] is False and "needs a CUDA GPU" in records[2]["reason"]
    assert all(x["skipped"] == "needs a GPU" for x in records[3:])
    assert (out / "summary.md").read_text().count("\n") == len(records)
    # Without --dry-run it refuses at once, with the reason, instead of running GPU stages on the CPU.
    r = subprocess.run([sys.executable, "bench/device_check.py", "--out", str(tmp_path / "real")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "device_check: needs a CUDA GPU" in r.stderr
