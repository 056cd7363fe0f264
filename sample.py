"""
Sample from a GPT-2 or a model trained here, optionally through a user's LUT.

    python sample.py --init_from gpt2 --start "The meaning of life is" --num_samples 2
    python sample.py --init_from out/shakespeare_char --start FILE:prompt.txt --temperature 0.8
    python sample.py --init_from gpt2-xl --quantize int8 --start "Hello"
    python sample.py --lut_name user_123 --lut_db out/luts.sqlite --start "TLG Capital is"
"""
import argparse
import sys

from generate import DRAFT_TOKENS, GenerationError, SamplingParams, generate
from model import QUANTIZE, ModelLoadError, load_model, resolve_device
from tokenizer import get_tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", default="gpt2", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a checkpoint "
                   "directory/file written by train.py (e.g. out/shakespeare_char)")
    p.add_argument("--start", default="\n", help="the prompt, or FILE:path to read it from a file")
    p.add_argument("--num_samples", type=int, default=1, help="how many samples to draw")
    p.add_argument("--max_new_tokens", type=int, default=100, help="tokens to generate per sample (past the "
                   "context, generation goes on from its newest half)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    p.add_argument("--top_k", type=int, default=200, help="keep only the k likeliest tokens (0 = off)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="penalty for repeated tokens (1.0 = off)")
    p.add_argument("--greedy", action="store_true", help="always take the likeliest token (do_sample=false)")
    p.add_argument("--stop", action="append", default=[], help="stop when this string appears (repeatable)")
    p.add_argument("--seed", type=int, default=1337, help="random seed; sample i uses seed+i")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when present)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations dtype (float16 only on CUDA)")
    p.add_argument("--quantize", default=None, choices=QUANTIZE, help="int8: weights in int8 with a scale per "
                   "output column, 3-4x faster decoding on a CPU (see cpu_kernels.py); default: none")
    p.add_argument("--draft_tokens", type=int, default=DRAFT_TOKENS, help="speculative decoding of greedy samples "
                   "drawn one at a time (--greedy --num_samples 1, or --stream): tokens drafted from the LUT or the "
                   "prompt and verified in one pass; the output is the same; 0 = off")
    p.add_argument("--lut_name", default=None, help="apply this user's LUT (see lut.py)")
    p.add_argument("--lut_db", default="out/luts.sqlite", help="the SQLite file holding the LUTs")
    p.add_argument("--lut_trace", action="store_true", help="after each sample, list the spans of its text that "
                   "the LUT produced, with their labels and how they fired (needs --lut_name)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated (one sample at a time)")
    return p.parse_args(argv)


def read_prompt(start):
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            return f.read()
    return start


def print_trace(seq, wanted):
    """--lut_trace: one line per span the LUT produced, offsets into the generated text."""
    if not wanted:
        return
    spans = seq.lut_trace()
    print(f"[lut_trace] {len(spans)} span(s) produced by the LUT" + (":" if spans else ""))
    for span in spans:
        print(f"[lut_trace] {span['start']}-{span['end']} {span['text']!r} <- label {span['label_id']} "
              f"{span['label']!r} ({span['how']})")


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.num_samples < 1:
            raise GenerationError("--num_samples must be >= 1")
        if args.lut_trace and not args.lut_name:
            raise GenerationError("--lut_trace needs --lut_name")
        prompt = read_prompt(args.start)
        device, dtype = resolve_device(args.device, args.dtype)
        model = load_model(args.init_from, device, dtype, args.quantize)
        tokenizer = get_tokenizer(model.tokenizer_spec)
        lut = None
        if args.lut_name:
            from lut_store import LUTStore
            lut = LUTStore(args.lut_db).load(args.lut_name, model)
        ids = tokenizer.encode(prompt)
        params = [SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                 do_sample=not args.greedy, seed=args.seed + i, stop=args.stop,
                                 sliding_window=True).validate()
                  for i in range(args.num_samples)]
        if args.stream:  # one sample at a time, text printed as it comes
            for p in params:
                print(prompt, end="", flush=True)
                s, = generate(model, tokenizer, [ids], p, [lut], draft_tokens=args.draft_tokens,
                              on_text=lambda _, delta: print(delta, end="", flush=True))
                print()
                print_trace(s, args.lut_trace)
                print("---------------")
        else:  # all samples decoded together as one batch
            for s in generate(model, tokenizer, [ids] * len(params), params, [lut] * len(params),
                              draft_tokens=args.draft_tokens):
                print(prompt + s.text)
                print_trace(s, args.lut_trace)
                print("---------------")
    except (OSError, ValueError, ModelLoadError) as e:  # GenerationError and LUT errors are ValueErrors
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
