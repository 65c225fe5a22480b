"""ONNX export and import (needs the ``onnx`` package: ``pip install 'cnn_numba[onnx]'``).

    cnn_numba.onnx.export(model, example_input, "model.onnx")   # trace a forward pass, write ONNX
    model = cnn_numba.onnx.load("model.onnx")                   # a Module whose weights are Parameters

``export`` runs the model once in eval mode under ``no_grad`` and records every op the autograd
sees (``Function.apply`` calls the tracer), so any Module built from cnn_numba's ops exports; the
parameters and batch-norm statistics become initializers under their ``state_dict`` names, other
constants (masks, scalars) Constant nodes. ``load`` reads the protobuf itself (no code from the
file runs, external data is refused), checks every tensor's size and the graph's order, and
builds a Module that runs the graph with cnn_numba's ops: it trains and fine-tunes like any other.
"""
from ._export import DEFAULT_OPSET, MIN_OPSET, export
from ._load import OnnxModule, load

__all__ = ["export", "load", "OnnxModule", "DEFAULT_OPSET", "MIN_OPSET"]
