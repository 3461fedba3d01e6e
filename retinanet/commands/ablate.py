"""`retinanet ablate SWEEP --output DIR`: one model per setting and seed of a sweep, then the papers' tables."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("ablate", help="rerun a paper ablation (a sweep of settings x seeds, any model.arch) and "
                                      "tabulate its metrics (COCO AP, or AR for segment proposals)",
                       description=__doc__)
    from ..ablate import SWEEPS_DIR

    shipped = ", ".join(sorted(path.stem for path in SWEEPS_DIR.glob("*.yaml")))
    p.add_argument("sweep", help=f"a sweep YAML file, or the name of a shipped sweep ({shipped})")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="folder for the runs and results.md/results.json; rerun with the same folder to resume")
    p.add_argument("--profile", default="small", help="small (2-core CPU, minutes per run; default) or paper (GPUs)")
    p.add_argument("--seeds", type=seed_list, metavar="S[,S...]", help="override the sweep's seed list, e.g. 0,1,2")
    p.add_argument("--data-dir", metavar="DIR",
                   help="where the shapes dataset is generated (profiles without data paths; default: the cache, one "
                        "folder per dataset)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="applied to every run, e.g. data.train_json=... or train.iterations=100")
    p.add_argument("--reuse", action="append", default=[], metavar="DIR",
                   help="output folder of another sweep (repeatable): runs with an identical config are copied from "
                        "there instead of trained again")
    p.add_argument("--only", action="append", metavar="SETTING",
                   help="run only this setting (its name as in the sweep, or its folder name; repeatable)")
    p.add_argument("--list", action="store_true", help="print the runs the sweep expands to and exit")
    p.set_defaults(func=run)


def seed_list(text: str) -> list:
    """'0,1,2' -> [0, 1, 2]."""
    import argparse

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are integers separated by commas, got {text!r}") from None


def shapes_preparer(data_dir=None, num_train=None, num_val=None, image_size=None):
    """Fill in a generated shapes dataset for configs that name no training data: the demo's, or the one
    a sweep profile's dataset spec names (retinanet/ablate.py dataset_spec: variant, sizes, seed; its
    num_train, num_val default to this function's arguments, then to the demo's)."""
    from .demo import DATA_SEED, IMAGE_SIZE, NUM_TRAIN, NUM_VAL

    num_train, num_val, image_size = num_train or NUM_TRAIN, num_val or NUM_VAL, image_size or IMAGE_SIZE
    made = {}  # spec (sorted items) -> ShapesPaths

    def prepare(cfg, dataset=None) -> None:
        if cfg.data.train_json:
            return
        from ..data.synthetic import VARIANTS, make_shapes_dataset

        spec = dataset or {"variant": "demo", "num_train": None, "num_val": None, "image_size": image_size,
                           "seed": DATA_SEED}
        key = tuple(sorted(spec.items()))
        if key not in made:
            made[key] = make_shapes_dataset(data_dir, num_train=spec["num_train"] or num_train,
                                            num_val=spec["num_val"] or num_val, image_size=spec["image_size"],
                                            seed=spec["seed"], shapes=VARIANTS[spec["variant"]][0])
        paths = made[key]
        cfg.data.train_json, cfg.data.train_images = str(paths.train_json), str(paths.train_images)
        cfg.data.val_json, cfg.data.val_images = str(paths.val_json), str(paths.val_images)

    return prepare


def run(args) -> int:
    from ..ablate import expand_sweep, run_sweep
    from . import check_output_path

    check_output_path(args.output, "--output", folder=True)
    if args.list:
        for r in expand_sweep(args.sweep, args.profile, args.overrides, args.seeds, args.only):
            print(r["run_id"])
        return 0
    result = run_sweep(args.sweep, args.output, profile=args.profile, extra_overrides=args.overrides,
                       seeds=args.seeds, prepare=shapes_preparer(args.data_dir), reuse=args.reuse, only=args.only)
    print(f"results: {args.output}/results.md")
    bad = sum(r["failed"] for r in result["settings"])
    return 1 if bad else 0
