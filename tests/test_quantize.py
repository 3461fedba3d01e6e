"""INT8 quantization (retinanet/quantize.py): calibration inputs, which layers get QDQ, metadata, accuracy, errors."""

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from retinanet.cli import main
from retinanet.export import OnnxDetector, export_onnx
from retinanet.modeling import build_model
from retinanet.quantize import CalibrationImages, calibration_files, load_exported, quantize_onnx

from conftest import tiny_config

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 9, "name": "bird"}]
HEADS = ["*cls_subnet.predictor*", "*box_subnet.predictor*"]


def _images(folder, sizes, seed=0):
    """Synthetic calibration images: smooth random blobs (not white noise), as PNG files -> their arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for i, (h, w) in enumerate(sizes):
        small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        array = np.array(Image.fromarray(small).resize((w, h), Image.BILINEAR))
        Image.fromarray(array).save(folder / f"{i:03d}.png")
        arrays.append(array)
    return arrays


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random RetinaNet exported (torchscript exporter: fast), calibration images, and the INT8 file
    with the heads' last convolutions kept float."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("quantize")
    cfg = tiny_config(num_classes=3)
    model = build_model(cfg).eval()
    with torch.no_grad():  # a head whose outputs vary (a fresh one is nearly constant): errors are visible
        model.head.cls_subnet.predictor.weight.normal_(std=0.5)
        model.head.box_subnet.predictor.weight.normal_(std=0.5)
    path = tmp / "model.onnx"
    export_onnx(model, cfg, CATEGORIES, str(path), exporter="torchscript")
    arrays = _images(tmp / "calib", [(120, 160), (128, 128), (150, 100), (96, 200)])
    int8 = tmp / "model.int8.onnx"
    report = quantize_onnx(path, tmp / "calib", int8, exclude=HEADS)
    return model, path, int8, report, tmp, arrays


def _producer_ops(graph) -> dict:
    return {out: n.op_type for n in graph.node for out in n.output}


def test_qdq_around_the_quantized_convs_and_none_on_the_excluded(exported):
    model, path, int8, report, _, _ = exported
    graph = onnx.load(str(int8)).graph
    producer = _producer_ops(graph)
    consumers = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n.op_type)
    convs = [n for n in graph.node if n.op_type == "Conv"]
    fp32_convs = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    assert len(convs) == len(fp32_convs)  # every conv is still there
    weights_of = {}
    for n in convs:  # a quantized conv reads its weight through DequantizeLinear: find the float name
        w = n.input[1]
        if producer.get(w) == "DequantizeLinear":
            dq = next(m for m in graph.node if w in m.output)
            w = dq.input[0]
        weights_of[n.name] = w
    excluded = [n for n in convs if "predictor" in weights_of[n.name]]
    quantized = [n for n in convs if n not in excluded]
    assert len(excluded) == 10  # 2 predictors x 5 levels (the head is shared across levels)
    for n in quantized:  # input, weight dequantized; output quantized: onnxruntime makes it an integer conv
        assert producer[n.input[0]] == "DequantizeLinear" and producer[n.input[1]] == "DequantizeLinear", n.name
        assert consumers[n.output[0]] == ["QuantizeLinear"], n.name
    for n in excluded:  # float weight (an initializer), float output
        assert n.input[1] not in producer and n.input[1] in {t.name for t in graph.initializer}
        assert "QuantizeLinear" not in consumers[n.output[0]]
    assert sorted(report.kept_float) == ["model.head.box_subnet.predictor.weight",
                                         "model.head.cls_subnet.predictor.weight"]
    assert len(report.quantized) == len(set(weights_of.values())) - 2
    # the anchors stay float: nothing quantized on their way to the outputs (they read the feature maps' shapes only)
    for out in graph.output:
        if out.name.startswith("anchors"):
            assert _upstream_ops(graph, out.name).isdisjoint({"QuantizeLinear", "DequantizeLinear"}), out.name


def _upstream_ops(graph, tensor: str) -> set:
    """The op types that compute `tensor`'s values (not through Shape, which reads dimensions only)."""
    producers = {o: n for n in graph.node for o in n.output}
    ops, todo, seen = set(), [tensor], set()
    while todo:
        t = todo.pop()
        if t in producers and t not in seen:
            seen.add(t)
            ops.add(producers[t].op_type)
            if producers[t].op_type != "Shape":
                todo += list(producers[t].input)
    return ops


def test_metadata_survives_and_onnx_detector_runs_the_int8_file(exported):
    model, path, int8, report, _, arrays = exported
    meta = {p.key: p.value for p in onnx.load(str(int8)).metadata_props}
    original = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    for key, value in original.items():
        assert meta[key] == value
    stored = json.loads(meta["retinanet.quantization"])
    assert stored["calibration_images"] == 4 and stored["settings"]["per_channel"] is True
    detector = OnnxDetector(str(int8), classes=["dog"])
    assert detector.categories == CATEGORIES and detector.model.min_size == model.min_size
    det = detector(arrays[0])
    assert det.image_size == arrays[0].shape[:2] and set(det.category_ids.tolist()) <= {5}


def test_int8_head_outputs_close_to_fp32(exported, tmp_path):
    """The raw head outputs on an image not used for calibration, INT8 vs fp32: correlation > 0.99 and the
    largest error under 10% of the outputs' spread. A quantization calibrated on black images (activation
    ranges far too small: everything saturates) fails the same check, so the check can fail."""
    model, path, int8, _, tmp, _ = exported
    image = _images(tmp_path / "test", [(140, 180)], seed=7)[0]
    batch = model.preprocess([torch.from_numpy(image).permute(2, 0, 1)])
    fp32 = OnnxDetector(str(path)).network(batch)

    def agreement(file) -> tuple:
        out = OnnxDetector(str(file)).network(batch)
        stats = []
        for a, b in zip(fp32[:2], out[:2]):  # cls_logits, box_deltas
            a, b = a.numpy().ravel(), b.numpy().ravel()
            stats.append((np.corrcoef(a, b)[0, 1], np.abs(a - b).max() / (a.max() - a.min())))
        for a, b in zip(fp32[2:], out[2:]):  # anchors: float, untouched
            assert torch.equal(a, b)
        return stats

    good = agreement(int8)
    for corr, rel in good:
        assert corr > 0.99 and rel < 0.10, (corr, rel)
    black = tmp_path / "black"
    black.mkdir()
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(black / "0.png")
    bad = tmp_path / "bad.int8.onnx"
    quantize_onnx(path, black, bad, exclude=HEADS)
    worse = agreement(bad)
    assert any(corr < 0.99 or rel > 0.10 for corr, rel in worse)


def test_calibration_reader_feeds_the_models_own_preprocessing(exported):
    model, path, _, _, tmp, arrays = exported
    _, session, meta_model, _ = load_exported(path)
    files = calibration_files(tmp / "calib", 3)
    assert [f.name for f in files] == ["000.png", "001.png", "002.png"]  # the first N by name
    reader = CalibrationImages(files, session, meta_model)
    feeds = [reader.get_next() for _ in range(3)]
    assert reader.get_next() is None
    for feed, array in zip(feeds, arrays):
        expected = model.preprocess([torch.from_numpy(array).permute(2, 0, 1)]).tensor
        assert list(feed) == ["images"] and feed["images"].dtype == np.float32
        assert np.array_equal(feed["images"], expected.numpy())
    reader.rewind()
    assert np.array_equal(reader.get_next()["images"], feeds[0]["images"])


def test_calibration_from_a_coco_json(exported):
    _, _, _, _, tmp, _ = exported
    gt = {"images": [{"id": 1, "file_name": "002.png"}, {"id": 2, "file_name": "000.png"}], "annotations": [],
          "categories": []}
    (tmp / "calib.json").write_text(json.dumps(gt))  # next to a folder named like it: calib/
    assert [f.name for f in calibration_files(tmp / "calib.json", 5)] == ["002.png", "000.png"]
    assert [f.name for f in calibration_files(tmp / "calib.json", 1, image_dir=tmp / "calib")] == ["002.png"]


def test_bad_inputs_are_one_line_errors(exported, tmp_path, capsys):
    _, path, int8, _, tmp, _ = exported
    calib = str(tmp / "calib")
    out = str(tmp_path / "out.onnx")

    def error(*argv) -> str:
        assert main(["quantize", *argv]) == 1
        return capsys.readouterr().err.strip()

    assert error("--onnx", str(path), "--calibration-images", str(tmp_path / "nope"), "--output", out) == \
        f"error: calibration images not found: {tmp_path / 'nope'} (give a folder of images or a COCO JSON)"
    (tmp_path / "empty").mkdir()
    assert "the folder is empty" in error("--onnx", str(path), "--calibration-images", str(tmp_path / "empty"),
                                          "--output", out)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("hello")
    msg = error("--onnx", str(path), "--calibration-images", str(tmp_path / "texts"), "--output", out)
    assert "no image files in" in msg and "found notes.txt" in msg
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_text("not a png")
    msg = error("--onnx", str(path), "--calibration-images", str(tmp_path / "broken"), "--output", out)
    assert msg.startswith(f"error: {tmp_path / 'broken' / 'a.png'}: cannot read image")
    ckpt = tmp_path / "model.pt"
    torch.save({"not": "onnx"}, ckpt)
    assert "not an ONNX model" in error("--onnx", str(ckpt), "--calibration-images", calib, "--output", out)
    assert "already quantized" in error("--onnx", str(int8), "--calibration-images", calib, "--output", out)
    assert "is the input model" in error("--onnx", str(path), "--calibration-images", calib, "--output", str(path))
    assert error("--onnx", str(path), "--calibration-images", calib, "--output", out, "--num-calibration", "0") == \
        "error: the number of calibration images must be >= 1, got 0"
    assert not (tmp_path / "out.onnx").exists()


def test_cli_writes_a_file_onnx_detector_runs(exported, tmp_path, capsys):
    _, path, _, _, tmp, arrays = exported
    out = tmp_path / "cli.int8.onnx"
    assert main(["quantize", "--onnx", str(path), "--calibration-images", str(tmp / "calib"), "--output", str(out),
                 "--num-calibration", "2", "--exclude", "*box_subnet.predictor*"]) == 0
    err = capsys.readouterr().err
    assert "calibrated on 2 images" in err and "kept float: model.head.box_subnet.predictor.weight" in err
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["retinanet.quantization"])["settings"]["exclude"] == ["*box_subnet.predictor*"]
    assert len(OnnxDetector(str(out)).network(
        OnnxDetector(str(out)).model.preprocess([torch.from_numpy(arrays[1]).permute(2, 0, 1)]))) == 7


def test_end_to_end_graph_calibrates_on_raw_images_and_keeps_decoding_and_nms_float(exported, tmp_path):
    """The end-to-end graph (input `image` (H, W, 3) uint8; resize, normalization, decoding and NMS inside):
    the reader feeds the decoded image itself; only the network's layers get QDQ; the INT8 file runs."""
    import onnxruntime

    from retinanet.export import export_end_to_end
    from retinanet.quantize import BETWEEN_OPS, WEIGHTED_OPS

    model, _, _, _, tmp, arrays = exported
    cfg = tiny_config(num_classes=3)
    path = tmp_path / "e2e.onnx"
    export_end_to_end(model, cfg, CATEGORIES, str(path))
    _, session, meta_model, _ = load_exported(path)
    assert meta_model is None  # no preprocessing outside the graph
    reader = CalibrationImages(calibration_files(tmp / "calib", 2), session)
    feed = reader.get_next()
    assert list(feed) == ["image"] and np.array_equal(feed["image"], arrays[0])

    int8 = tmp_path / "e2e.int8.onnx"
    quantize_onnx(path, tmp / "calib", int8, num_images=2, exclude=HEADS)
    graph = onnx.load(str(int8)).graph
    producer = _producer_ops(graph)
    network = set(WEIGHTED_OPS) | set(BETWEEN_OPS) | {"QuantizeLinear", "DequantizeLinear", "Shape"}  # Shape: dims only
    readers_of_dq = {n.op_type for n in graph.node if any(producer.get(i) == "DequantizeLinear" for i in n.input)}
    assert readers_of_dq <= network, readers_of_dq - network  # decoding, NMS, preprocessing: float inputs
    assert {"NonMaxSuppression", "Exp"} <= {n.op_type for n in graph.node}
    assert sum(n.op_type == "Conv" and producer.get(n.input[1]) == "DequantizeLinear" for n in graph.node) > 0

    feed = {"image": arrays[3], "score_threshold": np.array(0.0, np.float32)}  # a random head's scores are low
    fp32 = onnxruntime.InferenceSession(str(path)).run(None, feed)
    out = onnxruntime.InferenceSession(str(int8)).run(None, feed)
    assert [(a.dtype, a.shape[1:]) for a in out] == [(a.dtype, a.shape[1:]) for a in fp32]
    assert len(fp32[1]) > 0 and abs(float(out[1][0]) - float(fp32[1][0])) < 0.1 * float(fp32[1][0])


def test_input_forms_from_the_graph_signature():
    """Which inputs the reader makes, from the graph's inputs alone (onnxruntime's NodeArg: name, type, shape)."""
    from types import SimpleNamespace

    from retinanet.quantize import graph_input_form

    def session(*inputs):
        return SimpleNamespace(get_inputs=lambda: [SimpleNamespace(name=n, type=t, shape=s) for n, t, s in inputs])

    assert graph_input_form(session(("images", "tensor(float)", ["B", 3, "H", "W"]))) == "network"
    assert graph_input_form(session(("images", "tensor(float)", ["B", 3, "H", "W"]),
                                    ("image_sizes", "tensor(int64)", ["B", 2]))) == "network"
    assert graph_input_form(session(("image", "tensor(uint8)", ["H", "W", 3]))) == "image"
    assert graph_input_form(session(("images", "tensor(uint8)", ["B", "H", "W", 3]))) == "images"
    with pytest.raises(ValueError, match=r"unknown ONNX input signature \(x tensor\(float\) \[1, 3\]\)"):
        graph_input_form(session(("x", "tensor(float)", [1, 3])))
    reader = CalibrationImages([], session(("images", "tensor(uint8)", ["B", "H", "W", 3])))
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert np.array_equal(reader.feed(image)["images"], image[None])
