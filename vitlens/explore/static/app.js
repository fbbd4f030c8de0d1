// vitlens explore: plain JavaScript, no build step, no external asset.
// State lives in the URL's hash (#view=image&variant=...&key=...&block=...), so every view
// has a URL to share; the access token stays in the query string (?token=...) and goes to the
// server in the X-Vitlens-Token header.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token") || "";
const PAGE = 50;
const OKABE = ["#0072B2", "#D55E00", "#E69F00", "#56B4E9", "#009E73", "#CC79A7", "#F0E442", "#000000"];
const CIVIDIS = [[0, 34, 78], [58, 77, 107], [113, 113, 120], [168, 155, 117], [253, 231, 55]];
const $ = (id) => document.getElementById(id);
let VARIANTS = {};
const PANEL_PX = 320;  // the token grid's width on screen

function state() {
  return Object.fromEntries(new URLSearchParams(location.hash.slice(1)));
}

function go(changes) {
  const next = Object.assign(state(), changes);
  for (const [k, v] of Object.entries(next)) if (v === "" || v === null || v === undefined) delete next[k];
  location.hash = new URLSearchParams(next).toString();
}

async function api(path, params) {
  const url = path + "?" + new URLSearchParams(params || {}).toString();
  const response = await fetch(url, {headers: {"X-Vitlens-Token": TOKEN}});
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response.json();
}

function pictureUrl(variant, key) {
  return "/api/picture?" + new URLSearchParams({variant: variant, key: key, token: TOKEN}).toString();
}

function status(text) { $("status").textContent = text || ""; }

function cividis(x) {
  const t = Math.max(0, Math.min(1, x)) * (CIVIDIS.length - 1);
  const i = Math.min(CIVIDIS.length - 2, Math.floor(t));
  const f = t - i;
  const c = CIVIDIS[i].map((v, j) => Math.round(v + f * (CIVIDIS[i + 1][j] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function diverging(x) {  // PuOr: purple < 0 < orange, x in [-1, 1]
  const t = Math.max(-1, Math.min(1, x));
  const end = t < 0 ? [84, 39, 136] : [179, 88, 6];
  const a = Math.abs(t);
  const c = [247, 247, 247].map((v, j) => Math.round(v + a * (end[j] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function fmt(x, digits) { return x === null || x === undefined ? "—" : Number(x).toFixed(digits); }

// ---------------------------------------------------------------- the image list
async function showImages(s) {
  const variant = VARIANTS[s.variant];
  $("images-view").hidden = false;
  $("image-view").hidden = true;
  const classes = $("f-class");
  if (classes.dataset.variant !== s.variant) {
    classes.length = 1;
    variant.class_names.forEach((name, i) => classes.add(new Option(`${i}: ${name}`, String(i))));
    classes.dataset.variant = s.variant;
  }
  classes.value = s.class || "";
  $("f-correct").value = s.correct || "";
  $("f-shard").value = s.shard || "";
  $("f-sort").value = s.sort || "image_key";
  $("f-desc").checked = s.desc === "true";
  const offset = Number(s.offset || 0);
  const page = await api("/api/images", {variant: s.variant, class: s.class || "", correct: s.correct || "",
    shard: s.shard || "", sort: s.sort || "image_key", desc: s.desc || "false", limit: PAGE, offset: offset});
  $("page").textContent = `${page.total ? offset + 1 : 0}–${offset + page.images.length} of ${page.total}`;
  $("prev").disabled = offset === 0;
  $("next").disabled = offset + page.images.length >= page.total;
  const body = $("image-table").tBodies[0];
  body.replaceChildren();
  for (const row of page.images) {
    const tr = body.insertRow();
    tr.dataset.key = row.image_key;
    const img = new Image();
    img.loading = "lazy";
    img.alt = "";
    img.src = pictureUrl(s.variant, row.image_key);
    img.onerror = () => { img.replaceWith(document.createTextNode("—")); };
    tr.insertCell().append(img);
    tr.insertCell().textContent = row.image_key;
    tr.insertCell().textContent = `${row.class_index}: ${row.class_name || ""}`;
    const prediction = tr.insertCell();
    prediction.textContent = `${row.prediction}: ${variant.class_names[row.prediction] || ""}`;
    if (!row.correct) prediction.className = "wrong";
    tr.insertCell().textContent = fmt(row.last_block_id_pct, 1) + " %";
    tr.insertCell().textContent = row.cls_last_block_rank === null ? "—" : row.cls_last_block_rank;
    tr.insertCell().textContent = fmt(row.ours_negative_auc, 3);
    tr.onclick = () => go({view: "image", key: row.image_key, block: variant.num_blocks, stream: "resid"});
  }
  await drawCurves($("list-curves"), s.variant, page.images.map((r) => r.image_key), "this page");
}

// ---------------------------------------------------------------- one image
function tooltipHtml(variantName, t) {
  const rows = t.top5.map((c) => `<tr><td>${c.class === VARIANTS[variantName].current_class ? "&#9654;" : ""}</td>` +
    `<td>${escapeHtml(c.name)}</td><td>${c.logit.toFixed(3)}</td></tr>`).join("");
  return `<b>${escapeHtml(variantName)}</b> token ${t.token} (${t.kind}, ${t.label}` +
    `${t.fg_fraction === null ? "" : ", fg " + t.fg_fraction.toFixed(2)})<br>` +
    `rank ${t.rank}, score ${t.score.toFixed(3)}, correct logit ${t.correct_logit.toFixed(3)}` +
    `<table class="top5">${rows}</table>`;
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]);
}

async function drawPanel(container, variantName, s) {
  const variant = VARIANTS[variantName];
  const panel = document.createElement("div");
  panel.className = "panel";
  panel.dataset.variant = variantName;
  const title = document.createElement("h3");
  title.textContent = variantName;
  panel.append(title);
  container.append(panel);
  if (!variant.has_tokens) {
    const note = document.createElement("p");
    note.className = "note";
    note.textContent = `${variantName} has no tokens rows: the token views need a job with detail = "tokens" ` +
      "(this result set keeps the summary tier's sums: the curves below still work).";
    panel.append(note);
    return;
  }
  const block = Math.min(Number(s.block || 0), variant.num_blocks);
  const data = await api("/api/tokens", {variant: variantName, key: s.key, block: block, stream: s.stream || "resid"});
  variant.current_class = data.class_index;
  const CELL = Math.max(6, Math.floor(PANEL_PX / Math.max(variant.grid_rows, variant.grid_cols)));
  const canvas = document.createElement("canvas");
  canvas.width = variant.grid_cols * CELL;
  canvas.height = variant.grid_rows * CELL;
  panel.append(canvas);
  const context = canvas.getContext("2d");
  const picture = new Image();
  picture.src = pictureUrl(variantName, s.key);
  const byPosition = {};
  data.tokens.forEach((t) => { byPosition[t.token] = t; });
  const classes = {};
  const classColour = (c) => {
    if (c === data.class_index) return OKABE[0];
    if (c === data.prediction) return OKABE[1];
    if (!(c in classes)) classes[c] = OKABE[2 + (Object.keys(classes).length % (OKABE.length - 2))];
    return classes[c];
  };
  const paint = () => {
    context.clearRect(0, 0, canvas.width, canvas.height);
    if (picture.complete && picture.naturalWidth) context.drawImage(picture, 0, 0, canvas.width, canvas.height);
    for (let row = 0; row < variant.grid_rows; row++) {
      for (let col = 0; col < variant.grid_cols; col++) {
        const t = byPosition[variant.num_prefix_tokens + row * variant.grid_cols + col];
        if (!t) continue;
        context.globalAlpha = 0.6;
        context.fillStyle = (s.colour || "score") === "top1" ? classColour(t.top5[0].class) : cividis(t.score);
        context.fillRect(col * CELL, row * CELL, CELL, CELL);
        context.globalAlpha = 1;
        if (t.rank === 0) {
          context.fillStyle = "#fff";
          context.beginPath();
          context.arc(col * CELL + CELL / 2, row * CELL + CELL / 2, Math.max(1.5, CELL / 10), 0, 2 * Math.PI);
          context.fill();
        }
      }
    }
  };
  picture.onload = paint;
  picture.onerror = paint;
  paint();
  const prefix = data.tokens.filter((t) => t.token < variant.num_prefix_tokens);
  if (prefix.length) {
    const line = document.createElement("p");
    line.className = "prefix";
    line.textContent = prefix.map((t) => `${t.kind} token ${t.token}: rank ${t.rank}, top-1 ${t.top5[0].name}`).join("; ");
    panel.append(line);
  }
  canvas.onmousemove = (event) => {
    const rect = canvas.getBoundingClientRect();
    const col = Math.floor((event.clientX - rect.left) / CELL);
    const row = Math.floor((event.clientY - rect.top) / CELL);
    const t = byPosition[variant.num_prefix_tokens + row * variant.grid_cols + col];
    const tip = $("tooltip");
    if (!t) { tip.hidden = true; return; }
    tip.innerHTML = tooltipHtml(variantName, t);
    tip.dataset.token = t.token;
    tip.dataset.variant = variantName;
    tip.style.left = (event.clientX + 14) + "px";
    tip.style.top = (event.clientY + 14) + "px";
    tip.hidden = false;
  };
  canvas.onmouseleave = () => { $("tooltip").hidden = true; };
}

async function drawHeads(s) {
  const box = $("heads");
  box.replaceChildren();
  const heads = await api("/api/heads", {variant: s.variant, key: s.key});
  if (!heads.cells.length) {
    box.innerHTML = '<p class="note">No head attribution for this image: run experiment "heads".</p>';
    return;
  }
  const blocks = Math.max(...heads.cells.map((c) => c.block));
  const count = Math.max(...heads.cells.map((c) => c.head)) + 1;
  const peak = Math.max(...heads.cells.map((c) => Math.abs(c.dla))) || 1;
  const table = document.createElement("table");
  table.className = "heads";
  const header = table.insertRow();
  header.insertCell().textContent = `block \\ head (${heads.token_kind})`;
  for (let h = 0; h < count; h++) header.insertCell().textContent = h;
  for (let b = 1; b <= blocks; b++) {
    const tr = table.insertRow();
    tr.insertCell().textContent = b;
    for (let h = 0; h < count; h++) {
      const cell = heads.cells.find((c) => c.block === b && c.head === h);
      const td = tr.insertCell();
      td.textContent = cell ? cell.dla.toFixed(2) : "";
      if (cell) td.style.background = diverging(cell.dla / peak);
    }
  }
  box.append(table);
}

async function drawExplain(s) {
  const box = $("explain");
  box.replaceChildren();
  const variant = VARIANTS[s.variant];
  const maps = await api("/api/explain", {variant: s.variant, key: s.key});
  const blocks = Object.keys(maps.blocks);
  if (!blocks.length) {
    box.innerHTML = '<p class="note">No explainability maps for this image: run experiment "explain".</p>';
    return;
  }
  const image = (values) => values.slice(variant.num_prefix_tokens);
  const mapRow = (entries) => {  // [[caption, values over the full sequence]], one scale for the row
    const peak = Math.max(...entries.flatMap(([, v]) => image(v)).filter((v) => v !== null).map(Math.abs)) || 1;
    const row = document.createElement("div");
    row.className = "maps";
    for (const [text, values] of entries) {
      const figure = document.createElement("figure");
      const canvas = document.createElement("canvas");
      const size = Math.max(3, Math.floor(96 / variant.grid_cols));
      canvas.width = variant.grid_cols * size;
      canvas.height = variant.grid_rows * size;
      const context = canvas.getContext("2d");
      image(values).forEach((v, i) => {
        context.fillStyle = v === null ? "#ddd" : diverging(v / peak);
        context.fillRect((i % variant.grid_cols) * size, Math.floor(i / variant.grid_cols) * size, size, size);
      });
      const caption = document.createElement("figcaption");
      caption.textContent = text;
      figure.append(canvas, caption);
      row.append(figure);
    }
    box.append(row);
  };
  mapRow(blocks.map((b) => [`block ${b}`, maps.blocks[b]]));
  const heads = (maps.heads || {})[String(s.block)];
  if (heads) mapRow(heads.map((values, h) => [`block ${s.block}, head ${h}`, values]));
}

async function drawCurves(box, variantName, keys, label) {
  box.replaceChildren();
  const curves = await api("/api/curves", {variant: variantName, keys: keys.join(",")});
  for (const kind of ["cls", "image"]) {
    const width = 360, height = 200, pad = 30;
    const lines = [];
    Object.entries(curves).forEach(([name, c]) => {
      const twin = name.endsWith("@random");
      for (const [which, rows] of [["whole set", c.set], [label, c.chosen]]) {
        const points = rows.filter((r) => r[1] === kind);
        if (!points.length) continue;
        lines.push({name: `${name} ${which}`, points: points, colour: which === "whole set" ? OKABE[0] : OKABE[1],
          dash: (twin ? "6 3" : "") + (which === "whole set" ? "" : (twin ? " 2 2" : "2 2"))});
      }
    });
    if (!lines.length) continue;
    const depth = Math.max(...lines.flatMap((l) => l.points.map((p) => p[0]))) || 1;
    const x = (b) => pad + (b / depth) * (width - 2 * pad);
    const y = (v) => height - pad - (v / 100) * (height - 2 * pad);
    const paths = lines.map((l) => `<polyline fill="none" stroke="${l.colour}" stroke-width="2" ` +
      `stroke-dasharray="${l.dash}" points="${l.points.map((p) => x(p[0]) + "," + y(p[2])).join(" ")}">` +
      `<title>${escapeHtml(l.name)}</title></polyline>`).join("");
    const legend = lines.map((l, i) => `<text x="${pad + 4}" y="${14 + i * 13}" font-size="11" fill="${l.colour}">` +
      `${escapeHtml(l.name)}</text>`).join("");
    box.insertAdjacentHTML("beforeend", `<svg width="${width}" height="${height}" role="img" ` +
      `aria-label="identifiability of ${kind} tokens per block"><text x="${width - pad}" y="${height - 8}" ` +
      `font-size="11" text-anchor="end">block (${kind} tokens, % identifiable)</text>` +
      `<line x1="${pad}" y1="${height - pad}" x2="${width - pad}" y2="${height - pad}" stroke="#999"/>` +
      `<line x1="${pad}" y1="${pad}" x2="${pad}" y2="${height - pad}" stroke="#999"/>${paths}${legend}</svg>`);
  }
}

async function showImage(s) {
  const variant = VARIANTS[s.variant];
  $("images-view").hidden = true;
  $("image-view").hidden = false;
  const slider = $("block");
  slider.max = variant.num_blocks;
  slider.value = Math.min(Number(s.block || 0), variant.num_blocks);
  $("block-out").textContent = slider.value;
  $("stream").value = s.stream || "resid";
  $("colour").value = s.colour || "score";
  const compare = $("compare");
  compare.length = 1;
  Object.keys(VARIANTS).filter((n) => n !== s.variant && n !== variant.twin)
    .forEach((n) => compare.add(new Option(n, n)));
  compare.value = s.compare || "";
  $("image-title").textContent = `${s.key} — ${s.variant}, block ${slider.value}, stream ${s.stream || "resid"}`;
  const panels = $("panels");
  panels.replaceChildren();
  const shown = [s.variant, variant.twin, s.compare].filter((n, i, all) => n && VARIANTS[n] && all.indexOf(n) === i);
  for (const name of shown) {
    try {
      await drawPanel(panels, name, s);
    } catch (error) {
      const note = document.createElement("p");
      note.className = "note";
      note.textContent = `${name}: ${error.message}`;
      panels.append(note);
    }
  }
  await Promise.all([drawHeads(s), drawExplain(s), drawCurves($("image-curves"), s.variant, [s.key], "this image")]);
}

// ---------------------------------------------------------------- wiring
async function render() {
  const s = state();
  if (!s.variant || !VARIANTS[s.variant]) {
    go({variant: Object.keys(VARIANTS)[0], view: s.view || "images"});
    return;
  }
  $("variant").value = s.variant;
  status("loading…");
  document.body.dataset.ready = "false";
  try {
    if (s.view === "image" && s.key) await showImage(s); else await showImages(s);
    status("");
  } catch (error) {
    status(error.message);
  }
  document.body.dataset.ready = "true";
}

async function start() {
  const variants = await api("/api/variants");
  variants.forEach((v) => { VARIANTS[v.name] = v; $("variant").add(new Option(v.name, v.name)); });
  for (const [value, text] of [["image_key", "key"], ["class_index", "class"], ["correct", "correct"],
    ["last_block_id_pct", "identifiable image tokens, last block"], ["cls_last_block_rank", "CLS rank, last block"],
    ["ours_negative_auc", "explain: negative deletion AUC (ours)"]]) {
    $("f-sort").add(new Option(text, value));
  }
  $("variant").onchange = () => go({variant: $("variant").value, view: "images", offset: 0, class: "", key: ""});
  const filters = () => go({view: "images", class: $("f-class").value, correct: $("f-correct").value,
    shard: $("f-shard").value, sort: $("f-sort").value, desc: $("f-desc").checked ? "true" : "", offset: 0});
  for (const id of ["f-class", "f-correct", "f-sort", "f-desc", "f-shard"]) $(id).onchange = filters;
  $("prev").onclick = () => go({offset: Math.max(0, Number(state().offset || 0) - PAGE)});
  $("next").onclick = () => go({offset: Number(state().offset || 0) + PAGE});
  $("block").oninput = () => go({block: $("block").value});
  $("stream").onchange = () => go({stream: $("stream").value});
  $("colour").onchange = () => go({colour: $("colour").value});
  $("compare").onchange = () => go({compare: $("compare").value});
  $("home").onclick = (event) => { event.preventDefault(); go({view: "images", key: ""}); };
  window.addEventListener("hashchange", render);
  if (!VARIANTS || !variants.length) { status("this result set has no variants"); return; }
  await render();
}

start().catch((error) => status(error.message));
