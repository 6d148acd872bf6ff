"""Exporters: ONNX, TensorRT engines and their static compatibility checks."""
