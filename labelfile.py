"""
Labels to teach in bulk: the items of POST /luts/<name>/labels, and the files that
`python lut.py teach-file` and `python api_client.py luts teach-file` read.

An item is a label string, or an object {"label": ..., "label_context": ...} (context optional).
A file is JSONL when its first non-blank line is a JSON object (one item per line: an object or a
JSON string); otherwise every non-blank line is one label, taken as written. Blank lines are
skipped. Kept free of torch and Flask so the client can import it cheaply.
"""
import json


def check_item(item, where="labels[0]"):
    """One item -> (label, label_context or None); a ValueError naming the field otherwise."""
    if isinstance(item, str):
        item = {"label": item}
    if not isinstance(item, dict):
        raise ValueError(f"{where}: must be a label string or an object with label and label_context")
    unknown = sorted(set(item) - {"label", "label_context"})
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r} (an item has label and label_context)")
    label, context = item.get("label"), item.get("label_context")
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"{where}: label must be a non-empty string")
    if context is not None and not isinstance(context, str):
        raise ValueError(f"{where}: label_context must be a string")
    return label, context or None


def read_file(path):
    """A label file -> [(line number, item or None, error or None)], one per non-blank line. Lines
    that are not valid items come back with the reason, so the rest can still be taught.
    OSError and UnicodeDecodeError (an unreadable file) propagate."""
    with open(path, encoding="utf-8") as f:
        lines = [(n, line.rstrip("\r\n")) for n, line in enumerate(f, 1) if line.strip()]
    jsonl = bool(lines) and lines[0][1].lstrip().startswith("{")
    rows = []
    for n, line in lines:
        where = f"line {n}"
        try:
            item = json.loads(line) if jsonl else line
        except ValueError as e:
            rows.append((n, None, f"{where}: not valid JSON ({e})"))
            continue
        try:
            label, context = check_item(item, where)
        except ValueError as e:
            rows.append((n, None, str(e)))
            continue
        rows.append((n, {"label": label, "label_context": context}, None))
    return rows


def report(rows, results):
    """The summary a CLI prints after teaching a file: rows from read_file, results (one per row
    that held an item, in order) as POST /luts/<name>/labels answers them. Returns (text, all taught)."""
    results = iter(results)
    failed, taught, added, replaced = [], 0, 0, 0
    for n, item, error in rows:
        result = next(results) if item is not None else {"taught": False, "detail": error}
        if result["taught"]:
            taught, added, replaced = taught + 1, added + result["added"], replaced + result["replaced"]
        else:
            failed.append(result["detail"] if error else f"line {n}: {result['detail']}")
    text = f"taught {taught} of {len(rows)} labels ({added} entries added, {replaced} replaced)"
    if failed:
        text += f"; {len(failed)} not taught:\n" + "\n".join(f"  {line}" for line in failed)
    return text, not failed
