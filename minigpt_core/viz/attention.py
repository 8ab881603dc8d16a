"""Attention maps: a PNG grid of every head's weights per layer, and one offline HTML page to explore them.

Inputs are what :func:`minigpt_core.inspection.attention_weights` returns for one sequence: one
(H, T, T) array per layer (query rows, key columns) and the decoded text of the T tokens.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ._mpl import pyplot, save_figure
from .html import encode_array, page, write_page

__all__ = ["token_label", "attention_figure", "write_attention_pngs", "attention_page", "MAX_PAGE_CELLS"]

MAX_PAGE_CELLS = 16_000_000  # layers x heads x T x T in one page: ~43 MB of base64; more is unusable


def token_label(text: str, width: int = 12) -> str:
    """A token's text as an axis label: whitespace made visible, matplotlib's mathtext '$' escaped."""
    s = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r").replace(" ", "\u2423")
    s = s if s else "\u2205"
    if len(s) > width:
        s = s[:width - 1] + "\u2026"
    return s.replace("$", r"\$")


def attention_figure(weights: np.ndarray, labels: Sequence[str], *, heads: Sequence[int] | None = None,
                     average: bool = False, title: str = "", causal: bool = True):
    """One figure: a heatmap per head (and the heads' mean), tokens on both axes, one colour scale.

    ``weights``: (H, T, T). Cells above the diagonal (a causal attention's future) are drawn as
    masked, in grey; the colour bar (square-root scale, 0 to the largest weight) covers all panels.
    """
    plt = pyplot()
    n_heads, t, _ = weights.shape
    heads = list(range(n_heads)) if heads is None else list(heads)
    panels = [(f"head {h}", weights[h]) for h in heads]
    if average:
        panels.append(("mean of heads", weights.mean(axis=0)))
    n = len(panels)
    ncols = math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    side = max(2.6, 0.17 * t + 1.0)  # inches per panel: readable labels up to the context length
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * side + 1.5, nrows * side + 1.0), squeeze=False,
                             sharex=True, sharey=True, layout="constrained")
    mask = np.triu(np.ones((t, t), dtype=bool), 1) if causal else np.zeros((t, t), dtype=bool)
    visible = [p[~mask] for _, p in panels]
    vmax = max((float(v.max()) for v in visible if v.size), default=1.0) or 1.0
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d4d4d4")
    font = 8.0  # a cell is 0.17 inch (12 pt) whatever T is
    # Square-root scale: the first tokens' weights (row 0 is always 1) would leave the rest dark.
    from matplotlib.colors import PowerNorm

    norm = PowerNorm(0.5, vmin=0.0, vmax=vmax)
    ticks = [token_label(s) for s in labels]
    image = None
    for ax, (name, w) in zip(axes.flat, panels):
        image = ax.imshow(np.ma.masked_array(w, mask), cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(t))
        ax.set_yticks(range(t))
        ax.set_xticklabels(ticks, rotation=90, fontsize=font, family="monospace")
        ax.set_yticklabels(ticks, fontsize=font, family="monospace")
        ax.tick_params(length=0)
    for k, ax in enumerate(axes.flat):
        if k < n and k + ncols >= n:  # the lowest panel of its column: shared x labels go here
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("key (attended to)")
    for ax in axes[:, 0]:
        ax.set_ylabel("query (attending)")
    for ax in list(axes.flat)[n:]:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="attention weight (square-root scale)")
    if title:
        fig.suptitle(title + ("  (grey: masked future)" if causal else ""), fontsize=11)
    return fig


def write_attention_pngs(weights: Sequence[np.ndarray], labels: Sequence[str], out_dir: str | Path, *,
                         layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                         average: bool = False, title: str = "", causal: bool = True,
                         dpi: int = 100, progress: Callable[[int], None] | None = None) -> list[Path]:
    """``out_dir/layer-<i>.png`` for each selected layer of ``weights`` (one (H, T, T) array per layer);
    ``progress(1)`` after each."""
    out = []
    for i in (range(len(weights)) if layers is None else layers):
        fig = attention_figure(np.asarray(weights[i]), labels, heads=heads, average=average, causal=causal,
                               title=f"{title}  layer {i}".strip())
        out.append(save_figure(fig, Path(out_dir) / f"layer-{i}.png", dpi=dpi))
        if progress is not None:
            progress(1)
    return out


_STYLE = """
.view { display: flex; gap: 2em; align-items: flex-start; flex-wrap: wrap; }
#heat { border: 1px solid #ddd; cursor: crosshair; }
#tokens { max-width: 46em; font: 15px/2 ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; }
#tokens span { padding: 2px 1px; border-radius: 3px; cursor: default; }
#tokens span.query { outline: 2px solid #e4572e; }
.help { color: #555; max-width: 46em; }
"""

_BODY = """
<h1>{title}</h1>
<p class="meta">{meta}</p>
<div class="controls">
  <span><label for="layer">Layer</label> <select id="layer"></select></span>
  <span><label for="head">Head</label> <select id="head"></select></span>
  <span class="legend">0 <canvas id="legend" width="160" height="12"></canvas> <span id="vmax"></span>
    (square-root scale)</span>
</div>
<div class="view">
  <canvas id="heat"></canvas>
  <div>
    <p class="help">Hover a token (or a row of the map) to colour the tokens by how much it attends to each;
    grey cells are the masked future.</p>
    <div id="tokens"></div>
  </div>
</div>
"""

_SCRIPT = """
const D = minigptData();
const T = D.T, H = D.heads, W = D.w.map(b => minigptDecode(b, 'uint16'));
const layerSel = document.getElementById('layer'), headSel = document.getElementById('head');
D.layers.forEach((l, k) => layerSel.add(new Option('layer ' + l, k)));
for (let h = 0; h < H; h++) headSel.add(new Option('head ' + h, h));
if (H > 1) headSel.add(new Option('mean of heads', 'mean'));
const canvas = document.getElementById('heat'), ctx = canvas.getContext('2d'), tip = document.getElementById('tip');
const strip = document.getElementById('tokens');
const spans = D.tokens.map((text, i) => {
  const s = document.createElement('span');
  s.textContent = text.replace(/\\n/g, '\\u21b5\\n');
  s.dataset.i = i; strip.appendChild(s); return s;
});
const CELL = Math.max(5, Math.min(22, Math.floor(620 / T)));
ctx.font = '11px ui-monospace, Menlo, monospace';
const label = t => { const s = t.replace(/\\n/g, '\\\\n').replace(/ /g, '\\u2423') || '\\u2205';
                     return s.length > 10 ? s.slice(0, 9) + '\\u2026' : s; };
const LABELS = D.tokens.map(label);
const M = CELL >= 9 ? Math.ceil(Math.max(...LABELS.map(s => ctx.measureText(s).width))) + 8 : 4;
canvas.width = M + T * CELL + 2; canvas.height = M + T * CELL + 2;
let current = null, vmax = 1, hovered = -1;

function matrix() {
  const l = +layerSel.value, w = W[l], out = new Float32Array(T * T), scale = 1 / 65535;
  if (headSel.value === 'mean') {
    for (let h = 0; h < H; h++) for (let k = 0; k < T * T; k++) out[k] += w[h * T * T + k] * scale / H;
  } else {
    const h = +headSel.value;
    for (let k = 0; k < T * T; k++) out[k] = w[h * T * T + k] * scale;
  }
  return out;
}
function masked(i, j) { return D.causal && j > i; }
function draw() {
  current = matrix();
  vmax = 0;
  for (let i = 0; i < T; i++) for (let j = 0; j <= (D.causal ? i : T - 1); j++) vmax = Math.max(vmax, current[i * T + j]);
  vmax = vmax || 1;
  document.getElementById('vmax').textContent = vmax.toFixed(3);
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = '#fff'; ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.font = '11px ui-monospace, Menlo, monospace'; ctx.fillStyle = '#333';
  if (CELL >= 9) {
    ctx.textAlign = 'right'; ctx.textBaseline = 'middle';
    LABELS.forEach((s, i) => ctx.fillText(s, M - 4, M + i * CELL + CELL / 2));
    ctx.save(); ctx.translate(M, M - 4); ctx.rotate(-Math.PI / 2); ctx.textAlign = 'left';
    LABELS.forEach((s, j) => ctx.fillText(s, 0, j * CELL + CELL / 2));
    ctx.restore();
  }
  for (let i = 0; i < T; i++) for (let j = 0; j < T; j++) {
    ctx.fillStyle = masked(i, j) ? '#d4d4d4' : minigptRgb('viridis', Math.sqrt(current[i * T + j] / vmax));
    ctx.fillRect(M + j * CELL, M + i * CELL, CELL, CELL);
  }
  if (hovered >= 0) { ctx.strokeStyle = '#e4572e'; ctx.lineWidth = 2;
                      ctx.strokeRect(M + 1, M + hovered * CELL + 1, T * CELL - 2, CELL - 2); }
  colourTokens();
}
function colourTokens() {
  spans.forEach((s, j) => {
    s.classList.toggle('query', j === hovered);
    if (hovered < 0 || masked(hovered, j)) { s.style.background = ''; s.style.color = ''; return; }
    const v = Math.sqrt(current[hovered * T + j] / vmax);
    s.style.background = minigptRgb('viridis', v); s.style.color = v > 0.6 ? '#000' : '#fff';
  });
}
function hover(i) { if (i !== hovered) { hovered = i; draw(); } }
function showTip(e, text) { tip.textContent = text; tip.style.display = 'block';
                            tip.style.left = (e.clientX + 14) + 'px'; tip.style.top = (e.clientY + 12) + 'px'; }
spans.forEach((s, i) => {
  s.addEventListener('mouseenter', e => { hover(i); showTip(e, `query ${i} ${JSON.stringify(D.tokens[i])}`); });
  s.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
});
canvas.addEventListener('mousemove', e => {
  const r = canvas.getBoundingClientRect();
  const j = Math.floor((e.clientX - r.left - M) / CELL), i = Math.floor((e.clientY - r.top - M) / CELL);
  if (i < 0 || j < 0 || i >= T || j >= T) { tip.style.display = 'none'; return; }
  hover(i);
  showTip(e, masked(i, j) ? `${JSON.stringify(D.tokens[i])} \\u2192 ${JSON.stringify(D.tokens[j])}: masked (future)`
                          : `${JSON.stringify(D.tokens[i])} \\u2192 ${JSON.stringify(D.tokens[j])}: ${current[i * T + j].toFixed(4)}`);
});
canvas.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
layerSel.addEventListener('change', draw);
headSel.addEventListener('change', draw);
minigptLegend(document.getElementById('legend'), 'viridis');
draw();
"""


def attention_page(weights: Sequence[np.ndarray], tokens: Sequence[str], *, layers: Sequence[int] | None = None,
                   title: str = "Attention", meta: str = "", causal: bool = True) -> str:
    """An offline HTML page: pick a layer and a head; hover a token to see where it attends.

    ``weights``: one (H, T, T) array per layer given; ``layers``: their layer numbers (labels);
    ``tokens``: the decoded text of each token. Weights are stored as 16-bit fractions
    (resolution 1.5e-5) so the page stays small.
    """
    arrays = [np.asarray(w, dtype=np.float64) for w in weights]
    n_heads, t = arrays[0].shape[0], arrays[0].shape[-1]
    data = {
        "T": t, "heads": n_heads, "causal": causal, "tokens": list(tokens),
        "layers": list(range(len(arrays)) if layers is None else layers),
        "w": [encode_array(np.rint(np.clip(w, 0.0, 1.0) * 65535), "uint16") for w in arrays],
    }
    body = _BODY.format(title=html.escape(title), meta=html.escape(meta))
    return page(title, body, script=_SCRIPT, style=_STYLE, data=data)


def write_attention_page(path: str | Path, *args, **kwargs) -> Path:
    return write_page(path, attention_page(*args, **kwargs))
