"""
Serving throughput: a live api_server.py with a GPT-2 124M-shape checkpoint (random weights),
1 and 8 concurrent clients on loopback, 64 new tokens per request; against transformers'
generate() at batch 8 in the same run. Also the time to first token of a streamed 64-token
/v1/completions at 1 and 8 clients, and the server's peak RSS.

With --llama_cpp DIR the peer is llama.cpp's own llama-server (DIR: a llama.cpp checkout built in
DIR/build, as bench/decode.py uses it) on GGUFs of the very same weights made by its converter:
int8 against q8_0 and fp32 against f32, each side one server with 32 slots (-np 32 /
--max_batch 32) on the same threads, taking turns (best of --turns kept). The same streamed
/v1/completions requests, sampled (temperature 1, seeded) and greedy, at 1, 8 and 32 clients:
tok/s, time to first token p50/p99 and each side's peak RSS (ours: gunicorn's worker and master).
Also ours at 1 client against in-process generate() of the same requests. Targets (int8 >= 1.5x
q8_0 at 1 client and >= 2x at 8 and 32; fp32 >= 1.2x f32 at 1 and >= 1.5x at 8; TTFT p50 at or
below llama-server's; peak RSS <= 1.3x; 1 client >= 90% of in-process) are printed; exit 1 on a miss.

    python bench/serve.py                              # ~3 minutes on 2 cores
    python bench/serve.py --requests 8                 # quicker
    python bench/serve.py --llama_cpp ~/src/llama.cpp  # ~10 minutes on 2 cores
"""
import argparse
import json
import os
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
from common import Targets, free_port, paired_models, random_hub_model, wait_until_ready  # noqa: E402


def start_server(workdir, ckpt_dir, *args):
    """A live api_server.py serving the checkpoint in ckpt_dir; args: more flags."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "api_server.py"), "--port", str(port), "--device", "cpu",
                             "--models_dir", "models", "--model_path", ckpt_dir,
                             "--anonymous_rate_per_minute", "0", *args], cwd=workdir,  # the clients are keyless and many
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, "server.log"), "w"))
    url = f"http://127.0.0.1:{port}"
    if not wait_until_ready(proc, url + "/health", lambda r: r.json().get("model_loaded")):
        sys.exit("server did not start:\n" + open(os.path.join(workdir, "server.log")).read()[-2000:])
    return proc, url


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

# ---------------------------------------------------------------------------- against llama-server

CLIENTS = (1, 8, 32)
PROMPT = "Request {i}: the history of the city begins"


def streamed(url, model_id, clients, n_requests, new_tokens, greedy):
    """n_requests streamed /v1/completions, `clients` at a time -> {"tok_s": tokens streamed / wall,
    "ttft": sorted seconds to each request's first text}. Tokens: the final chunk's usage where the
    server gives it, else the chunks with text (llama-server streams one token a chunk)."""
    def one(i):
        body = {"model": model_id, "prompt": PROMPT.format(i=i), "max_tokens": new_tokens, "stream": True,
                "seed": i, "temperature": 0.0 if greedy else 1.0, "stream_options": {"include_usage": True}}
        t0, first, chunks, usage = time.perf_counter(), None, 0, None
        with requests.post(url + "/v1/completions", json=body, stream=True, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]["completion_tokens"]
                if (event.get("choices") or [{}])[0].get("text"):
                    chunks += 1
                    first = first if first is not None else time.perf_counter() - t0
        return first, usage if usage is not None else chunks

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(n_requests)))
    return {"tok_s": sum(n for _, n in results) / (time.perf_counter() - t0),
            "ttft": sorted(t for t, _ in results if t is not None)}


def peak_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) / 1024


def in_process_tok_s(model, new_tokens, n_requests, greedy):
    """The 1-client requests decoded by generate() in this process, one after another."""
    from generate import SamplingParams, generate
    from tokenizer import get_tokenizer
    tok = get_tokenizer(None)
    t0, n = time.perf_counter(), 0
    for i in range(n_requests):
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0 if greedy else 1.0, seed=i,
                                do_sample=not greedy)
        n += len(generate(model, tok, [tok.encode(PROMPT.format(i=i))], params)[0].out_ids)
    return n / (time.perf_counter() - t0)


def compare_pair(args, work, ours_flags, gguf, targets, name, peer_name, ratio_targets, model):
    """One dtype: our server and llama-server side by side, turns alternated; prints and checks."""
    import llama_cpp
    from load import children
    ours, url = start_server(work, "models/random124m", "--max_batch", str(max(CLIENTS)), *ours_flags)
    peer, peer_url = llama_cpp.start_server(args.llama_cpp, gguf, max(CLIENTS), args.threads,
                                            log_path=os.path.join(work, f"llama-{peer_name}.log"))
    best = {}
    try:
        for side_url in (url, peer_url):
            streamed(side_url, "random124m", 2, 2, 8, False)  # warm-up
        for turn in range(args.turns):
            for side, side_url in ((("ours", url), ("peer", peer_url)) if turn % 2 == 0 else
                                   (("peer", peer_url), ("ours", url))):
                for greedy in (False, True):
                    for c in CLIENTS:
                        n = c * args.per_client if c > 1 else 2 * args.per_client
                        r = streamed(side_url, "random124m", c, n, args.new_tokens, greedy)
                        key = (side, greedy, c)
                        if key not in best or r["tok_s"] > best[key]["tok_s"]:
                            best[key] = r
        rss = {"ours": sum(peak_mb(w) for w in children(ours.pid)), "master": peak_mb(ours.pid),
               "peer": peak_mb(peer.pid)}
    finally:
        for proc in (ours, peer):
            proc.terminate()
            proc.wait()
    report_pair(args, best, rss, targets, name, peer_name, ratio_targets, model)


def report_pair(args, best, rss, targets, name, peer_name, ratio_targets, model):
    def ms(r, q):
        return r["ttft"][min(len(r["ttft"]) - 1, int(q * len(r["ttft"])))] * 1e3
    for greedy in (False, True):
        mode = "greedy" if greedy else "sampled"
        for c in CLIENTS:
            o, p = best[("ours", greedy, c)], best[("peer", greedy, c)]
            print(f"{name} vs llama-server {peer_name}, {mode}, {c:2d} client(s): {o['tok_s']:6.1f} vs "
                  f"{p['tok_s']:6.1f} tok/s ({o['tok_s'] / p['tok_s']:.2f}x); TTFT p50 {ms(o, .5):.0f} vs "
                  f"{ms(p, .5):.0f} ms, p99 {ms(o, .99):.0f} vs {ms(p, .99):.0f} ms")
            if c in ratio_targets:
                targets.check(f"{name} {mode} {c} client(s) >= {ratio_targets[c]}x llama-server {peer_name} "
                              f"({o['tok_s'] / p['tok_s']:.2f}x)", o["tok_s"] >= ratio_targets[c] * p["tok_s"])
            targets.check(f"{name} {mode} {c} client(s): TTFT p50 at or below llama-server's "
                          f"({ms(o, .5):.0f} vs {ms(p, .5):.0f} ms)", ms(o, .5) <= ms(p, .5))
        local = in_process_tok_s(model, args.new_tokens, 2 * args.per_client, greedy)
        served = best[("ours", greedy, 1)]["tok_s"]
        targets.check(f"{name} {mode} 1 client served at >= 90% of in-process generate() "
                      f"({served:.1f} vs {local:.1f} tok/s, {served / local:.1%})", served >= 0.9 * local)
    print(f"peak RSS: ours {rss['ours']:.0f} MB (worker; gunicorn's master {rss['master']:.0f} MB more), "
          f"llama-server {rss['peer']:.0f} MB")
    targets.check(f"{name} peak RSS <= 1.3x llama-server's ({rss['ours'] / rss['peer']:.2f}x, worker only)",
                  rss["ours"] <= 1.3 * rss["peer"])


def against_llama_server(args):
    import llama_cpp
    targets = Targets()
    hf_home = tempfile.mkdtemp(prefix="bench_serve_")
    os.environ.update(HF_HOME=hf_home, HF_HUB_OFFLINE="1")  # our server loads nothing from the Hub itself
    snap = random_hub_model(hf_home, "gpt2")
    from model import load_model
    model = load_model("gpt2")  # the snapshot's weights, which the GGUFs are made from
    work = tempfile.mkdtemp()
    ckpt_dir = os.path.join(work, "models", "random124m")
    os.makedirs(ckpt_dir)
    torch.save({"model_args": model.config.__dict__, "model": model.state_dict()}, os.path.join(ckpt_dir, "ckpt.pt"))
    torch.set_num_threads(args.threads)
    print(f"GPT-2 124M shape, random weights, CPU, {args.threads} threads a server, {args.new_tokens} new tokens a "
          f"request, {max(CLIENTS)} slots a server, best of {args.turns} turns")
    del model
    pairs = (("int8", "q8_0", ["--quantize", "int8"], {1: 1.5, 8: 2.0, 32: 2.0}, "int8"),
             ("fp32", "f32", [], {1: 1.2, 8: 1.5}, None))
    for name, peer_name, flags, ratios, quantize in pairs:
        gguf = llama_cpp.convert(args.llama_cpp, snap, peer_name)
        compare_pair(args, work, flags, gguf, targets, name, peer_name, ratios, load_model("gpt2", quantize=quantize))
    targets.finish()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=24, help="requests per measurement")
    p.add_argument("--new_tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--llama_cpp", default=None, help="a llama.cpp checkout built in DIR/build: compare with its "
                   "llama-server instead of transformers")
    p.add_argument("--turns", type=int, default=2, help="with --llama_cpp: turns each side takes (best kept)")
    p.add_argument("--per_client", type=int, default=2, help="with --llama_cpp: requests per client per measurement")
    p.add_argument("--threads", type=int, default=2, help="with --llama_cpp: CPU threads for each server")
    args = p.parse_args()
    if args.llama_cpp:
        return against_llama_server(args)
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
