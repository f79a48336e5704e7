"""Validation Dice against training minutes, for several finished (or running) run folders.

Accuracy per compute: how far a run gets in 15, 30, 60 minutes of this machine. Reads each
workdir's ``metrics.jsonl`` (``epoch_seconds`` summed, so start-up and test evaluation are not
counted), prints the Dice reached at each mark and draws one plot with every run:

    python benchmarks/dice_by_minute.py runs/hippocampus_3d runs/hippocampus_2d runs/hc18_planned \
        --out=docs/figures/dice_by_minute.png
"""

import argparse
import json
import pathlib


def curve(workdir: pathlib.Path) -> list[tuple[float, float]]:
    """(minutes of training so far, validation Dice) after every epoch of the run."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (is {workdir} a run folder?)")
    points, seconds = [], 0.0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{number}: not JSON ({e})") from None
        if "val_dice" in row:
            seconds += row.get("epoch_seconds", 0.0)
            points.append((seconds / 60, row["val_dice"]))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", type=pathlib.Path)
    parser.add_argument("--marks", default="15,30,60", help="minutes at which to report the Dice")
    parser.add_argument("--out", type=pathlib.Path, help="PNG to write (optional)")
    args = parser.parse_args()
    marks = [float(m) for m in args.marks.split(",")]
    curves = {str(w): curve(w) for w in args.workdirs}
    print("| run | " + " | ".join(f"val Dice at {m:g} min" for m in marks) + " | last epoch |")
    print("|---|" + "---|" * (len(marks) + 1))
    for name, points in curves.items():
        reached = []
        for mark in marks:  # best Dice of the epochs finished by then (the checkpoint kept as best)
            done = [d for t, d in points if t <= mark]
            ended = not points or points[-1][0] < mark  # the run stopped before this mark
            reached.append("n/a" if not done or ended else f"{max(done):.3f}")
        last = f"{points[-1][1]:.3f} at {points[-1][0]:.1f} min" if points else "n/a"
        print(f"| {name} | " + " | ".join(reached) + f" | {last} |")
    if args.out:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415

        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name, points in curves.items():
            ax.plot([t for t, _ in points], [d for _, d in points], marker="o", ms=3, label=name)
        ax.set_xlabel("training minutes (validation included)")
        ax.set_ylabel("validation Dice (mean over classes)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=120)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
