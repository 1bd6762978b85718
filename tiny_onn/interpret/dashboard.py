"""A self-contained HTML dashboard: data and script inlined, works from file:// offline, no CDN.

Layers with many experts (one-neuron layouts carve 1,000+ per layer) are shown a page at a time: the expert table and
the heatmap list `PAGE_SIZE` experts, sortable by selection rate or specificity and filtered by text; the 2-D map shows
every expert and a click on one opens its page."""

from __future__ import annotations

import html
import json

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Tiny-ONN experts — __TITLE__</title>
<style>
body{font:14px system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:18px} .row{display:flex;gap:16px;flex-wrap:wrap}
table{border-collapse:collapse} td,th{border:1px solid #ddd;padding:3px 6px;text-align:left}
tr.sel{background:#fff3c4} tr.expert:hover{background:#f0f6ff;cursor:pointer}
th.sort{cursor:pointer;text-decoration:underline dotted} th.sorted{background:#eef}
input.label{width:260px} .heat td{width:60px;text-align:center;font-size:12px}
#details{max-width:720px} code{background:#f4f4f4;padding:1px 3px} .small{color:#666;font-size:12px}
svg circle{cursor:pointer}
</style></head><body>
<h1>Tiny-ONN expert dashboard — <span id="title"></span></h1>
<p class="small">Layer <select id="layer"></select>
 · NMI(expert, category) of this layer: <b id="nmi"></b>
 · <button id="export">export labels (JSON)</button></p>
<div class="row">
 <div><h3>Experts</h3>
 <p class="small">filter <input id="filter" placeholder="label, category or token"> · <span id="shown"></span>
 <button id="prev">&lt;</button> page <span id="page"></span> <button id="next">&gt;</button></p>
 <table id="experts"><thead><tr><th class="sort" data-key="index">#</th><th>label (editable)</th><th>dominant</th>
 <th class="sort" data-key="specificity">specificity</th><th class="sort" data-key="selected">selected</th></tr></thead>
 <tbody></tbody></table></div>
 <div><h3>Selection rate by category</h3><table class="heat" id="heat"></table>
 <h3>Experts in 2-D (__EMBED__)</h3><svg id="scatter" width="320" height="320"></svg></div>
 <div id="details"><h3>Expert <span id="which">—</span></h3><div id="tokens"></div><div id="snips"></div></div>
</div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const labels = JSON.parse(JSON.stringify(D.labels));
const PAGE = __PAGE_SIZE__;
let layer = 0, current = null, page = 0, sortKey = "index", filter = "";
const $ = id => document.getElementById(id);
// the current layer's experts in table order: filtered by text, sorted by the chosen column
function order() {
  const L = D.layers[layer], q = filter.trim().toLowerCase();
  let ids = L.experts.map((x, e) => e);
  if (q) ids = ids.filter(e => labels[layer][e].toLowerCase().includes(q) || L.experts[e].dominant.toLowerCase().includes(q)
    || L.experts[e].tokens.some(t => t[0].toLowerCase().includes(q)));
  if (sortKey !== "index") ids.sort((a, b) => L.experts[b][sortKey] - L.experts[a][sortKey] || a - b);
  return ids;
}
function pages(n) { return Math.max(1, Math.ceil(n / PAGE)); }
$("filter").addEventListener("input", e => { filter = e.target.value; page = 0; render(); });
$("prev").addEventListener("click", () => { page = Math.max(0, page - 1); render(); });
$("next").addEventListener("click", () => { page = Math.min(pages(order().length) - 1, page + 1); render(); });
document.querySelectorAll("th.sort").forEach(th => th.addEventListener("click", () => { sortKey = th.dataset.key; page = 0; render(); }));
$("title").textContent = D.title;
D.layers.forEach((L, i) => { const o = document.createElement("option"); o.value = i; o.textContent = "layer " + i; $("layer").appendChild(o); });
$("layer").addEventListener("change", e => { layer = +e.target.value; current = null; page = 0; render(); });
function color(v, max) { const t = max > 0 ? v / max : 0; return `rgba(220,60,40,${t.toFixed(3)})`; }
function render() {
  const L = D.layers[layer];
  $("nmi").textContent = L.nmi === null ? "not measured (one category)" : L.nmi.toFixed(3);
  const ids = order(), n = ids.length;
  page = Math.min(page, pages(n) - 1);
  const shown = ids.slice(page * PAGE, (page + 1) * PAGE);
  $("page").textContent = (page + 1) + " / " + pages(n);
  $("shown").textContent = n ? `experts ${page * PAGE + 1}–${page * PAGE + shown.length} of ${n}` +
    (n < L.experts.length ? ` (filtered from ${L.experts.length})` : "") : "no expert matches";
  document.querySelectorAll("th.sort").forEach(th => th.classList.toggle("sorted", th.dataset.key === sortKey));
  const tb = $("experts").querySelector("tbody"); tb.innerHTML = "";
  shown.forEach(e => {
    const x = L.experts[e], tr = document.createElement("tr"); tr.className = "expert" + (e === current ? " sel" : ""); tr.dataset.expert = e;
    tr.innerHTML = `<td>${e}</td><td><input class="label" value=""></td><td>${esc(x.dominant)}</td><td>${x.specificity.toFixed(2)}</td><td>${(100 * x.selected).toFixed(1)}%</td>`;
    const inp = tr.querySelector("input"); inp.value = labels[layer][e];
    inp.addEventListener("input", ev => { labels[layer][e] = ev.target.value; });
    inp.addEventListener("click", ev => ev.stopPropagation());
    tr.addEventListener("click", () => select(e));
    tb.appendChild(tr);
  });
  const heat = $("heat"); let max = 0; L.experts.forEach(x => x.rate.forEach(v => { max = Math.max(max, v); }));
  heat.innerHTML = "<tr><th>expert</th>" + D.categories.map(c => `<th>${esc(c)}</th>`).join("") + "</tr>" +
    shown.map(e => `<tr><td>${e}</td>` + L.experts[e].rate.map(v => `<td style="background:${color(v, max)}">${(100 * v).toFixed(0)}</td>`).join("") + "</tr>").join("");
  const svg = $("scatter"); svg.innerHTML = "";
  const xs = L.experts.map(x => x.xy[0]), ys = L.experts.map(x => x.xy[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
  L.experts.forEach((x, e) => {
    const c = document.createElementNS("http://www.w3.org/2000/svg", "circle");
    c.setAttribute("cx", 20 + 280 * (x.xy[0] - x0) / ((x1 - x0) || 1)); c.setAttribute("cy", 20 + 280 * (x.xy[1] - y0) / ((y1 - y0) || 1));
    c.setAttribute("r", e === current ? 8 : (L.experts.length > 200 ? 2.5 : 5)); c.setAttribute("fill", palette[D.categories.indexOf(x.dominant) % palette.length]);
    c.dataset.expert = e; c.addEventListener("click", () => select(e));
    const t = document.createElementNS("http://www.w3.org/2000/svg", "title"); t.textContent = "expert " + e + ": " + labels[layer][e]; c.appendChild(t);
    svg.appendChild(c);
  });
}
function esc(s) { return String(s).replace(/[&<>"']/g, ch => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[ch])); }
function select(e) {
  current = e;
  if (!order().includes(e)) { filter = ""; $("filter").value = ""; }  // the filter hides it: clear the filter
  page = Math.floor(order().indexOf(e) / PAGE);
  render();
  const x = D.layers[layer].experts[e];
  $("which").textContent = e + " — " + labels[layer][e];
  $("tokens").innerHTML = "<h4>Top tokens (log-odds vs the layer's base rate)</h4><table><tr><th>token</th><th>log-odds</th><th>count</th></tr>" +
    x.tokens.map(t => `<tr><td><code>${esc(t[0])}</code></td><td>${t[1].toFixed(2)}</td><td>${t[2]}</td></tr>`).join("") + "</table>";
  $("snips").innerHTML = "<h4>Where it fires hardest</h4>" + x.snippets.map(s => `<p><span class="small">p=${s.prob.toFixed(3)}</span> <code>${esc(s.left)}<b>${esc(s.token)}</b>${esc(s.right)}</code></p>`).join("");
}
$("export").addEventListener("click", () => {
  const blob = new Blob([JSON.stringify({model: D.title, labels}, null, 2)], {type: "application/json"});
  const a = document.createElement("a"); a.href = URL.createObjectURL(blob); a.download = "expert_labels.json"; a.click();
});
render();
</script></body></html>
"""


PAGE_SIZE = 100  # experts per page of the expert table and the heatmap


def render_dashboard(data: dict, embedding_name: str) -> str:
    """The dashboard page with `data` inlined (JSON with every "<" escaped: no `</script>` or `<!--` in the data
    changes how the page's scripts are parsed)."""
    # "<" only occurs inside JSON strings: as \u003c no text in the data can close the script or open a comment
    payload = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")
    return (_PAGE.replace("__TITLE__", html.escape(data["title"]))
            .replace("__PAGE_SIZE__", str(PAGE_SIZE))
            .replace("__EMBED__", html.escape(embedding_name))
            .replace("__DATA__", payload))
