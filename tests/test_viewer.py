"""The graph viewer on a store of a tiny model's dense and sparse graphs with real feature dashboards: the
JSON endpoints checked exactly against the store (no browser), errors and the CLI, then the page itself
in headless Chromium (node and edge elements, the heads of a selected edge, the QK pairs of its attention
edge, a feature's dashboard, a screenshot)."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest
import torch

from attribution.config import AttentionAttributionConfig, AttributionStageConfig, GraphConfig
from attribution.stage import run
from attribution.store import GraphNotFoundError, open_store
from sparse_attention.config import ModelSpec
from sparse_attention.models import tiny_model
from tests.test_attribution import N_FEATURES
from tests.test_attribution_stage import SMALL, save_tiny_sources
from tests.test_attribution_store import make_record
from transcoders.clt import load_clt
from transcoders.config import FeaturesConfig
from transcoders.dashboards import build_dashboards
from transcoders.features import open_features
from viewer.__main__ import main, parse_args
from viewer.data import ATTENTION_EDGE, BadRequest, NotFound, ViewerData
from viewer.server import make_server

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "The cat sat on the mat"
TEXT = "The cat sat on the mat. A dog ran in the park. Then the cat saw the dog and ran up a tree.\n" * 6


def scan_blocks(tokenizer, length: int) -> torch.Tensor:
    """Held-out-like blocks of `length` tokens, each starting with bos: what the dashboards scan."""
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    rows = [[tokenizer.bos_token_id, *ids[i:i + length - 1]] for i in range(0, len(ids) - length, length - 1)]
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """Dense and sparse graphs of PROMPT (head loadings, QK pairs) whose CLT has dashboards."""
    root = tmp_path_factory.mktemp("viewer")
    save_tiny_sources(root)
    clt_dir = root / "clt"
    model, tokenizer = tiny_model(SMALL)  # the same dense weights as the gated model's
    build_dashboards(model, load_clt(clt_dir), tokenizer, scan_blocks(tokenizer, 24),
                     FeaturesConfig(top_k=3, n_random=2, window=8, batch_size=4), clt_dir, progress=False)
    config = AttributionStageConfig(graph=GraphConfig(), attention=AttentionAttributionConfig(
        max_attention_edges=200, edge_influence_share=1.0))  # every kept edge loaded: many edges to click
    for variant, source in (("dense", ModelSpec(name="tiny", tiny=SMALL)), ("sparse", root / "sparse")):
        run(config, source, clt_dir, [PROMPT], root / "graphs", variant, progress=False)
    return root / "graphs"


@pytest.fixture(scope="module")
def data(store_dir) -> ViewerData:
    return ViewerData(open_store(store_dir))


@pytest.fixture(scope="module")
def ids(data) -> dict[str, str]:
    listed = data.graphs()
    return {g["variant"]: g["graph_id"] for g in listed}


def edge_with_qk(data: ViewerData, graph_id: str) -> tuple[dict, dict]:
    """The largest edge of a graph with a head row that has a QK attribution, and its head loadings."""
    for edge in data.graph(graph_id)["edges"]:
        if edge["heads"]:
            loadings = data.edge_heads(graph_id, edge["source"], edge["target"])
            if any(h["qk"] for h in loadings["heads"]):
                return edge, loadings
    raise AssertionError(f"graph {graph_id} has no edge with a QK-attributed head")


def feature_with_contexts(data: ViewerData, graph_id: str) -> tuple[dict, dict]:
    """A kept feature node of the graph whose dashboard has top contexts, and that dashboard."""
    for node in data.graph(graph_id)["nodes"]:
        if node["kind"] == "feature":
            dashboard = data.feature(graph_id, node["layer"], node["feature"])
            if dashboard["top"]:
                return node, dashboard
    raise AssertionError(f"graph {graph_id} has no kept feature with top contexts")


# -- the JSON endpoints, no browser ----------------------------------------------------------------

def test_graph_list_and_one_graph_pruned_match_the_store(store_dir, data, ids):
    store = open_store(store_dir)
    assert sorted(ids) == ["dense", "sparse"]
    assert {g["prompt"] for g in data.graphs()} == {PROMPT}
    labels = open_features(store_dir.parent / "clt").labels()
    for variant, graph_id in ids.items():
        stored = store.load_graph(graph_id)
        graph = data.graph(graph_id)
        json.dumps(graph, allow_nan=False)
        kept = stored.nodes[stored.nodes["kept"]]
        assert [n["node_id"] for n in graph["nodes"]] == kept["node_id"].tolist()
        assert graph["has_dashboards"] and graph["token_strings"] == list(stored.info["token_strings"])
        for node in graph["nodes"]:
            if node["kind"] == "feature":
                assert node["label"] == labels[(node["layer"], node["feature"])]
            elif node["kind"] == "token":
                assert node["label"] == graph["token_strings"][node["pos"]]
        index = stored.nodes.set_index("node_index")["node_id"]
        kept_ids = set(kept["node_id"])
        want = [(index[s], index[t], w) for t, s, w, k in stored.edges[["target", "source", "weight", "kept"]].itertuples(
            index=False) if k and index[s] in kept_ids and index[t] in kept_ids]
        assert [(e["source"], e["target"], e["weight"]) for e in graph["edges"]] == \
            [(s, t, pytest.approx(float(w))) for s, t, w in want]
        weights = [abs(e["weight"]) for e in graph["edges"]]
        assert weights == sorted(weights, reverse=True)
        heads = stored.head_loadings[stored.head_loadings["head"] >= 0]
        counts = heads.groupby(["source", "target"]).size()
        node_index = {v: k for k, v in index.items()}
        for edge in graph["edges"]:
            key = (node_index[edge["source"]], node_index[edge["target"]])
            assert edge["heads"] == (int(counts[key]) if key in counts.index else 0)
        assert any(e["heads"] for e in graph["edges"]), variant


def test_head_loadings_of_an_edge_sum_to_it_and_mark_their_qk(data, ids):
    graph_id = ids["sparse"]
    edge, loadings = edge_with_qk(data, graph_id)
    assert loadings["weight"] == pytest.approx(edge["weight"]) and loadings["kept"]
    layers = {h["layer"] for h in loadings["heads"]}
    for layer in layers:
        total = sum(h["weight"] for h in loadings["heads"] if h["layer"] == layer)
        assert total == pytest.approx(edge["weight"], rel=1e-4, abs=1e-6)
    assert {h["name"] for h in loadings["heads"] if h["head"] == -1} == {f"L{layer} skip (residual)" for layer in layers}
    for head in loadings["heads"]:
        if head["qk"]:
            data.attention_edge(graph_id, head["layer"], head["head"], head["query_pos"], head["key_pos"])
        elif head["head"] >= 0:
            with pytest.raises(NotFound, match="no QK attribution"):
                data.attention_edge(graph_id, head["layer"], head["head"], head["query_pos"], head["key_pos"])


def test_an_edge_without_head_loadings_says_why(data, ids, monkeypatch):
    graph_id = ids["dense"]
    layers = {n["node_id"]: n["layer"] for n in data.graph(graph_id)["nodes"]}
    n_layers = int(data.store.graph_info(graph_id)["n_layers"])
    unloaded = [e for e in data.graph(graph_id)["edges"] if not e["heads"]]
    crosses = [layers[e["source"]] < min(layers[e["target"]], n_layers - 1) for e in unloaded]
    after_last = unloaded[crosses.index(False)]  # e.g. a last-layer feature into a logit
    assert data.edge_heads(graph_id, after_last["source"], after_last["target"])["no_heads_because"] == \
        "the edge crosses no attention layer (source and target at the same layer)"
    loaded = next(e for e in data.graph(graph_id)["edges"] if e["heads"])
    assert data.edge_heads(graph_id, loaded["source"], loaded["target"])["no_heads_because"] is None
    # a crossing edge of a store that loads every kept edge lacks rows only when no layer's heads carry it
    assert data._no_heads_reason(graph_id, loaded["source"], loaded["target"], True) == \
        "in every layer it crosses, its heads carry less than attention.layer_min_share (0.05) of it: it runs " \
        "through the residual"
    # a store whose graphs loaded only the most influential edges says so for an edge that crosses attention
    info = data.store.graph_info(graph_id).copy()
    settings = json.loads(info["settings"])
    settings["attention"]["edge_influence_share"] = 0.5
    info["settings"] = json.dumps(settings)
    monkeypatch.setattr(data.store, "graph_info", lambda _: info)
    crossing = loaded  # its rows are absent only in the pretend store, so ask the reason directly
    reason = data._no_heads_reason(graph_id, crossing["source"], crossing["target"], True)
    assert "edge_influence_share" in reason and "layer_min_share (0.05)" in reason
    assert "pruning dropped" in data._no_heads_reason(graph_id, crossing["source"], crossing["target"], False)
    settings["attention"]["enabled"] = False  # a store written with attention attribution off
    info["settings"] = json.dumps(settings)
    assert "attention.enabled: false" in data._no_heads_reason(graph_id, crossing["source"], crossing["target"], True)


def test_qk_pairs_of_an_attention_edge_sum_to_its_gate_logit(data, ids):
    graph_id = ids["sparse"]
    _, loadings = edge_with_qk(data, graph_id)
    head = next(h for h in loadings["heads"] if h["qk"])
    qk = data.attention_edge(graph_id, head["layer"], head["head"], head["query_pos"], head["key_pos"])
    json.dumps(qk, allow_nan=False)
    logit = qk["gate_logit"]
    assert qk["attn_logit_softcap"] is None  # the tiny Llama has no soft-cap: the rows sum to the logit itself
    assert logit > 0  # sparse: an attention edge that carries a graph edge is open
    close = dict(rel=1e-4, abs=1e-5)
    assert sum(p["value"] for p in qk["pairs"]) + qk["pair_rest"] + qk["offset"] == pytest.approx(logit, **close)
    for side in ("query", "key"):
        marginals = qk[f"{side}_marginals"]
        assert sum(m["value"] for m in marginals) + qk[f"{side}_marginal_rest"] + qk["offset"] == pytest.approx(logit, **close)
        sizes = [abs(m["value"]) for m in marginals]
        assert sizes == sorted(sizes, reverse=True)
    labels = open_features(Path(data.graph(graph_id)["clt_dir"])).labels()
    components = [(p["query"], p["query_name"]) for p in qk["pairs"]] + [(p["key"], p["key_name"]) for p in qk["pairs"]]
    for component, name in components:
        parts = component.split("_")
        if parts[0].isdigit() and parts[1] != "-1":  # a feature: named by its dashboard label
            assert name == f"L{parts[0]}:F{parts[1]} {labels[(int(parts[0]), int(parts[1]))]}@{parts[2]}"
        elif parts[0] == "attn":
            assert name == f"L{parts[1]}H{parts[2]}@{parts[3]}"


def test_a_features_dashboard_is_its_dashboard_rows(store_dir, data, ids):
    node, dashboard = feature_with_contexts(data, ids["dense"])
    dashboards = open_features(store_dir.parent / "clt")
    row = dashboards.features().set_index(["layer", "feature"]).loc[(node["layer"], node["feature"])]
    assert dashboard["label"] == row["label"] == node["label"]
    assert dashboard["density"] == row["density"] and dashboard["promoted_tokens"] == list(row["promoted_tokens"])
    for kind in ("top", "random"):
        examples = dashboards.examples(node["layer"], node["feature"], kind).sort_values("rank")
        assert [e["tokens"] for e in dashboard[kind]] == [list(t) for t in examples["token_strings"]]
        assert [e["activation"] for e in dashboard[kind]] == pytest.approx(examples["activation"].tolist())
    with pytest.raises(NotFound, match=f"no feature {N_FEATURES} of layer 0"):
        data.feature(ids["dense"], 0, N_FEATURES)


def test_a_graph_without_a_clt_directory_has_no_dashboards_and_every_edge_stored_shows_the_kept(tmp_path):
    _, _, record = make_record(edges="all")  # its clt is "random": no directory
    store = open_store(tmp_path)
    store.write(record)
    data = ViewerData(store)
    graph = data.graph(record.graph_id)
    stored = store.load_graph(record.graph_id)
    assert not stored.edges["kept"].all()
    kept_nodes = set(stored.nodes.loc[stored.nodes["kept"], "node_index"])
    kept = stored.edges[stored.edges["kept"] & stored.edges["source"].isin(kept_nodes) & stored.edges["target"].isin(kept_nodes)]
    ids = stored.nodes.set_index("node_index")["node_id"]
    assert [(e["source"], e["target"]) for e in graph["edges"]] == list(zip(ids[kept["source"]], ids[kept["target"]]))
    assert not graph["has_dashboards"] and graph["clt_dir"] is None
    assert all(n["label"] is None for n in graph["nodes"] if n["kind"] == "feature")
    with pytest.raises(NotFound, match="records no CLT directory"):
        data.feature(record.graph_id, 0, 0)


def test_bad_requests_and_absent_things_are_refused_clearly(data, ids):
    with pytest.raises(BadRequest, match="graph id '../x' must be"):
        data.graph("../x")
    with pytest.raises(GraphNotFoundError):
        data.graph("abc123")
    with pytest.raises(NotFound, match="no node 'nope' \\(the source\\)"):
        data.edge_heads(ids["dense"], "nope", "0_0_1")


# -- over HTTP -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(store_dir):
    server = make_server(store_dir, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def get(server, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(server.url + path.lstrip("/"), timeout=60) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def test_http_endpoints_answer_json_and_errors_with_status(server, data, ids):
    status, kind, body = get(server, "/api/graphs")
    assert (status, kind) == (200, "application/json") and json.loads(body) == json.loads(json.dumps(data.graphs()))
    edge, loadings = edge_with_qk(data, ids["sparse"])
    status, _, body = get(server, f"/api/graphs/{ids['sparse']}/heads?source={quote(edge['source'])}"
                                  f"&target={quote(edge['target'])}")
    assert status == 200 and json.loads(body) == json.loads(json.dumps(loadings))
    head = next(h for h in loadings["heads"] if h["qk"])
    status, _, body = get(server, f"/api/graphs/{ids['sparse']}/qk?layer={head['layer']}&head={head['head']}"
                                  f"&query_pos={head['query_pos']}&key_pos={head['key_pos']}")
    assert status == 200 and json.loads(body)["gate_logit"] == pytest.approx(
        data.attention_edge(ids["sparse"], head["layer"], head["head"], head["query_pos"], head["key_pos"])["gate_logit"])
    node, _ = feature_with_contexts(data, ids["dense"])
    status, _, body = get(server, f"/api/graphs/{ids['dense']}/features/{node['layer']}/{node['feature']}")
    assert status == 200 and json.loads(body)["label"] == node["label"]
    status, kind, body = get(server, "/")
    assert status == 200 and kind.startswith("text/html") and b"viewer.js" in body
    for path, want, message in [
        ("/api/graphs/abc123", 404, "abc123"),
        ("/api/graphs/bad%21id", 400, "graph id 'bad!id' must be"),
        (f"/api/graphs/{ids['dense']}/qk?layer=1&head=0&query_pos=2", 400, "'key_pos' is missing"),
        (f"/api/graphs/{ids['dense']}/qk?layer=x&head=0&query_pos=2&key_pos=1", 400, "layer='x' is not an integer"),
        (f"/api/graphs/{ids['dense']}/heads?source=nope&target=0_0_1", 404, "no node 'nope'"),
        (f"/api/graphs/{ids['dense']}/features/0/x", 400, "feature 'x' is not an integer"),
        ("/api/nothing", 404, "no endpoint /api/nothing"),
        ("/etc/passwd", 404, "no page /etc/passwd"),
    ]:
        status, kind, body = get(server, path)
        assert (status, kind) == (want, "application/json"), path
        assert message in json.loads(body)["error"], path


def test_cli_options_and_a_missing_store(tmp_path):
    args = parse_args([str(tmp_path)])
    assert (args.store, args.host, args.port) == (tmp_path, "127.0.0.1", 8000)
    assert parse_args([str(tmp_path), "--host", "0.0.0.0", "--port", "0"]).port == 0
    with pytest.raises(SystemExit, match=f"store directory {tmp_path / 'none'} does not exist"):
        main([str(tmp_path / "none")])


# -- in a real browser -----------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BASH = shutil.which("bash") or "/bin/bash"
WINDOW = (1600, 900)


class Elements(HTMLParser):
    """Every element of a serialised DOM: (tag, attributes, with "in-graph": the data-graph of the SVG it is
    in), and the text inside each element with an id."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, html: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.text: dict[str, str] = {}
        self.open: list[dict] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        graphs = [a["data-graph"] for a in self.open if "data-graph" in a]
        self.elements.append((tag, {**attrs, "in-graph": graphs[-1] if graphs else None}))
        if tag not in self.VOID:
            self.open.append(attrs)
            if attrs.get("id"):
                self.text.setdefault(attrs["id"], "")

    def handle_endtag(self, tag):
        if tag not in self.VOID and self.open:
            self.open.pop()

    def handle_data(self, data):
        for element in self.open:
            if element.get("id"):
                self.text[element["id"]] += data

    def having(self, attribute: str, value: str | None = None) -> list[dict]:
        return [a for _, a in self.elements if attribute in a and (value is None or a[attribute] == value)]

    def classed(self, tag: str, name: str) -> list[dict]:
        return [a for t, a in self.elements if t == tag and name in (a.get("class") or "").split()]


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: it reads
    commands from fd 3 and answers on fd 4, each message JSON ended by a NUL byte): load a page, wait for
    it, click at a point with real mouse events, read the DOM, take a screenshot."""

    def __init__(self, profile: Path):
        commands, self._commands = os.pipe()
        self._replies, replies = os.pipe()
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands, replies)]  # clear of fds 3 and 4
        os.close(commands)
        os.close(replies)
        commands, replies = moved
        flags = ["--headless", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}", "--remote-debugging-pipe"]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        # bash (dash takes one-digit fds only) puts the browser's pipe ends on fds 3 and 4 and execs Chromium
        wiring = f'exec "$0" "$@" 3<&{commands} 4>&{replies} {commands}<&- {replies}>&-'
        self.log = profile.parent / "chromium.log"
        self.process = subprocess.Popen([BASH, "-c", wiring, CHROMIUM, *flags, "about:blank"],
                                        pass_fds=(commands, replies), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=self.log.open("w"))
        os.close(commands)
        os.close(replies)
        self._buffer, self._last_id = b"", 0
        page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", {"width": WINDOW[0], "height": WINDOW[1],
                                                         "deviceScaleFactor": 1, "mobile": False}, self.session)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 120) -> dict:
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                ready, _, _ = select.select([self._replies], [], [], max(0.0, deadline - time.monotonic()))
                chunk = os.read(self._replies, 1 << 20) if ready else b""
                if not chunk:
                    raise AssertionError(f"Chromium gave no answer to {method}: {self.log.read_text()[-2000:]}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._last_id:  # events and other sessions' messages are skipped
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, self.session)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}: " + str(self.evaluate(
                "document.getElementById('message')?.textContent"))
            time.sleep(0.05)

    def load(self, url: str) -> None:
        self.send("Page.navigate", {"url": url}, self.session)
        # without a fragment the page adds its default view's; a new fragment alone renders in place
        same = f"location.href === {json.dumps(url)}" if "#" in url else \
            f"location.href.split('#')[0] === {json.dumps(url)}"
        self.wait_for(f"{same} && document.body?.dataset.status === 'ready' && document.body.dataset.view === location.hash")

    def click(self, point: dict) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": point["x"], "y": point["y"], "button": "left",
                                                   "clickCount": 1}, self.session)

    def click_and_wait(self, point: dict, fragment_has: str) -> Elements:
        """Click, wait until the fragment holds `fragment_has` and the page has rendered it; the DOM then."""
        self.click(point)
        self.wait_for(f"decodeURIComponent(location.hash).includes({json.dumps(fragment_has)}) "
                      "&& document.body.dataset.status === 'ready' && document.body.dataset.view === location.hash")
        return self.dom()

    def dom(self) -> Elements:
        return Elements(self.evaluate("document.documentElement.outerHTML"))

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"}, self.session)["data"]))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=30)
            self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            os.close(self._commands)
            os.close(self._replies)


# Where to click an element so that it gets the click: a point of it that no other element covers.
EDGE_POINT = """(({ GRAPH, CANDIDATES }) => {  // the first of CANDIDATES ([source, target] pairs) with an uncovered point
  const svg = [...document.querySelectorAll("svg[data-graph]")].find((s) => s.dataset.graph === GRAPH);
  for (const [source, target] of CANDIDATES) {
    const group = [...svg.querySelectorAll("g.edge")].find((g) => g.dataset.source === source && g.dataset.target === target);
    const line = group.querySelector("line.hit"), m = line.getScreenCTM();
    const [x1, y1, x2, y2] = ["x1", "y1", "x2", "y2"].map((a) => line[a].baseVal.value);
    for (let i = 1; i < 40; i++) {
      const p = new DOMPoint(x1 + (x2 - x1) * i / 40, y1 + (y2 - y1) * i / 40).matrixTransform(m);
      if (document.elementFromPoint(p.x, p.y)?.closest("g.edge") === group) return { x: p.x, y: p.y, source, target };
    }
  }
  return null;
})"""
NODE_POINT = """(({ GRAPH, NODE }) => {
  const svg = [...document.querySelectorAll("svg[data-graph]")].find((s) => s.dataset.graph === GRAPH);
  const group = [...svg.querySelectorAll("g.node")].find((g) => g.dataset.node === NODE);
  const box = group.firstElementChild.getBoundingClientRect(), p = { x: box.x + box.width / 2, y: box.y + box.height / 2 };
  return document.elementFromPoint(p.x, p.y)?.closest("g.node") === group ? p : null;
})"""
ROW_POINT = """(({ ATTRIBUTE, VALUE }) => {  // a table row of the details panel, scrolled into view
  const row = [...document.querySelectorAll(`tr[${ATTRIBUTE}]`)].find((r) => r.getAttribute(ATTRIBUTE) === VALUE);
  row.scrollIntoView({ block: "center" });
  const box = row.getBoundingClientRect();
  return { x: box.x + 8, y: box.y + box.height / 2 };
})"""


def point(browser: Browser, script: str, **names) -> dict:
    found = browser.evaluate(f"({script})({json.dumps(names)})")
    assert found is not None, f"no point of {names} is uncovered on the page"
    return found


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium, or `make browser`)")
    browser = Browser(tmp_path / "profile")
    yield browser
    browser.close()


def test_the_page_in_headless_chromium(browser, store_dir, server, data, ids, tmp_path):
    graphs = {variant: data.graph(graph_id) for variant, graph_id in ids.items()}

    browser.load(server.url)  # the default view: the first prompt's dense and sparse graphs side by side
    dom = browser.dom()
    assert [p["data-variant"] for p in dom.classed("section", "pane")] == ["dense", "sparse"]
    for variant, graph in graphs.items():
        nodes = [n for n in dom.classed("g", "node") if n["in-graph"] == ids[variant]]
        assert sorted(n["data-node"] for n in nodes) == sorted(n["node_id"] for n in graph["nodes"])
        edges = [e for e in dom.classed("g", "edge") if e["in-graph"] == ids[variant]]
        assert [(e["data-source"], e["data-target"]) for e in reversed(edges)] == \
            [(e["source"], e["target"]) for e in graph["edges"][:1000]]  # drawn smallest first
    labelled = {n["label"] for g in graphs.values() for n in g["nodes"] if n["kind"] == "feature" and n["label"]}
    assert labelled and any(text[:15] in dom.text["panes"] for text in labelled)

    # click an edge of the sparse pane: its heads, and the QK pairs of its largest QK-attributed head
    stored = open_store(store_dir).load_graph(ids["sparse"])
    attributed_edges = set(stored.qk_pairs[ATTENTION_EDGE].itertuples(index=False, name=None))
    loaded = stored.head_loadings
    loaded = loaded[[key in attributed_edges for key in loaded[ATTENTION_EDGE].itertuples(index=False, name=None)]]
    node_ids = stored.nodes.set_index("node_index")["node_id"]
    qk_heads = Counter(zip(node_ids[loaded["source"]], node_ids[loaded["target"]]))
    candidates = [(e["source"], e["target"]) for e in graphs["sparse"]["edges"][:1000]
                  if qk_heads[(e["source"], e["target"])] >= 2]  # edges with two heads to click
    at = point(browser, EDGE_POINT, GRAPH=ids["sparse"], CANDIDATES=candidates)
    loadings = data.edge_heads(ids["sparse"], at["source"], at["target"])
    edge = next(e for e in graphs["sparse"]["edges"] if (e["source"], e["target"]) == (at["source"], at["target"]))
    dom = browser.click_and_wait(at, f"pane=1&edge={edge['source']},{edge['target']}")
    selected = dom.classed("g", "selected")
    assert [(s["data-source"], s["data-target"], s["in-graph"]) for s in selected] == \
        [(edge["source"], edge["target"], ids["sparse"])]
    assert [row["data-head"] for row in dom.having("data-head")] == [h["name"] for h in loadings["heads"]]
    assert all(h["name"] in dom.text["heads"] for h in loadings["heads"])
    attributed = sorted((h for h in loadings["heads"] if h["qk"]), key=lambda h: -abs(h["weight"]))

    def shows_qk(dom: Elements, head: dict) -> None:
        qk = data.attention_edge(ids["sparse"], head["layer"], head["head"], head["query_pos"], head["key_pos"])
        assert dom.having("data-attn")[0]["data-attn"] == "{layer}.{head}.{query_pos}.{key_pos}".format(**head)
        assert [row["data-pair"] for row in dom.having("data-pair")] == [f"{p['query']}|{p['key']}" for p in qk["pairs"]]
        assert len(dom.having("data-marginal")) == len(qk["query_marginals"]) + len(qk["key_marginals"])
        assert qk["pairs"][0]["query_name"] in dom.text["qk"] and qk["pairs"][0]["key_name"] in dom.text["qk"]

    shows_qk(dom, attributed[0])
    screenshot = tmp_path / "edge.png"
    browser.screenshot(screenshot)
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == WINDOW

    # click another QK-attributed head of the edge: its QK pairs
    other = attributed[1]
    dom = browser.click_and_wait(point(browser, ROW_POINT, ATTRIBUTE="data-head", VALUE=other["name"]),
                                 "attn={layer}.{head}.{query_pos}.{key_pos}".format(**other))
    shows_qk(dom, other)

    # click a feature of the dense pane: its dashboard
    node, dashboard = feature_with_contexts(data, ids["dense"])
    dom = browser.click_and_wait(point(browser, NODE_POINT, GRAPH=ids["dense"], NODE=node["node_id"]),
                                 f"node={node['node_id']}")
    assert [(n["data-node"], n["in-graph"]) for n in dom.classed("g", "selected")] == [(node["node_id"], ids["dense"])]
    shown = dom.having("id", "dashboard")[0]
    assert (int(shown["data-layer"]), int(shown["data-feature"])) == (node["layer"], node["feature"])
    assert dashboard["label"] in dom.text["dashboard"]
    assert len(dom.having("data-context", "top")) == len(dashboard["top"]) > 0
    assert len(dom.having("data-context", "random")) == len(dashboard["random"])
    assert "".join(dashboard["top"][0]["tokens"]).replace("\n", "⏎") in dom.text["dashboard"]

    # the node's largest incoming edge, from its list in the panel
    incoming = [e for e in graphs["dense"]["edges"] if e["target"] == node["node_id"]]
    assert [r["data-edge"] for r in dom.having("data-edge")] == \
        [f"{e['source']},{e['target']}" for e in incoming[:8]] + \
        [f"{e['source']},{e['target']}" for e in graphs["dense"]["edges"] if e["source"] == node["node_id"]][:8]
    first = f"{incoming[0]['source']},{incoming[0]['target']}"
    dom = browser.click_and_wait(point(browser, ROW_POINT, ATTRIBUTE="data-edge", VALUE=first), f"edge={first}")
    assert [(s["data-source"], s["data-target"], s["in-graph"]) for s in dom.classed("g", "selected")] == \
        [(incoming[0]["source"], incoming[0]["target"], ids["dense"])]
    assert dom.having("data-head")

    # a link with fewer edges drawn
    assert len(graphs["dense"]["edges"]) > 300
    browser.load(server.url + f"#graphs={ids['dense']},{ids['sparse']}&edges=300")
    dom = browser.dom()
    for variant, graph in graphs.items():
        edges = [e for e in dom.classed("g", "edge") if e["in-graph"] == ids[variant]]
        assert [(e["data-source"], e["data-target"]) for e in reversed(edges)] == \
            [(e["source"], e["target"]) for e in graph["edges"][:300]]
