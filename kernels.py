"""
CPU matmul kernels for decoding (kernels.cpp), built on first use with torch.utils.cpp_extension
and the machine's g++ (-march=native; about 30 s once, then loaded from ~/.cache/torch_extensions).

- int8 weights (`--quantize int8`): pack_int8() turns an fp32 (in, out) weight into int8 with one
  scale per output column; linear_int8() multiplies fp32 activations by it, quantizing them to
  int16 per block of 32 on the fly and using AVX-512 VNNI int16 dot products. Reading a quarter
  of the bytes, it decodes 3-4x faster than fp32 (bench/decode.py); int16 activations keep its
  greedy tokens as fp32's would be under int8 weights alone (int8 activations, as llama.cpp's
  q8_0 uses, cost the trained char model a quarter of its greedy agreement: bench/quality.py).
- fp32 few-row matmuls (decode steps, short prompts) straight from the (in, out) weight, 1.1-2x
  faster than MKL's addmm here and without the packed copy oneDNN would need for batches.
- decoding attention (one query per row and head, or a few drafts) over the KV cache, reading
  each row's own length only: torch's fused CPU attention spends ~2 ms a call on one query, its bmm path ~70 us.
- decode_layers(): a whole decode step through every block in one call, the same operations as
  Block.forward (equal to float rounding: its own LayerNorm and GELU), without ~30
  Python-dispatched ops per layer (~2 ms a token at 124M).
Where the kernels cannot be built (no compiler), fp32 falls back to torch's ops and int8 is refused.
"""
import functools
import hashlib
import logging
import os

import torch

log = logging.getLogger(__name__)
TILE, BLOCK = 64, 32  # as in kernels.cpp: output columns per tile, inputs per activation scale


@functools.cache
def ops():
    """The compiled kernels module, or None where it cannot be built (the reason is logged)."""
    from torch.utils.cpp_extension import load_inline
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.cpp")
    try:
        with open(path) as f:
            source = f.read()
        # named by the source's hash: an edited kernels.cpp never meets a stale build
        name = "gpt2_cpu_kernels_" + hashlib.sha256(source.encode()).hexdigest()[:12]
        return load_inline(name, source, functions=["mm_int8", "mm_f32", "attend", "decode_layers", "fast_path"],
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, no headers, an unwritable cache: decoding still works
        log.warning("CPU kernels unavailable (%s: %s); int8 is off and fp32 uses addmm",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None


@functools.cache
def fast_f32():
    """The fp32 few-row kernel exists only with AVX-512 (elsewhere addmm is as good)."""
    return ops() is not None and ops().fast_path()


def cpu_fp32(t):
    """Whether the fp32 CPU kernels (attention, few-row matmuls) may take this tensor: CPU, fp32,
    inference (the kernels have no autograd)."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and not torch.is_grad_enabled() and ops() is not None


def pack_int8(w):
    """w: (in, out) fp32, any strides (a view of the file or of wte.T). Returns (packed, scale):
    packed (out/64, in/2, 64, 2) int8 holding round(w / scale), two consecutive inputs of one
    output column side by side as the VNNI dot product reads them; scale (out,) fp32, one per
    output column (max |w| / 127). Done a few columns at a time (~4M weights) so that the
    temporaries stay small: GPT-2-XL quantized at load time peaks under 2.5 GB."""
    K, N = w.shape
    Kp, tiles = -(-K // BLOCK) * BLOCK, -(-N // TILE)
    packed = torch.empty(tiles, Kp // 2, TILE, 2, dtype=torch.int8)
    scale = torch.empty(N)
    step = max(1, (1 << 22) // (Kp * TILE))  # tiles per slice
    for t0 in range(0, tiles, step):
        t1 = min(tiles, t0 + step)
        n0, n1 = t0 * TILE, min(N, t1 * TILE)
        cols = w[:, n0:n1].float()
        s = cols.abs().amax(0).clamp(min=1e-30) / 127
        q = torch.zeros(Kp, (t1 - t0) * TILE, dtype=torch.int8)
        q[:K, :n1 - n0] = torch.round(cols / s).clamp(-127, 127).to(torch.int8)
        packed[t0:t1] = q.view(Kp // 2, 2, t1 - t0, TILE).permute(2, 0, 3, 1)
        scale[n0:n1] = s
    return packed, scale


def linear_int8(x, packed, scale, bias, n_out):
    """x (M, in) fp32 -> (M, n_out) = x @ W + bias with W as packed by pack_int8."""
    return ops().mm_int8(x.contiguous(), packed, scale, bias, n_out)


def attend(q, k, v, lengths):
    """q (B, nh, T, hs); k, v the cache (B, nh, T_cap, hs); query j of row b sees the first
    lengths[b] + j positions -> (B, nh, T, hs)."""
    return ops().attend(q, k, v, lengths)


def linear_f32(x, w, bias):
    """x (M, in) @ w (in, out) + bias for a few rows (fast_f32() must hold)."""
    return ops().mm_f32(x.contiguous(), w, bias)


ABSENT = torch.empty(0)  # a tensor decode_layers' parameter list does not have (a bias, an fp32 scale)


def decode_layers(x, params, cache, positions, config):
    """A cached pass through every block in one call. x (B, 1, C): a decode step, one token per row;
    or (1, T, C): one sequence's next T tokens (drafts to verify), each run as a row of its own
    that writes and reads that sequence's cache (a stride-0 view), so token j sees the cache and
    tokens 0..j, exactly as its own decode step would. params from GPT._decode_params (ABSENT = no
    such tensor), cache the per-layer (k, v), positions (B, 1) or (1, T): where each token goes.
    Returns the residual stream after the last block, shaped as x."""
    B, T, C = x.shape
    if T > 1:
        cache = [(k.expand(T, -1, -1, -1), v.expand(T, -1, -1, -1)) for k, v in cache]
    out = ops().decode_layers(x.reshape(B * T, C).contiguous(), params,
                              [k for k, _ in cache], [v for _, v in cache], positions.reshape(B * T).contiguous(),
                              config.n_head, config.layer_norm_epsilon)
    return out.view(B, T, C)
