"""Copy the tables of finished `retinanet ablate` sweeps into docs/ablations/.

    python tools/collect_ablations.py RUNS_ROOT [--output docs/ablations]

RUNS_ROOT holds one `retinanet ablate` output folder per sweep (RUNS_ROOT/<sweep>/results.md). For each,
docs/ablations/<sweep>.md is its results.md, and <sweep>.json its results.json without the run configs
and tracebacks (the configs are the sweep file plus the overrides the table names; the checkpoints
stay in RUNS_ROOT).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def slim(result: dict) -> dict:
    runs = []
    for r in result["runs"]:
        run = {k: r[k] for k in ("setting", "seed", "run_id", "status", "metrics", "error", "seconds") if k in r}
        if "reused_from" in r:  # ".../<sweep>/runs/<run>/result.json" -> "<sweep>/<run>"
            parts = Path(r["reused_from"]).parts
            run["reused_from"] = "/".join(parts[-4:-3] + parts[-2:-1])
        runs.append(run)
    return dict({k: v for k, v in result.items() if k != "runs"}, runs=runs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="folder with one ablate output folder per sweep")
    p.add_argument("--output", default="docs/ablations")
    args = p.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    found = sorted(Path(args.root).glob("*/results.json"))
    if not found:
        raise SystemExit(f"no */results.json under {args.root}")
    for path in found:
        name = path.parent.name
        result = json.loads(path.read_text())
        shutil.copyfile(path.parent / "results.md", out / f"{name}.md")
        (out / f"{name}.json").write_text(json.dumps(slim(result), indent=1) + "\n")
        done = sum(r.get("status") in ("ok", "diverged") for r in result["runs"])
        print(f"{name}: {done}/{len(result['runs'])} runs finished -> {out / name}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
