// Try: pick an image (upload, URL, s3:// URL or a bucket listing) and a model; SAM models take positive and
// negative clicks and a dragged box, detectors draw what they find, concept models (SAM 3) every instance of
// the typed phrases, and a model with both heads (SAM 3) every object like the one clicked ("Find all like
// this"). Prompts are sent in image pixels.

import { api, can, needs } from "./api.js";
import { Browser } from "./browse.js";
import { Stage, colour } from "./stage.js";
import { $, el, errorText, timingBar } from "./ui.js";

const CLIENT_ID = `console-${Math.random().toString(36).slice(2, 10)}`;
const DRAG_PIXELS = 5; // screen pixels a press must move to be a box rather than a click

const state = {
  image: null, // {src, name, ref: {file} | {url}, width, height, ids: {model: image_id}}
  models: [],
  prompts: [], // {kind: "point", x, y, positive} | {kind: "box", box}
  sequence: 0,
  drag: null,
  lastDetection: null,
};

let stage;
let browser;

export function initTry() {
  stage = new Stage($("#try-stage"));
  browser = new Browser($("#try-browser"), (url) => openUrl(url));
  $("#try-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) openFile(file);
  });
  $("#try-url-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const url = $("#try-url").value.trim();
    if (url) openUrl(url);
  });
  $("#try-browse").addEventListener("click", () => browser.toggle());
  $("#try-model").addEventListener("change", () => modelChanged());
  $("#try-undo").addEventListener("click", undo);
  $("#try-clear").addEventListener("click", () => {
    state.prompts = [];
    promptsChanged();
  });
  $("#try-conf").addEventListener("input", () => {
    $("#try-conf-value").textContent = Number($("#try-conf").value).toFixed(2);
  });
  $("#try-conf").addEventListener("change", () => detect());
  $("#try-detect").addEventListener("click", () => detect());
  $("#try-concept-tools").addEventListener("submit", (event) => {
    event.preventDefault();
    findConcepts();
  });
  $("#try-score").addEventListener("input", () => {
    $("#try-score-value").textContent = Number($("#try-score").value).toFixed(2);
  });
  $("#try-score").addEventListener("change", () => findConcepts());
  $("#try-find-like").addEventListener("click", () => findLike());
  document.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key === "z" && !$("#tab-try").hidden) {
      event.preventDefault();
      undo();
    }
  });
  const layer = stage.svg;
  layer.addEventListener("contextmenu", (event) => event.preventDefault());
  layer.addEventListener("pointerdown", pointerDown);
  layer.addEventListener("pointermove", pointerMove);
  layer.addEventListener("pointerup", pointerUp);
}

export function setModels(models) {
  state.models = models;
  const select = $("#try-model");
  const chosen = select.value;
  const usable = models.filter((m) => ["segmenter", "concept", "detector"].some((k) => m.kinds.includes(k)));
  const rank = (m) => (m.state === "loaded" ? 0 : 2) + (m.kinds.includes("segmenter") ? 0 : 1); // SAM first
  usable.sort((a, b) => rank(a) - rank(b) || a.name.localeCompare(b.name));
  const kind = (m) => (m.kinds.includes("segmenter") ? "SAM" : m.kinds.includes("concept") ? "concepts" : m.task || "detector");
  select.replaceChildren(
    ...usable.map((m) => {
      const option = el("option", { value: m.name }, `${m.name} (${kind(m)}, ${m.state}${m.weights === "random-init" ? ", random-init" : ""})`);
      option.disabled = m.state !== "loaded";
      return option;
    }),
  );
  if (chosen && usable.some((m) => m.name === chosen && m.state === "loaded")) select.value = chosen;
  modelChanged(chosen === select.value);
}

export function accessChanged() {
  const allowed = can("interactive");
  $("#try-denied").textContent = allowed ? "" : needs("interactive");
  $("#try-denied").hidden = allowed;
  for (const control of document.querySelectorAll("#tab-try .needs-interactive")) control.disabled = !allowed;
}

function model() {
  return state.models.find((m) => m.name === $("#try-model").value) || null;
}

function isSegmenter() {
  const m = model();
  return Boolean(m && m.kinds.includes("segmenter"));
}

// A concept model (SAM 3) answers phrases, even when a vocabulary also makes it a detector.
function isConcept() {
  const m = model();
  return Boolean(m && m.kinds.includes("concept"));
}

function status(text, isError = false) {
  const line = $("#try-status");
  line.textContent = text;
  line.classList.toggle("error", isError);
}

function modelChanged(same = false) {
  const segmenter = isSegmenter();
  $("#try-sam-tools").hidden = !segmenter;
  $("#try-concept-tools").hidden = !isConcept();
  $("#try-find-like").hidden = !(segmenter && isConcept());
  $("#try-detect-tools").hidden = segmenter || isConcept() || !model();
  $("#try-stage").classList.toggle("clicking", segmenter);
  $("#try-embedding-line").hidden = !segmenter;
  if (same) return;
  state.prompts = [];
  state.lastDetection = null;
  stage.clear();
  $("#try-results").replaceChildren();
  if (state.image) afterImage();
}

async function openFile(file) {
  const src = URL.createObjectURL(file);
  await openImage({ src, name: file.name, ref: { file } });
}

async function openUrl(url) {
  if (url.startsWith("s3://")) {
    status(`reading ${url}…`);
    const reply = await api("GET", `/v1/storage/object?url=${encodeURIComponent(url)}`, { blob: true });
    if (!reply.ok) return status(errorText(reply.error), true);
    await openImage({ src: URL.createObjectURL(reply.data), name: url, ref: { url } });
  } else {
    await openImage({ src: url, name: url, ref: { url } });
  }
}

async function openImage(image) {
  if (state.image && state.image.src.startsWith("blob:")) URL.revokeObjectURL(state.image.src);
  state.image = { ...image, ids: {} };
  state.prompts = [];
  state.lastDetection = null;
  $("#try-results").replaceChildren();
  timingBar($("#try-timing"), []);
  try {
    const size = await stage.show(image.src);
    Object.assign(state.image, size);
  } catch (exc) {
    return status(`${image.name}: ${exc.message}`, true);
  }
  $("#try-image-name").textContent = `${image.name} — ${state.image.width}×${state.image.height}`;
  $("#try-empty").hidden = true;
  afterImage();
}

function afterImage() {
  if (!model() || !can("interactive")) return;
  // A model with both heads (SAM 3) queries the typed phrases at once, else waits for clicks.
  if (isConcept() && (phrases().length || !isSegmenter())) findConcepts();
  else if (isSegmenter()) embed();
  else detect();
}

// The image as the API takes it: raw bytes for a file, {"url": …} for a URL; `part` names the multipart part
// of the other fields (params for /detect, prompts for /concepts).
function imageBody(extra, part = "params") {
  const ref = state.image.ref;
  if (ref.file) {
    const form = new FormData();
    form.append("file", ref.file, ref.file.name);
    form.append(part, JSON.stringify(extra));
    return { body: form };
  }
  return { json: { image: { url: ref.url }, ...extra } };
}

function showTiming(reply, tier) {
  timingBar($("#try-timing"), reply.timing);
  const weights = reply.headers.get("X-Labelserve-Weights");
  $("#try-tier").textContent = [tier && `cache: ${tier}`, weights && `weights: ${weights}`].filter(Boolean).join(" · ");
}

async function embed() {
  const name = model().name;
  const image = state.image;
  status(`${name}: embedding the image…`);
  $("#try-embedding").textContent = "embedding…";
  const ref = image.ref;
  const options = ref.file
    ? { body: ref.file, headers: { "Content-Type": ref.file.type.startsWith("image/") ? ref.file.type : "image/jpeg" } }
    : { json: { image: { url: ref.url } } };
  const reply = await api("POST", `/v1/sam/${encodeURIComponent(name)}/embed`, options);
  if (state.image !== image) return null;
  if (!reply.ok) {
    $("#try-embedding").textContent = "not embedded";
    status(errorText(reply.error), true);
    return null;
  }
  image.ids[name] = reply.data.image_id;
  $("#try-embedding").textContent = `embedded (${reply.data.cache_tier}${reply.data.cached ? ", cached" : ""})`;
  showTiming(reply, reply.data.cache_tier);
  status(`${name}: click to add a point (right-click or Negative: background), drag for a box.`);
  return reply.data.image_id;
}

function pointerDown(event) {
  if (!state.image || !isSegmenter() || !can("interactive")) return;
  if (event.button !== 0 && event.button !== 2) return;
  stage.svg.setPointerCapture(event.pointerId);
  state.drag = { start: stage.toImage(event), x: event.clientX, y: event.clientY, button: event.button, moved: false };
}

function pointerMove(event) {
  const drag = state.drag;
  if (!drag) return;
  if (!drag.moved && Math.hypot(event.clientX - drag.x, event.clientY - drag.y) < DRAG_PIXELS) return;
  drag.moved = true;
  const [x, y] = stage.toImage(event);
  const box = [Math.min(drag.start[0], x), Math.min(drag.start[1], y), Math.max(drag.start[0], x), Math.max(drag.start[1], y)];
  drag.box = box;
  stage.svg.querySelector(".drag-box")?.remove();
  stage.box(stage.svg, box, "drag-box");
}

function pointerUp(event) {
  const drag = state.drag;
  state.drag = null;
  if (!drag) return;
  stage.svg.querySelector(".drag-box")?.remove();
  if (drag.moved && drag.box) {
    state.prompts = state.prompts.filter((p) => p.kind !== "box"); // SAM takes one box
    state.prompts.push({ kind: "box", box: drag.box });
  } else {
    const [x, y] = stage.toImage(event);
    const negative = drag.button === 2 || event.shiftKey || $("#try-negative").checked;
    state.prompts.push({ kind: "point", x, y, positive: !negative });
  }
  promptsChanged();
}

function undo() {
  if (!state.prompts.length) return;
  state.prompts.pop();
  promptsChanged();
}

function drawPrompts() {
  stage.svg.querySelector(".prompts")?.remove();
  const group = stage.group("prompts");
  for (const prompt of state.prompts) {
    if (prompt.kind === "box") stage.box(group, prompt.box, "prompt-box");
    else stage.point(group, prompt.x, prompt.y, prompt.positive);
  }
}

async function promptsChanged() {
  drawPrompts();
  $("#try-undo").disabled = !state.prompts.length || !can("interactive");
  const sequence = ++state.sequence;
  if (!state.prompts.length) {
    stage.clearMasks();
    $("#try-results").replaceChildren();
    delete stage.root.dataset.maskFor;
    return;
  }
  const name = model().name;
  const points = state.prompts.filter((p) => p.kind === "point");
  const box = state.prompts.find((p) => p.kind === "box");
  const prompt = { points: points.map((p) => [p.x, p.y]), labels: points.map((p) => (p.positive ? 1 : 0)), formats: ["cvat"] };
  if (box) prompt.box = box.box;
  let imageId = state.image.ids[name] || (await embed());
  if (!imageId || sequence !== state.sequence) return;
  const send = () =>
    api("POST", `/v1/sam/${encodeURIComponent(name)}/segment`, {
      json: { image_id: imageId, ...prompt },
      headers: { "X-Client-ID": CLIENT_ID },
    });
  let reply = await send();
  if (!reply.ok && reply.error.code === "image_not_cached") {
    imageId = await embed(); // evicted from every tier: send the image again
    if (!imageId) return;
    reply = await send();
  }
  if (sequence !== state.sequence) return; // a newer prompt is on its way
  if (!reply.ok) {
    if (reply.error.code !== "superseded") status(errorText(reply.error), true);
    return;
  }
  const best = reply.data.masks[0];
  stage.clearMasks();
  const painted = best ? stage.paintMask(best.cvat, colour(0)) : 0;
  stage.root.dataset.maskFor = JSON.stringify(prompt); // what the overlay shows (tests compare it)
  showTiming(reply, `${reply.data.cache_tier}${reply.headers.get("X-Labelserve-Cache") === "hit" ? " (hit)" : ""}`);
  $("#try-results").replaceChildren(
    ...reply.data.masks.map((mask, i) =>
      el("li", {}, `mask ${i + 1}: score ${mask.score.toFixed(3)}, area ${mask.area} px, box [${mask.bbox.join(", ")}]`),
    ),
  );
  status(`${name}: ${state.prompts.length} prompt(s); mask of ${painted} px.`);
}

function phrases() {
  return $("#try-phrases").value.split(",").map((p) => p.trim()).filter(Boolean);
}

async function findConcepts() {
  const m = model();
  const text = phrases();
  if (!state.image || !m || !isConcept() || !can("interactive")) return;
  if (!text.length) return status(`${m.name}: type one or more noun phrases, separated by commas, then Find.`);
  const image = state.image;
  const score = Number($("#try-score").value);
  status(`${m.name}: finding ${text.join(", ")}…`);
  const params = { text, score_threshold: score, formats: ["cvat"] };
  const reply = await api("POST", `/v1/concepts/${encodeURIComponent(m.name)}`, imageBody(params, "prompts"));
  if (state.image !== image) return;
  if (!reply.ok) return status(errorText(reply.error), true);
  drawInstances(reply.data, text);
  showTiming(reply, reply.data.cache_tier);
  stage.root.dataset.conceptsFor = JSON.stringify(params);
  const counts = text.map((p) => `${p}: ${reply.data.counts[p] ?? 0}`).join(", ");
  status(`${m.name}: ${reply.data.instances.length} instance(s) at score ≥ ${score.toFixed(2)} (${counts}).`);
}

// Click one, find all: the clicks and box on one object become the request's `example`; the server turns the
// object's mask into an exemplar box and answers every instance like it (with the phrases, if any).
async function findLike() {
  const m = model();
  if (!state.image || !m || !isConcept() || !isSegmenter() || !can("interactive")) return;
  const points = state.prompts.filter((p) => p.kind === "point");
  const box = state.prompts.find((p) => p.kind === "box");
  if (!points.length && !box) return status(`${m.name}: click the object (or drag a box around it), then Find all like this.`);
  const example = { points: points.map((p) => [p.x, p.y]), labels: points.map((p) => (p.positive ? 1 : 0)) };
  if (box) example.box = box.box;
  const text = phrases();
  const score = Number($("#try-score").value);
  const params = { text, example, score_threshold: score, formats: ["cvat"] };
  const image = state.image;
  status(`${m.name}: finding everything like the example…`);
  const reply = await api("POST", `/v1/concepts/${encodeURIComponent(m.name)}`, imageBody(params, "prompts"));
  if (state.image !== image) return;
  if (!reply.ok) return status(errorText(reply.error), true);
  const shown = text.length ? text : ["visual"];
  drawInstances(reply.data, shown);
  stage.box(stage.group("example"), reply.data.example.box, "prompt-box example-box");
  showTiming(reply, reply.data.cache_tier);
  stage.root.dataset.findLikeFor = JSON.stringify(params);
  status(`${m.name}: ${reply.data.instances.length} instance(s) like the example at score ≥ ${score.toFixed(2)}.`);
}

function drawInstances(result, text) {
  stage.clear();
  const group = stage.group("concepts");
  result.instances.forEach((instance) => {
    const rgb = colour(text.indexOf(instance.prompt));
    if (instance.mask && instance.mask.cvat) stage.paintMask(instance.mask.cvat, rgb);
    stage.box(group, instance.box, "det-box concept-box", rgb);
    stage.label(group, instance.box[0], instance.box[1] - 3 * stage.unit, `${instance.prompt} ${instance.score.toFixed(2)}`, rgb);
  });
  $("#try-results").replaceChildren(
    ...result.instances.map((i) => el("li", {}, `${i.prompt} ${i.score.toFixed(3)} [${i.box.map((v) => Math.round(v)).join(", ")}]`)),
  );
}

async function detect() {
  const m = model();
  if (!state.image || !m || isSegmenter() || isConcept() || !can("interactive")) return;
  const image = state.image;
  const conf = Number($("#try-conf").value);
  status(`${m.name}: detecting…`);
  const params = { conf, mask_formats: ["cvat"] };
  const tile = Number($("#try-tile").value);
  if (tile) params.tile = tile;
  const reply = await api("POST", `/v1/detect/${encodeURIComponent(m.name)}`, imageBody(params));
  if (state.image !== image) return;
  if (!reply.ok) return status(errorText(reply.error), true);
  state.lastDetection = reply.data;
  drawDetections(reply.data);
  showTiming(reply, null);
  stage.root.dataset.detectConf = String(conf);
  status(`${m.name}: ${reply.data.shapes.length} shape(s) at confidence ≥ ${conf.toFixed(2)}.`);
}

function drawDetections(result) {
  stage.clear();
  const group = stage.group("detections");
  const tags = [];
  const labels = [...new Set(result.shapes.map((s) => s.label))];
  result.shapes.forEach((shape) => {
    const rgb = colour(labels.indexOf(shape.label));
    const text = `${shape.label} ${shape.score.toFixed(2)}`;
    if (shape.kind === "tag") {
      tags.push(text);
      return;
    }
    if (shape.mask && shape.mask.cvat) stage.paintMask(shape.mask.cvat, rgb);
    if (shape.box) {
      stage.box(group, shape.box, "det-box", rgb, shape.rotation || 0);
      stage.label(group, shape.box[0], shape.box[1] - 3 * stage.unit, text, rgb);
    }
    for (const kp of shape.keypoints || []) {
      if (kp.visible !== false) stage.keypoint(group, kp.x, kp.y, rgb, `${kp.name} ${kp.score?.toFixed?.(2) ?? ""}`);
    }
  });
  $("#try-results").replaceChildren(
    ...tags.map((t) => el("li", { class: "tag" }, `tag: ${t}`)),
    ...result.shapes.filter((s) => s.kind !== "tag").map((s) => el("li", {}, `${s.kind} ${s.label} ${s.score.toFixed(3)}`)),
  );
}
