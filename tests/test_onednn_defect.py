"""oneDNN's channels_last 1x1 strided backward-weights kernel writes out of bounds for < 16 input channels
(heap corruption on AMD Zen 4: uxlfoundation/oneDNN#6035). The package keeps such convolutions NCHW.

Each check runs in a subprocess, so a crash is a failed test rather than the end of the test run, and
with ONEDNN_VERBOSE=1, so that the kernel oneDNN picks is checked on every CPU (the defect corrupts the
heap only on some; the kernel is picked on all AVX2 / AVX-512 CPUs).
"""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from retinanet.optimize import onednn_unsafe_channels_last, to_channels_last
from tests.conftest import tiny_config

SCRIPT = textwrap.dedent("""
    import sys, torch
    from retinanet.modeling import build_model
    from retinanet.optimize import to_channels_last
    from tests.conftest import tiny_config, train_steps
    torch.set_num_threads(2)
    # the issue's reproduction, through the package's conversion
    for cin, cout in ((8, 16), (4, 16)):
        conv = to_channels_last(torch.nn.Conv2d(cin, cout, 1, stride=2, bias=False))
        x = torch.randn(2, cin, 48, 48).to(memory_format=torch.channels_last).requires_grad_()
        for _ in range(50):
            conv(x).sum().backward()
    # a tiny RetinaNet (ResNet downsample convs with 8 input channels) trained channels_last
    torch.manual_seed(0)
    model = to_channels_last(build_model(tiny_config()).train())
    images = [torch.rand(3, 96, 96) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([1])}] * 2
    train_steps(model, images, targets, steps=3)
    # and with FrozenBatchNorm2d folded into the convs (train.fold_frozen_bn)
    from retinanet.optimize import fold_frozen_bn_for_training
    model = to_channels_last(build_model(tiny_config(backbone_norm="frozen_bn")).train())
    assert fold_frozen_bn_for_training(model) == 20
    train_steps(model, images, targets, steps=3)
    print("done")
""")

# Without the workaround: one strided 1x1 conv, `cin` input channels -> 16, trained channels_last. Each
# channel count in a process of its own: a hang loses the process's buffered output.
PROBE = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(2)
    cin = int(sys.argv[1])
    conv = torch.nn.Conv2d(cin, 16, 1, stride=2, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(2, cin, 48, 48).to(memory_format=torch.channels_last).requires_grad_()
    print("probe started", flush=True)
    for _ in range(50):
        conv(x).sum().backward()
    print("done", flush=True)
""")
PROBE_SECONDS = 8  # the probe runs in ~2 s; the defect shows as a crash or a hang (AMD Zen 3: 4 -> 16 hangs)

# onednn_verbose,...,convolution,<impl>,backward_weights,src:f32::blocked:<layout>:...,<problem>,<ms>
VERBOSE_LINE = re.compile(r"convolution,(jit_1x1:[^,]+),backward_weights,src:\w+::blocked:(\w+):.*?"
                          r"mb\d+_ic(\d+)oc\d+_ih\d+oh\d+kh1sh(\d+)")


def _run(args: list, timeout: float) -> tuple:
    """Run `python -c args...` with oneDNN's verbose log -> (return code or None if it hung, stdout,
    stderr, the defective kernel's calls seen: (impl, layout, in channels, stride))."""
    env = dict(os.environ, ONEDNN_VERBOSE="1", PYTHONPATH=os.getcwd())
    try:
        proc = subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True, env=env,
                              timeout=timeout, cwd=os.getcwd())
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as hung:  # killed; what it had flushed is kept
        rc = None
        out, err = (x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (hung.stdout, hung.stderr))
    unsafe = [m.groups() for m in VERBOSE_LINE.finditer(out)
              if m.group(2) == "acdb" and int(m.group(3)) < 16 and int(m.group(4)) > 1]
    return rc, out, err, unsafe


def _onednn_verbose_works() -> bool:
    return torch.backends.mkldnn.is_available()


@pytest.mark.skipif(not _onednn_verbose_works(), reason="torch built without oneDNN")
def test_training_channels_last_never_runs_the_defective_kernel():
    rc, out, err, unsafe = _run([SCRIPT], timeout=240)  # ~10 s; a hang here is the defect reached
    assert rc is not None, f"hung (killed after 240 s): {err[-2000:]}"
    assert rc == 0, f"crashed (rc {rc}): {err[-2000:]}"
    assert "done" in out
    assert unsafe == [], f"oneDNN ran its defective kernel: {unsafe[:3]}"


@pytest.mark.skipif(not _onednn_verbose_works(), reason="torch built without oneDNN")
def test_plain_channels_last_does_pick_the_defective_kernel():
    """The check above can fail: without the workaround oneDNN picks the kernel, and on some CPUs crashes
    or hangs in it (a hang or crash is the defect reproduced, not a failure of this test)."""
    runs = {cin: _run([PROBE, str(cin)], timeout=PROBE_SECONDS) for cin in (8, 4)}
    for cin, (rc, out, err, _) in runs.items():
        assert "probe started" in out, f"{cin} -> 16: the probe never started (rc {rc}): {err[-2000:]}"
    if any(rc != 0 for rc, *_ in runs.values()):
        return  # crashed or hung in the kernel
    if not any("jit_1x1" in out for _, out, _, _ in runs.values()):
        pytest.skip("this CPU's oneDNN has no jit_1x1 kernel (no AVX2/AVX-512)")
    assert any(unsafe for *_, unsafe in runs.values())


def test_unsafe_layers_are_exactly_the_small_strided_1x1_convs():
    assert onednn_unsafe_channels_last(torch.nn.Conv2d(8, 16, 1, stride=2))
    assert onednn_unsafe_channels_last(torch.nn.Conv2d(15, 32, 1, stride=2))
    assert not onednn_unsafe_channels_last(torch.nn.Conv2d(16, 32, 1, stride=2))  # a full channel block
    assert not onednn_unsafe_channels_last(torch.nn.Conv2d(8, 16, 1, stride=1))  # no reduce-to-unit-stride
    assert not onednn_unsafe_channels_last(torch.nn.Conv2d(8, 16, 3, stride=2))  # another kernel


def test_workaround_keeps_the_model_results_and_the_rest_channels_last():
    from retinanet.modeling import build_model

    torch.manual_seed(0)
    model = build_model(tiny_config()).train()
    reference = build_model(tiny_config()).train()
    reference.load_state_dict(model.state_dict())
    notices = []
    to_channels_last(model, log=notices.append)
    downsample = model.backbone.layer2[0].downsample[0]
    assert downsample.weight.stride() == (8, 1, 1, 1) and model.backbone.conv1.weight.is_contiguous(
        memory_format=torch.channels_last)
    assert len(notices) == 1 and "stay NCHW" in notices[0]
    images = [torch.rand(3, 96, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([1])}]
    ours, theirs = model(images, targets), reference(images, targets)
    for key in theirs:
        assert torch.allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-6)
    sum(ours.values()).backward()
    sum(theirs.values()).backward()
    assert torch.allclose(downsample.weight.grad, reference.backbone.layer2[0].downsample[0].weight.grad,
                          rtol=1e-3, atol=1e-6)
