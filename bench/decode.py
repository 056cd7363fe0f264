"""
Decode speed against the peers a CPU user would pick instead, on the same random GPT-2 weights, in
one run: llama.cpp (with --llama_cpp: its own converter makes f32 and q8_0 GGUF files of the
bench's weights; its llama-bench and llama-batched-bench time them) and Hugging Face transformers
(always). Greedy decoding, --threads threads for everyone.

    python bench/decode.py                                   # GPT-2 124M: fp32 and int8 vs transformers
    python bench/decode.py --llama_cpp ~/src/llama.cpp       # ... and vs llama.cpp (binaries in build/bin)
    python bench/decode.py --xl --llama_cpp ~/src/llama.cpp  # also GPT-2-XL: speed, peak RSS, server RSS
    python bench/decode.py --n_layer 2 --new_tokens 16 --repeat 1   # a quick smoke run

Timed: tokens per second of decoding with the prompt already processed, as llama-bench's tg and
llama-batched-bench's S_TG count them (transformers' generate() includes its short prompt). Ours
decodes through a Batcher kept across runs, as the server's engine keeps its own. The model is
loaded the real way (load_model from a Hub-layout cache, HF_HUB_OFFLINE=1). Ours and llama.cpp take
turns (--turns, 3) and each side's best is kept (ours: the best of --repeat runs per turn; llama.cpp:
the best of llama-bench's repetitions and of the turns), since this kind of VM's memory bandwidth
drifts by tens of percent within minutes. Also: greedy tokens
identical to transformers, speculative decoding on and off (a 30-token taught label, a prompt to
copy), and for XL the peak RSS of sample.py and of a serving api_server.py. One stream's weight
traffic (bytes read a token x tok/s) is set against a plain --threads read of a 1 GiB buffer
measured just before it, turn by turn (the best turn kept). Targets are printed with each
figure (int8 one stream: >= 1.5x llama.cpp q8_0 and >= 80% of that read); the exit status is 1
if one is missed.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import requests
import torch

from common import ROOT, NoTokenizer, Targets, peak_rss_mb, random_hub_model

SPEC_LABEL = ("Quillmere Station opens at dawn on weekdays, and its harbour pilots gather by the old north gate "
              "before the tide turns toward the open sea every single morning again.")  # 30 tokens after its trigger


def bytes_per_token(model):
    """Bytes one decode step reads: every block's weights, the final LayerNorm and the output
    projection (int8 packed where quantized); the KV cache of a short context is negligible."""
    tensors = [t for t in model._decode_params() if t.numel()] + list(model.transformer.ln_f.parameters())
    tensors += list(model._head_int8) if model.quantized == "int8" else [model.lm_head.weight]
    return sum(t.numel() * t.element_size() for t in tensors)


def read_gb_s(size=1 << 30, repeat=5):
    """GB/s of a plain multi-threaded read (torch's sum, on the threads set) of a buffer far larger
    than the caches, best of `repeat`: the machine's streaming-read bandwidth."""
    buf = torch.ones(size // 4)
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        buf.sum()
        best = max(best, size / (time.perf_counter() - t0) / 1e9)
    return best


def ours_tok_s(model, prompts, new_tokens, repeat, draft_tokens=0, luts=None):
    """Decode tok/s of our engine (prompt excluded) and the tokens it chose, best of `repeat` runs
    after one warm-up run (allocations, first-touch pages)."""
    from generate import Batcher, SamplingParams, Sequence
    batcher = Batcher(model, max_batch=len(prompts), draft_tokens=draft_tokens)
    params = SamplingParams(max_new_tokens=new_tokens, do_sample=False, ignore_eos=True)
    best = float("inf")
    for run in range(repeat + 1):
        seqs = [Sequence(p, params, NoTokenizer(), lut) for p, lut in zip(prompts, luts or [None] * len(prompts))]
        batcher.admit(seqs)
        t0 = time.perf_counter()
        while batcher.seqs:
            batcher.step()
        if run:
            best = min(best, time.perf_counter() - t0)
    return sum(len(s.out_ids) - 1 for s in seqs) / best, [s.out_ids for s in seqs]


def hf_tok_s(hf, prompts, new_tokens, repeat):
    """transformers' generate(), greedy, all prompts as one batch; tok/s and the tokens."""
    ids = torch.tensor(prompts)
    run = lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        out = run()
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
    return len(prompts) * new_tokens / best, out[:, ids.size(1):].tolist()


def load_hf(snapshot):
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(snapshot, dtype=torch.float32).eval()


def llama_cpp_figures(args, snapshot, targets):
    """llama.cpp's f32 and q8_0 figures for this model (after checking that its f32 GGUF is the
    same model: transformers' greedy tokens), or None without --llama_cpp."""
    if not args.llama_cpp:
        return None
    import llama_cpp as peer
    try:
        if targets is not None:
            targets.check("llama.cpp's f32 GGUF gives transformers' greedy tokens",
                          peer.check_greedy(args.llama_cpp, snapshot))
        return peer.measure(args.llama_cpp, snapshot, threads=args.threads, new_tokens=args.new_tokens,
                            batch=args.batch, types=("f32", "q8_0"))
    except peer.PeerError as e:  # a missing binary or a failed conversion: say which, no traceback
        sys.exit(f"error: {e}")


def speculative(model, targets, args):
    """tok/s with drafts off and on: recalling a taught 30-token label, and copying from the prompt."""
    from lut_store import LUTStore
    from tokenizer import get_tokenizer
    tok = get_tokenizer(model.tokenizer_spec)
    with tempfile.TemporaryDirectory() as d:
        store = LUTStore(os.path.join(d, "luts.sqlite"))
        store.teach(model, tok, "bench", SPEC_LABEL)
        lut = store.load("bench", model)
        store.close()
    trigger = tok.encode("Quillmere Station")
    n_label = len(tok.encode(SPEC_LABEL)) - len(trigger)
    passage = tok.encode(" The harbour lay quiet under a grey sky, and the boats knocked softly against the stone "
                         "quay while the gulls circled above the market and the bells rang for the morning tide.")
    cases = [("recalling a taught label", trigger, n_label, lut),
             ("copying from the prompt", passage + tok.encode("\n\nAgain:") + passage[:6], len(passage) - 6, None)]
    for what, prompt, n, row_lut in cases:
        plain, plain_ids = ours_tok_s(model, [prompt], n, args.repeat, 0, [row_lut])
        drafted, drafted_ids = ours_tok_s(model, [prompt], n, args.repeat, 8, [row_lut])
        print(f"speculative, {what} ({n} tokens): {plain:7.1f} tok/s plain, {drafted:7.1f} tok/s with drafts "
              f"({drafted / plain:.2f}x)")
        targets.check(f"speculative decoding gives plain greedy's tokens ({what})", drafted_ids == plain_ids)


def server_rss_mb(env, model_type, quantize):
    """Resident memory of an api_server.py serving model_type after one /generate: (now, peak) MB."""
    with tempfile.TemporaryDirectory() as d:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        args = [sys.executable, os.path.join(ROOT, "api_server.py"), "--port", str(port), "--device", "cpu",
                "--model_type", model_type, "--anonymous_rate_per_minute", "0", "--lut_db", f"{d}/luts.sqlite",
                "--state_db", f"{d}/server.sqlite", "--models_dir", f"{d}/out"]
        proc = subprocess.Popen(args + (["--quantize", quantize] if quantize else []), cwd=d, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(1200):
                try:
                    if requests.get(f"http://127.0.0.1:{port}/api/status", timeout=2).json().get("model_loaded"):
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.5)
            requests.post(f"http://127.0.0.1:{port}/generate", json={"prompt": "Hello", "length": 16},
                          timeout=600).raise_for_status()
            status = open(f"/proc/{proc.pid}/status").read()
            kb = lambda key: int(status.split(key + ":")[1].split()[0])
            return kb("VmRSS") / 1024, kb("VmHWM") / 1024
        finally:
            proc.terminate()
            proc.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama_cpp", default=None, help="a llama.cpp source tree with its build in build/bin "
                   "(llama-bench, llama-batched-bench) and convert_hf_to_gguf.py; without it the peer is absent")
    p.add_argument("--xl", action="store_true", help="also GPT-2-XL (1.5B): int8 speed, peak RSS of sample.py fp32 "
                   "and int8, server RSS (writes 6.2 GB of random weights to a temporary directory)")
    p.add_argument("--xl_only", action="store_true", help="only the GPT-2-XL part (implies --xl)")
    p.add_argument("--n_layer", type=int, default=None, help="layers of the 124M-shaped model (default 12)")
    p.add_argument("--prompt_len", type=int, default=8, help="prompt tokens per sequence")
    p.add_argument("--new_tokens", type=int, default=128, help="tokens generated per sequence")
    p.add_argument("--xl_tokens", type=int, default=32, help="tokens generated per sequence on GPT-2-XL")
    p.add_argument("--batch", type=int, default=8, help="sequences decoded together in the batched measurement")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (best kept)")
    p.add_argument("--turns", type=int, default=3, help="turns ours and llama.cpp each take, alternating (best kept)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every engine")
    p.add_argument("--no_spec", action="store_true", help="skip the speculative-decoding measurements")
    args = p.parse_args()
    if min(args.repeat, args.turns, args.threads) < 1:
        p.error("--repeat, --turns and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    hf_home = tempfile.mkdtemp(prefix="bench_decode_")
    os.environ.update(HF_HOME=hf_home, HF_HUB_OFFLINE="1")  # before huggingface_hub is imported
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(args.threads))
    from model import load_model
    targets = Targets()
    if args.xl_only:
        xl(args, hf_home, env, targets)
        return targets.finish()

    shape = {"n_layer": args.n_layer} if args.n_layer else {}
    snap = random_hub_model(hf_home, "gpt2", **shape)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 50257, (args.batch, args.prompt_len), generator=g).tolist()
    print(f"GPT-2 124M shape{f' ({args.n_layer} layers)' if args.n_layer else ''}, random weights, CPU, "
          f"{args.threads} threads, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy")
    hf = load_hf(snap)
    hf_fig = {b: hf_tok_s(hf, prompts[:b], args.new_tokens, max(1, args.repeat - 1)) for b in (1, args.batch)}
    models = {q: load_model("gpt2", quantize=q) for q in (None, "int8")}
    ours, tokens, turns = {}, {}, []  # turns: (plain read GB/s, {q: one stream's tok/s}) of each turn

    def measure_ours():  # before and after the peer, best kept: a shared machine's load drifts
        turns.append((read_gb_s(), {}))
        for q, model in models.items():
            for b in (1, args.batch):
                tps, tokens[q, b] = ours_tok_s(model, prompts[:b], args.new_tokens, args.repeat)
                ours[q, b] = max(tps, ours.get((q, b), 0))
                if b == 1:
                    turns[-1][1][q] = tps
    measure_ours()
    peer = llama_cpp_figures(args, snap, targets)
    for _ in range(args.turns - 1 if peer else 0):  # ours and llama.cpp take turns, each side's best
        measure_ours()  # kept: this VM's memory bandwidth drifts by tens of percent within minutes
        again = llama_cpp_figures(args, snap, None)
        peer = {t: {k: max(v, again[t][k]) for k, v in f.items()} for t, f in peer.items()}
    print(f"{'decode tok/s':24}{'1 stream':>10}{f'batch {args.batch}':>10}")
    rows = [("ours fp32", ours[None, 1], ours[None, args.batch]), ("ours int8", ours["int8", 1], ours["int8", args.batch]),
            ("transformers fp32", hf_fig[1][0], hf_fig[args.batch][0])]
    rows += [(f"llama.cpp {t}", f["single"], f["batch"]) for t, f in (peer or {}).items()]
    for name, single, batch in rows:
        print(f"{name:24}{single:10.1f}{batch:10.1f}")
    if peer is None:
        print("llama.cpp: not measured (give --llama_cpp DIR); comparing with transformers only")
    else:
        for ours_q, t in ((None, "f32"), ("int8", "q8_0")):
            for b, key in ((1, "single"), (args.batch, "batch")):
                r = ours[ours_q, b] / peer[t][key]
                targets.check(f"{'int8' if ours_q else 'fp32'} {'1 stream' if b == 1 else f'batch {b}'}: "
                              f"{r:.2f}x llama.cpp {t} (target >= 1.0x)", r >= 1.0)
        r = ours["int8", 1] / peer["q8_0"]["single"]
        targets.check(f"int8 1 stream: {r:.2f}x llama.cpp q8_0 (target >= 1.5x)", r >= 1.5)
    # each turn's stream against the read just before it (the bandwidth drifts between turns); the
    # best turn is kept, as for the speeds
    share = {}
    for q, name in ((None, "fp32"), ("int8", "int8")):
        per_turn = [(bytes_per_token(models[q]) * tps[q] / 1e9, read) for read, tps in turns]
        gb, read = max(per_turn, key=lambda t: t[0] / t[1])
        share[q] = gb / read
        print(f"{name} 1 stream reads {bytes_per_token(models[q]) / 1e6:.0f} MB a token: {gb:.1f} GB/s, "
              f"{gb / read:.0%} of a plain {args.threads}-thread read just before it ({read:.1f} GB/s; turns: "
              f"{', '.join(f'{g / r:.0%} of {r:.1f}' for g, r in per_turn)})")
    targets.check(f"int8 1 stream at {share['int8']:.0%} of the streaming-read bandwidth (target >= 80%)",
                  share["int8"] >= 0.8)
    r = ours["int8", 1] / hf_fig[1][0]
    targets.check(f"int8 1 stream: {r:.1f}x transformers fp32 (target >= 4x)", r >= 4)
    targets.check("fp32 greedy tokens identical to transformers", tokens[None, 1] == hf_fig[1][1])
    agree = sum(a == b for a, b in zip(tokens[None, 1][0], tokens["int8", 1][0])) / args.new_tokens
    print(f"int8 greedy tokens equal to fp32's: {agree:.0%} (random weights: near-ties everywhere; "
          f"bench/quality.py measures trained models)")
    del hf
    if not args.no_spec:
        speculative(models["int8"], targets, args)
    del models
    if args.xl:
        xl(args, hf_home, env, targets)
    targets.finish()


def xl(args, hf_home, env, targets):
    """GPT-2-XL: int8 single-stream speed against the peers, and memory."""
    from model import load_model
    print("\nGPT-2-XL shape (1.56B), random weights")
    snap = random_hub_model(hf_home, "gpt2-xl")
    weights_mb = os.path.getsize(os.path.join(snap, "model.safetensors")) / 2**20
    prompt = [list(range(args.prompt_len))]
    t0 = time.perf_counter()
    model = load_model("gpt2-xl", quantize="int8")
    print(f"load_model('gpt2-xl', quantize='int8'): {time.perf_counter() - t0:.1f} s from the fp32 file")
    int8, _ = ours_tok_s(model, prompt, args.xl_tokens, max(1, args.repeat - 1))
    hf = load_hf(snap)
    hf_fig, _ = hf_tok_s(hf, prompt, args.xl_tokens // 2, 1)
    del hf
    peer = None
    if args.llama_cpp:
        import llama_cpp
        peer = llama_cpp.bench_single(args.llama_cpp, llama_cpp.convert(args.llama_cpp, snap, "q8_0"), args.threads,
                                      args.xl_tokens)
        int8 = max(int8, ours_tok_s(model, prompt, args.xl_tokens, max(1, args.repeat - 1))[0])  # as for 124M
    del model
    print(f"1 stream tok/s: ours int8 {int8:.2f}, transformers fp32 {hf_fig:.2f}"
          + (f", llama.cpp q8_0 {peer:.2f}" if peer else ", llama.cpp not measured"))
    if peer:
        r = int8 / peer
        targets.check(f"XL int8 1 stream: {r:.2f}x llama.cpp q8_0 (target >= 1.0x)", r >= 1.0)
    else:
        r = int8 / hf_fig
        targets.check(f"XL int8 1 stream: {r:.1f}x transformers fp32 (target >= 6x)", r >= 6)
    sample = ["sample.py", "--init_from", "gpt2-xl", "--start", "Hello", "--max_new_tokens", "8", "--device", "cpu"]
    fp32_rss = peak_rss_mb(sample, env)
    int8_rss = peak_rss_mb(sample + ["--quantize", "int8"], env)
    targets.check(f"sample.py fp32 peak RSS {fp32_rss:.0f} MB = {fp32_rss / weights_mb:.2f}x the weights' "
                  f"{weights_mb:.0f} MB (target <= 1.15x)", fp32_rss <= 1.15 * weights_mb)
    targets.check(f"sample.py int8 peak RSS {int8_rss:.0f} MB (target <= 2500 MB)", int8_rss <= 2500)
    now, peak = server_rss_mb(env, "gpt2-xl", "int8")
    print(f"api_server.py --model_type gpt2-xl --quantize int8 after a /generate: RSS {now:.0f} MB, peak {peak:.0f} MB")


if __name__ == "__main__":
    main()
