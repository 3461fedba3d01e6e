"""Validation AP against iterations and against training seconds, for every run of a `retinanet ablate`
output folder (issue 23: `one_vs_two_stage_schedules`, each run evaluating along its schedule).

    python tools/schedule_curves.py ABLATE_OUTPUT [--output docs/ablations/figures/schedules.png] [--metric AP]
                                   [--mean-over-seeds] [--seconds-seed K]

One line per run (setting, seed): colour by detector (the setting's name without its trailing
schedule, "RetinaNet (FL) 2x" -> "RetinaNet (FL)"), line style by schedule. With --mean-over-seeds,
one line per setting: the mean over its seeds at each evaluation, shaded from the lowest to the
highest seed. Training seconds are only comparable between runs that had the machine to themselves:
--seconds-seed K takes every setting's seconds axis from its seed K run (the others' values, at the
same iterations, are still averaged). Also prints the curves as a table, so the figure's numbers can be read.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_curve(metrics_jsonl: Path, metric: str = "AP") -> list:
    """[(iteration, training seconds, value)] of the validation records of a run's metrics.jsonl; the
    seconds are the record's train_s, the run's time without the evaluations before it."""
    curve = []
    for line in metrics_jsonl.read_text().splitlines():
        record = json.loads(line)
        if "val" in record and record["val"].get(metric) is not None:
            curve.append((record["iteration"], record["train_s"], record["val"][metric]))
    return curve


def mean_curves(runs: list, seconds_seed=None) -> list:
    """[(detector, schedule, seed, curve)] -> [(detector, schedule, seeds, [(iteration, seconds, mean, low,
    high)])]: per (detector, schedule), the mean, lowest and highest value over its seeds at each
    iteration that every seed evaluated; seconds: the mean over seeds, or seed `seconds_seed`'s."""
    groups = {}
    for detector, schedule, seed, curve in runs:
        groups.setdefault((detector, schedule), {})[seed] = {it: (sec, v) for it, sec, v in curve}
    out = []
    for (detector, schedule), by_seed in groups.items():
        iterations = sorted(set.intersection(*(set(c) for c in by_seed.values())))
        rows = []
        for it in iterations:
            values = [c[it][1] for c in by_seed.values()]
            if seconds_seed is not None and seconds_seed in by_seed:
                seconds = by_seed[seconds_seed][it][0]
            else:
                seconds = sum(c[it][0] for c in by_seed.values()) / len(by_seed)
            rows.append((it, seconds, sum(values) / len(values), min(values), max(values)))
        out.append((detector, schedule, sorted(by_seed), rows))
    return out


def split_setting(setting: str) -> tuple:
    """"RetinaNet (FL) 2x" -> ("RetinaNet (FL)", "2x"); a name without a schedule suffix -> (name, "1x")."""
    match = re.fullmatch(r"(.*\S)\s+(\d+x)", setting)
    return (match.group(1), match.group(2)) if match else (setting, "1x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ablate_output", type=Path)
    p.add_argument("--output", type=Path, default=Path("docs/ablations/figures/schedules.png"))
    p.add_argument("--metric", default="AP")
    p.add_argument("--mean-over-seeds", action="store_true", help="one line per setting: mean over its seeds, "
                                                                  "shaded from the lowest to the highest")
    p.add_argument("--seconds-seed", type=int, help="with --mean-over-seeds: the seconds axis from this seed's runs")
    args = p.parse_args(argv)
    from retinanet.plots import _new_figure, _save_atomic

    runs = []
    for result_file in sorted(args.ablate_output.glob("runs/*/result.json")):
        result = json.loads(result_file.read_text())
        metrics = result_file.parent / "metrics.jsonl"
        if result.get("status") != "ok" or not metrics.is_file():
            continue
        detector, schedule = split_setting(result["setting"])
        runs.append((detector, schedule, result["seed"], run_curve(metrics, args.metric)))
    if not runs:
        print(f"{args.ablate_output}: no finished run with a metrics.jsonl", file=sys.stderr)
        return 1
    detectors = sorted({r[0] for r in runs})
    styles = {s: ls for s, ls in zip(sorted({r[1] for r in runs}, key=lambda s: int(s[:-1])), ["-", "--", ":", "-."])}
    fig = _new_figure(11.0, 4.0)
    by_iter, by_time = fig.subplots(1, 2)
    if args.mean_over_seeds:
        for detector, schedule, seeds, rows in mean_curves(runs, args.seconds_seed):
            color = f"C{detectors.index(detector)}"
            label = f"{detector} {schedule} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})"
            its, secs = [r[0] for r in rows], [r[1] for r in rows]
            for ax, x in ((by_iter, its), (by_time, secs)):
                ax.plot(x, [r[2] for r in rows], styles[schedule], color=color, marker=".",
                        label=label if ax is by_iter else None)
                ax.fill_between(x, [r[3] for r in rows], [r[4] for r in rows], color=color, alpha=0.15, linewidth=0)
            print(f"{label}: " + ", ".join(f"{i} it / {s:.0f} s: {m:.3f} [{lo:.3f}, {hi:.3f}]"
                                           for i, s, m, lo, hi in rows))
    else:
        for detector, schedule, seed, curve in runs:
            color = f"C{detectors.index(detector)}"
            label = f"{detector} {schedule} seed {seed}"
            by_iter.plot([c[0] for c in curve], [c[2] for c in curve], styles[schedule], color=color, marker=".",
                         label=label)
            by_time.plot([c[1] for c in curve], [c[2] for c in curve], styles[schedule], color=color, marker=".")
            print(f"{label}: " + ", ".join(f"{i} it / {s:.0f} s: {v:.3f}" for i, s, v in curve))
    by_iter.set_xlabel("iteration")
    by_time.set_xlabel("training seconds (evaluations excluded)")
    for ax in (by_iter, by_time):
        ax.set_ylabel(f"validation {args.metric}")
        ax.grid(alpha=0.3)
    by_iter.legend(fontsize=7)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(fig, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
