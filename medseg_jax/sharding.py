"""Device mesh and shardings: the batch on a `data` axis, the state replicated; the
distributed runtime and the XLA flags a config asks for.

The same code runs on one CPU, on N fake CPU devices, on N GPUs and on several
hosts: host-local batches become global arrays with
`jax.make_array_from_process_local_data`.
"""

import collections
import os
from collections.abc import Iterator

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the `data` axis; other axes whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> int:
    """Returns the per-process batch size; raises if it does not split evenly."""
    n_dev = mesh.devices.size
    if batch_size % n_dev:
        raise ValueError(
            f"config.{field}={batch_size} is not divisible by the {n_dev} devices "
            f"of the mesh; set it to a multiple of {n_dev} (e.g. "
            f"{max(n_dev, batch_size // n_dev * n_dev)})")
    return batch_size // jax.process_count()


def to_global(batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy batch (this process's rows) -> global sharded arrays."""
    sharding = batch_sharded(mesh)
    if jax.process_count() == 1:  # one call for the whole dict: less per-array overhead
        return jax.device_put({k: np.asarray(v) for k, v in batch.items()}, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def prefetch_to_device(batches: Iterator[dict], mesh: Mesh, size: int = 2) -> Iterator[dict]:
    """Yields global device batches, keeping ``size`` host->device copies in flight.

    `to_global` starts an asynchronous copy; queueing the next ones while the current
    step runs overlaps the transfers (and the host loading) with compute.
    """
    queue = collections.deque()
    for batch in batches:
        queue.append(to_global(batch, mesh))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def from_process_0(value):
    """``value`` as process 0 has it, on every process (each measures its own times, but
    all must train alike); ``value`` itself in a single-process run."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return multihost_utils.broadcast_one_to_all(value)


def multiprocess_requested(coordinator_address: str = "", num_processes: int = 0,
                           force: bool = False) -> bool:
    """Whether this run is one of several processes (flags, SLURM or JAX's variables)."""
    if force or coordinator_address or num_processes > 1:
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return True
    return int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1, force: bool = False) -> bool:
    """Calls `jax.distributed.initialize()` when the run is multi-process.

    Explicit flags win; missing values come from JAX_COORDINATOR_ADDRESS /
    JAX_NUM_PROCESSES / JAX_PROCESS_ID, then from JAX's cluster detection (SLURM,
    Cloud TPU VM, Open MPI). Must run before anything touches the devices.
    Returns whether it initialised.
    """
    if not multiprocess_requested(coordinator_address, num_processes, force):
        return False
    env = os.environ
    kwargs = {
        "coordinator_address": coordinator_address or env.get("JAX_COORDINATOR_ADDRESS"),
        "num_processes": num_processes or _env_int("JAX_NUM_PROCESSES"),
        "process_id": process_id if process_id >= 0 else _env_int("JAX_PROCESS_ID"),
    }
    if (kwargs["num_processes"] or 0) > 1 and kwargs["coordinator_address"] is None:
        raise ValueError("--num_processes > 1 needs --coordinator_address=HOST:PORT "
                         "(the address of process 0)")
    jax.distributed.initialize(**kwargs)
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


# jaxlib versions in which the flag below was measured: an XLA flag or value that a jaxlib
# does not know aborts the process, so a later jaxlib is not given it until measured there.
# 0.11 and 0.12 (Python >= 3.12 only): known, and the float32 step 1.1-1.3x faster with it
# (docs/results/cpu_parity.md).
_YNN_FLAG_FROM, _YNN_FLAG_TO = (0, 10), (0, 12)
# YNNPACK's fusions kept: its reductions (BatchNorm's statistics and their gradients) are
# 10x faster than XLA's own; its convolutions are 2-2.5x slower than XLA's other path.
CPU_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE"


def accelerator_plugins() -> list[str]:
    """The PJRT plugins JAX would load besides its CPU backend (CUDA, ROCm, TPU), found as
    JAX finds them (``jax_plugins`` entry points and modules, ``libtpu``), without
    starting a backend."""
    import importlib.metadata  # noqa: PLC0415
    import importlib.util  # noqa: PLC0415
    import pkgutil  # noqa: PLC0415

    names = {e.name for e in importlib.metadata.entry_points(group="jax_plugins")}
    try:
        import jax_plugins  # noqa: PLC0415 (a namespace package, absent without plugins)

        names |= {m.name for m in pkgutil.iter_modules(jax_plugins.__path__)}
    except ImportError:
        pass
    if importlib.util.find_spec("libtpu") is not None:
        names.add("tpu")
    return sorted(names)


def cpu_only() -> bool:
    """Whether XLA's CPU backend is the only one this process will start: JAX_PLATFORMS
    (or ``jax_platforms``) is "cpu", or unset with no accelerator plugin installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "") or (jax.config.jax_platforms or "")
    if platforms:
        return platforms.strip().lower() == "cpu"
    return not accelerator_plugins()


def _jaxlib_version() -> tuple[int, ...]:
    import importlib.metadata  # noqa: PLC0415

    try:
        return tuple(int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return (0, 0)


def cpu_flag_measured() -> bool:
    """Whether the installed jaxlib is one ``CPU_YNN_FLAG`` was measured with."""
    return _YNN_FLAG_FROM <= _jaxlib_version() <= _YNN_FLAG_TO


def set_cpu_flags(config) -> bool:
    """Before the backend starts: ``train.xla_cpu_ynn=False`` (the default) keeps XLA:CPU's
    YNNPACK fusions for reductions only (``CPU_YNN_FLAG``): convolutions by XLA's other
    path, 2-2.5x faster on the shallow layers, BatchNorm's reductions still by YNNPACK. A
    float32 2D U-Net step 2.0x faster on an Intel Xeon (AMX), 4.9x on an AMD Zen 3
    (docs/results/cpu_parity.md; the results change in the last bits). Set only where the CPU backend is
    the only one (``cpu_only``: a GPU or TPU plugin's own XLA parses XLA_FLAGS too) and on
    the jaxlib versions it was measured with. Returns whether it is set."""
    if config.train.xla_cpu_ynn:
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return True
    if not cpu_only():
        return False
    if not cpu_flag_measured():
        version = _jaxlib_version()
        logging.warning(
            "config.train.xla_cpu_ynn=False: XLA_FLAGS %s was measured with jaxlib %d.%d "
            "to %d.%d, not %s, so it is not set (an XLA flag a jaxlib does not know aborts "
            "the process); set it in XLA_FLAGS yourself to try it",
            CPU_YNN_FLAG, *_YNN_FLAG_FROM, *_YNN_FLAG_TO, ".".join(map(str, version)))
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_YNN_FLAG}".strip()
    return True
