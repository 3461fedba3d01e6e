"""Find host-device synchronizations: the operations that make the CPU wait for the GPU.

On CUDA these block the host until the device has computed their input, so the CPU stops queueing
work and the GPU then idles while the CPU catches up:
- reading a value: `.item()`, `float(t)`, `int(t)`, `if t:` (all `aten._local_scalar_dense`),
  `torch.equal`, `.tolist()`;
- ops whose output shape depends on the data, which must read how many elements they keep:
  `nonzero` (and `torch.where(cond)`, `argwhere`), boolean-mask indexing and assignment
  (`x[mask]`, `x[mask] = v`), `masked_select`, `unique`, `bincount`, `repeat_interleave` without
  `output_size`.
The same ATen ops are dispatched on the CPU, so `SyncRecorder` finds them in a CPU-only run: what
it lists is what would wait for the GPU. Blocking copies between devices (`.cpu()`, `.to("cuda")`
without `non_blocking`) also wait; a CPU-only run has none to see (on a GPU,
`torch.cuda.set_sync_debug_mode("error")` catches those as well, see tests/test_cuda.py).
`to_device` is the copy that does not wait.

Example:
    >>> with SyncRecorder() as syncs:
    ...     losses = model(images, targets); sum(losses.values()).backward()
    >>> syncs.records   # [] when the step never waits for the device
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops that read values back or whose output shape depends on the data (by overload packet name)
SYNCING_OPS = frozenset({
    "_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "unique_dim", "_unique", "_unique2",
    "unique_consecutive", "unique_dim_consecutive", "bincount", "repeat_interleave", "histogramdd",
})
# indexing ops that sync only with a boolean (or uint8) mask among their indices
MASK_INDEXING_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})

_TORCH_DIR = str(Path(torch.__file__).parent)


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """`tensor` on `device`. A copy to an accelerator does not make the host wait (non_blocking:
    asynchronous from pinned memory, staged at once from pageable memory); a copy to the CPU stays
    blocking, since its values are read right after. (non_blocking copies to the CPU also make
    inductor allocate pinned memory, which a machine without an accelerator cannot.)"""
    device = torch.device(device)
    return tensor.to(device, non_blocking=device.type != "cpu")


def _has_mask_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _caller() -> str:
    """'file:line in function' of the innermost frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not frame.filename.startswith(_TORCH_DIR) and frame.filename != __file__:
            return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return "?"


class SyncRecorder(TorchDispatchMode):
    """Records every syncing op dispatched inside the `with` block (this thread and autograd's).

    records: list of (op name, caller), caller being 'file:line in function' of the code that
    issued it (`where=False` skips finding it: faster). `Tensor.tolist` is not an ATen op; it is
    recorded by patching `torch.Tensor.tolist` while the block runs.
    """

    def __init__(self, where: bool = True):
        super().__init__()
        self.where = where
        self.records: list = []
        self._tolist = None

    def _record(self, name: str) -> None:
        self.records.append((name, _caller() if self.where else ""))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS:
            if not (name == "repeat_interleave" and (kwargs or {}).get("output_size") is not None):
                self._record(name)
        elif name in MASK_INDEXING_OPS and _has_mask_index(args):
            self._record(f"{name} (boolean mask)")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        original = self._tolist = torch.Tensor.tolist
        recorder = self

        def tolist(tensor):
            recorder._record("tolist")
            return original(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def summary(self) -> dict:
        """{(op, caller): count}."""
        counts: dict = {}
        for record in self.records:
            counts[record] = counts.get(record, 0) + 1
        return counts
