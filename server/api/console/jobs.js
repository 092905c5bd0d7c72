// Jobs: submit a pre-labeling job, watch every job's progress live, see failures, cancel and resume; and the
// prefetch runs (embeddings computed ahead of the annotator) with theirs.

import { api, can, needs } from "./api.js";
import { $, duration, el, errorText } from "./ui.js";

const ACTIVE = new Set(["queued", "running"]);

export function initJobs() {
  $("#job-form").addEventListener("submit", submit);
  // A review (format "findings") scores a dataset's annotations against the detector (docs/review.md).
  $("#job-format").addEventListener("change", () => {
    const review = $("#job-format").value === "findings";
    $("#job-review").hidden = !review;
    $("#job-annotations").required = review;
    // A sample job (format "ranking") picks which images to annotate next (docs/sampling.md).
    $("#job-sample").hidden = $("#job-format").value !== "ranking";
  });
  $("#job-source-kind").addEventListener("change", () => {
    const kind = $("#job-source-kind").value;
    $("#job-source").placeholder = {
      directory: "/data/frames or s3://bucket/prefix/",
      manifest: "/data/task/manifest.jsonl or s3://…/manifest.jsonl",
      urls: "one URL per line (http(s):// or s3://)",
    }[kind];
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
}

export function accessChanged() {
  const allowed = can("jobs");
  $("#jobs-denied").textContent = allowed ? "" : needs("jobs");
  $("#jobs-denied").hidden = allowed;
  for (const control of document.querySelectorAll("#job-form .needs-jobs")) control.disabled = !allowed;
  const prefetch = can("interactive");
  $("#prefetch-denied").textContent = prefetch ? "" : needs("interactive");
  $("#prefetch-denied").hidden = prefetch;
}

function spec() {
  const kind = $("#job-source-kind").value;
  const value = $("#job-source").value.trim();
  const source = kind === "urls" ? { urls: value.split(/\s+/).filter(Boolean) } : { [kind]: value };
  const result = {
    source,
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
    result.sample = { budget: Number($("#job-budget").value), embeddings: $("#job-refine").value };
    return result;
  }
  if ($("#job-refine").value) result.sam_refine = $("#job-refine").value;
  return result;
}

async function submit(event) {
  event.preventDefault();
  const line = $("#job-form-status");
  line.classList.remove("error");
  line.textContent = "submitting…";
  const reply = await api("POST", "/v1/jobs", { json: spec() });
  if (!reply.ok) {
    line.textContent = errorText(reply.error);
    line.classList.add("error");
    return;
  }
  line.textContent = `job ${reply.data.id} ${reply.data.state}: ${reply.data.total} images`;
  refreshJobs();
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
