"""Export of a trained network: the rate graph to ONNX, TensorRT and a Triton repository; the spiking
graph to NIR."""

# A NIR graph may hold this many times the model's parameters before export refuses (polyphase layout).
DEFAULT_MAX_PARAM_GROWTH = 16.0
