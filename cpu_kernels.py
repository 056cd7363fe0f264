"""
CPU matmul kernels for decoding (cpu_kernels.cpp), built with torch.utils.cpp_extension and the
machine's g++ (-march=native; about 30 s once per machine, source and torch version). The server
builds or loads them at start-up, before it reports ready; `python -m cpu_kernels` builds them
ahead (an install step) and prints where the library is.

- int8 weights (`--quantize int8`): pack_int8() turns an fp32 (in, out) weight into int8 with one
  scale per output column; linear_int8() multiplies fp32 activations by it, quantizing them to
  int16 per block of 32 on the fly and using AVX-512 VNNI int16 dot products. Reading a quarter
  of the bytes, it decodes 3-4x faster than fp32 (bench/decode.py); int16 activations keep its
  greedy tokens as fp32's would be under int8 weights alone (int8 activations, as llama.cpp's
  q8_0 uses, cost the trained char model a quarter of its greedy agreement: bench/quality.py).
- fp32 matmuls of up to a few hundred rows (decode steps, drafts, prompts) straight from the
  (in, out) weight, 1.05-2.5x faster than MKL's addmm here and without the packed copy oneDNN
  would need for batches.
- decoding attention (one query per row and head, or a few drafts) over the KV cache, reading
  each row's own length only: torch's fused CPU attention spends ~2 ms a call on one query, its bmm path ~70 us.
- decode_layers() / decode_tokens(): tokens of any cache rows (a decode step, drafts, short
  prompts, or a step's decode rows and prompt tokens together) through every block in one call,
  the same operations as Block.forward (equal to float rounding: its own LayerNorm and GELU),
  without ~30 Python-dispatched ops per layer (~2 ms a token at 124M); decode_step(): the same
  from token ids to logits, embeddings, ln_f and the output projection included (~0.5 ms more of
  Python saved).
Where the kernels cannot be built (no compiler), fp32 falls back to torch's ops and int8 is refused.

Build layout, under torch's extensions folder (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions/...):
<name>/<name>.so is a finished build (moved there whole, so it is complete or absent);
<name>/build.lock serialises builds; <name>/build-<pid>/ holds one process's build in progress.
"""
import argparse
import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import time

import torch

log = logging.getLogger("cpu_kernels")  # also when run as __main__
TILE, BLOCK = 64, 32  # as in cpu_kernels.cpp: output columns per tile, inputs per activation scale
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cpp")
CFLAGS, LDFLAGS = ["-O3", "-march=native", "-fopenmp"], ["-fopenmp"]
# how long to wait for a build another process is running (one takes ~30 s here) before giving up
BUILD_TIMEOUT = float(os.environ.get("CPU_KERNELS_BUILD_TIMEOUT", "600"))


class KernelBuildError(Exception):
    """The kernels cannot be had: no compiler, a compile error, a build that did not finish in time.
    The message is one line."""


@functools.cache
def ops():
    """The compiled kernels module, or None where it cannot be had (one line logged; the callers
    fall back to torch's ops)."""
    try:
        return load()
    except KernelBuildError as e:
        log.error("CPU kernels unavailable: %s; int8 is off and fp32 uses addmm", e)
        return None


def load(timeout=None):
    """Load this machine's build of the kernels, building it first if there is none (~30 s).
    timeout: seconds to wait for another process's build (default BUILD_TIMEOUT). Raises
    KernelBuildError."""
    name, source, folder = locate()
    built = os.path.join(folder, name + ".so")
    damaged = None
    if os.path.exists(built):
        try:
            return _import(name, built)
        except ImportError as e:  # damaged on disk: built again below
            log.warning("CPU kernels at %s do not load (%s); building them again", built, first_line(e))
            damaged = os.stat(built).st_mtime_ns
    try:
        with build_lock(folder, BUILD_TIMEOUT if timeout is None else timeout):
            if os.path.exists(built) and os.stat(built).st_mtime_ns != damaged:  # built while this process waited
                try:
                    return _import(name, built)
                except ImportError as e:
                    raise KernelBuildError(f"{built} does not load: {first_line(e)}") from None
            return _build(name, source, folder)
    except OSError as e:  # a read-only or full extensions folder
        raise KernelBuildError(f"{type(e).__name__}: {e}") from None


def locate():
    """(name, source, folder) of this source's build. The name hashes everything the library
    depends on: an edited source, other flags, another torch or another CPU (-march=native) never
    meet a build made for something else."""
    try:
        with open(SOURCE) as f:
            source = f.read()
        from torch.utils.cpp_extension import _get_build_directory
        key = "\0".join([source, " ".join(CFLAGS + LDFLAGS), torch.__version__, _cpu_flags()])
        name = "gpt2_cpu_kernels_" + hashlib.sha256(key.encode()).hexdigest()[:12]
        return name, source, _get_build_directory(name, verbose=False)
    except OSError as e:  # an unreadable source, an unwritable cache
        raise KernelBuildError(f"{type(e).__name__}: {e}") from None


def _cpu_flags():
    """The instruction sets -march=native compiles for (a home folder shared between machines)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


@contextlib.contextmanager
def build_lock(folder, timeout):
    """Hold <folder>/build.lock while building. The lock is an flock, which the OS drops when its
    holder exits however it exits (kill -9 included): a lock left by a dead process never blocks.
    The pid written in the file only names the holder in messages. A live holder is waited for up
    to timeout seconds, then KernelBuildError. Holding the lock proves no build of this folder is
    running, so every build-<pid>/ folder (and torch's own lock file inside it) left by a killed
    build is removed."""
    path = os.path.join(folder, "build.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, told = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                if time.monotonic() >= deadline:
                    raise KernelBuildError(f"gave up after {timeout:g} s waiting for the build by pid {owner} "
                                           f"({path}); raise CPU_KERNELS_BUILD_TIMEOUT if builds take longer") from None
                if not told:
                    log.info("waiting for the CPU kernel build by pid %s (%s)", owner, path)
                    told = True
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        for entry in os.listdir(folder):
            if entry.startswith("build-"):
                shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)
        yield
    finally:
        os.close(fd)  # drops the flock


def _build(name, source, folder):
    """Compile in a folder of this process's own, then move the library into place whole."""
    from torch.utils.cpp_extension import load_inline
    work = os.path.join(folder, f"build-{os.getpid()}")
    os.makedirs(work)
    log.info("building the CPU kernels (about 30 s, once per machine and source) in %s", work)
    started = time.monotonic()
    try:
        # copies: load_inline appends to the flag lists it is given, which would change locate()'s name
        module = load_inline(name, source, extra_cflags=list(CFLAGS),  # the source binds its functions
                             extra_ldflags=list(LDFLAGS), build_directory=work)
        os.replace(os.path.join(work, name + ".so"), os.path.join(folder, name + ".so"))
    except Exception as e:  # no compiler, no headers, a compile error: one line, the compiler's first error
        raise KernelBuildError(first_line(e)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("CPU kernels built in %.0f s: %s", time.monotonic() - started, os.path.join(folder, name + ".so"))
    return module


def first_line(e):
    """A one-line account of e; for a failed compile, the compiler's first error."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    head = f"{type(e).__name__}: {lines[0][:160] if lines else ''}"
    error = next((line for line in lines[1:] if "error:" in line), None)
    # torch's "Error building extension 'name': [1/2] c++ ..." goes on with the compiler's command line
    return f"{head.split(': [', 1)[0]}: {error[:300]}" if error else head


def _import(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def fast_f32():
    """The fp32 few-row kernel exists only with AVX-512 (elsewhere addmm is as good)."""
    return ops() is not None and ops().fast_path()


def cpu_fp32(t):
    """Whether the fp32 CPU kernels (attention, few-row matmuls) may take this tensor: CPU, fp32,
    inference (the kernels have no autograd)."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and not torch.is_grad_enabled() and ops() is not None


def packed_shape(K, N):
    """The shape of pack_int8's packed weight for a (K, N) one."""
    return -(-N // TILE), -(-K // BLOCK) * BLOCK // 2, TILE, 2


def pack_int8(w, packed_columns=lambda n0, n1: None, empty=lambda shape, dtype: torch.empty(shape, dtype=dtype)):
    """w: (in, out) fp32, any strides (a view of the file or of wte.T). Returns (packed, scale):
    packed (out/64, in/2, 64, 2) int8 holding round(w / scale), two consecutive inputs of one
    output column side by side as the VNNI dot product reads them; scale (out,) fp32, one per
    output column (max |w| / 127). Done a few columns at a time (~4M weights) so that the
    temporaries stay small: GPT-2-XL quantized at load time peaks under 2.5 GB.
    packed_columns(n0, n1) is told of each slice of columns done (a mapped file can give back
    its pages then); empty(shape, dtype) allocates the packed weight (model.empty_huge: huge pages)."""
    K, N = w.shape
    packed = empty(packed_shape(K, N), torch.int8)
    tiles, Kp = packed.size(0), packed.size(1) * 2
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
        packed_columns(n0, n1)
    return packed, scale


def unpack_columns(packed, scale, ids, n_in):
    """Columns ids (any shape) of the weight packed by pack_int8, dequantized: (*ids.shape, n_in)
    fp32. An int8 model's token embeddings are its tied output projection's columns."""
    cols = packed[ids // TILE, :, ids % TILE].flatten(-2)[..., :n_in]  # (*ids.shape, Kp)
    return cols.float() * scale[ids].unsqueeze(-1)


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


def sample(logits, temperature, u):
    """The token id drawn from softmax(logits / temperature) at the uniform number u, by inverse
    CDF, as generate.sample_row draws it; logits (V,) fp32 on the CPU."""
    return ops().sample(logits.contiguous(), temperature, u)


ABSENT = torch.empty(0)  # a tensor decode_layers' parameter list does not have (a bias, an fp32 scale)


def decode_layers(x, params, cache, positions, config):
    """A cached pass through every block in one call. x (B, T, C): B rows' next T tokens each (a
    decode step: T = 1; drafts to verify or prompts: T > 1), positions (B, T), or (1, T) shared
    by the rows: where each token goes (decode_tokens). params from GPT._decode_params (ABSENT = no
    such tensor), cache the per-layer (k, v) of these B rows. Returns the residual stream after
    the last block, shaped as x."""
    B, T, C = x.shape
    rows = torch.arange(B).repeat_interleave(T) if T > 1 else ABSENT  # ABSENT: token b in row b
    return decode_tokens(x.reshape(B * T, C), params, cache, positions.expand(B, T).reshape(B * T), rows,
                         config).view(B, T, C)


def decode_tokens(x, params, cache, positions, rows, config):
    """decode_layers over tokens given one by one: x (N, C), positions and rows (N,) long (rows
    ABSENT: token i in row i). Token i writes position positions[i] of cache row rows[i] and reads
    that row up to it, so token j of a row sees the cache and the row's tokens before it, exactly
    as its own decode step would. Returns the residual stream (N, C) after the last block."""
    return ops().decode_layers(x.contiguous(), params, [k for k, _ in cache], [v for _, v in cache],
                               positions.contiguous(), rows.contiguous(), config.n_head, config.layer_norm_epsilon)


def decode_step(ids, positions, wte, wpe, params, cache, ln_f, head, head_scale, config):
    """A decode step of an inference model in one call: ids, positions (B,) -> logits (B, V), as
    the blocks (decode_layers), ln_f and the output projection give them. wte (V, C) fp32 and head
    (C, V) fp32; or, int8, wte unused (ABSENT) and head, head_scale the packed output projection,
    whose columns are the token embeddings."""
    return ops().decode_step(ids, positions, wte, wpe, params, [k for k, _ in cache], [v for _, v in cache],
                             ln_f.weight, ABSENT if ln_f.bias is None else ln_f.bias, head, head_scale,
                             config.n_head, config.layer_norm_epsilon)


def argmax_rows(x):
    """(B, V) fp32 logits -> (B,) long: each row's first largest value (torch's argmax), in one pass."""
    return ops().argmax_rows(x)


def main(argv=None):
    p = argparse.ArgumentParser(description="Build the CPU kernels now (or find this machine's build) and print "
                                            "where the library is: an install step, so that no server or script "
                                            "pays the build (~30 s) on its first use.")
    p.add_argument("--timeout", type=float, default=BUILD_TIMEOUT, help="seconds to wait for a build another "
                   "process is running (default: $CPU_KERNELS_BUILD_TIMEOUT, else 600)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        load(args.timeout)
    except KernelBuildError as e:
        raise SystemExit(f"error: CPU kernels: {e}")
    name, _, folder = locate()
    print(os.path.join(folder, name + ".so"))


if __name__ == "__main__":
    main()
