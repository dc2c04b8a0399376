"""Answers to `vllm serve MODEL --host H --port P --served-model-name NAME [vLLM flags]` by running
llama.cpp's own server (tests/python/llama_server.py) on that host and port, under that name:
the command a `[[vllm]]` section launches in the test where the VllmActor supervises a real
engine. Flags of vLLM's that llama.cpp has no use for (GPU memory, tensor parallelism, …) are
accepted and ignored; `--max-num-seqs` becomes its number of slots.
"""

import argparse
import os
import sys


def main() -> None:
    parser = argparse.ArgumentParser(prog="vllm")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", nargs="+", default=None)
    parser.add_argument("--max-num-seqs", type=int, default=2)
    args, _ignored = parser.parse_known_args()
    if args.host not in ("127.0.0.1", "localhost"):
        sys.exit(f"this stand-in binds to loopback only, not {args.host}")
    name = (args.served_model_name or [args.model])[0]
    here = os.path.dirname(os.path.abspath(__file__))
    os.execv(
        sys.executable,
        [
            sys.executable,
            os.path.join(here, "llama_server.py"),
            str(args.port),
            name,
            str(min(args.max_num_seqs, 4)),
        ],
    )


if __name__ == "__main__":
    main()
