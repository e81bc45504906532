"""Build targets: what each backend's bundle form allows and records (ONNX Runtime, TensorRT)."""
