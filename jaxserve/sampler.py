"""Token sampling on device, vectorized over the batch with per-request parameters.

Order, as vLLM: raw logprobs are taken from the model's logits; then min_tokens (stop ids masked), logit bias
with allowed/banned ids, repetition/frequency/presence penalties, temperature, min-p, top-k/top-p, and the draw.

Per-request state that would be costly to send every step lives on device in `SamplerState`, one row per
scheduler slot: output-token counts and the prompt's token set (for penalties), a bias row and a stop-id row.
A slot's rows are written when its sequence is admitted (`init_slot`, with what the host knows: the prompt, and
the output tokens already in cached pages); then its counts grow with the output tokens each step feeds the
model, so a token sampled in one step is counted when it is fed back in the next, before that step samples.

Each request's random stream is a function of its own seed and the index of the token being sampled, so its
samples do not depend on what else shares the batch. The draw inverts the CDF at one uniform number per row
(no sort, no per-token noise); top-k/top-p thresholds come from a short candidate list or an exact search, never
a sort of the vocabulary. Work that only some requests need (thresholds, penalty and bias rows, logprobs) sits
behind `lax.cond`, so a batch that does not ask for it does not pay for it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.sampling_params import MAX_LOGPROBS
from jaxserve.sequence import Sequence

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily, as in vLLM
NO_TOKEN = -1  # sampled for a row where every token was masked out


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerState:
    counts: jax.Array  # [slots, V] int32: how often each token occurs in the sequence's output so far
    in_prompt: jax.Array  # [slots, V] bool: tokens of the prompt (repetition penalty)
    bias: jax.Array  # [slots, V] float32: logit_bias, -inf for banned / not allowed ids
    stop_ids: jax.Array  # [slots, V] bool: EOS and stop_token_ids, masked while min_tokens is not reached

    @classmethod
    def zeros(cls, slots: int, vocab: int, sharding=None) -> "SamplerState":
        def z(dtype):
            return jnp.zeros((slots, vocab), dtype, device=sharding)

        return cls(z(jnp.int32), z(jnp.bool_), z(jnp.float32), z(jnp.bool_))


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
    """Writes a newly admitted sequence's rows (jitted once; the state is donated)."""
    return SamplerState(counts=state.counts.at[slot].set(counts), in_prompt=state.in_prompt.at[slot].set(in_prompt),
                        bias=state.bias.at[slot].set(bias), stop_ids=state.stop_ids.at[slot].set(stop_ids))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingBatch:
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
    use_mask: jax.Array  # [S] bool: the row is constrained by a grammar
    mask: jax.Array  # [S, ceil(V/32)] int32: bit t of a row allows token t (structured output)
    seed: jax.Array  # [S, 2] uint32: the request seed's high and low words
    sample_index: jax.Array  # [S] int32: index of the token being sampled in the sequence's output
    token_slot: jax.Array  # [T] int32: slot of each fed token; padding -> number of slots (dropped)
    token_is_prompt: jax.Array  # [T] bool: the fed token belongs to the prompt (else to the output)

    @classmethod
    def build(cls, scheduled: list[tuple[Sequence, int]], num_seqs: int, num_tokens: int, num_slots: int,
              mask_words: int):
        """Host-side arrays for one step, padded to `num_seqs` rows (greedy) and `num_tokens` tokens.
        Grammar masks start empty: `fill_grammar_masks` writes them while the model runs."""
        f32, i32 = np.float32, np.int32
        cols = {name: np.zeros(num_seqs, f32) for name in ("temperature", "presence", "frequency", "min_p")}
        cols |= {"top_p": np.ones(num_seqs, f32), "repetition": np.ones(num_seqs, f32),
                 "top_k": np.zeros(num_seqs, i32), "slot": np.zeros(num_seqs, i32),
                 "sample_index": np.zeros(num_seqs, i32), "seed": np.zeros((num_seqs, 2), np.uint32)}
        cols |= {name: np.zeros(num_seqs, np.bool_) for name in ("use_bias", "block_stop", "want_logprobs",
                                                                 "use_mask")}
        cols["mask"] = np.zeros((num_seqs, mask_words), i32)
        token_slot = np.full(num_tokens, num_slots, i32)
        token_is_prompt = np.zeros(num_tokens, np.bool_)
        t = 0
        for i, (s, n) in enumerate(scheduled):
            p = s.params
            # Below GREEDY_BELOW a draw is greedy anyway, and logits / 1e-40 overflow float32 to inf.
            temperature = p.temperature if p.temperature >= GREEDY_BELOW else 0.0
            cols["temperature"][i], cols["top_k"][i], cols["top_p"][i], cols["min_p"][i] = (
                temperature, p.top_k, p.top_p, p.min_p)
            cols["presence"][i], cols["frequency"][i], cols["repetition"][i] = (
                p.presence_penalty, p.frequency_penalty, p.repetition_penalty)
            cols["use_bias"][i] = p.needs_bias_row
            cols["block_stop"][i] = s.num_output_tokens < p.min_tokens
            cols["want_logprobs"][i] = p.logprobs is not None
            cols["slot"][i] = s.slot
            cols["seed"][i] = (s.seed >> 32) & 0xFFFFFFFF, s.seed & 0xFFFFFFFF
            cols["sample_index"][i] = s.num_output_tokens
            token_slot[t:t + n] = s.slot
            token_is_prompt[t:t + n] = np.arange(s.num_computed_tokens, s.num_computed_tokens + n) < s.num_prompt_tokens
            t += n
        return cls(**cols, token_slot=token_slot, token_is_prompt=token_is_prompt)


def fill_grammar_masks(sb: SamplingBatch, scheduled: list[tuple[Sequence, int]]) -> None:
    """Host: the allowed-token rows of constrained sequences that sample in this step (in place)."""
    for i, (s, n) in enumerate(scheduled):
        if s.grammar is not None and s.num_computed_tokens + n == len(s):
            sb.use_mask[i] = s.grammar.fill(sb.mask[i])


def record_tokens(state: SamplerState, token_ids, sb: SamplingBatch) -> SamplerState:
    """Counts this step's fed output tokens [T] in their slots (prompt tokens are in `in_prompt` already)."""
    slot = jnp.where(sb.token_is_prompt, state.counts.shape[0], sb.token_slot)
    return dataclasses.replace(state, counts=state.counts.at[slot, token_ids].add(1, mode="drop"))


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


def _grouped(x, fill=-jnp.inf):
    """[S, V] -> [S, ceil(V / _GROUP), _GROUP], padded with `fill`."""
    s, v = x.shape
    return jnp.pad(x, ((0, 0), (0, -v % _GROUP)), constant_values=fill).reshape(s, -1, _GROUP)


def _argmax(x):
    """First index of each row's maximum [S] int32, through group maxima: one pass over the row and two short
    argmaxes (XLA's CPU argmax over a whole row is a slow paired reduction)."""
    groups = _grouped(x)
    g = jnp.argmax(groups.max(-1), -1)
    inner = jnp.take_along_axis(groups, g[:, None, None], 1)[:, 0]
    return (g * _GROUP + jnp.argmax(inner, -1)).astype(jnp.int32)


def _candidates(x, width: int):
    """The `width` largest values of each row, descending, with their token ids ([S, width] each). Each lies in
    one of the `width` groups with the largest maxima, so two short top_k calls replace one over the row."""
    groups = _grouped(x)
    s, num_groups, _ = groups.shape
    picked = min(width, num_groups)
    _, group_ids = jax.lax.top_k(groups.max(-1), picked)
    values = jnp.take_along_axis(groups, group_ids[:, :, None], 1).reshape(s, picked * _GROUP)
    ids = (group_ids[:, :, None] * _GROUP + jnp.arange(_GROUP)).reshape(s, -1)
    top, at = jax.lax.top_k(values, width)
    # Without the barrier XLA's simplifier can turn top_k, whose values are compared back against the row, into
    # a sort of the whole row: 60x slower on CPU.
    return jax.lax.optimization_barrier(top), jnp.take_along_axis(ids, at, -1).astype(jnp.int32)


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


def _truncation(scaled, top_k, top_p, min_p):
    """Which tokens a row may draw, at its temperature (scaled: [S, V] logits / temperature), as the threshold
    `cut` [S] (keep scaled >= cut), with the row's candidates (values, ids [S, CANDIDATES]) and whether the kept
    set lies within them (`inside` [S]).

    The exact definitions, no sort: min-p keeps tokens with p >= min_p * p_max; top-k keeps every survivor at or
    above the k-th largest value (ties at the edge stay); top-p keeps the smallest set of the most likely of those
    holding top_p of their mass, with the ties of its least likely member."""
    s, vocab = scaled.shape
    width = min(CANDIDATES, vocab)
    covers = width == vocab  # the candidates are the whole row
    top, ids = _candidates(scaled, width)
    floor = top[:, 0] + jnp.log(min_p)  # p >= min_p * p_max, in logit space (-inf for min_p 0)
    top = jnp.where(top >= floor[:, None], top, -jnp.inf)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.where(k <= width, jnp.take_along_axis(top, jnp.minimum(k, width)[:, None] - 1, -1)[:, 0], -jnp.inf)
    weights = jnp.exp(top - top[:, :1])
    # The mass of the top-k set, from the candidates when the set's edge lies inside them, else over the row.
    edge_inside = covers | ((k <= width) & (kth > top[:, -1]))
    mass = jnp.sum(jnp.where(top >= kth[:, None], weights, 0.0), -1)
    full = ~edge_inside & (top_p < 1)
    mass = jax.lax.cond(jnp.any(full), lambda: jnp.where(full, jnp.sum(jnp.where(
        scaled >= jnp.maximum(kth, floor)[:, None], jnp.exp(scaled - top[:, :1]), 0.0), -1), mass), lambda: mass)
    before = (jnp.cumsum(weights, -1) - weights) / mass[:, None]
    ranks = jnp.arange(width)[None, :]
    # The most likely token is always kept: a top_p that rounds to 0 in float32 (5e-324) must not empty the row.
    keep = ((before < top_p[:, None]) | (ranks == 0)) & (ranks < k[:, None])
    no_filter = (k >= vocab) & (top_p >= 1)
    cut = jnp.where(no_filter, floor, jnp.maximum(jnp.min(jnp.where(keep, top, jnp.inf), -1), floor))
    # Undecided: the top-k set's edge lies past the candidates, or top_p is not reached within them.
    undecided = ~covers & (k > width) & ((k < vocab) | (keep[:, -1] & (top_p < 1)))
    cut = jax.lax.cond(jnp.any(undecided), lambda: jnp.where(undecided, _cutoffs_exact(
        jnp.where(scaled >= floor[:, None], scaled, -jnp.inf), k, top_p), cut), lambda: cut)
    inside = ~undecided & (covers | (~no_filter & (cut > top[:, -1])))
    return cut, inside, top, ids


def _pick(weights, target):
    """Per row, the first index where the running sum of weights [S, N] passes target [S] (never a weightless
    index, whatever the rounding), and the running sums."""
    cum = jnp.cumsum(weights, -1)
    last = jnp.max(jnp.where(weights > 0, jnp.arange(weights.shape[-1]), 0), -1)
    return jnp.minimum(jnp.sum(cum <= target[:, None], -1), last), cum


def _inverse_cdf(weights, uniform):
    """One index per row drawn with probability proportional to weights [S, N] (>= 0), by inverting the CDF at
    uniform [S] in [0, 1): group sums locate the group, a running sum inside it the index. One random number per
    row (a Gumbel draw needs one per token)."""
    groups = _grouped(weights, fill=0.0)
    sums = groups.sum(-1)
    target = uniform * jnp.sum(sums, -1)
    g, cum = _pick(sums, target)
    inner = jnp.take_along_axis(groups, g[:, None, None], 1)[:, 0]
    before = jnp.where(g > 0, jnp.take_along_axis(cum, jnp.maximum(g - 1, 0)[:, None], -1)[:, 0], 0.0)
    j, _ = _pick(inner, target - before)
    return (g * _GROUP + j).astype(jnp.int32)


def _apply_mask(logits, sb: SamplingBatch):
    """Grammar masks: tokens whose bit is clear get -inf, in constrained rows only."""
    s, v = logits.shape
    bits = (sb.mask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [S, W, 32]
    allowed = bits.reshape(s, -1)[:, :v].astype(jnp.bool_)
    return jnp.where(sb.use_mask[:, None] & ~allowed, -jnp.inf, logits)


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


def sample(logits, state: SamplerState, sb: SamplingBatch):
    """logits: [S, V] float32 -> (tokens [S] int32, (chosen logprob [S], its rank [S], top ids [S, K],
    top logprobs [S, K])), logprobs taken from the raw logits."""
    raw = logits
    logits = jax.lax.cond(jnp.any(sb.use_mask), lambda x: _apply_mask(x, sb), lambda x: x, logits)
    needs_adjust = jnp.any(sb.block_stop | sb.use_bias | (sb.presence != 0) | (sb.frequency != 0)
                           | (sb.repetition != 1))
    logits = jax.lax.cond(needs_adjust, lambda x: _adjust(x, state, sb), lambda x: x, logits)
    greedy = _argmax(logits)

    def draw():
        temp = jnp.where(sb.temperature > 0, sb.temperature, 1.0)
        scaled = logits / temp[:, None]
        cut, inside, top, ids = _truncation(scaled, sb.top_k, sb.top_p, sb.min_p)
        uniform = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(_row_keys(sb.seed, sb.sample_index))
        # A kept set within the candidates is drawn among them; others over the whole row.
        among = jnp.where(top >= cut[:, None], jnp.exp(top - top[:, :1]), 0.0)
        picked = jnp.take_along_axis(ids, _inverse_cdf(among, uniform)[:, None], -1)[:, 0]
        whole = (sb.temperature > 0) & ~inside
        drawn = jax.lax.cond(jnp.any(whole), lambda: jnp.where(inside, picked, _inverse_cdf(
            jnp.where(scaled >= cut[:, None], jnp.exp(scaled - top[:, :1]), 0.0), uniform)), lambda: picked)
        return jnp.where(sb.temperature > 0, drawn, greedy)

    tokens = jax.lax.cond(jnp.all(sb.temperature == 0), lambda: greedy, draw)
    # A row the constraints left without a candidate (a grammar and allowed_token_ids that do not meet, or a
    # finished grammar that only allows EOS while min_tokens blocks it) has no token to draw.
    tokens = jnp.where(jnp.isfinite(jnp.max(logits, axis=-1)), tokens, NO_TOKEN)
    s, k = logits.shape[0], min(MAX_LOGPROBS, logits.shape[-1])
    no_logprobs = (jnp.zeros(s, jnp.float32), jnp.zeros(s, jnp.int32), jnp.zeros((s, k), jnp.int32),
                   jnp.zeros((s, k), jnp.float32))
    lp = jax.lax.cond(jnp.any(sb.want_logprobs), lambda: logprobs_of(raw, tokens), lambda: no_logprobs)
    return tokens, lp
