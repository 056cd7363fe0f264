"""Pieces the benchmarks share: target bookkeeping, random GPT-2s in the Hub layout, peak RSS."""
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from model import GPT, GPTConfig, PRETRAINED, from_state_dict  # noqa: E402


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(proc, url, ready, seconds=120):
    """Poll url until ready(response) is true -> True; False when proc exits or time runs out
    (proc is then killed)."""
    import time
    import requests
    for _ in range(int(seconds * 5)):
        try:
            if ready(requests.get(url, timeout=1)):
                return True
        except (requests.ConnectionError, requests.Timeout, ValueError):
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    return False


class Targets:
    """Each check prints its verdict; missed() says whether the run must exit non-zero."""

    def __init__(self):
        self.missed = []

    def check(self, what, ok):
        print(f"  [{'ok' if ok else 'MISSED'}] {what}")
        if not ok:
            self.missed.append(what)

    def finish(self):
        """Print the verdict and exit: 0 when every target was met, 1 otherwise."""
        print("all targets met" if not self.missed else f"{len(self.missed)} target(s) missed")
        sys.exit(1 if self.missed else 0)


class NoTokenizer:
    """Benchmarks feed token ids; text is not needed."""
    eot_token = None

    def token_bytes(self, token):
        return b""


def random_hub_model(hf_home, model_type, seed=0, **shape):
    """A random GPT-2 of model_type's shape (or `shape`: n_layer, n_head, n_embd) written as the
    Hub's openai-community/<model_type> into huggingface_hub's cache under hf_home, so that
    load_model(model_type) with HF_HUB_OFFLINE=1 takes the real loading path. Returns the snapshot
    directory (config.json, model.safetensors: the Hub's own naming, no 'transformer.' prefix)."""
    n_layer, n_head, n_embd = PRETRAINED[model_type]
    config = GPTConfig(**{"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, **shape})
    torch.manual_seed(seed)
    model = GPT(config)
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    repo = os.path.join(hf_home, "hub", f"models--openai-community--{model_type}")
    snap = os.path.join(repo, "snapshots", "0" * 40)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write("0" * 40)
    with open(os.path.join(snap, "config.json"), "w") as f:
        json.dump({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": config.n_layer,
                   "n_head": config.n_head, "n_embd": config.n_embd, "n_positions": config.block_size,
                   "n_ctx": config.block_size, "vocab_size": config.vocab_size, "layer_norm_epsilon": 1e-5}, f)
    save_fp32_safetensors(os.path.join(snap, "model.safetensors"), state)
    return snap


def save_fp32_safetensors(path, tensors):
    """Write fp32 tensors as .safetensors one at a time (safetensors' save_file first copies them
    all into memory: 12 GB at GPT-2-XL's size)."""
    header, offset = {}, 0
    for name, t in tensors.items():
        assert t.dtype == torch.float32 and t.is_contiguous()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + 4 * t.numel()]}
        offset += 4 * t.numel()
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for t in tensors.values():
            f.write(memoryview(t.numpy()).cast("B"))


def peak_rss_mb(argv, env):
    """Peak resident memory (VmHWM) of `python argv...` run from the repo root. Read from the
    child's own /proc at exit: getrusage's ru_maxrss would report the (larger) parent, which a
    fork+exec inherits as its high-water mark."""
    report = ("import atexit, runpy, sys; atexit.register(lambda: sys.stderr.write("
              "'VmHWM ' + open('/proc/self/status').read().split('VmHWM:')[1].split()[0])); "
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", report, *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    if r.returncode != 0 or "VmHWM " not in r.stderr:
        raise RuntimeError(f"{' '.join(argv)} failed: {r.stderr[-1000:]}")
    return int(r.stderr.rsplit("VmHWM ", 1)[1].split()[0]) / 1024


def paired_models(config):
    """A random GPT-2 in transformers and the very same weights in ours."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from model import hf_to_ours
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                                    n_positions=config.block_size, vocab_size=config.vocab_size)).eval()
    ours = from_state_dict(config, hf_to_ours(hf.state_dict()), "transformers model").eval()
    return ours, hf
