"""`retinanet <command> ...`: one entry point, one module per subcommand under retinanet/commands/.

Each command module defines `register(subparsers)`, which adds its parser and sets `func(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module; the module's register() gives the help text and flags.
COMMANDS = {
    "smoke": "retinanet.commands.smoke",
    "train": "retinanet.commands.train",
    "demo": "retinanet.commands.demo",
    "eval": "retinanet.commands.eval",
    "predict": "retinanet.commands.predict",
    "export": "retinanet.commands.export",
    "quantize": "retinanet.commands.quantize",
    "convert": "retinanet.commands.convert",
    "check-data": "retinanet.commands.check_data",
    "convert-data": "retinanet.commands.convert_data",
    "ablate": "retinanet.commands.ablate",
    "analyze": "retinanet.commands.analyze",
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="retinanet",
        description="Detection and segment proposals: train, evaluate, predict with, export any model.arch: "
                    "retinanet (RetinaNet), faster_rcnn (FPN Faster R-CNN), deepmask, sharpmask, fpn_masks "
                    "(class-agnostic segment proposals, scored by recall).")
    parser.add_argument("--version", action="version", version=f"retinanet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    # key=value overrides may come after options (`ablate SWEEP --output D k=v`): argparse leaves
    # positionals that follow an option unparsed, so they are collected here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"error: {_one_problem(e)}", file=sys.stderr)
        return 1
    except OSError as e:  # what the system refused (a full disk, a permission): one line, naming the file
        print(f"error: {e}", file=sys.stderr)
        return 1


def _one_problem(error: Exception) -> str:
    """The message of a user error; a dataset check (`DataValidationError`: a header, then one line per
    problem) that found one problem says it in one line, its hint kept."""
    problems = getattr(error, "errors", None)
    if not isinstance(problems, list) or len(problems) != 1:
        return str(error)
    last = str(error).splitlines()[-1]
    return f"{problems[0]}{' ' + last if last.startswith('(') else ''}"


if __name__ == "__main__":
    sys.exit(main())
