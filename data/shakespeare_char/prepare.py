"""
Tiny Shakespeare, one token per character: the quickest model to train on a CPU.

    python data/shakespeare_char/prepare.py                                   # downloads the text
    python data/shakespeare_char/prepare.py --input ../shared/data/tinyshakespeare.txt

Writes train.bin, val.bin (uint16) and meta.json, whose tokenizer field holds the character
vocabulary as a string (JSON, not pickle).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import TINYSHAKESPEARE_URL, parse_args, read_text, split_text, write_dataset  # noqa: E402
from tokenizer import CharTokenizer  # noqa: E402


def main(argv=None):
    args = parse_args(__doc__, argv)
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(__file__))
    text = read_text(args.input, TINYSHAKESPEARE_URL, os.path.join(out_dir, "input.txt"))
    tok = CharTokenizer(sorted(set(text)))
    train, val = split_text(text, args.val_fraction)
    write_dataset(out_dir, tok.encode(train), tok.encode(val), tok)


if __name__ == "__main__":
    main()
