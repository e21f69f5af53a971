"""Token sampling on device, vectorized over the batch with per-request parameters.

Order, as vLLM: raw logprobs are taken from the model's logits; then min_tokens (stop ids masked), logit bias
with allowed/banned ids, repetition/frequency/presence penalties, temperature, min-p, top-k/top-p, and the draw.

Per-request state lives on the device in `SamplerState`, one row per scheduler slot, for as long as the
sequence runs: its sampling parameters (written by `admit` in the step that first runs it), how many tokens it
has sampled and the last of them (which the next step feeds back before the host has seen it), output-token
counts and the prompt's token set (penalties), a bias row and a stop-id row. The [V] rows are written by a
separate `init_slot` only for requests that use them (bias, repetition penalty, min_tokens, or output tokens in
cached pages); otherwise admission only zeroes the counts. Counts grow with the output tokens each step feeds the
model, so a token sampled in one step is counted when it is fed back in the next, before that step samples.

Each request's random stream is a function of its own seed and the index of the token being sampled, so its
samples do not depend on what else shares the batch. The draw inverts the CDF at one uniform number per row
(no sort, no per-token noise); top-k/top-p thresholds come from a short candidate list or an exact search, never
a sort of the vocabulary. Work that only some requests need (thresholds, penalty and bias rows, logprobs) sits
behind `lax.cond`, so a batch that does not ask for it does not pay for it; work over whole rows that only some
rows need (an exact search, a draw over the row) runs on those rows alone (`_for_rows`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

import kernels_cpu
from jaxserve.sampling_params import MAX_LOGPROBS, SamplingParams

if TYPE_CHECKING:
    from jaxserve.core.sequence import Sequence

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily, as in vLLM
NO_TOKEN = -1  # sampled for a row where every token was masked out


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerState:
    """Per scheduler slot, on the device for as long as its sequence runs."""

    counts: jax.Array  # [slots, V] int32: how often each token occurs in the sequence's output so far
    in_prompt: jax.Array  # [slots, V] bool: tokens of the prompt (repetition penalty)
    bias: jax.Array  # [slots, V] float32: logit_bias, -inf for banned / not allowed ids
    stop_ids: jax.Array  # [slots, V] bool: EOS and stop_token_ids, masked while min_tokens is not reached
    floats: jax.Array  # [slots, len(FLOAT_PARAMS)] float32: the request's sampling parameters
    ints: jax.Array  # [slots, len(INT_PARAMS)] int32: more of them, and the slot's progress
    last_token: jax.Array  # [slots] int32: the token the slot sampled last (what a placeholder stands for)

    @classmethod
    def zeros(cls, slots: int, vocab: int, placement: "SamplerState | None" = None) -> "SamplerState":
        """placement: each field's sharding (`placement()`); None: the default device."""
        where = placement or cls(*[None] * len(dataclasses.fields(cls)))

        def z(shape, dtype, sharding):
            return jnp.zeros(shape, dtype, device=sharding)

        return cls(z((slots, vocab), jnp.int32, where.counts), z((slots, vocab), jnp.bool_, where.in_prompt),
                   z((slots, vocab), jnp.float32, where.bias), z((slots, vocab), jnp.bool_, where.stop_ids),
                   z((slots, len(FLOAT_PARAMS)), jnp.float32, where.floats),
                   z((slots, len(INT_PARAMS)), jnp.int32, where.ints), z((slots,), jnp.int32, where.last_token))

    @classmethod
    def placement(cls, rep, by_vocab) -> "SamplerState":
        """Where each field lives on a mesh: the [slots, V] rows split over the vocabulary as the logits are
        (by_vocab), so the sampler never gathers a whole row; the rest replicated (rep)."""
        return cls(by_vocab, by_vocab, by_vocab, by_vocab, rep, rep, rep)


# A slot's parameters, as columns of SamplerState.floats / .ints (and of the step rows that admit a sequence).
FLOAT_PARAMS = ("temperature", "top_p", "min_p", "presence", "frequency", "repetition")
# num_output: tokens the slot has sampled (the index of its next sample; min_tokens); num_prompt: where its
# output starts (fed tokens before it are not counted for penalties); seed_hi/lo: the request seed's words.
INT_PARAMS = ("top_k", "min_tokens", "use_bias", "want_logprobs", "seed_hi", "seed_lo", "num_output", "num_prompt")
_F = {name: i for i, name in enumerate(FLOAT_PARAMS)}
_I = {name: i for i, name in enumerate(INT_PARAMS)}


def slot_params(params: SamplingParams, seed: int) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """A request's FLOAT_PARAMS and the fixed part of its INT_PARAMS (num_output and num_prompt are the
    sequence's, set at admission). The seed's words are stored as int32 bit patterns."""
    # Below GREEDY_BELOW a draw is greedy anyway, and logits / 1e-40 overflow float32 to inf.
    temperature = params.temperature if params.temperature >= GREEDY_BELOW else 0.0
    floats = (temperature, params.top_p, params.min_p, params.presence_penalty, params.frequency_penalty,
              params.repetition_penalty)
    hi, lo = ((seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF)
    ints = (params.top_k, params.min_tokens, int(params.needs_bias_row), int(params.logprobs is not None),
            hi - (hi >> 31 << 32), lo - (lo >> 31 << 32))
    return floats, ints


def needs_dense_rows(seq: Sequence) -> bool:
    """Whether admitting `seq` needs its [V] rows written (`slot_rows`): its sampling reads them."""
    p = seq.params
    return (p.needs_bias_row or p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0
            or p.min_tokens > 0 or seq.num_computed_tokens > seq.num_prompt_tokens)


def slot_rows(seq: Sequence, vocab: int, eos_ids) -> tuple[np.ndarray, ...]:
    """Host-side rows for a sequence being admitted: counts [V] of its output tokens that will not be fed
    (already in cached pages), prompt set [V], bias [V] float32 and stop ids [V] bool."""
    params = seq.params
    cached_output = seq.token_ids[seq.num_prompt_tokens:seq.num_computed_tokens]
    counts = np.bincount(np.asarray(cached_output, np.int64), minlength=vocab).astype(np.int32)
    in_prompt = np.zeros(vocab, np.bool_)
    in_prompt[seq.token_ids[:seq.num_prompt_tokens]] = True
    bias = np.zeros(vocab, np.float32)
    if params.allowed_token_ids is not None:
        bias[:] = -np.inf
        bias[params.allowed_token_ids] = 0
    for token, b in (params.logit_bias or {}).items():
        bias[token] += b
    bias[params.banned_token_ids or []] = -np.inf
    stop = np.zeros(vocab, np.bool_)
    stop[[*eos_ids, *params.stop_token_ids]] = True
    return counts, in_prompt, bias, stop


def init_slot(state: SamplerState, slot, counts, in_prompt, bias, stop_ids) -> SamplerState:
    """Writes a newly admitted sequence's [V] rows (jitted once; the state is donated)."""
    return dataclasses.replace(state, counts=state.counts.at[slot].set(counts),
                               in_prompt=state.in_prompt.at[slot].set(in_prompt),
                               bias=state.bias.at[slot].set(bias), stop_ids=state.stop_ids.at[slot].set(stop_ids))


def admit(state: SamplerState, slot, floats, ints) -> SamplerState:
    """Writes the parameters of the sequences admitted in this step (slot [S]: their slots, the slot count for
    other rows, dropped; floats [S, F], ints [S, I]). Their [V] rows are left as they are: a request whose
    sampling reads them has them written by `init_slot` (needs_dense_rows), and for the others they cancel out
    (penalties 0, repetition 1, no bias, no min_tokens). Zeroing [V] rows here would rewrite the whole [slots, V]
    array every step (a scatter of full rows): 10 ms at 256 x 32k on 2 CPU cores."""
    return dataclasses.replace(state, floats=state.floats.at[slot].set(floats, mode="drop"),
                               ints=state.ints.at[slot].set(ints, mode="drop"))


def finish_rows(state: SamplerState, slot, samples, tokens) -> SamplerState:
    """After a draw: rows that sampled (samples [S]) keep their token as the slot's last and count it."""
    at = jnp.where(samples, slot, state.counts.shape[0])
    ints = state.ints.at[at, _I["num_output"]].add(1, mode="drop")
    return dataclasses.replace(state, ints=ints, last_token=state.last_token.at[at].set(tokens, mode="drop"))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingBatch:
    """Per row of a step: its slot's parameters, gathered on the device by `rows_of`."""

    slot: jax.Array  # [S] int32 scheduler slot of each sequence
    temperature: jax.Array  # [S] float32, 0 = greedy
    top_k: jax.Array  # [S] int32, 0 = disabled
    top_p: jax.Array  # [S] float32
    min_p: jax.Array  # [S] float32
    presence: jax.Array  # [S] float32
    frequency: jax.Array  # [S] float32
    repetition: jax.Array  # [S] float32
    use_bias: jax.Array  # [S] bool: the slot's bias row is not all zero
    block_stop: jax.Array  # [S] bool: fewer than min_tokens generated, stop ids masked
    want_logprobs: jax.Array  # [S] bool
    seed: jax.Array  # [S, 2] uint32: the request seed's high and low words
    sample_index: jax.Array  # [S] int32: index of the token being sampled in the sequence's output


def rows_of(state: SamplerState, slot, valid=None) -> SamplingBatch:
    """slot: [S] int32 (in range); valid: [S] bool (None: all), rows that are not get neutral, greedy
    parameters -> the rows' parameters."""
    f, i = state.floats[slot], state.ints[slot]
    if valid is not None:
        neutral = jnp.asarray([1.0 if name in ("top_p", "repetition") else 0.0 for name in FLOAT_PARAMS])
        f = jnp.where(valid[:, None], f, neutral)
        i = jnp.where(valid[:, None], i, 0)

    def col(name):
        return i[:, _I[name]]

    seed = jax.lax.bitcast_convert_type(jnp.stack([col("seed_hi"), col("seed_lo")], -1), jnp.uint32)
    return SamplingBatch(
        slot=slot, temperature=f[:, _F["temperature"]], top_k=col("top_k"), top_p=f[:, _F["top_p"]],
        min_p=f[:, _F["min_p"]], presence=f[:, _F["presence"]], frequency=f[:, _F["frequency"]],
        repetition=f[:, _F["repetition"]], use_bias=col("use_bias") != 0,
        block_stop=col("num_output") < col("min_tokens"), want_logprobs=col("want_logprobs") != 0, seed=seed,
        sample_index=col("num_output"))


def record_tokens(state: SamplerState, token_ids, token_slot, positions, by_vocab=None) -> SamplerState:
    """Counts this step's fed output tokens in their slots. token_ids, token_slot (the slot count for padding,
    dropped), positions: [T]. Prompt tokens are not counted (they are in `in_prompt`). by_vocab: the counts'
    NamedSharding when it splits the vocabulary over a mesh axis: each device then counts the tokens of its own
    range (XLA would all-gather the [slots, V] counts to scatter into them: 131 MB per step for Llama-3-8B)."""
    n = state.counts.shape[0]
    num_prompt = state.ints[jnp.minimum(token_slot, n - 1), _I["num_prompt"]]
    slot = jnp.where(positions < num_prompt, n, token_slot)
    axis = None if by_vocab is None else by_vocab.spec[1] if len(by_vocab.spec) > 1 else None
    if axis is None or by_vocab.mesh.shape[axis] == 1:
        return dataclasses.replace(state, counts=state.counts.at[slot, token_ids].add(1, mode="drop"))

    def count_local(counts, slot, token_ids):                   # counts: [slots, V / devices]
        v = counts.shape[1]
        local = token_ids - jax.lax.axis_index(axis) * v
        mine = (local >= 0) & (local < v)
        return counts.at[jnp.where(mine, slot, n), jnp.clip(local, 0, v - 1)].add(1, mode="drop")

    spec = jax.sharding.PartitionSpec()
    counts = jax.shard_map(count_local, mesh=by_vocab.mesh, in_specs=(by_vocab.spec, spec, spec),
                           out_specs=by_vocab.spec)(state.counts, slot, token_ids)
    return dataclasses.replace(state, counts=counts)


def apply_masks(logits, rows, masks):
    """Grammar masks of the constrained rows: rows [M] (the row count for padding, dropped), masks [M, ceil(V/32)]
    int32 where bit t allows token t; tokens whose bit is clear get -inf."""
    v = logits.shape[1]
    bits = (masks[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [M, W, 32]
    allowed = bits.reshape(masks.shape[0], -1)[:, :v].astype(jnp.bool_)
    picked = logits[jnp.minimum(rows, logits.shape[0] - 1)]
    return logits.at[rows].set(jnp.where(allowed, picked, -jnp.inf), mode="drop")


def _row_keys(seed, sample_index):
    def one(words, index):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), words[0]), words[1])
        return jax.random.fold_in(key, index)

    return jax.vmap(one)(seed, sample_index)


# How many of each row's largest values top-k/top-p are decided from (and drawn among, when the kept set lies
# within them); a row they cannot decide (a top_k above it, or a flat distribution under top_p) is resolved
# exactly over the whole vocabulary.
CANDIDATES = 64
_GROUP = 32  # values per group: group maxima lead the candidate search and the greedy argmax


def _grouped(x):
    """[S, V] -> [S, ceil(V / _GROUP), _GROUP], padded with -inf."""
    return kernels_cpu.grouped(x, _GROUP)


def _group_maxima(x):
    """x [S, V] -> the maxima of its groups of _GROUP values [S, G] and of its rows [S]: one pass over the row,
    shared by the greedy argmax and the candidate search."""
    # Kept in memory: XLA would otherwise fuse the pass over the row into each consumer (a pass each).
    maxima = jax.lax.optimization_barrier(_grouped(x).max(-1))
    return maxima, maxima.max(-1)


def _first_index(x, value):
    """First index along the last axis where x [.., N] equals value [..] (N if none): a min-reduction, as XLA's CPU
    argmax is a slow paired reduction."""
    n = x.shape[-1]
    return jnp.min(jnp.where(x == value[..., None], jnp.arange(n, dtype=jnp.int32), n), -1)


def _argmax(x, maxima, best):
    """First index [S] int32 of each row's maximum best [S] in x [S, V], given its group maxima [S, G]
    (_group_maxima): a look into one group."""
    g = jnp.minimum(_first_index(maxima, best), maxima.shape[1] - 1)
    inner = jnp.take_along_axis(_grouped(x), g[:, None, None], 1)[:, 0]
    return g * _GROUP + jnp.minimum(_first_index(inner, best), _GROUP - 1)


def _candidates(x, maxima, width: int):
    """The `width` largest values of each row of x [S, V], descending, with their token ids ([S, width] each), given
    its group maxima [S, G] (_group_maxima): the C++ kernel on XLA:CPU where it is built, else XLA ops (what TPU
    and GPU run). Chosen when traced."""
    kernel = functools.partial(kernels_cpu.top_candidates, width=width, group=_GROUP)
    reference = functools.partial(kernels_cpu.top_candidates_reference, width=width, group=_GROUP)
    if kernels_cpu.enabled():
        return jax.lax.platform_dependent(x, maxima, cpu=kernel, default=reference)
    return reference(x, maxima)


def _order_keys(x):
    """float32 [..] -> uint32 keys in the same order (so a threshold can be found by halving an integer range)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000))


def _from_order_key(key):
    bits = jnp.where(key >> 31 == 1, key ^ np.uint32(0x80000000), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _largest_key(holds, hi):
    """Per row, the largest uint32 t in [0, hi] for which holds(t) [S] is true (holds is true at 0 and monotone):
    32 halvings, exact."""
    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2
        ok = holds(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    return jax.lax.fori_loop(0, 32, halve, (jnp.zeros_like(hi), hi))[0]


def _cutoffs_exact(x, k, top_p):
    """Over the whole vocabulary: the k-th largest value (count search), then the largest value whose tokens at or
    above it carry top_p of the top-k set's mass (mass search). x: [S, V]; k: [S] in [1, V]."""
    keys = _order_keys(x)
    hi = keys.max(-1)
    kth = _largest_key(lambda t: jnp.sum(keys >= t[:, None], -1) >= k, hi)
    weights = jnp.where(keys >= kth[:, None], jnp.exp(x - x.max(-1, keepdims=True)), 0.0)
    need = top_p * jnp.sum(weights, -1)
    cut = _largest_key(lambda t: jnp.sum(jnp.where(keys >= t[:, None], weights, 0.0), -1) >= need, hi)
    return _from_order_key(cut)


# Work over whole rows that only some rows need (an exact search, a draw over the row) runs on those rows alone,
# this many at a time: one such request costs its own rows, not the whole batch's.
ROWS_AT_A_TIME = 8


def _for_rows(flags, compute, out):
    """out [S] with out[r] = compute(rows)[j] for each flagged row r = rows[j]; compute maps row indices [n] int32 to
    values [n], and is called for ROWS_AT_A_TIME flagged rows at a time (none when no row is flagged)."""
    n = min(ROWS_AT_A_TIME, flags.shape[0])
    order = jnp.argsort(~flags, stable=True).astype(jnp.int32)  # flagged rows first

    def chunk(i, out):
        rows = jax.lax.dynamic_slice(order, (i * n,), (n,))  # clamped at the end: a repeated row is harmless
        return out.at[rows].set(jnp.where(flags[rows], compute(rows), out[rows]))

    return jax.lax.fori_loop(0, (jnp.sum(flags, dtype=jnp.int32) + n - 1) // n, chunk, out)


def _truncation(logits, temperature, top_k, top_p, min_p, maxima=None):
    """Which tokens a row may draw at its temperature (logits: [S, V]; temperature [S] > 0), as the threshold `cut`
    [S] on the scaled logits (keep logits / temperature >= cut), with the row's candidates (scaled values, ids
    [S, CANDIDATES]) and whether the kept set lies within them (`inside` [S]).

    The exact definitions, no sort: min-p keeps tokens with p >= min_p * p_max; top-k keeps every survivor at or
    above the k-th largest value (ties at the edge stay); top-p keeps the smallest set of the most likely of those
    holding top_p of their mass, with the ties of its least likely member. Dividing by a positive temperature
    keeps the order, so the candidates come from the raw logits and only they are scaled; whole rows are
    scaled only for the rows the candidates cannot decide (_for_rows). maxima: _group_maxima(logits)[0], when the
    caller has it."""
    s, vocab = logits.shape
    top_p = jnp.asarray(top_p)  # indexed by traced rows below
    width = min(CANDIDATES, vocab)
    covers = jnp.bool_(width == vocab)  # the candidates are the whole row
    raw_top, ids = _candidates(logits, _group_maxima(logits)[0] if maxima is None else maxima, width)
    temp = temperature[:, None]
    top = raw_top / temp

    floor = top[:, 0] + jnp.log(min_p)  # p >= min_p * p_max, in logit space (-inf for min_p 0)
    top = jnp.where(top >= floor[:, None], top, -jnp.inf)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.where(k <= width, jnp.take_along_axis(top, jnp.minimum(k, width)[:, None] - 1, -1)[:, 0], -jnp.inf)
    weights = jnp.exp(top - top[:, :1])
    # The mass of the top-k set, from the candidates when the set's edge lies inside them, else over the row.
    edge_inside = covers | ((k <= width) & (kth > top[:, -1]))
    mass = jnp.sum(jnp.where(top >= kth[:, None], weights, 0.0), -1)
    full = ~edge_inside & (top_p < 1)

    def full_mass(rows):
        x = logits[rows] / temp[rows]
        return jnp.sum(jnp.where(x >= jnp.maximum(kth, floor)[rows, None], jnp.exp(x - top[rows, :1]), 0.0), -1)

    mass = _for_rows(full, full_mass, mass)
    before = (jnp.cumsum(weights, -1) - weights) / mass[:, None]
    ranks = jnp.arange(width)[None, :]
    # The most likely token is always kept: a top_p that rounds to 0 in float32 (5e-324) must not empty the row.
    keep = ((before < top_p[:, None]) | (ranks == 0)) & (ranks < k[:, None])
    no_filter = (k >= vocab) & (top_p >= 1)
    cut = jnp.where(no_filter, floor, jnp.maximum(jnp.min(jnp.where(keep, top, jnp.inf), -1), floor))
    # Undecided: the top-k set's edge lies past the candidates, or top_p is not reached within them.
    undecided = ~covers & (k > width) & ((k < vocab) | (keep[:, -1] & (top_p < 1)))

    def exact(rows):
        x = logits[rows] / temp[rows]
        return _cutoffs_exact(jnp.where(x >= floor[rows, None], x, -jnp.inf), k[rows], top_p[rows])

    cut = _for_rows(undecided, exact, cut)
    inside = ~undecided & (covers | (~no_filter & (cut > top[:, -1])))
    return cut, inside, top, ids


def _pick(weights, target):
    """Per row, the first index where the running sum of weights [S, N] passes target [S] (never a weightless
    index, whatever the rounding), and the running sums."""
    cum = jnp.cumsum(weights, -1)
    last = jnp.max(jnp.where(weights > 0, jnp.arange(weights.shape[-1]), 0), -1)
    return jnp.minimum(jnp.sum(cum <= target[:, None], -1), last), cum


def _kept_weights(temp, cut, shift):
    """The weight function of a draw: for values v [S, ..], exp(v / temp - shift) where v / temp >= cut, else 0
    (temp, cut, shift: [S])."""
    def weight(v):
        shape = (-1, *[1] * (v.ndim - 1))
        x = v / temp.reshape(shape)
        return jnp.where(x >= cut.reshape(shape), jnp.exp(x - shift.reshape(shape)), 0.0)

    return weight


def _inverse_cdf(values, weight, uniform):
    """One index per row drawn with probability proportional to weight(values) (values [S, N]; weight elementwise,
    >= 0, and 0 at -inf), by inverting the CDF at uniform [S] in [0, 1): group sums locate the group, a running sum
    inside it the index. One random number per row (a Gumbel draw needs one per token). The weights are computed
    in the pass that sums them and again for the chosen group only."""
    groups = _grouped(values)  # padded with -inf: weight 0
    sums = weight(groups).sum(-1)
    target = uniform * jnp.sum(sums, -1)
    g, cum = _pick(sums, target)
    inner = weight(jnp.take_along_axis(groups, g[:, None, None], 1)[:, 0])
    before = jnp.where(g > 0, jnp.take_along_axis(cum, jnp.maximum(g - 1, 0)[:, None], -1)[:, 0], 0.0)
    j, _ = _pick(inner, target - before)
    return (g * _GROUP + j).astype(jnp.int32)


def _adjust(logits, state: SamplerState, sb: SamplingBatch):
    """min_tokens, bias rows and penalties; skipped entirely when no request in the batch uses them."""
    stop_ids, bias = state.stop_ids[sb.slot], state.bias[sb.slot]
    logits = jnp.where(sb.block_stop[:, None] & stop_ids, -jnp.inf, logits)
    logits = logits + jnp.where(sb.use_bias[:, None], bias, 0.0)
    counts, in_prompt = state.counts[sb.slot], state.in_prompt[sb.slot]
    seen = (counts > 0) | in_prompt
    rep = sb.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - sb.frequency[:, None] * counts - sb.presence[:, None] * (counts > 0)


def logprobs_of(logits, tokens):
    """logits [N, V], tokens [N] -> each token's logprob [N] and rank [N] (1 = most likely), and the top
    MAX_LOGPROBS ids [N, K] with their logprobs [N, K]. Sampled tokens and prompt tokens alike."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, min(MAX_LOGPROBS, logits.shape[-1]))
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)
    rank = jnp.sum(logp > chosen, axis=-1).astype(jnp.int32) + 1
    return chosen[:, 0], rank, top_ids.astype(jnp.int32), top_lp


def sample(logits, state: SamplerState, sb: SamplingBatch, raw=None):
    """logits: [S, V] float32, grammar masks applied (`apply_masks`); raw: the model's logits before them (None:
    the same) -> (tokens [S] int32, (chosen logprob [S], its rank [S], top ids [S, K], top logprobs [S, K])),
    logprobs taken from the raw logits, as vLLM reports them."""
    needs_adjust = jnp.any(sb.block_stop | sb.use_bias | (sb.presence != 0) | (sb.frequency != 0)
                           | (sb.repetition != 1))
    # Each branch ends in the tokens: a cond that returned adjusted [S, V] logits would copy them (on CPU that
    # copy, and the unfused pass after it, cost several times the argmax).
    tokens = jax.lax.cond(needs_adjust, lambda: _choose(_adjust(logits, state, sb), sb), lambda: _choose(logits, sb))
    s, k = logits.shape[0], min(MAX_LOGPROBS, logits.shape[-1])
    no_logprobs = (jnp.zeros(s, jnp.float32), jnp.zeros(s, jnp.int32), jnp.zeros((s, k), jnp.int32),
                   jnp.zeros((s, k), jnp.float32))
    lp = jax.lax.cond(jnp.any(sb.want_logprobs), lambda: logprobs_of(logits if raw is None else raw, jnp.maximum(tokens, 0)),
                      lambda: no_logprobs)
    return tokens, lp


def _choose(logits, sb: SamplingBatch):
    """The token of each row [S]: greedy, or drawn at the row's temperature after min-p / top-k / top-p."""
    maxima, best = _group_maxima(logits)
    greedy = _argmax(logits, maxima, best)
    s, vocab = logits.shape

    def draw():
        temp = jnp.where(sb.temperature > 0, sb.temperature, 1.0)
        top_scaled = best / temp
        uniform = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(_row_keys(sb.seed, sb.sample_index))

        def truncated():  # a kept set within the candidates is drawn among them
            cut, inside, top, ids = _truncation(logits, temp, sb.top_k, sb.top_p, sb.min_p, maxima)
            among = _inverse_cdf(top, _kept_weights(jnp.ones_like(temp), cut, top_scaled), uniform)  # top: scaled
            return cut, inside, jnp.take_along_axis(ids, among[:, None], -1)[:, 0]

        # Rows at a temperature with no min-p, top-k or top-p need no candidates: the whole row is drawn from.
        filters = (sb.temperature > 0) & (((sb.top_k > 0) & (sb.top_k < vocab)) | (sb.top_p < 1) | (sb.min_p > 0))
        cut, inside, picked = jax.lax.cond(jnp.any(filters), truncated, lambda: (
            jnp.full(s, -jnp.inf), jnp.zeros(s, jnp.bool_), jnp.zeros(s, jnp.int32)))

        def over_row(rows):
            return _inverse_cdf(logits[rows], _kept_weights(temp[rows], cut[rows], top_scaled[rows]), uniform[rows])

        drawn = _for_rows((sb.temperature > 0) & ~inside, over_row, picked)
        return jnp.where(sb.temperature > 0, drawn, greedy)

    tokens = jax.lax.cond(jnp.all(sb.temperature == 0), lambda: greedy, draw)
    # A row the constraints left without a candidate (a grammar and allowed_token_ids that do not meet, or a
    # finished grammar that only allows EOS while min_tokens blocks it) has no token to draw.
    return jnp.where(jnp.isfinite(best), tokens, NO_TOKEN)
