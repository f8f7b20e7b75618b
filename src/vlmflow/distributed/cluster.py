"""Which Ray cluster to use, how to connect to it, and how many model replicas it holds.

``--ray`` takes ``auto`` (the cluster this machine belongs to, e.g. after ``ray start``, inside a
Ray job or a KubeRay pod), ``local`` (start a private cluster on this machine for the run) or an
address (``HOST:PORT`` of the head node, or ``ray://HOST:10001`` for Ray Client).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from vlmflow.errors import ConfigError

log = logging.getLogger(__name__)

#: ``host:port`` (head node's GCS) or a ``ray://`` / ``ray+`` client URL.
_ADDRESS_RE = re.compile(r"^(ray(\+[a-z]+)?://)?[A-Za-z0-9_.\-\[\]:]+:\d+$")
INSTALL_HINT = "install the optional dependency: pip install 'vlmflow[ray]'"


@dataclass(frozen=True)
class RayTarget:
    """Where the Ray cluster is: ``auto``, ``local`` or an ``address``.

    >>> RayTarget.parse("local").kind
    'local'
    >>> RayTarget.parse("10.0.0.5:6379").address
    '10.0.0.5:6379'
    """

    kind: Literal["auto", "local", "address"]
    address: str | None = None

    @classmethod
    def parse(cls, text: str) -> RayTarget:
        """Parse a ``--ray`` value; :class:`ConfigError` names the value and the valid forms."""
        value = text.strip()
        if value.lower() in ("auto", "local"):
            return cls(value.lower())  # type: ignore[arg-type]
        if _ADDRESS_RE.match(value):
            return cls("address", value)
        raise ConfigError(
            f"--ray {text!r} is not understood; valid: auto (the running cluster), local (a cluster on this "
            "machine), HOST:PORT of the head node, or ray://HOST:10001"
        )

    def __str__(self) -> str:
        return self.address if self.kind == "address" else self.kind


@dataclass(frozen=True)
class RayOptions:
    """How to run on Ray.

    Attributes:
        target: the cluster (a :class:`RayTarget` or its text form).
        workers: model replicas (one Ray actor each). Default: one per GPU of the cluster when it
            has GPUs and the model is not forced to the CPU, else one per ``worker_cpus`` CPUs.
        shard_size: samples per task. Default: about four tasks per worker, at most 32 samples
            (small shards balance the load; each task has a fixed cost of a few milliseconds).
        worker_cpus: CPUs reserved per replica (also its torch threads on CPU).
        worker_gpus: GPUs per replica (a fraction packs several small models on one GPU).
        max_restarts: how often a dead replica is restarted (and its task retried) before the run
            gives its shards to the other replicas.
        local_cpus: CPUs of a ``local`` cluster (default: all of this machine's).

    >>> RayOptions("local", workers=2).target
    RayTarget(kind='local', address=None)
    """

    target: RayTarget | str = "auto"
    workers: int | None = None
    shard_size: int | None = None
    worker_cpus: float = 1.0
    worker_gpus: float = 1.0
    max_restarts: int = 3
    local_cpus: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target, str):
            object.__setattr__(self, "target", RayTarget.parse(self.target))
        for name in ("workers", "shard_size", "local_cpus"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.worker_cpus <= 0 or self.worker_gpus <= 0:
            raise ConfigError(
                f"worker_cpus and worker_gpus must be > 0, got {self.worker_cpus}, {self.worker_gpus}"
            )
        if self.max_restarts < 0:
            raise ConfigError(f"max_restarts must be >= 0, got {self.max_restarts}")


def import_ray() -> Any:
    """The ``ray`` module, or :class:`ConfigError` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"running on Ray needs the package 'ray' ({exc}); {INSTALL_HINT}") from None
    return ray


@contextmanager
def connected(options: RayOptions) -> Iterator[Any]:
    """Connect to (or start) the cluster of ``options``; yield the ``ray`` module.

    An already initialised Ray (e.g. a test session's cluster, or a Ray job's driver) is used as it
    is and left running; a connection opened here is closed on exit.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    target = options.target
    assert isinstance(target, RayTarget)
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "configure_logging": True}
    if target.kind == "local":
        kwargs.update(address="local", num_cpus=options.local_cpus, include_dashboard=False)
    else:
        kwargs["address"] = "auto" if target.kind == "auto" else target.address
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        hint = " (start one with `ray start --head`, or use --ray local)" if target.kind == "auto" else ""
        raise ConfigError(f"cannot connect to the Ray cluster {str(target)!r}{hint}: {exc}") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class Placement:
    """Resources of one replica and how many replicas to start."""

    workers: int
    num_cpus: float
    num_gpus: float

    @property
    def uses_gpu(self) -> bool:
        return self.num_gpus > 0


def plan_placement(resources: dict[str, float], options: RayOptions, device: str) -> Placement:
    """Replicas for a cluster with ``resources`` (``ray.cluster_resources()``) and a model device.

    GPU replicas when the cluster has GPUs and ``device`` is not ``cpu``; CPU replicas otherwise.
    An explicit ``workers`` beyond the cluster's capacity is kept (an autoscaler may add nodes) but
    logged, since replicas that do not fit wait until resources free up.

    >>> plan_placement({"CPU": 16.0, "GPU": 8.0}, RayOptions("auto"), "auto")
    Placement(workers=8, num_cpus=1.0, num_gpus=1.0)
    >>> plan_placement({"CPU": 4.0}, RayOptions("local"), "auto")
    Placement(workers=4, num_cpus=1.0, num_gpus=0.0)
    """
    gpus = float(resources.get("GPU", 0.0))
    cpus = float(resources.get("CPU", 0.0))
    if device.startswith("cuda") and gpus == 0:
        raise ConfigError(
            f"device {device!r} requested but the Ray cluster has no GPUs; use --device auto or cpu"
        )
    use_gpu = gpus > 0 and device != "cpu"
    num_gpus = options.worker_gpus if use_gpu else 0.0
    by_cpu = math.floor(cpus / options.worker_cpus + 1e-9)
    capacity = min(math.floor(gpus / num_gpus + 1e-9), by_cpu) if use_gpu else by_cpu
    workers = options.workers if options.workers is not None else max(1, capacity)
    if workers > capacity:
        log.warning(
            "%d workers asked for, but the cluster holds %d (%s CPUs, %s GPUs); the others wait for resources",
            workers,
            capacity,
            cpus,
            gpus,
        )
    return Placement(workers=workers, num_cpus=options.worker_cpus, num_gpus=num_gpus)


def shard_size_for(n_samples: int, workers: int, requested: int | None) -> int:
    """Samples per task: ``requested``, else about four tasks per worker, between 1 and 32.

    >>> shard_size_for(1000, 8, None)
    32
    >>> shard_size_for(40, 2, None)
    5
    """
    if requested is not None:
        return requested
    return max(1, min(32, math.ceil(n_samples / (4 * max(1, workers)))))
