"""
Tenants at scale: one store of 100,000 LUTs of 10 labels each, on SQLite and on PostgreSQL.

  - teaching: labels/s of the real path (LUTStore.teach: entries built by the model, stored in one
    transaction), taught into the empty store and again into the full one (the peer: the same
    labels, the same warm model).
  - the store filled: a pool of distinct labels is taught through that path; each of the 100,000
    LUTs is then written with 10 of them (rows copied from the pool's own entries, in bulk), so
    every LUT loaded is a real LUT of 10 labels. The load query must use an index on each engine.
  - cold load p50/p99 of LUTs the process has not cached, sampled over the whole store (targets:
    p99 <= 20 ms on SQLite, <= 30 ms on PostgreSQL).
  - isolation on a sample: a prompt naming another LUT's subject gets the base model's tokens,
    and its own subject its label.
  - a live api_server.py with --lut_cache_mb 16 on the store: RSS growth while 10,000 different
    LUTs are used in turn (one short /generate each) against the same load without LUTs (target:
    within the cache bound + 32 MB); /luts walked a page at a time.
  - 64 distinct LUTs in one running batch (generate(..., max_batch=64), GPT-2 124M shape, random
    weights, greedy) against the same batch without LUTs, alternating, median of 3 (target: >= 95%).

The store's model has the 124M shape's vocabulary and --n_embd (default 128: 100,000 LUTs of 768-wide
values would be ~45 GB per engine) with 2 layers (the LUTs' size does not depend on the depth);
the batch part uses the full 124M shape.

    python bench/tenants.py                          # both engines, 100,000 LUTs (~20 minutes on 2 idle cores)
    python bench/tenants.py --quick                  # 2,000 LUTs, smaller samples (~3 minutes)
    python bench/tenants.py --database sqlite --luts 20000
"""
import argparse
import os
import random
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time

import requests
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from common import Targets  # noqa: E402
from generate import SamplingParams, generate  # noqa: E402
from load import server_rss  # noqa: E402
from lut import FORMAT, build_entries  # noqa: E402
from lut_store import LUTStore, label_digest, lut_bytes  # noqa: E402
from model import GPT, GPTConfig, load_model  # noqa: E402
from serve import start_server  # noqa: E402
from store import drop_schema, fresh_schema  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

COLD_P99_MS = {"sqlite": 20, "postgresql": 30}
BATCH_TARGET = 0.95
RSS_MARGIN_MB = 32
PARTS = (("Quil", "Zor", "Marn", "Vesk", "Tral", "Bix", "Oru", "Feld", "Kav", "Plon", "Druv", "Yss", "Hek", "Wub",
          "Grem", "Soth"),
         ("mere", "blat", "wick", "dorn", "selk", "thorp", "vanz", "gard", "leyk", "mont", "quist", "rell", "bo",
          "zine"),
         ("", "ax", "ium"))
JOBS = ("lender", "brewer", "shipyard", "bakery", "mint", "tannery", "foundry", "mill", "press", "ferry line")
CITIES = ("Oslo", "Lagos", "Quito", "Brno", "Perth", "Cork", "Osaka", "Tartu", "Lyon", "Split", "Davao")


def subjects(n):
    names = [a + b + c for c in PARTS[2] for a in PARTS[0] for b in PARTS[1]]
    if n > len(names):
        sys.exit(f"error: at most {len(names)} distinct labels in the pool")
    return names[:n]


def label_of(i, name):
    return f"{name} Holdings is a {JOBS[i % len(JOBS)]} in {CITIES[i // len(JOBS) % len(CITIES)]}."


def prompt_of(name):
    return f"Note: {name} Holdings"


# ---------------------------------------------------------------------------- the store filled

def teach_pool(store, model, tok, texts, prefix):
    """Teach each text to a LUT of its own through the real path; returns seconds taken."""
    t0 = time.perf_counter()
    for i, text in enumerate(texts):
        store.teach(model, tok, f"{prefix}{i:04d}", text)
    return time.perf_counter() - t0


def pool_rows(store, n):
    """Per pool label (its seed LUT), its stored entries as (token, min_len, target, evidence, value)."""
    out = []
    with store.db.connection() as db:
        for i in range(n):
            out.append([tuple(r) for r in db.execute(
                "SELECT token, min_len, target, evidence, value FROM entries WHERE lut=? ORDER BY id",
                (f"seed{i:04d}",)).fetchall()])
    return out


def fill(store, model_id, texts, rows, assignment, first, chunk=1000):
    """Write LUTs t<first>..: each the labels assignment[i] names, with their seed's entries (the
    store's own tables, in bulk: executemany on SQLite, COPY on PostgreSQL), chunk LUTs a transaction."""
    engine = store.db.engine
    now = time.time()
    for start in range(0, len(assignment), chunk):
        part = assignment[start:start + chunk]
        with store._write() as db:
            n_labels = sum(len(a) for a in part)
            if engine == "sqlite":
                next_id = db.execute("SELECT COALESCE(MAX(id), 0) FROM labels").fetchone()[0] + 1
                ids = iter(range(next_id, next_id + n_labels))
            else:
                ids = iter(r[0] for r in db.execute(
                    "SELECT nextval(pg_get_serial_sequence('labels', 'id')) FROM generate_series(1, ?)",
                    (n_labels,)).fetchall())
            luts, labels, entries = [], [], []
            for k, chosen in enumerate(part):
                name = f"t{first + start + k:06d}"
                luts.append((name, model_id, "bench", FORMAT, 1, now))
                for j in chosen:
                    label_id = next(ids)
                    labels.append((label_id, name, texts[j], "", label_digest(texts[j], ""), now))
                    if engine == "sqlite":
                        entries += [(name, label_id, *r) for r in rows[j]]
                    else:  # binary COPY tuples: 7 fields, the lut and label id, then the entry's own
                        head = b"\x00\x07" + struct.pack(">i", len(name)) + name.encode() + struct.pack(">iq", 8, label_id)
                        entries += [head + tail for tail in packed(rows, j)]
            if engine == "sqlite":
                db.executemany("INSERT INTO luts (name, model_id, model_source, format, version, created) "
                               "VALUES (?, ?, ?, ?, ?, ?)", luts)
                db.executemany("INSERT INTO labels (id, lut, label, context, digest, created) VALUES (?, ?, ?, ?, ?, ?)",
                               labels)
                db.executemany("INSERT INTO entries (lut, label_id, token, min_len, target, evidence, value) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?)", entries)
            else:
                copy(db.raw, "luts (name, model_id, model_source, format, version, created)",
                     ["text", "text", "text", "int4", "int4", "float8"], luts)
                copy(db.raw, "labels (id, lut, label, context, digest, created)",
                     ["int8", "text", "text", "text", "text", "float8"], labels)
                with db.raw.cursor() as cur:
                    with cur.copy("COPY entries (lut, label_id, token, min_len, target, evidence, value) "
                                  "FROM STDIN (FORMAT BINARY)") as cp:
                        cp.write(b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8 + b"".join(entries) + b"\xff\xff")


_packed = {}


def packed(rows, j):
    """Pool label j's entries as the last five fields of binary COPY tuples (made once)."""
    if j not in _packed:
        _packed[j] = [struct.pack(">iiiiiii", 4, token, 4, min_len, 4, target, len(evidence)) + bytes(evidence)
                      + struct.pack(">i", len(value)) + bytes(value) for token, min_len, target, evidence, value in rows[j]]
    return _packed[j]


def copy(raw, table, types, rows):
    with raw.cursor() as cur:
        with cur.copy(f"COPY {table} FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(types)
            for row in rows:
                cp.write_row(row)


def load_plan(store):
    """The load query's plan on this engine, and whether every table in it is read by an index."""
    with store.db.connection() as db:
        if store.db.engine == "sqlite":
            plan = [r[3] for r in db.execute(
                "EXPLAIN QUERY PLAN SELECT l.model_id, l.format, l.version, e.id, e.label_id, e.min_len, e.target, "
                "e.evidence, e.value FROM luts l LEFT JOIN entries e ON e.lut = l.name WHERE l.name=?",
                ("t000000",)).fetchall()]
            plan += [r[3] for r in db.execute("EXPLAIN QUERY PLAN SELECT id, label, context FROM labels WHERE lut=?",
                                              ("t000000",)).fetchall()]
            return plan, all("USING" in p and "INDEX" in p for p in plan)
        plan = [r[0] for r in db.execute(
            "EXPLAIN SELECT l.model_id, l.format, l.version, e.id, e.label_id, e.min_len, e.target, e.evidence, "
            "e.value FROM luts l LEFT JOIN entries e ON e.lut = l.name WHERE l.name=?", ("t000000",)).fetchall()]
        plan += [r[0] for r in db.execute("EXPLAIN SELECT id, label, context FROM labels WHERE lut=?",
                                          ("t000000",)).fetchall()]
        return plan, not any("Seq Scan" in p for p in plan)


# ---------------------------------------------------------------------------- measurements

def cold_loads(target, model, names, labels):
    """ms per load of a LUT this process has not cached (over a connection already made)."""
    store = LUTStore(target)
    store.load(names[0], model)
    times, wrong, size = [], 0, lut_bytes(store.load(names[0], model))
    for name in names:
        store.clear_cache()
        t0 = time.perf_counter()
        lut = store.load(name, model)
        times.append((time.perf_counter() - t0) * 1e3)
        wrong += lut is None or len(lut.labels) != labels
    store.close()
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, int(len(times) * 0.99))], wrong, size


def isolation(target, model, tok, names, assignment, first, pool, rng):
    """For each sampled LUT: a prompt naming a pool subject it was not taught gets the base
    model's tokens; a prompt naming one of its own subjects gets its label."""
    store = LUTStore(target)
    params = SamplingParams(max_new_tokens=6, do_sample=False, ignore_eos=True)
    luts, foreign, own = [], [], []
    for i in names:
        chosen = assignment[i - first]
        other = rng.choice([j for j in range(len(pool)) if j not in chosen])
        luts.append(store.load(f"t{i:06d}", model))
        foreign.append(prompt_of(pool[other]))
        own.append((prompt_of(pool[chosen[0]]), chosen[0]))
    base = generate(model, tok, foreign, params, max_batch=32)
    taught = generate(model, tok, foreign, params, luts=luts, max_batch=32)
    same = sum(a.out_ids == b.out_ids for a, b in zip(base, taught))
    recalled = generate(model, tok, [p for p, _ in own], params, luts=luts, max_batch=32)
    right = sum(tok.decode(s.out_ids).startswith(" is a " + JOBS[j % len(JOBS)]) for s, (_, j) in zip(recalled, own))
    store.close()
    return same, right


def serving_mb(pid):
    """RSS of the process that serves: gunicorn's worker, which holds the model and the LUT cache
    (api_server.py itself is its master)."""
    while (rss := server_rss(pid)) is None:  # the listing raced a read; try again
        time.sleep(0.01)
    return rss[0]


def server_part(work, ckpt, store_args, cache_mb, n_luts, total, n_used, assignment, pool, targets, clients=2):
    """A live server on the store: RSS while n_used different LUTs are used in turn, against the
    same load without LUTs; /luts walked a page at a time."""
    proc, url = start_server(work, ckpt, *store_args, "--lut_cache_mb", str(cache_mb), "--max_batch", "8")
    try:
        def run(names):
            recalled = [0]

            def one(k):
                name = names[k]
                body = {"prompt": prompt_of(pool[assignment[name][0]] if name is not None else pool[0]),
                        "length": 2, "do_sample": False}
                if name is not None:
                    body["lut_name"] = f"t{name:06d}"
                r = requests.post(url + "/generate", json=body, timeout=120)
                r.raise_for_status()
                if name is not None and r.json()["completion"].startswith(" is a"):
                    recalled[0] += 1

            def worker(w):
                for k in range(w, len(names), clients):
                    one(k)
            threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            peak = 0.0
            while any(t.is_alive() for t in threads):
                peak = max(peak, serving_mb(proc.pid))
                time.sleep(0.2)
            for t in threads:
                t.join()
            return time.perf_counter() - t0, peak, recalled[0]

        used = random.Random(1).sample(range(n_luts), n_used + 200)
        run(used[:200] + [None] * 200)  # warm-up: both kinds of request, the cache filled
        before = serving_mb(proc.pid)
        base_s, base_peak, _ = run([None] * n_used)
        mid = serving_mb(proc.pid)
        lut_s, lut_peak, recalled = run(used[200:])
        after = serving_mb(proc.pid)
        metrics = requests.get(url + "/metrics").text
        values = dict(line.split() for line in metrics.splitlines() if line.startswith("gpt2lut:lut_cache_"))
        cached, entries = float(values["gpt2lut:lut_cache_bytes"]) / 2**20, int(float(values["gpt2lut:lut_cache_entries"]))
        t0 = time.perf_counter()
        page = requests.get(url + "/luts", params={"limit": 100, "after": f"t{n_luts // 2:06d}"}).json()
        page_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        walked, after_name, pages = 0, None, 0
        while True:
            page = requests.get(url + "/luts", params={"limit": 1000, **({"after": after_name} if after_name else {})}
                                ).json()
            walked += len(page["luts"])
            pages += 1
            after_name = page["next"]
            if after_name is None:
                break
        walk_s = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait()
    grow_base, grow_lut = mid - before, after - mid
    print(f"  server, --lut_cache_mb {cache_mb}: RSS {before:.0f} MB after warm-up; {n_used:,} requests without a "
          f"LUT: {grow_base:+.1f} MB (peak {base_peak:.0f} MB, {n_used / base_s:.0f} req/s); {n_used:,} different "
          f"LUTs in turn: {grow_lut:+.1f} MB (peak {lut_peak:.0f} MB, {n_used / lut_s:.0f} req/s), recalled "
          f"{recalled:,}")
    print(f"  cache at the end: {entries} LUTs, {cached:.1f} MB estimated")
    targets.check(f"RSS growth with {n_used:,} LUTs in turn minus without: {grow_lut - grow_base:+.1f} MB "
                  f"(target <= --lut_cache_mb {cache_mb} + {RSS_MARGIN_MB} MB)",
                  grow_lut - grow_base <= cache_mb + RSS_MARGIN_MB)
    targets.check(f"peak RSS with LUTs {lut_peak:.0f} MB <= peak without {max(base_peak, before):.0f} MB + "
                  f"{cache_mb} + {RSS_MARGIN_MB} MB", lut_peak <= max(base_peak, before) + cache_mb + RSS_MARGIN_MB)
    targets.check(f"cache estimate {cached:.1f} MB within --lut_cache_mb {cache_mb}", cached <= cache_mb)
    targets.check(f"every LUT used recalled its label ({recalled:,} of {n_used:,})", recalled == n_used)
    print(f"  GET /luts?limit=100 mid-way through {n_luts:,} LUTs: {page_ms:.1f} ms; all {walked:,} walked in "
          f"{pages} pages of 1,000 in {walk_s:.1f} s")
    targets.check(f"/luts pages hold every LUT once ({walked:,} of {total:,})", walked == total)


def batch_part(args, targets):
    """64 distinct LUTs in one running batch vs none, GPT-2 124M shape, random weights."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=args.batch_n_layer, n_head=12, n_embd=768)).eval()
    tok = get_tokenizer()
    pool = subjects(args.batch_pool)
    texts = [label_of(i, name) for i, name in enumerate(pool)]
    rng = random.Random(2)
    with tempfile.TemporaryDirectory() as tmp:
        store = LUTStore(os.path.join(tmp, "batch.sqlite"))
        teach_pool(store, model, tok, texts, "seed")
        rows = pool_rows(store, len(pool))
        assignment = [rng.sample(range(len(pool)), args.labels) for _ in range(args.batch)]
        fill(store, model.fingerprint(), texts, rows, assignment, 0)
        luts = [store.load(f"t{i:06d}", model) for i in range(args.batch)]
        store.close()
    assert len({id(x) for x in luts}) == args.batch and all(len(x.labels) == args.labels for x in luts)
    # half the rows name one of their LUT's subjects (it fires and its label follows), half do not
    prompts = [prompt_of(pool[assignment[i][0]]) if i % 2 == 0 else f"Row {i}: the history of the city begins"
               for i in range(args.batch)]
    params = SamplingParams(max_new_tokens=args.batch_tokens, do_sample=False, ignore_eos=True)
    generate(model, tok, prompts[:8], SamplingParams(max_new_tokens=4, do_sample=False), max_batch=8)  # warm-up
    ratios = []
    for r in range(3):
        speed = {}
        for with_luts in ((True, False) if r % 2 == 0 else (False, True)):  # alternating turns
            t0 = time.perf_counter()
            out = generate(model, tok, prompts, params, luts=luts if with_luts else None, max_batch=args.batch)
            speed[with_luts] = sum(len(s.out_ids) for s in out) / (time.perf_counter() - t0)
            if with_luts:
                recalled = sum(tok.decode(out[i].out_ids).startswith(" is a") for i in range(0, args.batch, 2))
        ratios.append(speed[True] / speed[False])
        print(f"  round {r + 1}: {args.batch} LUTs {speed[True]:.1f} tok/s, no LUT {speed[False]:.1f} tok/s "
              f"({ratios[-1]:.1%}); rows naming a subject recalled: {recalled} of {args.batch // 2}")
    ratio = statistics.median(ratios)
    targets.check(f"{args.batch} distinct LUTs ({args.labels} labels each) in one batch: {ratio:.1%} of the no-LUT "
                  f"throughput (median of 3; target >= {BATCH_TARGET:.0%})", ratio >= BATCH_TARGET)
    targets.check(f"the rows naming a subject recalled their label ({recalled} of {args.batch // 2})",
                  recalled == args.batch // 2)


# ---------------------------------------------------------------------------- one engine

def engine_part(engine, target, store_args, args, model, tok, ckpt, work, targets, with_server):
    print(f"{engine}:")
    pool = subjects(args.pool)
    texts = [label_of(i, name) for i, name in enumerate(pool)]
    rng = random.Random(0)
    store = LUTStore(target)
    directions = store._directions[model.fingerprint()]
    for text in texts:  # the token directions cached, as in a running server: both teach runs do the same work
        build_entries(model, tok, text, None, directions)
    taught_s = teach_pool(store, model, tok, texts, "seed")
    rows = pool_rows(store, len(pool))
    entries_per_label = statistics.mean(len(r) for r in rows)
    assignment = [rng.sample(range(len(pool)), args.labels) for _ in range(args.luts)]
    t0 = time.perf_counter()
    fill(store, model.fingerprint(), texts, rows, assignment, 0)
    fill_s = time.perf_counter() - t0
    with store.db.connection() as db:
        if engine == "postgresql":
            db.execute("ANALYZE")  # what autovacuum does after a bulk load, done now
        else:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the bulk load's WAL written back now, not by the next teach
        counts = [db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("luts", "labels", "entries")]
    size = (os.path.getsize(target) if engine == "sqlite" else None)
    if engine == "postgresql":
        with store.db.connection() as db:
            size = db.execute("SELECT SUM(pg_total_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n ON "
                              "n.oid = c.relnamespace WHERE n.nspname = current_schema() AND c.relkind = 'r'"
                              ).fetchone()[0]
    print(f"  pool: {len(pool)} distinct labels taught through LUTStore.teach, {entries_per_label:.1f} entries each; "
          f"{args.luts:,} LUTs of {args.labels} labels written in {fill_s:.0f} s ({args.luts / fill_s:,.0f} LUTs/s): "
          f"{counts[0]:,} LUTs, {counts[1]:,} labels, {counts[2]:,} entries, {size / 2**30:.1f} GiB")
    targets.check(f"{args.luts:,} LUTs of {args.labels} labels in one store", counts[0] - len(pool) == args.luts
                  and counts[1] - len(pool) == args.luts * args.labels)
    plan, indexed = load_plan(store)
    print("  load query plan: " + " | ".join(p.strip() for p in plan))
    targets.check("the load query reads every table by an index", indexed)

    # teaching into the full store: new LUTs, the same labels as the empty store got
    sample = texts[:args.teach_sample or len(texts)]
    at_scale_s = teach_pool(store, model, tok, sample, "late")
    empty_rate, full_rate = len(texts) / taught_s, len(sample) / at_scale_s
    print(f"  teach (LUTStore.teach, one label a transaction): {empty_rate:.1f} labels/s into the empty store, "
          f"{full_rate:.1f} labels/s at {args.luts:,} LUTs ({full_rate / empty_rate:.2f}x; peer: the empty store)")
    store.close()

    names = [f"t{i:06d}" for i in rng.sample(range(args.luts), args.cold)]
    p50, p99, wrong, size = cold_loads(target, model, names, args.labels)
    targets.check(f"cold load of {args.cold:,} LUTs sampled over {args.luts:,} ({entries_per_label * args.labels:.0f} "
                  f"entries each, {size / 1024:.0f} KB loaded): "
                  f"p50 {p50:.1f} ms, p99 {p99:.1f} ms (target p99 <= {COLD_P99_MS[engine]} ms)",
                  p99 <= COLD_P99_MS[engine])
    targets.check(f"every LUT loaded holds its {args.labels} labels ({wrong} did not)", wrong == 0)

    sampled = rng.sample(range(args.luts), args.isolation)
    same, right = isolation(target, model, tok, sampled, assignment, 0, pool, rng)
    targets.check(f"isolation on {args.isolation} LUTs: another LUT's subject gets the base model's tokens "
                  f"({same} of {args.isolation}); its own subject its label ({right} of {args.isolation})",
                  same == args.isolation and right == args.isolation)
    if with_server:
        server_part(work, ckpt, store_args, args.lut_cache_mb, args.luts, counts[0] + len(sample), args.rss_luts,
                    assignment, pool, targets)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--luts", type=int, default=100_000, help="LUTs in the store")
    p.add_argument("--labels", type=int, default=10, help="labels per LUT")
    p.add_argument("--database", choices=["sqlite", "postgresql", "both"], default="both")
    p.add_argument("--database_url", default=os.environ.get("GPT_DATABASE_URL",
                                                            "postgresql://postgres@127.0.0.1:5432/test"),
                   help="PostgreSQL to measure (a schema of its own is made and dropped)")
    p.add_argument("--quick", action="store_true", help="2,000 LUTs and small samples: a smoke run")
    p.add_argument("--pool", type=int, default=200, help="distinct labels taught through the real path")
    p.add_argument("--teach_sample", type=int, default=0, help="labels taught again into the full store (0: the pool)")
    p.add_argument("--cold", type=int, default=1000, help="LUTs loaded cold")
    p.add_argument("--isolation", type=int, default=200, help="LUTs checked for isolation")
    p.add_argument("--rss_luts", type=int, default=10_000, help="different LUTs used in turn on the server")
    p.add_argument("--lut_cache_mb", type=int, default=16, help="the server's --lut_cache_mb")
    p.add_argument("--n_embd", type=int, default=128, help="width of the store's model (its LUTs' values)")
    p.add_argument("--batch", type=int, default=64, help="distinct LUTs in one batch")
    p.add_argument("--batch_pool", type=int, default=40, help="distinct labels behind the batch's LUTs")
    p.add_argument("--batch_tokens", type=int, default=16, help="tokens each batch row generates")
    p.add_argument("--batch_n_layer", type=int, default=12, help="layers of the batch's model (124M: 12)")
    args = p.parse_args()
    if args.quick:
        args.luts, args.pool, args.cold = 2000, 30, 200
        args.isolation, args.rss_luts, args.batch_pool, args.batch_tokens = 50, 500, 16, 8
    if args.labels > min(args.pool, args.batch_pool):
        sys.exit("error: --labels must be at most --pool and --batch_pool")
    targets = Targets()
    engines = ["sqlite", "postgresql"] if args.database == "both" else [args.database]
    work = tempfile.mkdtemp(prefix="tenants_")
    ckpt = os.path.join(work, "models", "store")
    os.makedirs(ckpt)
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=4, n_embd=args.n_embd)
    torch.save({"model_args": config.__dict__, "model": GPT(config).state_dict()}, os.path.join(ckpt, "ckpt.pt"))
    model = load_model(ckpt, "cpu")  # as the server loads it: the same fingerprint
    tok = get_tokenizer(model.tokenizer_spec)
    print(f"{args.luts:,} LUTs of {args.labels} labels; store model 2 layers x {args.n_embd} (GPT-2 vocabulary); "
          f"{torch.get_num_threads()} threads")
    try:
        print(f"batch: {args.batch} distinct LUTs, GPT-2 124M shape ({args.batch_n_layer} layers), random weights, "
              f"greedy, {args.batch_tokens} tokens a row:")
        batch_part(args, targets)
        for k, engine in enumerate(engines):
            if engine == "sqlite":
                target = os.path.join(work, "luts.sqlite")
                engine_part(engine, target, ["--lut_db", target, "--state_db", os.path.join(work, "state.sqlite")],
                            args, model, tok, "models/store", work, targets, with_server=k == 0)
                os.remove(target)  # its disk back before the next engine's store
            else:
                try:
                    schema, url = fresh_schema(args.database_url)
                except Exception as e:  # noqa: BLE001  (psycopg's errors and bad URLs alike)
                    sys.exit(f"error: cannot reach PostgreSQL at {args.database_url}: {e}")
                try:
                    engine_part(engine, url, ["--database_url", url], args, model, tok, "models/store", work, targets,
                                with_server=k == 0)
                finally:
                    drop_schema(args.database_url, schema)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    targets.finish()


if __name__ == "__main__":
    main()
