"""Self-contained HTML pages: one file, styles, script and data inlined, nothing fetched.

Pages open from disk with no network (no CDN, no fonts, no images from elsewhere), so they work
offline, from an archived run directory and in a headless browser under test. Every page
(``minigpt attention``, ``minigpt eval --per-token``) is built by :func:`page`: the shared style,
a JSON data block read by the page's script with ``minigptData()``, and errors caught into
``window.minigptErrors`` (shown on the page, read by tests).
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["page", "write_page", "encode_array", "COLORMAP_JS"]

_BASE_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.2em 2em; color: #222;
       background: #fff; }
h1 { font-size: 1.25em; margin: 0 0 .3em; }
.meta { color: #666; margin: 0 0 1em; }
.controls { margin: .6em 0 1em; display: flex; gap: 1.2em; flex-wrap: wrap; align-items: center; }
.controls label { font-weight: 600; }
#minigpt-errors { color: #b00; white-space: pre-wrap; }
.tip { position: fixed; pointer-events: none; background: #222; color: #fff; padding: 3px 7px;
       border-radius: 4px; font: 12px/1.3 ui-monospace, Menlo, Consolas, monospace; white-space: pre;
       display: none; z-index: 10; }
.legend { display: flex; align-items: center; gap: .5em; color: #444; font-size: 12px; }
.legend canvas { border: 1px solid #ccc; }
"""

# Colour maps as a few stops, interpolated in the page (matplotlib's viridis; a blue-white-red
# diverging map for differences).
COLORMAP_JS = """
const MINIGPT_MAPS = {
  viridis: [[68,1,84],[72,40,120],[62,74,137],[49,104,142],[38,130,142],[31,158,137],[53,183,121],
            [110,206,88],[181,222,43],[253,231,37]],
  diverging: [[33,102,172],[103,169,207],[209,229,240],[247,247,247],[253,219,199],[239,138,98],[178,24,43]],
  heat: [[255,255,255],[254,232,200],[253,187,132],[252,141,89],[227,74,51],[179,0,0]]
};
function minigptColor(map, t) {
  const stops = MINIGPT_MAPS[map];
  t = Math.min(1, Math.max(0, isFinite(t) ? t : 0)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(t)), f = t - i, a = stops[i], b = stops[i + 1];
  return [0, 1, 2].map(k => Math.round(a[k] + (b[k] - a[k]) * f));
}
function minigptRgb(map, t) { const c = minigptColor(map, t); return `rgb(${c[0]},${c[1]},${c[2]})`; }
function minigptLegend(canvas, map) {
  const ctx = canvas.getContext('2d');
  for (let x = 0; x < canvas.width; x++) {
    ctx.fillStyle = minigptRgb(map, x / (canvas.width - 1)); ctx.fillRect(x, 0, 1, canvas.height);
  }
}
"""

_PRELUDE = """
window.minigptErrors = [];
window.addEventListener('error', e => {
  window.minigptErrors.push(String(e.message));
  const box = document.getElementById('minigpt-errors'); if (box) box.textContent += e.message + '\\n';
});
function minigptData() { return JSON.parse(document.getElementById('minigpt-data').textContent); }
function minigptDecode(b64, dtype) {  // little-endian typed arrays, base64 in the data block
  const bin = atob(b64), bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return dtype === 'uint16' ? new Uint16Array(bytes.buffer) : dtype === 'float32' ? new Float32Array(bytes.buffer)
       : bytes;
}
"""


def encode_array(values: np.ndarray, dtype: str) -> str:
    """Base64 of ``values`` as a little-endian ``dtype`` array (what ``minigptDecode(b64, dtype)`` reads)."""
    return base64.b64encode(np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).decode()


def _json_for_script(data: Any) -> str:
    # Inside <script> only "</" (and "<!--") can end or confuse the element; escape "<" everywhere.
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def page(title: str, body: str, *, script: str = "", style: str = "", data: Any = None) -> str:
    """A complete HTML document: the shared style and prelude, ``body`` (HTML), ``data`` as JSON, ``script``."""
    data_block = ("" if data is None else
                  f'<script type="application/json" id="minigpt-data">{_json_for_script(data)}</script>\n')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_BASE_STYLE}{style}</style>\n"
        f"<script>{_PRELUDE}{COLORMAP_JS}</script>\n</head>\n<body>\n"
        f"<div id=\"minigpt-errors\"></div>\n{body}\n<div class=\"tip\" id=\"tip\"></div>\n"
        f"{data_block}<script>\n{script}\n</script>\n</body>\n</html>\n"
    )


def write_page(path: str | Path, text: str) -> Path:
    """Write a page (parents created; a temporary name then renamed, so a reader never sees half of it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
