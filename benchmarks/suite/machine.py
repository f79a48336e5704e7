"""The set-up before the stages: the workers' environment (the repository on PYTHONPATH,
one device, each extra XLA flag probed and dropped if this XLA refuses it) and what the
machine is (CPU, load, nvidia-smi, git commit). Driver side: no jax import; JAX is started
in subprocesses only.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

from suite.common import REPO, log


def cpu_model() -> str:
    """The CPU's model name (as medseg_jax.workdir.cpu_model, which imports the package's
    dependencies: the set-up runs before they are known to be installed)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def nvidia_smi() -> str:
    """nvidia-smi's report, or why there is none."""
    if not shutil.which("nvidia-smi"):
        return "nvidia-smi: not found (no NVIDIA driver on this machine)"
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30,
                              check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed: {e}"


def git_commit() -> str | None:
    """The repository's short commit hash, None outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _probe_flags(env: dict, flags_in: list[str], extra: list[str]):
    """(kept, dropped, start error): JAX started with the caller's flags, then with each
    extra flag added (an unknown flag aborts XLA)."""
    def starts(flags: list[str]) -> subprocess.CompletedProcess:
        """JAX started with ``flags`` in a subprocess."""
        return subprocess.run(
            [sys.executable, "-c", "import jax; print(jax.devices())"], capture_output=True,
            text=True, env=dict(env, XLA_FLAGS=" ".join(flags)), timeout=180, check=False)

    kept, dropped, start_error = [], [], None
    base = starts(flags_in)
    if base.returncode != 0:  # every stage will fail and say why; flags untested
        start_error = " | ".join((base.stdout + base.stderr).strip().splitlines()[-3:])
        log(f"set-up: JAX DOES NOT START: {start_error}")
        kept = list(extra)
    else:
        log(f"set-up: jax devices: {base.stdout.strip()}")
        for flag in extra:
            ok = starts(flags_in + kept + [flag]).returncode == 0
            (kept if ok else dropped).append(flag)
    return kept, dropped, start_error


def worker_env(opts: dict) -> tuple[dict, dict]:
    """(the workers' environment, the set-up's record for gpu_suite.json); logs both."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    # One device is what the suite measures: drop fake CPU devices from a caller's flags.
    flags_in = [f for f in env.get("XLA_FLAGS", "").split()
                if "xla_force_host_platform_device_count" not in f]
    if opts["dry_run"]:
        env["JAX_PLATFORMS"] = "cpu"
    kept, dropped, start_error = _probe_flags(env, flags_in, opts["xla_flags"].split())
    env["XLA_FLAGS"] = " ".join(flags_in + kept)
    info = {"xla_flags": env["XLA_FLAGS"], "xla_flags_dropped": dropped,
            "jax_start_error": start_error,
            "python": sys.version.split()[0], "platform": platform.platform(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "load_average_start": list(os.getloadavg()), "nvidia_smi": nvidia_smi(),
            "git": git_commit(), "pythonpath": env["PYTHONPATH"]}
    log(f"set-up: XLA_FLAGS={env['XLA_FLAGS']!r}"
        + (f" (dropped, unknown to this XLA: {' '.join(dropped)})" if dropped else ""))
    log(f"set-up: {info['cpu_count']} CPU cores ({info['cpu']}), load average "
        f"{info['load_average_start']}")
    log("set-up: nvidia-smi:\n" + info["nvidia_smi"])
    return env, info
