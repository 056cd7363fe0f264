"""
OpenWebText (~9B GPT-2 tokens, ~54 GB of Hugging Face cache) for training GPT-2 124M from scratch.

    pip install datasets                      # not a project requirement: only this script needs it
    python data/openwebtext/prepare.py        # downloads through Hugging Face `datasets`
    python data/openwebtext/prepare.py --input my_corpus.txt   # any local text file instead

Without --input it loads --hf_dataset (default Skylion007/openwebtext) with `datasets`, tokenizes
it in parallel with GPT-2's BPE (an <|endoftext|> after each document), holds out a small
validation split and streams the ids into train.bin / val.bin (uint16) shard by shard, never
holding a whole split in memory. This path needs the network and has not been run where this
project is tested (no internet there); recent `datasets` releases refuse script-based datasets,
so point --hf_dataset at a Parquet copy if the default is refused.
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from common import parse_args, prepare_bpe, write_meta  # noqa: E402


def add_arguments(p):
    p.add_argument("--hf_dataset", default="Skylion007/openwebtext", help="Hugging Face dataset to load")
    p.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="processes for loading and tokenizing")


def from_hub(args, out_dir):
    try:
        from datasets import load_dataset
    except ImportError:
        sys.exit("error: this path needs Hugging Face datasets (pip install datasets), or pass --input FILE")
    from tokenizer import GPT2Tokenizer
    tok = GPT2Tokenizer()
    os.makedirs(out_dir, exist_ok=True)
    split = load_dataset(args.hf_dataset, num_proc=args.num_proc)["train"].train_test_split(
        test_size=args.val_fraction, seed=2357, shuffle=True)

    def encode(example):
        ids = tok.enc.encode_ordinary(example["text"]) + [tok.eot_token]
        return {"ids": ids, "len": len(ids)}

    tokenized = split.map(encode, remove_columns=["text"], desc="tokenizing", num_proc=args.num_proc)
    lengths = {}
    for name, dset in (("train", tokenized["train"]), ("val", tokenized["test"])):
        total = int(np.sum(dset["len"], dtype=np.uint64))
        out = np.memmap(os.path.join(out_dir, f"{name}.bin"), dtype=np.uint16, mode="w+", shape=(total,))
        at, shards = 0, max(1, min(1024, len(dset)))
        for i in range(shards):
            shard = dset.shard(num_shards=shards, index=i, contiguous=True).with_format("numpy")
            ids = np.concatenate(shard["ids"])
            out[at:at + len(ids)] = ids
            at += len(ids)
        out.flush()
        lengths[name] = total
    write_meta(out_dir, tok, lengths["train"], lengths["val"])


def main(argv=None):
    args = parse_args(__doc__, argv, add_arguments, val_fraction=0.0005)  # ~4,000 documents held out
    if args.input:  # a local file takes the same path as shakespeare
        prepare_bpe(args, HERE)
    else:
        from_hub(args, args.out_dir or HERE)


if __name__ == "__main__":
    main()
