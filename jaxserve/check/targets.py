"""The hardware `jaxserve check` compiles for: a chip's memory and roofline, and the devices to compile with.

TPU targets compile for a real topology description from libtpu (no TPU needed); `cuda-*` targets only lower
(PTX needs a GPU). Per-chip figures are the vendors' published peaks: bf16 dense FLOP/s, HBM bytes and HBM
bandwidth.
"""

from __future__ import annotations

import dataclasses

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    platform: str  # "tpu" | "cuda"
    hbm_bytes: int
    bf16_flops: float  # per second
    hbm_bandwidth: float  # bytes per second
    topology: str  # libtpu topology holding up to 8 chips, e.g. "v5e:2x4" ("" for cuda)


CHIPS = {
    "v5e": Chip("TPU v5e", "tpu", 16 * GIB, 197e12, 819e9, "v5e:2x4"),
    "v6e": Chip("TPU v6e", "tpu", 32 * GIB, 918e12, 1640e9, "v6e:2x4"),
    "h100": Chip("NVIDIA H100 SXM", "cuda", 80 * 10**9, 989e12, 3.35e12, ""),
    "h200": Chip("NVIDIA H200", "cuda", 141 * 10**9, 989e12, 4.8e12, ""),
}
CHIP_COUNTS = (1, 4, 8)


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # e.g. "tpu-v6e-4"
    chip: Chip
    chips: int

    def devices(self) -> list:
        """The devices to compile for: the first `chips` of the chip's topology (TPU)."""
        from jax.experimental import topologies

        # libtpu describes whole hosts (2x2 chips and up); fewer chips are a sub-mesh of one host, which is
        # how a 1-chip VM compiles too.
        return list(topologies.get_topology_desc(self.chip.topology, platform="tpu").devices[:self.chips])


def names() -> list[str]:
    return [f"{'tpu' if c.platform == 'tpu' else 'cuda'}-{key}-{n}" for key, c in CHIPS.items() for n in CHIP_COUNTS]


def target(name: str) -> Target:
    """"tpu-v5e-4" -> Target; raises ValueError naming the known targets."""
    parts = name.split("-")
    if len(parts) == 3 and parts[1] in CHIPS and parts[2].isdigit() and int(parts[2]) in CHIP_COUNTS:
        chip = CHIPS[parts[1]]
        if parts[0] == ("tpu" if chip.platform == "tpu" else "cuda"):
            return Target(name, chip, int(parts[2]))
    raise ValueError(f"unknown target {name!r}; choose one of {', '.join(names())}")
