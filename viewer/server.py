"""The viewer's HTTP server (stdlib http.server): the page's static files and the JSON endpoints.

    GET /                                           the page (viewer/static/index.html)
    GET /api/graphs                                 every committed graph
    GET /api/graphs/{graph_id}                      one graph, pruned
    GET /api/graphs/{graph_id}/heads?source=&target=                   head loadings of an edge
    GET /api/graphs/{graph_id}/qk?layer=&head=&query_pos=&key_pos=     QK pairs of an attention edge
    GET /api/graphs/{graph_id}/features/{layer}/{feature}              a feature's dashboard

Errors answer JSON `{"error": message}`: 400 for a malformed request or an id the store refuses, 404 for
what the store does not hold, 500 for a store that cannot be read (the message says which file).
"""

from __future__ import annotations

import json
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from attribution.store import GraphNotFoundError, StoreError, open_store
from transcoders.features import FeaturesError
from viewer.data import BadRequest, NotFound, ViewerData

STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {"/": ("index.html", "text/html"), "/index.html": ("index.html", "text/html"),
                "/viewer.js": ("viewer.js", "text/javascript"), "/viewer.css": ("viewer.css", "text/css")}


def _int(query: dict[str, list[str]], name: str) -> int:
    values = query.get(name)
    if not values:
        raise BadRequest(f"query parameter {name!r} is missing")
    try:
        return int(values[0])
    except ValueError:
        raise BadRequest(f"query parameter {name}={values[0]!r} is not an integer") from None


def _str(query: dict[str, list[str]], name: str) -> str:
    values = query.get(name)
    if not values or not values[0]:
        raise BadRequest(f"query parameter {name!r} is missing")
    return values[0]


def _int_segment(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise BadRequest(f"{name} {text!r} is not an integer") from None


def answer(data: ViewerData, path: str, query: dict[str, list[str]]):
    """The JSON value of one API path (`/api/...`, already unquoted), or NotFound for an unknown path."""
    parts = path.strip("/").split("/")[1:]  # after "api"
    if parts == ["graphs"]:
        return data.graphs()
    if len(parts) >= 2 and parts[0] == "graphs":
        graph_id, rest = parts[1], parts[2:]
        if not rest:
            return data.graph(graph_id)
        if rest == ["heads"]:
            return data.edge_heads(graph_id, _str(query, "source"), _str(query, "target"))
        if rest == ["qk"]:
            return data.attention_edge(graph_id, *(_int(query, n) for n in ("layer", "head", "query_pos", "key_pos")))
        if len(rest) == 3 and rest[0] == "features":
            return data.feature(graph_id, _int_segment(rest[1], "layer"), _int_segment(rest[2], "feature"))
    raise NotFound(f"no endpoint {path}")


class ViewerServer(ThreadingHTTPServer):
    """An HTTP server of one store's viewer."""

    daemon_threads = True

    def __init__(self, store_dir: str | Path, host: str, port: int):
        self.data = ViewerData(open_store(store_dir))
        self.store_dir = store_dir
        super().__init__((host, port), ViewerHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class ViewerHandler(BaseHTTPRequestHandler):
    server: ViewerServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlsplit(self.path)
        path = unquote(url.path)
        if path in STATIC_FILES:
            name, kind = STATIC_FILES[path]
            self._send(HTTPStatus.OK, (STATIC_DIR / name).read_bytes(), f"{kind}; charset=utf-8")
            return
        if not path.startswith("/api/"):
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {path}"})
            return
        try:
            value = answer(self.server.data, path, parse_qs(url.query))
        except (GraphNotFoundError, NotFound) as err:
            self._json(HTTPStatus.NOT_FOUND, {"error": str(err)})
        except BadRequest as err:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
        except (StoreError, FeaturesError) as err:  # a store or dashboards file that cannot be read
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(err)})
        else:
            self._json(HTTPStatus.OK, value)

    def _json(self, status: HTTPStatus, value) -> None:
        self._send(status, json.dumps(value, allow_nan=False).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code="-", size="-") -> None:
        """Log failed requests only (a page load makes many)."""
        if isinstance(code, int) and code >= 400:
            super().log_request(code, size)


def make_server(store_dir: str | Path, host: str = "127.0.0.1", port: int = 8000) -> ViewerServer:
    """A viewer server bound to (host, port) (port 0: a free one), not yet serving. A local store must be
    an existing directory (a pyarrow URI such as s3://... is taken as given)."""
    if "://" not in str(store_dir) and not Path(store_dir).is_dir():
        raise FileNotFoundError(f"store directory {store_dir} does not exist; pass the attribution stage's "
                                "output store (e.g. runs/tiny/graphs)")
    return ViewerServer(store_dir, host, port)


def serve(store_dir: str | Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the viewer of the store at `store_dir` on http://host:port/ until interrupted."""
    server = make_server(store_dir, host, port)
    print(f"viewing {store_dir} at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
