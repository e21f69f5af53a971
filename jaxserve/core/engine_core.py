"""The engine core: token ids in, token ids out, one scheduled step at a time.

It owns the scheduler, the KV pages and the model runner, and knows nothing of text: the output processor
(output_processor.py) turns what each step adds into text, finds stop strings and tells the core to stop.
`LLMEngine` (engine.py) puts the two together; the async engine runs them on two threads.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time

import jax

import kernels_cpu
from jaxserve.models import attention
from jaxserve.text import bad_words
from jaxserve.core import compilation
from jaxserve.parallel import sharding
from jaxserve.core import kv_memory
from jaxserve.core.block_manager import BlockManager
from jaxserve.parallel.distributed import Cluster
from jaxserve.weights.loader import LoadedModel, load_model
from jaxserve.models.base import init_cache, kv_code_dtype, layer_cache
from jaxserve.core.model_runner import ModelRunner
from jaxserve.core.sampler import NO_TOKEN
from jaxserve.sampling_params import MAX_LOGPROBS, SamplingParams
from jaxserve.core.scheduler import Scheduler
from jaxserve.text.structured_output import GrammarCompiler, GrammarState
from jaxserve.core.sequence import Sequence

log = logging.getLogger("jaxserve")


# TPU: a page is one DMA of the attention kernel (kernels_pallas/tpu.py); pages of 128 tokens make each a 64 KiB
# (bf16, head_dim 128, one kv head per chip) transfer rather than 8 KiB. Elsewhere 16 keeps prefix-cache reuse fine.
DEFAULT_PAGE_SIZE = {"tpu": 128}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_model_len: int | None = None  # None: the model's own context length
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    page_size: int | None = None  # tokens per KV page; None: DEFAULT_PAGE_SIZE of the platform
    num_kv_pages: int | None = None  # None: from kv_cache_memory_gb, else from device memory (kv_memory.py)
    kv_cache_memory_gb: float | None = None  # per device
    gpu_memory_utilization: float = 0.9  # of each TPU/GPU's memory, for weights, activations and the KV cache
    attention_backend: str = "auto"
    quantization: str = "auto"  # weights: auto, none, gguf, int8, int4, fp8 (weights/loader.load_model)
    quantization_group_size: int = 128  # int4's group of inputs per scale
    quantize_lm_head: bool = False  # int8 / int4 / fp8 also for the LM head and the embeddings
    kv_cache_dtype: str = "auto"  # auto (the model's dtype), int8 or fp8 (codes with a scale per token and head)
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False  # a mixture of experts' experts split over the tensor-parallel devices
    seed: int = 0
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"  # or "priority" (scheduler.py)
    compile_cache_dir: str | None = None  # None: <jaxserve cache>/jax-compile; "" turns it off
    warm_up: bool = True
    async_scheduling: bool = True  # overlap each step with the host's processing of the one before (see step)

    def on(self, platform: str) -> "EngineConfig":
        """This configuration with the defaults that depend on the platform filled in."""
        return dataclasses.replace(self, page_size=self.page_size or DEFAULT_PAGE_SIZE.get(platform, 16))

    def context_length(self, cfg) -> int:
        """max_model_len, bounded by (and by default) the model's own context length."""
        return min(self.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)


@dataclasses.dataclass
class SampleUpdate:
    """What one step added to one of a request's samples."""

    index: int
    token_ids: list[int]  # the new tokens (one per step, none when the sample only finished)
    logprobs: list[tuple] | None  # per new token when asked: (token, logprob, rank, top ids, top logprobs)
    finish_reason: str | None = None  # set once, by the step that ends the sample
    stop_reason: int | None = None  # the stop token id that ended it (stop strings are the output processor's)
    error: str | None = None
    error_invalid: bool = False


@dataclasses.dataclass
class CoreOutput:
    """A step's news for one request: its samples that changed, and prompt logprobs computed in the step."""

    request_id: str
    samples: list[SampleUpdate]
    num_cached_tokens: int
    prompt_logprobs: list[tuple[int, tuple]]  # (position, (token, logprob, rank, top ids, top logprobs))


@dataclasses.dataclass
class _Request:
    request_id: str
    seqs: list[Sequence]


def step_token_budget(config: EngineConfig) -> int:
    """Tokens per step: at least one per sequence."""
    return max(config.max_num_batched_tokens, config.max_num_seqs)


class InvalidRequest(ValueError):
    """A request the engine cannot serve as asked (too long a prompt, bad token ids, ...)."""


class EngineCore:
    def __init__(self, model: str | LoadedModel | None = None, *, dtype: str = "auto",
                 config: EngineConfig = EngineConfig(), progress: bool = True, cluster: Cluster | None = None):
        """cluster: this process's place among several (already initialized); followers only mirror device calls
        (see `follow`), the leader schedules."""
        from jaxserve.weights.default_model import cache_dir

        compilation.install_counter()
        cache_folder = config.compile_cache_dir
        compilation.enable_persistent_cache(cache_dir() / "jax-compile" if cache_folder is None else cache_folder or None)
        self.mesh = sharding.make_mesh(config.tensor_parallel_size,
                                       enable_expert_parallel=config.enable_expert_parallel)
        config = config.on(self.mesh.devices.flat[0].platform)
        if self.mesh.devices.flat[0].platform == "cpu":  # before anything is traced: the sampler picks them then
            kernels_cpu.enable(cache_dir() / "kernels-cpu")
        if isinstance(model, LoadedModel):
            params, cfg = sharding.shard_params(model.params, self.mesh, model.cfg)
            model = dataclasses.replace(model, params=params, cfg=cfg)
        else:
            model = load_model(model, dtype=dtype, mesh=self.mesh, quantization=config.quantization,
                               quantization_group_size=config.quantization_group_size,
                               quantize_lm_head=config.quantize_lm_head, progress=progress)
        self.model = model
        cfg = self.model.cfg
        self.tokenizer = self.model.tokenizer
        self.max_model_len = config.context_length(cfg)
        pages_per_seq = -(-self.max_model_len // config.page_size)
        backend = attention.resolve_backend(config.attention_backend, self.mesh)
        self.kv_layout = self._kv_layout(config)
        page_bytes = self.kv_layout.page_bytes
        num_pages, source = self._kv_pages(config, pages_per_seq, backend, cluster)
        kv_memory.check_fits(num_pages, config.page_size, self.max_model_len, page_bytes, source)
        num_pages = min(num_pages, pages_per_seq * config.max_num_seqs)  # more could never be used
        log.info("%s", kv_memory.describe(num_pages, config.page_size, page_bytes, source,
                                          self.kv_layout.ring_pages, self.kv_layout.ring_bytes))
        # A ring holds a slot's own last tokens only: a cached prefix would lack its ringed layers' K/V.
        prefix_caching = config.enable_prefix_caching and not self.kv_layout.ring_pages
        self.block_manager = BlockManager(num_pages, config.page_size, prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, step_token_budget(config),
                                   config.scheduling_policy)
        self.runner = self._runner(config, num_pages, pages_per_seq, backend)
        self.eos_token_ids = set(self.model.eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self._rng = random.Random(config.seed)
        self._next_seq_id = 0
        self._launched = None  # the step dispatched last, whose tokens are still on the device
        self.async_scheduling = config.async_scheduling
        self.num_computed_tokens = 0  # tokens run through the model (prefix-cache hits excluded)
        self.num_generated_tokens = 0
        self.step_seconds = 0.0  # wall time in step(); the runner's device_wait_seconds is the part spent waiting
        self.grammars = GrammarCompiler(self.tokenizer, cfg.vocab_size)
        self.cluster = cluster
        if cluster is not None and cluster.is_leader:
            self.runner.peers = cluster.leader_channel()
        if config.warm_up and (cluster is None or cluster.is_leader):
            self.runner.warm_up(progress=progress)
        log.info("engine ready: max_model_len %d, %d KV pages of %d tokens, %d step buckets, backend %s",
                 self.max_model_len, num_pages, config.page_size, len(self.runner.buckets), backend.kernel)

    def _kv_layout(self, config: EngineConfig) -> kv_memory.Layout:
        """What a KV page and the rings cost on one device (the cache is split over kv heads where the model axis
        allows)."""
        cfg = self.model.cfg
        return kv_memory.Layout.of(cfg, sharding.kv_heads_per_device(self.mesh, cfg), config.page_size,
                                   self.model.dtype, kv_code_dtype(config.kv_cache_dtype), config.max_num_seqs,
                                   step_token_budget(config))

    def _runner(self, config: EngineConfig, num_pages: int, pages_per_seq: int, backend) -> ModelRunner:
        cfg = self.model.cfg
        code = kv_code_dtype(config.kv_cache_dtype)
        layer = layer_cache(cfg, num_pages, config.page_size, self.model.dtype, code)
        cache = init_cache(cfg, num_pages, config.page_size, self.model.dtype,
                           sharding.layer_cache_sharding(self.mesh, cfg, layer), code,
                           ring_pages=self.kv_layout.ring_pages * config.max_num_seqs)
        return ModelRunner(self.model.cfg, self.model.params, cache, backend=backend,
                           max_num_seqs=config.max_num_seqs, max_num_batched_tokens=step_token_budget(config),
                           pages_per_seq=pages_per_seq, mesh=self.mesh, eos_token_ids=self.model.eos_token_ids)

    def _kv_pages(self, config: EngineConfig, pages_per_seq: int, backend, cluster) -> tuple[int, str]:
        """How many KV pages to allocate, and where the number comes from (kv_memory.py)."""
        page_bytes, ring_bytes = self.kv_layout.page_bytes, self.kv_layout.ring_bytes
        explicit = kv_memory.explicit_pages(config.num_kv_pages, config.kv_cache_memory_gb,
                                            config.gpu_memory_utilization, page_bytes, ring_bytes)
        if explicit is not None:
            return explicit
        # This process's devices: others' memory cannot be read from here.
        devices = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
        if kv_memory.device_memory(devices) is None:
            return kv_memory.pages_for_gb(kv_memory.CPU_KV_CACHE_GB, page_bytes, ring_bytes), \
                f"{kv_memory.CPU_KV_CACHE_GB:g} GiB: the devices report no memory size"
        if cluster is not None:
            raise ValueError("with several processes, size the KV cache with --kv-cache-memory-gb (per device): "
                             "sizing it from device memory profiles one process's step")
        # Profile the largest step with a cache of one sequence, then size the cache from what it left free.
        runner = self._runner(config, pages_per_seq, pages_per_seq, backend)
        before = kv_memory.device_memory(devices)
        runner.profile_step()
        after = kv_memory.device_memory(devices)
        del runner
        utilization = config.gpu_memory_utilization
        return (kv_memory.pages_for_utilization(before, after, utilization, page_bytes, pages_per_seq * page_bytes),
                f"gpu_memory_utilization {utilization:g} of {min(m.limit for m in before) / kv_memory.GIB:.2f} GiB")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0,
                    bad_word_ids: list[list[int]] | None = None) -> None:
        """bad_word_ids: params.bad_words as token sequences (bad_words.token_sequences; the text side's work)."""
        if request_id in self.requests:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        self.validate(prompt_token_ids, params)
        seqs = []
        for i in range(params.n):
            base = params.seed if params.seed is not None else self._rng.getrandbits(63)
            seed = (base ^ (i * 0x9E3779B97F4A7C15)) & (2**63 - 1)  # distinct stream per sample
            seq = Sequence(self._next_seq_id, request_id, i, prompt_token_ids, params, seed, self.max_model_len,
                           priority)
            if params.structured_output is not None or params.thinking_token_budget is not None or bad_word_ids:
                seq.grammar = GrammarState(self.grammars, params.structured_output, params.reasoning,
                                           params.thinking_token_budget,
                                           bad_words.BadWords(bad_word_ids) if bad_word_ids else None)
            seqs.append(seq)
            self._next_seq_id += 1
        self.requests[request_id] = _Request(request_id, seqs)
        # Samples 1..n-1 wait until sample 0 has computed the prompt, then take its pages from the prefix cache
        # (they join the head of the queue then, see step).
        self.scheduler.add(seqs[0])

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raises InvalidRequest if the engine cannot serve this; reads only fixed configuration (thread-safe)."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty")
        if n >= self.max_model_len:
            raise InvalidRequest(f"the prompt has {n} tokens, but this model's maximum context length is "
                                 f"{self.max_model_len} tokens (the prompt must leave room for at least one new token)")
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise InvalidRequest(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                                 f"requested {n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} "
                                 "for the completion). Please reduce the prompt or max_tokens.")
        vocab = self.model.cfg.vocab_size
        if params.prompt_logprobs == -1:  # vLLM's whole-vocabulary request, refused past its limit as vLLM does
            raise InvalidRequest(f"Requested prompt logprobs of {vocab}, which is greater than max allowed: "
                                 f"{MAX_LOGPROBS}")
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.token_ids_used()):
            raise InvalidRequest(f"token ids in logit_bias, allowed/banned or stop token ids must be in [0, {vocab})")
        if params.structured_output is not None:
            self.grammars.grammar(params.structured_output, params.reasoning)  # raises InvalidGrammar: the reason

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        for seq in req.seqs if req else []:
            if not seq.finished:
                self.scheduler.finish(seq, "abort")

    def finish(self, request_id: str, index: int, reason: str, stop_reason=None) -> None:
        """Ends one sample for a reason found outside the core (a stop string in its text); its pages are freed.
        Nothing if it has ended already."""
        req = self.requests.get(request_id)
        if req is None or req.seqs[index].finished:
            return
        self.scheduler.finish(req.seqs[index], reason, stop_reason)
        if all(s.finished for s in req.seqs):
            del self.requests[request_id]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._launched is not None

    def step(self) -> list[CoreOutput]:
        """Dispatches the next step and processes the one before; returns what that one added, per request
        (finished requests are removed)."""
        started = time.perf_counter()
        try:
            return self._step()
        finally:
            self.step_seconds += time.perf_counter() - started

    def _step(self) -> list[CoreOutput]:
        # Step N+1 is scheduled and its forward pass dispatched before step N's tokens are read: a sequence that
        # sampled in step N feeds a placeholder for that token, resolved on the device. While N+1's forward
        # runs, the host processes N's tokens; then N+1's sampler goes out with grammar masks that have seen
        # them. A sequence that N's tokens end has run one step too many: that row is dropped.
        scheduled = self.scheduler.schedule()
        launched = self.runner.launch(scheduled) if scheduled else None
        if launched is not None:
            for seq, n, samples in zip(launched.record.seqs, launched.record.num_tokens, launched.record.samples):
                seq.num_computed_tokens += n
                # Pages of known tokens go to the prefix cache now: this step writes them before any later step
                # can read them.
                self.block_manager.register_full_pages(seq)
                if samples and seq.index == 0 and seq.num_output_tokens + seq.num_in_flight == 0:
                    # Sample 0 has computed the prompt: the other samples join the head of the queue (not its
                    # tail), so the request's samples run together, ahead of requests that arrived later.
                    self.scheduler.add_first(self.requests[seq.request_id].seqs[1:])
                seq.num_in_flight += samples
        previous, self._launched = self._launched, launched
        outputs = self._process(previous) if previous is not None else []
        if launched is not None:
            self.runner.sample(launched)
            if not self.async_scheduling:  # each step waits for its own tokens (the same results, no overlap)
                self._launched = None
                outputs += self._process(launched)
        return outputs

    def _process(self, launched) -> list[CoreOutput]:
        """Reads back a step's tokens and applies them: new tokens, stops, prompt logprobs, prefix-cache pages."""
        tokens, logprobs, prompt_rows = self.runner.results(launched)
        record = launched.record
        touched: dict[str, CoreOutput] = {}
        for i, (seq, n, start, samples) in enumerate(zip(record.seqs, record.num_tokens, record.starts,
                                                         record.samples)):
            if seq.finished:
                continue  # it ended (or was aborted) after this step was dispatched: its row is dropped
            self.num_computed_tokens += n
            out = touched.get(seq.request_id)
            if out is None:
                out = touched[seq.request_id] = CoreOutput(seq.request_id, [], seq.num_cached_tokens, [])
            if prompt_rows is not None and prompt_rows[i] is not None:
                out.prompt_logprobs += self._prompt_logprobs(seq, start, prompt_rows[i])
            if not samples:
                continue  # a prefill chunk that does not reach the prompt's end samples nothing
            seq.num_in_flight -= 1
            token = int(tokens[i])
            update = SampleUpdate(seq.index, [], None if seq.params.logprobs is None else [])
            out.samples.append(update)
            if token == NO_TOKEN:
                update.error = ("no token satisfies all of the request's constraints at once (its structured "
                                "output, allowed or banned token ids, or min_tokens blocking the end of a finished "
                                "grammar)")
                update.error_invalid = True
                self._finish(seq, update, "error")
                continue
            seq.token_ids.append(token)  # its K/V is written by the step that feeds it back
            update.token_ids.append(token)
            self.num_generated_tokens += 1
            if len(seq.token_ids) % self.block_manager.page_size == 0:  # a page whose last token was in flight
                self.block_manager.register_full_pages(seq)
            k = seq.params.logprobs
            if k is not None:
                chosen_lp, chosen_rank, top_ids, top_lps = logprobs
                update.logprobs.append((token, float(chosen_lp[i]), int(chosen_rank[i]), top_ids[i, :k].tolist(),
                                        top_lps[i, :k].tolist()))
            try:
                if seq.grammar is not None:
                    seq.grammar.accept(token)
            except Exception as e:  # a grammar that cannot take the token: fail this sequence, not the batch
                log.exception("request %s failed while processing its output", seq.request_id)
                update.error = f"{type(e).__name__}: {e}"
                self._finish(seq, update, "error")
                continue
            self._check_finish(seq, token, update)
        for out in touched.values():
            req = self.requests[out.request_id]
            if all(s.finished for s in req.seqs):
                del self.requests[out.request_id]
        return list(touched.values())

    def _finish(self, seq: Sequence, update: SampleUpdate, reason: str, stop_reason=None) -> None:
        self.scheduler.finish(seq, reason, stop_reason)
        update.finish_reason, update.stop_reason = reason, stop_reason

    def _prompt_logprobs(self, seq: Sequence, start: int, rows) -> list[tuple[int, tuple]]:
        """rows: logprobs over a step's fed tokens, from position start; row j scores prompt token start + j + 1."""
        chosen, rank, ids, lps = rows
        k = seq.params.prompt_logprobs
        out = []
        for j in range(min(len(chosen), seq.num_prompt_tokens - 1 - start)):
            p = start + j + 1
            out.append((p, (seq.token_ids[p], float(chosen[j]), int(rank[j]), ids[j, :k].tolist(),
                            lps[j, :k].tolist())))
        return out

    def _check_finish(self, seq: Sequence, token: int, update: SampleUpdate) -> None:
        """The token-level ends: EOS, a stop token id (neither before min_tokens: the sampler masks them too),
        and length."""
        p = seq.params
        if seq.num_output_tokens > p.min_tokens:
            if token in self.eos_token_ids and not p.ignore_eos:
                return self._finish(seq, update, "stop")
            if token in p.stop_token_ids:
                return self._finish(seq, update, "stop", token)
        if len(seq) >= seq.max_len:
            return self._finish(seq, update, "length")

    def token_text(self, token_id: int) -> str:
        return self.grammars.token_text(token_id)  # one cache of single-token decodings per engine

    def recover(self) -> None:
        """After a failed step: every request is dropped and the device state rebuilt. A step that failed after
        its buffers were donated leaves the KV cache unusable, and with it every cached prefix."""
        for request_id in list(self.requests):
            self.abort(request_id)
        self._launched = None
        self.block_manager = BlockManager(self.block_manager.num_pages, self.block_manager.page_size,
                                          self.block_manager.enable_prefix_caching)
        self.scheduler.blocks = self.block_manager
        self.runner.reset_device_state()

    def follow(self) -> None:
        """On a follower process: run the leader's device calls until it stops."""
        self.runner.follow(self.cluster.follower_channel())

    def close(self) -> None:
        if self.runner.peers is not None:
            self.runner.peers.close()
            self.runner.peers = None

    def stats(self) -> dict:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_pages_total": self.block_manager.num_pages,
            "kv_pages_free": self.block_manager.num_free,
            "preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_rate": self.block_manager.hit_rate,
            "prefix_cache_hit_tokens": self.block_manager.hit_tokens,
            "prefix_cache_queried_tokens": self.block_manager.queried_tokens,
            "computed_tokens": self.num_computed_tokens,
            "generated_tokens": self.num_generated_tokens,
            "compile_count": compilation.compile_count(),
            # Host work per step vs time blocked on the device: while steps do not overlap, the device idles
            # for the host part.
            "step_host_seconds": self.step_seconds - self.runner.device_wait_seconds,
            "step_device_seconds": self.runner.device_wait_seconds,
            "devices": len(jax.devices()),
        }
