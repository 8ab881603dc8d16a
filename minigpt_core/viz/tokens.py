"""Per-token loss as an offline HTML page: the text coloured by each token's loss (or by the
difference between two models' losses), the values on hover."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import numpy as np

from .html import encode_array, page, write_page

__all__ = ["loss_page", "write_loss_page", "MAX_PAGE_TOKENS"]

MAX_PAGE_TOKENS = 200_000  # a browser lays out this many spans in a few seconds; the JSONL has them all

_STYLE = """
#text { font: 15px/1.9 ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; max-width: 60em; }
#text span { border-radius: 2px; }
.window { border-top: 1px dashed #bbb; padding: .4em 0; }
.window > small { color: #999; display: block; font: 11px system-ui, sans-serif; }
"""

_BODY = """
<h1>{title}</h1>
<p class="meta">{meta}</p>
<div class="controls">
  <span id="mode-box"><label for="mode">Colour by</label> <select id="mode"></select></span>
  <span class="legend"><span id="lo"></span> <canvas id="legend" width="160" height="12"></canvas>
    <span id="hi"></span> <span id="unit"></span></span>
</div>
<div id="text"></div>
"""

_SCRIPT = """
const D = minigptData();
const loss = minigptDecode(D.loss, 'float32'), other = D.other ? minigptDecode(D.other, 'float32') : null;
const N = loss.length, modeSel = document.getElementById('mode'), tip = document.getElementById('tip');
if (other) {
  modeSel.add(new Option(`difference: ${D.names[0]} \\u2212 ${D.names[1]}`, 'diff'));
  modeSel.add(new Option(`loss of ${D.names[0]}`, 'loss'));
  modeSel.add(new Option(`loss of ${D.names[1]}`, 'other'));
} else {
  modeSel.add(new Option('loss', 'loss'));
  document.getElementById('mode-box').style.display = 'none';
}
const box = document.getElementById('text'), spans = [];
const starts = new Map(D.window_starts.map((k, w) => [k, w]));
let div = null;
for (let k = 0; k < N; k++) {
  if (starts.has(k) || div === null) {
    div = document.createElement('div'); div.className = 'window';
    div.innerHTML = `<small>window ${starts.has(k) ? starts.get(k) : 0}</small>`; box.appendChild(div);
  }
  const s = document.createElement('span');
  s.textContent = D.tokens[k].replace(/\\n/g, '\\u21b5\\n'); s.dataset.k = k;
  div.appendChild(s); spans.push(s);
}
function quantile(values, q) {
  const a = Array.from(values).filter(Number.isFinite).sort((x, y) => x - y);
  return a.length ? a[Math.min(a.length - 1, Math.floor(q * a.length))] : 1;
}
function value(mode, k) { return mode === 'diff' ? loss[k] - other[k] : mode === 'other' ? other[k] : loss[k]; }
function paint() {
  const mode = modeSel.value, diverging = mode === 'diff';
  const vals = Float32Array.from({length: N}, (_, k) => Math.abs(value(mode, k)));
  const top = quantile(vals, 0.99) || 1;  // the 1% highest saturate: one outlier does not wash out the rest
  minigptLegend(document.getElementById('legend'), diverging ? 'diverging' : 'heat');
  document.getElementById('lo').textContent = diverging ? (-top).toFixed(2) : '0';
  document.getElementById('hi').textContent = (diverging ? '+' : '') + top.toFixed(2);
  document.getElementById('unit').textContent = diverging ? `nats (red: harder for ${D.names[0]})` : 'nats';
  spans.forEach((s, k) => {
    const v = value(mode, k);
    s.style.background = diverging ? minigptRgb('diverging', 0.5 + v / (2 * top)) : minigptRgb('heat', v / top);
  });
}
box.addEventListener('mousemove', e => {
  const s = e.target.closest('span[data-k]');
  if (!s) { tip.style.display = 'none'; return; }
  const k = +s.dataset.k;
  let text = `${JSON.stringify(D.tokens[k])}  loss ${loss[k].toFixed(4)}`;
  if (other) text += `  ${D.names[1]} ${other[k].toFixed(4)}  \\u0394 ${(loss[k] - other[k] >= 0 ? '+' : '')}${(loss[k] - other[k]).toFixed(4)}`;
  tip.textContent = text; tip.style.display = 'block';
  tip.style.left = (e.clientX + 14) + 'px'; tip.style.top = (e.clientY + 12) + 'px';
});
box.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
modeSel.addEventListener('change', paint);
paint();
"""


def loss_page(tokens: Sequence[str], losses: np.ndarray, *, other: np.ndarray | None = None,
              names: tuple[str, str] = ("this", "other"), window_starts: Sequence[int] = (0,),
              title: str = "Per-token loss", meta: str = "") -> str:
    """An offline page of ``tokens`` (their text) coloured by ``losses`` (nats), or by ``losses - other``.

    ``window_starts``: indices into ``tokens`` where a new evaluation window begins (drawn apart).
    """
    data = {"tokens": list(tokens), "loss": encode_array(losses, "float32"),
            "other": None if other is None else encode_array(other, "float32"),
            "names": list(names), "window_starts": sorted(set(int(k) for k in window_starts))}
    body = _BODY.format(title=html.escape(title), meta=html.escape(meta))
    return page(title, body, script=_SCRIPT, style=_STYLE, data=data)


def write_loss_page(path: str | Path, *args, **kwargs) -> Path:
    return write_page(path, loss_page(*args, **kwargs))
