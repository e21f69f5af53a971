"""The engine for concurrent callers: the engine core steps on one background thread, the output processor
turns its token ids into outputs on another; callers stream with asyncio.

Only the core thread touches the core and only the output thread the processor. Callers send the core thread
commands (add, abort) through a queue; it passes each step's token ids, in order with the requests' arrivals and
departures, to the output thread, which makes text of them and puts each request's outputs on an asyncio queue
of the caller's event loop. A stop string found there goes back to the core as a command (the core may have made
a token or two more for that sample by then: they are dropped). When a caller stops listening (it is cancelled,
or its client disconnected), the request is aborted and its pages are freed at the next step.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator

from jaxserve.engine import InvalidRequest, LLMEngine
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.text import bad_words

log = logging.getLogger("jaxserve")


class EngineOverloaded(RuntimeError):
    """Too many requests in flight; the caller should retry later (HTTP 429/503)."""


class RequestFailed(RuntimeError):
    """The engine could not finish this request (its processing raised, or the engine stopped)."""


@dataclasses.dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


_STOP = object()


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int = 1024):
        self.engine = engine
        self.max_in_flight = engine.scheduler.max_num_seqs + max_waiting_requests
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}  # touched by callers (add/remove) and the thread (deliver): locked
        self._lock = threading.Lock()
        self._stats = engine.stats()
        self._window = (time.monotonic(), 0)  # for tokens/s: (start, tokens generated at start)
        self._outputs: queue.Queue = queue.Queue()  # core thread -> output thread, in order
        self._tokenizer = copy.deepcopy(engine.tokenizer)
        self._encode_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
        self._output_thread = threading.Thread(target=self._run_outputs, name="jaxserve-outputs", daemon=True)
        self._running = True
        self._thread.start()
        self._output_thread.start()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yields a RequestOutput each time the request gets new tokens; the last one has `finished` set.
        Raises InvalidRequest (bad input), EngineOverloaded (queue full) or RequestFailed."""
        if not self._running:
            raise RequestFailed("the engine is shutting down")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            if len(self._streams) >= self.max_in_flight:
                raise EngineOverloaded(f"the server is at capacity ({self.max_in_flight} requests in flight)")
            self._streams[request_id] = stream
        finished = False
        try:
            text = prompt if isinstance(prompt, str) else None
            ids, bad = await asyncio.to_thread(self._tokenize, prompt, params)
            self._commands.put(("add", request_id, text, ids, params, priority, bad))
            while True:
                item = await stream.queue.get()
                if item is _STOP:
                    raise RequestFailed("the engine stopped before the request finished")
                if isinstance(item, BaseException):
                    raise item
                failed = [o for o in item.outputs if o.error]
                if failed:
                    raise (InvalidRequest if failed[0].error_invalid else RequestFailed)(failed[0].error)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def _tokenize(self, prompt: str | list[int], params: SamplingParams):
        """A caller's text work, on a worker thread: the prompt's ids (text is encoded) and its bad words'. With a
        tokenizer of the callers' own: the output thread decodes with the engine's, and a fast tokenizer used by
        two threads at once can fail ("Already borrowed")."""
        with self._encode_lock:  # one copy, shared by the worker threads in turn
            ids = self._tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            return ids, bad_words.token_sequences(self._tokenizer, params.bad_words) if params.bad_words else None

    def stats(self) -> dict:
        """The engine's counters as of its last step (safe to read from any thread)."""
        return dict(self._stats)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._running = False
        self._commands.put(("stop",))
        self._thread.join(timeout)
        self._output_thread.join(timeout)

    # --- the engine thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        core = self.engine.core
        while True:
            idle = not core.has_unfinished()
            if not self._handle_commands(block=idle):
                break
            if core.has_unfinished():
                self._step()
            self._update_stats()
        for request_id in list(core.requests):
            core.abort(request_id)
        core.close()
        self._outputs.put(("stop",))

    def _handle_commands(self, block: bool) -> bool:
        """Applies queued commands (waiting for one when idle); False once asked to stop."""
        core = self.engine.core
        try:
            cmd = self._commands.get(timeout=1.0) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, *args = cmd
            if kind == "stop":
                return False
            if kind == "add":
                request_id, text, ids, params, priority, bad = args
                try:
                    core.add_request(request_id, ids, params, priority, bad)
                    self._outputs.put(("add", request_id, text, ids, params))
                except Exception as e:  # invalid input: the caller gets the exception, the loop goes on
                    self._deliver(request_id, e)
            elif kind == "abort":
                core.abort(args[0])
                self._outputs.put(("forget", args[0]))
            elif kind == "finish":  # a stop string, found by the output processor
                core.finish(*args)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _step(self) -> None:
        core = self.engine.core
        try:
            outputs = core.step()
        except Exception as e:
            # A failure of the whole batch (e.g. on the device): fail every request in flight, rebuild the device
            # state and keep serving; if even that fails, exit non-zero rather than hang.
            log.exception("engine step failed; failing %d requests and resetting the KV cache", len(core.requests))
            failed = list(core.requests)
            try:
                core.recover()
            except Exception:
                log.critical("could not recover from a failed step; exiting", exc_info=True)
                os._exit(1)
            self._outputs.put(("fail", failed, f"engine step failed: {type(e).__name__}: {e}"))
            return
        if outputs:
            self._outputs.put(("outputs", outputs))

    # --- the output thread ---------------------------------------------------------------------------------

    def _run_outputs(self) -> None:
        processor = self.engine.output
        while True:
            kind, *args = self._outputs.get()
            if kind == "stop":
                break
            if kind == "add":
                processor.add_request(*args)
            elif kind == "forget":
                processor.forget(args[0])
            elif kind == "fail":
                failed, message = args
                for request_id in failed:
                    processor.forget(request_id)
                    self._deliver(request_id, RequestFailed(message))
            elif kind == "outputs":
                outputs, finishes = processor.process(args[0])
                for finish in finishes:
                    self._commands.put(("finish", *finish))
                for out in outputs:
                    self._deliver(out.request_id, out)
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, _STOP)

    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None:  # the caller is gone: make sure the engine lets go of the request too
            self._commands.put(("abort", request_id))
            return
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _update_stats(self) -> None:
        now = time.monotonic()
        start, base = self._window
        stats = self.engine.stats()
        generated = stats["generated_tokens"]
        stats["generation_tokens_per_s"] = (generated - base) / max(now - start, 1e-9)
        if now - start > 10:  # a 10 s window; at its end, a status line like vLLM's while there is work
            if generated > base or stats["running"] or stats["waiting"]:
                log.info("generation throughput: %.1f tokens/s, running: %d, waiting: %d, KV cache usage: %.1f%%, "
                         "prefix cache hit rate: %.1f%%", stats["generation_tokens_per_s"], stats["running"],
                         stats["waiting"], 100 * (1 - stats["kv_pages_free"] / stats["kv_pages_total"]),
                         100 * stats["prefix_cache_hit_rate"])
            self._window = (now, generated)
        self._stats = stats
