# qdemo as a container (also a Hugging Face Docker Space). Build: docker build -t qdemo .
# Run: docker run -p 7860:7860 qdemo   (then open http://localhost:7860)
# CPU by default; for an NVIDIA GPU build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
# and run with --gpus all. --build-arg WITH_LLAMA=1 adds the llama.cpp forward (about 5x faster decoding on a CPU;
# the build compiles llama.cpp, about 20 minutes on 2 cores), for any x86-64 CPU with AVX2.
FROM python:3.11.7-slim-bookworm

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG WITH_LLAMA=0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/user \
    PATH=/home/user/.local/bin:$PATH \
    QDEMO_CACHE=/home/user/.cache/qdemo \
    HF_HOME=/home/user/.cache/huggingface \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False

# A compiler only where llama.cpp is built.
RUN if [ "$WITH_LLAMA" = "1" ]; then apt-get update \
      && apt-get install -y --no-install-recommends build-essential \
      && rm -rf /var/lib/apt/lists/*; fi

# Spaces run containers as uid 1000; so does this image.
RUN useradd --create-home --uid 1000 user
USER user
WORKDIR /home/user/app

# Dependencies first (exact pins), so code changes do not reinstall them. torch comes from the CPU wheel index
# unless TORCH_INDEX says otherwise (an empty TORCH_INDEX uses PyPI's default build).
COPY --chown=user requirements.txt ./
RUN pip install --user --no-cache-dir ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} torch==2.13.0 \
    && pip install --user --no-cache-dir -r requirements.txt

# Built for AVX2 rather than this build machine's CPU, so the image runs wherever it is deployed.
COPY --chown=user requirements-llama.txt ./
RUN if [ "$WITH_LLAMA" = "1" ]; then \
      CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
      pip install --user --no-cache-dir -r requirements-llama.txt; fi

COPY --chown=user app.py models.yaml ./
COPY --chown=user qdemo ./qdemo

# The embedded default model is dequantized once here, so the container starts in seconds.
RUN python -m qdemo prepare qwen2.5-coder-0.5b-instruct

EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/gradio_api/info', timeout=8)"]
CMD ["python", "app.py"]
