"""The online endpoint on a real Ray Serve application, over HTTP on a free loopback port.

One application is shared by the module (Serve and a replica cost seconds here). It is deployed
from a Serve config (``import_path`` + the deployment's ``user_config``), the way ``serve run
config.yaml`` and a KubeRay RayService deploy it; ``serve --export`` deploys the same
``build_app`` with ``serve.run``. It first follows a pointer file (the pointer swap test moves
it to another export), then the reconfigure test applies a new ``user_config``. Every wait is
bounded.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import free_port

pytest.importorskip("ray.serve")
pytest.importorskip("faiss")

HISTORIES = [
    ["sku-10", "sku-17", "sku-24"],
    ["sku-66"],
    ["sku-101", "sku-108", "sku-115", "sku-122", "sku-129", "sku-136", "sku-143"],
    [f"sku-{i * 7 + 3}" for i in range(1, 40)],  # longer than max_seq_len (12)
]


def call(url: str, body=None, method: str | None = None, timeout: float = 30):
    """(status, decoded JSON) of one request; ``body`` bytes are sent as they are."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def wait_until(check, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s")


APP = "test-online"


def deploy_config(port: int, user_config: dict) -> None:
    """Applies a Serve config with this application, as ``serve run config.yaml`` does."""
    from ray import serve
    from ray.serve._private.api import serve_start  # the call `serve run config.yaml` makes
    from ray.serve.schema import ServeDeploySchema

    client = serve_start(http_options={"host": "127.0.0.1", "port": port})
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": [{
        "name": APP,
        "route_prefix": "/",
        "import_path": "fearec_dist.serve.online:app_builder",
        "args": {"cpus_per_replica": "0.25"},
        "deployments": [{"name": "Recommender", "user_config": user_config}],
    }]}))  # fmt: skip
    wait_until(lambda: getattr(serve.status().applications.get(APP), "status", "") == "RUNNING",
               120, "the application")  # fmt: skip


@pytest.fixture(scope="module")
def online(ray_session, make_export, tmp_path_factory):
    """The shared application: SASRec's export behind a pointer file, on 127.0.0.1."""
    from ray import serve

    run, exact = make_export("sasrec")
    _, flat = make_export("sasrec", "flat")
    _, hnsw = make_export("sasrec", "hnsw")
    pointer = tmp_path_factory.mktemp("pointer") / "current.json"
    pointer.write_text(json.dumps({"export": str(exact), "run": "r1"}))
    port = free_port()
    limits = {
        "max_history": 50,
        "max_body_bytes": 4000,
        "max_batch_requests": 8,
        "read_timeout_s": 1.0,
    }
    try:
        deploy_config(port, {"follow": str(pointer), "poll_s": 0.2, **limits})
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "run": run, "exact": exact,
               "flat": flat, "hnsw": hnsw, "pointer": pointer, "limits": limits}  # fmt: skip
    finally:
        serve.shutdown()


def expected(export_dir, history, k=10, ann=False, **options):
    from fearec_dist.serve.artifact import load_export
    from fearec_dist.serve.recommend import recommend

    export = load_export(str(export_dir), with_index=ann)
    return recommend(export, history, k, ann=ann, **options)


def assert_same(answer, want):
    assert answer["items"] == want.item_ids
    assert answer["scores"] == pytest.approx(want.scores, abs=1e-4)
    assert answer["source"] == want.source


def test_health_info_and_exact_answers_equal_recommend(online):
    url = online["url"]
    manifest = json.loads((online["exact"] / "manifest.json").read_text())
    assert call(f"{url}/healthz") == (200, {"status": "ok", "export": {
        "model": "sasrec", "export_id": manifest["export_id"]}})  # fmt: skip
    status, info = call(f"{url}/info")
    assert status == 200 and info["export_id"] == manifest["export_id"]
    assert info["vocab_checksum"] == manifest["vocab_checksum"]
    assert info["serving"]["config"]["max_batch_size"] == 32

    for history in HISTORIES:
        status, answer = call(f"{url}/recommend", {"history": history, "k": 7})
        assert status == 200, answer
        assert_same(answer, expected(online["exact"], history, 7))
        assert answer["unknown"] == []
        assert answer["export"] == {"model": "sasrec", "export_id": manifest["export_id"]}
    # options: exclude_seen, unknown ids dropped and listed, an empty history
    history = ["sku-10", "nope-1", "sku-17", "nope-2"]
    status, answer = call(f"{url}/recommend", {"history": history, "k": 5, "exclude_seen": True})
    assert status == 200 and answer["unknown"] == ["nope-1", "nope-2"]
    assert_same(answer, expected(online["exact"], history, 5, exclude_seen=True))
    assert not {"sku-10", "sku-17"} & set(answer["items"])
    status, answer = call(f"{url}/recommend", {"history": ["nope"], "fallback": "popularity"})
    assert status == 200 and answer["source"] == "popularity"
    assert_same(answer, expected(online["exact"], ["nope"], fallback="popularity"))
    status, answer = call(f"{url}/recommend", {"history": []})
    assert (status, answer["source"], answer["items"]) == (200, "empty_history", [])

    # the batch endpoint: mixed k and options in one call, each answer as if asked alone
    batch = [{"history": h, "k": k} for h, k in zip(HISTORIES, (3, 10, 1, 6))]
    batch.append({"history": ["sku-10", "sku-17"], "k": 4, "exclude_seen": True})
    batch.append({"history": [], "k": 2, "fallback": "popularity"})
    status, answers = call(f"{url}/recommend/batch", batch)
    assert status == 200 and len(answers) == len(batch)
    for req, answer in zip(batch, answers):
        options = {k: v for k, v in req.items() if k in ("exclude_seen", "fallback")}
        assert_same(answer, expected(online["exact"], req["history"], req["k"], **options))


def test_concurrent_requests_are_batched_and_answered_alike(online):
    url = online["url"]
    want = {i: expected(online["exact"], h, 5).item_ids for i, h in enumerate(HISTORIES)}
    got: dict[int, list] = {}

    def ask(i):
        got[i] = [call(f"{url}/recommend", {"history": HISTORIES[i % 4], "k": 5})
                  for _ in range(5)]  # fmt: skip

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(got) == 8
    for i, answers in got.items():
        for status, answer in answers:
            assert status == 200 and answer["items"] == want[i % 4]


def raw_http(port: int, payload: bytes, wait_s: float = 10) -> tuple[int, dict]:
    """Sends raw bytes (e.g. a body shorter than its Content-Length) and reads the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(payload)
        data = b""
        while (
            b"\r\n\r\n" not in data
            or len(data.split(b"\r\n\r\n", 1)[1])
            < int(
                data.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]
                if b"content-length: " in data
                else 0
            )
            or not data
        ):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body or b"null")


def test_bad_requests_get_4xx_naming_the_field_and_the_server_keeps_serving(online):
    url, port = online["url"], online["port"]
    rec = f"{url}/recommend"
    cases = [
        (rec, b'{"history": ["sku-10",', 400, "body"),  # malformed JSON
        (rec, b"\xff\xfe", 400, "body"),  # not UTF-8
        (rec, [1, 2], 422, "body"),  # not an object
        (rec, {"k": 3}, 422, "history"),  # missing history
        (rec, {"history": "sku-10 sku-17"}, 422, "history"),  # wrong type
        (rec, {"history": ["sku-10", 17]}, 422, "history[1]"),  # an id that is not a string
        (rec, {"history": ["sku-10"], "k": 0}, 422, "k"),
        (rec, {"history": ["sku-10"], "k": "ten"}, 422, "k"),
        (rec, {"history": ["sku-10"], "k": 81}, 422, "k"),  # beyond the 80-item catalogue
        (rec, {"history": ["sku-10"] * 51}, 422, "history"),  # over max_history (50)
        (rec, {"history": ["sku-10", "nope"], "strict": True}, 422, "history"),
        (rec, {"history": ["sku-10"], "exclude_seen": "yes"}, 422, "exclude_seen"),
        (rec, {"history": ["sku-10"], "fallback": "random"}, 422, "fallback"),
        (rec, {"history": ["sku-10"], "kk": 3}, 422, "kk"),  # a misspelt field
        (rec, {"history": ["sku-10"] * 20, "pad": "x" * 5000}, 413, "body"),  # over 4000 bytes
        (f"{url}/recommend/batch", [{"history": ["sku-10"]}, {"history": 3}], 422, "[1].history"),
        (f"{url}/recommend/batch", [{"history": ["a"]}] * 9, 422, "body"),  # over 8 requests
        (f"{url}/recommend/batch", [{"history": ["sku-10"], "k": 99}], 422, "[0].k"),
        (f"{url}/recommend/nope", {"history": ["sku-10"]}, 404, "path"),
    ]
    for target, body, status, field in cases:
        got_status, answer = call(target, body)
        assert (got_status, answer["field"]) == (status, field), (body, answer)
        assert answer["error"].startswith(field), answer
    status, answer = call(rec, method="GET")
    assert (status, answer["field"]) == (405, "method")
    status, answer = call(rec, {"history": ["sku-10", "nope-1"], "strict": True})
    assert "nope-1" in answer["error"]
    # a client that stops sending: 408 after read_timeout_s (1 s)
    head = (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200\r\n\r\n")  # fmt: skip
    status, answer = raw_http(port, head + b'{"history": ["sku-10"')
    assert (status, answer["field"]) == (408, "body")

    status, answer = call(rec, {"history": ["sku-10", "sku-17"], "k": 3})
    assert status == 200 and len(answer["items"]) == 3


class Client(threading.Thread):
    """Posts /recommend in a loop until stopped; records every status and export_id."""

    def __init__(self, port: int, prefix: str = "") -> None:
        super().__init__(daemon=True)
        self.port, self.prefix = port, prefix
        self.stop = threading.Event()
        self.seen: list[tuple[int, str | None]] = []

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        body = json.dumps({"history": HISTORIES[0], "k": 5})
        while not self.stop.is_set():
            try:
                conn.request("POST", f"{self.prefix}/recommend", body,
                             {"Content-Type": "application/json"})  # fmt: skip
                resp = conn.getresponse()
                answer = json.loads(resp.read())
                self.seen.append((resp.status, answer.get("export", {}).get("export_id")))
            except (OSError, http.client.HTTPException, ValueError) as err:
                self.seen.append((-1, repr(err)))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.close()

    def ids_after_a_while(self, new_id: str, timeout: float) -> list[tuple[int, str | None]]:
        n = wait_until(lambda: len(self.seen) if any(e == new_id for _, e in self.seen) else 0,
                       timeout, f"answers from export {new_id}")  # fmt: skip
        wait_until(lambda: len(self.seen) >= n + 10, 20, "more answers after the swap")
        self.stop.set()
        self.join(timeout=30)
        return self.seen


def test_pointer_swap_without_a_failed_request(online):
    old_id = json.loads((online["exact"] / "manifest.json").read_text())["export_id"]
    new_id = json.loads((online["flat"] / "manifest.json").read_text())["export_id"]
    assert old_id != new_id  # two exports of one run: the vocab checksum cannot tell them apart
    clients = [Client(online["port"]) for _ in range(3)]
    for c in clients:
        c.start()
    wait_until(lambda: all(len(c.seen) >= 5 for c in clients), 30, "answers before the swap")
    online["pointer"].write_text(json.dumps({"export": str(online["flat"]), "run": "r2"}))
    for c in clients:
        seen = c.ids_after_a_while(new_id, timeout=60)
        assert [s for s in seen if s[0] != 200] == []
        ids = [e for _, e in seen]
        first_new = ids.index(new_id)
        assert set(ids[:first_new]) == {old_id} and set(ids[first_new:]) == {new_id}
    status, info = call(f"{online['url']}/info")
    assert info["serving"]["last_swap"]["ok"] and info["serving"]["last_swap"]["why"] == "pointer"
    assert info["serving"]["last_swap"]["from"] == old_id
    # a pointer to a broken export: the swap fails, the old export keeps serving
    online["pointer"].write_text(json.dumps({"export": str(online["flat"].parent / "nothing")}))
    wait_until(lambda: call(f"{online['url']}/info")[1]["serving"]["last_swap"]["ok"] is False,
               30, "the failed swap")  # fmt: skip
    status, answer = call(f"{online['url']}/recommend", {"history": HISTORIES[0]})
    assert status == 200 and answer["export"]["export_id"] == new_id


def test_reconfigure_swaps_in_place_to_ann_without_a_failed_request(online):
    """A new ``user_config`` in the Serve config (what editing a RayService does): Serve calls
    ``reconfigure`` on the running replica, which swaps to the HNSW export with ``ann``."""
    url = online["url"]
    before = call(f"{url}/info")[1]["serving"]
    hnsw_id = json.loads((online["hnsw"] / "manifest.json").read_text())["export_id"]
    c = Client(online["port"])
    c.start()
    wait_until(lambda: len(c.seen) >= 5, 30, "answers before the swap")
    deploy_config(online["port"], {"export": str(online["hnsw"]), "ann": True, **online["limits"]})
    seen = c.ids_after_a_while(hnsw_id, timeout=60)
    assert [s for s in seen if s[0] != 200] == []
    after = call(f"{url}/info")[1]["serving"]
    assert after["ann"] and after["last_swap"]["why"] == "config"
    assert after["replica"] == before["replica"]  # swapped inside the running replica
    for history in HISTORIES:
        status, answer = call(f"{url}/recommend", {"history": history, "k": 6})
        assert status == 200
        assert_same(answer, expected(online["hnsw"], history, 6, ann=True))


def test_serve_command_explains_itself_and_refuses_bad_settings(capsys):
    from fearec_dist.cli import main
    from fearec_dist.serve.online import app_builder
    from fearec_dist.serve.online_api import serving_config

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("POST /recommend", "/recommend/batch", "GET /healthz", "--follow POINTER",
                   "127.0.0.1", "--max-batch-size", "--batch-wait-ms", "--local"):  # fmt: skip
        assert phrase in text, phrase
    assert main(["serve"]) == 1
    assert "--export" in capsys.readouterr().err
    # `serve run … key=value` passes strings; they are converted, and bad ones named
    cfg = serving_config({"export": "x", "ann": "true", "max_batch_size": "8", "poll_s": "0.5"})
    assert (cfg.ann, cfg.max_batch_size, cfg.poll_s) == (True, 8, 0.5)
    for bad, key in (({"max_batch_size": 0}, "max_batch_size"), ({"ann": "maybe"}, "ann"),
                     ({"k": 3}, "unknown key"), ({"threads": 1.5}, "threads")):  # fmt: skip
        with pytest.raises(ValueError, match=key):
            serving_config(bad)
    app_builder({"export": "x", "replicas": "2", "cpus_per_replica": "0.25"})  # or raises
    with pytest.raises(ValueError, match="replicas"):
        app_builder({"export": "x", "replicas": "two"})
