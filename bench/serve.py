"""
Serving throughput: a live api_server.py with a GPT-2 124M-shape checkpoint (random weights),
1 and 8 concurrent clients on loopback, 64 new tokens per request; against transformers'
generate() at batch 8 in the same run. Also the time to first token of a streamed 64-token
/v1/completions at 1 and 8 clients, and the server's peak RSS.

    python bench/serve.py                 # ~3 minutes on 2 cores
    python bench/serve.py --requests 8    # quicker
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import requests
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import GPTConfig  # noqa: E402
from common import paired_models  # noqa: E402


def start_server(workdir, ckpt_dir, *args):
    """A live api_server.py serving the checkpoint in ckpt_dir; args: more flags."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "api_server.py"), "--port", str(port), "--device", "cpu",
                             "--models_dir", "models", "--model_path", ckpt_dir,
                             "--anonymous_rate_per_minute", "0", *args], cwd=workdir,  # the clients are keyless and many
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, "server.log"), "w"))
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if requests.get(url + "/health", timeout=1).json().get("model_loaded"):
                return proc, url
        except (requests.ConnectionError, requests.Timeout):
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    sys.exit("server did not start:\n" + open(os.path.join(workdir, "server.log")).read()[-2000:])


def load(url, clients, n_requests, new_tokens):
    def one(i):
        t0 = time.perf_counter()
        r = requests.post(url + "/generate", json={"prompt": f"Request {i}: the history of the city begins",
                                                   "length": new_tokens, "seed": i, "temperature": 1.0})
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(n_requests)))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    return {"req_s": n_requests / wall, "tok_s": sum(r[1] for r in results) / wall,
            "p50": statistics.median(lat), "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def time_to_first_token(url, model_id, clients, n_requests, new_tokens):
    """p50 seconds from sending a streaming /v1/completions to its first text chunk."""
    def one(i):
        t0 = time.perf_counter()
        first = None
        with requests.post(url + "/v1/completions", stream=True, json={
                "model": model_id, "prompt": f"Request {i}: the history of the city begins", "max_tokens": new_tokens,
                "stream": True, "seed": i}) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if first is None and line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    first = time.perf_counter() - t0
        return first

    with ThreadPoolExecutor(clients) as pool:
        return statistics.median(t for t in pool.map(one, range(n_requests)) if t is not None)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=24, help="requests per measurement")
    p.add_argument("--new_tokens", type=int, default=64, help="tokens generated per request")
    args = p.parse_args()
    ours, hf = paired_models(GPTConfig())
    work = tempfile.mkdtemp()
    ckpt_dir = os.path.join(work, "models", "random124m")
    os.makedirs(ckpt_dir)
    torch.save({"model_args": ours.config.__dict__, "model": ours.state_dict()}, os.path.join(ckpt_dir, "ckpt.pt"))
    proc, url = start_server(work, "models/random124m")
    try:
        load(url, 2, 2, 8)  # warm-up
        one = load(url, 1, max(4, args.requests // 3), args.new_tokens)
        eight = load(url, 8, args.requests, args.new_tokens)
        ttft = {n: time_to_first_token(url, "random124m", n, max(n, args.requests // 3), args.new_tokens) for n in (1, 8)}
        rss = int(open(f"/proc/{proc.pid}/status").read().split("VmHWM:")[1].split()[0]) / 1024
    finally:
        proc.terminate()
        proc.wait()
    prompts = torch.randint(0, 50257, (8, 10))
    with torch.inference_mode():
        hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=8, pad_token_id=0)
        t0 = time.perf_counter()
        hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens, pad_token_id=0, eos_token_id=None)
        hf_tok_s = 8 * args.new_tokens / (time.perf_counter() - t0)
    for name, r in (("1 client ", one), ("8 clients", eight)):
        print(f"{name}: {r['req_s']:.2f} req/s  {r['tok_s']:.1f} tok/s  p50 {r['p50']:.2f} s  p99 {r['p99']:.2f} s")
    print(f"8-client / 1-client throughput: {eight['tok_s'] / one['tok_s']:.2f}x (target >= 2.5x)")
    print(f"8-client tok/s vs transformers generate() at batch 8 ({hf_tok_s:.1f} tok/s): "
          f"{eight['tok_s'] / hf_tok_s:.2f}x (target >= 1.5x)")
    print(f"time to first token, streamed /v1/completions of {args.new_tokens} tokens: p50 {ttft[1] * 1000:.0f} ms "
          f"at 1 client, {ttft[8] * 1000:.0f} ms at 8 clients")
    print(f"server peak RSS with 124M fp32 loaded: {rss:.0f} MB (target <= 1536 MB)")


if __name__ == "__main__":
    main()
