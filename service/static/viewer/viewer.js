"use strict";
// icaserve explanation viewer. Plain canvas, no libraries, nothing from the network: every
// request goes to this service's own JSON API (/models, /predict, /explain) and the viewer's
// helpers (/viewer/sample, /viewer/parse). The API key lives in a variable of this page only.

// Colour maps, 256 entries each, copied from matplotlib (so the CLI's pictures match): viridis
// (perceptually uniform, colour-blind safe) for magnitudes, RdBu_r (blue-white-red) for signed values.
const VIRIDIS = "44015444025645045745055946075a46085c460a5d460b5e470d60470e6147106347116447136548146748166848176948186a481a6c481b6d481c6e481d6f481f70482071482173482374482475482576482677482878482979472a7a472c7a472d7b472e7c472f7d46307e46327e46337f463480453581453781453882443983443a83443b84433d84433e85423f854240864241864142874144874045884046883f47883f48893e49893e4a893e4c8a3d4d8a3d4e8a3c4f8a3c508b3b518b3b528b3a538b3a548c39558c39568c38588c38598c375a8c375b8d365c8d365d8d355e8d355f8d34608d34618d33628d33638d32648e32658e31668e31678e31688e30698e306a8e2f6b8e2f6c8e2e6d8e2e6e8e2e6f8e2d708e2d718e2c718e2c728e2c738e2b748e2b758e2a768e2a778e2a788e29798e297a8e297b8e287c8e287d8e277e8e277f8e27808e26818e26828e26828e25838e25848e25858e24868e24878e23888e23898e238a8d228b8d228c8d228d8d218e8d218f8d21908d21918c20928c20928c20938c1f948c1f958b1f968b1f978b1f988b1f998a1f9a8a1e9b8a1e9c891e9d891f9e891f9f881fa0881fa1881fa1871fa28720a38620a48621a58521a68522a78522a88423a98324aa8325ab8225ac8226ad8127ad8128ae8029af7f2ab07f2cb17e2db27d2eb37c2fb47c31b57b32b67a34b67935b77937b87838b9773aba763bbb753dbc743fbc7340bd7242be7144bf7046c06f48c16e4ac16d4cc26c4ec36b50c46a52c56954c56856c66758c7655ac8645cc8635ec96260ca6063cb5f65cb5e67cc5c69cd5b6ccd5a6ece5870cf5773d05675d05477d1537ad1517cd2507fd34e81d34d84d44b86d54989d5488bd6468ed64590d74393d74195d84098d83e9bd93c9dd93ba0da39a2da37a5db36a8db34aadc32addc30b0dd2fb2dd2db5de2bb8de29bade28bddf26c0df25c2df23c5e021c8e020cae11fcde11dd0e11cd2e21bd5e21ad8e219dae319dde318dfe318e2e418e5e419e7e419eae51aece51befe51cf1e51df4e61ef6e620f8e621fbe723fde725";
const RDBU_R = "05306106326407346708366a09386d0a3b700c3d730d3f760e41790f437b10457e114781124984134c87144e8a15508d1752901854931956961a58991b5a9c1c5c9f1d5fa21e61a51f63a82065ab2267ac2369ad246aae266caf276eb02870b12a71b22b73b32c75b42e77b52f79b5307ab6327cb7337eb83480b93681ba3783bb3885bc3a87bd3b88be3c8abe3e8cbf3f8ec0408fc14291c24393c34695c44997c54c99c64f9bc7529dc8569fc959a1ca5ca3cb5fa5cd62a7ce65a9cf68abd06bacd16eaed271b0d375b2d478b4d57bb6d67eb8d781bad884bcd987beda8ac0db8dc2dc90c4dd93c6de96c7df98c8e09bc9e09dcbe1a0cce2a2cde3a5cee3a7d0e4a9d1e5acd2e5aed3e6b1d5e7b3d6e8b6d7e8b8d8e9bbdaeabddbeac0dcebc2ddecc5dfecc7e0edcae1eecce2efcfe4efd1e5f0d2e6f0d4e6f1d5e7f1d7e8f1d8e9f1dae9f2dbeaf2ddebf2deebf2e0ecf3e1edf3e3edf3e4eef4e6eff4e7f0f4e9f0f4eaf1f5ecf2f5edf2f5eff3f5f0f4f6f2f5f6f3f5f6f5f6f7f6f7f7f7f6f6f7f5f4f8f4f2f8f3f0f8f2eff8f1edf9f0ebf9efe9f9eee7f9ede5f9ebe3faeae1fae9dffae8defae7dcfbe6dafbe5d8fbe4d6fbe3d4fce2d2fce0d0fcdfcffcdecdfdddcbfddcc9fddbc7fdd9c4fcd7c2fcd5bffcd3bcfbd0b9fbceb7fbccb4facab1fac8aff9c6acf9c4a9f9c2a7f8bfa4f8bda1f8bb9ef7b99cf7b799f7b596f6b394f6b191f6af8ef5ac8bf5aa89f5a886f4a683f3a481f2a17ff19e7df09c7bef9979ee9677ec9374eb9172ea8e70e98b6ee8896ce6866ae58368e48066e37e64e27b62e17860df765ede735cdd7059dc6e57db6b55da6853d86551d7634fd6604dd55d4cd35a4ad25849d05548cf5246ce4f45cc4c44cb4942c94741c84440c6413ec53e3dc43b3cc2383ac13639bf3338be3036bd2d35bb2a34ba2832b82531b72230b61f2eb41c2db3192cb1182bae172aab162aa81529a51429a213289f12289c1127991027960f27930e26900d268d0c258a0b25870a248409248108237f08237c07227906227605217304217003206d02206a011f67001f";
function parseMap(hex) {
  const out = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256 * 3; i++) out[i] = parseInt(hex.substr(i * 2, 2), 16);
  return out;
}
const MAPS = { viridis: parseMap(VIRIDIS), diverging: parseMap(RDBU_R) };

const METHODS = {
  gradient: [],
  input_x_gradient: [],
  integrated_gradients: [
    { name: "steps", label: "Steps", type: "int", value: 50, min: 1 },
    { name: "baseline", label: "Baseline", type: "choice", value: "mean", choices: ["mean", "zeros"] }],
  smoothgrad: [
    { name: "samples", label: "Samples", type: "int", value: 20, min: 1 },
    { name: "noise", label: "Noise (std units)", type: "float", value: 0.15, min: 0, step: 0.05 },
    { name: "seed", label: "Seed", type: "int", value: 0, min: 0 }],
  occlusion: [
    { name: "window", label: "Window (steps, features)", type: "pair", value: "5,5" },
    { name: "stride", label: "Stride (blank: window)", type: "pair", value: "" },
    { name: "baseline", label: "Baseline", type: "choice", value: "mean", choices: ["mean", "zeros"] }],
  tsr: [
    { name: "base_method", label: "Base method", type: "choice", value: "gradient",
      choices: ["gradient", "input_x_gradient", "integrated_gradients", "smoothgrad"] },
    { name: "threshold_quantile", label: "Threshold quantile", type: "float", value: 0.55, min: 0, max: 1, step: 0.05 },
    { name: "feature_default", label: "Feature default", type: "float", value: 0.1, min: 0, max: 1, step: 0.05 }],
};

const $ = (id) => document.getElementById(id);
const state = {
  apiKey: "",        // typed in; never stored anywhere else
  models: [],        // /models answer
  model: null,       // its entry for the selected model
  sequences: [],     // the loaded file's or sample's sequences (lists of rows)
  seq: null,         // the chosen sequence, T x N (numbers once /predict accepted it)
  source: null,      // {kind: "sample", dataset, seed, label} | {kind: "file", name}
  masks: null,       // per sequence ground truth (npz masks) or null
  boxes: null,       // true boxes of a synthetic sample
  prediction: null,  // /predict's answer for seq
  attention: null,   // T x T from the last explanation with attention
  featureNames: [],
  classNames: [],
};
const panels = [];

// -- talking to the service ------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, body) {
    super(body && body.error ? body.error : `HTTP ${status}`);
    this.status = status; this.body = body || {};
  }
}

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (state.apiKey) headers["Authorization"] = "Bearer " + state.apiKey;
  let resp;
  try {
    resp = await fetch(path, Object.assign({}, opts, { headers }));
  } catch (e) {
    throw new ApiError(0, { error: "the service did not answer (" + e.message + ")", code: "network" });
  }
  const text = await resp.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
  if (!resp.ok) throw new ApiError(resp.status, body || { error: `HTTP ${resp.status}: ${text.slice(0, 200)}` });
  if (body === null) throw new ApiError(resp.status, { error: "the service's answer was not JSON", code: "bad_answer" });
  return body;
}

function postJson(path, data) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(data) });
}

function showError(err) {
  const box = $("error");
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  const b = err.body || {};
  let text = err.message || String(err);
  const parts = [];
  if (err.status) parts.push(`HTTP ${err.status}`);
  if (b.code) parts.push(b.code);
  if (b.field) parts.push(`field: ${b.field}`);
  if (b.request_id) parts.push(`request id: ${b.request_id}`);
  if (parts.length) text += `\n(${parts.join(", ")})`;
  if (err.status === 401) text += "\nType the API key above, then try again.";
  box.textContent = text;
  box.dataset.code = b.code || "";
  box.hidden = false;
  if (err.status === 401) $("apikey").focus();
}

function setStatus(text) { $("status").textContent = text; }

async function guarded(what, fn) {
  setStatus(what + " ...");
  try {
    const out = await fn();
    showError(null);
    setStatus("");
    return out === undefined ? true : out;  // undefined means failure to callers
  } catch (err) {
    showError(err);
    setStatus(what + " failed");
    if (!(err instanceof ApiError)) console.error(err);
    return undefined;
  }
}

function modelPath(suffix) {
  const name = encodeURIComponent(state.model.name);
  const v = $("version").value;
  return v && v !== "latest" ? `/models/${name}/versions/${encodeURIComponent(v)}/${suffix}` : `/models/${name}/${suffix}`;
}

// -- models ----------------------------------------------------------------------------------
async function loadModels(wanted, wantedVersion) {
  const data = await api("/models");
  state.models = data.models || [];
  const sel = $("model");
  sel.replaceChildren();
  for (const m of state.models) sel.add(new Option(m.name + (m.default ? " (default)" : ""), m.name));
  const pick = state.models.find((m) => m.name === wanted) || state.models.find((m) => m.default) || state.models[0];
  if (!pick) throw new ApiError(0, { error: "the store holds no model", code: "no_model" });
  sel.value = pick.name;
  selectModel(pick.name, wantedVersion);
}

function selectModel(name, wantedVersion) {
  state.model = state.models.find((m) => m.name === name);
  const man = state.model.manifest || {};
  const input = man.input || {};
  const vsel = $("version");
  vsel.replaceChildren(new Option("latest", "latest"));
  for (const v of (state.model.versions || []).slice().reverse()) vsel.add(new Option(String(v), String(v)));
  vsel.value = wantedVersion && [...vsel.options].some((o) => o.value === wantedVersion) ? wantedVersion : "latest";
  state.featureNames = input.feature_names || [];
  state.classNames = input.class_names || [];
  const tsel = $("target");
  const keep = tsel.value;
  tsel.replaceChildren(new Option("predicted", "predicted"));
  for (const c of state.classNames) tsel.add(new Option(c, c));
  tsel.value = [...tsel.options].some((o) => o.value === keep) ? keep : "predicted";
  const ica = (man.architecture || {}).attention === "ica";
  $("attention").disabled = !ica;
  const acc = ((man.metrics || {}).test || {}).accuracy;
  $("modelinfo").textContent = man.name ? `${(man.architecture || {}).label || ""} · ${input.n_features} features` +
    ` · ${input.min_length}..${input.max_length} steps · classes ${state.classNames.join(", ")}` +
    (acc !== undefined ? ` · test accuracy ${acc.toFixed(3)}` : "") +
    (state.model.serving_version ? ` · serving v${state.model.serving_version}` : " · not loaded") : "";
  fillFeatures();
  for (const p of panels) p.showQuality();
}

function fillFeatures() {
  const fsel = $("feature");
  const keep = fsel.value;
  const n = state.seq ? state.seq[0].length : state.featureNames.length;
  fsel.replaceChildren();
  for (let i = 0; i < n; i++) fsel.add(new Option(featureName(i), String(i)));
  if ([...fsel.options].some((o) => o.value === keep)) fsel.value = keep;
}

function featureName(i) { return state.featureNames[i] !== undefined ? state.featureNames[i] : `f${i}`; }

// -- inputs ----------------------------------------------------------------------------------
async function generateSample() {
  const man = state.model.manifest || {};
  const input = man.input || {};
  const n = input.n_features || 100;
  let len = input.train_length || Math.min(100, input.max_length || 100);
  len = Math.max(input.min_length || 1, Math.min(len, input.max_length || len));
  const dataset = $("sample-dataset").value, seed = $("sample-seed").value || "0", label = $("sample-label").value;
  const q = new URLSearchParams({ dataset, n_features: n, length: len, seed });
  if (label !== "") q.set("label", label);
  const s = await api("/viewer/sample?" + q);
  state.source = { kind: "sample", dataset, seed, label };
  state.boxes = s.boxes;
  state.masks = null;
  await setSequences(s.inputs, `sample of ${dataset} (seed ${seed}), true class ${s.class_name}; the true box is outlined`);
}

async function parseUpload(bytes, format, name) {
  const r = await api(`/viewer/parse?format=${format}`, {
    method: "POST", headers: { "Content-Type": "application/octet-stream" }, body: bytes });
  state.source = { kind: "file", name };
  state.boxes = null;
  state.masks = r.masks;
  let info = `${name}: ${r.sequences} sequence${r.sequences === 1 ? "" : "s"}`;
  if (r.feature_names) info += ` · file's feature names: ${r.feature_names.slice(0, 5).join(", ")}${r.feature_names.length > 5 ? ", ..." : ""}`;
  await setSequences(r.inputs, info);
}

function setSequences(seqs, info) {
  state.sequences = seqs;
  const sel = $("seq-index");
  sel.replaceChildren();
  seqs.forEach((_, i) => sel.add(new Option(String(i), String(i))));
  $("input-info").textContent = info;
  return useSequence(0);
}

async function useSequence(i) {
  state.seq = state.sequences[i];
  state.seqIndex = i;
  state.prediction = null;
  state.attention = null;
  for (const p of panels) p.clear();
  drawAttention();
  const shape = Array.isArray(state.seq) && Array.isArray(state.seq[0]) ? `${state.seq.length} x ${state.seq[0].length}` : "?";
  $("input-info").textContent = $("input-info").textContent.split(" · sequence")[0] + ` · sequence ${i}: ${shape}`;
  updateUrl();
  await predict();
}

async function predict() {
  const r = await postJson(modelPath("predict"), { inputs: [state.seq] });
  state.prediction = r.predictions[0];
  fillFeatures();
  renderPrediction(r);
}

function renderPrediction(r) {
  const p = r.predictions[0];
  const table = document.createElement("table");
  table.className = "probs";
  table.innerHTML = "<caption class='note'></caption><thead><tr><th scope='col'>class</th><th scope='col'>probability</th><th scope='col'></th></tr></thead>";
  table.caption.textContent = `${r.model} v${r.version}: predicted ${p.label}`;
  const body = document.createElement("tbody");
  for (const [name, prob] of Object.entries(p.probabilities)) {
    const tr = document.createElement("tr");
    if (name === p.label) tr.className = "top";
    const th = document.createElement("th"); th.scope = "row"; th.textContent = name;
    const td = document.createElement("td"); td.textContent = prob.toFixed(4);
    const bar = document.createElement("td");
    const span = document.createElement("span"); span.className = "bar"; span.style.width = Math.round(prob * 200) + "px";
    bar.appendChild(span);
    tr.append(th, td, bar);
    body.appendChild(tr);
  }
  table.appendChild(body);
  $("prediction").replaceChildren(table);
}

// -- one explanation panel -------------------------------------------------------------------
class Panel {
  constructor(key, title) {
    this.key = key;             // "a" or "b": URL prefix of its method parameters
    this.requestNo = 0;         // answers to older requests are dropped
    this.result = null;         // {saliency, time_profile, feature_profile, target, ...}
    this.cursor = null;         // [t, f] selected by keyboard or click
    const el = this.el = document.createElement("div");
    el.className = "panel"; el.id = "panel-" + key;
    el.setAttribute("role", "group"); el.setAttribute("aria-label", title);
    const h = document.createElement("h3"); h.textContent = title;
    const ctl = document.createElement("div"); ctl.className = "controls";
    const m = document.createElement("span"); m.className = "ctl";
    const ml = document.createElement("label"); ml.htmlFor = `method-${key}`; ml.textContent = "Method";
    this.method = document.createElement("select"); this.method.id = `method-${key}`;
    for (const name of Object.keys(METHODS)) this.method.add(new Option(name.replace(/_/g, " "), name));
    m.append(ml, this.method);
    this.params = document.createElement("span"); this.params.className = "params";
    ctl.append(m, this.params);
    this.quality = document.createElement("p"); this.quality.className = "quality";
    this.canvas = document.createElement("canvas");
    this.canvas.id = `heatmap-${key}`; this.canvas.tabIndex = 0; this.canvas.setAttribute("role", "img");
    this.canvas.setAttribute("aria-label", "Saliency heatmap; arrow keys move between cells");
    this.canvas.width = 760; this.canvas.height = 420;
    this.readout = document.createElement("p"); this.readout.className = "readout"; this.readout.setAttribute("aria-live", "polite");
    this.series = document.createElement("canvas"); this.series.id = `series-${key}`;
    this.series.width = 760; this.series.height = 180; this.series.setAttribute("role", "img");
    const dl = document.createElement("div"); dl.className = "controls";
    this.png = document.createElement("button"); this.png.type = "button"; this.png.className = "secondary";
    this.png.textContent = "Download PNG"; this.png.id = `png-${key}`;
    this.npz = document.createElement("button"); this.npz.type = "button"; this.npz.className = "secondary";
    this.npz.textContent = "Download numbers (.npz)"; this.npz.id = `npz-${key}`;
    this.png.disabled = this.npz.disabled = true;
    dl.append(this.png, this.npz);
    el.append(h, ctl, this.quality, this.canvas, this.readout, this.series, dl);
    this.method.addEventListener("change", () => { this.buildParams(); this.showQuality(); updateUrl(); });
    this.png.addEventListener("click", () => this.downloadPng());
    this.npz.addEventListener("click", () => this.downloadNpz());
    this.canvas.addEventListener("mousemove", (e) => this.hover(e));
    this.canvas.addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
    this.canvas.addEventListener("click", (e) => {
      const cell = this.cellAt(e); if (cell) { this.cursor = cell; $("feature").value = String(cell[1]); redrawAll(); }
    });
    this.canvas.addEventListener("keydown", (e) => this.key_(e));
    this.buildParams();
  }

  buildParams(values) {
    this.params.replaceChildren();
    this.inputs = {};
    for (const spec of METHODS[this.method.value]) {
      const wrap = document.createElement("span"); wrap.className = "ctl";
      const id = `p-${this.key}-${spec.name}`;
      const label = document.createElement("label"); label.htmlFor = id; label.textContent = spec.label;
      let input;
      if (spec.type === "choice") {
        input = document.createElement("select");
        for (const c of spec.choices) input.add(new Option(c.replace(/_/g, " "), c));
      } else {
        input = document.createElement("input");
        if (spec.type === "pair") { input.type = "text"; input.size = 6; input.placeholder = "t,f"; }
        else { input.type = "number"; if (spec.min !== undefined) input.min = spec.min; if (spec.max !== undefined) input.max = spec.max;
          input.step = spec.step || (spec.type === "int" ? 1 : "any"); }
      }
      input.id = id;
      input.value = values && values[spec.name] !== undefined ? values[spec.name] : spec.value;
      input.addEventListener("change", updateUrl);
      wrap.append(label, input);
      this.params.append(wrap);
      this.inputs[spec.name] = { spec, input };
    }
  }

  paramValues() {  // as sent to /explain; blank fields fall back to the service's defaults
    const out = {};
    for (const [name, { spec, input }] of Object.entries(this.inputs)) {
      const v = input.value.trim();
      if (v === "") continue;
      if (spec.type === "int") out[name] = parseInt(v, 10);
      else if (spec.type === "float") out[name] = parseFloat(v);
      else if (spec.type === "pair") out[name] = v.split(/[ ,x]+/).filter(Boolean).map((s) => parseInt(s, 10));
      else out[name] = v;
    }
    return out;
  }

  rawParamValues() {
    const out = {};
    for (const [name, { input }] of Object.entries(this.inputs)) out[name] = input.value;
    return out;
  }

  showQuality() {
    const q = qualityOf(state.model && state.model.manifest, this.method.value);
    this.quality.textContent = "Explanation quality (from the manifest): " + q;
  }

  clear() {
    this.requestNo++;
    this.result = null; this.cursor = null;
    const ctx = this.canvas.getContext("2d");
    ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.series.getContext("2d").clearRect(0, 0, this.series.width, this.series.height);
    delete this.canvas.dataset.hottest;
    this.readout.textContent = "";
    this.png.disabled = this.npz.disabled = true;
  }

  async explain() {
    const no = ++this.requestNo;
    const body = {
      inputs: [state.seq], method: this.method.value, parameters: this.paramValues(),
      target: $("target").value, absolute: $("absolute").checked, normalize: $("normalize").value,
      attention: $("attention").checked && !$("attention").disabled && this.key === "a",
    };
    const r = await postJson(modelPath("explain"), body);
    if (no !== this.requestNo) return;  // a newer request replaced this one
    const e = r.explanations[0];
    const a = e.attributions[0];
    this.result = { model: r.model, version: r.version, method: r.method, parameters: body.parameters,
      absolute: body.absolute, normalize: body.normalize, target: a.target, targetIndex: a.target_index,
      saliency: a.saliency, timeProfile: a.time_profile, featureProfile: a.feature_profile,
      logits: e.prediction.logits, probabilities: e.prediction.probabilities };
    if (this.key === "a") state.attention = e.attention;
    if (this.key === "a" && !state.featureChosen) {  // the series of the hottest feature, unless one was chosen
      let best = -1, bf = 0;
      a.saliency.forEach((row) => row.forEach((v, f) => { if (Math.abs(v) > best) { best = Math.abs(v); bf = f; } }));
      $("feature").value = String(bf);
    }
    this.cursor = null;
    this.draw();
    this.png.disabled = this.npz.disabled = false;
  }

  geometry() {
    const T = this.result.saliency.length, N = this.result.saliency[0].length;
    const left = 78, top = 34, w = 480, h = Math.max(160, Math.min(300, N * 12));
    return { T, N, left, top, w, h, cw: w / T, ch: h / N,
      fpLeft: left + w + 10, fpW: 80, cbLeft: left + w + 104, tpTop: top + h + 34, tpH: 70 };
  }

  draw() {
    if (!this.result) return;
    const c = this.canvas, ctx = c.getContext("2d"), g = this.geometry(), r = this.result;
    const { T, N } = g;
    c.height = g.tpTop + g.tpH + 30;
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, c.width, c.height);
    const signed = !r.absolute;
    const map = signed ? MAPS.diverging : MAPS.viridis;
    // colour range over the drawn values; signed: symmetric about 0 so white is zero
    let lo = Infinity, hi = -Infinity, best = -1, bestT = 0, bestF = 0;
    for (let t = 0; t < T; t++) for (let f = 0; f < N; f++) {
      const v = r.saliency[t][f];
      if (v < lo) lo = v; if (v > hi) hi = v;
      const m = Math.abs(v);
      if (m > best) { best = m; bestT = t; bestF = f; }
    }
    if (signed) { const m = Math.max(Math.abs(lo), Math.abs(hi)) || 1; lo = -m; hi = m; }
    else if (hi <= lo) hi = lo + 1;
    this.range = [lo, hi];
    // the cells: one pixel each in an offscreen image, scaled up without smoothing
    const off = document.createElement("canvas"); off.width = T; off.height = N;
    const octx = off.getContext("2d"), img = octx.createImageData(T, N);
    for (let t = 0; t < T; t++) for (let f = 0; f < N; f++) {
      const k = Math.max(0, Math.min(255, Math.round((r.saliency[t][f] - lo) / (hi - lo) * 255))) * 3;
      const p = (f * T + t) * 4;
      img.data[p] = map[k]; img.data[p + 1] = map[k + 1]; img.data[p + 2] = map[k + 2]; img.data[p + 3] = 255;
    }
    octx.putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, g.left, g.top, g.w, g.h);
    // the hottest cell drawn, for people (a ring) and for tests (data attributes)
    c.dataset.hottest = `${bestT},${bestF}`;
    c.dataset.hottestTime = String(bestT); c.dataset.hottestFeature = String(bestF);
    c.dataset.cells = `${T}x${N}`;
    ctx.font = "12px system-ui, sans-serif"; ctx.fillStyle = "#111"; ctx.textBaseline = "middle";
    ctx.fillText(`${r.model} v${r.version} · ${r.method} · target ${r.target} · ${signed ? "signed" : "absolute"}` +
      (r.normalize !== "none" ? ` · ${r.normalize}` : ""), g.left, 12);
    this.drawBox(ctx, g);
    this.drawAxes(ctx, g);
    this.drawProfiles(ctx, g, r);
    this.drawColourBar(ctx, g, map, lo, hi);
    ctx.strokeStyle = "#e69f00"; ctx.lineWidth = 2;
    ctx.strokeRect(g.left + bestT * g.cw - 2, g.top + bestF * g.ch - 2, g.cw + 4, g.ch + 4);
    this.base = document.createElement("canvas"); this.base.width = c.width; this.base.height = c.height;
    this.base.getContext("2d").drawImage(c, 0, 0);
    this.drawCursor();
    this.drawSeries();
    this.readout.textContent = `hottest cell: time ${bestT}, ${featureName(bestF)}, saliency ${fmt(r.saliency[bestT][bestF])}`;
  }

  drawBox(ctx, g) {
    const mask = trueMask(g.T, g.N);
    if (!mask) return;
    // the outline of the ground truth: every cell edge between a box cell and a non-box cell
    for (const [colour, width] of [["#000", 3], ["#fff", 1.2]]) {
      ctx.strokeStyle = colour; ctx.lineWidth = width; ctx.beginPath();
      for (let t = 0; t < g.T; t++) for (let f = 0; f < g.N; f++) {
        if (!mask[t][f]) continue;
        const x0 = g.left + t * g.cw, y0 = g.top + f * g.ch, x1 = x0 + g.cw, y1 = y0 + g.ch;
        if (t === 0 || !mask[t - 1][f]) { ctx.moveTo(x0, y0); ctx.lineTo(x0, y1); }
        if (t === g.T - 1 || !mask[t + 1][f]) { ctx.moveTo(x1, y0); ctx.lineTo(x1, y1); }
        if (f === 0 || !mask[t][f - 1]) { ctx.moveTo(x0, y0); ctx.lineTo(x1, y0); }
        if (f === g.N - 1 || !mask[t][f + 1]) { ctx.moveTo(x0, y1); ctx.lineTo(x1, y1); }
      }
      ctx.stroke();
    }
  }

  drawAxes(ctx, g) {
    ctx.fillStyle = "#111"; ctx.strokeStyle = "#111"; ctx.lineWidth = 1;
    ctx.font = "11px system-ui, sans-serif";
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    const fstep = Math.max(1, Math.ceil(12 / g.ch));
    for (let f = 0; f < g.N; f += fstep) {
      const y = g.top + (f + 0.5) * g.ch;
      ctx.fillText(ellipsis(featureName(f), 11), g.left - 4, y);
    }
    const tstep = niceStep(g.T, g.w / 40);
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    for (let t = 0; t < g.T; t += tstep) {
      const x = g.left + (t + 0.5) * g.cw;
      ctx.beginPath(); ctx.moveTo(x, g.top + g.h); ctx.lineTo(x, g.top + g.h + 3); ctx.stroke();
      ctx.fillText(String(t), x, g.top + g.h + 4);
    }
    ctx.fillText("time step", g.left + g.w / 2, g.top + g.h + 17);
    ctx.save(); ctx.translate(12, g.top + g.h / 2); ctx.rotate(-Math.PI / 2);
    ctx.textBaseline = "middle"; ctx.fillText("feature", 0, 0); ctx.restore();
    ctx.strokeRect(g.left, g.top, g.w, g.h);
  }

  drawProfiles(ctx, g, r) {
    // feature profile: a bar per feature, beside the heatmap's rows
    const fp = r.featureProfile, tp = r.timeProfile;
    const fmax = Math.max(...fp.map(Math.abs)) || 1, tmax = Math.max(...tp.map(Math.abs)) || 1;
    const signedF = fp.some((v) => v < 0), signedT = tp.some((v) => v < 0);
    ctx.fillStyle = "#0b5cad";
    const fx0 = signedF ? g.fpLeft + g.fpW / 2 : g.fpLeft;
    const fscale = (signedF ? g.fpW / 2 : g.fpW) / fmax;
    for (let f = 0; f < g.N; f++) ctx.fillRect(Math.min(fx0, fx0 + fp[f] * fscale), g.top + f * g.ch,
      Math.abs(fp[f] * fscale), Math.max(1, g.ch - (g.ch > 3 ? 1 : 0)));
    ctx.strokeStyle = "#999"; ctx.strokeRect(g.fpLeft, g.top, g.fpW, g.h);
    ctx.fillStyle = "#111"; ctx.font = "11px system-ui, sans-serif"; ctx.textAlign = "center"; ctx.textBaseline = "bottom";
    ctx.fillText("feature profile", g.fpLeft + g.fpW / 2, g.top - 2);
    // time profile: a bar per time step, under the heatmap's columns
    const ty0 = signedT ? g.tpTop + g.tpH / 2 : g.tpTop + g.tpH;
    const tscale = (signedT ? g.tpH / 2 : g.tpH) / tmax;
    ctx.fillStyle = "#0b5cad";
    for (let t = 0; t < g.T; t++) ctx.fillRect(g.left + t * g.cw, Math.min(ty0, ty0 - tp[t] * tscale),
      Math.max(1, g.cw - (g.cw > 3 ? 1 : 0)), Math.abs(tp[t] * tscale));
    ctx.strokeStyle = "#999"; ctx.strokeRect(g.left, g.tpTop, g.w, g.tpH);
    ctx.fillStyle = "#111"; ctx.textAlign = "left"; ctx.textBaseline = "top";
    ctx.fillText("time profile (saliency summed over features)", g.left, g.tpTop + g.tpH + 4);
    ctx.textAlign = "right"; ctx.fillText(fmt(tmax), g.left - 4, g.tpTop);
  }

  drawColourBar(ctx, g, map, lo, hi) {
    const x = g.cbLeft, w = 14;
    for (let i = 0; i < g.h; i++) {
      const k = Math.round((1 - i / (g.h - 1)) * 255) * 3;
      ctx.fillStyle = `rgb(${map[k]},${map[k + 1]},${map[k + 2]})`;
      ctx.fillRect(x, g.top + i, w, 1.5);
    }
    ctx.strokeStyle = "#111"; ctx.strokeRect(x, g.top, w, g.h);
    ctx.fillStyle = "#111"; ctx.textAlign = "left"; ctx.textBaseline = "middle"; ctx.font = "11px system-ui, sans-serif";
    for (const [v, y] of [[hi, g.top], [(lo + hi) / 2, g.top + g.h / 2], [lo, g.top + g.h]]) ctx.fillText(fmt(v), x + w + 4, y);
    ctx.save(); ctx.translate(x + w + 58, g.top + g.h / 2); ctx.rotate(Math.PI / 2); ctx.textAlign = "center";
    ctx.fillText("saliency", 0, 0); ctx.restore();
  }

  drawCursor() {
    if (!this.base) return;
    const ctx = this.canvas.getContext("2d");
    ctx.drawImage(this.base, 0, 0);
    if (!this.cursor) return;
    const g = this.geometry();
    const [t, f] = this.cursor;
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 2;
    ctx.strokeRect(g.left + t * g.cw - 1, g.top + f * g.ch - 1, g.cw + 2, g.ch + 2);
    ctx.strokeStyle = "#000"; ctx.lineWidth = 1;
    ctx.strokeRect(g.left + t * g.cw - 2.5, g.top + f * g.ch - 2.5, g.cw + 5, g.ch + 5);
  }

  drawSeries() {
    const c = this.series, ctx = c.getContext("2d"), r = this.result;
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, c.width, c.height);
    if (!r || !state.seq) return;
    const f = Math.min(parseInt($("feature").value || "0", 10) || 0, r.saliency[0].length - 1);
    const g = this.geometry(), T = g.T, left = g.left, w = g.w, top = 22, h = c.height - 52;
    const xs = state.seq.map((row) => Number(row[f])), ss = r.saliency.map((row) => row[f]);
    const smax = Math.max(...ss.map(Math.abs)) || 1;
    let lo = Math.min(...xs), hi = Math.max(...xs); if (hi <= lo) { hi = lo + 1; }
    // saliency of this feature: orange bars (right axis); the raw input: a dark line (left axis)
    ctx.fillStyle = "rgba(230, 159, 0, 0.55)";
    const signed = ss.some((v) => v < 0), y0 = signed ? top + h / 2 : top + h, sc = (signed ? h / 2 : h) / smax;
    for (let t = 0; t < T; t++) ctx.fillRect(left + t * g.cw, Math.min(y0, y0 - ss[t] * sc), Math.max(1, g.cw - 1), Math.abs(ss[t] * sc));
    ctx.strokeStyle = "#1b1b1b"; ctx.lineWidth = 1.5; ctx.beginPath();
    xs.forEach((v, t) => { const x = left + (t + 0.5) * g.cw, y = top + h - (v - lo) / (hi - lo) * h;
      if (t) ctx.lineTo(x, y); else ctx.moveTo(x, y); });
    ctx.stroke();
    const mask = trueMask(T, r.saliency[0].length);
    if (mask) {  // the true box's time steps for this feature
      ctx.fillStyle = "#000";
      for (let t = 0; t < T; t++) if (mask[t][f]) ctx.fillRect(left + t * g.cw, top + h + 2, g.cw, 3);
    }
    ctx.strokeStyle = "#999"; ctx.strokeRect(left, top, w, h);
    ctx.fillStyle = "#111"; ctx.font = "11px system-ui, sans-serif"; ctx.textBaseline = "middle";
    ctx.textAlign = "right"; ctx.fillText(fmt(hi), left - 4, top); ctx.fillText(fmt(lo), left - 4, top + h);
    ctx.textAlign = "left"; ctx.fillText(fmt(smax), left + w + 4, signed ? top : top); ctx.fillText(signed ? fmt(-smax) : "0", left + w + 4, top + h);
    ctx.textBaseline = "top"; ctx.textAlign = "left";
    ctx.fillText(`${featureName(f)}: input (line, left axis) and saliency (bars, right axis) over time` +
      (mask ? "; black ticks: true box" : ""), left, 4);
    ctx.textAlign = "center"; ctx.fillText("time step", left + w / 2, top + h + 8);
  }

  cellAt(e) {
    if (!this.result) return null;
    const rect = this.canvas.getBoundingClientRect();
    const x = (e.clientX - rect.left) * this.canvas.width / rect.width, y = (e.clientY - rect.top) * this.canvas.height / rect.height;
    const g = this.geometry();
    const t = Math.floor((x - g.left) / g.cw), f = Math.floor((y - g.top) / g.ch);
    return t >= 0 && t < g.T && f >= 0 && f < g.N ? [t, f] : null;
  }

  cellText(t, f) {
    const x = state.seq && state.seq[t] ? Number(state.seq[t][f]) : NaN;
    return `time ${t}\nfeature ${featureName(f)} (#${f})\ninput ${fmt(x)}\nsaliency ${fmt(this.result.saliency[t][f])}`;
  }

  hover(e) {
    const cell = this.cellAt(e), tip = $("tooltip");
    if (!cell) { tip.hidden = true; return; }
    tip.textContent = this.cellText(cell[0], cell[1]);
    tip.style.left = (e.clientX + 14) + "px"; tip.style.top = (e.clientY + 14) + "px";
    tip.hidden = false;
  }

  key_(e) {
    if (!this.result) return;
    const g = this.geometry();
    const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    if (!(e.key in moves) && e.key !== "Enter") return;
    e.preventDefault();
    const [t0, f0] = this.cursor || (this.canvas.dataset.hottest || "0,0").split(",").map(Number);
    if (e.key === "Enter") { $("feature").value = String(f0); redrawAll(); return; }
    const [dt, df] = moves[e.key];
    this.cursor = [Math.max(0, Math.min(g.T - 1, t0 + dt)), Math.max(0, Math.min(g.N - 1, f0 + df))];
    this.drawCursor();
    this.readout.textContent = this.cellText(...this.cursor).replace(/\n/g, " · ") + " (Enter: show this feature's series)";
  }

  downloadPng() {
    this.canvas.toBlob((blob) => saveBlob(blob, this.fileStem() + ".png"), "image/png");
  }

  fileStem() {
    const r = this.result;
    return `${r.model}-v${r.version}-${r.method}-${r.target}`.replace(/[^A-Za-z0-9._-]+/g, "_");
  }

  downloadNpz() {
    const r = this.result, T = r.saliency.length, N = r.saliency[0].length;
    const arrays = {
      inputs: npy(Float32Array, "<f4", [T, N], state.seq.flat().map(Number)),
      saliency: npy(Float32Array, "<f4", [1, T, N], r.saliency.flat()),
      time_profile: npy(Float32Array, "<f4", [1, T], r.timeProfile),
      feature_profile: npy(Float32Array, "<f4", [1, N], r.featureProfile),
      targets: npy(Int32Array, "<i4", [1], [r.targetIndex]),
      logits: npy(Float32Array, "<f4", [r.logits.length], r.logits),
      probabilities: npy(Float32Array, "<f4", [r.logits.length], Object.values(r.probabilities)),
    };
    if (this.key === "a" && state.attention) arrays.attention = npy(Float32Array, "<f4", [T, T], state.attention.flat());
    const mask = trueMask(T, N);
    if (mask) arrays.mask = npy(Uint8Array, "|u1", [T, N], mask.flat().map((v) => (v ? 1 : 0)));
    const meta = { model: r.model, version: r.version, method: r.method, parameters: r.parameters, target: r.target,
      absolute: r.absolute, normalize: r.normalize, class_names: Object.keys(r.probabilities),
      feature_names: Array.from({ length: N }, (_, i) => featureName(i)), source: state.source };
    const metaBytes = new TextEncoder().encode(JSON.stringify(meta));
    arrays.meta = npy(Uint8Array, "|u1", [metaBytes.length], metaBytes);
    saveBlob(new Blob([zipStored(arrays)], { type: "application/x-npz" }), this.fileStem() + ".npz");
  }
}

function trueMask(T, N) {
  if (state.boxes && state.boxes.length) {
    const m = Array.from({ length: T }, () => new Array(N).fill(false));
    for (const b of state.boxes) for (let t = b.t_start; t < Math.min(b.t_end, T); t++)
      for (let f = b.f_start; f < Math.min(b.f_end, N); f++) m[t][f] = true;
    return m;
  }
  const mk = state.masks && state.masks[state.seqIndex || 0];
  if (mk && mk.length === T && mk[0].length === N) return mk.map((row) => row.map(Boolean));
  return null;
}

function qualityOf(manifest, method) {
  // the manifest's `explanation_quality`: {dataset, n_samples, seed, accuracy, methods: {method: {metric: value}}}
  const q = manifest && manifest.explanation_quality;
  let entry = q && typeof q === "object" ? ((q.methods || {})[method] ?? q[method]) : undefined;
  let where = q && q.dataset ? ` (on ${q.n_samples} samples of ${q.dataset})` : "";
  if ((entry === null || entry === undefined) && method === "gradient" && manifest && manifest.metrics &&
      manifest.metrics.saliency_gradient) {  // older records: `icaserve evaluate --publish` kept gradient's here
    entry = manifest.metrics.saliency_gradient; where = "";
  }
  if (entry === null || entry === undefined) return "not measured";
  if (typeof entry === "number") return fmt(entry) + where;
  if (typeof entry !== "object") return String(entry) + where;
  const parts = Object.entries(entry).map(([k, v]) =>
    `${k.replace(/_/g, " ")} ${typeof v === "number" ? fmt(v) : v === null ? "n/a" : String(v)}`);
  return parts.length ? parts.join(" · ") + where : "not measured";
}

function drawAttention() {
  const box = $("attention-box"), c = $("attention-canvas"), A = state.attention;
  if (!A || !A.length) { box.hidden = true; return; }
  box.hidden = false;
  const ctx = c.getContext("2d"), T = A.length, left = 50, top = 10, size = 400;
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, c.width, c.height);
  // colour range to the 99th percentile of the weights on and below the diagonal: the first rows
  // (step 0 attends only to itself, weight 1) would otherwise leave every other row dark
  const vals = [];
  for (let i = 0; i < T; i++) for (let j = 0; j <= i; j++) vals.push(A[i][j]);
  vals.sort((x, y) => x - y);
  const hi = vals[Math.min(vals.length - 1, Math.floor(vals.length * 0.99))] || 1;
  const off = document.createElement("canvas"); off.width = T; off.height = T;
  const octx = off.getContext("2d"), img = octx.createImageData(T, T);
  for (let i = 0; i < T; i++) for (let j = 0; j < T; j++) {
    const k = Math.round(Math.max(0, Math.min(1, A[i][j] / hi)) * 255) * 3, p = (i * T + j) * 4;
    img.data[p] = MAPS.viridis[k]; img.data[p + 1] = MAPS.viridis[k + 1]; img.data[p + 2] = MAPS.viridis[k + 2]; img.data[p + 3] = 255;
  }
  octx.putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, left, top, size, size);
  ctx.strokeStyle = "#111"; ctx.strokeRect(left, top, size, size);
  ctx.fillStyle = "#111"; ctx.font = "11px system-ui, sans-serif"; ctx.textAlign = "center"; ctx.textBaseline = "top";
  const step = niceStep(T, 10);
  for (let t = 0; t < T; t += step) ctx.fillText(String(t), left + (t + 0.5) * size / T, top + size + 3);
  ctx.fillText("attended time step", left + size / 2, top + size + 18);
  ctx.textAlign = "right"; ctx.textBaseline = "middle";
  for (let t = 0; t < T; t += step) ctx.fillText(String(t), left - 4, top + (t + 0.5) * size / T);
  ctx.save(); ctx.translate(12, top + size / 2); ctx.rotate(-Math.PI / 2); ctx.textAlign = "center";
  ctx.fillText("time step t", 0, 0); ctx.restore();
  for (let i = 0; i < size; i++) {  // colour bar
    const k = Math.round((1 - i / (size - 1)) * 255) * 3;
    ctx.fillStyle = `rgb(${MAPS.viridis[k]},${MAPS.viridis[k + 1]},${MAPS.viridis[k + 2]})`;
    ctx.fillRect(left + size + 12, top + i, 12, 1.5);
  }
  ctx.fillStyle = "#111"; ctx.textAlign = "left";
  ctx.fillText("\u2265 " + fmt(hi), left + size + 28, top + 4); ctx.fillText("0", left + size + 28, top + size - 4);
}

// -- small helpers -----------------------------------------------------------------------------
function fmt(v) {
  if (typeof v !== "number" || !isFinite(v)) return String(v);
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? v.toExponential(2) : Number(v.toPrecision(3)).toString();
}
function ellipsis(s, n) { return s.length > n ? s.slice(0, n - 1) + "\u2026" : s; }
function niceStep(n, maxTicks) {
  const raw = n / Math.max(1, maxTicks);
  for (const s of [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000]) if (s >= raw) return s;
  return Math.ceil(raw);
}

function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url; a.download = name; document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 30000);
}

// .npy (format 1.0): magic, header length, a Python-literal header padded to 64 bytes, the data
function npy(Type, descr, shape, values) {
  const data = new Type(values.length);
  for (let i = 0; i < values.length; i++) data[i] = values[i];
  const shapeText = shape.length === 1 ? `(${shape[0]},)` : `(${shape.join(", ")})`;
  let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': ${shapeText}, }`;
  const pad = 64 - ((10 + header.length + 1) % 64);
  header += " ".repeat(pad % 64) + "\n";
  const out = new Uint8Array(10 + header.length + data.byteLength);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0, header.length & 0xff, header.length >> 8]);
  out.set(new TextEncoder().encode(header), 10);
  out.set(new Uint8Array(data.buffer), 10 + header.length);  // typed arrays are little-endian on every browser platform
  return out;
}

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) { let c = n; for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1; t[n] = c >>> 0; }
  return t;
})();
function crc32(bytes) {
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

// A zip of stored (uncompressed) entries, which is all np.load needs for an .npz.
function zipStored(files) {
  const enc = new TextEncoder(), locals = [], centrals = [];
  let offset = 0;
  for (const [name, data] of Object.entries(files)) {
    const fname = enc.encode(name + ".npy"), crc = crc32(data);
    const local = new DataView(new ArrayBuffer(30));
    local.setUint32(0, 0x04034b50, true); local.setUint16(4, 20, true); local.setUint16(6, 0, true);
    local.setUint16(8, 0, true); local.setUint16(10, 0, true); local.setUint16(12, 0x21, true);
    local.setUint32(14, crc, true); local.setUint32(18, data.length, true); local.setUint32(22, data.length, true);
    local.setUint16(26, fname.length, true); local.setUint16(28, 0, true);
    const central = new DataView(new ArrayBuffer(46));
    central.setUint32(0, 0x02014b50, true); central.setUint16(4, 20, true); central.setUint16(6, 20, true);
    central.setUint16(8, 0, true); central.setUint16(10, 0, true); central.setUint16(12, 0, true);
    central.setUint16(14, 0x21, true); central.setUint32(16, crc, true); central.setUint32(20, data.length, true);
    central.setUint32(24, data.length, true); central.setUint16(28, fname.length, true);
    central.setUint32(42, offset, true);
    locals.push(new Uint8Array(local.buffer), fname, data);
    centrals.push(new Uint8Array(central.buffer), fname);
    offset += 30 + fname.length + data.length;
  }
  const cdSize = centrals.reduce((s, a) => s + a.length, 0);
  const end = new DataView(new ArrayBuffer(22));
  const count = Object.keys(files).length;
  end.setUint32(0, 0x06054b50, true); end.setUint16(8, count, true); end.setUint16(10, count, true);
  end.setUint32(12, cdSize, true); end.setUint32(16, offset, true);
  return new Blob([...locals, ...centrals, new Uint8Array(end.buffer)]);
}

// -- the view's state in the URL ---------------------------------------------------------------
let restoring = true;  // no URL writes while the URL is being read back
function updateUrl() {
  if (restoring) return;
  const q = new URLSearchParams();
  if (state.model) q.set("model", state.model.name);
  if ($("version").value !== "latest") q.set("version", $("version").value);
  if (state.source && state.source.kind === "sample") {
    q.set("sample", state.source.dataset);
    if (state.source.seed !== "0") q.set("seed", state.source.seed);
    if (state.source.label !== "") q.set("label", state.source.label);
  }
  for (const p of panels) {
    if (p.key === "b" && !$("compare").checked) continue;
    q.set(p.key === "a" ? "method" : "method2", p.method.value);
    for (const [k, v] of Object.entries(p.rawParamValues())) if (v !== "") q.set(`${p.key}.${k}`, v);
  }
  q.set("target", $("target").value);
  if (!$("absolute").checked) q.set("absolute", "0");
  if ($("normalize").value !== "none") q.set("normalize", $("normalize").value);
  if ($("attention").checked === false) q.set("attention", "0");
  history.replaceState(null, "", "/viewer?" + q.toString());
}

function redrawAll() { for (const p of panels) { p.draw(); } drawAttention(); updateUrl(); }

async function explainAll() {
  if (!state.seq) { showError(new ApiError(0, { error: "load a sequence first (a sample, a file or pasted JSON)", code: "no_input" })); return; }
  const active = panels.filter((p) => p.key === "a" || $("compare").checked);
  await guarded("Explaining", async () => {
    for (const p of panels) p.el.setAttribute("aria-busy", "true");
    try {
      state.attention = null;
      const results = await Promise.allSettled(active.map((p) => p.explain()));
      drawAttention();
      for (const p of active) p.drawSeries();  // panel A may have picked the feature after B drew
      const failed = results.find((r) => r.status === "rejected");
      if (failed) throw failed.reason;
    } finally {
      for (const p of panels) p.el.removeAttribute("aria-busy");
    }
  });
  document.body.dataset.explained = String((+document.body.dataset.explained || 0) + 1);
}

// -- wiring ------------------------------------------------------------------------------------
async function main() {
  const q = new URLSearchParams(location.search);
  panels.push(new Panel("a", "Method A"), new Panel("b", "Method B"));
  for (const p of panels) $("panels").appendChild(p.el);
  for (const p of panels) {
    const m = q.get(p.key === "a" ? "method" : "method2");
    if (m && METHODS[m]) p.method.value = m;
    const vals = {};
    for (const spec of METHODS[p.method.value]) if (q.has(`${p.key}.${spec.name}`)) vals[spec.name] = q.get(`${p.key}.${spec.name}`);
    p.buildParams(vals);
  }
  $("compare").checked = q.has("method2");
  panels[1].el.hidden = !$("compare").checked;
  if (q.get("absolute") === "0") $("absolute").checked = false;
  if (q.get("normalize")) $("normalize").value = q.get("normalize");
  if (q.get("attention") === "0") $("attention").checked = false;
  if (q.get("sample")) $("sample-dataset").value = q.get("sample");
  if (q.get("seed")) $("sample-seed").value = q.get("seed");
  if (q.get("label") !== null) $("sample-label").value = q.get("label");

  $("apikey").addEventListener("change", async () => {
    state.apiKey = $("apikey").value;
    if (!state.models.length) await guarded("Loading models", () => loadModels(q.get("model"), q.get("version")));
  });
  $("model").addEventListener("change", () => guarded("Switching model", async () => {
    selectModel($("model").value); updateUrl();
    if (state.source && state.source.kind === "sample") await generateSample();
    else if (state.seq) await useSequence(state.seqIndex || 0);
  }));
  $("version").addEventListener("change", () => guarded("Predicting", async () => { updateUrl(); if (state.seq) await useSequence(state.seqIndex || 0); }));
  $("sample-go").addEventListener("click", () => guarded("Generating a sample", generateSample));
  $("file").addEventListener("change", () => guarded("Reading the file", async () => {
    const file = $("file").files[0];
    if (!file) return;
    const ext = (file.name.split(".").pop() || "").toLowerCase();
    if (!["csv", "json", "npz"].includes(ext)) throw new ApiError(0, { error: `${file.name}: give a .csv, .json or .npz file`, code: "invalid_input", field: "file" });
    await parseUpload(await file.arrayBuffer(), ext, file.name);
  }));
  $("paste-go").addEventListener("click", () => guarded("Reading the pasted JSON", () =>
    parseUpload(new TextEncoder().encode($("paste").value), "json", "pasted JSON")));
  $("seq-index").addEventListener("change", () => guarded("Predicting", () => useSequence(parseInt($("seq-index").value, 10))));
  $("explain-go").addEventListener("click", explainAll);
  $("compare").addEventListener("change", () => { panels[1].el.hidden = !$("compare").checked; updateUrl(); });
  for (const id of ["target", "absolute", "normalize", "attention"]) $(id).addEventListener("change", updateUrl);
  $("feature").addEventListener("change", () => { state.featureChosen = true; for (const p of panels) p.drawSeries(); updateUrl(); });

  const ok = await guarded("Loading models", () => loadModels(q.get("model"), q.get("version")));
  if (q.get("target")) { const t = $("target"); if ([...t.options].some((o) => o.value === q.get("target"))) t.value = q.get("target"); }
  for (const p of panels) p.showQuality();
  restoring = false;
  if (ok !== undefined && q.get("sample")) {
    const loaded = await guarded("Generating a sample", async () => { await generateSample(); return true; });
    if (loaded) await explainAll();
  }
  updateUrl();
  document.body.dataset.ready = "1";
}

main();
