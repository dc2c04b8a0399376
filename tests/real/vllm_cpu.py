"""The driver of tests/real/vllm-cpu.sh (see there). Standard library only."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
VLLM = os.path.join(ROOT, "target", "vllm-cpu")
MODEL = os.path.join(VLLM, "smollm2-135m")
MERIDIAN = os.path.join(ROOT, "target", "debug", "meridian")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, timeout=120):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("content-type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def replicas(admin, token):
    out = subprocess.run(
        [MERIDIAN, "admin", "--addr", f"http://{admin}", "--token", token, "vllm", "list"],
        capture_output=True, text=True, check=True,
    ).stdout
    return out


def wait(what, cond, limit):
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if cond():
            return time.monotonic() - start
        time.sleep(0.2)
    sys.exit(f"timed out after {limit} s waiting for {what}")


def main() -> None:
    work = tempfile.mkdtemp(prefix="meridian-vllm-cpu-")
    wrapper = os.path.join(work, "vllm")
    # `vllm serve MODEL args` → the OpenAI server module (the `vllm` entry point of the
    # vllm-cpu distribution fails to find its own package name).
    with open(wrapper, "w") as f:
        f.write(
            "#!/bin/sh\n[ \"$1\" = serve ] || exit 2\nshift\nmodel=\"$1\"\nshift\n"
            f"exec {VLLM}/venv/bin/python -m vllm.entrypoints.openai.api_server --model \"$model\" \"$@\"\n"
        )
    os.chmod(wrapper, 0o755)
    http_port, grpc_port, admin_port, vllm_port = (free_port() for _ in range(4))
    token = "vllm-cpu-script-admin-token-0123456789"
    config = os.path.join(work, "node.toml")
    with open(config, "w") as f:
        f.write(f"""
[node]
id = 1
data_dir = "{work}/data"
[http]
listen = "127.0.0.1:{http_port}"
[grpc]
listen = "127.0.0.1:{grpc_port}"
[admin]
listen = "127.0.0.1:{admin_port}"
token_env = "VLLM_CPU_ADMIN_TOKEN"
[auth]
enabled = false

[[vllm]]
id = "smol"
model = "{MODEL}"
served_model_names = ["smol"]
command = "{wrapper}"
port = {vllm_port}
args = ["--max-model-len", "2048", "--dtype", "bfloat16"]
startup_budget = "600s"
health_interval = "1s"
scrape_interval = "1s"
restart_backoff = "1s"
drain_timeout = "60s"
stop_grace = "10s"
[vllm.env]
HF_HUB_OFFLINE = "1"
VLLM_CPU_KVCACHE_SPACE = "1"
VLLM_TARGET_DEVICE = "cpu"

# The same replica called directly, counted with the model's own tokenizer: the estimate is
# compared with what vLLM bills.
[[providers]]
id = "direct"
kind = "vllm"
base_url = "http://127.0.0.1:{vllm_port}/v1"
models = ["smol-own-tokenizer=smol"]
tokenizer = "{MODEL}/tokenizer.json"
""")
    env = dict(os.environ, VLLM_CPU_ADMIN_TOKEN=token)
    node = subprocess.Popen(
        [MERIDIAN, "serve", "--config", config],
        stdout=open(os.path.join(work, "node.log"), "w"), stderr=subprocess.STDOUT, env=env,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{http_port}"
    admin = f"127.0.0.1:{admin_port}"
    figures = {}
    try:
        wait("the node", lambda: ok(base + "/healthz"), 60)
        launched = time.monotonic()
        figures["ready_after_s"] = round(
            wait("vLLM ready", lambda: "ready" in replicas(admin, token), 900), 1
        )
        print("vLLM ready after", figures["ready_after_s"], "s\n" + replicas(admin, token))

        # Whole and streamed chat through the node; tokens a second from the engine's usage.
        ask = {"model": "smol", "max_tokens": 64, "temperature": 0.7, "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write a short paragraph about rivers."}]}
        t = time.monotonic()
        _, body = http("POST", base + "/v1/chat/completions", ask)
        took = time.monotonic() - t
        usage = json.loads(body)["usage"]
        figures["whole"] = {"usage": usage, "seconds": round(took, 2),
                            "tokens_per_s": round(usage["completion_tokens"] / took, 1)}
        stream = dict(ask, stream=True, stream_options={"include_usage": True})
        req = urllib.request.Request(base + "/v1/chat/completions",
                                     data=json.dumps(stream).encode(), method="POST")
        req.add_header("content-type", "application/json")
        t = time.monotonic()
        first = None
        chunks = 0
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                if line.startswith(b"data: ") and b"[DONE]" not in line:
                    chunks += 1
                    if first is None:
                        first = time.monotonic() - t
                    c = json.loads(line[6:])
                    if c.get("usage"):
                        usage = c["usage"]
        took = time.monotonic() - t
        figures["stream"] = {"usage": usage, "ttft_s": round(first, 3), "chunks": chunks,
                             "tokens_per_s": round(usage["completion_tokens"] / took, 1)}
        print("chat:", json.dumps(figures["whole"]), "\nstream:", json.dumps(figures["stream"]))

        # The estimate with the model's tokenizer.json against vLLM's own count.
        ratios = []
        probes = [
            [{"role": "user", "content": "Hello!"}],
            [{"role": "user", "content": "Write a short paragraph about rivers."}],
            [{"role": "user", "content":
              "Explain tokenization, with numbers like 1234567 and code: `let x = 2;`"}],
            [{"role": "system", "content": "You are terse."},
             {"role": "user", "content": "Name three rivers."},
             {"role": "assistant", "content": "Nile, Amazon, Yangtze."},
             {"role": "user", "content": "And three lakes?"}],
        ]
        for msg in probes:
            text = msg[-1]["content"] if len(msg) == 1 else f"{len(msg)} turns"
            # Counted as admission counts them (Anthropic's count_tokens: a system message is
            # its `system` field there).
            counted = {"messages": [m for m in msg if m["role"] != "system"]}
            if msg[0]["role"] == "system":
                counted["system"] = msg[0]["content"]
            _, est = http("POST", base + "/v1/messages/count_tokens",
                          dict(counted, model="smol-own-tokenizer"))
            _, tik = http("POST", base + "/v1/messages/count_tokens",
                          dict(counted, model="smol"))
            _, ans = http("POST", base + "/v1/chat/completions",
                          {"model": "smol-own-tokenizer", "max_tokens": 1, "messages": msg})
            billed = json.loads(ans)["usage"]["prompt_tokens"]
            own = json.loads(est)["input_tokens"]
            o200k = json.loads(tik)["input_tokens"]
            ratios.append({"text": text, "engine": billed, "own_tokenizer": own,
                           "own_ratio": round(own / billed, 2), "o200k": o200k,
                           "o200k_ratio": round(o200k / billed, 2)})
        figures["estimate_vs_engine"] = ratios
        print("estimate ÷ engine prompt tokens:", json.dumps(ratios, indent=1))

        # kill -9 the engine: the supervisor restarts it.
        pid = int(next(l for l in replicas(admin, token).splitlines() if "smol-0" in l)
                  .split("pid ")[1].split()[0]) if "pid " in replicas(admin, token) else None
        if pid:
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            wait("the restart", lambda: "ready" in replicas(admin, token) and
                 f"pid {pid}" not in replicas(admin, token), 900)
            figures["restart_after_kill_s"] = round(time.monotonic() - killed, 1)
            print("ready again", figures["restart_after_kill_s"], "s after kill -9")
        else:
            print("no pid in `vllm list`; kill -9 skipped:\n" + replicas(admin, token))

        # Drain: deregistered, in-flight finished, stopped.
        t = time.monotonic()
        subprocess.run([MERIDIAN, "admin", "--addr", f"http://{admin}", "--token", token,
                        "vllm", "drain", "smol-0"], check=True)
        wait("the drain", lambda: "stopped" in replicas(admin, token), 120)
        figures["drain_s"] = round(time.monotonic() - t, 1)
        print("drained and stopped in", figures["drain_s"], "s")
        print("FIGURES", json.dumps(figures))
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=120)
        print("node log:", os.path.join(work, "node.log"))


def ok(url) -> bool:
    try:
        return http("GET", url, timeout=2)[0] == 200
    except OSError:
        return False


if __name__ == "__main__":
    main()
