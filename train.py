"""
Train a GPT from scratch or fine-tune GPT-2, nanoGPT style.

    python data/shakespeare_char/prepare.py
    python train.py --config config/train_shakespeare_char.json           # a few minutes on a CPU
    python train.py --dataset shakespeare --init_from gpt2 --out_dir out/shakespeare --max_iters 20
    python train.py --init_from resume --out_dir out/shakespeare_char --max_iters 4000
    torchrun --standalone --nproc_per_node 8 train.py --dataset openwebtext    # DDP, one GPU each

Settings: the defaults below, then a JSON --config file, then flags. out_dir receives ckpt.pt (the
best model by validation loss, with its optimizer state for --init_from resume),
train_config.json (the settings used) and train_log.jsonl (one JSON record per log line).
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from model import DTYPES, GPT, PRETRAINED, GPTConfig, ModelLoadError, from_checkpoint, from_pretrained, resolve_device

DATASET_ALIASES = {"shakesphere": "shakespeare"}  # the spelling in the nanoGPT API's README


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # what to train, where it goes
    out_dir: str = opt("out/train", "directory for ckpt.pt, train_config.json and the logs")
    init_from: str = opt("scratch", "scratch, resume (from out_dir/ckpt.pt) or a GPT-2 type to fine-tune")
    dataset: str = opt("shakespeare_char", "a dataset prepared under data_dir (data/<name>/prepare.py)")
    data_dir: str = opt("data", "directory holding the prepared datasets")
    # model shape (scratch only; GPT-2 and resume take theirs from the checkpoint)
    n_layer: int = opt(12, "transformer blocks")
    n_head: int = opt(12, "attention heads")
    n_embd: int = opt(768, "embedding width")
    dropout: float = opt(0.0, "dropout rate (0 for pretraining, 0.1+ for small data)")
    bias: bool = opt(True, "biases in Linear and LayerNorm layers")
    block_size: int = opt(1024, "context length in tokens (GPT-2's 1024 is cropped if smaller)")
    # optimisation
    batch_size: int = opt(12, "sequences per micro-batch")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step (summed over DDP ranks)")
    learning_rate: float = opt(6e-4, "peak learning rate")
    max_iters: int = opt(5000, "optimizer steps to run (in total, counting those before a resume)")
    weight_decay: float = opt(0.1, "AdamW weight decay on matmul weights and embeddings")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0 = off)")
    decay_lr: bool = opt(True, "linear warmup, then cosine decay to min_lr")
    warmup_iters: int = opt(-1, "warmup steps (-1 = 5%% of max_iters)")
    lr_decay_iters: int = opt(-1, "steps over which the rate decays (-1 = max_iters)")
    min_lr: float = opt(-1.0, "final learning rate (-1 = learning_rate / 10)")
    # evaluation, logging, checkpoints
    eval_interval: int = opt(250, "evaluate (and maybe save) every this many steps, and at the end")
    eval_iters: int = opt(20, "batches per split for an evaluation")
    log_interval: int = opt(10, "print and log the training loss every this many steps")
    always_save_checkpoint: bool = opt(False, "save at every evaluation, not only when val loss improves")
    # system
    device: str = opt("auto", "cpu, cuda, cuda:N or auto (one GPU per process under torchrun)")
    dtype: str = opt("auto", "float32, or bfloat16 / float16 autocast (auto = bfloat16 on GPUs that have it, "
                             "else float32)")
    compile: bool = opt(False, "torch.compile the model (slow to start; worth it for long GPU runs)")
    seed: int = opt(1337, "random seed")

    def validate(self):
        """Raises ValueError naming the first setting that is out of range."""
        positive = ["n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps",
                    "max_iters", "eval_interval", "eval_iters", "log_interval"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("learning_rate", "weight_decay", "beta1", "beta2", "grad_clip"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a finite number >= 0")
        if not 0 < self.learning_rate <= 1:
            raise ValueError("learning_rate must be in (0, 1]")
        if not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise ValueError("beta1 and beta2 must be in [0, 1)")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.init_from not in ("scratch", "resume", *PRETRAINED):
            raise ValueError(f"init_from must be scratch, resume or one of {', '.join(PRETRAINED)}")
        if self.init_from in PRETRAINED and self.block_size > 1024:
            raise ValueError("block_size can be at most 1024 when fine-tuning GPT-2")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}")
        dataset_dir(self.data_dir, self.dataset)


def dataset_dir(data_dir, name):
    """data_dir/<name> if it holds a prepared dataset (aliases resolved); else ValueError."""
    name = DATASET_ALIASES.get(name, name)
    if not name or name.startswith(".") or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"dataset {name!r} is not a dataset name")
    path = os.path.join(data_dir, name)
    if not all(os.path.isfile(os.path.join(path, f)) for f in ("train.bin", "val.bin", "meta.json")):
        prepared = prepared_datasets(data_dir)
        raise ValueError(f"dataset {name!r} is not prepared (run python data/{name}/prepare.py); "
                         f"prepared: {', '.join(prepared) or 'none'}")
    return path


def prepared_datasets(data_dir):
    if not os.path.isdir(data_dir):
        return []
    return sorted(d for d in os.listdir(data_dir)
                  if os.path.isfile(os.path.join(data_dir, d, "train.bin"))
                  and os.path.isfile(os.path.join(data_dir, d, "meta.json")))


def parse_config(argv=None):
    """Defaults, then --config FILE (JSON), then flags. Exits with a message on bad settings."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="JSON file of settings (keys as the flags below)")
    for f in fields(TrainConfig):
        kind = argparse.BooleanOptionalAction if f.type is bool else None
        p.add_argument(f"--{f.name}", default=None, help=f.metadata["help"] + f" (default: {f.default})",
                       **({"action": kind} if kind else {"type": f.type}))
    args = vars(p.parse_args(argv))
    config_file = args.pop("config")
    flags = {k: v for k, v in args.items() if v is not None}
    settings = read_settings(config_file, p.error) if config_file else {}
    settings.update(flags)
    if settings.get("init_from") == "resume":  # carry on with the run's own settings unless overridden
        saved = os.path.join(settings.get("out_dir", TrainConfig.out_dir), "train_config.json")
        if os.path.isfile(saved):
            settings = {**read_settings(saved, p.error), **settings}
    cfg = TrainConfig(**settings)
    try:
        cfg.validate()
    except ValueError as e:
        p.error(str(e))
    return cfg


def read_settings(path, error):
    """A JSON object of TrainConfig settings, type-checked; error(message) on anything wrong."""
    try:
        with open(path) as fh:
            settings = json.load(fh)
    except (OSError, ValueError) as e:
        error(f"cannot read {path}: {e}")
    if not isinstance(settings, dict):
        error(f"{path} must hold a JSON object")
    types = {f.name: f.type for f in fields(TrainConfig)}
    for key, value in settings.items():
        if key not in types:
            error(f"{path}: unknown setting {key!r}")
        if types[key] is float and isinstance(value, int) and not isinstance(value, bool):
            settings[key] = float(value)
        elif not isinstance(value, types[key]) or (types[key] is int and isinstance(value, bool)):
            error(f"{path}: {key} must be of type {types[key].__name__}")
    return settings


# ---------------------------------------------------------------------------- training

class Batches:
    """Random windows of a uint16 token file, nanoGPT style."""

    def __init__(self, path, block_size, batch_size, device):
        self.path, self.block_size, self.batch_size, self.device = path, block_size, batch_size, device
        n = os.path.getsize(os.path.join(path, "train.bin")) // 2
        n_val = os.path.getsize(os.path.join(path, "val.bin")) // 2
        if min(n, n_val) <= block_size:
            raise ValueError(f"dataset {path} has too few tokens ({n} train, {n_val} val) for block_size {block_size}")

    def get(self, split):
        # a fresh memmap per batch: numpy memmaps that live long hold on to their pages (a slow leak)
        data = np.memmap(os.path.join(self.path, f"{split}.bin"), dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - self.block_size, (self.batch_size,))
        x = torch.stack([torch.from_numpy(data[i:i + self.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + self.block_size].astype(np.int64)) for i in ix])
        if self.device.startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y


def build_model(cfg, meta):
    """Returns (model, checkpoint or None, iter_num, best_val_loss)."""
    if cfg.init_from == "scratch":
        model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                          bias=cfg.bias, vocab_size=meta["vocab_size"], dropout=cfg.dropout)
        return GPT(GPTConfig(**model_args)), None, 0, float("inf")
    if cfg.init_from == "resume":
        ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        model, ckpt = from_checkpoint(ckpt_path)
        model.config.dropout = cfg.dropout
        for m in model.modules():  # dropout is a training choice, not part of the weights
            if isinstance(m, torch.nn.Dropout):
                m.p = cfg.dropout
        return model, ckpt, ckpt["iter_num"], ckpt["best_val_loss"]
    if meta["vocab_size"] != 50257 or meta["tokenizer"].get("type") != "tiktoken":
        raise ValueError(f"{cfg.init_from} needs a GPT-2 BPE dataset (like shakespeare); {cfg.dataset} has a "
                         f"vocabulary of {meta['vocab_size']}")
    model = from_pretrained(cfg.init_from, dropout=cfg.dropout)
    if cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
    return model, None, 0, float("inf")


def learning_rate(cfg, it):
    """Linear warmup, then cosine decay to min_lr (nanoGPT's schedule)."""
    warmup = cfg.warmup_iters if cfg.warmup_iters >= 0 else cfg.max_iters // 20
    decay_iters = cfg.lr_decay_iters if cfg.lr_decay_iters > 0 else cfg.max_iters
    min_lr = cfg.min_lr if cfg.min_lr >= 0 else cfg.learning_rate / 10
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < warmup:
        return cfg.learning_rate * (it + 1) / (warmup + 1)
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup) / max(1, decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - min_lr)


class Log:
    """Human progress on stdout; the same records as JSON lines in out_dir/train_log.jsonl."""

    def __init__(self, path, enabled):
        self.file = open(path, "a") if enabled else None

    def __call__(self, text, **record):
        if self.file:
            print(text, flush=True)
            self.file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
            self.file.flush()


def save_checkpoint(path, state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a reader (the server, a resume) never sees half a file


def distributed(cfg):
    """(ddp, rank, local_rank, world size, micro-batches per step on this process, device)."""
    if int(os.environ.get("RANK", -1)) == -1:  # not started by torchrun
        return False, 0, 0, 1, cfg.gradient_accumulation_steps, resolve_device(cfg.device, "float32")[0]
    from torch.distributed import init_process_group
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    init_process_group(backend="nccl" if use_cuda else "gloo")
    device = f"cuda:{local_rank}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(device)
    if cfg.gradient_accumulation_steps % world:
        raise ValueError(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be a multiple "
                         f"of the number of processes ({world})")
    return True, rank, local_rank, world, cfg.gradient_accumulation_steps // world, device


def precision(cfg, device):
    """(dtype name, device type, the autocast context of the forward passes)."""
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float16" and not device.startswith("cuda"):
        raise ValueError("dtype float16 needs a CUDA device")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (contextlib.nullcontext() if dtype == "float32"
                else torch.autocast(device_type=device_type, dtype=DTYPES[dtype]))
    return dtype, device_type, autocast


@torch.no_grad()
def estimate_loss(model, batches, eval_iters, autocast):
    model.eval()
    out = {}
    for split in ("train", "val"):
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            x, y = batches.get(split)
            with autocast:
                _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def step(model, optimizer, scaler, batches, batch, accum, ddp, autocast, grad_clip):
    """One optimizer step over accum micro-batches, starting with batch; returns (the last
    micro-batch's loss, the next batch)."""
    x, y = batch
    for micro_step in range(accum):
        last = micro_step == accum - 1
        # DDP: all-reduce gradients only on the last micro-step
        sync = model.no_sync() if ddp and not last else contextlib.nullcontext()
        with sync, autocast:
            _, loss = model(x, y)
            loss = loss / accum
        x, y = batches.get("train")  # fetch the next batch while the GPU works
        scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss, (x, y)


def prepare(cfg, device, device_type, ddp, local_rank, master):
    """The model (wrapped for compile and DDP as asked), the same unwrapped, its optimizer, the
    data, the dataset's metadata, and the iteration and best validation loss to start from."""
    data_path = dataset_dir(cfg.data_dir, cfg.dataset)
    with open(os.path.join(data_path, "meta.json")) as f:
        meta = json.load(f)
    model, ckpt, iter_num, best_val_loss = build_model(cfg, meta)
    block_size = model.config.block_size  # a resumed run's own; GPT-2's if smaller than asked
    batches = Batches(data_path, block_size, cfg.batch_size, device)
    model.to(device).train()
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "train_config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
    return model, raw_model, optimizer, batches, meta, iter_num, best_val_loss


def train(cfg):
    ddp, rank, local_rank, world, accum, device = distributed(cfg)
    master = rank == 0
    dtype, device_type, autocast = precision(cfg, device)
    torch.manual_seed(cfg.seed + rank)
    model, raw_model, optimizer, batches, meta, iter_num, best_val_loss = prepare(
        cfg, device, device_type, ddp, local_rank, master)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    log = Log(os.path.join(cfg.out_dir, "train_log.jsonl"), master)
    tokens_per_iter = accum * world * cfg.batch_size * raw_model.config.block_size
    log(f"training {raw_model.get_num_params() / 1e6:.2f}M parameters on {device} ({dtype}), "
        f"{tokens_per_iter:,} tokens per step, from iteration {iter_num} to {cfg.max_iters}",
        event="start", iter=iter_num, device=device, dtype=dtype, tokens_per_iter=tokens_per_iter)
    batch = batches.get("train")
    t0, steps_timed = time.time(), 0
    while True:
        lr = learning_rate(cfg, iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
            losses = estimate_loss(model, batches, cfg.eval_iters, autocast)
            improved = losses["val"] < best_val_loss
            best_val_loss = min(best_val_loss, losses["val"])
            saved = master and (improved or cfg.always_save_checkpoint)
            if saved:
                save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "model_args": asdict(raw_model.config), "iter_num": iter_num, "best_val_loss": best_val_loss,
                    "config": asdict(cfg), "tokenizer": meta["tokenizer"]})
            log(f"eval {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                + (", saved ckpt.pt" if saved else ""), event="eval", iter=iter_num, train_loss=losses["train"],
                val_loss=losses["val"], saved=saved)
            t0, steps_timed = time.time(), 0  # evaluation time is not training time
        if iter_num >= cfg.max_iters:
            break
        loss, batch = step(model, optimizer, scaler, batches, batch, accum, ddp, autocast, cfg.grad_clip)
        iter_num += 1
        steps_timed += 1
        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            dt = (time.time() - t0) / steps_timed
            t0, steps_timed = time.time(), 0
            train_loss = loss.item() * accum  # costs a sync: only on log steps
            log(f"iter {iter_num}/{cfg.max_iters}: loss {train_loss:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/step, "
                f"{tokens_per_iter / dt:,.0f} tokens/s", event="iter", iter=iter_num, loss=train_loss, lr=lr,
                tokens_per_s=tokens_per_iter / dt)
    log(f"done: best val loss {best_val_loss:.4f}, checkpoint {os.path.join(cfg.out_dir, 'ckpt.pt')}",
        event="done", iter=iter_num, best_val_loss=best_val_loss)
    if ddp:
        from torch.distributed import destroy_process_group
        destroy_process_group()


def main(argv=None):
    cfg = parse_config(argv)
    try:
        train(cfg)
    except (ModelLoadError, ValueError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")


if __name__ == "__main__":
    main()
