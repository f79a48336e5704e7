"""The report: gpu_suite.json's ``summary`` (the faster layer_impl per layer and per model,
the input pipeline's ratios) and gpu_suite.md, one table per stage for docs/results. Reads
the report as the driver keeps it; no jax.
"""

from __future__ import annotations

from suite.plan import throughput_items


def _ok_items(report: dict, stage: str) -> dict:
    """The stage's items whose status is ok."""
    items = report["stages"].get(stage, {}).get("items", {})
    return {k: v for k, v in items.items() if v.get("status") == "ok"}


def _throughput_rows(report: dict) -> dict:
    """The throughput row of each ok case, by item id."""
    return {k: v["rows"][0] for k, v in _ok_items(report, "throughput").items()}


def summarise(report: dict) -> dict:
    """Derived figures: the faster layer_impl per layer and per model, pipeline ratios."""
    out = {}
    layer_win = {}
    for item_id, r in _ok_items(report, "layers").items():
        for layer, t in r["totals"].items():
            layer_win[f"{layer} {item_id}"] = t["winner"]
    out["layer_impl_winner_per_layer"] = layer_win
    rows = _throughput_rows(report)
    model_win = {}
    for item_id in rows:
        if item_id.endswith("-reshape"):
            base = item_id[: -len("-reshape")]
            other = base + "-lax"
            if other in rows:
                a, b = rows[item_id]["step_ms"], rows[other]["step_ms"]
                model_win[base] = {"reshape_ms": a, "lax_ms": b,
                                   "auto_ms": rows.get(base + "-auto", {}).get("step_ms"),
                                   "winner": "reshape" if a < b else "lax",
                                   "lax_over_reshape": b / a}
    out["layer_impl_winner_per_model"] = model_win
    ref = rows.get("unet-2d-bf16-auto")
    pipe = {}
    for item_id, r in _ok_items(report, "pipeline").items():
        best = max(r["host"], key=lambda h: h["images_per_s"])
        pipe[item_id] = {"best_host_images_per_s": best["images_per_s"],
                         "workers": best["workers"],
                         "host_over_step": best["host_over_step"],
                         "host_over_throughput_unet2d_bf16": (
                             best["images_per_s"] / ref["images_per_s"] if ref else None)}
    out["pipeline"] = pipe
    return out


def _f(value, spec: str = ".1f", none: str = "n/a") -> str:
    """``value`` formatted, or ``none`` when it is None."""
    return none if value is None else format(value, spec)


def _status_line(items: dict) -> list[str]:
    """One line per item that is neither ok nor pending: its status and the reason."""
    lines = []
    for item_id, r in items.items():
        if r.get("status") not in ("ok", "pending"):
            lines.append(f"- `{item_id}`: {r.get('status')}"
                         + (f": {r['reason']}" if r.get("reason") else ""))
    return lines


def _header(report: dict) -> list[str]:
    """The title, the command, the machine, the versions and one row per stage."""
    s, setup = report["suite"], report["setup"]
    env = _ok_items(report, "env").get("versions", {})
    v = env.get("versions", {})
    device = env.get("device_kind", "?")
    lines = [f"# GPU suite{' (DRY RUN on the CPU: toy sizes, not figures)' if s['dry_run'] else ''}"
             f": {device}, {s['started'][:10]}", ""]
    lines.append(f"Command: `{s['command']}`; {s.get('elapsed_s', 0):.0f} s of a "
                 f"{s['total_s']:.0f} s budget; {setup.get('cpu_count')} CPU cores "
                 f"({setup.get('cpu')}), load average "
                 f"{_f((setup.get('load_average_start') or [None])[0], '.2f')} at the "
                 f"start; git {setup.get('git')}.")
    if v:
        lines.append("Versions: python " + env.get("python", "?") + ", " + ", ".join(
            f"{k} {val}" for k, val in v.items() if val) + ".")
    lines.append(f"XLA_FLAGS: `{setup.get('xla_flags', '')}`"
                 + (f" (dropped as unknown: `{' '.join(setup['xla_flags_dropped'])}`)"
                    if setup.get("xla_flags_dropped") else "") + ".")
    lines += ["", "| stage | status | seconds | limit s |", "|---|---|---|---|"]
    for name, st in report["stages"].items():
        lines.append(f"| {name} | {st['status']} | {_f(st.get('seconds'), '.0f')} | "
                     f"{_f(st.get('limit_s'), '.0f')} |")
    return lines


def _throughput(report: dict, stage: dict) -> list[str]:
    """Train step throughput per case, then layer_impl compared on the whole step."""
    lines = ["", "## Train step throughput", "",
             "Random batches, the package's jitted `train_step` (on-device augmentation "
             "on, Dice + CE, Adam), one device; medians of device-synchronised steps "
             "after warm-up. Peak MiB: the backend's peak for the process (one process "
             "per case on a GPU); XLA MiB: the compiled step's buffers.", "",
             "| model | dims | input x batch | dtype | layer_impl | compile s | step ms "
             "| images/s | TFLOP/s | MFU | peak MiB | XLA MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    plan_items = {it["id"]: it for it in throughput_items(report["suite"]["dry_run"])}
    for item_id, r in stage["items"].items():
        it = plan_items.get(item_id, {})
        if r.get("status") != "ok":
            continue
        row = r["rows"][0]
        lines.append(
            f"| {it.get('model')} | {it.get('dims')}D | "
            f"{'x'.join(map(str, it.get('image_size', [])))}"
            f" x {it.get('batch')} | {it.get('dtype')} | {it.get('impl')} | "
            f"{row['compile_s']:.1f} | {row['step_ms']:.2f} | {row['images_per_s']:.1f} | "
            f"{_f(row['tflop_per_s'], '.1f')} | "
            f"{_f(row['mfu'] and 100 * row['mfu'], '.1f')}{'%' if row['mfu'] else ''} | "
            f"{_f(row['device_peak_mib'], '.0f')} | {_f(row['compiled_mib'], '.0f')} |")
    lines += _status_line(stage["items"])
    win = report["summary"].get("layer_impl_winner_per_model", {})
    if win:
        lines += ["", "layer_impl, whole train step (`auto` on a GPU: up-conv reshape, "
                  "max pool lax):", "",
                  "| case | auto ms | reshape ms | lax ms | faster | lax / reshape |",
                  "|---|---|---|---|---|---|"]
        for base, w in win.items():
            lines.append(f"| {base} | {_f(w['auto_ms'], '.2f')} | {w['reshape_ms']:.2f} | "
                         f"{w['lax_ms']:.2f} | {w['winner']} | {w['lax_over_reshape']:.2f} |")
    return lines


def _layers(report: dict, stage: dict) -> list[str]:
    """One row per layer and level, then each layer's total, per case."""
    lines = ["", "## Layers alone: layer_impl reshape vs lax", "",
             "Forward + backward of one layer (`jax.grad` of a weighted sum), per U-Net "
             "level of the throughput shapes; ms per call.", "",
             "| case | layer | level | input | reshape ms | lax ms | faster | outputs "
             "differ by |", "|---|---|---|---|---|---|---|---|"]
    for item_id, r in _ok_items(report, "layers").items():
        for row in r["rows"]:
            lines.append(f"| {item_id} | {row['layer']} | {row['level']} | "
                         f"{'x'.join(map(str, row['input']))} | "
                         f"{row['reshape_fwd_bwd_ms']:.3f} | {row['lax_fwd_bwd_ms']:.3f} | "
                         f"{row['winner']} | {row['max_rel_diff']:.1e} |")
        for layer, t in r["totals"].items():
            lines.append(f"| {item_id} | {layer} | all | | {t['reshape']:.3f} | "
                         f"{t['lax']:.3f} | **{t['winner']}** | |")
    return lines + _status_line(stage["items"])


def _torch(report: dict, stage: dict) -> list[str]:
    """Per torch_compare run: the network, the checks, one row per implementation."""
    lines = ["", "## Side by side with PyTorch (`benchmarks/torch_compare.py`)", ""]
    for item_id, r in stage["items"].items():
        if r.get("status") != "ok":
            continue
        net = r.get("network", {})
        lines.append(f"`{item_id}`: U-Net 2D base {net.get('base_features')}, "
                     f"{net.get('image_size')}^2, batch {net.get('batch_size')}; "
                     f"{r['machine'].get('jax_device')} / {r['machine'].get('torch_device')}"
                     f"; torch {r['machine'].get('torch')}; checks: " + "; ".join(
                         f"{c['name']} {'ok' if c['ok'] else 'FAIL'} ({c['text']})"
                         for c in r.get("checks", [])))
        lines += ["", f"| implementation | first step s | ms/step | images/s | "
                  f"{r['reference']} / this |", "|---|---|---|---|---|"]
        for row in r["results"]:
            lines.append(f"| {row['name']} | {_f(r['first_step_s'].get(row['name']))} | "
                         f"{row['step_ms']:.1f} | {row['images_per_s']:.1f} | "
                         f"{row['ref_speed_ratio']:.2f} |")
        for name, note in r.get("notes", {}).items():
            lines.append(f"- {name}: {note}")
        lines.append("")
    return lines + _status_line(stage["items"])


def _pipeline(report: dict, stage: dict) -> list[str]:
    """Host images/s per number of grain workers against the train step's."""
    lines = ["", "## Input pipeline against the train step", "",
             "Host batches from the training loader (`loader.run_batches` + transfer "
             "to the device) with 0 and N grain workers, against the train step of the "
             "same configuration on the device (images/s).", "",
             "| data | config | prepare s | workers | host images/s | step images/s | "
             "host / step | host / U-Net 2D bf16 step (throughput) |",
             "|---|---|---|---|---|---|---|---|"]
    th_ref = _throughput_rows(report).get("unet-2d-bf16-auto")
    notes = []
    for item_id, r in _ok_items(report, "pipeline").items():
        c = r["config"]
        mode = "patches" if c["spatial_dims"] == 3 else c["in_plane"]
        for h in r["host"]:
            ratio = h["images_per_s"] / th_ref["images_per_s"] if th_ref else None
            lines.append(
                f"| {item_id} ({'synthetic' if r['data'] == 'synthetic' else 'real'}) | "
                f"{c['model']} {c['spatial_dims']}D base {c['base']} {c['dtype']}, "
                f"{'x'.join(map(str, c['image_size']))} x {c['batch']}, {mode} | "
                f"{r['prepare_s']:.1f} | {h['workers']} | {h['images_per_s']:,.0f} | "
                f"{r['step_images_per_s']:,.0f} | {h['host_over_step']:.1f}x | "
                f"{_f(ratio, '.1f')}{'x' if ratio else ''} |")
        if r.get("note"):
            notes.append(f"- {item_id}: {r['note']}")
    return lines + notes + _status_line(stage["items"])


def _time_to_accuracy(report: dict, stage: dict) -> list[str]:
    """The command, the time to the target Dice, and the Dice curve."""
    lines = ["", "## Time to accuracy: 3D U-Net on Hippocampus", ""]
    for r in stage["items"].values():
        if r.get("status") != "ok":
            continue
        lines += [f"`{r['command']}`", ""]
        if r["reached"]:
            outcome = (f"**reached in {r['time_to_target_s']:.0f} s** (step "
                       f"{r['steps_to_target']}, wall time from the command's start: data "
                       f"preparation and compilation included)")
        else:
            outcome = (f"not reached within {r['budget_s']:.0f} s "
                       f"(best {_f(r['best_val_dice'], '.4f')})")
        lines.append(f"Target validation Dice {r['target_dice']}: " + outcome
                     + f"; first step (compilation) {_f(r['first_step_s'])} s; stopped: "
                     f"{r['stop']}." + (f" Data: {r['note']}." if r.get("note") else ""))
        lines += ["", "| wall s | step | val Dice | per class | train loss |",
                  "|---|---|---|---|---|"]
        for c in r["curve"]:
            per = ", ".join(f"{d:.3f}" for d in (c.get("val_dice_per_class") or []))
            lines.append(f"| {c['wall_s']:.1f} | {c['step']} | {c['val_dice']:.4f} | "
                         f"{per} | {_f(c.get('train_loss'), '.4f')} |")
    return lines + _status_line(stage["items"])


SECTIONS = (("throughput", _throughput), ("layers", _layers), ("torch_compare", _torch),
            ("pipeline", _pipeline), ("time_to_accuracy", _time_to_accuracy))


def markdown(report: dict) -> str:
    """gpu_suite.md: the header, then a section per stage that ran (in this order)."""
    lines = _header(report)
    for name, section in SECTIONS:
        stage = report["stages"].get(name)
        if stage:
            lines += section(report, stage)
    return "\n".join(lines) + "\n"
