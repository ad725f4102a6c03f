"""A local web viewer of an attribution store: graphs by layer and position, head loadings of edges, QK
pairs of attention edges, feature dashboards; dense and sparse graphs of one prompt side by side.

`serve(store_dir, host, port)` serves it with the standard library's http.server (viewer/server.py);
the page is plain JavaScript and SVG (viewer/static/), so nothing is fetched from the network.
"""

from viewer.server import make_server, serve

__all__ = ["make_server", "serve"]
