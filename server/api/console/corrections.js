// Jobs screen, corrections report: per class, how many of a CVAT task's pre-labels people accepted, edited
// or deleted, and how many objects they added (POST /v1/corrections, docs/review.md).

import { api } from "./api.js";
import { $, el, errorText } from "./ui.js";

const COLUMNS = ["accepted", "edited", "relabelled", "deleted", "missed", "other"];

export function initCorrections() {
  $("#corrections-form").addEventListener("submit", (event) => {
    event.preventDefault();
    report();
  });
  $("#corrections-csv").addEventListener("click", () => {
    if ($("#corrections-form").reportValidity()) download();
  });
  $("#corrections-job").addEventListener("change", () => {
    const task = prelabelJobs.get($("#corrections-job").value);
    if (task && task.task_id) $("#corrections-task").value = task.task_id;
    if (task && task.url && !$("#corrections-url").value) $("#corrections-url").value = task.url;
  });
}

// The completed jobs that uploaded into a CVAT task (id -> its output.cvat_task), from the jobs list.
const prelabelJobs = new Map();

export function setPrelabelJobs(jobs) {
  const uploads = jobs.filter((job) => job.state === "completed" && job.spec.output.cvat_task);
  const ids = uploads.map((job) => job.id);
  if (ids.join() === [...prelabelJobs.keys()].join()) return; // unchanged: keep the open select as it is
  prelabelJobs.clear();
  for (const job of uploads) prelabelJobs.set(job.id, job.spec.output.cvat_task);
  const select = $("#corrections-job");
  const chosen = select.value;
  const option = (job) => el("option", { value: job.id }, `${job.id.slice(0, 8)} → task ${job.spec.output.cvat_task.task_id ?? "(its source)"}`);
  select.replaceChildren(el("option", { value: "" }, "none (deletions unknown)"), ...uploads.map(option));
  select.value = prelabelJobs.has(chosen) ? chosen : "";
}

// The request: the task and one way to log in (a server-side profile, or CVAT's URL and a token).
function request() {
  const task = { task_id: Number($("#corrections-task").value) };
  for (const name of ["url", "token", "profile"]) {
    const value = $(`#corrections-${name}`).value.trim();
    if (value) task[name] = value;
  }
  const job = $("#corrections-job").value;
  return job ? { task, prelabel_job: job } : { task };
}

function said(error) {
  $("#corrections-status").textContent = error ? errorText(error) : "";
  $("#corrections-status").classList.toggle("error", Boolean(error));
}

const cell = (value) => el("td", {}, value === null || value === undefined ? "–" : String(value));
const rate = (value) => (value === null || value === undefined ? "–" : `${(100 * value).toFixed(1)} %`);

function row(counts, total = false) {
  return el("tr", { "data-label": total ? "" : counts.label, class: total ? "total" : null },
    el("th", {}, total ? "total" : counts.label),
    COLUMNS.map((name) => cell(counts[name])),
    el("td", { "data-rate": counts.acceptance_rate ?? "" }, rate(counts.acceptance_rate)),
  ); // prettier-ignore
}

async function report() {
  said(null);
  $("#corrections-table").replaceChildren(); // no earlier report shown as this one's
  $("#corrections-note").textContent = "";
  $("#corrections-status").textContent = "reading the task…";
  const reply = await api("POST", "/v1/corrections", { json: request() });
  if (!reply.ok) return said(reply.error);
  const data = reply.data;
  said(null);
  $("#corrections-table").replaceChildren(
    el("tr", {}, el("th", {}, "class"), COLUMNS.map((name) => el("th", {}, name)), el("th", {}, "acceptance")),
    ...data.classes.map((counts) => row(counts)),
    row(data.total, true),
  );
  $("#corrections-table").dataset.task = data.task.id;
  const unknown = data.deletions_known ? "" : "Deleted unknown: name the pre-labeling job to count deletions. ";
  $("#corrections-note").textContent = unknown + data.note;
}

// The same request as CSV (?format=csv), saved as a file.
async function download() {
  const reply = await api("POST", "/v1/corrections?format=csv", { json: request(), blob: true });
  if (!reply.ok) return said(reply.error);
  said(null);
  const link = el("a", { href: URL.createObjectURL(reply.data), download: `corrections-task-${request().task.task_id}.csv` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}
