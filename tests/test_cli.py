import subprocess
import sys

import tiny


def test_chat_command_answers_and_keeps_history(tmp_path):
    folder = tiny.make_checkpoint(tmp_path / "m", "llama")
    cmd = [sys.executable, "-m", "server.cli", "chat", str(folder), "--max-tokens", "4", "--max-model-len", "128"]
    one = subprocess.run(cmd + ["--prompt", "Hello"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    assert one.stdout.strip()
    piped = subprocess.run(cmd, input="Hello\n/reset\nHello\n/exit\nnever read\n", capture_output=True, text=True,
                           timeout=300)
    assert piped.returncode == 0, piped.stderr
    answers = piped.stdout.splitlines()[1:]
    # After /reset the same message gets the same greedy answer as the first time; /exit stops reading.
    assert len(answers) == 2 and answers[0] == answers[1] == one.stdout.strip()


def test_bench_entry_runs_the_bench_scripts():
    r = subprocess.run([sys.executable, "-m", "server.cli", "bench", "throughput", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "--concurrency" in r.stdout and "--constrained" in r.stdout


def test_data_parallel_replicas_are_refused_with_the_alternative():
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--data-parallel-size", "2"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "--data-parallel-size other than 1 is not supported" in r.stderr and "load balancer" in r.stderr


def test_serve_choices_are_the_engines_own():
    """The command line lists its choices itself (so `jaxserve --help` starts without importing jax); they must be
    the names the engine and text side accept, all of them (attention's interpreter modes are for tests only)."""
    from jaxserve.models import attention
    from jaxserve.models.base import KV_CACHE_DTYPES
    from jaxserve.quantization.schemes import SCHEMES
    from jaxserve.text import reasoning, tool_parsers
    from jaxserve.weights.loader import STORED
    from server.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    choices = {a.dest: list(a.choices) for a in serve._actions if a.choices}
    assert choices["tool_call_parser"] == list(tool_parsers.PARSERS)
    assert choices["reasoning_parser"] == list(reasoning.PARSERS)
    assert choices["quantization"] == ["auto", "none", *STORED, *SCHEMES]
    assert choices["kv_cache_dtype"] == list(KV_CACHE_DTYPES)
    assert choices["attention_backend"] == [b for b in attention.BACKENDS if not b.endswith("_interpret")]
