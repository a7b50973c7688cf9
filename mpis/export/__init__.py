"""Export of a trained network: the rate graph to ONNX, TensorRT and a Triton repository; the spiking
graph to NIR."""

# A NIR graph may hold this many times the model's parameters before export refuses (polyphase layout).
DEFAULT_MAX_PARAM_GROWTH = 16.0

# Toolchains whose own NIR importer `mpis export --target` writes for (mpis.export.toolchains).
TOOLCHAIN_TARGETS = ("norse", "sinabs", "snntorch")
# `--target` files whose neuron parameters have shape (1,) for Sinabs: nir 1.0.8 reads them with
# type_check=False only.
UNCHECKED_TARGETS = ("sinabs", "universal")
# Significant bits of each layer's weights in a toolchain file (mpis.export.fixed_point): the digits net's
# spikes are then Norse's bit for bit; at 10 bits, sums through two ops no longer fit float32 exactly.
DEFAULT_WEIGHT_BITS = 8
