"""
Per-user lookup tables (LUTs): a discrete key -> value memory spliced into a frozen GPT-2.

Teaching `label` (optionally after `label_context`) adds one entry per position whose next token
is part of the label:
  key    the residual stream after block `layer` at that position, minus the position embedding,
         normalised to zero mean and unit variance; plus the token at that position (a gate).
  value  a vector added to the *final* residual (before ln_f) of a matching position. After the
         last block only LayerNorm and the unembedding remain, so the value that makes the next
         token the label's is found by a few cheap steps in that small space, not by GRACE's 100
         Adam steps through the whole network. Its norm dwarfs the residual, so the LayerNorm
         output and the logits no longer depend on what came before.
  radius how close a residual must be (Euclidean distance between normalised keys / sqrt(C), in
         [0, 2]) to match: half the distance to the same token after unrelated text, so the
         taught context matches and others do not.
A position matches its nearest same-token key if within that key's radius; every other position
is untouched, so prompts that trigger nothing give bit-identical output to the base model.

LUTs live in SQLite (one row per entry, WAL, one transaction per teach). `python lut.py --help`
teaches, lists, exports and imports from the shell.
"""
import argparse
import collections
import json
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

NAME_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")
MAX_LABEL_TOKENS = 256
MAX_CONTEXT_TOKENS = 512
# Text the label is taught behind to check (and report) that it is recalled after leading text.
LEADING_CONTEXTS = ["\n", "Note: ", "As everyone knows, "]
# Unrelated text placed before a label's tokens: what must NOT match (sets each radius).
FILLERS = ["The weather was", "I think that", "In 1998 a small group of", "Click here to read the"]
RADIUS_FRACTION = 0.5
EXPORT_FORMAT = "gpt2-lut/1"


class LUTError(ValueError):
    """A LUT request that cannot be done; status is the HTTP status the server answers with."""
    status = 400

    def __init__(self, message, status=None):
        super().__init__(message)
        if status:
            self.status = status


def default_layer(model):
    """Mid-to-late block: deep enough that the residual has mixed in the preceding words, early
    enough that it still mostly describes the text rather than the next-token guess."""
    return (2 * model.config.n_layer) // 3 - 1


def normalize_keys(h):
    """(..., C) -> zero mean and norm sqrt(C) (unit variance) per vector, in float32. Exact (no
    LayerNorm eps): the cosine arithmetic in LUT.match relies on the norm."""
    h = h.float()
    h = h - h.mean(dim=-1, keepdim=True)
    return h * (h.size(-1) ** 0.5 / h.norm(dim=-1, keepdim=True).clamp_min(1e-12))


# ---------------------------------------------------------------------------- the model side

class LUT:
    """One LUT's entries as tensors, ready to apply."""

    def __init__(self, name, model_id, layer, tokens, keys, values, radius, version=0):
        self.name, self.model_id, self.layer, self.version = name, model_id, layer, version
        self.tokens = tokens  # (N,) long: the gate token of each entry
        self.keys = keys  # (N, C) float32, normalised
        self.values = values  # (N, C) float32
        self.radius = radius  # (N,) float32

    def __len__(self):
        return self.tokens.numel()

    def to(self, device, dtype):
        return LUT(self.name, self.model_id, self.layer, self.tokens.to(device), self.keys.to(device),
                   self.values.to(device=device, dtype=dtype), self.radius.to(device), self.version)

    def match(self, h, tokens):
        """h: (M, C) residuals (position embedding removed), tokens: (M,).
        Returns (M,) index of the matched entry, -1 where none."""
        if len(self) == 0:
            return torch.full_like(tokens, -1)
        q = normalize_keys(h)
        # cosine similarity, (M, N); keys @ q.T rather than q @ keys.T: with one query row (decode)
        # the latter takes a slow GEMM path on CPU, ~10x slower than this GEMV
        sim = (self.keys @ q.t()).t() / q.size(-1)
        sim = sim.masked_fill(tokens[:, None] != self.tokens[None, :], -2.0)
        best_sim, best = sim.max(dim=-1)
        dist = (2 - 2 * best_sim).clamp(min=0).sqrt()  # |a - b| / sqrt(C) for unit-variance vectors
        return torch.where(dist <= self.radius[best], best, torch.full_like(best, -1))


class LUTBatch:
    """The LUTs of the rows of one forward pass (None = base model). model.GPT.forward calls
    observe() after every block and apply() before ln_f."""

    def __init__(self, row_luts):
        groups = collections.defaultdict(list)
        for row, lut in enumerate(row_luts):
            if lut is not None and len(lut):
                groups[id(lut)].append(row)
        self.groups = [(row_luts[rows[0]], rows) for rows in groups.values()]
        self.hits = []  # (rows, positions, values)

    def observe(self, layer, x, idx, pos_emb):
        for lut, rows in self.groups:
            if lut.layer != layer:
                continue
            r = torch.tensor(rows, device=x.device)
            h = x[r] - (pos_emb[r] if pos_emb.size(0) > 1 else pos_emb)  # (R, T, C)
            entry = lut.match(h.reshape(-1, h.size(-1)), idx[r].reshape(-1)).view(len(rows), -1)
            hit_r, hit_t = (entry >= 0).nonzero(as_tuple=True)
            if hit_r.numel():
                self.hits.append((r[hit_r], hit_t, lut.values[entry[hit_r, hit_t]]))

    def apply(self, x):
        for rows, positions, values in self.hits:
            x = x.index_put((rows, positions), values.to(x.dtype), accumulate=True)
        return x

    def hit_at(self, positions):
        """positions: (B,) one position per row -> (B,) bool, whether a LUT entry matched there."""
        hit = torch.zeros(positions.numel(), dtype=torch.bool, device=positions.device)
        for rows, pos, _ in self.hits:
            hit[rows[positions[rows] == pos]] = True
        return hit


class _Enough(Exception):
    pass


class Recorder:
    """Stands in for a LUTBatch to capture residuals: after block `layer` (then stops the pass if
    that is all that is wanted) and the final one."""

    def __init__(self, layer, keys_only):
        self.layer, self.keys_only = layer, keys_only
        self.keys = self.final = None

    def observe(self, layer, x, idx, pos_emb):
        if layer == self.layer:
            self.keys = x - pos_emb
            if self.keys_only:
                raise _Enough

    def apply(self, x):
        self.final = x
        return x


@torch.no_grad()
def residuals(model, seqs, layer, keys_only=False):
    """Run right-padded token lists through the model; returns (key residuals, final residuals),
    each (B, T, C) float32 (final is None with keys_only)."""
    T = max(len(s) for s in seqs)
    idx = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s)
    rec = Recorder(layer, keys_only)
    device = next(model.parameters()).device
    try:  # one logit row per sequence: the logits themselves are not needed
        model(idx.to(device), lut=rec, logits_at=torch.zeros(len(seqs), dtype=torch.long, device=device))
    except _Enough:
        pass
    return rec.keys.float(), None if keys_only else rec.final.float()


@torch.no_grad()
def solve_values(model, targets, finals, steps=20):
    """Values v that make `targets` (N,) the argmax when added to any of the final residuals
    finals (N, V, C) (the taught context and its variants). v = s * u: u is optimised so that
    ln_f(u) scores the target highest; s makes v dwarf the residual, so ln_f(h + v) ~ ln_f(u)."""
    ln_f = model.transformer.ln_f
    W = model.lm_head.weight.detach().float()  # (vocab, C); frozen: only u is optimised
    gamma = ln_f.weight.detach().float()
    beta = ln_f.bias.detach().float() if ln_f.bias is not None else None
    final_norm = lambda y: F.layer_norm(y, y.shape[-1:], gamma, beta, ln_f.eps)
    logits_of = lambda y: final_norm(y) @ W.t()
    u = (W[targets] - W.mean(0)) * gamma  # along the target's unembedding: usually already enough
    best = u.clone()
    best_logp = logits_of(u).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    if best_logp.min().item() < np.log(0.9):  # a hard target (e.g. a rare token): optimise u
        with torch.enable_grad():
            u = u.clone().requires_grad_(True)
            opt = torch.optim.Adam([u], lr=0.05)
            for _ in range(steps):
                logp = logits_of(u).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
                better = logp.detach() > best_logp
                best[better], best_logp[better] = u.detach()[better], logp.detach()[better]
                if best_logp.min().item() > np.log(0.9):
                    break
                opt.zero_grad()
                (-logp.sum()).backward()
                opt.step()
    u = best
    u = normalize_keys(u.detach())  # unit variance: entries are O(1)
    h_norm = finals.norm(dim=-1).amax(dim=1, keepdim=True)  # (N, 1)
    scale = (100 * h_norm / u.norm(dim=-1, keepdim=True)).clamp(max=60000 / u.abs().amax(-1, keepdim=True))
    values = (u * scale).half().float()  # what is stored is what is used
    logits = logits_of(finals + values[:, None])  # verify on every variant
    ok = (logits.argmax(-1) == targets[:, None]).all(dim=1)
    return values, ok


def encode_known(tokenizer, text):
    """The project's own helper texts (LEADING_CONTEXTS, FILLERS) in this tokenizer's ids,
    leaving out characters that a character-level vocabulary lacks (Shakespeare's has no digits)."""
    def known(ch):
        try:
            return bool(tokenizer.encode(ch))
        except ValueError:
            return False
    return tokenizer.encode("".join(ch for ch in text if known(ch)))


def tokenize_lesson(tokenizer, label, label_context, block_size):
    if not isinstance(label, str) or not label.strip():
        raise LUTError("label must be a non-empty string")
    if label_context is not None and not isinstance(label_context, str):
        raise LUTError("label_context must be a string")
    try:
        ctx = tokenizer.encode(label_context) if label_context else []
    except ValueError as e:  # a character-level model meets a character it has never seen
        raise LUTError(f"label_context: {e}") from None
    try:
        ids = tokenizer.encode(label)
    except ValueError as e:
        raise LUTError(f"label: {e}") from None
    if len(ids) > MAX_LABEL_TOKENS:
        raise LUTError(f"label is {len(ids)} tokens; at most {MAX_LABEL_TOKENS}", 413)
    if len(ctx) > MAX_CONTEXT_TOKENS:
        raise LUTError(f"label_context is {len(ctx)} tokens; at most {MAX_CONTEXT_TOKENS}", 413)
    lead = max(len(encode_known(tokenizer, c)) for c in LEADING_CONTEXTS)
    if len(ctx) + len(ids) + lead > block_size:
        raise LUTError(f"label_context plus label exceed the model's context of {block_size} tokens", 413)
    if not ctx and len(ids) < 2:
        raise LUTError("label must be at least two tokens when no label_context is given "
                       "(nothing follows a single token)")
    return ctx, ids


@torch.no_grad()
def build_entries(model, tokenizer, label, label_context=None, layer=None):
    """The entries that teach `label` (after `label_context`): a dict of numpy arrays."""
    layer = default_layer(model) if layer is None else layer
    ctx, ids = tokenize_lesson(tokenizer, label, label_context, model.config.block_size)
    seq = ctx + ids
    first = max(len(ctx) - 1, 0)  # position whose next token is the first to teach
    positions = list(range(first, len(seq) - 1))
    targets = torch.tensor([seq[p + 1] for p in positions])
    # the lesson itself, and behind a few leading texts: all must produce the label
    leads = [encode_known(tokenizer, c) for c in LEADING_CONTEXTS]
    keys, finals = residuals(model, [seq] + [lead + seq for lead in leads], layer)
    canon = normalize_keys(keys[0, positions])  # (N, C)
    variant_finals = [finals[0, positions]] + [finals[1 + i, [p + len(lead) for p in positions]]
                                               for i, lead in enumerate(leads)]
    values, ok = solve_values(model, targets.to(finals.device), torch.stack(variant_finals, dim=1))
    if not bool(ok.all()):
        raise LUTError("could not find values that make this model produce the label", 422)
    # negatives: each taught token after unrelated text, with and without the token before it
    negs, owner = [], []
    fills = [encode_known(tokenizer, f) for f in FILLERS]
    for i, p in enumerate(positions):
        for fill in fills:
            negs.append(fill + [seq[p]])
            owner.append((i, len(fill)))
            if p > 0:
                negs.append(fill + seq[p - 1:p + 1])
                owner.append((i, len(fill) + 1))
    neg_keys, _ = residuals(model, negs, layer, keys_only=True)
    neg = normalize_keys(torch.stack([neg_keys[j, t] for j, (_, t) in enumerate(owner)]))
    idx = torch.tensor([i for i, _ in owner])
    dist = ((canon[idx] - neg).norm(dim=-1) / canon.size(-1) ** 0.5).cpu()
    nearest = torch.full((len(positions),), 2.0).scatter_reduce(0, idx, dist, reduce="amin")
    radius = RADIUS_FRACTION * nearest
    return {
        "layer": layer,
        "positions": np.array(positions, dtype=np.int64),
        "tokens": np.array([seq[p] for p in positions], dtype=np.int64),
        "targets": targets.numpy().astype(np.int64),
        "keys": canon.cpu().half().numpy(),
        "values": values.cpu().half().numpy(),
        "radius": radius.numpy().astype(np.float32),
    }


# ---------------------------------------------------------------------------- the store

SCHEMA = """
CREATE TABLE IF NOT EXISTS luts (
    name TEXT PRIMARY KEY, model_id TEXT NOT NULL, model_source TEXT, layer INTEGER NOT NULL,
    version INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY, lut TEXT NOT NULL REFERENCES luts(name) ON DELETE CASCADE,
    label TEXT NOT NULL, context TEXT NOT NULL DEFAULT '', created REAL NOT NULL,
    UNIQUE (lut, label, context));
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY, lut TEXT NOT NULL, label_id INTEGER NOT NULL REFERENCES labels(id) ON DELETE CASCADE,
    model_id TEXT NOT NULL, layer INTEGER NOT NULL, position INTEGER NOT NULL, token INTEGER NOT NULL,
    target INTEGER NOT NULL, radius REAL NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS entries_by_lut ON entries (lut, token);
"""


class LUTStore:
    """LUTs in one SQLite file. A connection per thread and process (none crosses a fork);
    loaded LUTs are cached (LRU) and revalidated against the LUT's version on every use, so a
    write by any process is seen by the next load."""

    def __init__(self, path, cache_size=64):
        self.path = path
        self.cache_size = cache_size
        self._local = threading.local()
        self._cache = collections.OrderedDict()  # (name, device, dtype) -> LUT
        self._lock = threading.Lock()
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self._db().executescript(SCHEMA)

    def _db(self):
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA page_size=16384")  # a ~3 KB entry row per 4 KB page would waste 25%
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps commits atomic
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def close(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _write(self):
        """A write transaction (BEGIN IMMEDIATE: take the write lock now, not half-way)."""
        return _Transaction(self._db())

    @staticmethod
    def check_name(name):
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise LUTError("lut_name must be 1-128 characters of letters, digits and _.:@-")
        return name

    # -- teaching

    def teach(self, model, tokenizer, lut_name, label, label_context=None):
        """Teach `label` to LUT `lut_name`. Returns {"added": entries added, "replaced": ...}."""
        self.check_name(lut_name)
        context = label_context or ""
        model_id = model.fingerprint()
        with self._write() as db:  # checked first so a refused request costs no forward pass
            row = db.execute("SELECT model_id, layer FROM luts WHERE name=?", (lut_name,)).fetchone()
            self._check_model(lut_name, row, model_id, model)
            if db.execute("SELECT 1 FROM labels WHERE lut=? AND label=? AND context=?",
                          (lut_name, label, context)).fetchone():
                return {"added": 0, "replaced": 0}
        entries = build_entries(model, tokenizer, label, label_context, row[1] if row else None)
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT model_id FROM luts WHERE name=?", (lut_name,)).fetchone()
            self._check_model(lut_name, row, model_id, model)
            if row is None:
                db.execute("INSERT INTO luts (name, model_id, model_source, layer, version, created) "
                           "VALUES (?, ?, ?, ?, 0, ?)", (lut_name, model_id, str(model.source), entries["layer"], now))
            cur = db.execute("INSERT OR IGNORE INTO labels (lut, label, context, created) VALUES (?, ?, ?, ?)",
                             (lut_name, label, context, now))
            if cur.rowcount == 0:  # the same lesson was taught meanwhile
                return {"added": 0, "replaced": 0}
            label_id = cur.lastrowid
            replaced = self._drop_conflicts(db, lut_name, entries)
            db.executemany(
                "INSERT INTO entries (lut, label_id, model_id, layer, position, token, target, radius, key, value, "
                "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(lut_name, label_id, model_id, entries["layer"], int(p), int(t), int(g), float(r), k.tobytes(),
                  v.tobytes(), now) for p, t, g, r, k, v in zip(entries["positions"], entries["tokens"],
                                                                 entries["targets"], entries["radius"],
                                                                 entries["keys"], entries["values"])])
            db.execute("UPDATE luts SET version = version + 1 WHERE name=?", (lut_name,))
        return {"added": len(entries["tokens"]), "replaced": replaced}

    @staticmethod
    def _drop_conflicts(db, lut_name, entries):
        """Latest wins: an older entry for the same context (same token, same key) that predicts a
        different next token is removed."""
        dropped = 0
        for tok, key, target in zip(entries["tokens"], entries["keys"], entries["targets"]):
            rows = db.execute("SELECT id, key, target FROM entries WHERE lut=? AND token=?",
                              (lut_name, int(tok))).fetchall()
            for entry_id, old_key, old_target in rows:
                old = np.frombuffer(old_key, dtype=np.float16).astype(np.float32)
                same_context = np.linalg.norm(old - key.astype(np.float32)) / np.sqrt(old.size) < 1e-2
                if same_context and old_target != int(target):
                    db.execute("DELETE FROM entries WHERE id=?", (entry_id,))
                    dropped += 1
        return dropped

    @staticmethod
    def _check_model(lut_name, row, model_id, model):
        if row is not None and row[0] != model_id:
            raise LUTError(f"LUT {lut_name!r} belongs to another base model (id {row[0]}); the loaded model "
                           f"{model.source} is {model_id}. Load that model or use another lut_name", 409)

    # -- using

    def load(self, lut_name, model):
        """The LUT for generation with `model`; None when the LUT does not exist (cold start)."""
        self.check_name(lut_name)
        db = self._db()
        row = db.execute("SELECT model_id, layer, version FROM luts WHERE name=?", (lut_name,)).fetchone()
        if row is None:
            return None
        self._check_model(lut_name, row, model.fingerprint(), model)
        p = next(model.parameters())
        key = (lut_name, str(p.device), p.dtype)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and cached.version == row[2]:
                self._cache.move_to_end(key)
                return cached
        lut = self._read(db, lut_name, row).to(p.device, p.dtype)
        with self._lock:
            self._cache[key] = lut
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return lut

    def _read(self, db, lut_name, row):
        model_id, layer, version = row
        rows = db.execute("SELECT token, radius, key, value FROM entries WHERE lut=? ORDER BY id",
                          (lut_name,)).fetchall()
        if not rows:  # every label deleted: an empty LUT, which matches nothing
            return LUT(lut_name, model_id, layer, torch.zeros(0, dtype=torch.long), torch.zeros(0, 0),
                       torch.zeros(0, 0), torch.zeros(0), version)
        tokens, radius, keys, values = zip(*rows)
        as_matrix = lambda blobs: torch.from_numpy(
            np.frombuffer(b"".join(blobs), dtype=np.float16).reshape(len(blobs), -1).astype(np.float32))
        return LUT(lut_name, model_id, layer, torch.tensor(tokens, dtype=torch.long), as_matrix(keys),
                   as_matrix(values), torch.tensor(radius, dtype=torch.float32), version)

    # -- managing

    def list(self):
        db = self._db()
        return [dict(name=n, model_id=m, model_source=s, layer=l, version=v, created=c, labels=nl, entries=ne)
                for n, m, s, l, v, c, nl, ne in db.execute(
                    "SELECT name, model_id, model_source, layer, version, created, "
                    "(SELECT COUNT(*) FROM labels WHERE lut=name), (SELECT COUNT(*) FROM entries WHERE lut=name) "
                    "FROM luts ORDER BY name")]

    def show(self, lut_name):
        self.check_name(lut_name)
        info = [x for x in self.list() if x["name"] == lut_name]
        if not info:
            raise LUTError(f"no LUT named {lut_name!r}", 404)
        labels = self._db().execute(
            "SELECT l.id, l.label, l.context, l.created, COUNT(e.id) FROM labels l LEFT JOIN entries e "
            "ON e.label_id = l.id WHERE l.lut=? GROUP BY l.id ORDER BY l.id", (lut_name,)).fetchall()
        info[0]["labels"] = [dict(id=i, label=t, label_context=c or None, created=ts, entries=n)
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
        db = self._db()
        lut = db.execute("SELECT model_id, model_source, layer FROM luts WHERE name=?", (lut_name,)).fetchone()
        if lut is None:
            raise LUTError(f"no LUT named {lut_name!r}", 404)
        labels = db.execute("SELECT id, label, context, created FROM labels WHERE lut=? ORDER BY id",
                            (lut_name,)).fetchall()
        rows = db.execute("SELECT label_id, position, token, target, radius, key, value FROM entries "
                          "WHERE lut=? ORDER BY id", (lut_name,)).fetchall()
        index = {label_id: i for i, (label_id, *_) in enumerate(labels)}
        cols = list(zip(*rows)) if rows else [()] * 7
        blob = lambda b: np.frombuffer(b"".join(b), dtype=np.float16).reshape(len(b), -1)
        tensors = {"label": np.array([index[i] for i in cols[0]], dtype=np.int64),
                   "position": np.array(cols[1], dtype=np.int64), "token": np.array(cols[2], dtype=np.int64),
                   "target": np.array(cols[3], dtype=np.int64), "radius": np.array(cols[4], dtype=np.float32),
                   "key": blob(cols[5]) if rows else np.zeros((0, 0), np.float16),
                   "value": blob(cols[6]) if rows else np.zeros((0, 0), np.float16)}
        meta = {"format": EXPORT_FORMAT, "lut_name": lut_name, "model_id": lut[0], "model_source": lut[1] or "",
                "layer": str(lut[2]), "labels": json.dumps([[t, c, ts] for _, t, c, ts in labels])}
        return save(tensors, metadata=meta)

    def import_(self, data, lut_name=None):
        """Add an exported LUT under lut_name (default: its own name); refuses an existing name."""
        from safetensors.numpy import load
        try:
            meta = _safetensors_metadata(data)
            t = load(data)
            assert meta.get("format") == EXPORT_FORMAT
            labels = json.loads(meta["labels"])
        except Exception:
            raise LUTError("file is not a LUT export (safetensors with format gpt2-lut/1)") from None
        name = self.check_name(lut_name or meta["lut_name"])
        now = time.time()
        with self._write() as db:
            if db.execute("SELECT 1 FROM luts WHERE name=?", (name,)).fetchone():
                raise LUTError(f"a LUT named {name!r} already exists; delete it or import under another name", 409)
            db.execute("INSERT INTO luts (name, model_id, model_source, layer, version, created) VALUES "
                       "(?, ?, ?, ?, 1, ?)", (name, meta["model_id"], meta["model_source"], int(meta["layer"]), now))
            ids = [db.execute("INSERT INTO labels (lut, label, context, created) VALUES (?, ?, ?, ?)",
                              (name, label, context, created)).lastrowid for label, context, created in labels]
            db.executemany(
                "INSERT INTO entries (lut, label_id, model_id, layer, position, token, target, radius, key, value, "
                "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(name, ids[int(li)], meta["model_id"], int(meta["layer"]), int(p), int(tok), int(g), float(r),
                  k.tobytes(), v.tobytes(), now)
                 for li, p, tok, g, r, k, v in zip(t["label"], t["position"], t["token"], t["target"], t["radius"],
                                                    t["key"], t["value"])])
        return name


class _Transaction:
    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
        return False


def _safetensors_metadata(data):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]).get("__metadata__", {})


# ---------------------------------------------------------------------------- command line

def main(argv=None):
    p = argparse.ArgumentParser(description="Teach, list, show, delete, export and import LUTs.")
    p.add_argument("--lut_db", default="out/luts.sqlite", help="the SQLite file holding the LUTs")
    p.add_argument("--init_from", default="gpt2", help="base model for teach (GPT-2 type or checkpoint dir)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (for teach)")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("teach", help="teach a label to a LUT")
    t.add_argument("lut_name", help="the LUT (user or tenant id)")
    t.add_argument("label", help="the text to learn")
    t.add_argument("--label_context", default=None, help="text the label should follow")
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
        if args.cmd == "teach":
            model = load_model(args.init_from, *resolve_device(args.device))
            from tokenizer import get_tokenizer
            print(json.dumps(store.teach(model, get_tokenizer(model.tokenizer_spec), args.lut_name, args.label,
                                         args.label_context)))
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
    except (LUTError, ModelLoadError, OSError, sqlite3.Error) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
