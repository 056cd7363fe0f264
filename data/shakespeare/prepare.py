"""
Tiny Shakespeare in GPT-2's BPE: for fine-tuning GPT-2 (train.py --init_from gpt2). The nanoGPT API's
spelling `shakesphere` is accepted as this dataset's name by train.py and /api/train.

    python data/shakespeare/prepare.py                                        # downloads the text
    python data/shakespeare/prepare.py --input ../shared/data/tinyshakespeare.txt
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import TINYSHAKESPEARE_URL, parse_args, prepare_bpe  # noqa: E402

if __name__ == "__main__":
    prepare_bpe(parse_args(__doc__), os.path.dirname(os.path.abspath(__file__)), TINYSHAKESPEARE_URL)
