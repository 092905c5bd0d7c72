// Track: open an image sequence or a short video, drag boxes around objects on a frame, start a tracker, then
// step frame by frame; each step draws where the tracker found each object (or says it is lost). A video can
// also be propagated to its end in one streamed request. The page never decodes a video itself: each frame
// comes from POST /v1/video/frame as a lossless PNG, and that PNG is what the tracker is sent, so a step sees
// the pixels /propagate decodes.

import { api, call, can, needs } from "./api.js";
import { Stage, colour } from "./stage.js";
import { $, el, errorText } from "./ui.js";

const VIDEO_NAME = /\.(mp4|m4v|mov|mkv|webm|avi|mpe?g|ts|wmv|flv|3gp)$/i;

const state = {
  source: null, // {name, count, files: [File]} for images; {name, count, video: {file} | {url}} for a video
  frames: new Map(), // frame index -> {blob, src}: frames fetched once, shown again without asking
  index: 0,
  boxes: [], // drawn on the current frame, before tracking
  results: new Map(), // frame index -> each object's box, or null where it was lost
  states: [],
  tracker: null,
  drag: null,
  playing: false,
};
let stage;

export function initTrack() {
  stage = new Stage($("#track-stage"));
  $("#track-files").addEventListener("change", (event) => safely(() => openFiles([...event.target.files])));
  $("#track-url-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const url = $("#track-url").value.trim();
    if (url) safely(() => openVideo({ url }, url));
  });
  $("#track-start").addEventListener("click", () => safely(start));
  $("#track-back").addEventListener("click", () => safely(() => show(state.index - 1)));
  $("#track-step").addEventListener("click", () => safely(step));
  $("#track-play").addEventListener("click", () => safely(play));
  $("#track-reset").addEventListener("click", () => safely(reset));
  stage.svg.addEventListener("pointerdown", (event) => {
    if (!state.source || state.results.size || state.playing) return;
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

// Runs a button's action; an API error (thrown by `call`) or a browser one becomes the status line.
async function safely(action) {
  try {
    await action();
  } catch (exc) {
    state.playing = false;
    buttons();
    status(exc.code ? errorText(exc) : exc.message, true);
  }
}

async function openFiles(files) {
  if (!files.length) return;
  if (files.length === 1 && (files[0].type.startsWith("video/") || VIDEO_NAME.test(files[0].name))) {
    return openVideo({ file: files[0] }, files[0].name);
  }
  const sorted = files.sort((a, b) => a.name.localeCompare(b.name, undefined, { numeric: true }));
  forget({ name: null, count: sorted.length, files: sorted });
  await reset();
}

async function openVideo(video, name) {
  status(`reading ${name}…`);
  const reply = await call("POST", "/v1/video/frame", { ...videoBody({ frame: 0 }, video), blob: true });
  forget({ name, count: Number(reply.headers.get("X-Labelserve-Video-Frames")), video });
  state.frames.set(0, { blob: reply.data, src: URL.createObjectURL(reply.data) });
  await reset();
}

// A new source: the old one's frames and tracking states are let go.
function forget(source) {
  for (const frame of state.frames.values()) URL.revokeObjectURL(frame.src);
  state.frames.clear();
  dropStates();
  state.source = source;
}

function dropStates() {
  for (const id of state.states) api("DELETE", `/v1/track/${state.tracker}/states/${id}`, { quiet: true });
  state.states = [];
}

async function reset() {
  dropStates();
  state.results.clear();
  state.boxes = [];
  if (!state.source) return;
  await show(0);
  status(`Drag a box around each object to follow, then Start${state.source.video ? " or Propagate" : ""}.`);
}

// The video (its upload or its URL) with `params`, as /v1/video/frame and /propagate take it.
function videoBody(params, video = state.source.video) {
  if (video.url) return { json: { video: { url: video.url }, ...params } };
  const form = new FormData();
  form.append("file", video.file, video.file.name);
  form.append("params", JSON.stringify(params));
  return { body: form };
}

async function frame(index) {
  if (!state.frames.has(index)) {
    const blob = state.source.video
      ? (await call("POST", "/v1/video/frame", { ...videoBody({ frame: index }), blob: true })).data
      : state.source.files[index];
    state.frames.set(index, { blob, src: URL.createObjectURL(blob) });
  }
  return state.frames.get(index);
}

async function show(index) {
  const { src } = await frame(index);
  if (index !== state.index && !state.results.size) state.boxes = []; // drawn on the frame being left
  state.index = index;
  await stage.show(src);
  draw(state.results.size ? state.results.get(index) || [] : state.boxes);
  const name = state.source.name ?? state.source.files[index].name;
  $("#track-frame").textContent = `frame ${index + 1} of ${state.source.count}: ${name}`;
  buttons();
}

function buttons() {
  const open = Boolean(state.source) && !state.playing;
  for (const input of ["#track-files", "#track-url-form button"]) $(input).disabled = state.playing;
  $("#track-start").disabled = !open || state.results.size > 0;
  $("#track-play").hidden = !state.source?.video;
  $("#track-play").disabled = !open || state.results.size > 0;
  $("#track-back").disabled = !open || state.index === 0;
  $("#track-step").disabled = !open || state.index + 1 >= state.source.count;
}

function draw(boxes) {
  stage.clear();
  const group = stage.group("tracks");
  boxes.forEach((box, i) => {
    if (!box) return;
    stage.box(group, box, "det-box track-box", colour(i));
    stage.label(group, box[0], box[1] - 3 * stage.unit, `#${i + 1}`, colour(i));
  });
}

function upload(blob, params) {
  const form = new FormData();
  form.append("file", blob, blob.name || "frame.png");
  form.append("params", JSON.stringify(params));
  return { body: form };
}

// Records where the tracker found each object on frame `index`; returns what to tell the user.
function tracked(index, shapes) {
  state.results.set(index, shapes.map((shape) => (shape ? shapeBox(shape) : null)));
  return found(index);
}

function found(index) {
  const boxes = state.results.get(index);
  const lost = boxes.filter((b) => !b).length;
  return `frame ${index + 1}: ${boxes.length - lost} found${lost ? `, ${lost} lost` : ""}`;
}

function begin() {
  if (!state.boxes.length) throw new Error("Drag at least one box first.");
  state.tracker = $("#track-tracker").value;
  state.results.set(state.index, state.boxes);
  return state.boxes.map((box) => ({ type: "rectangle", points: box }));
}

async function start() {
  const shapes = begin();
  const { blob } = await frame(state.index);
  const reply = await api("POST", `/v1/track/${encodeURIComponent(state.tracker)}`, upload(blob, { shapes }));
  if (!reply.ok) {
    state.results.clear();
    return status(errorText(reply.error), true);
  }
  state.states = reply.data.states;
  buttons();
  status(`${state.tracker}: following ${state.states.length} object(s); Step to the next frame.`);
}

// The next frame: tracked now if it is the one after the last tracked frame, otherwise only shown.
async function step() {
  const next = state.index + 1;
  if (!state.states.length || state.results.has(next) || !state.results.has(state.index)) return show(next);
  const { blob } = await frame(next);
  const reply = await api("POST", `/v1/track/${encodeURIComponent(state.tracker)}/step`, upload(blob, { states: state.states }));
  if (!reply.ok) return status(errorText(reply.error), true);
  const text = tracked(next, reply.data.shapes);
  await show(next);
  status(`${text}.`);
}

// Propagate the boxes from this frame to the video's end (one NDJSON line per frame, as it is tracked),
// showing the latest tracked frame whenever the previous one is on screen.
async function play() {
  const shapes = begin();
  const first = state.index;
  state.playing = true;
  buttons();
  let last = first;
  let showing = null;
  let failed = null;
  const path = `/v1/track/${encodeURIComponent(state.tracker)}/propagate`;
  const reply = await api("POST", path, { ...videoBody({ start: first, shapes }), lines: (line) => {
    if (line.error) return (failed = line.error);
    last = line.frame;
    status(`propagating: ${tracked(line.frame, line.shapes)}…`);
    // A frame that fails to show here fails again, and is reported, when the last one is shown below.
    showing ??= show(line.frame).catch(() => null).finally(() => (showing = null));
  } }); // prettier-ignore
  await showing;
  state.playing = false;
  if (!reply.ok || failed) {
    if (!reply.ok) state.results.clear();
    await show(state.index);
    return status(reply.ok ? `${failed.code}: ${failed.message}` : errorText(reply.error), true);
  }
  await show(last);
  status(`${state.tracker}: propagated frames ${first + 1} to ${last + 1}; ${found(last)}.`);
}

// The tracker answers in the type each object was started as: a rectangle here.
function shapeBox(shape) {
  const p = shape.points;
  if (shape.type === "rectangle") return p.slice(0, 4);
  const xs = p.filter((_, i) => i % 2 === 0);
  const ys = p.filter((_, i) => i % 2 === 1);
  return [Math.min(...xs), Math.min(...ys), Math.max(...xs), Math.max(...ys)];
}
