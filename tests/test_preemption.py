"""A run killed at random points (SIGKILL, also inside checkpoint saves) or preempted
(SIGTERM), then started again with the same command, ends exactly where an
uninterrupted run ends: same metrics, same test table, same parameters (the epoch
resumed mid-way reports the mean train loss of the steps since its resume)."""

import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from medseg_jax import checkpoint as ckpt_lib
from medseg_jax import sharding
from medseg_jax import state as state_lib

ROOT = Path(__file__).resolve().parents[1]
STEPS, EPOCHS = 3, 4
LAST = STEPS * EPOCHS
ARGS = [
    f"--config={ROOT / 'configs' / 'unet.py'}",
    "--config.data.synthetic_cases=3", "--config.data.synthetic_size=16",
    "--config.data.synthetic_depth=4", "--config.data.image_size=(16,16)",
    "--config.model.base_features=4", "--config.model.depth=3",
    "--config.train.batch_size=4", f"--config.train.num_epochs={EPOCHS}",
    f"--config.train.steps_per_epoch={STEPS}", "--config.train.log_every_steps=1",
    "--config.train.patience=0", "--config.eval.batch_size=4",
    f"--config.train.compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}",
]
TMP = ".orbax-checkpoint-tmp"


def _start(workdir, **faults):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env.update(faults)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fault_runner.py"), f"--workdir={workdir}",
         *ARGS], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def _finish(proc, head=""):
    out, err = proc.communicate(timeout=300)
    return proc.returncode, head + err


def _signal_after_step(workdir, step, sig, delay):
    """Sends ``sig`` ``delay`` s after the run logs ``step`` (or lets it end)."""
    proc, head = _start(workdir), []
    for line in proc.stderr:
        head.append(line)
        logged = re.search(r" step (\d+)/\d+ loss", line)
        if logged and int(logged.group(1)) >= step:
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(sig)
            break
    return _finish(proc, "".join(head))


def _complete(workdir):
    ckpt = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def _epoch_rows(workdir):
    rows = [json.loads(r) for r in open(Path(workdir) / "metrics.jsonl")]
    keys = ("step", "epoch", "train_loss", "val_loss", "val_dice", "val_dice_per_class")
    return [tuple(str(r[k]) for k in keys) for r in rows if "val_loss" in r], \
        {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if "loss" in r}, rows


def _final_state(workdir, config):
    mesh = sharding.make_mesh()
    model = state_lib.build_model(config, 2)
    abstract = state_lib.abstract_state(config, model, (4, 16, 16, 1), 1, mesh)
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    state, _ = ck.restore(ck.resolve("latest"), abstract)
    ck.close()
    return state


def test_killed_and_preempted_run_resumes_to_the_uninterrupted_result(make_tiny_config,
                                                                       tmp_path):
    seed = int(os.environ.get("MEDSEG_KILL_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    reference, workdir = tmp_path / "reference", tmp_path / "killed"
    rc, err = _finish(_start(reference))
    assert rc == 0, err[-3000:]

    interruptions = []

    def in_save(kind, step):  # SIGKILL inside the save of `step`: never picked up
        before = _complete(workdir)
        rc, err = _finish(_start(workdir, MEDSEG_KILL_IN_SAVE=f"{kind}:{step}"))
        assert rc == -signal.SIGKILL, (seed, err[-3000:])
        assert (workdir / "checkpoints" / f"{step}{TMP}").is_dir()
        assert _complete(workdir) == before and step not in before
        interruptions.append(f"SIGKILL {kind} of step {step}")
        return err

    def sigterm_at(step):  # a mid-epoch checkpoint of exactly that step, then exit 143
        rc, err = _finish(_start(workdir, MEDSEG_SIGNAL_AT_STEP=f"{signal.SIGTERM}:{step}"))
        assert rc == 143, (seed, err[-3000:])
        assert f"medseg_jax: stopped: SIGTERM: saved the checkpoint of step {step} " in err
        assert max(_complete(workdir)) == step
        interruptions.append(f"SIGTERM at step {step}")

    def sigkill_after_random_step():
        latest = max(_complete(workdir), default=0)
        if latest + 2 > LAST - 1:  # a resumed run logs from its second step on
            return
        rc, err = _signal_after_step(workdir, rng.randint(latest + 2, LAST - 1), signal.SIGKILL,
                                  rng.uniform(0.0, 0.05))
        if rc != 0:  # else it finished first
            assert rc == -signal.SIGKILL, (seed, err[-3000:])
            interruptions.append(f"SIGKILL after step {max(_complete(workdir), default=0)}")

    in_save("write", STEPS)  # the very first save: the next run starts from scratch
    stop = rng.randint(1, LAST - STEPS - 1)
    sigterm_at(stop)
    err = in_save("rename", (stop // STEPS + 1) * STEPS)
    assert f"Resumed from the checkpoint of step {stop} " in err
    sigkill_after_random_step()
    rc, err = _finish(_start(workdir))
    assert rc == 0, (seed, interruptions, err[-3000:])
    assert len(interruptions) >= 3, (seed, interruptions)

    epochs_ref, steps_ref, _ = _epoch_rows(reference)
    epochs, steps, rows = _epoch_rows(workdir)
    # The epoch resumed mid-way: its train loss is the mean over the steps since the
    # resume at `stop` (the step alone resumes a run), as the reference took them.
    end = (stop // STEPS + 1) * STEPS
    assert [(r["step"], r["train_loss_steps"]) for r in rows if "train_loss_steps" in r] \
        == ([(end, end - stop)] if stop % STEPS else []), (seed, interruptions)
    if stop % STEPS:  # (a SIGTERM at an epoch's last step stops after its checkpoint)
        since = np.float32([steps_ref[s][0] for s in range(stop + 1, end + 1)])
        epochs_ref = [(*r[:2], str(float(np.mean(since))), *r[3:]) if r[0] == str(end)
                      else r for r in epochs_ref]
    assert epochs == epochs_ref, (seed, interruptions)
    assert len(steps) == len([r for r in rows if "loss" in r])  # no step logged twice
    assert {s: steps_ref[s] for s in steps} == steps, (seed, interruptions)
    tables = [json.loads((d / "test_metrics.json").read_text()) for d in (reference, workdir)]
    assert tables[0]["per_case"] == tables[1]["per_case"]
    assert tables[0]["aggregate"] == tables[1]["aggregate"]
    config = make_tiny_config()
    a, b = _final_state(reference, config), _final_state(workdir, config)
    assert int(a.step) == int(b.step) == LAST
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    print(f"seed {seed}: {'; '.join(interruptions)}")
