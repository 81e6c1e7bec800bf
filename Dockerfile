# CPU image: `docker build -t adaptserve . && docker run -p 8000:8000 adaptserve`
FROM python:3.11-slim

# llama-cpp-python compiles llama.cpp at install time.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY adaptserve ./adaptserve
# llama.cpp for any x86-64 CPU, not just the build host's: every CPU variant, the best loaded at run time (llama_thread.py).
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON"
# EXTRAS='[ray]': the image deploy/rayservice.yaml runs.
ARG EXTRAS=""
RUN pip install --no-cache-dir ".$EXTRAS" && adaptserve models

ENV HF_HUB_OFFLINE=1
EXPOSE 8000
CMD ["adaptserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
