"""
GPT-2 written by hand, nanoGPT style, with a KV cache for fast generation and a hook for
per-user lookup tables (see lut.py). Parameter names follow Hugging Face's GPT-2 so the
Hub checkpoints map onto it directly (Conv1D weights kept in their (in, out) layout).

References: OpenAI's GPT-2 (tensorflow) and Hugging Face's modeling_gpt2.py.
"""
import ctypes
import hashlib
import json
import math
import mmap
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

import cpu_kernels

_libc = ctypes.CDLL(None)  # madvise() on any address range (mmap objects only cover their own)

PRETRAINED = {  # model_type -> (n_layer, n_head, n_embd)
    "gpt2": (12, 12, 768),  # 124M
    "gpt2-medium": (24, 16, 1024),  # 350M
    "gpt2-large": (36, 20, 1280),  # 774M
    "gpt2-xl": (48, 25, 1600),  # 1558M
}
HUB_ORG = "openai-community"
FEW_ROWS = 16  # a pass of one sequence up to this many tokens runs its blocks in one call (drafts, short prompts)
KERNEL_ROWS = 512  # up to this many rows, fp32 CPU inference matmuls use cpu_kernels.py (past it, MKL's addmm)
QUANTIZE = ("int8",)  # --quantize choices (CPU): int8 weights, see cpu_kernels.py
INT8_CPU_ONLY = ("--quantize int8 is a CPU path for float32 weights; on CUDA use --dtype float16 or bfloat16 "
                 "(tensor cores beat int8 kernels at GPT-2's sizes)")


class ModelLoadError(Exception):
    """Weights or a checkpoint could not be had; the message says what to do."""


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in Linears and LayerNorms
    layer_norm_epsilon: float = 1e-5


class Conv1D(nn.Module):
    """A Linear whose weight is stored (in, out), as GPT-2's checkpoints store it, so they load
    without a transpose (memory-mapped; see load_model); x @ W in this layout is also faster on
    CPU for the few-row matmuls of decoding than nn.Linear's x @ W.T. quantize_int8() swaps the
    weight for int8 (cpu_kernels.py); the bias stays fp32."""

    def __init__(self, n_in, n_out, bias=True):
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None
        self.qweight = self.qscale = None

    def forward(self, x):
        shape = x.shape[:-1] + (self.n_out,)
        x = x.reshape(-1, x.size(-1))
        if self.qweight is not None:
            y = cpu_kernels.linear_int8(x, self.qweight, self.qscale, self.bias, self.n_out)
        elif x.size(0) <= KERNEL_ROWS and cpu_kernels.cpu_fp32(self.weight) and cpu_kernels.fast_f32():
            # decode steps, drafts, prompts: cpu_kernels.py's matmul beats MKL's addmm on 2 threads,
            # 1.5-2.5x for a few rows, 1.05-1.3x for hundreds (docs/performance.md)
            y = cpu_kernels.linear_f32(x, self.weight, self.bias)
        else:
            y = x @ self.weight if self.bias is None else torch.addmm(self.bias, x, self.weight)
        return y.view(shape)

    def quantize_int8(self, empty=lambda shape, dtype: torch.empty(shape, dtype=dtype)):
        """Replace the fp32 weight by int8 with a scale per output column (the packed weight from
        empty(shape, dtype)). Returns the old weight."""
        old = self.weight
        self.qweight, self.qscale = cpu_kernels.pack_int8(old.detach(), empty=empty)
        self.weight = None
        return old


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v together
        self.c_proj = Conv1D(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x, cache=None, pos=None, lengths=None):
        """cache: (k, v) tensors (B, nh, T_cap, hs) of this layer, or None.
        T > 1 writes positions pos..pos+T-1 (pos = 0: a prefill; pos > 0: a run of draft tokens
        to verify, or a prompt's next piece, each attending causally to the cache before it);
        T == 1 (decode) writes each row at pos[b] and attends to its first lengths[b] = pos[b] + 1 positions."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            ck, cv = cache
            if T > 1:  # a prefill, or drafts after what is cached
                ck[:, :, pos:pos + T] = k
                cv[:, :, pos:pos + T] = v
                if pos > 0:  # drafts, or a prompt's next piece: each token attends to what precedes it
                    if cpu_kernels.cpu_fp32(q) and T <= FEW_ROWS:  # a few drafts: as their own decode steps would
                        # (for a long piece, torch's fused attention below is 2-4x faster than this per-query kernel)
                        y = cpu_kernels.attend(q, ck, cv, lengths)
                    else:
                        k, v = ck[:, :, :pos + T], cv[:, :, :pos + T]
                        causal = torch.arange(pos + T, device=x.device) <= pos + torch.arange(T, device=x.device)[:, None]
                        y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)  # (B, nh, T, hs)
                    return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))
            else:  # decode: append one position per row, attend to everything cached so far
                if isinstance(pos, int):  # all rows at the same position: plain slice write
                    ck[:, :, pos] = k[:, :, 0]
                    cv[:, :, pos] = v[:, :, 0]
                else:
                    rows = torch.arange(B, device=x.device)
                    ck[rows, :, pos] = k[:, :, 0]
                    cv[rows, :, pos] = v[:, :, 0]
                if cpu_kernels.cpu_fp32(q):  # reads each row's own length: no mask, no slicing
                    y = cpu_kernels.attend(q, ck, cv, lengths).transpose(1, 2).reshape(B, T, C)
                    return self.resid_dropout(self.c_proj(y))
                length = int(lengths.max())
                k, v = ck[:, :, :length], cv[:, :, :length]
        if T == 1 and not self.training:  # one query sees all cached keys, in plain matmuls (torch's
            # fused attention spends ~2 ms a call on one query on a CPU)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, 1, L)
            if lengths is not None:  # hide the tail of shorter rows
                att = att.masked_fill(torch.arange(k.size(2), device=x.device) >= lengths.view(B, 1, 1, 1),
                                      float("-inf"))
            y = att.softmax(dim=-1) @ v  # (B, nh, 1, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = Conv1D(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, pos=None, lengths=None):
        x = x + self.attn(self.ln_1(x), cache, pos, lengths)
        x = x + self.mlp(self.ln_2(x))
        return x


class KVCache:
    """Keys and values of every layer for up to max_batch rows. Rows are independent sequences
    of different lengths; memory follows use. On the CPU kernels' path the whole context is
    reserved at once, uninitialised: only the pages written become resident, and a long prompt
    never stalls the running rows while the cache is copied into a larger one (docs/performance.md,
    chunked prefill). Elsewhere (zeros, on a GPU) the capacity doubles on demand."""

    def __init__(self, config, max_batch, device, dtype, capacity=256):
        self.shape = (max_batch, config.n_head, 0, config.n_embd // config.n_head)
        self.n_layer, self.device, self.dtype = config.n_layer, device, dtype
        self.max_len = config.block_size
        self.lazy = torch.device(device).type == "cpu" and dtype == torch.float32 and cpu_kernels.ops() is not None
        self.k, self.v = [], []
        self.reserve(self.max_len if self.lazy else capacity)

    def reserve(self, length):
        """Make room for `length` positions per row. Slots past a row's length are never read by
        cpu_kernels.attend, so on its path they stay uninitialised (no page is touched before use);
        elsewhere they are zeros, so masked slots are never NaN."""
        cap = self.k[0].size(2) if self.k else 0
        if length <= cap or cap == self.max_len:
            return
        new_cap = min(max(length, 2 * cap), self.max_len)
        B, nh, _, hs = self.shape
        alloc = lambda n: (torch.empty if self.lazy else torch.zeros)(B, nh, n, hs, device=self.device, dtype=self.dtype)
        if self.k:
            self.k = [torch.cat([t, alloc(new_cap - cap)], dim=2) for t in self.k]
            self.v = [torch.cat([t, alloc(new_cap - cap)], dim=2) for t in self.v]
        else:
            self.k = [alloc(new_cap) for _ in range(self.n_layer)]
            self.v = [alloc(new_cap) for _ in range(self.n_layer)]

    def rows(self, lo, hi):
        """Per-layer (k, v) views of rows lo..hi-1, written through by the model."""
        return [(k[lo:hi], v[lo:hi]) for k, v in zip(self.k, self.v)]

    def move_row(self, src, dst, length):
        """Copy row src into row dst (used to keep the live rows packed at the front)."""
        for t in self.k + self.v:
            t[dst, :, :length] = t[src, :, :length]


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # scaled init of residual projections, per GPT-2 paper
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.source = "scratch"  # where the weights came from, for status pages and LUT ownership
        self.quantized = None  # "int8" after quantize_int8()
        self._fingerprint = None  # pinned by pin_fingerprint() (load_model, quantize_int8)
        self._decode_param_list = None  # built on first use; quantize_int8() swaps weights and clears it

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, Conv1D)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        n_params = sum(p.numel() for p in self.parameters()) + sum(  # int8 weights are buffers
            m.n_in * m.n_out for m in self.modules() if isinstance(m, Conv1D) and m.qweight is not None)
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None, *, cache=None, pos=None, logits_at=None, lut=None):
        """idx: (B, T) token ids.
        targets: (B, T) next-token ids for the training loss (-1 = ignore).
        cache: KVCache.rows(...) for these B rows; with T > 1 the rows are filled from position
            pos (an int: 0 for prompts, right-padded, padding only ever following real tokens so
            causality keeps it out of them; more to verify drafts or prefill a prompt's next piece),
            with T == 1 pos says where each row's token goes: an int when all rows agree, else a (B,) tensor.
        logits_at: (B,) index of the single position per row whose logits are wanted.
        lut: a lut.LUTBatch that adds its values to the final residual where a taught trigger fired.
        Returns logits (B, T, V), or (B, V) with logits_at; and the loss (None without targets)."""
        device = idx.device
        B, T = idx.size()
        assert (pos if isinstance(pos, int) else 0) + T <= self.config.block_size, "sequence exceeds block_size"
        lengths = None  # decode and drafts: keys each row's first query attends to
        if cache is not None and T == 1:
            positions = torch.full((B, 1), pos, dtype=torch.long, device=device) if isinstance(pos, int) else pos.view(B, 1)
            lengths = positions.view(B) + 1
        else:
            start = pos or 0
            positions = torch.arange(start, start + T, dtype=torch.long, device=device)[None, :]  # (1, T)
            lengths = torch.full((B,), start + 1, dtype=torch.long, device=device)
        if cache is not None and T == 1 and lut is None and logits_at is None and self._one_call_decode(B, T):
            return self._decode_step(idx, cache, positions), None  # the usual decode step, in one call
        x = self.transformer.drop(self._embed(idx, positions))
        if cache is not None and self._one_call_decode(B, T):
            x = cpu_kernels.decode_layers(x, self._decode_params(), cache, positions, self.config)
        else:
            for layer, block in enumerate(self.transformer.h):
                x = block(x, None if cache is None else cache[layer], pos, lengths)
        if lut is not None:
            x = lut.apply(x)  # values are added to the final residual of matched positions
        if logits_at is not None:
            x = x[torch.arange(B, device=device), logits_at]  # (B, n_embd)
        logits = self._lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _embed(self, idx, positions):
        """Token plus position embeddings of idx (any shape) at positions (broadcast to it)."""
        if self.quantized == "int8":  # the packed head's rows: the fp32 table is never read (memory)
            tok_emb = cpu_kernels.unpack_columns(*self._head_int8, idx, self.config.n_embd)
        else:
            tok_emb = self.transformer.wte(idx)
        return tok_emb + self.transformer.wpe(positions)

    def forward_tokens(self, idx, rows, positions, cache, logits_for):
        """One cached pass over tokens of several rows at once, each token on its own: idx, rows,
        positions (N,) long; token i goes to position positions[i] of cache row rows[i] (cache:
        KVCache.rows(0, n)) and sees that row's positions up to it, tokens of the same row given
        in order. So a decode step of some rows and the prompts (or a prompt's next piece) of
        others share one read of the weights. CPU inference in one call only
        (one_call_tokens(N) must hold); no LUT. Returns the logits (len(logits_for), V) of the
        tokens at indices logits_for."""
        assert self.one_call_tokens(idx.numel())
        x = cpu_kernels.decode_tokens(self._embed(idx, positions), self._decode_params(), cache, positions, rows,
                                      self.config)
        return self._lm_head(self.transformer.ln_f(x[logits_for]))

    def one_call_tokens(self, n):
        """Whether a cached pass of n tokens can run its blocks in one call to cpu_kernels.py: CPU
        fp32 (or int8) inference, fp32 with the AVX-512 kernel, up to KERNEL_ROWS tokens."""
        if self.training or not cpu_kernels.cpu_fp32(self.transformer.wpe.weight) or n > KERNEL_ROWS:
            return False
        return self.quantized == "int8" or cpu_kernels.fast_f32()

    def _one_call_decode(self, B, T):
        """Whether a cached pass of B rows of T tokens runs its blocks in one call to cpu_kernels.py
        (the same ops as Block.forward): CPU inference of a decode step (a token per row, any
        batch), or of up to FEW_ROWS tokens a row (drafts to verify, short prompts, up to
        KERNEL_ROWS tokens in all); fp32 needs the AVX-512 kernel. Drafts share it so that
        verifying them costs what plain decoding does per weight read (they took the per-op path,
        2 ms slower); an fp32 batch of 32 decodes 2.6x faster than through the per-op path, and 8
        fp32 prompts of 9 tokens prefill 1.4x faster (docs/performance.md). Longer prompts take
        the per-op path, whose fused attention beats the kernel's per-query one there."""
        return T <= FEW_ROWS and self.one_call_tokens(B * T)

    def _decode_step(self, idx, cache, positions):
        """Logits (B, 1, V) of a decode step without a LUT firing, from cpu_kernels.decode_step: the
        embeddings, the blocks, ln_f and the output projection in one call (the Python around
        them cost ~0.5 ms a token, 15% of an int8 124M step: docs/performance.md)."""
        if self.quantized == "int8":
            wte, (head, scale) = cpu_kernels.ABSENT, self._head_int8
        else:
            wte, head, scale = self.transformer.wte.weight, self._head_transposed(), cpu_kernels.ABSENT
        return cpu_kernels.decode_step(idx.reshape(-1).contiguous(), positions.reshape(-1).contiguous(), wte,
                                       self.transformer.wpe.weight, self._decode_params(), cache,
                                       self.transformer.ln_f, head, scale, self.config).unsqueeze(1)

    def _decode_params(self):
        """Every block's weights in the order cpu_kernels.decode_layers reads them. Kept between steps
        (building it walks ~400 module attributes: 0.2 ms, 1% of a 124M step): the Parameters in it
        see in-place updates and .data swaps (to_huge_pages, .to()); a module given new tensors
        (quantize_int8) clears it."""
        if self._decode_param_list is None:
            params = []
            for block in self.transformer.h:
                for m in (block.ln_1, block.attn.c_attn, block.attn.c_proj, block.ln_2, block.mlp.c_fc,
                          block.mlp.c_proj):
                    if isinstance(m, nn.LayerNorm):
                        params += [m.weight, m.bias]
                    else:
                        params += [m.weight, None, m.bias] if m.qweight is None else [m.qweight, m.qscale, m.bias]
            self._decode_param_list = [cpu_kernels.ABSENT if p is None else p for p in params]
        return self._decode_param_list

    def _lm_head(self, x):
        w = self.lm_head.weight  # (vocab, n_embd), tied to wte
        if self.quantized == "int8":
            packed, scale = self._head_int8
            return cpu_kernels.linear_int8(x.reshape(-1, x.size(-1)), packed, scale, None, w.size(0)).view(
                *x.shape[:-1], w.size(0))
        if torch.is_grad_enabled() or x.device.type != "cpu":
            return self.lm_head(x)
        head_t = self._head_transposed()
        rows = x.reshape(-1, x.size(-1))
        if rows.size(0) <= KERNEL_ROWS and cpu_kernels.cpu_fp32(x) and cpu_kernels.fast_f32():
            # decode steps: cpu_kernels.py's matmul reads the 154 MB (at 124M) ~1.8x faster than addmm
            return cpu_kernels.linear_f32(rows, head_t, None).view(*x.shape[:-1], w.size(0))
        return x @ head_t

    def _head_transposed(self):
        """The output projection as a contiguous (n_embd, vocab) copy in huge pages, for CPU inference:
        it makes this, the largest matmul of a decode step, up to 2x faster. Rebuilt whenever the
        weight changes (its version counter)."""
        w = self.lm_head.weight
        key = (w.data_ptr(), w._version, w.dtype)
        if getattr(self, "_head_key", None) != key:
            self._head_t, self._head_key = empty_huge(w.shape[::-1], w.dtype).copy_(w.detach().t()), key
        return self._head_t

    # ------------------------------------------------------------------ loading and saving

    def quantize_int8(self, release=lambda weight: None):
        """int8 weights (one scale per output column, cpu_kernels.py) for every Conv1D of the blocks and
        for the tied output projection, whose columns then serve as the token embeddings too: the
        fp32 table is read only to teach a LUT, so it stays off the resident set. Position
        embeddings, LayerNorms and biases stay fp32. CPU inference only. release(w) gets each fp32
        weight once it is packed (a mapped file gives back its pages). The fingerprint stays the
        fp32 one: LUTs taught on either model serve both."""
        if self.transformer.wte.weight.device.type != "cpu" or self.transformer.wte.weight.dtype != torch.float32:
            raise ModelLoadError(INT8_CPU_ONLY)
        if cpu_kernels.ops() is None:
            raise ModelLoadError("--quantize int8 needs its CPU kernel, which could not be built here "
                                 "(a C++ compiler, g++, is required; see the log)")
        self.pin_fingerprint()
        self.requires_grad_(False)
        layers = [layer for block in self.transformer.h
                  for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)]
        wte = self.transformer.wte.weight
        # every packed weight in one mapping of huge pages: a decode step streams them all, and
        # 4 KB pages (or a mapping per weight, most of them under 2 MB) cost one int8 stream ~15%
        shapes = [cpu_kernels.packed_shape(layer.n_in, layer.n_out) for layer in layers]
        shapes.append(cpu_kernels.packed_shape(wte.size(1), wte.size(0)))
        arena, taken = empty_huge((sum(math.prod(shape) for shape in shapes),), torch.int8), 0

        def take(shape, dtype):
            nonlocal taken
            view = arena[taken:taken + math.prod(shape)].view(shape)
            taken += math.prod(shape)
            return view

        for layer in layers:
            release(layer.quantize_int8(take))
        # embeddings come from the packed copy too (forward); only teaching reads the fp32 table, so
        # its rows are given back as they are packed (at 124M they are a quarter of the weights)
        self._head_int8 = cpu_kernels.pack_int8(wte.detach().t(), lambda n0, n1: release(wte.detach()[n0:n1]), take)
        release(wte)  # and the pages that straddle two slices
        self.quantized = "int8"
        self._decode_param_list = None
        return self

    def fingerprint(self):
        """Short id of this exact set of weights: a LUT trained on one model is refused by another."""
        if self._fingerprint:
            return self._fingerprint
        h = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True).encode())
        for t in (self.transformer.wte.weight[:64], self.transformer.ln_f.weight,
                  self.transformer.h[-1].mlp.c_proj.weight[:8], self.transformer.wpe.weight[:8]):
            h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def pin_fingerprint(self):
        """Keep the fingerprint of the weights as they are now (fp32, as loaded) through a cast to
        bfloat16/float16 or int8, whose rounding would change it: the same checkpoint serves the
        same LUTs in every dtype (their recall is tested across fp32, bfloat16 and int8). A model
        whose weights then change in place (training) must not be pinned: it is another model."""
        self._fingerprint = self.fingerprint()
        return self

    def to_huge_pages(self, release=lambda tensor: None):
        """Move the weights (CPU) into memory backed by huge pages (empty_huge). A decode step reads
        every weight once: from a mapped file's 4 KB pages a step took ~20% longer (124M on a Xeon,
        21.5 vs 17.5 ms). release(t) gets each old tensor once copied (a mapped file gives its
        pages back), so memory peaks at about one model, not two."""
        for p in self.parameters():  # the tied wte / lm_head once
            moved = empty_huge(p.shape, p.dtype).copy_(p.detach())
            release(p.detach())
            p.data = moved  # the Parameter itself stays, and with it the tie and requires_grad
        return self

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. fine-tune GPT-2 with a smaller block)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]  # matmul weights and embeddings decay
        no_decay = [p for p in params if p.dim() < 2]  # biases and LayerNorm gains do not
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")


# ---------------------------------------------------------------------- choosing and loading

def from_pretrained(model_type, dropout=0.0):
    """GPT-2 weights from the Hugging Face Hub (openai-community/<model_type>, model.safetensors),
    through huggingface_hub's cache: HF_HOME and HF_HUB_OFFLINE are honoured. The file is
    memory-mapped, not copied (release_mapped() gives a tensor's pages back)."""
    if model_type not in PRETRAINED:
        raise ModelLoadError(f"unknown model_type {model_type!r}; choose one of {', '.join(PRETRAINED)}")
    from huggingface_hub import hf_hub_download
    repo = f"{HUB_ORG}/{model_type}"
    try:
        hub_config = json.load(open(hf_hub_download(repo, "config.json")))
        weights_path = hf_hub_download(repo, "model.safetensors")
    except Exception as e:  # offline, no cache, network or permission trouble: all say the same
        raise ModelLoadError(
            f"could not get {repo}/model.safetensors ({type(e).__name__}). Offline (HF_HUB_OFFLINE=1 "
            f"or no network) it must already be in the Hugging Face cache (HF_HOME); otherwise load a "
            f"local checkpoint (out/<name>/ckpt.pt)") from None
    n_layer, n_head, n_embd = PRETRAINED[model_type]
    config = GPTConfig(
        n_layer=hub_config.get("n_layer", n_layer), n_head=hub_config.get("n_head", n_head),
        n_embd=hub_config.get("n_embd", n_embd), vocab_size=hub_config.get("vocab_size", 50257),
        block_size=hub_config.get("n_positions", 1024), bias=True, dropout=dropout,
        layer_norm_epsilon=hub_config.get("layer_norm_epsilon", 1e-5))
    try:
        weights = MappedSafetensors(weights_path)
    except (OSError, ValueError, KeyError, TypeError) as e:  # named by its repository: no server path shown
        raise ModelLoadError(f"{repo}/model.safetensors in the Hugging Face cache is not a readable safetensors "
                             f"file: {e.strerror if isinstance(e, OSError) and e.strerror else e}") from None
    model = from_state_dict(config, hf_to_ours(weights.tensors), f"{repo}/model.safetensors")
    model.source = model_type
    return model

def from_state_dict(config, state, where):
    """Build the model around loaded tensors: no random init and no second copy of the weights,
    so peak memory is one model. lm_head.weight may be absent (it is tied to wte)."""
    with torch.device("meta"):
        model = GPT(config)
    state = dict(state)
    state["lm_head.weight"] = state.get("transformer.wte.weight")
    expected = model.state_dict()
    missing = [k for k in expected if state.get(k) is None]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ModelLoadError(f"{where}: missing tensors {missing[:3]}, unexpected tensors {unexpected[:3]}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ModelLoadError(f"{where}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict(state, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True made two Parameters: tie again
    return model

def from_checkpoint(path):
    """A nanoGPT-style ckpt.pt written by train.py, loaded without unpickling code (weights_only)
    and memory-mapped. Returns (model, checkpoint dict)."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        config = GPTConfig(**ckpt["model_args"])
        prefix = "_orig_mod."  # left by torch.compile
        model = from_state_dict(config, {k.removeprefix(prefix): v for k, v in ckpt["model"].items()}, path)
    except Exception as e:
        raise ModelLoadError(f"{path} is not a usable checkpoint: {str(e).splitlines()[0]}") from None
    model.source = os.path.dirname(os.path.abspath(path))
    return model, ckpt


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class MappedSafetensors:
    """A .safetensors file (8-byte header size, JSON header, raw tensors) mapped into memory: each
    tensor is a view of the file, so nothing is copied and pages are read on first touch; load_model
    then copies or packs each weight and gives its pages back (release_mapped), so the weights are
    held about once throughout (safetensors' load_file reads them all into fresh memory first).
    The mapping is private: training may update the tensors without touching the file."""

    def __init__(self, path):
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError("bad header size")
            header = json.loads(f.read(n))
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{name} has dtype {info['dtype']}; supported: {', '.join(SAFETENSORS_DTYPES)}")
            begin, end = info["data_offsets"]
            count = math.prod(info["shape"])
            if end - begin != count * dtype.itemsize or not 0 <= begin <= end <= size - 8 - n:
                raise ValueError(f"{name}: its offsets do not match its shape")
            self.tensors[name] = (torch.frombuffer(self.map, dtype=dtype, count=count, offset=8 + n + begin)
                                  if count else torch.empty(0, dtype=dtype)).view(info["shape"])


def empty_huge(shape, dtype=torch.float32):
    """An uninitialised CPU tensor in an anonymous mapping of its own, backed by transparent huge
    pages (2 MB) where Linux grants them on request (THP 'madvise' or 'always'): one TLB entry
    covers 512 times the memory of a 4 KB page, which matters to matmuls that stream the weights."""
    numel = math.prod(shape)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    mapping = mmap.mmap(-1, numel * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # not Linux, or a kernel without THP: ordinary pages
        pass
    return torch.frombuffer(mapping, dtype=dtype, count=numel).view(shape)


def release_mapped(tensor):
    """Give back the pages wholly inside a tensor mapped from a file (MappedSafetensors, or
    torch.load(mmap=True)) once it is no longer needed (copied, packed to int8); touched again,
    they are read back from the file. Only for such tensors: anonymous memory would read as zeros."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    lo, hi = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if lo < hi:
        _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)


def hf_to_ours(hf_state):
    """A GPT-2 state dict in Hugging Face's naming (the Hub files have no 'transformer.' prefix,
    save_pretrained's do) to ours. Conv1D weights are (in, out) in both, so nothing is transposed."""
    state = {}
    for name, tensor in hf_state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # causal-mask buffers and the tied head carry no weights of their own
        state[name if name.startswith("transformer.") else "transformer." + name] = tensor
    return state


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device="auto", dtype="float32"):
    """'auto' = CUDA when present, else CPU. Refuses what the device cannot do."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available here")
    if device != "cpu" and not device.startswith("cuda"):
        raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
    if dtype == "float16" and device == "cpu":
        raise ModelLoadError("float16 needs a CUDA device; on the CPU use float32 or bfloat16")
    if dtype == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise ModelLoadError("this GPU does not support bfloat16; use float16 or float32")
    return device, DTYPES[dtype]


def find_checkpoint(path):
    """A checkpoint file, or the ckpt.pt inside a training output directory."""
    return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path


def load_model(init_from, device="cpu", dtype=torch.float32, quantize=None):
    """init_from: a GPT-2 type (gpt2, gpt2-medium, ...) or a checkpoint (file or out/ directory).
    quantize: None or "int8" (CPU, float32 only; cpu_kernels.py). Returns the model in eval mode;
    model.tokenizer_spec says how to tokenize for it."""
    if quantize is not None and quantize not in QUANTIZE:
        raise ModelLoadError(f"unknown quantize {quantize!r}; use {', '.join(QUANTIZE)} or leave it out")
    if quantize and (device != "cpu" or dtype != torch.float32):
        raise ModelLoadError(INT8_CPU_ONLY)
    if init_from in PRETRAINED:
        model = from_pretrained(init_from)
        model.tokenizer_spec = {"type": "tiktoken", "name": "gpt2"}
    elif init_from.startswith("gpt2"):
        raise ModelLoadError(f"unknown model type {init_from!r}; choose one of {', '.join(PRETRAINED)}")
    else:
        path = find_checkpoint(init_from)
        if not os.path.exists(path):
            raise ModelLoadError(f"{init_from!r} is neither a GPT-2 type ({', '.join(PRETRAINED)}) "
                                 f"nor a checkpoint file or directory")
        model, ckpt = from_checkpoint(path)
        model.tokenizer_spec = ckpt.get("tokenizer") or {"type": "tiktoken", "name": "gpt2"}
    model.pin_fingerprint()  # of the weights as loaded: kept through a cast or int8, and not rehashed per LUT request
    # the weights are views of a mapped file so far: pack them to int8, or copy them into huge pages
    if quantize:
        model.quantize_int8(release=release_mapped)
    elif device == "cpu" and dtype == torch.float32 and all(p.dtype == dtype for p in model.parameters()):
        model.to_huge_pages(release=release_mapped)
    model = model.to(device=device, dtype=dtype).eval()
    trim_heap()
    return model


def trim_heap():
    """Give the C heap's free memory back to the system. Loading leaves much of it there: glibc
    raises its mmap threshold as large temporaries are freed, so the later ones (int8 packing's
    slices) come from the heap and stay resident once freed (124M int8: 603 -> 464 MB RSS on the
    EPYC VM). A no-op where the C library is not glibc."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
