"""Export to ONNX / TensorRT and the backends that run the four components."""
