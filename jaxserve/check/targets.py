"""The hardware `jaxserve check` compiles for: a chip's memory and roofline, and the devices to compile with.

TPU targets compile for a real topology description from libtpu (no TPU needed); `cuda-*` targets only lower,
for an abstract mesh of GPUs (compiling needs the GPU). Per-chip figures are the vendors' published peaks: bf16
dense FLOP/s, HBM bytes and HBM bandwidth.
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
    cores: int = 0  # streaming multiprocessors (cuda), given to the abstract device lowered for


CHIPS = {
    "v5e": Chip("TPU v5e", "tpu", 16 * GIB, 197e12, 819e9, "v5e:2x4"),
    "v6e": Chip("TPU v6e", "tpu", 32 * GIB, 918e12, 1640e9, "v6e:2x4"),
    "h100": Chip("NVIDIA H100 SXM", "cuda", 80 * 10**9, 989e12, 3.35e12, "", 132),
    "h200": Chip("NVIDIA H200", "cuda", 141 * 10**9, 989e12, 4.8e12, "", 132),
}
CHIP_COUNTS = (1, 4, 8)


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # e.g. "tpu-v6e-4"
    chip: Chip
    chips: int

    @property
    def lowers_only(self) -> bool:
        return self.chip.platform == "cuda"

    def mesh(self, tensor_parallel_size: int, enable_expert_parallel: bool = False):
        """The ("expert", "model") mesh to build the programs on (sharding.make_mesh's, the chips along `expert`
        with enable_expert_parallel): TPU, the first chips of the chip's topology (libtpu describes whole hosts of
        2x2 chips and up; fewer chips are a sub-mesh of one host, which is how a 1-chip VM compiles too); CUDA, an
        abstract mesh of GPUs of this kind."""
        if tensor_parallel_size > self.chips:
            raise ValueError(f"tensor_parallel_size {tensor_parallel_size} needs {tensor_parallel_size} chips; "
                             f"{self.name} has {self.chips}")
        import jax

        from jaxserve.parallel import sharding

        if self.lowers_only:
            kind = jax.sharding.AbstractDevice(device_kind=self.chip.name, num_cores=self.chip.cores,
                                               platform="cuda")
            shape = (tensor_parallel_size, 1) if enable_expert_parallel else (1, tensor_parallel_size)
            return jax.sharding.AbstractMesh(shape, ("expert", "model"), abstract_device=kind,
                                             axis_types=(jax.sharding.AxisType.Auto,) * 2)  # as a Mesh's default
        from jax.experimental import topologies

        return sharding.make_mesh(tensor_parallel_size, topologies.get_topology_desc(
            self.chip.topology, platform="tpu").devices[:self.chips], enable_expert_parallel)

    @staticmethod
    def device_kind(mesh) -> str:
        """The device kind the programs are built for (the kernels' tuning reads it)."""
        abstract = getattr(mesh, "abstract_device", None)
        return abstract.device_kind if abstract is not None else mesh.devices.flat[0].device_kind


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
