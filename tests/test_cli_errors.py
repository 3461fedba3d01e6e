"""Every `retinanet` subcommand on wrong inputs (a missing file, the wrong kind of file or checkpoint, a
config typo): one error line that names what is wrong, a non-zero exit, no traceback, nothing written."""

from __future__ import annotations

import pytest
import torch
import yaml

from retinanet.checkpoint import make_checkpoint, save_atomic
from retinanet.cli import COMMANDS, main
from retinanet.modeling import build_model

from conftest import tiny_config, tiny_deepmask_config

SHAPES = ["rectangle", "ellipse", "triangle", "cross"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Names -> paths of the files the cases below get wrong: a tiny shapes dataset, a RetinaNet's
    final.pt (weights only), a DeepMask checkpoint, a torchvision state dict, an ONNX-like file, a text
    file, a config with a typo, invalid YAML, and paths that do not exist."""
    from retinanet.data.synthetic import make_shapes_dataset

    root = tmp_path_factory.mktemp("wrong-inputs")
    shapes = make_shapes_dataset(str(root / "shapes"), num_train=2, num_val=2, image_size=64, seed=1)
    cfg = tiny_config(num_classes=4)
    save_atomic(make_checkpoint(build_model(cfg), cfg, [{"id": i + 1, "name": n} for i, n in enumerate(SHAPES)]),
                str(root / "final.pt"))
    deepmask = tiny_deepmask_config()
    save_atomic(make_checkpoint(build_model(deepmask), deepmask, [{"id": 1, "name": "object"}]),
                str(root / "deepmask.pt"))
    torch.save({"conv.weight": torch.zeros(2)}, root / "torchvision.pth")  # a state dict, not ours
    (root / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")  # the first bytes of an ONNX protobuf
    (root / "notes.txt").write_text("my notes\n")
    data = {"train_json": str(shapes.train_json), "train_images": str(shapes.train_images),
            "val_json": str(shapes.val_json), "val_images": str(shapes.val_images), "num_workers": 0,
            "batch_size": 2}
    (root / "tiny.yaml").write_text(yaml.safe_dump({"model": {"backbone": "resnet18", "backbone_width": 8,
                                                              "min_size": 64, "max_size": 64},
                                                    "data": data, "train": {"device": "cpu", "iterations": 1}}))
    (root / "typo.yaml").write_text("train:\n  iteratons: 3\n")
    (root / "bad.yaml").write_text("train: [iterations: 3\nmodel: {}\n")
    return {"gt": str(shapes.val_json), "images": str(shapes.val_images), "final": str(root / "final.pt"),
            "deepmask": str(root / "deepmask.pt"), "torchvision": str(root / "torchvision.pth"),
            "onnx": str(root / "model.onnx"), "text": str(root / "notes.txt"), "tiny": str(root / "tiny.yaml"),
            "typo": str(root / "typo.yaml"), "bad_yaml": str(root / "bad.yaml"), "missing": str(root / "missing"),
            "missing_json": str(root / "missing.json"), "missing_pt": str(root / "missing.pt")}


DATA = ("--json", "{gt}", "--images", "{images}")
# (command line, text the error line must hold); {name}: a path of `inputs`, {new}: a path that must stay absent
CASES = [
    ("smoke --backbone resnet5", "unknown backbone 'resnet5'"),
    ("smoke --num-classes 0", "--num-classes must be at least 1, got 0"),
    ("smoke --size 0 64", "--size must be at least 1 x 1 pixels, got 0 x 64"),
    ("train {missing}.yaml --output {new}", "config file not found: {missing}.yaml"),
    ("train {typo} --output {new}", "unknown config key 'train.iteratons' (did you mean 'iterations'?)"),
    ("train {tiny} iteratons=3 --output {new}", "unknown config key 'iteratons' (did you mean 'train.iterations'?)"),
    ("train {bad_yaml} --output {new}",
     "{bad_yaml}: invalid YAML at line 2, column 6: while parsing a flow sequence; expected ',' or ']', but got ':'"),
    ("train {final} --output {new}", "{final}: not a YAML text file"),
    ("train {tiny} --resume {final} --output {new}", "{final}: weights only"),
    ("train {tiny} --resume {missing_pt} --output {new}", "checkpoint not found: {missing_pt}"),
    ("train {tiny} --weights {onnx} --output {new}", "{onnx}: not a readable checkpoint: not a torch.save file"),
    ("train {tiny} --weights {deepmask} --output {new}", "{deepmask}: none of its 86 tensors fit this model "
                                                        "(model.arch retinanet): a checkpoint of another kind of model?"),
    ("demo --config nope --output {new}", "--config nope: neither a shipped config"),
    ("demo iteratons=3 --output {new} --data-dir {new}-data", "did you mean 'train.iterations'?"),
    ("demo --config {final} --output {new} --data-dir {new}-data", "{final}: not a YAML text file"),
    ("demo --minutes 0 --output {new} --data-dir {new}-data", "--minutes must be positive, got 0"),
    ("eval --gt {missing_json} --results {gt}", "{missing_json}: file not found"),
    ("eval --gt {gt} --results {final}", "{final}: not a valid JSON file"),
    ("eval --checkpoint {onnx} " + " ".join(DATA), "{onnx}: not a readable checkpoint: not a torch.save file"),
    ("eval --checkpoint {torchvision} " + " ".join(DATA), "{torchvision}: not a retinanet checkpoint"),
    ("eval --checkpoint {deepmask} " + " ".join(DATA), "{deepmask}: a segment proposal model (model.arch deepmask"),
    ("eval --checkpoint {final} --json {missing_json} --images {images}", "{missing_json}: annotation file not found"),
    ("eval --gt {gt} --results {gt} --backend pycocotool", "argument --backend: invalid choice: 'pycocotool'"),
    ("eval --checkpoint {final} " + " ".join(DATA) + " --batch-size 0", "--batch-size must be >= 1"),
    ("predict {missing}.png --checkpoint {final}", "{missing}.png: no such file or folder"),
    ("predict {images} --checkpoint {onnx}", "{onnx}: not a readable checkpoint: not a torch.save file"),
    ("predict {images} --checkpoint {deepmask} --tta", "does not apply to segment proposals"),
    ("predict {images} --checkpoint {final} --score-threshold 5", "--score-threshold must be in [0, 1], got 5"),
    ("export --checkpoint {missing_pt} --output {new}", "checkpoint not found: {missing_pt}"),
    ("export --checkpoint {torchvision} --output {new}", "{torchvision}: not a retinanet checkpoint"),
    ("export --checkpoint {text} --output {new}", "{text}: not a readable checkpoint: not a torch.save file"),
    ("convert {missing_pt} {new} --from torchvision", "PyTorch weights file not found: {missing_pt}"),
    ("convert {final} {new} --from torchvision", "{final}: no 'head.classification_head.cls_logits.bias'"),
    ("convert {text} {new} --from torchvision", "{text}: not a readable PyTorch weights file"),
    ("ablate nope --output {new}", "sweep not found: nope"),
    ("ablate table1b_gamma --output {new} iteratons=3", "did you mean 'train.iterations'?"),
    ("ablate table1b_gamma --output {new} --profile smal", "no profile 'smal' (has: small, paper)"),
    ("ablate {final} --output {new}", "{final}: not a YAML text file"),
    ("analyze loss-cdf --output {new} " + " ".join(DATA), "analyze loss-cdf needs --checkpoint"),
    ("analyze iou --output {new} --checkpoint {final} --max-images 0 " + " ".join(DATA),
     "--max-images must be >= 1, got 0"),
    ("analyze loss-cdf --output {new} --checkpoint {deepmask} " + " ".join(DATA),
     "{deepmask} is a deepmask model; Figure 6's anchor losses need a RetinaNet"),
    ("analyze iou --output {new} --checkpoint {deepmask} " + " ".join(DATA),
     "{deepmask} is a segment proposal model (model.arch deepmask)"),
    ("analyze iou --output {new} --checkpoint {final} --json {missing_json} --images {images}",
     "{missing_json}: annotation file not found"),
    ("check-data --json {missing_json} --images {images}", "{missing_json}: annotation file not found"),
    ("check-data --json {final} --images {images}", "{final}: cannot read the annotation file"),
    ("check-data --json {gt} --images {missing}", "{missing}: image folder not found"),
    ("convert-data --from yolo {missing} --output {new}", "image folder not found: {missing}"),
    # outputs that cannot be written (under a file): refused at start-up, not after the work
    ("train {tiny} --output {text}/run", "--output {text}/run: {text} is a file, not a folder"),
    ("demo --output {text}/demo --data-dir {new}-data", "--output {text}/demo: {text} is a file, not a folder"),
    ("eval --gt {gt} --results {gt} --output {text}/m.json", "--output {text}/m.json: {text} is a file, not a folder"),
    ("eval --checkpoint {final} " + " ".join(DATA) + " --save-results {text}/dt.json",
     "--save-results {text}/dt.json: {text} is a file, not a folder"),
    ("predict {images} --checkpoint {final} --output {text}/dt.json",
     "--output {text}/dt.json: {text} is a file, not a folder"),
    ("predict {images} --checkpoint {final} --save-images {text}/drawn",
     "--save-images {text}/drawn: {text} is a file, not a folder"),
    ("export --checkpoint {final} --output {text}/m.onnx", "--output {text}/m.onnx: {text} is a file, not a folder"),
    ("quantize --onnx {onnx} --calibration-images {images} --output {new}", "{onnx}: not an ONNX model (no graph)"),
    ("quantize --onnx {final} --calibration-images {images} --output {new}", "{final}: not an ONNX model"),
    ("quantize --onnx {onnx} --calibration-images {images} --output {text}/m.onnx",
     "--output {text}/m.onnx: {text} is a file, not a folder"),
    ("convert {torchvision} {text}/c.pt --from torchvision", "{text}/c.pt: {text} is a file, not a folder"),
    ("convert-data --from voc {images} --output {text}/c.json", "--output {text}/c.json: {text} is a file, not a folder"),
    ("analyze curves --output {text}/figures", "--output {text}/figures: {text} is a file, not a folder"),
    ("ablate table1b_gamma --output {text}/sweep", "--output {text}/sweep: {text} is a file, not a folder"),
]


# a GPU asked for on a machine without one
NO_GPU_CASES = [
    ("predict {images} --checkpoint {final} --device cuda", "device cuda asked for (--device, train.device), "
                                                           "but no CUDA GPU is available"),
    ("eval --checkpoint {final} " + " ".join(DATA) + " --device cuda", "no CUDA GPU is available"),
]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


def test_the_cases_cover_every_command():
    assert {case.split()[0] for case, _ in CASES} == set(COMMANDS)


@pytest.mark.parametrize("command, expected", [pytest.param(*case, id=case[0]) for case in CASES]
                         + [pytest.param(*case, id=case[0], marks=NO_GPU) for case in NO_GPU_CASES])
def test_wrong_input_is_one_error_line_and_a_non_zero_exit(inputs, tmp_path, command, expected, capsys):
    paths = dict(inputs, new=str(tmp_path / "new"))
    argv = [part.format(**paths) for part in command.split()]
    try:
        code = main(argv)  # any exception but SystemExit fails the test with its traceback
    except SystemExit as e:  # argparse: usage, then one error line, exit 2
        code = e.code
    out, err = capsys.readouterr()
    assert code not in (0, None) and "Traceback" not in out + err
    # check-data prints its report (one "error:" line per problem) to stdout; the others print errors to stderr
    lines = [line for line in (out if argv[0] == "check-data" else err).splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines)
              if line.startswith("error: ") or f"retinanet {argv[0]}: error: " in line]
    assert len(errors) == 1, lines
    assert expected.format(**paths) in lines[errors[0]]
    if argv[0] != "check-data":  # after the error line only its own list of problems ("  - ..."), no dump
        assert all(line.startswith("  - ") for line in lines[errors[0] + 1:]), lines
    assert not (tmp_path / "new").exists() and not (tmp_path / "new-data").exists()  # nothing written
