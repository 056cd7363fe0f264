"""
Tokenizers: GPT-2's BPE through tiktoken, or a character vocabulary for char-level models.
A checkpoint records which one it was trained with as a small JSON-able dict (see `spec`).
"""
import codecs


class GPT2Tokenizer:
    eot_token = 50256  # <|endoftext|>

    def __init__(self):
        import tiktoken  # reads TIKTOKEN_CACHE_DIR, downloads the BPE files once otherwise
        self.enc = tiktoken.get_encoding("gpt2")
        self.vocab_size = self.enc.n_vocab
        self.spec = {"type": "tiktoken", "name": "gpt2"}

    def encode(self, text):
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def token_bytes(self, token):
        return self.enc.decode_single_token_bytes(token)

    def decode(self, ids):
        return self.enc.decode(list(ids), errors="replace")


class CharTokenizer:
    eot_token = None

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.vocab_size = len(self.chars)
        self.spec = {"type": "char", "chars": "".join(self.chars)}

    def encode(self, text):
        unknown = sorted({ch for ch in text if ch not in self.stoi})
        if unknown:
            raise ValueError(f"characters not in this model's vocabulary: {''.join(unknown)!r}")
        return [self.stoi[ch] for ch in text]

    def token_bytes(self, token):
        return self.chars[token].encode("utf-8")

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def get_tokenizer(spec=None):
    """spec: None (GPT-2 BPE) or a dict as stored in checkpoints and meta.json files."""
    if spec is None or spec.get("type") == "tiktoken":
        return GPT2Tokenizer()
    if spec.get("type") == "char":
        return CharTokenizer(spec["chars"])
    raise ValueError(f"unknown tokenizer spec {spec!r}")


class TextStream:
    """Turns tokens into text deltas. A multi-byte UTF-8 character split over several BPE tokens
    is held back until it is complete, so no delta ever carries half a character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token):
        return self.decoder.decode(self.tokenizer.token_bytes(token))

    def flush(self):
        return self.decoder.decode(b"", final=True)
