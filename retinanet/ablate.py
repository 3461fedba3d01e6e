"""`retinanet ablate`: rerun the papers' ablations on any dataset.

A sweep file (YAML) is a base config plus a list of settings, each a set of config overrides, and
a seed list:

    name: table1b_gamma
    title: "Table 1b: varying gamma for FL (with its best alpha)"
    profiles:                      # the base config per profile; `--profile` picks one
      small: {base: demo, overrides: {train.iterations: 300}}
      paper: {base: paper, overrides: {}}
    seeds: [0, 1, 2]
    metrics: [AP, AP50, AP75, APs, APm, APl]
    settings:
      - {name: "gamma=0, alpha=.75", overrides: {loss.gamma: 0, loss.alpha: 0.75}}
      - ...

`base: demo` is the demo's config (retinanet/configs/demo.yaml) on the generated shapes dataset;
`base: paper` is the paper's RetinaNet-50 (the config defaults); the name of another shipped config
(retinanet/configs/NAME.yaml, e.g. faster_rcnn_shapes) is that config; any other value is a YAML
path. A setting may carry its own `base` (one value, or one per profile: {small: ..., paper: ...}),
which replaces the profile's for that setting (the profile's overrides still apply): that is how
`one_vs_two_stage` compares two detectors. A setting with `init_from: NAME` starts each seed's run
from the final weights of the same seed's run of the earlier setting NAME (`retinanet train
--weights`): a second training stage, as SharpMask's refinement on top of DeepMask.
Data paths come from the base or from `--data KEY=VALUE` overrides (data.train_json=...). A config
with none gets a generated shapes dataset (`retinanet ablate` fills it in: the demo's by default); a
profile may name which one:

      small: {base: demo, dataset: {variant: dense, num_train: 2000, num_val: 500}, overrides: {...}}

variant: a name in retinanet/data/synthetic.py VARIANTS (demo, dense); num_train, num_val (default:
the demo's), image_size (default: the variant's), seed (default 0). It is checked at start-up.

Each (setting, seed) is one run in DIR/runs/<setting>-seed<k>/, with its checkpoints and a
result.json. A run whose result.json says "ok" or "diverged" is skipped on restart; a "failed" run
is tried again. With `reuse` (other sweeps' output folders), a run whose config is identical to a
finished run there (the FL baseline appears in six sweeps) copies that run's result instead of
training again; its result.json names the source. DIR/results.md (the papers' layout: mean +-
spread over seeds) and results.json are rewritten after every run.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

from .config import ConfigError, apply_override, config_from_dict, read_yaml

SWEEPS_DIR = Path(__file__).resolve().parent / "sweeps"
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
DEMO_CONFIG = CONFIGS_DIR / "demo.yaml"
DEFAULT_METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
FINAL = ("ok", "diverged")
DATASET_KEYS = ("variant", "num_train", "num_val", "image_size", "seed")


def dataset_spec(spec, where: str) -> dict:
    """A profile's `dataset` mapping, checked -> {"variant", "num_train", "num_val", "image_size", "seed"}
    (num_train, num_val None: the preparer's defaults). ConfigError (one line, starting with `where`)
    for unknown keys or bad values."""
    from .data.synthetic import VARIANTS

    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: dataset must be a mapping with keys {', '.join(DATASET_KEYS)}, got {spec!r}")
    unknown = sorted(set(map(str, spec)) - set(DATASET_KEYS))
    if unknown:
        raise ConfigError(f"{where}: dataset: unknown key(s) {', '.join(unknown)} (known: {', '.join(DATASET_KEYS)})")
    variant = spec.get("variant", "demo")
    if variant not in VARIANTS:
        raise ConfigError(f"{where}: dataset: unknown variant {variant!r} (variants: {', '.join(VARIANTS)})")
    shapes, image_size = VARIANTS[variant]
    out = {"variant": variant, "num_train": None, "num_val": None, "image_size": image_size, "seed": 0}
    for key in ("num_train", "num_val", "image_size", "seed"):
        if key in spec:
            value, least = spec[key], 0 if key == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{where}: dataset: {key} must be an integer >= {least}, got {value!r}")
            out[key] = value
    try:
        shapes.check(out["image_size"])
    except ValueError as e:
        raise ConfigError(f"{where}: dataset: {e}") from None
    return out


def find_sweep(name_or_path: str) -> Path:
    """A sweep by path, or by the name of a shipped sweep (retinanet/sweeps/NAME.yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = SWEEPS_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(s.stem for s in SWEEPS_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"sweep not found: {name_or_path} (shipped sweeps: {names})")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text.replace("*", "star")).strip("_") or "setting"


def _override_strings(overrides) -> list:
    """{key: value} or ["key=value"] -> ["key=value"] with values written as YAML."""
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    if isinstance(overrides, list) and all(isinstance(o, str) for o in overrides):
        return list(overrides)
    raise ConfigError(f"overrides must be a mapping or a list of key=value strings, got {overrides!r}")


def base_config_dict(base: str, sweep_path: Path) -> dict:
    if base == "demo":
        return read_yaml(str(DEMO_CONFIG))
    if base == "paper":
        return {}
    if (CONFIGS_DIR / f"{base}.yaml").is_file():
        return read_yaml(str(CONFIGS_DIR / f"{base}.yaml"))
    path = Path(base)
    if not path.is_absolute():
        path = sweep_path.parent / path
    return read_yaml(str(path))


def expand_sweep(sweep_path: str, profile: str = "small", extra_overrides: Optional[list] = None,
                 seeds: Optional[list] = None, only: Optional[list] = None) -> list:
    """The runs of a sweep: [{"setting", "seed", "run_id", "config": Config}], in file order; with
    "dataset": the profile's dataset spec (`dataset_spec`) when it has one.
    only: setting names (or their folder names) to keep; the others are left out.

    Every config is built (and so checked) here, before anything trains: a typo in the last
    setting is an error at start-up, not after hours of training.
    """
    path = find_sweep(sweep_path)
    sweep = read_yaml(str(path))
    unknown = set(sweep) - {"name", "title", "profiles", "seeds", "metrics", "settings", "notes"}
    if unknown:
        raise ConfigError(f"{path}: unknown sweep keys: {', '.join(sorted(unknown))}")
    profiles = sweep.get("profiles") or {}
    if profile not in profiles:
        raise ConfigError(f"{path}: no profile '{profile}' (has: {', '.join(profiles) or 'none'})")
    prof = profiles[profile]
    if not isinstance(prof, dict):
        raise ConfigError(f"{path}: profile '{profile}' must be a mapping (base, dataset, overrides)")
    dataset = dataset_spec(prof["dataset"], f"{path}: profile '{profile}'") if "dataset" in prof else None

    def profile_config(base_name: str) -> dict:
        data = base_config_dict(base_name, path)
        for item in _override_strings(prof.get("overrides")):
            apply_override(data, item)
        for item in extra_overrides or []:
            apply_override(data, item)
        return data

    base = profile_config(str(prof.get("base", "paper")))
    settings = sweep.get("settings") or []
    if not settings:
        raise ConfigError(f"{path}: no settings")
    if only:
        names = {str(x.get("name")) for x in settings if isinstance(x, dict)}
        unknown = [o for o in only if o not in names and o not in {slug(n) for n in names}]
        if unknown:
            raise ConfigError(f"{path}: no setting named {', '.join(map(repr, unknown))} "
                              f"(settings: {', '.join(map(repr, sorted(names)))})")
        settings = [x for x in settings if x.get("name") in only or slug(str(x.get("name"))) in only]
    seeds = list(seeds if seeds is not None else sweep.get("seeds", [0]))
    runs, seen = [], set()
    for i, setting in enumerate(settings):
        if not isinstance(setting, dict) or "name" not in setting:
            raise ConfigError(f"{path}: setting {i} needs a name")
        if slug(setting["name"]) in seen:
            raise ConfigError(f"{path}: two settings are named '{setting['name']}'")
        if setting.get("init_from") is not None and slug(str(setting["init_from"])) not in seen:
            raise ConfigError(f"{path}: setting '{setting['name']}' starts from '{setting['init_from']}', which is "
                              f"not a setting before it")
        seen.add(slug(setting["name"]))
        own_base = setting.get("base")
        if isinstance(own_base, dict):
            own_base = own_base.get(profile)
            if own_base is None:
                raise ConfigError(f"{path}: setting '{setting['name']}' has no base for profile '{profile}'")
        data = profile_config(str(own_base)) if own_base is not None else copy.deepcopy(base)
        try:
            for item in _override_strings(setting.get("overrides")):
                apply_override(data, item)
            for seed in seeds:
                data_seed = copy.deepcopy(data)
                apply_override(data_seed, f"train.seed={int(seed)}")
                cfg = config_from_dict(data_seed)
                run = {"setting": setting["name"], "seed": int(seed),
                       "run_id": f"{slug(setting['name'])}-seed{int(seed)}", "config": cfg}
                if dataset is not None:
                    run["dataset"] = dict(dataset)
                if setting.get("init_from") is not None:
                    run["init_from"] = f"{slug(str(setting['init_from']))}-seed{int(seed)}"
                runs.append(run)
        except ConfigError as e:
            raise ConfigError(f"{path}: setting '{setting['name']}': {e}") from None
    return runs


def sweep_info(sweep_path: str) -> dict:
    sweep = read_yaml(str(find_sweep(sweep_path)))
    return {"name": sweep.get("name", Path(sweep_path).stem), "title": sweep.get("title", ""),
            "metrics": list(sweep.get("metrics", DEFAULT_METRICS)), "notes": sweep.get("notes", "")}


def _default_train(cfg, run_dir: str, weights: Optional[str] = None) -> dict:
    """Train with the engine (resuming a run that was cut off; from `weights` if given) and return its
    validation metrics."""
    from .engine import train

    summary = train(cfg, run_dir, resume="auto", weights=weights, progress=False)
    return summary.get("val") or {}


def run_sweep(sweep_path: str, output: str, *, profile: str = "small", extra_overrides: Optional[list] = None,
              seeds: Optional[list] = None, train_fn: Optional[Callable] = None,
              prepare: Optional[Callable] = None, reuse: Optional[list] = None, only: Optional[list] = None,
              log=print) -> dict:
    """Run every (setting, seed) of a sweep that has not finished; return the aggregated results.

    train_fn(cfg, run_dir) -> metrics dict (default: the engine). A NonFiniteLossError marks the
    run "diverged"; any other exception marks it "failed" with the error, and the sweep goes on.
    prepare(cfg) may fill in data paths (the demo base generates the shapes dataset); for a profile
    with a dataset spec it is called prepare(cfg, spec) (`dataset_spec`).
    reuse: folders of other sweeps whose finished runs with an identical config are copied, not rerun.
    """
    from .config import config_to_dict
    from .engine import NonFiniteLossError

    runs = expand_sweep(sweep_path, profile, extra_overrides, seeds, only)
    info = dict(sweep_info(sweep_path), profile=profile, overrides=list(extra_overrides or []))
    out = Path(output)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    train_fn = train_fn or _default_train
    for n, run in enumerate(runs, 1):
        run_dir = out / "runs" / run["run_id"]
        result_path = run_dir / "result.json"
        previous = _read_result(result_path)
        if previous and previous.get("status") in FINAL:
            log(f"[{n}/{len(runs)}] {run['run_id']}: {previous['status']} (done before, skipped)")
            continue
        cfg = run["config"]
        if prepare is not None:
            if "dataset" in run:
                prepare(cfg, run["dataset"])
            else:
                prepare(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {"setting": run["setting"], "seed": run["seed"], "run_id": run["run_id"],
                  "config": config_to_dict(cfg)}
        source = _find_identical(reuse or [], record["config"])
        if source is not None:
            record.update({k: v for k, v in source[1].items() if k in ("status", "metrics", "error", "seconds")},
                          reused_from=str(source[0]))
            _write_json(result_path, record)
            log(f"[{n}/{len(runs)}] {run['run_id']}: {record['status']} (same config as {source[0]}, reused)")
            write_results(out, runs, info)
            continue
        log(f"[{n}/{len(runs)}] {run['run_id']}: training ...")
        started = time.perf_counter()
        try:
            if run.get("init_from"):  # a second training stage: the same seed's run of an earlier setting
                weights = out / "runs" / run["init_from"] / "final.pt"
                if not weights.is_file():
                    raise FileNotFoundError(f"{weights}: run {run['init_from']}, which this run starts from, has not "
                                            f"finished")
                metrics = train_fn(cfg, str(run_dir), weights=str(weights))
            else:
                metrics = train_fn(cfg, str(run_dir))
            record.update(status="ok", metrics={k: v for k, v in metrics.items() if k != "per_category"})
        except NonFiniteLossError as e:
            record.update(status="diverged", error=str(e))
        except Exception as e:  # recorded; the other runs go on
            record.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=5))
        record["seconds"] = round(time.perf_counter() - started, 1)
        _write_json(result_path, record)
        summary = record.get("metrics", {}).get("AP")
        log(f"[{n}/{len(runs)}] {run['run_id']}: {record['status']}"
            + (f", AP {summary:.3f}" if isinstance(summary, float) else "")
            + (f" ({record['error'][:200]})" if "error" in record else "") + f", {record['seconds']:.0f} s")
        write_results(out, runs, info)
    return write_results(out, runs, info)


def _find_identical(folders: list, config: dict) -> Optional[tuple]:
    """(result path, record) of a finished run in folders/runs/* trained with exactly this config, or None."""
    from .config import as_current

    for folder in folders:
        for path in sorted(Path(folder).glob("runs/*/result.json")):
            rec = _read_result(path)
            # a run recorded before a config key was added still matches (as_current fills it in as it meant)
            if rec and rec.get("status") in FINAL and isinstance(rec.get("config"), dict) \
                    and as_current(rec["config"]) == config:
                return path, rec
    return None


def _read_result(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj) -> None:
    from .atomic import atomic_write

    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)


def _mean_std(values: list) -> tuple:
    """(mean, sample standard deviation; 0 for one value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def aggregate(records: list, settings: list, metrics: list) -> list:
    """Per setting (in sweep order): mean and spread (sample std; 0 for one seed) of each metric over
    its finished runs, with counts of diverged and failed runs; and "paired": the first metric's
    difference from the first setting, seed by seed (same seed, same initialization and data order),
    mean and spread over the seeds both finished: a far smaller spread than the metric's own."""
    rows, first_metric = [], {}  # first_metric[setting]: {seed: value of metrics[0]}
    for name in settings:
        mine = [r for r in records if r["setting"] == name]
        ok = [r for r in mine if r.get("status") == "ok"]
        row = {"setting": name, "runs": len(mine), "ok": len(ok),
               "diverged": sum(r.get("status") == "diverged" for r in mine),
               "failed": sum(r.get("status") == "failed" for r in mine),
               "pending": sum(r.get("status") is None for r in mine), "mean": {}, "std": {}}
        for m in metrics:
            values = [(r.get("seed"), r["metrics"][m]) for r in ok if isinstance(r["metrics"].get(m), (int, float))]
            if values:
                row["mean"][m], row["std"][m] = _mean_std([v for _, v in values])
            if m == metrics[0]:
                first_metric[name] = dict(values)
        rows.append(row)
    if rows and metrics:
        base = first_metric[settings[0]]
        for row in rows[1:]:
            mine = first_metric[row["setting"]]
            deltas = [mine[s] - base[s] for s in mine if s in base]
            if deltas:
                mean, std = _mean_std(deltas)
                row["paired"] = {"metric": metrics[0], "mean": mean, "std": std, "seeds": len(deltas)}
    return rows


def _points(metric: str) -> float:
    """AP, AR and AUC metrics (also box_AR...) are fractions shown in points (x100); others (ms_per_image) as
    they are."""
    return 100.0 if metric.removeprefix("box_").startswith(("AP", "AR", "AUC")) else 1.0


def format_table(rows: list, metrics: list) -> str:
    """A markdown table in the papers' layout, AP in points (x100): mean +- spread over seeds, then
    the first metric's paired difference from the first setting."""
    paired = bool(metrics) and len(rows) > 1
    head = "| setting | " + " | ".join(metrics) + (f" | Δ{metrics[0]} (paired) |" if paired else " |") + " runs |"
    lines = [head, "|" + "---|" * (len(metrics) + 2 + paired)]
    for i, row in enumerate(rows):
        cells = []
        for m in metrics:
            if m in row["mean"]:
                scale = _points(m)
                spread = f" ± {scale * row['std'][m]:.1f}" if row["ok"] > 1 else ""
                cells.append(f"{scale * row['mean'][m]:.1f}{spread}")
            else:
                cells.append("—")
        if paired:
            d = row.get("paired")
            scale = _points(metrics[0])
            cells.append("(base)" if i == 0 else "—" if d is None else
                         f"{scale * d['mean']:+.1f}" + (f" ± {scale * d['std']:.1f}" if d["seeds"] > 1 else ""))
        status = f"{row['ok']}/{row['runs']} ok"
        if row["diverged"]:
            status += f", {row['diverged']} diverged"
        if row["failed"]:
            status += f", {row['failed']} failed"
        if row["pending"]:
            status += f", {row['pending']} pending"
        lines.append(f"| {row['setting']} | " + " | ".join(cells) + f" | {status} |")
    return "\n".join(lines)


def write_results(out: Path, runs: list, info: dict) -> dict:
    records = []
    for run in runs:
        rec = _read_result(out / "runs" / run["run_id"] / "result.json")
        records.append(rec or {"setting": run["setting"], "seed": run["seed"], "run_id": run["run_id"], "status": None})
    settings = list(dict.fromkeys(r["setting"] for r in runs))
    rows = aggregate(records, settings, info["metrics"])
    how = f"Profile `{info.get('profile', 'small')}`" + (
        f", with {' '.join(f'`{o}`' for o in info['overrides'])}" if info.get("overrides") else "")
    md = [f"# {info['title'] or info['name']}", "",
          "COCO AP and AR in points (x 100; ms_per_image in ms) on the validation set: mean ± sample standard "
          "deviation over seeds; "
          "the paired column is each setting's difference from the first one, seed by seed (same seed: same "
          "initialization and data order), mean ± standard deviation.",
          f"{how}.", "",
          format_table(rows, info["metrics"]), ""]
    problems = [r for r in records if r.get("status") in ("diverged", "failed")]
    if problems:
        md += ["Runs that did not finish:", ""]
        md += [f"- {r['run_id']}: {r['status']}: {r.get('error', '')[:300]}" for r in problems]
        md.append("")
    if info.get("notes"):
        md += [str(info["notes"]).strip(), ""]
    from .atomic import atomic_write

    with atomic_write(out / "results.md", "w") as f:
        f.write("\n".join(md))
    result = {"sweep": info["name"], "title": info["title"], "profile": info.get("profile"),
              "overrides": info.get("overrides", []), "metrics": info["metrics"], "settings": rows, "runs": records}
    _write_json(out / "results.json", result)
    return result
