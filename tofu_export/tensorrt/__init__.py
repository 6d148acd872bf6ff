"""TensorRT, in one package: what each release parses and the static check of a graph against it, the engine build
and the runner.

- ``targets``: the releases an export is made for (JetPack -> TensorRT), the opset that follows, verdicts;
- ``ops`` / ``rules``: per-release operator tables (data) and per-operator restrictions;
- ``check`` (+ ``shapes``): the GPU-free static check of an ONNX file against those tables;
- ``api``: the lazy ``tensorrt`` import, its errors, and what differs between TensorRT 8.x, 10.x and 11;
- ``build``: ``build_engine(onnx, engine, TrtConfig)`` and the equivalent ``trtexec`` line;
- ``runner``: ``TrtRunner``, a serialized engine run on torch CUDA tensors.

Nothing here imports ``tensorrt`` at module level: import the submodules directly.
"""
