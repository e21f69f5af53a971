"""Several processes (hosts), one model: JAX's distributed runtime plus a channel for the step inputs.

Every process owns some of the mesh's devices, so every process must issue the same jitted calls, in the same
order, with the same inputs. Process 0 (the leader) runs the scheduler and the HTTP server; before each device
call it sends the call's host-side inputs (small numpy arrays: token ids, block tables, sampling parameters) to
the followers, which make the same call. The channel is a plain socket (multiprocessing.connection) beside JAX's
coordinator: no JIT-compiled collective is spent on moving these inputs around.

The channel authenticates with a shared secret (--distributed-secret / JAXSERVE_DISTRIBUTED_SECRET, HMAC
challenge) and carries no pickles: a message is a JSON header naming its kind and the layout of its arguments
(ints, arrays, tuples, and the two step dataclasses by name), then each array's raw bytes. Decoding can only build
numpy arrays and those dataclasses, so a forged message cannot run code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from multiprocessing.connection import Client, Listener

import jax
import numpy as np

from jaxserve.core.input_batch import StepInput

log = logging.getLogger("jaxserve")


@dataclasses.dataclass(frozen=True)
class Cluster:
    coordinator: str  # host:port of JAX's coordinator (process 0's address)
    num_processes: int
    process_id: int
    secret: str = dataclasses.field(repr=False, default="")  # authenticates the step channel

    @classmethod
    def from_args(cls, coordinator: str | None, num_processes: int | None, process_id: int | None,
                  secret: str | None = None) -> "Cluster | None":
        """From flags, else from the environment variables JAX itself reads; None for a single process."""
        coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
        secret = secret or os.environ.get("JAXSERVE_DISTRIBUTED_SECRET")
        num = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "1"))
        pid = process_id if process_id is not None else int(os.environ.get("JAX_PROCESS_ID", "0"))
        if num <= 1:
            return None
        if not coordinator:
            raise ValueError("several processes need --distributed-coordinator HOST:PORT (or JAX_COORDINATOR_ADDRESS)")
        if not 0 <= pid < num:
            raise ValueError(f"--process-id must be in [0, {num}), got {pid}")
        if not secret:
            raise ValueError("several processes need a shared secret for their step channel: --distributed-secret "
                             "(or JAXSERVE_DISTRIBUTED_SECRET), the same on every process")
        return cls(coordinator, num, pid, secret)

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
        return self.secret.encode()

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

    def follower_channel(self, timeout: float = 600.0) -> "FollowerChannel":
        deadline = time.monotonic() + timeout
        while True:
            try:
                return FollowerChannel(Client(self._channel_address(), authkey=self._authkey()))
            except (ConnectionRefusedError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


_DATACLASSES = {cls.__name__: cls for cls in (StepInput,)}


def encode(message: tuple) -> list[bytes]:
    """(kind, *args) -> frames: a JSON header, then the arrays' bytes in the order the header names them."""
    arrays: list[np.ndarray] = []

    def layout(x):
        if isinstance(x, (bool, int, np.integer)) and not isinstance(x, np.ndarray):
            return {"int": int(x)}
        if isinstance(x, (tuple, list)):
            return {"tuple": [layout(v) for v in x]}
        if isinstance(x, StepInput):
            return {"dataclass": type(x).__name__,
                    "fields": {f.name: layout(getattr(x, f.name)) for f in dataclasses.fields(x)}}
        a = np.ascontiguousarray(x)
        arrays.append(a)
        return {"array": len(arrays) - 1, "dtype": a.dtype.str, "shape": list(a.shape)}

    kind, *args = message
    specs = [layout(a) for a in args]
    header = json.dumps({"kind": kind, "args": specs, "frames": len(arrays)}).encode()
    return [header] + [a.tobytes() for a in arrays]


def decode(frames: list[bytes]) -> tuple:
    header = json.loads(frames[0])

    def build(spec):
        if "int" in spec:
            return int(spec["int"])
        if "tuple" in spec:
            return tuple(build(v) for v in spec["tuple"])
        if "dataclass" in spec:
            cls = _DATACLASSES[spec["dataclass"]]  # KeyError for anything else
            return cls(**{name: build(v) for name, v in spec["fields"].items()})
        dtype = np.dtype(spec["dtype"])
        if dtype.hasobject:
            raise ValueError("object arrays are not accepted")
        return np.frombuffer(frames[1 + spec["array"]], dtype).reshape(spec["shape"])

    return (str(header["kind"]), *(build(a) for a in header["args"]))


class LeaderChannel:
    def __init__(self, conns):
        self.conns = conns

    def send(self, message: tuple) -> None:
        frames = encode(message)
        for c in self.conns:
            for f in frames:
                c.send_bytes(f)

    def close(self) -> None:
        self.send(("stop",))
        for c in self.conns:
            c.close()


class FollowerChannel:
    def __init__(self, conn):
        self.conn = conn

    def recv(self) -> tuple:
        header = self.conn.recv_bytes()
        return decode([header] + [self.conn.recv_bytes() for _ in range(int(json.loads(header)["frames"]))])

    def close(self) -> None:
        self.conn.close()
