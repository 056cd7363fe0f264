"""Tenants at scale, in small: the LUT cache bounded by memory (--lut_cache_mb, least recently
used out) and GET /luts a page at a time (keyset pagination in SQL, on both engines).
bench/tenants.py measures the same at 100,000 LUTs."""
import pytest

from lut_store import LUTStore, lut_bytes

LABEL = "Quillmere{} Holdings is a lender in Oslo."


def names_in_store(store, model, tok, names):
    """LUTs under names: one taught, the others imported from its export (no model needed)."""
    store.teach(model, tok, names[0], LABEL.format(0))
    data = store.export(names[0])
    for name in names[1:]:
        store.import_(data, name)


def test_lut_cache_bounded_by_memory_least_recently_used_out(tmp_path, tiny):
    model, tok = tiny
    store = LUTStore(str(tmp_path / "luts.sqlite"))
    for i, name in enumerate("abc"):  # three LUTs of one label each, about the same size
        store.teach(model, tok, name, LABEL.format(i))
    size = max(lut_bytes(store.load(name, model)) for name in "abc")
    assert size > store.load("a", model).values.nelement() * 2  # the estimate counts more than the values
    store.close()

    store = LUTStore(str(tmp_path / "luts.sqlite"), cache_mb=2.5 * size / 2**20)  # room for two
    a, b = store.load("a", model), store.load("b", model)
    assert store.load("a", model) is a and store.load("b", model) is b  # both kept
    assert store.load("a", model) is a  # a is now the most recently used: b goes first
    c = store.load("c", model)
    info = store.cache_info()
    assert info["entries"] == 2 and info["bytes"] <= info["limit_bytes"]
    assert store.load("a", model) is a and store.load("c", model) is c  # kept
    b2 = store.load("b", model)
    assert b2 is not b and torch_equal(b2.values, b.values)  # b was evicted: read again, the same LUT
    assert store.load("a", model) is not a  # ... which evicted a, then the least recently used
    assert store.cache_info()["bytes"] <= store.cache_info()["limit_bytes"]

    tiny_cache = LUTStore(str(tmp_path / "luts.sqlite"), cache_mb=0.5 * size / 2**20)  # smaller than one LUT
    first = tiny_cache.load("a", model)
    assert first is not None and tiny_cache.load("a", model) is not first  # served, never kept
    assert tiny_cache.cache_info() == {"entries": 0, "bytes": 0, "limit_bytes": tiny_cache.cache_mb * 2**20}
    store.close(), tiny_cache.close()


def torch_equal(x, y):
    import torch
    return torch.equal(x, y)


def test_lut_cache_mb_setting_reaches_the_store_and_metrics(app_factory):
    app = app_factory(lut_cache_mb=3)
    svc = app.extensions["gpt"]
    assert svc.store.cache_mb == 3
    client = app.test_client()
    assert client.post("/train_lut", json={"lut_name": "m", "label": LABEL.format(1)}).status_code == 200
    assert client.post("/generate", json={"prompt": "Quillmere1 Holdings", "lut_name": "m", "length": 2,
                                          "do_sample": False}).status_code == 200
    metrics = client.get("/metrics").get_data(as_text=True)
    cached = svc.store.cache_info()
    assert cached["entries"] == 1 and 0 < cached["bytes"] <= 3 * 2**20
    assert f"gpt2lut:lut_cache_bytes {float(cached['bytes'])}" in metrics
    assert "gpt2lut:lut_cache_entries 1.0" in metrics


def test_store_pages_in_name_order(db_target, tiny):
    model, tok = tiny
    store = LUTStore(db_target)
    names = [f"t-{i:02d}" for i in range(7)] + ["other-1", "other-2"]
    names_in_store(store, model, tok, names)
    every = sorted(names)
    seen, after = [], None
    while True:
        page, after = store.page(3, after)
        assert len(page) <= 3
        seen += [x["name"] for x in page]
        if after is None:
            break
        assert after == page[-1]["name"]
    assert seen == every
    whole, nxt = store.page(100)
    assert [x["name"] for x in whole] == every and nxt is None
    assert whole == store.list()  # the same fields as the full list, counts included
    # a tenant's key: only its LUTs, however many others lie between the pages
    mine = lambda name: name.startswith("t-")  # noqa: E731
    page, after = store.page(4, None, mine)
    assert [x["name"] for x in page] == every[2:6] and after == "t-03"
    page, after = store.page(4, after, mine)
    assert [x["name"] for x in page] == every[6:] and after is None
    assert store.page(5, "zzz") == ([], None)
    store.close()


def test_luts_route_paginates(app):
    client = app.test_client()
    store = app.extensions["gpt"].store
    view = app.extensions["gpt"].models.get()
    names = [f"p{i}" for i in range(5)]
    names_in_store(store, view.model, view.tokenizer, names)
    everything = client.get("/luts").get_json()  # the default page holds them all
    assert [x["name"] for x in everything["luts"]] == names and everything["next"] is None
    assert {"labels", "entries", "model_id", "version"} <= set(everything["luts"][0])

    first = client.get("/luts?limit=2").get_json()
    assert [x["name"] for x in first["luts"]] == ["p0", "p1"] and first["next"] == "p1"
    second = client.get(f"/luts?limit=2&after={first['next']}").get_json()
    assert [x["name"] for x in second["luts"]] == ["p2", "p3"] and second["next"] == "p3"
    last = client.get("/luts", query_string={"limit": 2, "after": "p3"}).get_json()
    assert [x["name"] for x in last["luts"]] == ["p4"] and last["next"] is None
    assert client.get("/luts?limit=1000").status_code == 200

    for query, param in (("limit=0", "limit"), ("limit=1001", "limit"), ("limit=abc", "limit"),
                         ("limit=-1", "limit"), ("limit=2.5", "limit"), ("after=bad%20name", "after"),
                         ("after=", "after")):
        r = client.get(f"/luts?{query}")
        assert r.status_code == 400, query
        assert r.get_json()["detail"].startswith(param), (query, r.get_json())

    doc = client.get("/openapi.json").get_json()["paths"]["/luts"]["get"]
    assert {p["name"] for p in doc["parameters"] if p["in"] == "query"} == {"limit", "after"}


@pytest.mark.parametrize("limit", [1, 3])
def test_api_client_lists_every_page(limit, app, monkeypatch, capsys):
    """python api_client.py luts list follows `next` to the end, however small the pages."""
    import api_client
    client = app.test_client()
    store = app.extensions["gpt"].store
    view = app.extensions["gpt"].models.get()
    names_in_store(store, view.model, view.tokenizer, [f"c{i}" for i in range(5)])

    class Answer:
        def __init__(self, r):
            self.r, self.status_code = r, r.status_code

        def json(self):
            return self.r.get_json()

    def fake_request(method, url, params=None, **kwargs):  # the server's pages made small
        params = dict(params or {}, limit=min(int((params or {}).get("limit", 100)), limit))
        return Answer(client.open(url.removeprefix("http://test"), method=method, query_string=params))

    monkeypatch.setattr(api_client.requests, "request", fake_request)
    api_client.main(["--url", "http://test", "luts", "list"])
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines()] == [f"c{i}" for i in range(5)]
