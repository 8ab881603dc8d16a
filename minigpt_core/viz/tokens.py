"""Per-token loss as an offline HTML page: the text coloured by each token's loss (or by the
difference between two models' losses), the values on hover."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import numpy as np

from .html import encode_array, page, write_page
from ._mpl import pyplot

__all__ = ["loss_page", "write_loss_page", "loss_figure", "MAX_PAGE_TOKENS"]

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


def loss_figure(tokens: Sequence[str], losses: np.ndarray, *, other: np.ndarray | None = None,
                names: tuple[str, str] = ("this", "other"), window_starts: Sequence[int] = (0,), title: str = "",
                width: int = 90, max_tokens: int = 1500):
    """The page's picture as a figure: the first ``max_tokens`` tokens as monospace text on boxes
    coloured by loss (or by ``losses - other``), wrapped at ``width`` characters, each window on new
    lines, with a colour bar."""
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    plt = pyplot()
    tokens, losses = list(tokens)[:max_tokens], np.asarray(losses, dtype=np.float64)[:max_tokens]
    values = losses if other is None else losses - np.asarray(other, dtype=np.float64)[:max_tokens]
    top = float(np.quantile(np.abs(values), 0.99)) if len(values) else 1.0
    top = top or 1.0  # the 1% highest saturate, as on the page
    cmap, norm = ((plt.get_cmap("Reds"), Normalize(0.0, top)) if other is None
                  else (plt.get_cmap("RdBu_r"), Normalize(-top, top)))
    # Character cells: one unit per character, one per line; a new window starts a new paragraph.
    starts = set(int(k) for k in window_starts)
    cells, rules, row, col = [], [], 0.0, 0
    for k, tok in enumerate(tokens):
        if k in starts and k > 0:
            row, col = row + (1.5 if col else 0.5), 0
            rules.append(row - 0.25)
        shown = tok.replace("\t", "    ").replace("\n", "\u21b5")
        if col + len(shown) > width and col > 0:
            row, col = row + 1, 0
        cells.append((row, col, shown, values[k]))
        col += len(shown)
        if "\n" in tok:
            row, col = row + 1, 0
    rows = row + (1 if col else 0)
    cell_w, cell_h = 10 * 0.6 / 72, 0.21  # inches: DejaVu Sans Mono at 10 pt advances 0.6 em
    text_h, top_h, bar_h = rows * cell_h, 0.35, 0.75
    fig_h = text_h + top_h + bar_h
    fig = plt.figure(figsize=(width * cell_w + 0.3, fig_h))
    ax = fig.add_axes((0.15 / (width * cell_w + 0.3), bar_h / fig_h, width * cell_w / (width * cell_w + 0.3),
                       text_h / fig_h))
    ax.set_xlim(0, width)
    ax.set_ylim(rows, 0)
    ax.set_axis_off()
    for r, c, shown, v in cells:
        shade = norm(v)
        ax.add_patch(Rectangle((c, r + 0.04), len(shown), 0.92, facecolor=cmap(shade), edgecolor="none"))
        dark = shade > 0.7 or (other is not None and shade < 0.2)
        ax.text(c, r + 0.52, shown.replace("$", r"\$"), family="DejaVu Sans Mono", fontsize=10, va="center",
                ha="left", color="white" if dark else "black")
    for y in rules:
        ax.axhline(y, color="#999", lw=0.6, ls=(0, (4, 3)))
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    cax = fig.add_axes((0.3, 0.42 / fig_h, 0.4, 0.1 / fig_h))
    label = "loss (nats)" if other is None else f"loss of {names[0]} minus {names[1]} (nats; red: harder)"
    fig.colorbar(sm, cax=cax, orientation="horizontal", label=label, extend="max" if other is None else "both")
    if title:
        fig.text(0.15 / (width * cell_w + 0.3), 1 - 0.12 / fig_h, title, fontsize=10, va="top")
    return fig
