"""The `jaxserve` command line."""

from __future__ import annotations

import argparse
import sys


def _chat(args: argparse.Namespace) -> int:
    from jaxserve import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    history: list[dict] = []

    def answer(text: str) -> str:
        history.append({"role": "user", "content": text})
        reply = llm.chat(history, params, use_tqdm=False)[0].message.content
        history.append({"role": "assistant", "content": reply})
        return reply

    if args.prompt is not None:
        print(answer(args.prompt))
        return 0
    print("Chatting with the model. /reset clears the conversation, /exit quits.")
    for line in _lines():
        line = line.strip()
        if line == "/exit":
            break
        if line == "/reset":
            history.clear()
            continue
        if line:
            print(answer(line), flush=True)
    return 0


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
    chat = sub.add_parser("chat", help="chat with a local model in the terminal")
    chat.add_argument("model", nargs="?", default=None,
                      help="a .gguf file, a transformers folder or a hub id (default: embedded SmolLM2-135M-Instruct)")
    chat.add_argument("--prompt", help="answer this one message and exit")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--max-model-len", type=int, default=2048)
    chat.add_argument("--dtype", default="auto")
    chat.set_defaults(func=_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
