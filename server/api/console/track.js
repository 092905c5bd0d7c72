// Track: open an image sequence, drag boxes around objects on its first frame, start a tracker, then step
// frame by frame; each step draws where the tracker found each object (or says it is lost).

import { api, can, needs } from "./api.js";
import { Stage, colour } from "./stage.js";
import { $, el, errorText } from "./ui.js";

const state = { frames: [], index: 0, boxes: [], states: [], tracker: null, drag: null, urls: [] };
let stage;

export function initTrack() {
  stage = new Stage($("#track-stage"));
  $("#track-files").addEventListener("change", (event) => open([...event.target.files]));
  $("#track-start").addEventListener("click", start);
  $("#track-step").addEventListener("click", step);
  $("#track-reset").addEventListener("click", () => show(0, true));
  stage.svg.addEventListener("pointerdown", (event) => {
    if (state.states.length || !state.frames.length) return;
    stage.svg.setPointerCapture(event.pointerId);
    state.drag = { start: stage.toImage(event) };
  });
  stage.svg.addEventListener("pointermove", (event) => {
    if (!state.drag) return;
    const [x, y] = stage.toImage(event);
    const [sx, sy] = state.drag.start;
    state.drag.box = [Math.min(sx, x), Math.min(sy, y), Math.max(sx, x), Math.max(sy, y)];
    stage.svg.querySelector(".drag-box")?.remove();
    stage.box(stage.svg, state.drag.box, "drag-box");
  });
  stage.svg.addEventListener("pointerup", () => {
    const box = state.drag?.box;
    state.drag = null;
    stage.svg.querySelector(".drag-box")?.remove();
    if (box && box[2] - box[0] > 2 && box[3] - box[1] > 2) {
      state.boxes.push(box);
      draw(state.boxes);
    }
  });
}

export function setTrackers(trackers) {
  $("#track-tracker").replaceChildren(...trackers.map((t) => el("option", { value: t.name }, `${t.name} (${t.accepts.join(", ")})`)));
}

export async function refreshTrackers() {
  if (!can("interactive")) {
    $("#track-denied").textContent = needs("interactive");
    $("#track-denied").hidden = false;
    return;
  }
  $("#track-denied").hidden = true;
  const reply = await api("GET", "/v1/trackers");
  if (reply.ok) setTrackers(reply.data.trackers);
}

function status(text, isError = false) {
  $("#track-status").textContent = text;
  $("#track-status").classList.toggle("error", isError);
}

async function open(files) {
  for (const url of state.urls) URL.revokeObjectURL(url);
  state.frames = files.sort((a, b) => a.name.localeCompare(b.name, undefined, { numeric: true }));
  state.urls = state.frames.map((f) => URL.createObjectURL(f));
  await show(0, true);
}

async function show(index, reset = false) {
  if (!state.frames.length) return;
  state.index = index;
  if (reset) {
    for (const id of state.states) api("DELETE", `/v1/track/${state.tracker}/states/${id}`, { quiet: true });
    state.states = [];
    state.boxes = [];
  }
  await stage.show(state.urls[index]);
  $("#track-frame").textContent = `frame ${index + 1} of ${state.frames.length}: ${state.frames[index].name}`;
  $("#track-step").disabled = !state.states.length || index + 1 >= state.frames.length;
  $("#track-start").disabled = Boolean(state.states.length);
  if (reset) status("Drag a box around each object to follow, then Start.");
}

function draw(shapes) {
  stage.clear();
  const group = stage.group("tracks");
  shapes.forEach((shape, i) => {
    if (!shape) return;
    stage.box(group, shape, "det-box track-box", colour(i));
    stage.label(group, shape[0], shape[1] - 3 * stage.unit, `#${i + 1}`, colour(i));
  });
}

function frameBody(params, index) {
  const form = new FormData();
  form.append("file", state.frames[index], state.frames[index].name);
  form.append("params", JSON.stringify(params));
  return { body: form };
}

async function start() {
  if (!state.boxes.length) return status("Drag at least one box first.", true);
  state.tracker = $("#track-tracker").value;
  const shapes = state.boxes.map((box) => ({ type: "rectangle", points: box }));
  const reply = await api("POST", `/v1/track/${encodeURIComponent(state.tracker)}`, frameBody({ shapes }, state.index));
  if (!reply.ok) return status(errorText(reply.error), true);
  state.states = reply.data.states;
  $("#track-start").disabled = true;
  $("#track-step").disabled = state.index + 1 >= state.frames.length;
  status(`${state.tracker}: following ${state.states.length} object(s); Step to the next frame.`);
}

async function step() {
  const next = state.index + 1;
  if (next >= state.frames.length) return;
  const reply = await api("POST", `/v1/track/${encodeURIComponent(state.tracker)}/step`, frameBody({ states: state.states }, next));
  if (!reply.ok) return status(errorText(reply.error), true);
  await show(next);
  const boxes = reply.data.shapes.map((shape) => (shape ? shapeBox(shape) : null));
  draw(boxes);
  const lost = boxes.filter((b) => !b).length;
  status(`frame ${next + 1}: ${boxes.length - lost} found${lost ? `, ${lost} lost` : ""}.`);
}

// The tracker answers in the type each object was started as: a rectangle here.
function shapeBox(shape) {
  const p = shape.points;
  if (shape.type === "rectangle") return p.slice(0, 4);
  const xs = p.filter((_, i) => i % 2 === 0);
  const ys = p.filter((_, i) => i % 2 === 1);
  return [Math.min(...xs), Math.min(...ys), Math.max(...xs), Math.max(...ys)];
}
