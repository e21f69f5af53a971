"""The output processor: the engine core's token ids become RequestOutputs, away from the step loop.

Per request it keeps each sample's detokenizer, its tokens and its logprobs; each core step's news for the
request (`CoreOutput`) is turned into text, stop strings are searched in it, and an output goes out as the
request's output_kind asks (deltas, cumulative, or the final one only). A stop string found here ends the sample
in the core too (`process` returns those ends); tokens the core made for the sample after the stop, before it
learns of it, are dropped here.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from jaxserve.text.detokenizer import Detokenizer
from jaxserve.core.engine_core import CoreOutput
from jaxserve.outputs import CompletionOutput, Logprob, RequestOutput
from jaxserve.sampling_params import RequestOutputKind, SamplingParams

log = logging.getLogger("jaxserve")


@dataclasses.dataclass
class _Sample:
    detokenizer: Detokenizer
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[tuple] = dataclasses.field(default_factory=list)  # raw, per token: see engine_core.SampleUpdate
    logprob_entries: list[dict] = dataclasses.field(default_factory=list)  # released tokens' entries (cumulative)
    num_sent: int = 0  # tokens already reported, with their text
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    error_invalid: bool = False


@dataclasses.dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    prompt_logprobs: list | None  # by position, None first; filled as the core computes them
    num_cached_tokens: int = 0


# An end the core must apply: (request id, sample index, finish reason, stop reason).
Finish = tuple[str, int, str, object]


class OutputProcessor:
    def __init__(self, tokenizer, token_text: Callable[[int], str]):
        """token_text: one token's own decoding (cached), for logprob alternatives and prompt tokens."""
        self.tokenizer = tokenizer
        self.token_text = token_text
        self.requests: dict[str, _Request] = {}
        self.seconds = 0.0  # wall time in process(): the text side's share of the host work per step

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        samples = [_Sample(Detokenizer(self.tokenizer, prompt_token_ids, params.stop, params.skip_special_tokens,
                                       params.include_stop_str_in_output)) for _ in range(params.n)]
        self.requests[request_id] = _Request(request_id, prompt, list(prompt_token_ids), params, samples,
                                             None if params.prompt_logprobs is None
                                             else [None] * len(prompt_token_ids))

    def forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def process(self, core_outputs: list[CoreOutput]) -> tuple[list[RequestOutput], list[Finish]]:
        """Applies one core step; returns the outputs to deliver and the ends found here (stop strings, text that
        would not decode) for the core."""
        started = time.perf_counter()
        try:
            return self._process(core_outputs)
        finally:
            self.seconds += time.perf_counter() - started

    def _process(self, core_outputs: list[CoreOutput]) -> tuple[list[RequestOutput], list[Finish]]:
        outputs, finishes = [], []
        for core in core_outputs:
            req = self.requests.get(core.request_id)
            if req is None:  # aborted meanwhile
                continue
            req.num_cached_tokens = core.num_cached_tokens
            for position, entry in core.prompt_logprobs:
                req.prompt_logprobs[position] = self._entry(entry)
            for update in core.samples:
                sample = req.samples[update.index]
                if sample.finish_reason is not None:
                    continue  # ended here already (a stop string): the core's later tokens are not shown
                try:
                    end = self._apply(req, sample, update)
                except Exception as e:  # e.g. a tokenizer that cannot decode: fail this sample, not the batch
                    log.exception("request %s failed while processing its output", req.request_id)
                    sample.finish_reason, sample.error = "error", f"{type(e).__name__}: {e}"
                    end = ("error", None)
                if end is not None:
                    finishes.append((req.request_id, update.index, *end))
            out = self._output(req)
            if out is not None:
                outputs.append(out)
            if all(s.finish_reason is not None for s in req.samples):
                del self.requests[req.request_id]
        return outputs, finishes

    def _apply(self, req: _Request, sample: _Sample, update) -> tuple[str, object] | None:
        """Adds one sample's new tokens; returns (reason, stop string) when a stop string ends it here."""
        params = req.params
        ends_by_token = update.finish_reason == "stop"  # EOS or a stop token id: that token has no text
        for j, token in enumerate(update.token_ids):
            sample.token_ids.append(token)
            if update.logprobs is not None:
                sample.logprobs.append(update.logprobs[j])
            if ends_by_token and j == len(update.token_ids) - 1:
                break
            # No stop of any kind before min_tokens (the sampler masks EOS and stop ids until then too).
            stop = sample.detokenizer.append(token, check_stop=len(sample.token_ids) > params.min_tokens)
            if stop is not None:
                sample.finish_reason, sample.stop_reason = "stop", stop
                return "stop", stop
        if update.finish_reason is not None:
            sample.finish_reason, sample.stop_reason = update.finish_reason, update.stop_reason
            sample.error, sample.error_invalid = update.error, update.error_invalid
        return None

    def _output(self, req: _Request) -> RequestOutput | None:
        """The request's output after a step, as its output_kind asks (None: FINAL_ONLY and not finished)."""
        kind = req.params.output_kind
        finished = all(s.finish_reason is not None for s in req.samples)
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        outs = []
        for index, s in enumerate(req.samples):
            sent, detok = s.num_sent, s.detokenizer
            done = s.finish_reason is not None
            delta_text = detok.take_delta(done, len(s.token_ids))
            released = s.num_sent = detok.num_released  # a token goes out with its text, never before it
            new_ids = s.token_ids[sent:released]
            new_logprobs = None
            if req.params.logprobs is not None:
                new_logprobs = [self._entry(s.logprobs[j], detok.piece(j)) for j in range(sent, released)]
            if kind is RequestOutputKind.DELTA:
                text, ids, logprobs = delta_text, new_ids, new_logprobs
            else:
                if new_logprobs is not None:
                    s.logprob_entries += new_logprobs
                text, ids = detok.text, list(s.token_ids)
                logprobs = list(s.logprob_entries) if new_logprobs is not None else None
            outs.append(CompletionOutput(index, text, ids, s.finish_reason, s.stop_reason, logprobs, error=s.error,
                                         error_invalid=s.error_invalid))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished=finished,
                             num_cached_tokens=req.num_cached_tokens, prompt_logprobs=req.prompt_logprobs)

    def _entry(self, entry, text: str | None = None) -> dict[int, Logprob]:
        """{token id: Logprob} for the chosen token (first) and the top-k, as vLLM reports them. text: the chosen
        token's piece of the output (its own decoding when None, as for prompt tokens)."""
        token, lp, rank, ids, lps = entry
        out = {token: Logprob(lp, rank, self.token_text(token) if text is None else text)}
        for r, (t, tlp) in enumerate(zip(ids, lps), start=1):
            out.setdefault(t, Logprob(tlp, r, self.token_text(t)))
        return out
