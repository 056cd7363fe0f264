"""Chunked prefill (generate.Batcher's prefill_chunk): a prompt admitted while other rows decode
is prefilled in pieces, one per step beside their decode step. The running rows advance on every
one of those steps, and every sequence's greedy tokens are those of an unchunked prefill, for
every piece size, on fp32 and int8, with a LUT firing at the prompt's end, with speculative
decoding of the running row, and with rows finishing or cancelled while a prompt is part-way."""
import time

import pytest

from conftest import need_kernels
from generate import Batcher, SamplingParams, Sequence, generate
from lut_store import LUTStore

LONG = ("The harbour of the old town was quiet that morning. Fishing boats rocked at their moorings, gulls "
        "circled the market square, and the baker on the corner opened his shutters while the church bell "
        "rang seven times over the grey roofs")  # 48 tokens
RUNNER = "Once upon a time, there was a"
LABEL = "TLG Capital is an asset management firm."


def greedy(n):
    return SamplingParams(max_new_tokens=n, do_sample=False, ignore_eos=True)


def alone(model, tok, ids, n, lut=None):
    return generate(model, tok, [ids], greedy(n), [lut], draft_tokens=0, prefill_chunk=0)[0].out_ids


def admit_while_decoding(model, tok, chunk, prompt_ids, lut=None, draft_tokens=0, runner=RUNNER, runner_tokens=70):
    """A runner decoding, then prompt_ids admitted beside it: (runner tokens, prompt tokens, the
    runner's tokens gained during the prompt's prefill, steps the prefill took)."""
    b = Batcher(model, max_batch=4, draft_tokens=draft_tokens, prefill_chunk=chunk)
    first = Sequence(tok.encode(runner), greedy(runner_tokens), tok)
    assert b.admit([first]) == [first]
    b.step()
    late = Sequence(prompt_ids, greedy(10), tok, lut)
    before, steps = len(first.out_ids), 0
    assert b.admit([late]) == ([] if chunk else [late])
    while not late.out_ids:
        assert first in b.step()
        steps += 1
    gained = len(first.out_ids) - before
    while b.seqs:
        b.step()
    return first.out_ids, late.out_ids, gained, steps


def test_every_chunk_size_gives_the_unchunked_tokens(tiny):
    model, tok = tiny
    ids = tok.encode(LONG)
    want_late, want_first = alone(model, tok, ids, 10), alone(model, tok, tok.encode(RUNNER), 70)
    for chunk in [0] + list(range(1, len(ids) + 2)):
        pieces = -(-len(ids) // chunk) if chunk else 0
        n = pieces + 3  # the runner outlasts the prefill (greedy: a prefix of its longer run)
        first, late, gained, steps = admit_while_decoding(model, tok, chunk, ids, runner_tokens=n)
        assert late == want_late, chunk
        assert first == want_first[:n], chunk
        assert steps == pieces and gained == steps, chunk  # one piece per step, the runner a token on each


def test_int8_chunks_give_the_unchunked_tokens(hf_tiny):
    need_kernels()
    from model import load_model
    from tokenizer import get_tokenizer
    model = load_model("gpt2", quantize="int8")
    tok = get_tokenizer(model.tokenizer_spec)
    ids = tok.encode(LONG)
    want = alone(model, tok, ids, 10)
    for chunk in (1, 5, 16, 17, 32, 45):
        assert admit_while_decoding(model, tok, chunk, ids)[1] == want, chunk


def test_a_lut_firing_at_the_prompts_end_is_applied_on_its_last_piece(tiny, tmp_path):
    model, tok = tiny
    store = LUTStore(str(tmp_path / "luts.sqlite"))
    try:
        store.teach(model, tok, "u", LABEL)
        lut = store.load("u", model)
    finally:
        store.close()
    ids = tok.encode(LONG + ". TLG Capital is")
    want = alone(model, tok, ids, 10, lut)
    assert tok.decode(want).startswith(" an asset management firm.")
    for chunk in (1, 3, 8, 20, 64):
        first, late, _, _ = admit_while_decoding(model, tok, chunk, ids, lut)
        assert late == want, chunk


def test_speculative_decoding_of_the_running_row_while_a_prompt_is_prefilled(tiny):
    model, tok = tiny
    runner = "one two three four one two three four one two three"  # prompt lookup drafts
    want_first = alone(model, tok, tok.encode(runner), 70)
    ids = tok.encode(LONG)
    want_late = alone(model, tok, ids, 10)
    for chunk in (4, 16):
        first, late, gained, steps = admit_while_decoding(model, tok, chunk, ids, draft_tokens=8, runner=runner)
        assert first == want_first and late == want_late, chunk
        assert gained >= steps


def test_rows_that_finish_or_are_cancelled_while_a_prompt_is_part_way(tiny):
    """Rows leaving the batch move the part-way prompt's row (its cache with it), and a waiting
    prompt cancelled before its turn is dropped; nobody's tokens change."""
    model, tok = tiny
    prompts = ["Once upon a time", "The weather today", "In the beginning"]
    b = Batcher(model, max_batch=6, draft_tokens=0, prefill_chunk=8)
    runners = [Sequence(tok.encode(p), greedy(n), tok) for p, n in zip(prompts, (3, 30, 5))]
    b.admit(runners)
    b.step()
    late = Sequence(tok.encode(LONG), greedy(10), tok)
    dropped = Sequence(tok.encode("Never mind"), greedy(10), tok)
    queued = Sequence(tok.encode("A short one"), greedy(10), tok)
    assert b.admit([late, dropped, queued]) == []
    b.step()
    assert b.decoding == 2 and b.seqs[2] is late and b.lengths[2] == 8  # one runner done; the first piece in
    dropped.cancel()
    while b.seqs:
        b.step()
    assert dropped.out_ids == []
    for s in runners + [late, queued]:
        assert s.out_ids == alone(model, tok, s.prompt_ids, s.params.max_new_tokens), tok.decode(s.prompt_ids)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_prompts_share_the_decode_pass_of_the_rows_running_beside_them(hf_tiny, quantize):
    """Where the CPU runs a pass in one call, a step feeds its prompt tokens (whole short prompts,
    a long one's piece) through the decoding rows' pass: one pass a step, and every row's tokens,
    sampled ones included, are those it gets alone."""
    from model import load_model
    from tokenizer import get_tokenizer
    need_kernels()
    model = load_model("gpt2", quantize=quantize)
    tok = get_tokenizer(model.tokenizer_spec)
    sampled = SamplingParams(max_new_tokens=30, temperature=0.8, seed=5, ignore_eos=True)
    want = {"runner": generate(model, tok, [tok.encode(RUNNER)], sampled, draft_tokens=0)[0].out_ids}
    prompts = {"short": "The weather today", "long": LONG, "other": "In the beginning"}
    want.update((k, alone(model, tok, tok.encode(p), 10)) for k, p in prompts.items())
    passes = {"fused": 0, "other": 0}
    forward, forward_tokens = model.forward, model.forward_tokens

    def count(kind, fn):
        def call(*args, **kwargs):
            passes[kind] += 1
            return fn(*args, **kwargs)
        return call

    model.forward, model.forward_tokens = count("other", forward), count("fused", forward_tokens)
    try:
        b = Batcher(model, max_batch=4, draft_tokens=8, prefill_chunk=16)
        runner = Sequence(tok.encode(RUNNER), sampled, tok)
        b.admit([runner])
        late = {k: Sequence(tok.encode(p), greedy(10), tok) for k, p in prompts.items()}
        assert b.admit(list(late.values())) == []
        passes.update(fused=0, other=0)
        steps = 0
        while not all(s.out_ids for s in late.values()):
            b.step()
            steps += 1
        assert passes == {"fused": steps, "other": 0} and steps >= 3  # 16-token rounds: "short", pieces of "long"...
        while b.seqs:
            b.step()
    finally:
        del model.forward, model.forward_tokens
    assert runner.out_ids == want["runner"]
    for k, s in late.items():
        assert s.out_ids == want[k], k


@pytest.mark.parametrize("chunk", [0, 16])
def test_engine_serves_a_long_prompt_beside_running_requests(tiny, chunk):
    from server.engine import Engine
    model, tok = tiny
    engine = Engine(model, tok, max_batch=4, draft_tokens=0, prefill_chunk=chunk)
    try:
        jobs = [engine.submit(tok.encode(p), greedy(30)) for p in ("Once upon a time", "The weather today")]
        while not jobs[0].seq.out_ids:  # decoding: the long prompt joins a running batch
            time.sleep(0.001)
        long = engine.submit(tok.encode(LONG), greedy(10))
        results = [j.wait(60).out_ids for j in jobs + [long]]
    finally:
        engine.stop()
    assert results[-1] == alone(model, tok, tok.encode(LONG), 10)
    assert results[0] == alone(model, tok, tok.encode("Once upon a time"), 30)


def test_pieces_are_cut_to_what_the_measured_rate_fits_in_a_step(tiny):
    """prefill_chunk bounds a piece in tokens; piece_seconds bounds it in time at the rate whole
    pieces were measured at. With a budget no rate can meet, every piece after the first (nothing
    measured yet) is one token, and a prompt shorter than prefill_chunk goes in pieces too
    rather than waiting for a step with room for it whole."""
    model, tok = tiny
    b = Batcher(model, max_batch=4, draft_tokens=0, prefill_chunk=16, piece_seconds=1e-9)
    first = Sequence(tok.encode(RUNNER), greedy(100), tok)
    b.admit([first])
    b.step()
    ids = tok.encode(LONG)
    for prompt in (ids, ids[:6]):
        late = Sequence(prompt, greedy(10), tok)
        b.admit([late])
        row, pieces = b.seqs.index(late), []
        while not late.out_ids and len(pieces) < 100:  # a prompt left waiting fails, not hangs
            cached = b.lengths[row]
            assert first in b.step()
            pieces.append(b.lengths[row] - cached)
        assert pieces == ([16] if prompt is ids else []) + [1] * (len(prompt) - (16 if prompt is ids else 0))
        while not late.done:
            b.step()
        assert late.out_ids == alone(model, tok, prompt, 10)


def test_prefill_chunk_is_a_setting():
    from generate import PREFILL_CHUNK
    from server.config import ServerConfig
    assert ServerConfig().prefill_chunk == PREFILL_CHUNK == 48
    with pytest.raises(ValueError, match="prefill_chunk must be >= 0"):
        ServerConfig(prefill_chunk=-1)
    assert ServerConfig.from_env({"GPT_PREFILL_CHUNK": "0"}).prefill_chunk == 0


def test_a_long_prompt_never_waits_for_the_cache_to_grow(tiny):
    """On the CPU kernels' path the KV cache holds the whole context from the start (address space;
    pages become resident as they are written), so admitting a long prompt copies nothing: the
    tensors a batch starts with are the ones it ends with. Elsewhere the cache grows on demand."""
    need_kernels()
    import torch
    from model import GPT, GPTConfig, KVCache
    tok = tiny[1]
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=1024)).eval()
    assert KVCache(model.config, 4, "cpu", torch.float32).k[0].size(2) == 1024
    assert KVCache(model.config, 4, "cpu", torch.bfloat16).k[0].size(2) < 1024
    batcher = Batcher(model, max_batch=4, prefill_chunk=64)
    batcher.admit([Sequence(tok.encode(RUNNER), greedy(40), tok, None)])
    batcher.step()
    first = [t.data_ptr() for t in batcher.cache.k + batcher.cache.v]
    batcher.admit([Sequence(tok.encode(LONG * 12), greedy(20), tok, None)])  # ~580 tokens
    while batcher.decoding < 2:  # until the prompt, prefilled in pieces, decodes beside the runner
        batcher.step()
    assert max(batcher.lengths) > 512
    assert [t.data_ptr() for t in batcher.cache.k + batcher.cache.v] == first
