"""Device mesh and shardings: the batch on a `data` axis, the state replicated.

The same code runs on one CPU, on N fake CPU devices, on N GPUs and on several
hosts: host-local batches become global arrays with
`jax.make_array_from_process_local_data`.
"""

import jax
import numpy as np
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
