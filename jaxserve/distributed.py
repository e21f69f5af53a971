"""Several processes (hosts), one model: JAX's distributed runtime plus a channel for the step inputs.

Every process owns some of the mesh's devices, so every process must issue the same jitted calls, in the same
order, with the same inputs. Process 0 (the leader) runs the scheduler and the HTTP server; before each device
call it sends the call's host-side inputs (small numpy arrays: token ids, block tables, sampling parameters) to
the followers, which make the same call. The channel is a plain socket (multiprocessing.connection) beside JAX's
coordinator: no JIT-compiled collective is spent on moving these inputs around.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from multiprocessing.connection import Client, Listener

import jax

log = logging.getLogger("jaxserve")


@dataclasses.dataclass(frozen=True)
class Cluster:
    coordinator: str  # host:port of JAX's coordinator (process 0's address)
    num_processes: int
    process_id: int

    @classmethod
    def from_args(cls, coordinator: str | None, num_processes: int | None, process_id: int | None) -> "Cluster | None":
        """From flags, else from the environment variables JAX itself reads; None for a single process."""
        coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
        num = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "1"))
        pid = process_id if process_id is not None else int(os.environ.get("JAX_PROCESS_ID", "0"))
        if num <= 1:
            return None
        if not coordinator:
            raise ValueError("several processes need --distributed-coordinator HOST:PORT (or JAX_COORDINATOR_ADDRESS)")
        if not 0 <= pid < num:
            raise ValueError(f"--process-id must be in [0, {num}), got {pid}")
        return cls(coordinator, num, pid)

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0

    def initialize(self) -> None:
        """Joins JAX's distributed runtime; must come before anything touches a device. CPU devices talk through
        gloo (the setting only concerns the CPU backend; TPU and GPU use their own links)."""
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=self.coordinator, num_processes=self.num_processes,
                                   process_id=self.process_id)
        log.info("process %d of %d joined; %d devices in all, %d here", self.process_id, self.num_processes,
                 len(jax.devices()), len(jax.local_devices()))

    def shutdown(self) -> None:
        """Leaves the distributed runtime together with the other processes (a process that simply exits makes
        the others' coordination agents abort)."""
        jax.distributed.shutdown()

    def _channel_address(self) -> tuple[str, int]:
        host, port = self.coordinator.rsplit(":", 1)
        return host, int(port) + 1

    def _authkey(self) -> bytes:
        return f"jaxserve:{self.coordinator}:{self.num_processes}".encode()

    def leader_channel(self, timeout: float = 600.0) -> "LeaderChannel":
        listener = Listener(self._channel_address(), authkey=self._authkey())
        conns = []
        deadline = time.monotonic() + timeout
        while len(conns) < self.num_processes - 1:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(conns)} of {self.num_processes - 1} follower processes connected")
            conns.append(listener.accept())
        listener.close()
        return LeaderChannel(conns)

    def follower_channel(self, timeout: float = 600.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                return Client(self._channel_address(), authkey=self._authkey())
            except (ConnectionRefusedError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


class LeaderChannel:
    def __init__(self, conns):
        self.conns = conns

    def send(self, message) -> None:
        for c in self.conns:
            c.send(message)

    def close(self) -> None:
        self.send(("stop",))
        for c in self.conns:
            c.close()
