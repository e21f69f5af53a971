"""The `jaxserve` command line: `serve` (the OpenAI-compatible server), `chat` (a terminal chat), `check` (compile
every serving program for a TPU topology: jaxserve/check) and `bench`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("jaxserve")

_MODEL_HELP = "a .gguf file, a transformers folder or a hub id (default: the embedded SmolLM2-135M-Instruct)"


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from jaxserve.parallel.distributed import Cluster
    from jaxserve.engine import EngineConfig, LLMEngine
    from server.app import build_app
    from server.state import ServerConfig, ServerState

    engine = EngineConfig(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, page_size=args.block_size,
                          tensor_parallel_size=args.tensor_parallel_size,
                          enable_expert_parallel=args.enable_expert_parallel, quantization=args.quantization,
                          quantization_group_size=args.quantization_group_size,
                          quantize_lm_head=args.quantize_lm_head, kv_cache_dtype=args.kv_cache_dtype,
                          attention_backend=args.attention_backend, seed=args.seed,
                          enable_prefix_caching=not args.no_enable_prefix_caching,
                          scheduling_policy=args.scheduling_policy,
                          kv_cache_memory_gb=args.kv_cache_memory_gb,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          async_scheduling=not args.no_async_scheduling)
    cluster = Cluster.from_args(args.distributed_coordinator, args.num_processes, args.process_id,
                                args.distributed_secret)
    if cluster is not None:
        cluster.initialize()
        if not cluster.is_leader:  # only process 0 serves HTTP; the others step the same batches
            LLMEngine(args.model, dtype=args.dtype, config=engine, cluster=cluster).follow()
            log.info("process %d: the leader stopped; exiting", cluster.process_id)
            cluster.shutdown()
            return 0
    config = ServerConfig(model=args.model, cluster=cluster, served_model_name=args.served_model_name, host=args.host, port=args.port,
                          api_key=args.api_key or os.environ.get("JAXSERVE_API_KEY") or None,
                          chat_template=args.chat_template, dtype=args.dtype, engine=engine,
                          chat_template_content_format=args.chat_template_content_format,
                          tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
                          max_waiting_requests=args.max_waiting_requests, drain_timeout=args.drain_timeout,
                          max_request_bytes=args.max_request_bytes, max_grammar_bytes=args.max_grammar_bytes,
                          allowed_origins=tuple(args.allowed_origins or ()), generation_config=args.generation_config)
    state = ServerState(config)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # SIGTERM/SIGINT: refuse new requests at once (503) while uvicorn lets running ones finish.
            state.draining = True
            log.info("shutting down: draining running requests (up to %.0f s)", config.drain_timeout)
            super().handle_exit(sig, frame)
            # uvicorn would re-raise the signal after shutting down (exit status "killed by SIGTERM"); a drained
            # shutdown is a normal one, so the process exits 0.
            self._captured_signals.clear()

    server = _Server(uvicorn.Config(build_app(config, state), host=args.host, port=args.port, log_level="warning",
                                    timeout_graceful_shutdown=config.drain_timeout))
    log.info("starting jaxserve on http://%s:%d (the model loads and compiles; /health turns 200 when ready)",
             args.host, args.port)
    server.run()
    if cluster is not None:
        cluster.shutdown()
    return 1 if state.failed else 0


def _chat(args: argparse.Namespace) -> int:
    """A terminal chat, streamed: against a running server (--url) or a model loaded here."""
    history: list[dict] = []
    reply = _remote_replier(args) if args.url else _local_replier(args)

    def answer(text: str) -> None:
        history.append({"role": "user", "content": text})
        pieces = []
        for piece in reply(history):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(pieces)})

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    print("Chatting with the model. /reset clears the conversation, /exit quits.", flush=True)
    for line in _lines():
        line = line.strip()
        if line == "/exit":
            break
        if line == "/reset":
            history.clear()
            continue
        if line:
            answer(line)
    return 0


def _local_replier(args: argparse.Namespace):
    from jaxserve import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    return lambda history: llm.stream(history, params)


def _remote_replier(args: argparse.Namespace):
    import json

    import httpx

    url = args.url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    def reply(history):
        body = {"messages": history, "stream": True, "temperature": args.temperature, "max_tokens": args.max_tokens}
        if args.model:
            body["model"] = args.model
        with httpx.stream("POST", url, json=body, headers=headers, timeout=None) as r:
            if r.status_code != 200:
                r.read()
                raise SystemExit(f"error {r.status_code}: {r.text}")
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for choice in json.loads(line[6:]).get("choices", []):
                        yield choice.get("delta", {}).get("content") or ""

    return reply


def _bench(args: argparse.Namespace) -> int:
    """A thin entry to the repository's bench/ scripts (they live beside the package, not inside it)."""
    import pathlib
    import subprocess

    script = pathlib.Path(__file__).resolve().parents[1] / "bench" / f"{args.which}.py"
    if not script.is_file():
        raise SystemExit(f"{script} not found: `jaxserve bench` runs from a checkout of the jaxserve repository")
    return subprocess.call([sys.executable, str(script), *args.bench_args])


def _lines():
    """Input lines: prompted when a person types, plain when piped."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    while True:
        try:
            yield input("> ")
        except EOFError:
            return


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxserve", description="LLM inference in JAX for TPU, GPU and CPU")
    sub = parser.add_subparsers(dest="command", required=True)

    # The engine's names (parsers, quantizations, backends) are spelled out here so that parsing, and --help, import
    # no jax; tests/test_cli.py holds each list equal to the module that defines it.
    serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    serve.add_argument("model", nargs="?", default=None, help=_MODEL_HELP)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require this bearer token on /v1 (also from $JAXSERVE_API_KEY)")
    serve.add_argument("--served-model-name", help="the model name clients use (default: from the model)")
    serve.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    serve.add_argument("--max-num-seqs", type=int, default=64, help="sequences per step")
    serve.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per step")
    serve.add_argument("--max-waiting-requests", type=int, default=256,
                       help="requests allowed to wait beyond --max-num-seqs before new ones get 429")
    serve.add_argument("--max-request-bytes", type=int, default=4 * 2**20, help="larger request bodies get 413")
    serve.add_argument("--allowed-origins", nargs="*", help="enable CORS for these origins (off by default)")
    serve.add_argument("--max-grammar-bytes", type=int, default=64 * 2**10,
                       help="larger JSON schemas, regexes or grammars get 400")
    serve.add_argument("--block-size", type=int, default=None,
                   help="tokens per KV-cache page (default 128 on TPU, 16 elsewhere)")
    serve.add_argument("--kv-cache-memory-gb", type=float,
                       help="KV cache per device, in GiB (default: from --gpu-memory-utilization on TPU/GPU, 2 on CPU)")
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                       help="fraction of each TPU/GPU's memory for weights, activations and the KV cache")
    serve.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    serve.add_argument("--enable-expert-parallel", action="store_true",
                       help="mixtures of experts: split the experts over the tensor-parallel devices (whole experts "
                            "per device) instead of splitting every expert's columns")
    serve.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                       help="only 1: run one server per replica (each with its -tp) behind a load balancer")
    serve.add_argument("--chat-template", help="a Jinja chat template, as a file or inline")
    serve.add_argument("--chat-template-content-format", default="auto", choices=["auto", "string", "openai"])
    serve.add_argument("--tool-call-parser", choices=["hermes", "llama3_json", "mistral", "phi4_mini_json",
                                                     "pythonic", "qwen3_coder", "qwen3_xml"],
                       help="how tool calls are read from the model's text (default: guessed from the chat template)")
    serve.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="accepted for vLLM compatibility; tool_choice auto is always on")
    serve.add_argument("--reasoning-parser", choices=["deepseek_r1", "qwen3"],
                       help="split <think> reasoning into reasoning_content")
    serve.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on TPU/GPU), float32, bfloat16")
    serve.add_argument("--quantization", "-q", choices=["auto", "none", "gguf", "awq", "gptq", "int8", "int4", "fp8"],
                       default="auto",
                       help="weights: a checkpoint stored quantized (GGUF, fp8, AWQ, GPTQ) is kept as stored on "
                            "TPU/GPU and dequantized on CPU (auto), dequantized (none) or kept (gguf, awq, gptq); "
                            "int8 (per channel), int4 (per group) or fp8 (per channel; TPU v6e+, CUDA 8.9+) quantize "
                            "the decoder layers at load (an fp8 checkpoint under fp8 is kept as stored)")
    serve.add_argument("--quantization-group-size", type=int, default=128, help="inputs per scale of int4 weights")
    serve.add_argument("--quantize-lm-head", action="store_true",
                       help="with int8 / int4 / fp8: quantize the LM head and the embeddings too")
    serve.add_argument("--kv-cache-dtype", choices=["auto", "int8", "fp8", "fp8_e4m3"], default="auto",
                       help="KV cache: auto (the model's dtype), or int8 / fp8 codes with a float32 scale per token "
                            "and head (about half a bfloat16 cache; reference and GPU attention)")
    serve.add_argument("--attention-backend", choices=["auto", "reference", "pallas_tpu", "pallas_gpu"],
                       default="auto", help="auto: the Pallas kernels on TPU/GPU, XLA (reference) on CPU")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--distributed-coordinator", help="host:port of process 0, for several processes (hosts); "
                       "the default comes from JAX_COORDINATOR_ADDRESS")
    serve.add_argument("--num-processes", type=int, help="processes in all (default: $JAX_NUM_PROCESSES or 1)")
    serve.add_argument("--process-id", type=int, help="this process's rank (default: $JAX_PROCESS_ID or 0)")
    serve.add_argument("--distributed-secret", help="shared secret that authenticates the processes' step channel "
                       "(default: $JAXSERVE_DISTRIBUTED_SECRET); several processes refuse to start without one")
    serve.add_argument("--no-enable-prefix-caching", action="store_true")
    serve.add_argument("--no-async-scheduling", action="store_true",
                       help="wait for each step's tokens before scheduling the next (no overlap; same outputs)")
    serve.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs",
                       help="priority: waiting requests run by their `priority` field (lower first), then arrival")
    serve.add_argument("--generation-config", choices=["auto", "vllm"], default="auto",
                       help="auto: the model's generation_config.json sampling values are the defaults for fields a "
                       "request leaves out (the embedded model: its card's temperature 0.2, top_p 0.9); "
                       "vllm: the API's own defaults (temperature 1)")
    serve.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds running requests get to finish after SIGTERM")
    serve.set_defaults(func=_serve)

    chat = sub.add_parser("chat", help="chat in the terminal with a running server (--url) or a local model")
    chat.add_argument("model", nargs="?", default=None,
                      help=_MODEL_HELP + "; with --url, the served model name (optional)")
    chat.add_argument("--url", help="a running server's base URL, e.g. http://127.0.0.1:8000/v1")
    chat.add_argument("--api-key", default=os.environ.get("JAXSERVE_API_KEY"))
    chat.add_argument("--prompt", help="answer this one message and exit")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--max-model-len", type=int, default=2048)
    chat.add_argument("--dtype", default="auto")
    chat.set_defaults(func=_chat)

    bench = sub.add_parser("bench", help="run a benchmark from bench/ (throughput, latency, attention)",
                           description="Extra arguments go to the script; see `jaxserve bench throughput --help`.")
    bench.add_argument("which", choices=["throughput", "latency", "attention"])
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)

    # Parsed by jaxserve.check.command (main hands it the arguments): listed here for `jaxserve --help`.
    sub.add_parser("check", help="compile every serving program of a config.json for a TPU topology, with its "
                   "memory per chip (see `jaxserve check --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        from jaxserve.check.command import main as check

        return check(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "data_parallel_size", 1) != 1:
        parser.error("--data-parallel-size other than 1 is not supported: one engine shards a model over "
                     "--tensor-parallel-size devices; for replicas, run one server per replica behind a load balancer")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
