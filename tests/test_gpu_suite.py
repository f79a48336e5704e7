"""benchmarks/gpu_suite.sh --dry_run: every stage of the GPU suite runs on the CPU at toy
sizes and writes its rows to gpu_suite.json / gpu_suite.md (or, for the PyTorch stage
without PyTorch, an explicit 'skipped' with the reason). Real data are not needed: the dry
run falls back to the embedded synthetic set."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("env", "layers", "throughput", "torch_compare", "pipeline", "time_to_accuracy")


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, **extra)
    # The suite measures one device: no fake CPU devices from conftest.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    return env


def _run(out, *flags, env=None, timeout=2400):
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_suite.sh"), str(out),
                           "--dry_run", f"--scratch={out / 'scratch'}",
                           "--hippocampus_root=", "--hc18_root=", *flags],
                          cwd=REPO, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(out / "gpu_suite.json") as f:
        report = json.load(f)
    with open(out / "gpu_suite.md") as f:
        md = f.read()
    return report, md, proc.stdout


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("gpu_suite"))


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def test_every_stage_writes_its_rows(dry_run):
    report, md, log = dry_run
    assert list(report["stages"]) == list(STAGES)
    for name in STAGES:
        items = report["stages"][name]["items"]
        assert items, name
        for item_id, result in items.items():
            if name == "torch_compare" and not _torch_available():
                assert result["status"] == "skipped", (item_id, result)
                assert "PyTorch" in result["reason"]
            else:
                assert result["status"] == "ok", (name, item_id, result)
    assert report["setup"]["xla_flags_dropped"] == []  # the default flag is known to XLA
    assert "suite done" in log


def test_throughput_and_layer_rows(dry_run):
    report = dry_run[0]
    items = report["stages"]["throughput"]["items"]
    models = {i.split("-")[0] for i in items}
    assert models == {"unet", "fcn", "attention_unet"}
    assert {i.split("-")[1] for i in items} == {"2d", "3d"}
    assert {i.split("-")[3] for i in items} == {"auto", "reshape", "lax"}
    for result in items.values():
        row = result["rows"][0]
        assert row["step_ms"] > 0 and row["images_per_s"] > 0 and row["compile_s"] > 0
        assert row["loss_finite"] and row["params"] > 0
    winner = report["summary"]["layer_impl_winner_per_model"]["unet-2d-bf16"]
    assert winner["winner"] in ("reshape", "lax")
    for result in report["stages"]["layers"]["items"].values():
        assert {r["layer"] for r in result["rows"]} == {"up_conv", "max_pool"}
        assert all(r["max_rel_diff"] < 1e-2 for r in result["rows"])  # same results
        assert set(result["totals"]) == {"up_conv", "max_pool"}


def test_pipeline_and_time_to_accuracy_rows(dry_run):
    report = dry_run[0]
    pipe = report["stages"]["pipeline"]["items"]
    two_d = pipe["hippocampus-2d"]
    assert [h["workers"] for h in two_d["host"]] == [0, 2]  # grain worker processes ran
    assert all(h["images_per_s"] > 0 and h["host_over_step"] > 0 for h in two_d["host"])
    assert two_d["data"] == "synthetic" and "synthetic" in two_d["note"]
    # The HC18 item resamples to a spacing in mm, as the GPU run's does.
    assert pipe["hc18-2d-spacing"]["config"]["in_plane"] == "spacing"
    assert pipe["hc18-2d-spacing"]["step_ms"] > 0
    tta = report["stages"]["time_to_accuracy"]["items"]["unet-3d-hippocampus"]
    assert tta["reached"] and tta["curve"] and tta["exit_code"] == 143  # stopped by SIGTERM
    assert tta["curve"][0]["val_dice"] >= 0


def test_markdown_has_every_section(dry_run):
    md = dry_run[1]
    assert "DRY RUN" in md
    for heading in ("## Train step throughput", "## Layers alone", "## Side by side with PyTorch",
                    "## Input pipeline against the train step", "## Time to accuracy"):
        assert heading in md
    assert "| unet | 2D |" in md


def test_torch_stage_says_skipped_without_torch(tmp_path):
    hidden = tmp_path / "no_torch"
    (hidden / "torch").mkdir(parents=True)
    (hidden / "torch" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = _env(PYTHONPATH=str(hidden))
    report, md, _ = _run(tmp_path / "out", "--stages=torch_compare", env=env)
    for result in report["stages"]["torch_compare"]["items"].values():
        assert result["status"] == "skipped" and "PyTorch" in result["reason"]
    assert "skipped: PyTorch is not installed" in md


def test_gpu_plan_traces_at_full_size():
    """The GPU sizes are only run on a GPU: their configs are checked here, every
    throughput case's train step traced at full size (jax.eval_shape, no compute)."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_suite.py"),
                           "--check_plan"], cwd=REPO, env=_env(JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("plan ok: throughput") == 12


def test_a_stage_out_of_time_keeps_the_others(tmp_path):
    """The throughput stage with 15 s and items made slow: its first case is stopped
    (timeout), the rest are recorded as skipped, and the reports are still written.
    (The dry run's env stage has a fixed 300 s: 315 s leaves 15 s to throughput.)"""
    report, md, _ = _run(tmp_path, "--stages=throughput", "--total_s=315",
                         env=_env(GPU_SUITE_SLOW_STAGE="throughput:60"))
    items = report["stages"]["throughput"]["items"]
    statuses = [r["status"] for r in items.values()]
    assert statuses[0] == "timeout" and set(statuses[1:]) == {"skipped"}, items
    assert report["stages"]["env"]["items"]["versions"]["status"] == "ok"
    assert "timeout: stage time limit reached" in md


def test_benchmark_modules_are_small_and_documented():
    """No benchmarks/ module over 600 lines; the suite's modules, functions and classes
    each say what they are (a docstring)."""
    import ast  # noqa: PLC0415
    import glob  # noqa: PLC0415

    bench = os.path.join(REPO, "benchmarks")
    for path in glob.glob(os.path.join(bench, "**", "*.py"), recursive=True):
        with open(path) as f:
            assert len(f.read().splitlines()) <= 600, path
    for path in [os.path.join(bench, "gpu_suite.py")] + glob.glob(
            os.path.join(bench, "suite", "*.py")):
        with open(path) as f:
            tree = ast.parse(f.read())
        assert ast.get_docstring(tree), path
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                assert ast.get_docstring(node), f"{path}: {node.name}"


def test_driver_side_imports_no_jax():
    """The driver runs before the package's dependencies are known to be installed: its
    modules import neither jax nor ml_collections."""
    code = ("import sys; import suite.driver, gpu_suite; "
            "print(sorted(m for m in ('jax', 'ml_collections', 'grain', 'nibabel') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.join(REPO, "benchmarks"),
                          env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
