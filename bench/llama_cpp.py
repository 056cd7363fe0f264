"""
llama.cpp as a peer in the decode benchmark: convert a GPT-2 checkpoint (Hugging Face Hub layout)
to GGUF with llama.cpp's own converter, then let llama.cpp's own tools time it, so the figures are
llama.cpp's and not a re-implementation of them. Nothing of llama.cpp is imported or copied: its
converter and binaries are run from a checkout the user points at (built in <llama_dir>/build).

    python bench/llama_cpp.py --llama_dir /work/llama --model_dir /tmp/gpt2 --check

The converter's gguf package imports `sentencepiece` (even for GPT-2): install it, or put a
directory holding it on PYTHONPATH, which is passed through to the converter.
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile

GPT2_FILES = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # what convert_hf_to_gguf.py writes; others need llama-quantize
PROMPT_LEN = 32  # prompt tokens per sequence in the batched run, as in bench/decode.py


class PeerError(Exception):
    """llama.cpp (a binary, its converter or a conversion) is missing or failed."""


def _run(cmd, what, **kwargs):
    """Run a llama.cpp tool, returning its stdout; failures become PeerError with the tail of stderr,
    since that is where llama.cpp (and a Python traceback) says what went wrong."""
    try:
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace",
                           stdin=subprocess.DEVNULL, **kwargs)
    except OSError as e:
        raise PeerError(f"{what}: cannot run {cmd[0]}: {e}") from e
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
        raise PeerError(f"{what} failed (exit {r.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return r.stdout


def _binary(llama_dir, name):
    path = os.path.join(llama_dir, "build", "bin", name)
    if not os.access(path, os.X_OK):
        raise PeerError(f"{path} not found: build it with "
                        f"`cmake --build {os.path.join(llama_dir, 'build')} --target {name}`")
    return path


def write_tokenizer(model_dir):
    """The converter reads the tokenizer with transformers' AutoTokenizer from the model dir. GPT-2's
    own files are exactly tiktoken's encoder.json (= vocab.json) and vocab.bpe (= merges.txt);
    tiktoken's loader reads them from TIKTOKEN_CACHE_DIR, so this works offline where that is set."""
    from tiktoken.load import read_file_cached
    for src, dst in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        if not os.path.exists(os.path.join(model_dir, dst)):
            with open(os.path.join(model_dir, dst), "wb") as f:
                f.write(read_file_cached(GPT2_FILES + src))
    if not os.path.exists(os.path.join(model_dir, "tokenizer_config.json")):
        with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"model_max_length": 1024}, f)


def _gguf_string(path, key):
    """A string from a GGUF file's metadata, found by its key (so no gguf package is needed here):
    the key is followed by the value type (u32, 8 = string), the length (u64) and the bytes."""
    with open(path, "rb") as f:
        head = f.read(8 << 20)  # metadata (vocab and merges included) comes before the tensors
    i = head.find(key.encode())
    if i < 0:
        return None
    i += len(key)
    vtype, n = struct.unpack_from("<IQ", head, i)
    return head[i + 12:i + 12 + n].decode() if vtype == 8 else None


def _convert_hf(llama_dir, model_dir, outtype, outfile, log):
    converter = os.path.join(llama_dir, "convert_hf_to_gguf.py")
    if not os.path.exists(converter):
        raise PeerError(f"{converter} not found")
    write_tokenizer(model_dir)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (os.path.join(llama_dir, "gguf-py"), os.environ.get("PYTHONPATH")) if p))
    # The converter wants the legacy `n_ctx` key that the Hub's gpt2 config.json has; a config written
    # from GPT2Config lacks it. Convert from a scratch dir (links to the files, config with n_ctx
    # added) rather than rewriting the caller's config.json.
    with tempfile.TemporaryDirectory() as stage:
        for name in os.listdir(model_dir):
            if name != "config.json" and ".gguf" not in name:
                os.symlink(os.path.abspath(os.path.join(model_dir, name)), os.path.join(stage, name))
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
        config.setdefault("n_ctx", config.get("n_positions", 1024))
        with open(os.path.join(stage, "config.json"), "w") as f:
            json.dump(config, f)
        log(f"llama.cpp: converting {model_dir} to {outtype}")
        _run([sys.executable, converter, stage, "--outtype", outtype, "--outfile", outfile],
             f"convert_hf_to_gguf.py --outtype {outtype}", env=env)


def convert(llama_dir, model_dir, outtype, log=print):
    """model_dir/model-<outtype>.gguf, made by llama.cpp's converter (or llama-quantize from the f32
    one) unless one newer than model.safetensors is already there. Written under a temporary name and
    renamed when checked, so that a failed or interrupted run leaves no GGUF that would be reused."""
    out = os.path.join(model_dir, f"model-{outtype}.gguf")
    if os.path.exists(out) and os.path.getmtime(out) > os.path.getmtime(os.path.join(model_dir, "model.safetensors")):
        return out
    tmp = out + ".tmp"
    try:
        if outtype in CONVERTER_TYPES:
            _convert_hf(llama_dir, model_dir, outtype, tmp, log)
        else:
            src = convert(llama_dir, model_dir, "f32", log)
            log(f"llama.cpp: quantizing {src} to {outtype}")
            _run([_binary(llama_dir, "llama-quantize"), src, tmp, outtype], f"llama-quantize to {outtype}")
        # The converter names the pre-tokenizer from a hash of a tokenization; anything but "gpt-2"
        # means llama.cpp would split text differently from GPT-2.
        pre = _gguf_string(tmp, "tokenizer.ggml.pre")
        if pre != "gpt-2":
            raise PeerError(f"converter recognised the pre-tokenizer as {pre!r}, not 'gpt-2'")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def bench_single(llama_dir, gguf, threads, new_tokens):
    """Single-stream generation speed: llama-bench's tg test (no prompt), the best of its repetitions
    (bench/decode.py keeps the best of its own runs too)."""
    out = _run([_binary(llama_dir, "llama-bench"), "-m", gguf, "-p", "0", "-n", new_tokens, "-t", threads,
                "-o", "json"], "llama-bench")
    tests = [t for t in json.loads(out) if t["n_gen"] == new_tokens and t["n_prompt"] == 0]
    if not tests:
        raise PeerError(f"llama-bench printed no tg{new_tokens} result:\n{out[-2000:]}")
    return max(tests[0].get("samples_ts") or [tests[0]["avg_ts"]])


def bench_batch(llama_dir, gguf, threads, new_tokens, batch):
    """Batched generation speed (all sequences' new tokens / generation time), S_TG of llama-batched-bench.
    Each sequence has its own prompt, so the KV cache must hold batch * (prompt + new) tokens: the tool
    silently skips a configuration that does not fit."""
    n_ctx = batch * (PROMPT_LEN + new_tokens)
    out = _run([_binary(llama_dir, "llama-batched-bench"), "-m", gguf, "-c", n_ctx, "-b", 2048, "-ub", 512,
                "-npp", PROMPT_LEN, "-ntg", new_tokens, "-npl", batch, "-t", threads, "--output-format", "jsonl"],
               "llama-batched-bench")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    rows = [r for r in rows if r["pl"] == batch and r["tg"] == new_tokens]
    if not rows:
        raise PeerError(f"llama-batched-bench printed no result for B={batch}:\n{out[-2000:]}")
    return rows[0]["speed_tg"]


def measure(llama_dir, model_dir, threads=2, new_tokens=128, batch=8, types=("f32", "q8_0"), log=print):
    """model_dir: a GPT-2 in the Hugging Face Hub layout (config.json + model.safetensors, GPT2LMHeadModel
    naming without the 'transformer.' prefix, as openai-community/gpt2 has it; random weights).
    Returns {type: {"single": tok/s, "batch": tok/s}} measured by llama.cpp itself, or raises
    PeerError when a binary, the converter or a conversion is missing or fails."""
    results = {}
    for outtype in types:
        gguf = convert(llama_dir, model_dir, outtype, log)
        results[outtype] = {"single": bench_single(llama_dir, gguf, threads, new_tokens),
                            "batch": bench_batch(llama_dir, gguf, threads, new_tokens, batch)}
        log(f"llama.cpp {outtype}: {results[outtype]['single']:.1f} tok/s single, "
            f"{results[outtype]['batch']:.1f} tok/s at batch {batch}")
    return results


def start_server(llama_dir, gguf, slots, threads, ctx_per_slot=256, log_path=os.devnull):
    """A live llama-server on a free loopback port serving gguf with `slots` parallel sequences
    (-np) of ctx_per_slot tokens each, on `threads` threads -> (process, url) once /health is ok."""
    from common import free_port, wait_until_ready
    port = free_port()
    proc = subprocess.Popen([_binary(llama_dir, "llama-server"), "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
                             "-np", str(slots), "-c", str(slots * ctx_per_slot), "-t", str(threads), "-tb", str(threads),
                             "-cb"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(log_path, "w"))
    url = f"http://127.0.0.1:{port}"
    if not wait_until_ready(proc, url + "/health", lambda r: r.status_code == 200):
        raise PeerError(f"llama-server did not start (exit {proc.poll()}); its log: {log_path}")
    return proc, url


def check_greedy(llama_dir, model_dir, n=16, prompt="The quick brown fox", log=print):
    """True when llama.cpp's greedy continuation of `prompt` with the f32 GGUF is byte for byte the one
    transformers' GPT2LMHeadModel gives on the same files, i.e. the GGUF is the same model. Bytes, not
    text: a random model emits tokens that are fragments of UTF-8 characters."""
    import tiktoken
    import torch
    from transformers import GPT2LMHeadModel
    gguf = convert(llama_dir, model_dir, "f32", log)
    enc = tiktoken.get_encoding("gpt2")
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()  # ties lm_head to wte, as the Hub's gpt2
    ids = torch.tensor([enc.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=enc.eot_token)
    new = out[0, ids.shape[1]:].tolist()
    if enc.eot_token in new:  # llama-cli stops at end-of-text and prints nothing for it
        new = new[:new.index(enc.eot_token)]
    want = enc.decode_bytes(new)
    r = subprocess.run([_binary(llama_dir, "llama-cli"), "-m", gguf, "-p", prompt, "-n", str(n), "--temp", "0",
                        "--top-k", "1", "-no-cnv", "--no-display-prompt", "--no-warmup", "-t", "2"],
                       capture_output=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise PeerError(f"llama-cli failed (exit {r.returncode}):\n{r.stderr.decode(errors='replace')[-2000:]}")
    got = r.stdout.removesuffix(b"\n\n").removesuffix(b" [end of text]\n")  # what llama-cli adds at the end
    log(f"greedy continuation: transformers {want!r}, llama.cpp {got!r}")
    return got == want


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama_dir", required=True, help="llama.cpp checkout, built in <llama_dir>/build")
    parser.add_argument("--model_dir", required=True, help="GPT-2 in Hugging Face Hub layout (GGUFs are written here)")
    parser.add_argument("--threads", type=int, default=2, help="threads llama.cpp uses")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per sequence")
    parser.add_argument("--batch", type=int, default=8, help="sequences in the batched measurement")
    parser.add_argument("--types", default="f32,q8_0", help="comma-separated GGUF types (f32, f16, bf16, q8_0; "
                        "others such as q4_0 need llama-quantize built)")
    parser.add_argument("--check", action="store_true", help="first check that llama.cpp's greedy output "
                        "matches transformers' on the f32 GGUF")
    args = parser.parse_args()
    try:
        if args.check and not check_greedy(args.llama_dir, args.model_dir):
            sys.exit("llama.cpp's greedy output differs from transformers'")
        results = measure(args.llama_dir, args.model_dir, args.threads, args.new_tokens, args.batch,
                          tuple(args.types.split(",")))
    except PeerError as e:
        sys.exit(f"llama.cpp: {e}")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
