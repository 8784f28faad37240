"""Deployment: ONNX graphs, CPU runtimes (onnxruntime, OpenVINO) and detection export."""
