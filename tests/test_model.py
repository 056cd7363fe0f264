"""GPT-2 conformance with transformers, checkpoint loading, and errors when weights are missing."""
import os

import pytest
import torch

from conftest import need_kernels
from model import Conv1D, GPT, GPTConfig, ModelLoadError, from_pretrained, load_model


def test_hub_layout_logits_match_transformers(hf_tiny, tiny):
    model, _ = tiny
    idx = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model(idx)
        ref = hf_tiny(idx).logits
    assert (ours - ref).abs().max().item() <= 1e-4


def test_save_pretrained_layout_loads_the_same_weights(tiny):
    model, _ = tiny
    other = load_model("gpt2-medium")  # written with the 'transformer.' prefix
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name


def test_greedy_generation_matches_transformers(hf_tiny, tiny):
    from generate import SamplingParams, generate
    model, tok = tiny
    prompt = tok.encode("The quick brown fox")
    with torch.no_grad():
        ref = hf_tiny.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               do_sample=False, max_new_tokens=24, min_new_tokens=24, pad_token_id=0,
                               eos_token_id=None)[0, len(prompt):].tolist()
    ours = generate(model, tok, [prompt], SamplingParams(max_new_tokens=24, do_sample=False, ignore_eos=True))
    assert ours[0].out_ids == ref


def test_fp32_weights_are_copied_into_huge_pages_and_the_file_given_back(hf_tiny, tiny):
    """load_model on the CPU in fp32 copies the mapped file's weights into anonymous memory advised
    for transparent huge pages (faster decoding), keeping the values and the wte / lm_head tie."""
    model, _ = tiny
    mapped = from_pretrained("gpt2").eval()  # views of the file, not moved
    for (name, a), (_, b) in zip(model.state_dict().items(), mapped.state_dict().items()):
        assert torch.equal(a, b), name
    assert model.lm_head.weight is model.transformer.wte.weight
    if not os.path.exists("/sys/kernel/mm/transparent_hugepage"):
        pytest.skip("no transparent huge pages in this kernel to check for")
    where = model.transformer.wte.weight.data_ptr()
    with open("/proc/self/smaps") as f:
        maps = f.read().split("\n")
    for i, line in enumerate(maps):
        fields = line.split()
        if "-" in fields[0] and int(fields[0].split("-")[0], 16) <= where < int(fields[0].split("-")[1], 16):
            assert len(fields) < 6  # anonymous: no file path, so not the safetensors file any more
            flags = next(m for m in maps[i:] if m.startswith("VmFlags:")).split()
            assert "hg" in flags  # madvise(MADV_HUGEPAGE)
            return
    pytest.fail("wte's memory is in no mapping of /proc/self/smaps")


def test_missing_weights_offline_is_a_clear_error(hf_tiny):
    with pytest.raises(ModelLoadError, match=r"openai-community/gpt2-large/model.safetensors.*HF_HOME"):
        from_pretrained("gpt2-large")
    with pytest.raises(ModelLoadError, match="unknown model_type"):
        from_pretrained("gpt3")


def test_corrupt_weights_are_a_clear_error(hf_tiny, tmp_path):
    from conftest import TINY, write_hub_model
    snap = write_hub_model("gpt2-xl", {}, TINY)
    with open(os.path.join(snap, "model.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        from_pretrained("gpt2-xl")


def test_checkpoint_roundtrip_is_safe_and_handles_compile_prefix(tmp_path):
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=65)
    model = GPT(config)
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"model_args": config.__dict__, "model": state, "iter_num": 3,
                "tokenizer": {"type": "char", "chars": "".join(chr(32 + i) for i in range(65))}}, path)
    loaded = load_model(str(tmp_path))
    assert loaded.tokenizer_spec["type"] == "char"
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model_args": {}, "model": {}, "evil": ModelLoadError("x")}, path)  # needs unpickling code
    with pytest.raises(ModelLoadError, match="not a usable checkpoint"):
        load_model(str(path))


def test_unknown_and_missing_init_from():
    with pytest.raises(ModelLoadError, match="unknown model type"):
        load_model("gpt2-huge")
    with pytest.raises(ModelLoadError, match="neither a GPT-2 type"):
        load_model("out/does-not-exist")


def test_few_row_linear_kernel_matches_addmm_and_training_keeps_autograd():
    need_kernels()  # without them this would compare addmm with addmm
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # one row splits K between the threads: 300 inputs make two chunks and a ragged end
    try:
        # 200 columns: whole tiles and a ragged rest (read through lane masks); 40: less than one tile
        for n_in, n_out, bias in ((96, 200, True), (96, 40, True), (96, 200, False), (300, 200, True), (300, 40, False)):
            layer = Conv1D(n_in, n_out, bias=bias).eval()
            torch.nn.init.normal_(layer.weight, std=0.02)
            if bias:
                torch.nn.init.normal_(layer.bias, std=0.02)
            ref = (lambda x: torch.addmm(layer.bias, x, layer.weight)) if bias else (lambda x: x @ layer.weight)
            for rows in (1, 2, 3, 5, 8, 9, 11, 16, 40):  # each row path of the kernel and mixes; past 16 addmm
                x = torch.randn(rows, 1, n_in)
                with torch.no_grad():
                    torch.testing.assert_close(layer(x), ref(x.view(rows, n_in)).view(rows, 1, n_out))
    finally:
        torch.set_num_threads(threads)
    layer = Conv1D(96, 200)
    x = torch.randn(8, 1, 96)
    layer(x).sum().backward()  # training: autograd through addmm
    assert layer.weight.grad is not None
