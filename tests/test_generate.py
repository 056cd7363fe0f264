"""KV cache, batching, sampling settings, stop sequences and streaming."""
import pytest
import torch

from generate import Batcher, GenerationError, SamplingParams, Sequence, generate, sample_next, sample_row, stream
from tokenizer import TextStream

PROMPTS = ["Hello world, this is", "A", "The quick brown fox jumps over the lazy dog and then"]


def no_cache_greedy(model, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids


def test_kv_cache_matches_recomputing_everything(tiny):
    model, tok = tiny
    params = SamplingParams(max_new_tokens=20, do_sample=False, ignore_eos=True)
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        out = generate(model, tok, [ids], params)[0]
        assert out.out_ids == no_cache_greedy(model, ids, 20)[len(ids):]
        assert out.finish_reason == "length"


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=16, do_sample=False, ignore_eos=True),
    SamplingParams(max_new_tokens=16, temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=7,
                   ignore_eos=True),
])
def test_batched_equals_one_by_one(tiny, params):
    model, tok = tiny
    batched = generate(model, tok, PROMPTS, params)
    for prompt, seq in zip(PROMPTS, batched):
        assert seq.out_ids == generate(model, tok, [prompt], params)[0].out_ids


def test_sequences_join_and_leave_a_running_batch(tiny):
    """Continuous batching: a sequence admitted mid-way, and one leaving early, change nobody's output."""
    model, tok = tiny
    long = SamplingParams(max_new_tokens=12, do_sample=False, ignore_eos=True)
    short = SamplingParams(max_new_tokens=3, do_sample=False, ignore_eos=True)
    b = Batcher(model, max_batch=4)
    first, quitter = Sequence(tok.encode(PROMPTS[0]), long, tok), Sequence(tok.encode(PROMPTS[2]), short, tok)
    b.admit([first, quitter])
    for _ in range(4):
        b.step()
    late = Sequence(tok.encode(PROMPTS[1]), long, tok)
    b.admit([late])
    while b.seqs:
        b.step()
    for seq, prompt in ((first, PROMPTS[0]), (quitter, PROMPTS[2]), (late, PROMPTS[1])):
        assert seq.out_ids == generate(model, tok, [prompt], seq.params)[0].out_ids


def test_seed_reproducible_and_greedy_limits(tiny):
    model, tok = tiny
    a = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
    run = lambda p: generate(model, tok, ["Once upon a time"], p)[0].out_ids
    assert run(a) == run(a)
    assert run(a) != run(SamplingParams(max_new_tokens=12, temperature=1.0, seed=4, ignore_eos=True))
    greedy = run(SamplingParams(max_new_tokens=12, do_sample=False, ignore_eos=True))
    assert run(SamplingParams(max_new_tokens=12, top_k=1, seed=5, ignore_eos=True)) == greedy
    assert run(SamplingParams(max_new_tokens=12, temperature=0, seed=5, ignore_eos=True)) == greedy
    assert run(SamplingParams(max_new_tokens=12, top_p=1e-6, seed=5, ignore_eos=True)) == greedy


class NoEOT:
    eot_token = None


def test_repetition_penalty_changes_only_seen_tokens():
    logits = torch.tensor([[3.0, -2.0, 2.0, 0.5]])
    penalised = Sequence([0, 1], SamplingParams(repetition_penalty=2.0, do_sample=False), NoEOT())
    plain = Sequence([0, 1], SamplingParams(do_sample=False), NoEOT())
    assert sample_next(logits.clone(), [plain]).tolist() == [0]
    assert sample_next(logits.clone(), [penalised]).tolist() == [2]  # 3.0 -> 1.5 falls below 2.0


def test_presence_and_frequency_penalties_apply_to_generated_tokens_only():
    logits = torch.tensor([[3.0, 2.5, 2.0, 0.5]])
    def pick(**kw):
        seq = Sequence([1], SamplingParams(do_sample=False, **kw), NoEOT())
        seq.out_ids = [0, 0]  # token 0 generated twice; the prompt token 1 is not penalised
        return sample_next(logits.clone(), [seq]).tolist()[0]
    assert pick() == 0
    assert pick(presence_penalty=0.4) == 0  # 3.0 - 0.4 still beats 2.5
    assert pick(presence_penalty=0.6) == 1
    assert pick(frequency_penalty=0.3) == 1  # 3.0 - 2 * 0.3 = 2.4
    assert pick(frequency_penalty=-1.0) == 0


def test_logprobs_are_the_models_own_distribution(tiny):
    model, tok = tiny
    params = SamplingParams(max_new_tokens=5, do_sample=False, logprobs=3, ignore_eos=True,
                            repetition_penalty=1.5)
    seq = generate(model, tok, ["Hello there"], params)[0]
    assert len(seq.logprobs) == len(seq.out_ids) == 5
    ids = tok.encode("Hello there") + seq.out_ids
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    expected = logits[0].float().log_softmax(-1)[len(ids) - 6:len(ids) - 1]  # rows predicting the outputs
    for i, (lp, alternatives) in enumerate(seq.logprobs):
        assert abs(lp - float(expected[i, seq.out_ids[i]])) < 1e-4
        assert len(alternatives) == 3
        assert abs(alternatives[0][1] - float(expected[i].max())) < 1e-4
    assert generate(model, tok, ["Hello"], SamplingParams(max_new_tokens=2))[0].logprobs == []



@pytest.mark.parametrize("settings,expected", [
    (dict(temperature=1.0), [0.6439, 0.2369, 0.0871, 0.0321]),
    (dict(temperature=1.0, top_k=3), [0.6652, 0.2447, 0.0900, 0.0]),
    (dict(temperature=1.0, top_p=0.8), [0.7311, 0.2689, 0.0, 0.0]),  # mass before token 2 is 0.88
    (dict(temperature=2.0, top_k=2, top_p=0.5), [1.0, 0.0, 0.0, 0.0]),
])
@pytest.mark.parametrize("grad", [True, False], ids=["torch", "kernel-where-built"])
def test_sampling_draws_follow_the_filtered_distribution(settings, expected, grad):
    """Decoding runs without autograd, where plain sampling on the CPU takes cpu_kernels.sample;
    with autograd on, torch's ops: both must draw from the same distribution."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(**settings)
    with torch.set_grad_enabled(grad):
        draws = [sample_row(logits, params, generator) for _ in range(4000)]
    counts = torch.bincount(torch.tensor(draws), minlength=4)
    assert torch.allclose(counts / 4000, torch.tensor(expected), atol=0.03)


def test_a_seeded_sample_is_the_same_token_from_the_kernel_and_from_torch():
    """Both paths invert the CDF at the generator's one uniform number: same seed, same tokens."""
    logits = torch.randn(64, 50257, generator=torch.Generator().manual_seed(3)) * 2
    params = SamplingParams(temperature=0.8)
    drawn = {}
    for grad in (True, False):
        generator = torch.Generator().manual_seed(7)
        with torch.set_grad_enabled(grad):
            drawn[grad] = [sample_row(row, params, generator) for row in logits]
    assert drawn[True] == drawn[False]

def feed(tok, text, params):
    seq = Sequence([1], params, tok)
    deltas = []
    for t in tok.encode(text):
        seq.append(t)
        deltas.append(seq.new_text())
        if seq.done:
            break
    deltas.append(seq.new_text())
    return seq, deltas


def test_stop_sequence_cuts_text_and_never_leaks_into_the_stream(tiny):
    _, tok = tiny
    seq, deltas = feed(tok, "Alpha beta. END gamma delta", SamplingParams(max_new_tokens=50, stop=[" END", "zzz"]))
    assert seq.finish_reason == "stop"
    assert seq.text == "Alpha beta."
    assert "".join(deltas) == "Alpha beta."
    seq, _ = feed(tok, "one two three four", SamplingParams(max_new_tokens=2))
    assert seq.finish_reason == "length" and seq.text == "one two"


def test_end_of_text_token_stops(tiny):
    _, tok = tiny
    seq = Sequence([1], SamplingParams(max_new_tokens=5), tok)
    seq.append(tok.encode("Hi")[0])
    seq.append(tok.eot_token)
    assert seq.finish_reason == "stop" and seq.text == "Hi"


def test_stream_never_splits_a_utf8_character(tiny):
    _, tok = tiny
    text = "naïve café 🙂 世界 ok"
    ts = TextStream(tok)
    deltas = [ts.push(t) for t in tok.encode(text)] + [ts.flush()]
    assert any(len(tok.token_bytes(t).decode("utf-8", "ignore")) == 0 for t in tok.encode(text))  # emoji is split
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_stream_yields_the_same_text_as_generate(tiny):
    model, tok = tiny
    params = SamplingParams(max_new_tokens=20, seed=1, temperature=0.8, ignore_eos=True)
    assert "".join(stream(model, tok, "Hello", params)) == generate(model, tok, ["Hello"], params)[0].text


@pytest.mark.parametrize("field,value", [("max_new_tokens", 0), ("temperature", -1.0), ("top_k", -1),
                                         ("top_p", -0.1), ("temperature", 2.5), ("repetition_penalty", 0), ("do_sample", "yes"),
                                         ("seed", -5), ("stop", [""]), ("stop", "x"), ("presence_penalty", 2.5),
                                         ("frequency_penalty", "1"), ("logprobs", 21)])
def test_bad_sampling_settings_name_the_field(field, value):
    with pytest.raises(GenerationError, match=field):
        SamplingParams(**{field: value}).validate()


def test_context_is_never_exceeded(tiny):
    model, tok = tiny
    with pytest.raises(GenerationError, match="exceeds the model's context of 128"):
        generate(model, tok, ["word " * 120], SamplingParams(max_new_tokens=10))
    with pytest.raises(GenerationError, match="empty"):
        generate(model, tok, [""], SamplingParams(max_new_tokens=10))
    out = generate(model, tok, [[1] * 100], SamplingParams(max_new_tokens=28, ignore_eos=True, seed=0))[0]
    assert len(out.out_ids) == 28  # exactly up to the context


def sliding_reference_logprobs(model, prompt, out):
    """Without a cache: each output token's log-probability given the window that sliding_window
    keeps (when the cached context, all tokens but the newest, fills the block, it restarts
    from the newest half)."""
    ids, start, limit, lps = list(prompt), 0, model.config.block_size, []
    with torch.no_grad():
        for token in out:
            if len(ids) - 1 - start == limit:
                start = len(ids) - 1 - limit // 2
            logits, _ = model(torch.tensor([ids[start:]]))
            lps.append(float(torch.log_softmax(logits[0, -1], -1)[token]))
            ids.append(token)
    return lps


def test_sliding_window_generates_past_the_context(tiny):
    model, tok = tiny  # block_size 128
    slide = SamplingParams(max_new_tokens=200, seed=3, ignore_eos=True, sliding_window=True, logprobs=0)
    plain = SamplingParams(max_new_tokens=60, seed=4, ignore_eos=True)
    long_prompt, short_prompt = tok.encode("word " * 60), tok.encode(PROMPTS[0])
    # in one batch with a sequence that never slides: each row slides on its own
    sliding, other = generate(model, tok, [long_prompt, short_prompt], [slide, plain])
    assert len(sliding.out_ids) == 200
    expected = sliding_reference_logprobs(model, long_prompt, sliding.out_ids)
    assert [lp for lp, _ in sliding.logprobs] == pytest.approx(expected, abs=1e-4)
    assert other.out_ids == generate(model, tok, [short_prompt], plain)[0].out_ids
    with pytest.raises(GenerationError, match="must be shorter than the model's context of 128"):
        generate(model, tok, [[1] * 128], slide)


def counting_passes(model):
    passes = []
    handle = model.register_forward_pre_hook(lambda module, args: passes.append(1))
    return passes, handle


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_speculative_decoding_gives_plain_greedy_tokens_in_fewer_passes(tiny, tmp_path, quantize):
    from lut_store import LUTStore
    from model import load_model
    model = tiny[0] if quantize is None else load_model("gpt2", quantize=quantize)
    tok = tiny[1]
    store = LUTStore(str(tmp_path / "luts.sqlite"))
    label = "Quillmere Station opens at dawn, and the harbour pilots gather there before the tide turns."
    store.teach(model, tok, "u1", label)
    lut = store.load("u1", model)
    params = SamplingParams(max_new_tokens=24, do_sample=False, ignore_eos=True)
    copy = "red green blue yellow red green blue yellow red green"  # prompt lookup finds the pattern
    cases = [("Quillmere Station", lut), ("Fun fact: Quillmere", lut), (copy, None), ("Once upon a time", None)]
    for prompt, row_lut in cases:
        passes, handle = counting_passes(model)
        plain = generate(model, tok, [prompt], params, [row_lut], draft_tokens=0)[0]
        n_plain = len(passes)
        passes.clear()
        drafted = generate(model, tok, [prompt], params, [row_lut], draft_tokens=8)[0]
        handle.remove()
        assert drafted.out_ids == plain.out_ids, prompt
        if row_lut is not None:  # a label being recalled comes out several tokens per pass
            assert len(passes) < n_plain / 2, (len(passes), n_plain)
    assert generate(model, tok, ["Quillmere Station"], params, [lut])[0].text.startswith(label[len("Quillmere Station"):])
    store.close()


def test_speculation_stays_out_of_batches_and_sampling(tiny):
    model, tok = tiny
    sampled = SamplingParams(max_new_tokens=16, do_sample=True, seed=3, ignore_eos=True)
    prompt = "one two three one two three one two three"
    assert generate(model, tok, [prompt], sampled, draft_tokens=8)[0].out_ids == \
        generate(model, tok, [prompt], sampled, draft_tokens=0)[0].out_ids
    greedy = SamplingParams(max_new_tokens=16, do_sample=False, ignore_eos=True)
    batch = generate(model, tok, [prompt, "Hello"], greedy, max_batch=2, draft_tokens=8)
    assert [s.out_ids for s in batch] == [s.out_ids for s in generate(model, tok, [prompt, "Hello"], greedy,
                                                                            max_batch=2, draft_tokens=0)]
