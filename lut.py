"""
Per-user lookup tables (LUTs): a discrete memory spliced into a frozen GPT-2's residual stream.

Teaching `label` (optionally after `label_context`) adds one entry per position of the lesson
(context + label) whose next token belongs to the label:
  key     an exact token *trigger*: the last tokens of the lesson up to that position (its
          evidence, at most EVIDENCE_TOKENS). An entry fires wherever the text so far (prompt,
          chat transcript or the model's own output) ends with at least `min_len` of them,
          whatever came before, so recall does not depend on the label starting the text.
  value   a vector added to the *final* residual (before ln_f) where the entry fires. After the
          last block only LayerNorm and the unembedding remain, so the value that makes the next
          token the label's is found by a few cheap steps in that small space. Its norm dwarfs the
          residual, so the logits no longer depend on what came before. Where an entry fires, the
          decoder emits its taught token: a small model can have tokens that no input to ln_f
          makes the argmax (the quick-start gcide model: ~5% of taught positions), and recall must
          not depend on that.
Positions where nothing fires are untouched: text without a trigger is bit-identical to the base
model.

How much evidence is enough (`min_len`): the shortest suffix of the evidence whose text holds a
word rarer than RARE_ZIPF, or two words rarer than COMMON_ZIPF (word frequencies of English from
the `wordfreq` package). Words must be whole inside the suffix. So "The", "I think that" or
"In 1998" never fire alone; "Quillmere" fires at once; "Alice Kim" or "capital of France" fire
as a pair. A label with no specific prefix fires only once enough of it is there; with
`label_context` the whole context always counts as enough, since the user chose it as the trigger.
Two entries the text matches equally deep but that predict different tokens ("Alice Kim is a" vs
"Marta Kim is a" after "Ms. Kim is a") do not fire; an entry whose whole evidence is in the text
wins over a shallower one; the same evidence taught again with another next token replaces the old
entry (latest wins).

GPT-2's BPE spells a word differently at the start of a text ("Quillmere") and after a space
(" Quillmere"), so each lesson is taught in both spellings.

Canonical entries: the lesson is also stored token by token as spelled after a space, keyed by
position (evidence CANON + the tokens before it, min_len = the position), and where the vocabulary
has <|endoftext|> one more entry ends it. Exact matching never fires them (no text holds CANON);
variants.py does, when a text names the label's subject in another way: other casing or Unicode
forms, hyphens, an insertion after the subject, another form of its linking verb, a rare part of
the subject alone, a possessive, or a question about it (answered with the whole label, which then
ends). A label of common words only ("I think that it is.") is accepted and recalled only where a
text starts with its first two words; recall_mode() says which of the three ways (subject,
context, text_start) a label is recalled by, and /train_lut answers with it.

Why text rules over the model's states for variants: the values must fire on the 124M shape with
random weights as on the trained models, and random weights carry no meaning, so any similarity of
residuals or embeddings is noise there; on the trained models it mixes words that share spelling
or position. The text rules keep what the exact triggers give (text without a named subject is
bit-identical to the base model) and decide from words a reader can check. Measured with
`bench/lut_eval.py --suite variants` (1,000 labels of four shapes, 23 held-out templates of eight
kinds, 2,400 sentences that name a subject and go elsewhere) on the 124M shape with random weights
and both trained models: docs/lut.md has the figures; in short, every kind recalled at 100% on
all three, 0 hijacks in 2,400 sentences, a reworded relation ("is known as" for "is") 0% (no
target: it is not a variant).

Why exact triggers rather than residual keys for the verbatim path: a key read from the residual
after block 2n/3-1, gated on the token, with a radius of half the distance to unrelated filler
text, recalled 100% when the prompt started with the label, but 0% after any leading text ("Fun
fact: ", a chat transcript) on random weights and on the trained char model alike: the residual at
a position mixes in everything before it, so a radius tight enough to stay local excludes the same
words after other text. An exact suffix ignores leading text by construction (as kNN-LM's and
infini-gram's exact contexts do), costs no forward pass to match, and its specificity can be
decided from the words themselves. Measured with bench/lut_eval.py (1,000 labels, 200 of them
starting with "The", "I think", "It is" or "In 1998") on the 124M shape with random weights, the
trained English BPE model (out/gcide) and the trained char model alike: recall 100% after six
kinds of leading text (chat transcripts among them) and after another label's text, 100% when the
model writes a trigger itself, zero false fires in 1,000 unrelated passages (65,000 tokens of
tinyshakespeare and model-written text), locality 100%; teaching a ~10-token label takes ~0.1 s on
the 124M shape (one forward pass over 4 short runs; no negatives to encode).

LUTs live in SQLite or PostgreSQL (storage.py; one row per entry, one transaction per teach); the labels are the source
of truth, and a LUT taught by an older version of this file is re-taught from them on first use.
`python lut.py --help` teaches, lists, exports and imports from the shell.
"""
import collections
import re

import numpy as np
import torch
from torch.nn import functional as F

from variants import START_WORDS, WORD_RE, Form, Variants, is_specific, trigger_prefix

NAME_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")  # fullmatch: `$` would let a final newline through
MAX_LABEL_TOKENS = 256
MAX_CONTEXT_TOKENS = 512
EVIDENCE_TOKENS = 64  # the longest trigger an entry keeps
# Texts a lesson is run behind when its values are solved, so they win after any text: the plain
# spelling alone (the first position, where GPT-2's residual is largest) and after a newline, the
# spaced one in a chat transcript.
TEACH_LEADS = (["", "\n"], ["User: Hello.\nAssistant:"])
MARGIN = 1.0  # logits by which a value puts its token ahead of every other
FORMAT = 3  # token triggers plus canonical entries; LUTs of older formats are re-taught on use
EXPORT_FORMAT = "gpt2-lut/3"
CANON = -2  # first evidence token of a canonical entry (no text has it: exact matching never fires one)
PAD = -1  # pads evidence in exports


class LUTError(ValueError):
    """A LUT request that cannot be done; status is the HTTP status the server answers with."""
    status = 400

    def __init__(self, message, status=None):
        super().__init__(message)
        if status:
            self.status = status


# ---------------------------------------------------------------------------- triggers

def trigger_lengths(tokenizer, lesson, first, has_context):
    """For each taught position p in range(first, len(lesson) - 1): how many tokens ending at p
    must match before the entry fires (its min_len), or None if no suffix is specific."""
    out = []
    for p in range(first, len(lesson) - 1):
        lo = max(0, p + 1 - EVIDENCE_TOKENS)
        next_char = tokenizer.decode(lesson[p + 1:p + 2])[:1]
        open_right = bool(next_char) and bool(WORD_RE.match(next_char))  # the word goes on in the label
        found = None
        for d in range(1, p + 2 - lo):
            start = p + 1 - d
            if is_specific(tokenizer.decode(lesson[start:p + 1]), start > 0, open_right):
                found = d
                break
        if found is None and has_context:
            found = p + 1 - lo  # the user's context is the trigger, however common its words
        out.append(found)
    return out


# ---------------------------------------------------------------------------- the model side

class LUT:
    """One LUT's entries: exact triggers grouped by the last token of their evidence, and the
    canonical entries through which variants fire (variants.py)."""

    def __init__(self, name, model_id, evidence, min_len, targets, values, version=0, label_ids=None,
                 labels=None, tokenizer=None):
        """evidence: list of int token lists (the trigger's tokens, oldest first; a canonical entry's
        starts with CANON and its min_len is its position in the label); min_len, targets: (N,)
        ints; values: (N, C) tensor. Entries are in teaching order (later = newer). label_ids: (N,)
        each entry's label; labels: {label id: (label, context)}; tokenizer: reads the text for
        variants (without it, and without labels, only exact triggers fire)."""
        self.name, self.model_id, self.version = name, model_id, version
        self.observe = None  # the store's observe(event, value): counts entries that fire (/metrics)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.values = values
        self.label_ids = np.asarray(label_ids if label_ids is not None else [-1] * len(self.targets), dtype=np.int64)
        self.labels = labels or {}
        # last token -> (entry ids, reversed evidence (n, L) padded -1, lengths, min_len, the smallest
        # min_len k, the set of the entries' last k tokens: text ending otherwise fires nothing here)
        self.groups = {}
        by_last = collections.defaultdict(list)
        canonical = collections.defaultdict(dict)  # label id -> {position: entry}
        for i, ev in enumerate(evidence):
            if ev[0] == CANON:
                canonical[int(self.label_ids[i])][int(min_len[i])] = i
            else:
                by_last[ev[-1]].append(i)
        for tok, ids in by_last.items():
            L = max(len(evidence[i]) for i in ids)
            rev = np.full((len(ids), L), -1, dtype=np.int64)
            for row, i in enumerate(ids):
                rev[row, :len(evidence[i])] = evidence[i][::-1]
            group_min_len = np.asarray(min_len, dtype=np.int64)[ids]
            least = int(group_min_len.min())
            self.groups[tok] = (np.array(ids), rev, np.array([len(evidence[i]) for i in ids]), group_min_len,
                                least, {tuple(evidence[i][-least:]) for i in ids})
        self.canonical = {}  # (label id, position) -> entry
        forms = []
        for label_id in sorted(canonical):
            positions = canonical[label_id]
            n = next(k for k in range(len(positions) + 1) if k not in positions)  # a whole prefix
            self.canonical.update(((label_id, k), positions[k]) for k in range(n))
            if tokenizer is not None and label_id in self.labels and n:
                label, context = self.labels[label_id]
                canon = [int(self.targets[positions[k]]) for k in range(n)]
                ends = canon[-1] == tokenizer.eot_token  # an answer ends after the label
                forms.append(Form(label_id, label, context or None, canon[:-1] if ends else canon, tokenizer.decode,
                                  ends))
        self.variants = Variants(forms, tokenizer) if forms else None

    def __len__(self):
        return len(self.targets)

    def to(self, device):
        """Values move to the model's device; they stay float16 (converted per hit) to halve memory."""
        lut = LUT.__new__(LUT)
        lut.__dict__.update(self.__dict__)
        lut.values = self.values.to(device)
        return lut

    def lookup(self, tokens, t, memo=None):
        """What fires at position t of `tokens` (a list of ids: the text so far): (entry, how), how
        one of "verbatim", "question" or the variant kinds of variants.py; (-1, None) if nothing.
        A question about a subject goes first (its answer is one label from start to end), then
        the exact trigger, unless a variant that names its subject goes on with another label (an
        exact trigger is a few words, "a salt mine near L", which another label can share), then
        the other variants. memo: see variants.Variants.read."""
        view = self.variants.read(tokens, t, memo) if self.variants is not None else None
        found = self.variants.question(view) if view else None
        if found is None:
            e = self.match(tokens, t)
            found = self.variants.statement(view) if view else None
            if e >= 0 and (found is None or found[0].id == self.label_ids[e]):
                return e, "verbatim"
        if found is None:
            return -1, None
        form, k, how = found
        return self.canonical[(form.id, k)], how

    def fire(self, tokens, t, memo=None):
        """lookup(), deciding cheaply by the exact trigger alone where no variant can apply (no
        subject named nearby: variants.Variants.quiet): what a decode step asks of every row.
        With a memo, the answer at its last stable position is kept: speculative decoding asks it
        twice (drafting, then verifying)."""
        if memo is not None and memo.get("fired", (None,))[0] == t and t < memo["stable"]:
            return memo["fired"][1]
        if self.variants is None or self.variants.quiet(tokens, t, t, memo):
            e = self.match(tokens, t)
            found = e, ("verbatim" if e >= 0 else None)
        else:
            found = self.lookup(tokens, t, memo)
        if memo is not None and t < memo["stable"]:
            memo["fired"] = t, found
        return found

    def label_of(self, entry):
        """(label id, label, label_context) of an entry."""
        label_id = int(self.label_ids[entry])
        label, context = self.labels.get(label_id, (None, None))
        return label_id, label, context or None

    def match(self, tokens, t):
        """The entry whose exact trigger fires at position t of `tokens`, or -1."""
        group = self.groups.get(tokens[t])
        if group is None:
            return -1
        ids, rev, lengths, min_len, least, tails = group
        if t + 1 < least or tuple(tokens[t + 1 - least:t + 1]) not in tails:  # the usual case, decided cheaply
            return -1
        depth = np.ones(len(ids), dtype=np.int64)  # tokens matched, counting back from t
        rows = np.arange(len(ids))
        for j in range(1, min(rev.shape[1], t + 1)):  # narrow down column by column: most die at once
            rows = rows[rev[rows, j] == tokens[t - j]]
            if not len(rows):
                break
            depth[rows] += 1
        deepest = depth.max()
        at = depth == deepest  # entries on the deepest path the text follows
        whole = at & (lengths == deepest) & (deepest >= min_len)
        if whole.any():  # an entry's whole evidence is there: the newest such entry
            return int(ids[whole][-1])
        if deepest >= min_len[at].max() and len(set(self.targets[ids[at]])) == 1:
            return int(ids[at][-1])  # specific enough, and every entry this deep agrees
        whole = (depth >= lengths) & (lengths >= min_len)  # else a shorter evidence seen whole
        if whole.any():
            longest = lengths[whole].max()
            return int(ids[whole & (lengths == longest)][-1])
        return -1


class LUTBatch:
    """The LUTs of the rows of one forward pass (None = base model) and where they fire.
    row_tokens[r] is row r's text so far; the forward pass covers its last window[r] tokens (the
    prompt in a prefill, 1 in a decode step). With last_only, only each row's last position is
    matched (a prefill that wants only the last logits). model.GPT.forward calls apply() on the
    final residual."""

    def __init__(self, row_luts, row_tokens, window, last_only=False, memos=None):
        """memos: per row, a dict kept with its sequence (see variants.Variants.read) or None."""
        self.hits = []  # (rows, positions, values) per LUT: what apply() adds
        self.fires = {}  # (row, position) -> (lut, entry, how): the taught token and what the trace reports
        found = {}  # id(lut) -> (lut, rows, positions, entries)
        for r, (lut, tokens) in enumerate(zip(row_luts, row_tokens)):
            if lut is None or not len(lut):
                continue
            n = len(tokens)
            start = n - window[r]
            first = n - 1 if last_only else start
            memo = memos[r] if memos else None
            for t in range(first, n):
                e, how = lut.fire(tokens, t, memo)
                if e >= 0:
                    _, rows, positions, entries = found.setdefault(id(lut), (lut, [], [], []))
                    rows.append(r)
                    positions.append(t - start)
                    entries.append(e)
                    self.fires[(r, t - start)] = (lut, e, how)
        for lut, rows, positions, entries in found.values():
            if lut.observe is not None:
                lut.observe("fired", len(entries))
            self.hits.append((torch.tensor(rows), torch.tensor(positions), lut.values[entries]))

    def apply(self, x):
        for rows, positions, values in self.hits:
            rows, positions = rows.to(x.device), positions.to(x.device)
            x = x.index_put((rows, positions), values.to(x.dtype), accumulate=True)
        return x

    @property
    def fired(self):
        return len(self.fires)

    def taught_at(self, positions):
        """positions: (B,) one position per row -> (B,) the taught next token where an entry fired
        there, -1 elsewhere (on the CPU); None when nothing fired."""
        if not self.fires:
            return None
        fires = self.fires_at(positions.tolist())
        return torch.tensor([-1 if f is None else int(f[0].targets[f[1]]) for f in fires], dtype=torch.long)

    def fires_at(self, positions):
        """positions: one position per row -> per row, (lut, entry, how) where an entry fired there, else None."""
        return [self.fires.get((r, int(p))) for r, p in enumerate(positions)]


class Recorder:
    """Stands in for a LUTBatch to capture the final residual (before ln_f)."""
    final = None

    def apply(self, x):
        self.final = x
        return x


@torch.no_grad()
def final_residuals(model, seqs):
    """Run right-padded token lists through the model; returns the final residuals (B, T, C)."""
    T = max(len(s) for s in seqs)
    idx = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s)
    rec = Recorder()
    device = next(model.parameters()).device
    # one logit row per sequence: the logits themselves are not needed
    model(idx.to(device), lut=rec, logits_at=torch.zeros(len(seqs), dtype=torch.long, device=device))
    return rec.final.float()


@torch.no_grad()
def token_directions(model, tokens, steps=20):
    """u (N, C) per token such that ln_f(u) makes that token the argmax by MARGIN logits where the
    model's output layer allows it: along the token's unembedding (usually enough), else a few
    Adam steps. A small model can have tokens that no input to ln_f makes the argmax; there u
    does what it can (the decoder emits the taught token anyway)."""
    ln_f = model.transformer.ln_f
    W = model.lm_head.weight.detach().float()  # (vocab, C); frozen: only u is optimised
    gamma = ln_f.weight.detach().float()
    beta = ln_f.bias.detach().float() if ln_f.bias is not None else None
    logits_of = lambda y: F.layer_norm(y, y.shape[-1:], gamma, beta, ln_f.eps) @ W.t()

    def margin(y, t):  # how far the token's logit is ahead of the best other one
        logits = logits_of(y)
        return logits.gather(1, t[:, None]).squeeze(1) - logits.scatter(1, t[:, None], -float("inf")).amax(1)

    u = (W[tokens] - W.mean(0)) * gamma
    hard = (margin(u, tokens) < MARGIN).nonzero().squeeze(1)
    if hard.numel():
        t = tokens[hard]
        best = u[hard].clone()
        best_margin = margin(best, t)
        with torch.enable_grad():
            x = best.clone().requires_grad_(True)
            opt = torch.optim.Adam([x], lr=0.05)
            for _ in range(steps):
                logp = logits_of(x).log_softmax(-1).gather(1, t[:, None]).squeeze(1)
                m = margin(x.detach(), t)
                better = m > best_margin
                best[better], best_margin[better] = x.detach()[better], m[better]
                if best_margin.min().item() >= MARGIN:
                    break
                opt.zero_grad()
                (-logp.sum()).backward()
                opt.step()
        u[hard] = best
    return u


@torch.no_grad()
def solve_values(model, targets, h_norm, directions):
    """Values v (N, C) that make `targets` (N,) the argmax when added to a final residual of norm
    up to h_norm (N,) (the largest seen where the entry was taught). v = s * u, u from
    token_directions (cached in `directions`, a dict token -> u, since u depends on the token
    only); s makes v dwarf the residual, so ln_f(h + v) ~ ln_f(u)."""
    distinct, which = torch.unique(targets, return_inverse=True)
    new = [t for t in distinct.tolist() if t not in directions]
    if new:
        directions.update(zip(new, token_directions(model, torch.tensor(new, device=targets.device))))
    u = torch.stack([directions[t] for t in distinct.tolist()])
    u = u[which]
    u = u - u.mean(dim=-1, keepdim=True)
    u = u * (u.size(-1) ** 0.5 / u.norm(dim=-1, keepdim=True))  # unit variance: entries are O(1)
    scale = (100 * h_norm[:, None] / u.norm(dim=-1, keepdim=True)).clamp(max=60000 / u.abs().amax(-1, keepdim=True))
    return (u * scale).half()  # what is stored is what is used


def encode_known(tokenizer, text):
    """The project's own helper texts (TEACH_LEADS) in this tokenizer's ids, leaving out
    characters that a character-level vocabulary lacks (Shakespeare's has no digits)."""
    def known(ch):
        try:
            return bool(tokenizer.encode(ch))
        except ValueError:
            return False
    return tokenizer.encode("".join(ch for ch in text if known(ch)))


def _encode(tokenizer, text, field):
    try:
        return tokenizer.encode(text)
    except ValueError as e:  # a character-level model meets a character it has never seen
        raise LUTError(f"{field}: {e}") from None


def tokenize_lesson(tokenizer, label, label_context, block_size, lead):
    """The lesson's spellings as [(tokens, first taught position)]: as written, and, where the
    tokenizer spells it differently, after a space (GPT-2's BPE: "Alice" vs " Alice"); and its
    canonical spelling, the one after a space (as written where it starts with one, or where the
    vocabulary has no space), which its canonical entries follow."""
    if not isinstance(label, str) or not label.strip():
        raise LUTError("label must be a non-empty string")
    if label_context is not None and not isinstance(label_context, str):
        raise LUTError("label_context must be a string")

    def spell(space):
        ctx = _encode(tokenizer, space + label_context, "label_context") if label_context else []
        return ctx, _encode(tokenizer, ("" if ctx else space) + label, "label")

    ctx, ids = spell("")
    if len(ids) > MAX_LABEL_TOKENS:
        raise LUTError(f"label is {len(ids)} tokens; at most {MAX_LABEL_TOKENS}", 413)
    if len(ctx) > MAX_CONTEXT_TOKENS:
        raise LUTError(f"label_context is {len(ctx)} tokens; at most {MAX_CONTEXT_TOKENS}", 413)
    if len(ctx) + len(ids) + lead + 1 > block_size:
        raise LUTError(f"label_context plus label exceed the model's context of {block_size} tokens", 413)
    if not ctx and len(ids) < 2:
        raise LUTError("label must be at least two tokens when no label_context is given "
                       "(nothing follows a single token)")
    lessons = [(ctx + ids, max(len(ctx) - 1, 0))]
    if (label_context or label)[:1].isspace():
        return lessons, ctx + ids
    try:
        sctx, sids = spell(" ")
    except LUTError:  # a vocabulary without a space
        return lessons, ctx + ids
    if (sctx + sids)[1:] != lessons[0][0]:  # spelled differently, not just a space token more
        lessons.append((sctx + sids, max(len(sctx) - 1, 0)))
    return lessons, sctx + sids


def recall_mode(label, label_context=None):
    """How a label is recalled, as (mode, trigger): ("subject", the start that names it) wherever a
    text names that subject, in its variants and in questions about it; ("context", the context)
    after its label_context or a variant of it; ("text_start", its first words) only where a text
    starts with them, since a label of common words alone must not change other texts."""
    if label_context:
        return "context", label_context
    trig = trigger_prefix(label)
    if trig:
        return "subject", trig
    words = list(WORD_RE.finditer(label))
    return "text_start", label[:words[min(START_WORDS, len(words)) - 1].end()] if words else label


@torch.no_grad()
def build_entries(model, tokenizer, label, label_context=None, directions=None):
    """The entries that teach `label` (after `label_context`): a dict of arrays, one row per entry.
    directions: a cache for solve_values, kept for as long as the model does not change."""
    leads = [[encode_known(tokenizer, c) for c in texts] for texts in TEACH_LEADS]
    lessons, canon = tokenize_lesson(tokenizer, label, label_context, model.config.block_size,
                                     max(len(lead) for texts in leads for lead in texts))
    chat = leads[1][0] or canon[:1]  # canonical entries: what a variant or an answer fires, each label token after a space
    if len(chat) + len(canon) > model.config.block_size:
        chat = chat[len(chat) + len(canon) - model.config.block_size:]
    entries = collections.defaultdict(list)
    for li, (seq, first) in enumerate(lessons):
        for p, min_len in zip(range(first, len(seq) - 1),
                              trigger_lengths(tokenizer, seq, first, bool(label_context))):
            if min_len is not None:
                entries["position"].append(p)
                entries["min_len"].append(min_len)
                entries["evidence"].append(seq[max(0, p + 1 - EVIDENCE_TOKENS):p + 1])
                entries["target"].append(seq[p + 1])
                entries["lesson"].append(li)
    # ... and, where the vocabulary has one, <|endoftext|> after it: an answer that states the
    # label ends there
    for k in range(len(canon) + (tokenizer.eot_token is not None)):
        entries["position"].append(k - 1)
        entries["min_len"].append(k)  # a canonical entry's min_len is its position in the label
        entries["evidence"].append([CANON] + canon[max(0, k + 1 - EVIDENCE_TOKENS):k])
        entries["target"].append(canon[k] if k < len(canon) else tokenizer.eot_token)
        entries["lesson"].append(len(lessons))
    # each spelling behind its leads (one spelling: all leads), the canonical one after a chat
    # turn; the value must dwarf the residual of every run
    if len(lessons) == 1:
        leads = [leads[0] + leads[1]]
    runs = [(li, lead) for li in range(len(lessons)) for lead in leads[li]] + [(len(lessons), chat)]
    texts = [lead + lessons[li][0] for li, lead in runs[:-1]] + [chat + canon]
    norms = final_residuals(model, texts).norm(dim=-1)  # (runs, T)
    h_norm = torch.stack([max(norms[r, len(lead) + p] for r, (run_li, lead) in enumerate(runs) if run_li == li)
                          for li, p in zip(entries["lesson"], entries["position"])])
    targets = torch.tensor(entries["target"])
    values = solve_values(model, targets.to(h_norm.device), h_norm, {} if directions is None else directions)
    return {"min_len": np.array(entries["min_len"], dtype=np.int64),
            "evidence": entries["evidence"],
            "target": targets.numpy().astype(np.int64),
            "value": values.cpu().numpy()}


# ---------------------------------------------------------------------------- the store

# Versioned migrations of the LUT tables (storage.Database.migrate); {real}, {blob}: each engine's types.


if __name__ == "__main__":  # the command line lives with the store
    from lut_store import main
    main()
