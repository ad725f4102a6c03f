"""The graph viewer on a store of a tiny model's dense and sparse graphs with real feature dashboards: the
JSON endpoints checked exactly against the store (no browser), errors and the CLI, then the page itself
in headless Chromium (node and edge elements, the heads of a selected edge, the QK pairs of its attention
edge, a feature's dashboard, a screenshot)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import threading
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest
import torch

from attribution.config import AttentionAttributionConfig, AttributionStageConfig, GraphConfig
from attribution.stage import run
from attribution.store import GraphNotFoundError, open_store
from sparse_attention.config import ModelSpec
from sparse_attention.gated_attention import GatedModel
from sparse_attention.models import tiny_model
from tests.test_attribution import N_FEATURES, TINY, random_clt
from tests.test_attribution_store import make_record
from transcoders.clt import load_clt, save_clt
from transcoders.config import FeaturesConfig
from transcoders.dashboards import build_dashboards
from transcoders.features import open_features
from viewer.__main__ import main, parse_args
from viewer.data import BadRequest, NotFound, ViewerData
from viewer.server import make_server

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = TINY.model_copy(update={"max_position_embeddings": 24})
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
    model, tokenizer = tiny_model(SMALL)
    gated = GatedModel(model, offset_init=0.0)
    with torch.no_grad():
        gated.offsets.copy_(torch.linspace(-0.3, 0.3, gated.offsets.numel()).view_as(gated.offsets))
    gated.save(root / "sparse", tokenizer)
    clt_dir = root / "clt"
    save_clt(random_clt(SMALL.n_layers, SMALL.d_model, N_FEATURES, seed=0), clt_dir)
    model, tokenizer = tiny_model(SMALL)
    build_dashboards(model, load_clt(clt_dir), tokenizer, scan_blocks(tokenizer, 24),
                     FeaturesConfig(top_k=3, n_random=2, window=8, batch_size=4), clt_dir, progress=False)
    config = AttributionStageConfig(graph=GraphConfig(), attention=AttentionAttributionConfig(max_attention_edges=200))
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
    """The largest edge of a graph that has a head row with a QK attribution, and its head loadings."""
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


def test_qk_pairs_of_an_attention_edge_sum_to_its_gate_logit(data, ids):
    graph_id = ids["sparse"]
    _, loadings = edge_with_qk(data, graph_id)
    head = next(h for h in loadings["heads"] if h["qk"])
    qk = data.attention_edge(graph_id, head["layer"], head["head"], head["query_pos"], head["key_pos"])
    json.dumps(qk, allow_nan=False)
    logit = qk["gate_logit"]
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


def test_a_graph_without_a_clt_directory_has_no_dashboards(tmp_path):
    _, _, record = make_record()  # its clt is "random": no directory
    store = open_store(tmp_path)
    store.write(record)
    data = ViewerData(store)
    graph = data.graph(record.graph_id)
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


def chromium(url: str, profile: Path, *args: str) -> str:
    """Run headless Chromium on `url` until the page is idle (virtual time: fetches finish first)."""
    command = [CHROMIUM, "--headless", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
               "--virtual-time-budget=30000", f"--window-size={WINDOW[0]},{WINDOW[1]}", *args, url]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def page(server, fragment: str, profile: Path) -> Elements:
    dom = Elements(chromium(server.url + fragment, profile, "--dump-dom"))
    assert dom.having("data-status", "ready"), dom.text.get("message")
    return dom


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium, or `make browser`)")
def test_the_page_in_headless_chromium(server, data, ids, tmp_path):
    graphs = {variant: data.graph(graph_id) for variant, graph_id in ids.items()}
    profile = tmp_path / "profile"

    dom = page(server, "", profile)  # the default view: the first prompt's dense and sparse graphs side by side
    panes = dom.classed("section", "pane")
    assert [p["data-variant"] for p in panes] == ["dense", "sparse"]
    for variant, graph in graphs.items():
        nodes = [n for n in dom.classed("g", "node") if n["in-graph"] == ids[variant]]
        assert sorted(n["data-node"] for n in nodes) == sorted(n["node_id"] for n in graph["nodes"])
        edges = [e for e in dom.classed("g", "edge") if e["in-graph"] == ids[variant]]
        assert sorted((e["data-source"], e["data-target"]) for e in edges) == \
            sorted((e["source"], e["target"]) for e in graph["edges"][:1000])
    labelled = {n["label"] for g in graphs.values() for n in g["nodes"] if n["kind"] == "feature" and n["label"]}
    assert labelled and any(text for text in labelled if text[:15] in dom.text["panes"])

    edge, loadings = edge_with_qk(data, ids["sparse"])  # an edge of the sparse pane (pane 1), selected
    head = max((h for h in loadings["heads"] if h["qk"]), key=lambda h: abs(h["weight"]))
    qk = data.attention_edge(ids["sparse"], head["layer"], head["head"], head["query_pos"], head["key_pos"])
    fragment = f"#graphs={ids['dense']},{ids['sparse']}&pane=1&edge={quote(edge['source'])},{quote(edge['target'])}"
    dom = page(server, fragment, profile)
    selected = dom.classed("g", "selected")
    assert [(s["data-source"], s["data-target"]) for s in selected] == [(edge["source"], edge["target"])]
    assert [row["data-head"] for row in dom.having("data-head")] == [h["name"] for h in loadings["heads"]]
    assert all(h["name"] in dom.text["heads"] for h in loadings["heads"])
    assert dom.having("data-attn")[0]["data-attn"] == f"{head['layer']}.{head['head']}.{head['query_pos']}.{head['key_pos']}"
    assert [row["data-pair"] for row in dom.having("data-pair")] == [f"{p['query']}|{p['key']}" for p in qk["pairs"]]
    assert len(dom.having("data-marginal")) == len(qk["query_marginals"]) + len(qk["key_marginals"])
    assert qk["pairs"][0]["query_name"] in dom.text["qk"] and qk["pairs"][0]["key_name"] in dom.text["qk"]

    node, dashboard = feature_with_contexts(data, ids["dense"])  # a feature of the dense pane, selected
    dom = page(server, f"#graphs={ids['dense']},{ids['sparse']}&node={quote(node['node_id'])}&edges=300", profile)
    assert len(graphs["dense"]["edges"]) > 300  # so the limit shows: the 300 largest kept edges of each graph
    for variant, graph in graphs.items():
        edges = [e for e in dom.classed("g", "edge") if e["in-graph"] == ids[variant]]
        assert [(e["data-source"], e["data-target"]) for e in reversed(edges)] == \
            [(e["source"], e["target"]) for e in graph["edges"][:300]]  # drawn smallest first
    assert [n["data-node"] for n in dom.classed("g", "selected")] == [node["node_id"]]
    shown = dom.having("id", "dashboard")[0]
    assert (int(shown["data-layer"]), int(shown["data-feature"])) == (node["layer"], node["feature"])
    assert dashboard["label"] in dom.text["dashboard"]
    assert len(dom.having("data-context", "top")) == len(dashboard["top"]) > 0
    assert len(dom.having("data-context", "random")) == len(dashboard["random"])
    assert "".join(dashboard["top"][0]["tokens"]).replace("\n", "⏎") in dom.text["dashboard"]

    screenshot = tmp_path / "edge.png"
    chromium(server.url + fragment, profile, f"--screenshot={screenshot}")
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == WINDOW
    assert len(png) > 20_000  # a drawn page, not a blank one (a blank 1600x900 PNG is a few kB)
