"""Export of a trained network: the rate graph to ONNX; later TensorRT, Triton and NIR."""
