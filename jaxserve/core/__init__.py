"""The engine core: token ids in, token ids out (requests, KV pages, scheduler, input batch, runner, sampler)."""
