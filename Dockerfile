# CPU image of moe-router with PyTorch, JAX/Flax, TensorFlow/Keras and transformers.
#   docker build -t moe-router .
#   docker run --rm moe-router                                 # the demo
#   docker run --rm moe-router python -m pytest -q -n 2        # the tests
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2

WORKDIR /app
COPY . .

# The PyTorch CPU index holds the CPU wheel of torch: with constraints.txt pinning torch==2.13.0,
# pip picks 2.13.0+cpu from there instead of the multi-GB CUDA build on PyPI.
RUN pip install --upgrade pip \
 && pip install --extra-index-url https://download.pytorch.org/whl/cpu \
        -c constraints.txt -e ".[all,dev]"

CMD ["python", "-m", "moe_router", "demo"]
