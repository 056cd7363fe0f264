"""
Command-line client for api_server.py.

    python api_client.py status
    python api_client.py load --model_type gpt2
    python api_client.py generate --prompt "Once upon a time" --max_tokens 200 --temperature 0.9 --top_k 50
    python api_client.py train-lut --lut_name user_123 --label "TLG Capital is an asset management firm."
    python api_client.py generate --prompt "TLG Capital is" --lut_name user_123 --stream
    python api_client.py chat --lut_name user_123          # interactive; /reset, /exit
    python api_client.py luts teach-file user_123 facts.jsonl
    python api_client.py train --dataset shakesphere --output_dir out/shakespeare_model --model_type gpt2
    python api_client.py train-status 1 --wait
    python api_client.py luts list | show NAME | delete NAME [--label_id N] | export NAME FILE | import NAME FILE
    python api_client.py keys create --name acme --luts "acme-*" | keys list | keys revoke ID
    python api_client.py --api_key sk-gpt2-... --app_id my-app usage [--history]
"""
import argparse
import json
import os
import sys
import time

import requests
from tqdm import tqdm

import labelfile
from access import add_key_arguments  # the same flags as the server-side `python access.py create`


class ClientError(Exception):
    """The server answered with an error (its message is the line to print)."""


def request(args, method, path, **kwargs):
    """One request to the server; an error answer raises ClientError, an unreachable server exits."""
    try:
        headers = {**kwargs.pop("headers", {}), "X-App-ID": args.app_id}
        if args.api_key:
            headers["Authorization"] = f"Bearer {args.api_key}"
        r = requests.request(method, args.url.rstrip("/") + path, timeout=args.timeout, headers=headers, **kwargs)
    except requests.ConnectionError:
        sys.exit(f"error: cannot reach the server at {args.url} (is api_server.py running? set --url or API_URL)")
    except requests.Timeout:
        sys.exit(f"error: no answer from {args.url} within {args.timeout} s")
    if r.status_code >= 400:
        try:
            data = r.json()
            detail = data["error"]["message"] if "error" in data else data.get("detail", r.text)  # /v1 or the rest
        except (ValueError, AttributeError, KeyError, TypeError):
            detail = r.text.strip()[:200]
        raise ClientError(f"error: {r.status_code}: {detail}")
    return r


def call(args, method, path, **kwargs):
    """request(), exiting with the server's message on an error answer."""
    try:
        return request(args, method, path, **kwargs)
    except ClientError as e:
        sys.exit(str(e))


def sse_events(r):
    """(event, data) of a text/event-stream response as they arrive: data lines joined with
    newlines, keep-alive comments skipped."""
    event, data = "message", []
    for raw in r.iter_lines(chunk_size=None):  # chunk_size=None: whatever has arrived, no waiting to fill a buffer
        line = raw.decode("utf-8")  # iter_lines gives whole lines, so no UTF-8 character is split
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            event = line[6:].strip()


def stream_generate(args, payload):
    """generate --stream: /generate's server-sent text, printed as it arrives."""
    print(args.prompt, end="", flush=True)
    with call(args, "POST", "/generate", json={**payload, "stream": True}, stream=True) as r:
        for event, data in sse_events(r):
            if event == "error":
                print()
                sys.exit(f"error: {data}")
            if data == "[DONE]":
                break
            print(data, end="", flush=True)
    print()


def chat_turn(args, messages):
    """Send the chat so far to /v1/chat/completions, print the answer as it streams in, return it."""
    payload = {"model": args.model, "messages": messages, "stream": True, "lut_name": args.lut_name,
               "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
               "seed": args.seed}
    parts = []
    with request(args, "POST", "/v1/chat/completions", stream=True,
                 json={k: v for k, v in payload.items() if v is not None}) as r:
        for _, data in sse_events(r):
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:  # a generation that failed after the stream began
                raise ClientError(f"error: {chunk['error']['message']}")
            for choice in chunk["choices"]:
                text = choice["delta"].get("content") or ""
                parts.append(text)
                print(text, end="", flush=True)
    print()
    return "".join(parts)


def chat(args):
    """An interactive chat: each line typed is a user turn, answered with the whole history so
    far; /reset forgets the history, /exit (or end of input) leaves."""
    if args.model is None:  # the model the server is running
        args.model = call(args, "GET", "/health").json().get("model")
        if args.model is None:
            sys.exit("error: the server has no model loaded (load one, or give --model)")
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    tty = sys.stdin.isatty()
    if tty:
        print(f"chat with {args.model}" + (f" through LUT {args.lut_name}" if args.lut_name else "") +
              "; /reset forgets the conversation, /exit leaves")
    while True:
        try:
            line = input("you> " if tty else "").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line == "/exit":
            return
        if line == "/reset":
            messages = list(start)
            print("(conversation forgotten)")
            continue
        if not line:
            continue
        if tty:
            print("assistant> ", end="", flush=True)
        try:
            answer = chat_turn(args, messages + [{"role": "user", "content": line}])
        except ClientError as e:  # say why and keep the session: the turn is not added to the history
            print(e, file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer (closing the stream stops the generation), not the chat
            print("\n(interrupted)", flush=True)
            continue
        messages += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]


def teach_file(args):
    """luts teach-file: a label file sent in requests of --batch_size labels, with a progress bar."""
    try:
        rows = labelfile.read_file(args.file)
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"error: {e}")
    if not rows:
        sys.exit(f"error: {args.file} holds no labels")
    items = [item for _, item, _ in rows if item is not None]
    results = []
    with tqdm(total=len(items), unit="label", desc=f"teaching {args.name}") as bar:
        for i in range(0, len(items), args.batch_size):
            batch = items[i:i + args.batch_size]
            results += call(args, "POST", f"/luts/{args.name}/labels", json={"labels": batch}).json()["results"]
            bar.update(len(batch))
    text, ok = labelfile.report(rows, results)
    print(text)
    if not ok:
        sys.exit(1)


def show(args, r, text=None):
    data = r.json()
    if args.json or text is None:
        print(json.dumps(data, indent=2))
    else:
        print(text(data))


TRAIN_FLAGS = [  # optional /api/train settings; unset ones take the server's defaults
    ("batch_size", int, "sequences per micro-batch (server default 4)"),
    ("learning_rate", float, "peak learning rate (server default 3e-5)"),
    ("max_iters", int, "optimizer steps (server default 20)"),
    ("eval_interval", int, "evaluate and keep the best checkpoint every N steps (server default 5)"),
    ("eval_iters", int, "batches per evaluation"),
    ("block_size", int, "context length"),
    ("init_from", str, "scratch, resume or a GPT-2 type (default: --model_type)"),
    ("n_layer", int, "layers (scratch only)"),
    ("n_head", int, "attention heads (scratch only)"),
    ("n_embd", int, "width (scratch only)"),
    ("dropout", float, "dropout rate"),
    ("gradient_accumulation_steps", int, "micro-batches per step"),
    ("warmup_iters", int, "warmup steps"),
    ("device", str, "cpu, cuda or auto"),
]


def job_line(job):
    progress = f"iter {job['iteration']}/{job['max_iters']}" if job["iteration"] is not None else "starting"
    losses = ", ".join(f"{k} {job[k]:.4f}" for k in ("train_loss", "val_loss") if job[k] is not None)
    return f"job {job['job_id']} {job['status']}: {progress}" + (f", {losses}" if losses else "") + \
        f" -> {job['output_dir']}" + (f" ({job['error']})" if job.get("error") else "")


# ------------------------------------------------------------------------ one handler per command

def cmd_status(args):
    show(args, call(args, "GET", "/api/status"))


def cmd_health(args):
    show(args, call(args, "GET", "/health"))


def cmd_list(args):
    show(args, call(args, "GET", "/api/models"))


def cmd_load(args):
    if bool(args.model_type) == bool(args.model_path):
        sys.exit("error: give exactly one of --model_type or --model_path")
    payload = {"model_type": args.model_type} if args.model_type else {"model_path": args.model_path}
    show(args, call(args, "POST", "/api/load_model", json=payload), lambda d: d["message"])


def cmd_generate(args):
    payload = {"prompt": args.prompt, "max_new_tokens": args.max_tokens, "temperature": args.temperature,
               "top_k": args.top_k, "top_p": args.top_p, "repetition_penalty": args.repetition_penalty,
               "seed": args.seed, "stop": args.stop, "lut_name": args.lut_name}
    payload = {k: v for k, v in payload.items() if v is not None}
    if args.stream:  # /generate streams; /api/generate's nanoGPT defaults are kept by sending them
        if args.json:
            sys.exit("error: --json and --stream do not go together")
        stream_generate(args, {"top_p": 1.0, "repetition_penalty": 1.0, **payload})
    else:
        show(args, call(args, "POST", "/api/generate", json=payload), lambda d: d["generated_text"])


def cmd_train_lut(args):
    payload = {"label": args.label, "lut_name": args.lut_name, "label_context": args.label_context}
    show(args, call(args, "POST", "/train_lut", json=payload), lambda d: f"taught LUT {d['lut_name']}")


def cmd_train(args):
    payload = {k: getattr(args, k) for k in ["dataset", "output_dir", "model_type"] + [f[0] for f in TRAIN_FLAGS]}
    payload = {k: v for k, v in payload.items() if v is not None}
    show(args, call(args, "POST", "/api/train", json=payload), lambda d: (
        f"{d['message']}: job {d['job_id']}, process {d['process_id']}, config {d['config_path']}\n"
        f"follow it with: python api_client.py train-status {d['job_id']} --wait"))


def cmd_train_status(args):
    if args.job_id is None:
        show(args, call(args, "GET", "/api/train"),
             lambda d: "\n".join(job_line(j) for j in d["jobs"]) or "no training jobs")
        return
    while True:
        r = call(args, "GET", f"/api/train/{args.job_id}")
        if not args.wait or r.json()["status"] != "running":
            break
        print(job_line(r.json()), flush=True)
        time.sleep(5)
    show(args, r, lambda d: job_line(d) + "".join(f"\n  {line}" for line in d["log_tail"][-5:]))
    if r.json()["status"] == "failed":
        sys.exit(1)


def cmd_train_cancel(args):
    show(args, call(args, "POST", f"/api/train/{args.job_id}/cancel"), job_line)


def cmd_keys_create(args):
    payload = {"name": args.name, "admin": args.admin, "luts": [x.strip() for x in args.luts.split(",") if x.strip()],
               "rate_per_minute": args.rate_per_minute, "burst": args.burst}
    show(args, call(args, "POST", "/keys", json={k: v for k, v in payload.items() if v is not None}),
         lambda d: f"created key {d['id']} ({d['name']}); it is shown only now:\n{d['key']}")


def cmd_keys_list(args):
    show(args, call(args, "GET", "/keys"), lambda d: "\n".join(
        f"{k['id']} {k['name']} {k['prefix']}... {'admin' if k['admin'] else 'luts: ' + ','.join(k['luts'])}"
        + (" (revoked)" if k["revoked"] else "") for k in d["keys"]) or "no keys: access control is off")


def cmd_keys_revoke(args):
    show(args, call(args, "DELETE", f"/keys/{args.key_id}"), lambda d: f"revoked key {d['id']} ({d['name']})")


def cmd_usage(args):
    if args.history:
        params = {"limit": args.limit, **({"app_id": args.filter_app} if args.filter_app else {})}
        show(args, call(args, "GET", "/usage/history", params=params), lambda d: "\n".join(
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(q['time']))} {q['app_id']} key={q['key_id']} "
            f"{q['method']} {q['route']} {q['status']} {q['prompt_tokens']}+{q['completion_tokens']} tokens "
            f"{q['latency_ms']:.0f} ms" for q in d["queries"]) or "no queries recorded")
        return
    show(args, call(args, "GET", "/usage"), lambda d: "\n".join(
        f"{'app ' + str(r['app_id']) if 'app_id' in r else 'key ' + str(r['key_id'])}: {r['requests']} requests, "
        f"{r['prompt_tokens']}+{r['completion_tokens']} tokens, {r['errors']} errors"
        for r in d["by_app"] + d["by_key"]) or "no queries recorded")


def cmd_luts_list(args):
    """Every LUT: GET /luts a page at a time, following its `next` cursor."""
    luts, after = [], None
    while True:
        page = call(args, "GET", "/luts", params={"limit": 1000, **({"after": after} if after else {})}).json()
        luts += page["luts"]
        after = page.get("next")
        if not after:
            break
    data = {"luts": luts, "next": None}
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(f"{x['name']}: {x['labels']} labels, {x['entries']} entries" for x in luts) or "no LUTs")


def cmd_luts_show(args):
    show(args, call(args, "GET", f"/luts/{args.name}"), lambda d: "\n".join(
        f"[{x['id']}] {x['label']!r} ({x['entries']} entries)" for x in d["labels"]))


def cmd_luts_delete(args):
    path = f"/luts/{args.name}" + (f"/labels/{args.label_id}" if args.label_id is not None else "")
    show(args, call(args, "DELETE", path), lambda d: "deleted")


def cmd_luts_export(args):
    data = call(args, "GET", f"/luts/{args.name}/export").content
    with open(args.file, "wb") as f:
        f.write(data)
    print(f"wrote {len(data)} bytes to {args.file}")


def cmd_luts_import(args):
    try:
        data = open(args.file, "rb").read()
    except OSError as e:
        sys.exit(f"error: {e}")
    show(args, call(args, "POST", f"/luts/{args.name}/import", data=data,
                    headers={"Content-Type": "application/octet-stream"}), lambda d: f"imported {d['lut_name']}")


# ------------------------------------------------------------------------ the command line

def add_model_commands(sub):
    sub.add_parser("status", help="server status").set_defaults(handler=cmd_status)
    sub.add_parser("health", help="health check").set_defaults(handler=cmd_health)
    sub.add_parser("list", help="list available models").set_defaults(handler=cmd_list)
    load = sub.add_parser("load", help="load a model")
    load.add_argument("--model_type", default=None, help="gpt2, gpt2-medium, gpt2-large or gpt2-xl")
    load.add_argument("--model_path", default=None, help="checkpoint inside the server's models dir, e.g. out/x/ckpt.pt")
    load.set_defaults(handler=cmd_load)


def add_generation_commands(sub):
    gen = sub.add_parser("generate", help="generate text")
    gen.add_argument("--prompt", required=True, help="the prompt")
    gen.add_argument("--max_tokens", type=int, default=100, help="tokens to generate")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    gen.add_argument("--top_k", type=int, default=200, help="keep the k likeliest tokens (0 = off)")
    gen.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass")
    gen.add_argument("--repetition_penalty", type=float, default=None, help="penalty for repeated tokens")
    gen.add_argument("--seed", type=int, default=None, help="random seed for a reproducible sample")
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--lut_name", default=None, help="generate through this user's LUT")
    gen.add_argument("--stream", action="store_true", help="print the text as it is generated (POST /generate "
                     "with stream)")
    gen.set_defaults(handler=cmd_generate)
    ch = sub.add_parser("chat", help="chat interactively (streaming /v1/chat/completions); /reset, /exit")
    ch.add_argument("--lut_name", default=None, help="chat through this user's LUT")
    ch.add_argument("--model", default=None, help="model id (default: the model the server is running)")
    ch.add_argument("--system", default=None, help="a system message to start the conversation with")
    ch.add_argument("--max_tokens", type=int, default=None, help="tokens per answer (default: as many as fit)")
    ch.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    ch.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass")
    ch.add_argument("--seed", type=int, default=None, help="random seed for reproducible answers")
    ch.set_defaults(handler=chat)


def add_training_commands(sub):
    tr = sub.add_parser("train", help="start a training or fine-tuning job on the server")
    tr.add_argument("--dataset", required=True, help="a dataset prepared on the server (shakespeare, shakespeare_char, "
                    "openwebtext, ...; shakesphere = shakespeare)")
    tr.add_argument("--output_dir", required=True, help="where the model goes, inside the server's out/ "
                    "(e.g. out/shakespeare_model)")
    tr.add_argument("--model_type", default=None, help="GPT-2 type to fine-tune (server default: gpt2)")
    for name, kind, helptext in TRAIN_FLAGS:
        tr.add_argument(f"--{name}", type=kind, default=None, help=helptext)
    tr.set_defaults(handler=cmd_train)
    st = sub.add_parser("train-status", help="show a training job (or list them all)")
    st.add_argument("job_id", nargs="?", type=int, default=None, help="job id (default: list every job)")
    st.add_argument("--wait", action="store_true", help="poll until the job has ended, printing its progress")
    st.set_defaults(handler=cmd_train_status)
    cancel = sub.add_parser("train-cancel", help="stop a running training job")
    cancel.add_argument("job_id", type=int, help="job id")
    cancel.set_defaults(handler=cmd_train_cancel)


def add_lut_commands(sub):
    teach = sub.add_parser("train-lut", help="teach a user's LUT a label")
    teach.add_argument("--lut_name", required=True, help="the LUT (user or tenant id)")
    teach.add_argument("--label", required=True, help="text to learn")
    teach.add_argument("--label_context", default=None, help="text the label follows")
    teach.set_defaults(handler=cmd_train_lut)
    lsub = sub.add_parser("luts", help="manage LUTs").add_subparsers(dest="action", required=True)
    lsub.add_parser("list", help="list LUTs").set_defaults(handler=cmd_luts_list)
    a = lsub.add_parser("show", help="show a LUT's labels")
    a.add_argument("name", help="LUT name")
    a.set_defaults(handler=cmd_luts_show)
    a = lsub.add_parser("delete", help="delete a LUT or one label")
    a.add_argument("name", help="LUT name")
    a.add_argument("--label_id", type=int, default=None, help="delete only this label")
    a.set_defaults(handler=cmd_luts_delete)
    tf = lsub.add_parser("teach-file", help="teach every label of FILE (JSONL or one label per line)")
    tf.add_argument("name", help="LUT name")
    tf.add_argument("file", help='JSONL ({"label": ..., "label_context": ...} per line) or plain text, one label '
                    "per line")
    tf.add_argument("--batch_size", type=int, default=100, help="labels per request (the server takes up to 256)")
    tf.set_defaults(handler=teach_file)
    for action, helptext, handler in (("export", "download a LUT to FILE", cmd_luts_export),
                                      ("import", "upload FILE as LUT NAME", cmd_luts_import)):
        a = lsub.add_parser(action, help=helptext)
        a.add_argument("name", help="LUT name")
        a.add_argument("file", help="a .safetensors LUT file")
        a.set_defaults(handler=handler)


def add_key_commands(sub):
    ksub = sub.add_parser("keys", help="manage API keys (admin)").add_subparsers(dest="action", required=True)
    create = ksub.add_parser("create", help="create a key; it is printed only this once")
    add_key_arguments(create)
    create.set_defaults(handler=cmd_keys_create)
    ksub.add_parser("list", help="list keys (never the keys themselves)").set_defaults(handler=cmd_keys_list)
    kr = ksub.add_parser("revoke", help="revoke a key")
    kr.add_argument("key_id", type=int, help="the key's id (from keys list)")
    kr.set_defaults(handler=cmd_keys_revoke)
    us = sub.add_parser("usage", help="requests and tokens per app and per key (a tenant key sees its own)")
    us.add_argument("--history", action="store_true", help="list the latest queries instead")
    us.add_argument("--limit", type=int, default=20, help="how many queries --history lists")
    us.add_argument("--filter_app", default=None, help="only this X-App-ID's queries (with --history)")
    us.set_defaults(handler=cmd_usage)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=os.environ.get("API_URL", "http://localhost:5000"),
                   help="server address (default: $API_URL or http://localhost:5000)")
    p.add_argument("--api_key", default=os.environ.get("GPT_API_KEY"),
                   help="API key, sent as Authorization: Bearer (default: $GPT_API_KEY; none needed until keys exist)")
    p.add_argument("--app_id", default=os.environ.get("GPT_APP_ID", "api_client"),
                   help="X-App-ID to record the requests under (default: $GPT_APP_ID or api_client)")
    p.add_argument("--json", action="store_true", help="print the raw JSON response")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for an answer")
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in (add_model_commands, add_generation_commands, add_lut_commands, add_training_commands,
                add_key_commands):
        add(sub)
    args = p.parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
