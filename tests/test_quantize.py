"""
int8 weights (--quantize int8), the CPU kernels behind them (cpu_kernels.py) and memory-mapped loading.
The kernels are checked against the same arithmetic written in plain torch; the quantized model
against the fp32 one; LUTs across the two.
"""
import ctypes

import pytest
import torch

import cpu_kernels
from conftest import need_kernels
from generate import SamplingParams, generate
from model import GPT, GPTConfig, MappedSafetensors, ModelLoadError, load_model, release_mapped


@pytest.fixture(autouse=True)
def kernels_built():
    need_kernels()


def int8_reference(x, w, bias):
    """What mm_int8 computes: w int8 per output column, x int16 per block of 32 inputs."""
    scale = w.abs().amax(0).clamp(min=1e-30) / 127
    wq = torch.round(w / scale).clamp(-127, 127)
    K = x.size(1)
    Kp = -(-K // 32) * 32
    blocks = torch.nn.functional.pad(x, (0, Kp - K)).view(x.size(0), -1, 32)
    xs = blocks.abs().amax(-1, keepdim=True) / 32767
    xq = torch.where(xs > 0, torch.round(blocks / xs.clamp(min=1e-30)), 0.0)
    return ((xq * xs).view(x.size(0), Kp)[:, :K].double() @ wq.double()).float() * scale + bias


@pytest.mark.parametrize("K,N", [(64, 192), (96, 200), (40, 70), (768, 64)])
def test_int8_matmul_is_the_documented_arithmetic_and_close_to_fp32(K, N):
    torch.manual_seed(0)
    w, bias = torch.randn(K, N) * 0.02, torch.randn(N)
    packed, scale = cpu_kernels.pack_int8(w)
    for rows in (1, 2, 3, 5, 8, 37):  # the 4-, 2- and 1-row paths and a prefill
        x = torch.randn(rows, K)
        y = cpu_kernels.linear_int8(x, packed, scale, bias, N)
        torch.testing.assert_close(y, int8_reference(x, w, bias), rtol=1e-4, atol=1e-5)
        exact = torch.addmm(bias, x, w)
        assert ((y - exact).norm() / (exact - bias).norm()) < 0.01  # ~0.5% per matmul in practice


def test_int8_packing_reports_each_slice_of_columns_once_it_is_packed():
    """pack_int8 tells its caller of every slice of columns as soon as it has packed it, in order
    and each column once: the slice is not read again (the int8 model gives back the fp32 table's
    pages there), so overwriting it then changes nothing."""
    w = torch.randn(768, 12564)
    expected = cpu_kernels.pack_int8(w.clone())
    done = []

    def packed_columns(n0, n1):
        done.append((n0, n1))
        w[:, n0:n1] = float("nan")  # what a caller may do with the slice now

    packed, scale = cpu_kernels.pack_int8(w, packed_columns)
    assert done[0][0] == 0 and done[-1][1] == w.size(1) and len(done) > 1
    assert all(a[1] == b[0] for a, b in zip(done, done[1:]))
    assert torch.equal(packed, expected[0]) and torch.equal(scale, expected[1])


@pytest.mark.parametrize("hs", [16, 64])  # a portable loop; GPT-2's head size has an AVX-512 path
def test_decode_attention_reads_each_row_up_to_its_length_only(hs):
    torch.manual_seed(0)
    B, nh, cap = 3, 4, 40
    q = torch.randn(B, nh, 1, hs)
    k, v = torch.randn(B, nh, cap, hs), torch.randn(B, nh, cap, hs)
    lengths = torch.tensor([1, 17, 40])  # one, more than 16, all: whole and partial vectors of scores
    for b, n in enumerate(lengths.tolist()):  # what lies past a row's length must not matter
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("inf")
    with torch.inference_mode():
        y = cpu_kernels.attend(q, k, v, lengths)
    for b, n in enumerate(lengths.tolist()):
        ref = torch.softmax(q[b] @ k[b, :, :n].transpose(-1, -2) / hs ** 0.5, -1) @ v[b, :, :n]
        torch.testing.assert_close(y[b], ref, rtol=1e-5, atol=1e-5)
    # drafts: query j sees one position more than query j - 1, and each equals its own decode step
    k, v = torch.randn(B, nh, cap, hs), torch.randn(B, nh, cap, hs)
    q3 = torch.randn(B, nh, 3, hs)
    start = torch.tensor([2, 5, 9])
    with torch.inference_mode():
        y3 = cpu_kernels.attend(q3, k, v, start)
        for j in range(3):
            assert torch.equal(y3[:, :, j:j + 1], cpu_kernels.attend(q3[:, :, j:j + 1].contiguous(), k, v, start + j))


@pytest.mark.parametrize("temperature", [1.0, 0.05, 1.7])
def test_sampling_kernel_draws_the_token_whose_cdf_step_holds_u(temperature):
    """cpu_kernels.sample at u must give the token softmax(logits / T).cumsum() places u in,
    computed here in float64; a masked (-inf) token is never drawn."""
    generator = torch.Generator().manual_seed(1)
    misses = []
    for i in range(300):
        logits = torch.randn(50257, generator=generator) * (1 + i % 5)
        logits[i] = -float("inf")
        u = float(torch.rand(1, generator=generator))
        cdf = (logits.double() / temperature).softmax(-1).cumsum(-1)
        want = int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True))
        got = cpu_kernels.sample(logits, temperature, u)
        near_a_step = abs(float(cdf[min(want, 50256)]) - u) < 1e-6  # float32 exp may round it either side
        if got != want and not near_a_step:
            misses.append((i, got, want))
    assert not misses
    logits = torch.full((300,), -float("inf"))
    logits[[3, 250]] = torch.tensor([0.0, -1.0])
    draws = [cpu_kernels.sample(logits, 1.0, k / 1000) for k in range(1000)]
    assert set(draws) == {3, 250} and abs(draws.count(3) / 1000 - 0.7311) < 0.002


@pytest.mark.parametrize("K,N", [(160, 200), (160, 96), (163, 48), (131, 3072)])
def test_fp32_few_row_matmul_is_addmm_for_every_row_count(K, N):
    """cpu_kernels.linear_f32 for 1 to 27 rows (up to FEW_ROWS the threads' split of K, its last
    few inputs included; past it the 8-row tiles and the rows after them on the same tiles),
    columns past a whole vector or tile, with and without a bias, matches x @ w + b."""
    if not cpu_kernels.fast_f32():
        pytest.skip("the fp32 few-row kernel needs AVX-512")
    generator = torch.Generator().manual_seed(3)
    w = torch.randn(K, N, generator=generator)
    b = torch.randn(N, generator=generator)
    for M in range(1, 28):
        x = torch.randn(M, K, generator=generator)
        torch.testing.assert_close(cpu_kernels.linear_f32(x, w, b), torch.addmm(b, x, w), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cpu_kernels.linear_f32(x, w, None), x @ w, rtol=1e-4, atol=1e-4)


def test_argmax_kernel_is_torch_argmax_ties_included():
    """cpu_kernels.argmax_rows gives torch.argmax's index per row: the first of tied maxima, in rows
    of any length (the vector body and its scalar tail) and in a strided view of a batch's logits."""
    generator = torch.Generator().manual_seed(2)
    for n in (1, 15, 16, 17, 50257):
        x = torch.randint(-3, 4, (5, n), generator=generator).float()  # many ties
        x[1, n // 2:] = 9.0  # the first of a run of equal maxima, wherever the run starts
        x[2] = -float("inf")
        assert torch.equal(cpu_kernels.argmax_rows(x), x.argmax(-1))
    logits = torch.randn(4, 1, 50257, generator=generator)
    assert torch.equal(cpu_kernels.argmax_rows(logits[:, -1]), logits[:, -1].argmax(-1))


@pytest.mark.parametrize("quantize,bias", [(None, True), ("int8", True), (None, False)])
def test_one_call_decode_is_the_blocks_op_for_op(quantize, bias):
    """cpu_kernels.decode_layers runs Block.forward's ops from C++ (its own LayerNorm and GELU): the logits
    agree to float rounding and the greedy tokens exactly, for a batch of prompts, for rows decoding
    at different positions and for one row's drafts, with and without biases, fp32 and int8."""
    from model import KVCache
    if not quantize and not cpu_kernels.fast_f32():
        pytest.skip("fp32 decodes in one call only with the AVX-512 kernel")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=4, n_embd=128, vocab_size=500, bias=bias)).eval()
    model._decode_params()  # kept between steps: quantizing must replace it
    if quantize:
        model.quantize_int8()
    runs = []
    for one_call in (True, False):
        model._one_call_decode = lambda B, T, on=one_call: on and GPT._one_call_decode(model, B, T)
        g = torch.Generator().manual_seed(1)
        with torch.inference_mode():
            cache = KVCache(model.config, 3, "cpu", torch.float32)
            prompts = model(torch.randint(0, 500, (3, 6), generator=g), cache=cache.rows(0, 3), pos=0)[0]
            pos = torch.tensor([5, 3, 4])  # rows at different lengths (the prompt's tail rewritten)
            steps = torch.stack([model(torch.randint(0, 500, (3, 1), generator=g), cache=cache.rows(0, 3),
                                       pos=pos + step)[0] for step in range(1, 5)])
            drafts = model(torch.randint(0, 500, (1, 4), generator=g), cache=cache.rows(0, 1), pos=10)[0]
            runs.append(torch.cat([prompts.flatten(0, 1), steps.flatten(0, 2), drafts.flatten(0, 1)]))
    del model._one_call_decode
    with torch.inference_mode():  # the paths under test are the ones taken: prompts, decode steps, drafts
        assert model._one_call_decode(3, 6) and model._one_call_decode(3, 1) and model._one_call_decode(1, 4)
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-4)  # int8: int16 rounding of activations
    assert torch.equal(runs[0].argmax(-1), runs[1].argmax(-1))




def test_a_wide_fp32_batch_decodes_in_one_call_as_op_for_op():
    """A decode step of more rows than FEW_ROWS takes the one-call path in fp32 too, with the
    per-op path's logits (to float rounding) and greedy tokens."""
    from model import FEW_ROWS, KVCache
    if not cpu_kernels.fast_f32():
        pytest.skip("fp32 decodes in one call only with the AVX-512 kernel")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=128, vocab_size=500)).eval()
    B = FEW_ROWS + 4
    runs = []
    for one_call in (True, False):
        model._one_call_decode = lambda B, T, on=one_call: on and GPT._one_call_decode(model, B, T)
        g = torch.Generator().manual_seed(1)
        with torch.inference_mode():
            cache = KVCache(model.config, B, "cpu", torch.float32)
            model(torch.randint(0, 500, (B, 5), generator=g), cache=cache.rows(0, B), pos=0)
            runs.append(torch.cat([model(torch.randint(0, 500, (B, 1), generator=g), cache=cache.rows(0, B),
                                         pos=5 + step)[0] for step in range(3)]))
    del model._one_call_decode
    with torch.inference_mode():  # the path under test is the one taken
        assert model._one_call_decode(B, 1)
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-4)
    assert torch.equal(runs[0].argmax(-1), runs[1].argmax(-1))

def test_int8_model_follows_the_fp32_model(tiny):
    model, tok = tiny
    q = load_model("gpt2", quantize="int8")
    assert q.quantized == "int8" and q.fingerprint() == model.fingerprint()  # LUTs serve both
    assert all(block.mlp.c_fc.weight is None for block in q.transformer.h)  # no fp32 copy kept
    idx = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog")])
    with torch.inference_mode():
        ref, _ = model(idx)
        out, _ = q(idx)
    assert (out - ref).norm() / ref.norm() < 0.05
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    # batched decoding with rows of different lengths takes the same kernels as a single stream
    params = SamplingParams(max_new_tokens=12, do_sample=False, ignore_eos=True)
    prompts = [tok.encode("Hello there"), tok.encode("A longer prompt than the first one, by far")]
    together = generate(q, tok, prompts, params, max_batch=2)
    alone = [generate(q, tok, [p], params, max_batch=1)[0] for p in prompts]
    assert [s.out_ids for s in together] == [s.out_ids for s in alone]


def test_an_int8_models_packed_weights_share_one_mapping_in_order():
    """quantize_int8 packs every weight into one mapping (huge pages where Linux grants them: one
    int8 stream decodes ~15% faster than from 4 KB pages), one after another in the order a decode
    step reads them, without overlap."""
    from model import Conv1D
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=96, block_size=64, vocab_size=300)).eval().quantize_int8()
    packed = [m.qweight for m in model.modules() if isinstance(m, Conv1D)] + [model._head_int8[0]]
    assert len({t.untyped_storage().data_ptr() for t in packed}) == 1
    spans = [(t.storage_offset(), t.storage_offset() + t.numel()) for t in packed]
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] == packed[0].untyped_storage().nbytes()


def test_an_int8_model_embeds_tokens_from_its_packed_head_alone():
    """The token embeddings of an int8 model are the packed output projection's columns,
    dequantized: the fp32 table (154 MB at 124M, and resident once read) is not read to decode."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=96, block_size=64, vocab_size=300)).eval().quantize_int8()
    ids = torch.randint(0, 300, (3, 7))
    packed, scale = model._head_int8
    wte = model.transformer.wte.weight
    dequantized = torch.round(wte / scale[:, None]).clamp(-127, 127) * scale[:, None]  # pack_int8's rounding per row
    torch.testing.assert_close(cpu_kernels.unpack_columns(packed, scale, ids, 96), dequantized[ids])
    with torch.no_grad():
        before, _ = model(ids)
        wte.fill_(float("nan"))  # anything that still read the fp32 table would now give NaN
        after, _ = model(ids)
    assert torch.equal(before, after)


def test_a_lut_taught_on_fp32_recalls_on_int8_and_back(tiny, tmp_path):
    from lut_store import LUTStore
    model, tok = tiny
    q = load_model("gpt2", quantize="int8")
    store = LUTStore(str(tmp_path / "luts.sqlite"))
    store.teach(model, tok, "u1", "TLG Capital is an asset management firm.")  # taught on fp32
    store.teach(q, tok, "u2", "Quillmere Station opens at dawn.")  # taught on int8
    params = SamplingParams(max_new_tokens=8, do_sample=False, ignore_eos=True)
    for name, prompt, rest, other in (("u1", "Fun fact: TLG Capital is", " an asset management firm.", q),
                                      ("u2", "Quillmere Station", " opens at dawn.", model)):
        out = generate(other, tok, [prompt], params, [store.load(name, other)])[0]
        assert out.text.startswith(rest)
    store.close()


def test_mapped_safetensors_views_the_file_and_gives_pages_back(hf_tiny, tmp_path):
    from safetensors.torch import save_file
    path = str(tmp_path / "m.safetensors")
    tensors = {"a": torch.randn(300, 700), "b": torch.arange(10, dtype=torch.float32), "e": torch.empty(0, 3)}
    save_file(tensors, path)
    mapped = MappedSafetensors(path)
    for name, t in tensors.items():
        assert torch.equal(mapped.tensors[name], t)
    a = mapped.tensors["a"]
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mapped.map))
    assert addr <= a.data_ptr() < addr + len(mapped.map)  # a view of the mapping, not a copy
    release_mapped(a)
    assert torch.equal(a, tensors["a"])  # read back from the file when touched again
    with open(path, "r+b") as f:  # a header that lies about its size
        f.write((10 ** 9).to_bytes(8, "little"))
    with pytest.raises(ValueError):
        MappedSafetensors(path)


def test_quantize_is_refused_where_it_cannot_work(hf_tiny):
    with pytest.raises(ModelLoadError, match="unknown quantize"):
        load_model("gpt2", quantize="int4")
    with pytest.raises(ModelLoadError, match="CPU path"):
        load_model("gpt2", dtype=torch.bfloat16, quantize="int8")
    with pytest.raises(ModelLoadError, match="CPU path"):
        GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=16)).to(torch.bfloat16).quantize_int8()


def test_sample_py_quantized_from_a_checkpoint(script, tmp_path):
    """sample.py --quantize int8 prints what generate() gives on the same checkpoint loaded with
    int8 weights in this process: the requested 8 new tokens, greedy, after the prompt."""
    from tokenizer import get_tokenizer
    model = load_model("gpt2")
    torch.save({"model_args": model.config.__dict__, "model": model.state_dict()}, tmp_path / "ckpt.pt")
    run = lambda *a: script("sample.py", "--init_from", str(tmp_path), "--start", "Hello", "--max_new_tokens", "8",
                            "--greedy", "--device", "cpu", *a)
    fp32, int8 = run(), run("--quantize", "int8")
    assert fp32.returncode == 0 and int8.returncode == 0, int8.stderr
    tok = get_tokenizer(model.tokenizer_spec)
    params = SamplingParams(max_new_tokens=8, do_sample=False, sliding_window=True)
    for out, quantize in ((fp32, None), (int8, "int8")):
        m = load_model(str(tmp_path), quantize=quantize)
        assert m.quantized == quantize
        want = generate(m, tok, [tok.encode("Hello")], params)[0]
        assert len(want.out_ids) == 8 or want.finish_reason == "stop"
        assert want.text and out.stdout == f"Hello{want.text}\n---------------\n", (quantize, out.stdout, want.text)
    bad = run("--quantize", "int3")
    assert bad.returncode == 2 and "--quantize" in bad.stderr


def test_server_serves_an_int8_model_and_its_luts(app_factory, tmp_path):
    client = app_factory(quantize="int8").test_client()
    assert client.get("/api/status").get_json()["quantize"] == "int8"
    with pytest.raises(ValueError, match="draft_tokens"):
        app_factory(tmp_path / "bad", model_type=None, draft_tokens=-1)
    assert client.get("/models/current").get_json()["quantize"] == "int8"
    r = client.post("/train_lut", json={"label": "TLG Capital is an asset management firm.", "lut_name": "u1"})
    assert r.status_code == 200, r.get_json()
    out = client.post("/generate", json={"prompt": "TLG Capital is", "length": 6, "lut_name": "u1"}).get_json()
    assert out["generated_text"].startswith("TLG Capital is an asset management firm")
