"""models.onnx.export_onnx: the one ONNX export (the runtimes' frozen prefix and deploy's model.onnx)."""

import os

import numpy as np
import pytest
import torch
from torch import nn

from conftest import require
from transferlab.models.onnx import export_onnx


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)
        self.drop = nn.Dropout(0.9)  # active only in train mode: the export must be of eval mode

    def forward(self, x):
        return self.fc(self.drop(self.conv(x).mean(dim=(2, 3))))


class TwoOutputs(Tiny):
    def forward(self, x):
        logits = super().forward(x)
        return logits, torch.softmax(logits, dim=1)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("dynamo, opset, example", [(False, 17, (1, 3, 8, 8)), (True, 18, (2, 3, 8, 8))])
def test_the_file_has_the_asked_opset_and_names_and_any_batch_gives_the_eager_outputs(dynamo, opset, example, tmp_path):
    onnx = require("onnx")
    ort = require("onnxruntime")
    if dynamo:
        require("onnxscript")
    torch.manual_seed(0)
    module = TwoOutputs().train()
    path = export_onnx(module, example, tmp_path / "sub" / "m.onnx", opset=opset, input_name="image",
                       output_names=("logits", "probabilities"), dynamo=dynamo)
    assert path == tmp_path / "sub" / "m.onnx" and sorted(os.listdir(path.parent)) == ["m.onnx"]  # no temporary left
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()  # the umask's mode, as every file transferlab writes
    model = onnx.load(str(path))
    assert {o.domain: o.version for o in model.opset_import}[""] == opset
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 8, 8)
        logits, probs = session.run(None, {"image": x.numpy()})
        with torch.no_grad():
            want_logits, want_probs = module.eval()(x)
        np.testing.assert_allclose(logits, want_logits.numpy(), atol=1e-5)
        np.testing.assert_allclose(probs, want_probs.numpy(), atol=1e-5)


def test_a_failed_export_raises_and_leaves_no_file_and_keeps_an_earlier_one(tmp_path):
    require("onnx")

    class Broken(Tiny):
        def forward(self, x):
            raise RuntimeError("cannot trace this")

    path = tmp_path / "prefix.onnx"
    path.write_bytes(b"an earlier export")
    with pytest.raises(RuntimeError, match="cannot trace this"):
        export_onnx(Broken(), (1, 3, 8, 8), path, opset=17, input_name="x", output_names=("y",))
    assert sorted(os.listdir(tmp_path)) == ["prefix.onnx"] and path.read_bytes() == b"an earlier export"
