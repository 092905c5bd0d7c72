// Jobs: submit a pre-labeling job, watch every job's progress live, see failures, cancel and resume; a
// pre-labelled CVAT task's corrections report (corrections.js); and prefetch runs (embeddings computed ahead of
// the annotator): start one, watch and cancel them.

import { api, can, needs } from "./api.js";
import { initCorrections, setPrelabelJobs } from "./corrections.js";
import { $, duration, el, errorText } from "./ui.js";

const ACTIVE = new Set(["queued", "running"]);

const SOURCE_HINTS = {
  directory: "/data/frames or s3://bucket/prefix/",
  manifest: "/data/task/manifest.jsonl or s3://…/manifest.jsonl",
  urls: "one URL per line (http(s):// or s3://)",
};

export function initJobs() {
  $("#job-form").addEventListener("submit", submit);
  $("#prefetch-form").addEventListener("submit", submitPrefetch);
  initCorrections();
  for (const kind of document.querySelectorAll("select.source-kind")) {
    kind.addEventListener("change", () => {
      $(`#${kind.dataset.for}`).placeholder = SOURCE_HINTS[kind.value];
    });
  }
  // A review (format "findings") scores a dataset's annotations against the detector (docs/review.md).
  $("#job-format").addEventListener("change", () => {
    const review = $("#job-format").value === "findings";
    $("#job-review").hidden = !review;
    $("#job-annotations").required = review;
    // A sample job (format "ranking") picks which images to annotate next (docs/sampling.md).
    $("#job-sample").hidden = $("#job-format").value !== "ranking";
  });
}

export function setDetectors(models) {
  const detectors = models.filter((m) => m.kinds.includes("detector"));
  const segmenters = models.filter((m) => m.kinds.includes("segmenter"));
  const select = $("#job-detector");
  const chosen = select.value;
  select.replaceChildren(...detectors.map((m) => el("option", { value: m.name }, `${m.name} (${m.state})`)));
  if (chosen) select.value = chosen;
  const refine = $("#job-refine");
  const refineChosen = refine.value;
  refine.replaceChildren(el("option", { value: "" }, "none"), ...segmenters.map((m) => el("option", { value: m.name }, m.name)));
  refine.value = refineChosen;
  const prefetch = $("#prefetch-model");
  const prefetchChosen = prefetch.value;
  // Whatever has an image encoder whose features the cache holds: segmenters and concept models.
  const encoders = models.filter((m) => m.kinds.includes("segmenter") || m.kinds.includes("concept"));
  prefetch.replaceChildren(...encoders.map((m) => el("option", { value: m.name }, m.name)));
  if (prefetchChosen) prefetch.value = prefetchChosen;
}

export function accessChanged() {
  const allowed = can("jobs");
  $("#jobs-denied").textContent = allowed ? "" : needs("jobs");
  $("#jobs-denied").hidden = allowed;
  for (const control of document.querySelectorAll("#job-form .needs-jobs, #corrections-form .needs-jobs")) control.disabled = !allowed;
  const prefetch = can("interactive");
  $("#prefetch-denied").textContent = prefetch ? "" : needs("interactive");
  $("#prefetch-denied").hidden = prefetch;
  for (const control of document.querySelectorAll("#prefetch-form .needs-interactive")) control.disabled = !prefetch;
}

// The same source kinds as a job's (a prefetch run takes a job's `source`).
function sourceOf(kind, value) {
  const text = value.trim();
  return kind === "urls" ? { urls: text.split(/\s+/).filter(Boolean) } : { [kind]: text };
}

function spec() {
  const result = {
    source: sourceOf($("#job-source-kind").value, $("#job-source").value),
    detector: $("#job-detector").value,
    params: { conf: Number($("#job-conf").value) },
    output: { format: $("#job-format").value, directory: $("#job-output").value.trim() },
  };
  if (result.output.format === "findings") {
    result.review = { annotations: $("#job-annotations").value.trim(), format: $("#job-annotation-format").value };
    if ($("#job-refine").value) result.review.sam = $("#job-refine").value;
    if ($("#job-conf").value === "0.25") delete result.params.conf; // a review's default, 0.01, keeps unsure boxes
    return result;
  }
  if (result.output.format === "ranking") {
    // "SAM refine" names the SAM model whose embeddings give the vectors; "none": the detector's own features.
    const sam = $("#job-refine").value;
    result.sample = { budget: Number($("#job-budget").value), ...(sam ? { embeddings: sam } : { embedding: "detector" }) };
    return result;
  }
  if ($("#job-refine").value) result.sam_refine = $("#job-refine").value;
  return result;
}

// POSTs a form's request; the reply's error, or `said(reply.data)`, on the form's status line.
async function post(path, body, line, said) {
  line.classList.remove("error");
  line.textContent = "submitting…";
  const reply = await api("POST", path, { json: body });
  line.textContent = reply.ok ? said(reply.data) : errorText(reply.error);
  line.classList.toggle("error", !reply.ok);
  return reply.ok;
}

async function submit(event) {
  event.preventDefault();
  const said = (job) => `job ${job.id} ${job.state}: ${job.total} images`;
  if (await post("/v1/jobs", spec(), $("#job-form-status"), said)) refreshJobs();
}

async function submitPrefetch(event) {
  event.preventDefault();
  const body = {
    model: $("#prefetch-model").value,
    source: sourceOf($("#prefetch-source-kind").value, $("#prefetch-source").value),
  };
  const said = (run) => `prefetch ${run.id} ${run.state}: ${run.total} images`;
  if (await post("/v1/prefetch", body, $("#prefetch-form-status"), said)) refreshPrefetch();
}

function progress(done, failed, total) {
  const bar = el("div", { class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100 });
  const percent = total ? Math.floor((100 * (done + failed)) / total) : 0;
  bar.setAttribute("aria-valuenow", percent);
  const ok = el("span", { class: "done" });
  ok.style.width = `${total ? (100 * done) / total : 0}%`;
  const bad = el("span", { class: "failed" });
  bad.style.width = `${total ? (100 * failed) / total : 0}%`;
  bar.append(ok, bad, el("b", {}, `${percent} %`));
  return bar;
}

async function act(method, path) {
  const reply = await api(method, path);
  if (!reply.ok) {
    $("#job-form-status").textContent = errorText(reply.error);
    $("#job-form-status").classList.add("error");
  }
  refreshJobs();
  refreshPrefetch();
}

function short(value) {
  const text = Array.isArray(value) ? `${value.length} items: ${value[0]}` : typeof value === "string" ? value : JSON.stringify(value);
  return text.length > 70 ? `${text.slice(0, 30)}…${text.slice(-38)}` : text;
}

function jobRow(job) {
  const source = Object.entries(job.spec.source).find(([, v]) => v !== null && v !== undefined);
  const output = job.spec.output.directory ? `${job.spec.output.format} → ${job.spec.output.directory}` : "CVAT task";
  const rate = job.images_per_second ? `${job.images_per_second.toFixed(1)} img/s` : "";
  const eta = job.eta_seconds !== null && job.eta_seconds !== undefined ? `ETA ${duration(job.eta_seconds)}` : "";
  const actions = [];
  if (ACTIVE.has(job.state)) actions.push(el("button", { class: "cancel needs-jobs", onclick: () => act("DELETE", `/v1/jobs/${job.id}`) }, "Cancel"));
  if (job.state === "failed" || job.state === "cancelled") {
    actions.push(el("button", { class: "resume needs-jobs", onclick: () => act("POST", `/v1/jobs/${job.id}/resume`) }, "Resume"));
  }
  const row = el("li", { class: `job state-${job.state}`, "data-job": job.id },
    el("div", { class: "job-head" },
      el("code", { title: job.id }, job.id.slice(0, 8)),
      el("span", { class: `badge ${job.state}` }, job.state),
      el("span", { class: "job-what" }, `${job.spec.detector} on ${source ? `${source[0]} ${short(source[1])}` : "?"}; ${output}`),
      ...actions),
    progress(job.done, job.failed, job.total),
    el("div", { class: "muted" }, `${job.done}/${job.total} done, ${job.failed} failed ${rate} ${eta}`),
    job.error && el("div", { class: "error" }, job.error),
    job.failures.length > 0 && el("details", {}, el("summary", {}, `${job.failures.length} failure(s) shown`),
      el("ul", {}, job.failures.map((f) => el("li", {}, `#${f.index} ${f.image}: ${f.error}`)))),
    job.outputs.length > 0 && el("div", { class: "muted" }, `outputs: ${job.outputs.join(", ")}`),
  ); // prettier-ignore
  return row;
}

export async function refreshJobs() {
  if (!can("jobs")) return $("#jobs-list").replaceChildren();
  const reply = await api("GET", "/v1/jobs?limit=50");
  if (!reply.ok) return $("#jobs-list").replaceChildren(el("li", { class: "error" }, errorText(reply.error)));
  const jobs = reply.data.jobs;
  setPrelabelJobs(jobs);
  $("#jobs-list").replaceChildren(...(jobs.length ? jobs.map(jobRow) : [el("li", { class: "muted" }, "No jobs yet.")]));
  $("#tab-button-jobs").dataset.active = String(jobs.filter((j) => ACTIVE.has(j.state)).length || "");
}

function prefetchRow(run) {
  return el("li", { class: `job state-${run.state}`, "data-prefetch": run.id },
    el("div", { class: "job-head" },
      el("code", { title: run.id }, run.id.slice(0, 8)),
      el("span", { class: `badge ${run.state}` }, run.state),
      el("span", {}, `${run.model}, from ${run.origin}: ${run.cached} already cached, ${run.encoded} encoded`),
      ACTIVE.has(run.state) && el("button", { class: "cancel", onclick: () => act("DELETE", `/v1/prefetch/${run.id}`) }, "Cancel")),
    progress(run.done, run.failed, run.total),
    el("div", { class: "muted" }, `${run.done}/${run.total} done, ${run.failed} failed ${run.images_per_second ? `${run.images_per_second.toFixed(1)} img/s` : ""}`),
    run.error && el("div", { class: "error" }, run.error),
  ); // prettier-ignore
}

export async function refreshPrefetch() {
  if (!can("interactive")) return $("#prefetch-list").replaceChildren();
  const reply = await api("GET", "/v1/prefetch");
  if (!reply.ok) return $("#prefetch-list").replaceChildren(el("li", { class: "error" }, errorText(reply.error)));
  const runs = reply.data;
  $("#prefetch-list").replaceChildren(...(runs.length ? runs.map(prefetchRow) : [el("li", { class: "muted" }, "No prefetch runs.")]));
}
