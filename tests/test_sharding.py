import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from medseg_jax import sharding
from medseg_jax.data import cache

HERE = os.path.dirname(os.path.abspath(__file__))


def test_batch_size_error_names_the_field_and_a_fix():
    mesh = sharding.make_mesh()
    assert sharding.check_batch_size(16, mesh, "train.batch_size") == 16
    with pytest.raises(ValueError, match=r"config.eval.batch_size=12 is not divisible by the 8 "
                                         r"devices .* set it to a multiple of 8 \(e.g. 8\)"):
        sharding.check_batch_size(12, mesh, "eval.batch_size")


def test_prefetch_to_device_keeps_order_and_shards_the_batch():
    mesh = sharding.make_mesh()
    host = [{"image": np.full((8, 2), i, np.float32)} for i in range(5)]
    got = list(sharding.prefetch_to_device(iter(host), mesh, size=2))
    assert [int(b["image"][0, 0]) for b in got] == [0, 1, 2, 3, 4]
    assert all(b["image"].sharding == sharding.batch_sharded(mesh) for b in got)


def test_multiprocess_is_detected_from_flags_and_environment(monkeypatch):
    for var in ("SLURM_NTASKS", "SLURM_PROCID", "JAX_NUM_PROCESSES"):
        monkeypatch.delenv(var, raising=False)
    assert not sharding.multiprocess_requested()
    assert not sharding.initialize_distributed()  # a single process: nothing to do
    assert sharding.multiprocess_requested("10.0.0.1:1234")
    assert sharding.multiprocess_requested(num_processes=2)
    assert sharding.multiprocess_requested(force=True)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert sharding.multiprocess_requested()
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not sharding.multiprocess_requested()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    assert sharding.multiprocess_requested()
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="needs --coordinator_address"):
        sharding.initialize_distributed(num_processes=2, process_id=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(workdir, out, num_processes, process_id, port, devices):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.path.dirname(HERE),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    for var in ("SLURM_NTASKS", "SLURM_PROCID", "JAX_NUM_PROCESSES", "JAX_COORDINATOR_ADDRESS"):
        env.pop(var, None)
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "multiprocess_worker.py"), workdir, out,
         str(num_processes), str(process_id), str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs, timeout=240):
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]


def test_two_processes_train_like_one_process(make_tiny_config, tmp_path):
    """2 processes x 2 CPU devices (gloo collectives over 127.0.0.1) end with the same
    parameters as each other and as 1 process x 4 devices, through train.train."""
    config = make_tiny_config()
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    for workdir in (multi, single):  # data and splits written once, before the processes
        cache.prepare(config, workdir)
    port = _free_port()
    procs = [_worker(multi, str(tmp_path / f"p{i}.npz"), 2, i, port, 2) for i in range(2)]
    procs.append(_worker(single, str(tmp_path / "single.npz"), 1, 0, 0, 4))
    _finish(procs)
    p0, p1, ref = (np.load(tmp_path / f"{n}.npz") for n in ("p0", "p1", "single"))
    assert list(p0["__devices__"]) == list(p1["__devices__"]) == [4, 2, 2, 3]
    assert list(ref["__devices__"]) == [4, 4, 1, 3]
    assert set(p0.files) == set(ref.files)
    for name in set(p0.files) - {"__devices__"}:
        np.testing.assert_array_equal(p0[name], p1[name], err_msg=name)
        # Summation order of the cross-process all-reduce (gloo) differs: float32 noise.
        np.testing.assert_allclose(p0[name], ref[name], rtol=1e-4, atol=1e-5, err_msg=name)
    # Process 0 alone wrote the reports; both wrote the Orbax checkpoints.
    rows = [json.loads(r) for r in open(os.path.join(multi, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows if "val_loss" in r] == [1]  # once, not once a process
    assert [r["step"] for r in rows if "loss" in r] == [2, 3]
    assert os.listdir(os.path.join(multi, "checkpoints")) == ["3"]


def test_cpu_flags_from_the_config(monkeypatch):
    import importlib.metadata

    from medseg_jax.config import default_config, recipe

    base = "--xla_force_host_platform_device_count=8"
    ynn = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE"
    monkeypatch.setenv("XLA_FLAGS", base)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    real_version = importlib.metadata.version  # a measured jaxlib, whichever is installed
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "0.10.2" if name == "jaxlib" else real_version(name))
    xla_defaults = default_config()
    xla_defaults.train.xla_cpu_ynn = True
    assert not sharding.set_cpu_flags(xla_defaults)  # XLA's defaults: nothing set
    assert os.environ["XLA_FLAGS"] == base
    assert sharding.set_cpu_flags(default_config())  # the default: YNN for reductions only
    assert os.environ["XLA_FLAGS"] == f"{base} {ynn}"
    assert sharding.set_cpu_flags(recipe(default_config()))  # not added twice
    assert os.environ["XLA_FLAGS"].count("ynn") == 1


@pytest.mark.parametrize("platforms, plugins, version, expected", [
    ("cpu", ["cuda"], "0.10.2", True),  # JAX_PLATFORMS=cpu: the plugin is not loaded
    ("", [], "0.10.2", True),  # nothing but the CPU backend installed
    ("", ["cuda"], "0.10.2", False),  # the CUDA plugin's XLA parses XLA_FLAGS too
    ("cuda", [], "0.10.2", False),
    ("cpu,cuda", [], "0.10.2", False),
    ("cpu", [], "0.9.2", False),  # before the flag's value existed
    ("cpu", [], "0.12.1", True),  # the newest measured
    ("cpu", [], "0.13.0", False),  # not measured there: an unknown value aborts XLA
])
def test_cpu_flags_only_where_the_cpu_backend_alone_reads_them(
        monkeypatch, caplog, request, platforms, plugins, version, expected):
    import importlib.metadata

    from medseg_jax.config import default_config

    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    before = sharding.jax.config.jax_platforms  # "cpu", from conftest's JAX_PLATFORMS
    sharding.jax.config.update("jax_platforms", platforms or None)
    request.addfinalizer(lambda: sharding.jax.config.update("jax_platforms", before))
    monkeypatch.setattr(sharding, "accelerator_plugins", lambda: plugins)
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: version if name == "jaxlib" else real_version(name))
    assert sharding.set_cpu_flags(default_config()) is expected
    assert ("ynn" in os.environ["XLA_FLAGS"]) is expected
    if version == "0.13.0":
        assert "measured with jaxlib 0.10 to 0.12, not 0.13" in caplog.text


def test_accelerator_plugins_are_found_without_a_backend():
    assert sharding.accelerator_plugins() == []  # this CPU-only environment
