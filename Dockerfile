# mpis on CUDA with TensorRT: train, export (ONNX, TensorRT engine, Triton model repository) and serve.
#
#   docker build -t mpis .                          # or --build-arg NGC_TAG=YY.MM
#   docker run --rm --gpus all -v "$PWD":/workspace mpis export runs/digits/model.pt --trt digits.plan --triton-repo models
#
# A TensorRT engine only loads in the TensorRT version (and on the GPU model) that built it. NGC containers
# of one release (YY.MM) ship the same TensorRT, so serve the repository with tritonserver of the same tag:
#   docker run --rm --gpus all -p 8000:8000 -v "$PWD/models":/models nvcr.io/nvidia/tritonserver:${NGC_TAG}-py3 \
#       tritonserver --model-repository=/models
ARG NGC_TAG=25.01
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}-py3

WORKDIR /opt/mpis
COPY pyproject.toml README.md ./
COPY mpis ./mpis
# Keep the base's CUDA build of torch and its TensorRT: torch is pinned to the installed build, and of the
# trt extra only onnxconverter-common is added (the extra's `tensorrt` wheel would shadow the base's).
RUN python -c "import tensorrt, torch; print(f'torch=={torch.__version__}')" > /tmp/keep-torch.txt \
 && pip install --no-cache-dir -c /tmp/keep-torch.txt ".[all]" "onnxconverter-common>=1.14" \
 && python -c "import mpis, tensorrt, torch; assert torch.version.cuda; print('mpis', mpis.__version__, 'tensorrt', tensorrt.__version__, 'torch', torch.__version__)"

WORKDIR /workspace
EXPOSE 8000
ENTRYPOINT ["mpis"]
CMD ["--help"]
