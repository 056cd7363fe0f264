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
import argparse
import collections
import hashlib
import json
import logging
import os
import re
import sqlite3
import struct
import sys
import threading
import time

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

import labelfile
from storage import TYPES, Database, StoreUnavailable, Transaction
from variants import START_WORDS, WORD_RE, Form, Variants, is_specific, trigger_prefix

NAME_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")
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
            exact_only = lut.variants is None or lut.variants.quiet(tokens, first, n - 1, memo)
            for t in range(first, n):
                e, how = (lut.match(tokens, t), "verbatim") if exact_only else lut.lookup(tokens, t, memo)
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
TABLES = [
    """CREATE TABLE IF NOT EXISTS luts (
        name TEXT PRIMARY KEY, model_id TEXT NOT NULL, model_source TEXT,
        format INTEGER NOT NULL DEFAULT 1, version INTEGER NOT NULL DEFAULT 0, created {real} NOT NULL)""",
    # a label is unique per LUT by the digest of (label, context): texts of any length, indexed
    """CREATE TABLE IF NOT EXISTS labels (
        id {id}, lut TEXT NOT NULL REFERENCES luts(name) ON DELETE CASCADE,
        label TEXT NOT NULL, context TEXT NOT NULL DEFAULT '', digest TEXT, created {real} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS entries (
        id {id}, lut TEXT NOT NULL,
        label_id BIGINT NOT NULL REFERENCES labels(id) ON DELETE CASCADE,
        token INTEGER NOT NULL, min_len INTEGER NOT NULL, target INTEGER NOT NULL,
        evidence {blob} NOT NULL, value {blob} NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS entries_by_trigger ON entries (lut, token)",
    "CREATE INDEX IF NOT EXISTS entries_by_label ON entries (label_id)",
]
log = logging.getLogger(__name__)


def label_digest(label, context):
    return hashlib.sha256(f"{label}\0{context}".encode()).hexdigest()


def create_tables(c):
    """Migration 1. A SQLite file of the residual-key LUTs (format 1) keeps its labels; its old
    entries cannot be converted and are dropped, and each LUT is re-taught from its labels on
    first use. A file from before the migrations gets the labels' digests."""
    if c.engine == "sqlite" and "layer" in {row[1] for row in c.execute("PRAGMA table_info(luts)")}:
        c.execute("DROP TABLE entries")
        c.execute("ALTER TABLE luts DROP COLUMN layer")
        c.execute("ALTER TABLE luts ADD COLUMN format INTEGER NOT NULL DEFAULT 1")
    ddl = {"sqlite": "INTEGER PRIMARY KEY", "postgresql": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"}
    for statement in TABLES:
        c.execute(statement.format(**{**TYPES[c.engine], "id": ddl[c.engine]}))
    if c.engine == "sqlite" and "digest" not in {row[1] for row in c.execute("PRAGMA table_info(labels)")}:
        c.execute("ALTER TABLE labels ADD COLUMN digest TEXT")
    for label_id, label, context in c.execute("SELECT id, label, context FROM labels WHERE digest IS NULL").fetchall():
        c.execute("UPDATE labels SET digest=? WHERE id=?", (label_digest(label, context), label_id))
    c.execute("CREATE UNIQUE INDEX IF NOT EXISTS labels_by_digest ON labels (lut, digest)")


MIGRATIONS = [create_tables]
RETEACH = object()  # LUTStore._load: the LUT is of an older format


class LUTStore:
    """LUTs in a database (storage.py): a SQLite file, or PostgreSQL shared by replicas. Loaded
    LUTs are cached (LRU) and revalidated against the LUT's version on every use (one primary-key
    lookup), so a write by any process or replica is seen by the next load."""

    def __init__(self, path, cache_size=64, observe=None):
        """path: a SQLite file, a postgresql:// URL, or a storage.Database. observe(event, value):
        told of cache hits and misses, teach times and entries that fire (the server's metrics)."""
        self.db = path if isinstance(path, Database) else Database(path)
        self.cache_size = cache_size
        self.observe = observe or (lambda event, value=1: None)
        self._cache = collections.OrderedDict()  # (name, device) -> LUT
        self._directions = collections.defaultdict(dict)  # model id -> {token: u} (solve_values)
        self._lock = threading.Lock()
        self.db.migrate("luts", MIGRATIONS)

    def close(self):
        self.db.close()

    def _write(self):
        """A write transaction: all of it or none."""
        return _Transaction(self.db)

    @staticmethod
    def check_name(name):
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise LUTError("lut_name must be 1-128 characters of letters, digits and _.:@-")
        return name

    # -- teaching

    def teach(self, model, tokenizer, lut_name, label, label_context=None):
        """Teach `label` to LUT `lut_name`. Returns {"added": entries added, "replaced": ...}."""
        self.check_name(lut_name)
        started = time.perf_counter()
        context = label_context or ""
        digest = label_digest(label, context)
        model_id = model.fingerprint()
        with self.db.connection() as db:  # checked first so a refused request costs no forward pass
            row = db.execute("SELECT model_id, format FROM luts WHERE name=?", (lut_name,)).fetchone()
            self._check_model(lut_name, row, model_id, model)
            if db.execute("SELECT 1 FROM labels WHERE lut=? AND digest=?", (lut_name, digest)).fetchone():
                return {"added": 0, "replaced": 0}
        if row is not None and row[1] < FORMAT:
            self._retrain(lut_name, model)
        entries = build_entries(model, tokenizer, label, label_context, self._directions[model_id])
        now = time.time()
        with self._write() as db:
            db.execute("INSERT INTO luts (name, model_id, model_source, format, version, created) "
                       "VALUES (?, ?, ?, ?, 0, ?) ON CONFLICT (name) DO NOTHING",
                       (lut_name, model_id, str(model.source), FORMAT, now))
            # the LUT's row lock: teaches of one LUT take turns (latest wins), other LUTs go on
            row = db.execute("SELECT model_id FROM luts WHERE name=? FOR UPDATE", (lut_name,)).fetchone()
            self._check_model(lut_name, row, model_id, model)
            label_id = db.insert("INSERT INTO labels (lut, label, context, digest, created) VALUES (?, ?, ?, ?, ?) "
                                 "ON CONFLICT DO NOTHING", (lut_name, label, context, digest, now))
            if label_id is None:  # the same lesson was taught meanwhile
                return {"added": 0, "replaced": 0}
            replaced = self._insert(db, lut_name, label_id, entries)
            db.execute("UPDATE luts SET version = version + 1 WHERE name=?", (lut_name,))
        self.observe("teach", time.perf_counter() - started)
        return {"added": len(entries["target"]), "replaced": replaced}

    @staticmethod
    def _insert(db, lut_name, label_id, entries):
        """Store one label's entries. Latest wins: an older entry with the very same evidence that
        predicts a different next token is removed. Returns how many were."""
        rows = [(lut_name, label_id, int(ev[-1]), int(m), int(t), np.asarray(ev, dtype=np.int32).tobytes(),
                 v.tobytes()) for ev, m, t, v in zip(entries["evidence"], entries["min_len"], entries["target"],
                                                     entries["value"])]
        replaced = db.executemany("DELETE FROM entries WHERE lut=? AND token=? AND evidence=? AND target!=?",
                                  [(lut_name, token, evidence, target)
                                   for (_, _, token, _, target, evidence, _), ev in zip(rows, entries["evidence"])
                                   if ev[0] != CANON]).rowcount
        db.executemany("INSERT INTO entries (lut, label_id, token, min_len, target, evidence, value) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        return max(replaced, 0)

    def _retrain(self, lut_name, model):
        """Re-teach a LUT of an older format from its labels (in teaching order, so the latest
        still wins), all in one transaction."""
        from tokenizer import get_tokenizer
        tokenizer = get_tokenizer(model.tokenizer_spec)
        with self.db.connection() as db:
            labels = db.execute("SELECT id, label, context FROM labels WHERE lut=? ORDER BY id", (lut_name,)).fetchall()
        log.info("re-teaching LUT %r (%d labels) in the current format", lut_name, len(labels))
        directions = self._directions[model.fingerprint()]
        built = []
        for label_id, label, context in labels:
            try:
                built.append((label_id, build_entries(model, tokenizer, label, context or None, directions)))
            except LUTError as e:  # kept as a label; it has nothing to recall by now
                log.warning("LUT %r label %d not re-taught: %s", lut_name, label_id, e)
        with self._write() as db:
            if db.execute("SELECT format FROM luts WHERE name=? FOR UPDATE", (lut_name,)).fetchone()[0] >= FORMAT:
                return  # another process did it meanwhile
            db.execute("DELETE FROM entries WHERE lut=?", (lut_name,))
            for label_id, entries in built:
                self._insert(db, lut_name, label_id, entries)
            db.execute("UPDATE luts SET format=?, version = version + 1 WHERE name=?", (FORMAT, lut_name))

    @staticmethod
    def _check_model(lut_name, row, model_id, model):
        if row is not None and row[0] != model_id:
            raise LUTError(f"LUT {lut_name!r} belongs to another base model (id {row[0]}); the loaded model "
                           f"{model.source} is {model_id}. Load that model or use another lut_name", 409)

    # -- using

    def load(self, lut_name, model):
        """The LUT for generation with `model`; None when the LUT does not exist (cold start)."""
        self.check_name(lut_name)
        with self.db.connection() as db:  # one connection: the version check and, on a miss, the read
            lut = self._load(db, lut_name, model)
        if lut is RETEACH:  # an older format: re-taught from its labels first
            self._retrain(lut_name, model)
            with self.db.connection() as db:
                lut = self._load(db, lut_name, model)
        return lut

    def _load(self, db, lut_name, model):
        device = next(model.parameters()).device
        key = (lut_name, str(device))
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:  # the revalidation: one primary-key lookup
            row = db.execute("SELECT model_id, format, version FROM luts WHERE name=?", (lut_name,)).fetchone()
            if row is None:
                return None
            self._check_model(lut_name, row, model.fingerprint(), model)
            if row[1] < FORMAT:
                return RETEACH
            if cached.version == row[2]:
                with self._lock:
                    self._cache.move_to_end(key)
                self.observe("cache_hit")
                return cached
        self.observe("cache_miss")
        # the LUT's row and every entry in one query: one round trip, one snapshot. Sorted into
        # teaching order here, not by the database: PostgreSQL's sort of ~1 MB of rows took half
        # of the query's time.
        rows = db.execute("SELECT l.model_id, l.format, l.version, e.id, e.label_id, e.min_len, e.target, e.evidence, "
                          "e.value FROM luts l LEFT JOIN entries e ON e.lut = l.name WHERE l.name=?",
                          (lut_name,)).fetchall()
        if not rows:
            return None
        self._check_model(lut_name, rows[0], model.fingerprint(), model)
        model_id, fmt, version = rows[0][:3]
        if fmt < FORMAT:
            return RETEACH
        labels = {i: (t, c) for i, t, c in db.execute("SELECT id, label, context FROM labels WHERE lut=?",
                                                        (lut_name,)).fetchall()}
        from tokenizer import get_tokenizer
        lut = self._entries_lut(lut_name, model_id, version, model.config.n_embd,
                                [] if rows[0][3] is None else [r[3:] for r in rows],  # no entries: one row of NULLs
                                labels, get_tokenizer(getattr(model, "tokenizer_spec", None)))
        lut.observe = self.observe
        lut = lut.to(device)
        with self._lock:
            self._cache[key] = lut
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return lut

    @staticmethod
    def _entries_lut(lut_name, model_id, version, n_embd, rows, labels, tokenizer):
        """A LUT from rows of (id, label_id, min_len, target, evidence, value), entries ordered by id."""
        ids, label_ids, min_len, targets, evidence, values = list(zip(*rows)) if rows else ((),) * 6
        order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
        values = np.frombuffer(b"".join(values), dtype=np.float16).reshape(len(rows), n_embd)[order]
        return LUT(lut_name, model_id, [np.frombuffer(evidence[i], dtype=np.int32).tolist() for i in order],
                   np.asarray(min_len, dtype=np.int64)[order], np.asarray(targets, dtype=np.int64)[order],
                   torch.from_numpy(values), version, np.asarray(label_ids, dtype=np.int64)[order], labels, tokenizer)

    # -- managing

    def list(self, lut_name=None):
        """Every LUT (or the one named) with its label and entry counts."""
        where, args = ("WHERE name=?", (lut_name,)) if lut_name else ("", ())
        with self.db.connection() as db:
            return [dict(name=n, model_id=m, model_source=s, version=v, created=c, labels=nl, entries=ne)
                    for n, m, s, v, c, nl, ne in db.execute(
                        "SELECT name, model_id, model_source, version, created, "
                        "(SELECT COUNT(*) FROM labels WHERE lut=name), (SELECT COUNT(*) FROM entries WHERE lut=name) "
                        f"FROM luts {where} ORDER BY name", args).fetchall()]

    def show(self, lut_name):
        self.check_name(lut_name)
        info = self.list(lut_name)
        if not info:
            raise LUTError(f"no LUT named {lut_name!r}", 404)
        with self.db.connection() as db:
            labels = db.execute(
                "SELECT l.id, l.label, l.context, l.created, COUNT(e.id) FROM labels l LEFT JOIN entries e "
                "ON e.label_id = l.id WHERE l.lut=? GROUP BY l.id ORDER BY l.id", (lut_name,)).fetchall()
        info[0]["labels"] = [dict(id=i, label=t, label_context=c or None, created=ts, entries=n,
                                  **dict(zip(("recall", "trigger"), recall_mode(t, c or None))))
                             for i, t, c, ts, n in labels]
        return info[0]

    def delete_label(self, lut_name, label_id):
        self.check_name(lut_name)
        with self._write() as db:
            if db.execute("DELETE FROM labels WHERE lut=? AND id=?", (lut_name, label_id)).rowcount == 0:
                raise LUTError(f"LUT {lut_name!r} has no label with id {label_id}", 404)
            db.execute("UPDATE luts SET version = version + 1 WHERE name=?", (lut_name,))

    def delete(self, lut_name):
        self.check_name(lut_name)
        with self._write() as db:
            if db.execute("DELETE FROM luts WHERE name=?", (lut_name,)).rowcount == 0:
                raise LUTError(f"no LUT named {lut_name!r}", 404)
            db.execute("DELETE FROM entries WHERE lut=?", (lut_name,))

    def export(self, lut_name):
        """One safetensors file (bytes): entries as tensors, LUT and labels in its metadata."""
        from safetensors.numpy import save
        self.check_name(lut_name)
        with self.db.connection() as db:
            lut = db.execute("SELECT model_id, model_source, format FROM luts WHERE name=?", (lut_name,)).fetchone()
            if lut is None:
                raise LUTError(f"no LUT named {lut_name!r}", 404)
            labels = db.execute("SELECT id, label, context, created FROM labels WHERE lut=? ORDER BY id",
                                (lut_name,)).fetchall()
            rows = db.execute("SELECT label_id, min_len, target, evidence, value FROM entries WHERE lut=? "
                              "ORDER BY id", (lut_name,)).fetchall() if lut[2] >= FORMAT else []
        index = {label_id: i for i, (label_id, *_) in enumerate(labels)}
        evidence = np.full((len(rows), EVIDENCE_TOKENS), PAD, dtype=np.int32)
        for i, row in enumerate(rows):
            ev = np.frombuffer(row[3], dtype=np.int32)
            evidence[i, :len(ev)] = ev
        tensors = {"label": np.array([index[r[0]] for r in rows], dtype=np.int64),
                   "min_len": np.array([r[1] for r in rows], dtype=np.int64),
                   "target": np.array([r[2] for r in rows], dtype=np.int64),
                   "evidence": evidence,
                   "value": np.stack([np.frombuffer(r[4], dtype=np.float16) for r in rows])
                   if rows else np.zeros((0, 0), np.float16)}
        meta = {"format": EXPORT_FORMAT if lut[2] >= FORMAT else "gpt2-lut/1", "lut_name": lut_name,
                "model_id": lut[0], "model_source": lut[1] or "",
                "labels": json.dumps([[t, c, ts] for _, t, c, ts in labels])}
        return save(tensors, metadata=meta)

    def import_(self, data, lut_name=None):
        """Add an exported LUT under lut_name (default: its own name); refuses an existing name.
        An export of an older format brings its labels, which are re-taught on first use."""
        from safetensors.numpy import load
        try:
            meta = _safetensors_metadata(data)
            t = load(data)
            assert meta.get("format") in (EXPORT_FORMAT, "gpt2-lut/2", "gpt2-lut/1")
            labels = json.loads(meta["labels"])
        except Exception:
            raise LUTError(f"file is not a LUT export (safetensors with format {EXPORT_FORMAT})") from None
        name = self.check_name(lut_name or meta["lut_name"])
        current = meta["format"] == EXPORT_FORMAT
        now = time.time()
        with self._write() as db:
            if db.execute("INSERT INTO luts (name, model_id, model_source, format, version, created) VALUES "
                          "(?, ?, ?, ?, 1, ?) ON CONFLICT (name) DO NOTHING",
                          (name, meta["model_id"], meta["model_source"], FORMAT if current else 1, now)).rowcount == 0:
                raise LUTError(f"a LUT named {name!r} already exists; delete it or import under another name", 409)
            ids = [db.insert("INSERT INTO labels (lut, label, context, digest, created) VALUES (?, ?, ?, ?, ?) "
                             "ON CONFLICT DO NOTHING", (name, label, context, label_digest(label, context), created))
                   for label, context, created in labels]
            if None in ids:
                raise LUTError("file is not a valid LUT export: it holds the same label twice")
            if current:
                evidence = [ev[ev != PAD] for ev in t["evidence"]]
                db.executemany(
                    "INSERT INTO entries (lut, label_id, token, min_len, target, evidence, value) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(name, ids[int(li)], int(ev[-1]), int(m), int(g), ev.astype(np.int32).tobytes(), v.tobytes())
                     for li, m, g, ev, v in zip(t["label"], t["min_len"], t["target"], evidence, t["value"])])
        return name


_Transaction = Transaction  # its __exit__ is where a write commits (the crash tests stop there)


def _safetensors_metadata(data):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]).get("__metadata__", {})


# ---------------------------------------------------------------------------- bulk teaching, command line

def teach_many(store, model, tokenizer, lut_name, items, on_each=None):
    """Teach [(label, label_context)] to one LUT, each label in its own transaction (stored whole or
    not at all). Returns one result per item, as POST /luts/<name>/labels answers them: taught, with
    the entries added and replaced, or not, with why. A 409 (the LUT belongs to another model) is
    about the whole LUT, so it is raised; on_each() runs after every item (a progress bar)."""
    store.check_name(lut_name)
    results = []
    for label, context in items:
        try:
            results.append({"taught": True, **store.teach(model, tokenizer, lut_name, label, context)})
        except LUTError as e:
            if e.status == 409:
                raise
            results.append({"taught": False, "status": e.status, "detail": str(e)})
        if on_each:
            on_each()
    return results


def teach_rows(store, model, tokenizer, lut_name, rows):
    """`python lut.py teach-file`: teach the rows of a label file (labelfile.read_file) with a
    progress bar; returns the summary and whether every label was taught."""
    items = [(item["label"], item["label_context"]) for _, item, _ in rows if item is not None]
    with tqdm(total=len(items), unit="label", desc=f"teaching {lut_name}") as bar:
        results = teach_many(store, model, tokenizer, lut_name, items, on_each=bar.update)
    return labelfile.report(rows, results)


def main(argv=None):
    p = argparse.ArgumentParser(description="Teach, list, show, delete, export and import LUTs.")
    p.add_argument("--lut_db", default=os.environ.get("GPT_DATABASE_URL") or "out/luts.sqlite",
                   help="the SQLite file holding the LUTs, or a postgresql:// URL (default: $GPT_DATABASE_URL, "
                        "else out/luts.sqlite)")
    p.add_argument("--init_from", default="gpt2", help="base model for teach (GPT-2 type or checkpoint dir)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (for teach)")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("teach", help="teach a label to a LUT")
    t.add_argument("lut_name", help="the LUT (user or tenant id)")
    t.add_argument("label", help="the text to learn")
    t.add_argument("--label_context", default=None, help="text the label should follow")
    tf = sub.add_parser("teach-file", help="teach every label of a file (JSONL, or one label per line)")
    tf.add_argument("lut_name", help="the LUT (user or tenant id)")
    tf.add_argument("file", help="JSONL ({\"label\": ..., \"label_context\": ...} per line) or plain text, one label per line")
    sub.add_parser("list", help="list LUTs with label and entry counts")
    s = sub.add_parser("show", help="show one LUT's labels")
    s.add_argument("lut_name", help="the LUT")
    d = sub.add_parser("delete", help="delete a LUT, or one label of it")
    d.add_argument("lut_name", help="the LUT")
    d.add_argument("--label_id", type=int, default=None, help="delete only this label (ids from show)")
    e = sub.add_parser("export", help="write a LUT to a .safetensors file")
    e.add_argument("lut_name", help="the LUT")
    e.add_argument("file", help="output file")
    i = sub.add_parser("import", help="read a LUT from an exported file")
    i.add_argument("file", help="the exported file")
    i.add_argument("--lut_name", default=None, help="import under this name (default: the exported name)")
    args = p.parse_args(argv)
    from model import ModelLoadError, load_model, resolve_device
    try:
        store = LUTStore(args.lut_db)
        if args.cmd in ("teach", "teach-file"):
            store.check_name(args.lut_name)  # bad input fails before the model is loaded
            if args.cmd == "teach-file":
                rows = labelfile.read_file(args.file)
                if not rows:
                    raise LUTError(f"{args.file} holds no labels")
            model = load_model(args.init_from, *resolve_device(args.device))
            from tokenizer import get_tokenizer
            tokenizer = get_tokenizer(model.tokenizer_spec)
            if args.cmd == "teach":
                print(json.dumps(store.teach(model, tokenizer, args.lut_name, args.label, args.label_context)))
            else:
                text, ok = teach_rows(store, model, tokenizer, args.lut_name, rows)
                print(text)
                if not ok:
                    sys.exit(1)
        elif args.cmd == "list":
            print(json.dumps(store.list(), indent=2))
        elif args.cmd == "show":
            print(json.dumps(store.show(args.lut_name), indent=2))
        elif args.cmd == "delete":
            if args.label_id is None:
                store.delete(args.lut_name)
            else:
                store.delete_label(args.lut_name, args.label_id)
        elif args.cmd == "export":
            with open(args.file, "wb") as f:
                f.write(store.export(args.lut_name))
        elif args.cmd == "import":
            with open(args.file, "rb") as f:
                print(store.import_(f.read(), args.lut_name))
    except (LUTError, ModelLoadError, OSError, UnicodeDecodeError, sqlite3.Error, StoreUnavailable) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
