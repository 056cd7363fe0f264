"""
Chunked prefill on a live api_server.py (GPT-2 124M shape, random weights): 4 streams decoding,
then one ~900-token prompt admitted beside them. Measures, for --prefill_chunk N and 0 (off),
each stream's gaps between tokens while that prompt is admitted (max and median), the long
prompt's time to its first token, and 8-client throughput (bench/serve.py's load), the two
servers taking turns. Targets: max gap <= 150 ms with chunking on; 8-client tok/s with chunking
on within 5% of off (medians of the turns). Exit 1 when a target is missed.

    python bench/prefill.py                     # int8 then fp32, ~6 minutes on 2 cores
    python bench/prefill.py --dtypes int8 --turns 3
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import requests
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Targets  # noqa: E402
from serve import ROOT, load, start_server  # noqa: E402

sys.path.insert(0, ROOT)
from model import GPT, GPTConfig  # noqa: E402
from server.config import ServerConfig  # noqa: E402

MODEL = "random124m"
MAX_GAP_MS = 150
THROUGHPUT_WITHIN = 0.05


def stream_prompts(url, n, tokens):
    """n prompts whose greedy continuation has no token that is part of a UTF-8 character: each
    of their tokens is then one streamed event, so the gaps between events are gaps between tokens."""
    found = []
    for i in range(200):
        prompt = f"Stream {i}: the history of the city begins"
        r = requests.post(url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": tokens,
                                                         "temperature": 0, "logprobs": 0}, timeout=600)
        r.raise_for_status()
        choice = r.json()["choices"][0]
        if len(choice["logprobs"]["tokens"]) == tokens and not any("\ufffd" in t for t in choice["logprobs"]["tokens"]):
            found.append(prompt)
            if len(found) == n:
                return found
    sys.exit(f"found only {len(found)} prompts whose greedy continuations stream token by token")


def admission(url, prompts, long_ids, stream_tokens):
    """The streams decoding, then long_ids sent (max_tokens 1). Returns (gaps in ms between two
    events of one stream spanning any part of the admission, gaps before it, seconds from sending
    the long prompt to its answer)."""
    times = [[] for _ in prompts]
    stop = threading.Event()

    def read(i):
        with requests.post(url + "/v1/completions", stream=True, timeout=600, json={
                "model": MODEL, "prompt": prompts[i], "max_tokens": stream_tokens, "temperature": 0,
                "stream": True}) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith(b"data: {"):
                    choices = json.loads(line[6:])["choices"]
                    if choices and choices[0]["text"]:
                        times[i].append(time.perf_counter())
                if stop.is_set():
                    return  # closing the connection cancels the generation

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in readers:
        t.start()
    deadline = time.monotonic() + 120
    while min(len(t) for t in times) < 24:  # every stream decoding, past its first steps
        if time.monotonic() > deadline or not all(t.is_alive() for t in readers):
            sys.exit("the streams did not start")
        time.sleep(0.01)
    sent = time.perf_counter()
    r = requests.post(url + "/v1/completions", json={"model": MODEL, "prompt": long_ids, "max_tokens": 1,
                                                     "temperature": 0}, timeout=600)
    answered = time.perf_counter()
    r.raise_for_status()
    time.sleep(0.3)  # the gap that ends after the admission counts too
    stop.set()
    for t in readers:
        t.join(60)
    during, before = [], []
    for ts in times:
        if ts[-1] < answered:
            sys.exit("a stream ended during the admission: raise --stream_tokens")
        for a, b in zip(ts, ts[1:]):
            (during if b > sent and a < answered else before if b <= sent else []).append((b - a) * 1000)
    return during, before, answered - sent


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="int8,fp32", help="comma-separated: int8 (--quantize int8), fp32")
    p.add_argument("--prefill_chunk", type=int, default=ServerConfig().prefill_chunk,
                   help="the chunked server's --prefill_chunk (default: the server's default)")
    p.add_argument("--prompt_tokens", type=int, default=900, help="the long prompt's length")
    p.add_argument("--stream_tokens", type=int, default=110, help="tokens each running stream asks for")
    p.add_argument("--admissions", type=int, default=3, help="long prompts admitted per server")
    p.add_argument("--turns", type=int, default=3, help="8-client throughput turns per server")
    p.add_argument("--requests", type=int, default=24, help="requests per throughput turn")
    p.add_argument("--new_tokens", type=int, default=64, help="tokens per throughput request")
    args = p.parse_args()

    work = tempfile.mkdtemp()
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    os.makedirs(os.path.join(work, "models", MODEL))
    torch.save({"model_args": model.config.__dict__, "model": model.state_dict()},
               os.path.join(work, "models", MODEL, "ckpt.pt"))
    del model
    gen = torch.Generator().manual_seed(1)
    targets = Targets()
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}; --prefill_chunk {args.prefill_chunk} vs 0 (off); "
          f"4 streams, then a {args.prompt_tokens}-token prompt, {args.admissions} times per server")
    for dtype in args.dtypes.split(","):
        flags = ["--quantize", "int8"] if dtype == "int8" else []
        servers = {}
        for name, chunk in (("on", args.prefill_chunk), ("off", 0)):
            folder = os.path.join(work, f"{dtype}-{name}")
            os.makedirs(folder)
            os.symlink(os.path.join(work, "models"), os.path.join(folder, "models"))
            servers[name] = start_server(folder, f"models/{MODEL}", "--prefill_chunk", str(chunk), *flags)
        try:
            for _, url in servers.values():
                load(url, 2, 2, 8)  # warm-up
            prompts = stream_prompts(servers["on"][1], 4, args.stream_tokens)
            gaps = {"on": ([], [], []), "off": ([], [], [])}
            for i in range(args.admissions):
                long_ids = torch.randint(0, 50256, (args.prompt_tokens,), generator=gen).tolist()
                for name in (("on", "off") if i % 2 == 0 else ("off", "on")):
                    during, before, ttft = admission(servers[name][1], prompts, long_ids, args.stream_tokens)
                    gaps[name][0].extend(during)
                    gaps[name][1].extend(before)
                    gaps[name][2].append(ttft)
            tok_s = {"on": [], "off": []}
            for i in range(args.turns):
                for name in (("on", "off") if i % 2 == 0 else ("off", "on")):
                    tok_s[name].append(load(servers[name][1], 8, args.requests, args.new_tokens)["tok_s"])
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait()
        print(f"{dtype}:")
        for name in ("on", "off"):
            during, before, ttft = gaps[name]
            print(f"  prefill_chunk {args.prefill_chunk if name == 'on' else 0:>3}: gaps while the long prompt is "
                  f"admitted: max {max(during):.0f} ms, median {statistics.median(during):.0f} ms "
                  f"(before it: median {statistics.median(before):.0f} ms); the long prompt's answer "
                  f"{statistics.median(ttft) * 1000:.0f} ms (median); 8 clients: "
                  f"{statistics.median(tok_s[name]):.1f} tok/s (median of "
                  f"{', '.join(f'{t:.1f}' for t in tok_s[name])})")
        worst = max(gaps["on"][0])
        targets.check(f"{dtype}: max gap while a {args.prompt_tokens}-token prompt is admitted {worst:.0f} ms "
                      f"<= {MAX_GAP_MS} ms", worst <= MAX_GAP_MS)
        ratio = statistics.median(tok_s["on"]) / statistics.median(tok_s["off"])
        targets.check(f"{dtype}: 8-client throughput, chunked / unchunked {ratio:.3f} >= {1 - THROUGHPUT_WITHIN:.2f}",
                      ratio >= 1 - THROUGHPUT_WITHIN)
    targets.finish()


if __name__ == "__main__":
    main()
