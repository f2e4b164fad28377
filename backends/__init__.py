"""Backends: onnx (onnxruntime CPU/CUDA), tensorrt (engine build), reference (torch eager oracle)."""
