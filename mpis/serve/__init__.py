"""The HTTP inference server (KServe v2 / Triton protocol) and its dynamic batching."""
