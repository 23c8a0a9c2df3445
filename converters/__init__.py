"""PyTorch and ONNX converters (importable as ``qjax.converters``)."""
