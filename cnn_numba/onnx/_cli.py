"""What ``cnn-numba export`` and ``cnn-numba evaluate --onnx`` run.

An exported file records the model's name and dataset in its metadata_props
(``cnn_numba.model``, ``cnn_numba.dataset``), so ``evaluate --onnx`` normalises the test images
as training did without being told."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import train as T
from ..tensor import tensor

IMAGE_HW = (28, 28)  # MNIST / Fashion-MNIST: what the command line trains on


def _need_onnx(what: str):
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise T.TrainError(f"{what} needs the onnx package: pip install 'cnn_numba[onnx]'") from None


def run_export(checkpoint, onnx_path, *, model_name=None, opset=None, dynamic_batch=True, out=print) -> Path:
    """Export a checkpoint's model as ONNX (traced on a batch of two images)."""
    _need_onnx("export")
    from . import export
    model, ck = T.restore(checkpoint, model_name)
    c, h, w = (v if v is not None else d for v, d in zip(getattr(model, "input_shape", (1, None, None)),
                                                            (1,) + IMAGE_HW))
    meta = {"cnn_numba.model": model_name or ck.model_name, "cnn_numba.dataset": ck.args.get("dataset", "mnist"),
            "cnn_numba.checkpoint": Path(ck.path).name, "cnn_numba.epoch": ck.epoch}
    try:
        proto = export(model, np.zeros((2, c, h, w), np.float32), onnx_path, opset, dynamic_batch, metadata=meta)
    except (ValueError, TypeError, OSError) as e:
        raise T.TrainError(f"export of {ck.path} failed: {e}") from None
    out(f"wrote {onnx_path}: model {meta['cnn_numba.model']} from {ck.path}, opset "
        f"{proto.opset_import[0].version}, input ({'N' if dynamic_batch else 2}, {c}, {h}, {w})")
    return Path(onnx_path)


class _OnnxRuntimeModel:
    """An ONNX Runtime session with the two calls ``train.predict_logits`` makes of a model."""

    def __init__(self, path):
        import onnxruntime as ort
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def eval(self):
        return self

    def __call__(self, x):
        return tensor(self.session.run(None, {self.input: x.numpy()})[0])


def run_evaluate(onnx_path, *, runtime="cnn_numba", dataset=None, data_dir=None, device="cpu",
                 batch_size=T.EVAL_BATCH, out=print) -> dict:
    """Test loss and accuracy of an ONNX model, run by cnn_numba (imported with onnx.load) or
    by ONNX Runtime; prints ``test accuracy: ...`` last, as ``evaluate --checkpoint`` does."""
    _need_onnx("evaluate --onnx")
    from ._load import OnnxModule, _read
    path = Path(onnx_path)
    try:
        proto = _read(path)
        if runtime == "onnxruntime":
            if device != "cpu":
                raise T.TrainError("--runtime onnxruntime runs on the CPU here; leave out --device")
            try:
                model = _OnnxRuntimeModel(path)
            except ImportError:
                raise T.TrainError("--runtime onnxruntime needs onnxruntime: pip install 'cnn_numba[onnx]'") from None
        else:
            model = OnnxModule(proto, str(path)).to(T.use_device(device))
        meta = {p.key: p.value for p in proto.metadata_props}
    except (ValueError, OSError) as e:
        raise T.TrainError(str(e)) from None
    except Exception as e:  # ONNX Runtime's own errors on a file it refuses
        raise T.TrainError(f"{path}: ONNX Runtime cannot load it ({type(e).__name__}: {e})") from None
    dataset = dataset or meta.get("cnn_numba.dataset", "mnist")
    test = T.load_split(dataset, "test", data_dir)
    loss, acc = T.evaluate(model, test, T.NORMALIZE[dataset], device, batch_size)
    out(f"ONNX model {path} ({meta.get('cnn_numba.model', 'model')}), run by {runtime}; test loss {loss:.4f}")
    out(T.accuracy_line(acc, test))
    return {"loss": loss, "accuracy": acc, "images": len(test.labels), "source": test.source}
