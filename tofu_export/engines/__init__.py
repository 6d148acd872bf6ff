"""One runner per runtime (``torch.TorchRunner``, ``ort.OrtRunner``, ``trt.TrtRunner``) behind ``base.Runner``.

Evaluation, parity checks, the profiler and the interleaved comparison all use these; ``ort.create_session`` is the
one place an ONNX Runtime session is made. Import the submodules directly: this file stays free of heavy imports.
"""
