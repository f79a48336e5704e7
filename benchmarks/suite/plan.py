"""The plan of the GPU suite: its stages, the items each one runs (at GPU sizes, or toy
sizes in a dry run) and their time limits. Pure data: no jax, no package import.
"""

from __future__ import annotations

import os

STAGES = ("env", "layers", "throughput", "torch_compare", "pipeline", "time_to_accuracy")
# XLA's fusion autotuner has taken minutes (and crashed) on 3D grids (tue-bmd/zea#599);
# a flag this XLA does not know would abort every process, so each is probed first and
# dropped if refused.
DEFAULT_XLA_FLAGS = "--xla_gpu_experimental_enable_fusion_autotuner=false"

# The dry run checks that every stage works, not how fast: its limits are generous, so a
# slow or loaded CI machine (seen: four times slower than this one) does not turn a
# working stage into a timeout. It takes about two minutes here.
DRY_TOTAL_S, DRY_ENV_S, DRY_ITEM_S = 3000.0, 300.0, 600.0


def throughput_items(dry: bool) -> list[dict]:
    """The train-step cases in priority order: the stage runs them until its time is up."""
    if dry:
        d2 = {"dims": 2, "image_size": [32, 32], "batch": 2, "base": 4, "depth": 3}
        d3 = {"dims": 3, "image_size": [16, 16, 16], "batch": 1, "base": 4, "depth": 3}
    else:
        d2 = {"dims": 2, "image_size": [256, 256], "batch": 32, "base": 32, "depth": 4}
        d3 = {"dims": 3, "image_size": [128, 128, 128], "batch": 2, "base": 32, "depth": 4}
    order = [  # (model, dims, dtype, layer_impl)
        ("unet", d2, "bfloat16", "auto"), ("unet", d3, "bfloat16", "auto"),
        ("unet", d2, "bfloat16", "lax"), ("unet", d2, "bfloat16", "reshape"),
        ("unet", d3, "bfloat16", "lax"), ("unet", d3, "bfloat16", "reshape"),
        ("unet", d2, "float32", "auto"), ("fcn", d2, "bfloat16", "auto"),
        ("attention_unet", d2, "bfloat16", "auto"), ("unet", d3, "float32", "auto"),
        ("fcn", d3, "bfloat16", "auto"), ("attention_unet", d3, "bfloat16", "auto"),
    ]
    if dry:  # every model, both dims, both dtypes and all three layer_impl values
        order = [order[i] for i in (0, 3, 2, 8)] + [("fcn", d3, "float32", "auto")]
    items = []
    for model, geo, dtype, impl in order:
        item_id = f"{model}-{geo['dims']}d-{'bf16' if dtype == 'bfloat16' else 'fp32'}-{impl}"
        items.append(dict(geo, id=item_id, model=model, dtype=dtype, impl=impl,
                          limit_s=(DRY_ITEM_S if dry else (100 if geo["dims"] == 2 else 170)),
                          group="all" if dry else item_id))  # GPU: a process per case
    return items


def layer_items(dry: bool) -> list[dict]:
    """The layers stage's cases: the throughput shapes (2D and 3D), bfloat16 then float32."""
    geo = throughput_items(dry)
    d2 = next(g for g in geo if g["dims"] == 2)
    d3 = next(g for g in geo if g["dims"] == 3)
    items = []
    for geo_, dtype in ((d2, "bfloat16"), (d3, "bfloat16"), (d2, "float32"), (d3, "float32")):
        if dry and dtype == "float32":
            continue
        items.append({"id": f"{geo_['dims']}d-{'bf16' if dtype == 'bfloat16' else 'fp32'}",
                      "dims": geo_["dims"], "dtype": dtype, "image_size": geo_["image_size"],
                      "batch": geo_["batch"], "base": geo_["base"], "depth": geo_["depth"],
                      "limit_s": DRY_ITEM_S if dry else 60, "group": "all"})
    return items


def torch_items(dry: bool) -> list[dict]:
    """The torch_compare stage's two runs of benchmarks/torch_compare.py (their flags)."""
    if dry:
        net = ["--base_features=4", "--depth=3", "--image_size=32", "--batch_size=2",
               "--rounds=1", "--steps=1", "--warmup=0", "--device=cpu"]
        backend = "--torch_compile_backend=aot_eager"  # the path, without C++ code generation
    else:
        net = ["--base_features=32", "--depth=4", "--image_size=256", "--batch_size=32",
               "--rounds=3", "--steps=5", "--warmup=2", "--device=cuda"]
        backend = "--torch_compile_backend=inductor"
    return [
        {"id": "eager", "limit_s": DRY_ITEM_S if dry else 100, "group": "all",
         "args": net + ["--jax_variants=float32,bfloat16",
                        "--torch_variants=eager,channels_last,channels_last_bf16"]},
        # torch.compile apart: its compilation can be long; JAX bf16 again (from the
        # persistent compilation cache) for a ratio measured in the same process.
        {"id": "compile", "limit_s": DRY_ITEM_S if dry else 120, "group": "all",
         "args": net + ["--jax_variants=bfloat16", "--torch_variants=compile_bf16", backend]},
    ]


def pipeline_items(dry: bool, opts: dict) -> list[dict]:
    """The pipeline stage's configurations: Hippocampus 2D and 3D, HC18 at a spacing."""
    workers = [0, 2] if dry else [0, max(1, min(8, (os.cpu_count() or 2) // 2))]
    hip, hc18 = opts["hippocampus_root"], opts["hc18_root"]
    if dry:
        return [
            {"id": "hippocampus-2d", "root": hip, "image_size": [32, 32], "batch": 4,
             "in_plane": "resize", "workers": workers, "model": "unet", "base": 4, "depth": 3},
            {"id": "hippocampus-3d", "root": hip, "image_size": [16, 16, 16], "batch": 2,
             "workers": workers[:1], "model": "unet", "base": 4, "depth": 3},
            {"id": "hc18-2d-spacing", "root": hc18, "image_size": [32, 32], "batch": 4,
             "in_plane": "spacing", "target_spacing": [3.0, 3.0], "workers": workers[:1],
             "model": "unet", "base": 4, "depth": 3},
        ]
    tta = time_to_accuracy_overrides(opts, dry)
    return [  # the configurations of docs/results/speed.md: Hippocampus 2D, the 3D run below, HC18 spacing
        {"id": "hippocampus-2d", "root": hip, "image_size": [64, 64], "batch": 16,
         "in_plane": "resize", "workers": workers, "model": "unet", "base": 16, "depth": 4},
        {"id": "hippocampus-3d", "root": hip, "image_size": list(tta["image_size"]),
         "batch": tta["batch"], "workers": workers, "model": "unet", "base": tta["base"],
         "depth": 4, "dtype": tta["dtype"]},
        {"id": "hc18-2d-spacing", "root": hc18, "image_size": [128, 128], "batch": 16,
         "in_plane": "spacing", "target_spacing": [0.75, 0.75], "workers": workers,
         "model": "unet", "base": 16, "depth": 4},
    ]


def time_to_accuracy_overrides(opts: dict, dry: bool) -> dict:
    """The 3D U-Net of the time-to-accuracy run: patch, batch, width, dtype, epoch length."""
    if dry:
        return {"image_size": (16, 16, 16), "batch": 2, "base": 4, "depth": 3,
                "dtype": "float32", "steps_per_epoch": 3}
    # nnU-Net's Hippocampus 3D patch (40, 56, 40); batch 8 (nnU-Net: 9), bf16.
    return {"image_size": (40, 56, 40), "batch": 8, "base": 32, "depth": 4,
            "dtype": "bfloat16", "steps_per_epoch": 100}


def make_plan(opts: dict) -> dict:
    """Stages, their items and time limits: env a fixed 30 s on a GPU (``DRY_ENV_S`` in a
    dry run), the selected others their nominal shares scaled to what is left of
    ``total_s``."""
    dry = opts["dry_run"]
    env_limit = DRY_ENV_S if dry else 30.0
    nominal = dict(zip(STAGES[1:], (40, 120, 120, 90, 90) if dry else (40, 170, 110, 70, 120)))
    items = {
        "env": [{"id": "versions", "limit_s": env_limit, "group": "all"}],
        "layers": layer_items(dry),
        "throughput": throughput_items(dry),
        "torch_compare": torch_items(dry),
        "pipeline": [dict(it, limit_s=DRY_ITEM_S if dry else 70, group="all")
                     for it in pipeline_items(dry, opts)],
        "time_to_accuracy": [{"id": "unet-3d-hippocampus", "limit_s": 10_000, "group": "all",
                              **time_to_accuracy_overrides(opts, dry)}],
    }
    selected = [s for s in STAGES[1:] if s in opts["stages"]]
    scale = max(0.0, opts["total_s"] - env_limit) / max(1, sum(nominal[s] for s in selected))
    limits = {"env": env_limit, **{s: nominal[s] * scale for s in selected}}
    return {"options": opts,
            "stages": {s: {"limit_s": limits[s], "items": items[s]}
                       for s in STAGES if s in opts["stages"]}}
