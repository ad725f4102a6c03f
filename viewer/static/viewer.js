// The attribution graph viewer: plain JavaScript and SVG, data from the JSON endpoints (viewer/server.py).
// What is shown lives in the URL fragment, so every view is a link and a reload shows it again:
//   #graphs=ID[,ID...]   graphs drawn side by side (one prompt's variants by default)
//   &pane=I              the graph the selection belongs to (index into graphs)
//   &node=NODE_ID        a selected node (a feature shows its dashboard)
//   &edge=SOURCE,TARGET  a selected edge (shows its head loadings)
//   &attn=L.H.Q.K        a selected attention edge (shows its QK pairs; default: the edge's largest one)
//   &edges=N             the largest N kept edges drawn per graph
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const DEFAULT_MAX_EDGES = 1000;
const ROW_HEIGHT = 80;
const MARGIN = { left: 46, right: 12, top: 18, bottom: 46 };
const NODE_STEP = 14; // px between nodes of one (layer, position) cell
const LINE_STEP = 14; // px between the lines of a crowded cell
const MAX_LINES = 4, MIN_PER_LINE = 6;
const KIND_FILL = { feature: "#8fb8de", error: "#bbbbbb", token: "#9ad19a", logit: "#f2b880" };

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

const responses = new Map(); // url -> Promise of its JSON
function getJSON(url) {
  if (!responses.has(url)) {
    responses.set(url, fetch(url).then(async (response) => {
      const body = await response.json();
      if (!response.ok) throw new ApiError(response.status, body.error || response.statusText);
      return body;
    }));
  }
  return responses.get(url);
}

function graphUrl(graphId, rest = "") { return `api/graphs/${encodeURIComponent(graphId)}${rest}`; }

// -- DOM helpers -----------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) continue;
    if (name === "onclick") node.addEventListener("click", value);
    else if (name === "className") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function fmt(value) {
  if (value === null || value === undefined) return "-";
  if (Number.isInteger(value)) return String(value);
  return Math.abs(value) >= 100 ? value.toFixed(0) : value.toPrecision(3);
}

function shorten(text, length) { return text.length > length ? text.slice(0, length - 1) + "…" : text; }
function visible(token) { return token.replace(/\n/g, "⏎").replace(/\t/g, "⇥"); }

function table(headers, rows) {
  return el("table", {},
    el("thead", {}, el("tr", {}, headers.map(([text, cls]) => el("th", { className: cls }, text)))),
    el("tbody", {}, rows));
}

// -- state in the URL fragment ---------------------------------------------------------------------
function readState() {
  const params = new URLSearchParams(location.hash.slice(1));
  return {
    graphs: (params.get("graphs") || "").split(",").filter(Boolean),
    pane: Number(params.get("pane") || 0),
    node: params.get("node"),
    edge: params.get("edge"),
    attn: params.get("attn"),
    maxEdges: Number(params.get("edges")) || DEFAULT_MAX_EDGES,
  };
}

function fragment(state) {
  const params = new URLSearchParams();
  params.set("graphs", state.graphs.join(","));
  if (state.pane) params.set("pane", state.pane);
  for (const key of ["node", "edge", "attn"]) if (state[key]) params.set(key, state[key]);
  if (state.maxEdges !== DEFAULT_MAX_EDGES) params.set("edges", state.maxEdges);
  return "#" + params.toString();
}

// A new view: the selection is replaced by `update` (a hashchange then renders it).
function go(update) {
  location.hash = fragment({ ...readState(), node: null, edge: null, attn: null, ...update });
}

// -- the graph list and the prompt picker ----------------------------------------------------------
let graphList = [];

function graphsOfPrompt(prompt) { return graphList.filter((g) => g.prompt === prompt); }

function defaultGraphs(prompt) { // the first graph of each variant
  const seen = new Map();
  for (const g of graphsOfPrompt(prompt)) if (!seen.has(g.variant)) seen.set(g.variant, g.graph_id);
  return [...seen.values()];
}

function fillPicker(state) {
  const picker = document.getElementById("prompt");
  const prompts = [...new Set(graphList.map((g) => g.prompt))];
  const current = graphList.find((g) => g.graph_id === state.graphs[0]);
  picker.replaceChildren(...prompts.map((prompt) => {
    const first = graphsOfPrompt(prompt)[0];
    const variants = [...new Set(graphsOfPrompt(prompt).map((g) => g.variant))].join(", ");
    return el("option", { value: prompt }, `${shorten(prompt, 60)} [${first.task}; ${variants}]`);
  }));
  if (current) picker.value = current.prompt;
  picker.onchange = () => go({ graphs: defaultGraphs(picker.value), pane: 0 });
  const maxEdges = document.getElementById("max-edges");
  maxEdges.value = state.maxEdges;
  maxEdges.onchange = () => {
    const state = readState();
    location.hash = fragment({ ...state, maxEdges: Math.max(1, Number(maxEdges.value) || DEFAULT_MAX_EDGES) });
  };
}

// -- drawing one graph -----------------------------------------------------------------------------
function layout(graph) {
  // x: token position, y: layer (tokens at the bottom, logits at the top). A cell's nodes sit side by side,
  // in up to MAX_LINES lines of at least MIN_PER_LINE (so a crowded cell widens its column less).
  const cells = new Map();
  for (const node of graph.nodes) {
    const key = `${node.layer}|${node.pos}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(node);
  }
  const perLine = (n) => Math.max(MIN_PER_LINE, Math.ceil(n / MAX_LINES));
  const widest = new Array(graph.n_pos).fill(1);
  for (const nodes of cells.values()) {
    widest[nodes[0].pos] = Math.max(widest[nodes[0].pos], Math.min(nodes.length, perLine(nodes.length)));
  }
  const columnWidth = widest.map((n) => Math.max(44, n * NODE_STEP + 12));
  const columnStart = [];
  let x = MARGIN.left;
  for (const width of columnWidth) { columnStart.push(x); x += width; }
  const rows = graph.n_layers + 2; // tokens (layer -1), layers 0..n_layers - 1, logits (layer n_layers + 1)
  const rowY = (layer) => MARGIN.top + (rows - 1 - Math.min(layer + 1, rows - 1)) * ROW_HEIGHT;
  const place = new Map();
  for (const nodes of cells.values()) {
    nodes.sort((a, b) => a.node_index - b.node_index);
    const { pos, layer } = nodes[0];
    const width = perLine(nodes.length), lines = Math.ceil(nodes.length / width);
    nodes.forEach((node, i) => {
      const line = Math.floor(i / width), inLine = Math.min(width, nodes.length - line * width);
      place.set(node.node_id, {
        x: columnStart[pos] + columnWidth[pos] / 2 + (i % width - (inLine - 1) / 2) * NODE_STEP,
        y: rowY(layer) - ((lines - 1) / 2 - line) * LINE_STEP, crowded: nodes.length > 2,
      });
    });
  }
  return { place, columnStart, columnWidth, rowY, width: x + MARGIN.right, height: MARGIN.top + (rows - 1) * ROW_HEIGHT + MARGIN.bottom };
}

function nodeShape(node) {
  const fill = KIND_FILL[node.kind];
  if (node.kind === "feature") return svg("circle", { r: 5, fill, stroke: "#345" });
  if (node.kind === "error") return svg("rect", { x: -4, y: -4, width: 8, height: 8, fill, stroke: "#555" });
  return svg("rect", { x: -6, y: -5, width: 12, height: 10, rx: 2, fill, stroke: "#555" });
}

function nodeTitle(node) {
  const lines = [node.node_id, `${node.kind}, layer ${node.layer}, position ${node.pos}`];
  if (node.label) lines.push(node.label);
  if (node.activation !== null) lines.push(`activation ${fmt(node.activation)}`);
  if (node.influence !== null) lines.push(`influence ${fmt(node.influence)}`);
  return lines.join("\n");
}

function drawGraph(graph, paneIndex, maxEdges) {
  const { place, columnStart, columnWidth, rowY, width, height } = layout(graph);
  // Drawn at its natural size, shrunk by CSS to fit its pane (panes share the row side by side).
  const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, "data-graph": graph.graph_id });
  const axes = svg("g", { class: "axes" });
  for (let layer = -1; layer <= graph.n_layers + 1; layer++) {
    if (layer === graph.n_layers) continue;
    const name = layer === -1 ? "emb" : layer === graph.n_layers + 1 ? "logit" : `L${layer}`;
    axes.append(svg("text", { x: 4, y: rowY(layer) + 4, class: "axis" }, name));
  }
  graph.token_strings.forEach((token, pos) => {
    const x = columnStart[pos] + columnWidth[pos] / 2;
    axes.append(svg("text", { x, y: height - MARGIN.bottom + 26, "text-anchor": "middle", class: "axis" },
      svg("title", {}, `position ${pos}: ${JSON.stringify(token)}`), shorten(visible(token), 10)));
  });
  root.append(axes);

  const edges = graph.edges.slice(0, maxEdges);
  const largest = Math.max(1e-12, ...edges.map((e) => Math.abs(e.weight)));
  const edgeLayer = svg("g", { class: "edges" });
  for (const edge of [...edges].reverse()) { // the largest drawn last, on top
    const from = place.get(edge.source), to = place.get(edge.target);
    const ends = { x1: from.x, y1: from.y, x2: to.x, y2: to.y };
    const color = edge.weight >= 0 ? "#2b6cb0" : "#c53030";
    const group = svg("g", { class: "edge", "data-source": edge.source, "data-target": edge.target,
      "data-weight": edge.weight },
      svg("title", {}, `${edge.source} → ${edge.target}: ${fmt(edge.weight)}${edge.heads ? `, ${edge.heads} head(s)` : ""}`),
      svg("line", { ...ends, class: "visible", stroke: color, "stroke-opacity": 0.5,
        "stroke-width": (0.6 + 3.4 * Math.abs(edge.weight) / largest).toFixed(2) }),
      svg("line", { ...ends, class: "hit" }));
    group.addEventListener("click", () => go({ pane: paneIndex, edge: `${edge.source},${edge.target}` }));
    edgeLayer.append(group);
  }
  root.append(edgeLayer);

  const nodeLayer = svg("g", { class: "nodes" });
  for (const node of graph.nodes) {
    const at = place.get(node.node_id);
    const group = svg("g", { class: "node", "data-node": node.node_id, "data-kind": node.kind,
      transform: `translate(${at.x.toFixed(1)},${at.y.toFixed(1)})` }, nodeShape(node), svg("title", {}, nodeTitle(node)));
    if (node.kind === "feature" && node.label && !at.crowded) {
      group.append(svg("text", { y: 15, "text-anchor": "middle", class: "node-label" }, shorten(node.label, 16)));
    }
    group.addEventListener("click", () => go({ pane: paneIndex, node: node.node_id }));
    nodeLayer.append(group);
  }
  root.append(nodeLayer);
  return root;
}

function drawPanes(graphs, state) {
  const panes = graphs.map((graph, index) => {
    const choices = graphsOfPrompt(graph.prompt);
    const picker = el("select", { "aria-label": "graph" }, choices.map((g) =>
      el("option", { value: g.graph_id }, `${g.variant} · ${g.graph_id.slice(0, 12)}`)));
    picker.value = graph.graph_id;
    picker.onchange = () => {
      const chosen = [...readState().graphs];
      chosen[index] = picker.value;
      go({ graphs: chosen, pane: index });
    };
    const drawn = Math.min(graph.edges.length, state.maxEdges);
    return el("section", { className: "pane", "data-pane": index, "data-variant": graph.variant },
      el("h2", {}, `${graph.variant}: `, picker),
      el("div", { className: "summary" },
        `replacement ${fmt(graph.pruned_replacement_score)} · completeness ${fmt(graph.pruned_completeness_score)} · `
        + `${graph.nodes.length} nodes · ${drawn} of ${graph.edges.length} kept edges drawn`),
      drawGraph(graph, index, state.maxEdges));
  });
  document.getElementById("panes").replaceChildren(...panes);
}

function highlight(state) {
  for (const marked of document.querySelectorAll("#panes .selected, #panes .endpoint, #panes .active")) {
    marked.classList.remove("selected", "endpoint", "active");
  }
  const pane = document.querySelector(`#panes .pane[data-pane="${state.pane}"]`);
  if (!pane) return;
  pane.classList.add("active");
  const byNode = (id) => [...pane.querySelectorAll("g.node")].find((g) => g.dataset.node === id);
  if (state.node) byNode(state.node)?.classList.add("selected");
  if (state.edge) {
    const [source, target] = state.edge.split(",");
    const edge = [...pane.querySelectorAll("g.edge")].find((g) => g.dataset.source === source && g.dataset.target === target);
    edge?.classList.add("selected");
    edge?.parentNode.append(edge); // on top
    byNode(source)?.classList.add("endpoint");
    byNode(target)?.classList.add("endpoint");
  }
}

// -- the details panel -----------------------------------------------------------------------------
function nodeName(graph, id) {
  const node = graph.nodes.find((n) => n.node_id === id);
  if (!node) return id;
  if (node.kind === "feature") return `L${node.layer}:F${node.feature}@${node.pos}${node.label ? " " + node.label : ""}`;
  if (node.kind === "token") return `${JSON.stringify(node.label)}@${node.pos}`;
  if (node.kind === "logit") return `logit ${node.label}`;
  return `err L${node.layer}@${node.pos}`;
}

function problem(err) {
  return el("p", { className: err instanceof ApiError && err.status === 404 ? "note" : "error" }, err.message);
}

async function nodeDetails(graph, state) {
  const node = graph.nodes.find((n) => n.node_id === state.node);
  if (!node) return [problem(new ApiError(404, `graph ${graph.graph_id} has no kept node ${state.node}`))];
  const rows = [["id", node.node_id], ["kind", node.kind], ["layer", node.layer], ["position", node.pos],
    [node.kind === "feature" ? "feature" : "token id", node.feature], ["label", node.label],
    ["activation", fmt(node.activation)], ["influence", fmt(node.influence)]];
  const parts = [el("h3", {}, nodeName(graph, node.node_id)),
    table([["", ""], ["", ""]], rows.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v ?? "-"))))];
  parts.push(nodeEdges(graph, state, "in", graph.edges.filter((e) => e.target === node.node_id), (e) => e.source),
    nodeEdges(graph, state, "out", graph.edges.filter((e) => e.source === node.node_id), (e) => e.target));
  if (node.kind !== "feature") return parts;
  if (!graph.has_dashboards) {
    parts.push(el("p", { className: "note", id: "dashboard" }, graph.clt_dir
      ? `The CLT directory ${graph.clt_dir} has no feature dashboards (the pipeline's features stage writes them).`
      : "This graph records no CLT directory, so it has no feature dashboards."));
    return parts;
  }
  try {
    parts.push(dashboard(await getJSON(graphUrl(graph.graph_id, `/features/${node.layer}/${node.feature}`))));
  } catch (err) {
    parts.push(el("div", { id: "dashboard" }, problem(err)));
  }
  return parts;
}

const NODE_EDGES_LISTED = 8;

// The node's largest kept edges in or out, each a link to that edge (crowded drawings are hard to click).
function nodeEdges(graph, state, direction, edges, other) {
  const rows = edges.slice(0, NODE_EDGES_LISTED).map((e) => el("tr", {
    className: "selectable", "data-edge": `${e.source},${e.target}`,
    onclick: () => go({ pane: state.pane, edge: `${e.source},${e.target}` }),
  }, el("td", {}, nodeName(graph, other(e))), el("td", { className: "num" }, fmt(e.weight))));
  const more = edges.length > NODE_EDGES_LISTED ? ` (largest ${NODE_EDGES_LISTED} of ${edges.length})` : "";
  return el("div", { className: `edges-${direction}` },
    el("h3", {}, `Edges ${direction}${more}`),
    rows.length ? table([[direction === "in" ? "from" : "to"], ["weight", "num"]], rows)
      : el("p", { className: "note" }, "none kept"));
}

function contexts(kind, examples) {
  const largest = Math.max(1e-12, ...examples.flatMap((e) => e.activations.map(Math.abs)));
  return examples.map((example) => el("div", { className: "context", "data-context": kind, "data-rank": example.rank },
    el("span", { className: "note" }, `${fmt(example.activation)}  `),
    example.tokens.map((token, i) => el("span", {
      className: i === example.window_index ? "peak" : null,
      title: `activation ${fmt(example.activations[i])}`,
      style: `background: rgba(255, 140, 0, ${(Math.abs(example.activations[i] || 0) / largest).toFixed(3)})`,
    }, visible(token)))));
}

function dashboard(feature) {
  const tokens = (name, list) => el("div", {}, `${name}: `, el("span", { className: "tokens" },
    list.map((t) => JSON.stringify(t)).join(" ")));
  return el("div", { id: "dashboard", "data-layer": feature.layer, "data-feature": feature.feature },
    el("h3", {}, `Dashboard L${feature.layer}:F${feature.feature}: ${feature.label}`),
    el("div", { className: "note" }, `density ${fmt(feature.density)} · active on ${feature.n_active} tokens · `
      + `mean ${fmt(feature.mean_activation)} · max ${fmt(feature.max_activation)} · label ${feature.label_source}`),
    tokens("reads", feature.input_tokens), tokens("promotes", feature.promoted_tokens),
    tokens("suppresses", feature.suppressed_tokens),
    el("h3", {}, `Top contexts (${feature.top.length})`),
    feature.top.length ? contexts("top", feature.top) : el("p", { className: "note" }, "never active in the scan"),
    el("h3", {}, `Random contexts (${feature.random.length})`), contexts("random", feature.random));
}

async function edgeDetails(graph, state) {
  const [source, target] = state.edge.split(",");
  const loadings = await getJSON(graphUrl(graph.graph_id,
    `/heads?source=${encodeURIComponent(source)}&target=${encodeURIComponent(target)}`));
  const parts = [el("h3", {}, `${nodeName(graph, source)} → ${nodeName(graph, target)}`),
    el("div", {}, `weight ${fmt(loadings.weight)}`)];
  const attributed = loadings.heads.filter((h) => h.qk);
  let attn = state.attn;
  if (!attn && attributed.length) {
    const top = attributed.reduce((a, b) => (Math.abs(b.weight) > Math.abs(a.weight) ? b : a));
    attn = [top.layer, top.head, top.query_pos, top.key_pos].join(".");
  }
  const rows = loadings.heads.map((h) => {
    const key = [h.layer, h.head, h.query_pos, h.key_pos].join(".");
    return el("tr", {
      className: [h.qk ? "selectable" : "", key === attn && h.qk ? "selected" : ""].join(" ").trim() || null,
      "data-head": h.name, "data-weight": h.weight,
      onclick: h.qk ? () => go({ pane: state.pane, edge: state.edge, attn: key }) : null,
    }, el("td", {}, h.name), el("td", { className: "num" }, fmt(h.weight)),
    el("td", { className: "num" }, fmt(h.weight / loadings.weight)),
    el("td", {}, h.head >= 0 ? `${h.query_pos}→${h.key_pos}` : ""), el("td", { className: "num" }, fmt(h.pair_share)),
    el("td", {}, h.qk ? "QK" : ""));
  });
  parts.push(el("div", { id: "heads" }, el("h3", {}, "Heads carrying the edge"),
    rows.length ? table([["head"], ["part", "num"], ["share", "num"], ["query→key"], ["pair share", "num"], [""]], rows)
      : el("p", { className: "note" }, `No head loadings are stored for this edge: ${loadings.no_heads_because}.`),
    el("p", { className: "note" }, "Per layer, heads' parts + other heads + skip = the edge weight; "
      + "rows marked QK open their attention edge's QK attribution.")));
  if (attn) {
    const [layer, head, query, key] = attn.split(".");
    try {
      parts.push(qkPanel(await getJSON(graphUrl(graph.graph_id,
        `/qk?layer=${layer}&head=${head}&query_pos=${query}&key_pos=${key}`))));
    } catch (err) {
      parts.push(el("div", { id: "qk" }, problem(err)));
    }
  }
  return parts;
}

function qkPanel(qk) {
  const pairRows = qk.pairs.map((p) => el("tr", { "data-pair": `${p.query}|${p.key}` },
    el("td", {}, p.query_name), el("td", {}, p.key_name), el("td", { className: "num" }, fmt(p.value))));
  pairRows.push(el("tr", {}, el("td", { colspan: 2 }, "all other pairs"), el("td", { className: "num" }, fmt(qk.pair_rest))));
  if (qk.attn_logit_softcap !== null && qk.attn_logit_softcap !== undefined) {  // Gemma-2: pairs split the pre-cap score s
    pairRows.push(el("tr", {}, el("td", { colspan: 3 }, `soft-cap: gate logit = ${fmt(qk.attn_logit_softcap)} * tanh(s / ${fmt(qk.attn_logit_softcap)}) + offset`)));
  }
  pairRows.push(el("tr", {}, el("td", { colspan: 2 }, "offset (gate bias)"), el("td", { className: "num" }, fmt(qk.offset))));
  const marginal = (side, list, rest) => el("div", {}, el("h3", {}, `${side} marginals`),
    table([["component"], ["value", "num"]], [
      ...list.map((m) => el("tr", { "data-marginal": `${side}|${m.component}` },
        el("td", {}, m.name), el("td", { className: "num" }, fmt(m.value)))),
      el("tr", {}, el("td", {}, "rest"), el("td", { className: "num" }, fmt(rest)))]));
  return el("div", { id: "qk", "data-attn": `${qk.layer}.${qk.head}.${qk.query_pos}.${qk.key_pos}` },
    el("h3", {}, `QK attribution of ${qk.name}: gate logit ${fmt(qk.gate_logit)}`),
    table([["query component"], ["key component"], ["value", "num"]], pairRows),
    el("div", { className: "marginals" }, marginal("query", qk.query_marginals, qk.query_marginal_rest),
      marginal("key", qk.key_marginals, qk.key_marginal_rest)));
}

async function details(graphs, state) {
  const graph = graphs[state.pane];
  if (!graph) return [problem(new Error(`no graph pane ${state.pane}`))];
  if (state.node) return nodeDetails(graph, state);
  if (state.edge) return edgeDetails(graph, state);
  return [el("h3", {}, graph.prompt),
    el("p", { className: "note" }, "Select a node (a feature shows its dashboard) or an edge (its heads, and the QK "
      + "pairs of the attention edges that carry it). Blue edges excite, red inhibit; width is |weight|.")];
}

// -- rendering a state -----------------------------------------------------------------------------
let renders = 0;
let drawnKey = "";

async function render() {
  const ticket = ++renders;
  document.body.dataset.status = "loading";
  const message = document.getElementById("message");
  try {
    if (!graphList.length) graphList = await getJSON("api/graphs");
    if (!graphList.length) {
      message.textContent = "The store holds no graphs.";
      document.body.dataset.status = "ready";
      return;
    }
    let state = readState();
    if (!state.graphs.length) {
      state = { ...state, graphs: defaultGraphs(graphList[0].prompt) };
      history.replaceState(null, "", fragment(state));
    }
    fillPicker(state);
    const graphs = await Promise.all(state.graphs.map((id) => getJSON(graphUrl(id))));
    if (ticket !== renders) return;
    const key = `${state.graphs.join(",")}|${state.maxEdges}`;
    if (key !== drawnKey) {
      drawPanes(graphs, state);
      drawnKey = key;
    }
    highlight(state);
    const parts = await details(graphs, state);
    if (ticket !== renders) return;
    document.getElementById("details").replaceChildren(...parts);
    message.textContent = "";
    document.body.dataset.view = location.hash; // what is shown (a click changes the hash before it renders)
    document.body.dataset.status = "ready";
  } catch (err) {
    if (ticket !== renders) return;
    message.textContent = err.message;
    document.body.dataset.status = "error";
  }
}

window.addEventListener("hashchange", render);
render();
