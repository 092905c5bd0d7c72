// Models: every model the server knows, its state and its weights (a checkpoint, or random-init in plain
// sight), with load and unload for admin keys.

import { api, can, needs } from "./api.js";
import { $, el, errorText } from "./ui.js";

let onChange = () => {};

export function initModels(changed) {
  onChange = changed;
}

async function act(name, action) {
  const line = $("#models-status");
  line.classList.remove("error");
  line.textContent = `${action} ${name}…`;
  const reply = await api("POST", `/v1/models/${encodeURIComponent(name)}/${action}`);
  if (!reply.ok) {
    line.textContent = errorText(reply.error);
    line.classList.add("error");
  } else {
    line.textContent = `${name}: ${reply.data.state}${reply.data.message ? ` — ${reply.data.message}` : ""}`;
  }
  refreshModels();
}

export async function refreshModels() {
  const table = $("#models-table");
  if (!can("interactive", "jobs")) {
    $("#models-denied").textContent = needs("interactive", "jobs");
    $("#models-denied").hidden = false;
    table.replaceChildren();
    return [];
  }
  $("#models-denied").hidden = true;
  const reply = await api("GET", "/v1/models");
  if (!reply.ok) {
    table.replaceChildren(el("tr", {}, el("td", { class: "error" }, errorText(reply.error))));
    return [];
  }
  const admin = can("admin");
  const adminNote = admin ? null : needs("admin");
  $("#models-device").textContent = `device: ${reply.data.device}`;
  const showAll = $("#models-all").checked;
  const models = reply.data.models;
  const shown = models.filter((m) => showAll || m.state !== "disabled");
  table.replaceChildren(
    el("tr", {}, ["model", "kinds", "state", "weights", "details", ""].map((h) => el("th", {}, h))),
    ...shown.map((m) => {
      const button = m.state === "loaded"
        ? el("button", { class: "unload", onclick: () => act(m.name, "unload") }, "Unload")
        : el("button", { class: "load", onclick: () => act(m.name, "load") }, m.state === "loading" ? "Loading…" : "Load");
      button.disabled = !admin || m.state === "loading";
      if (adminNote) button.title = adminNote;
      return el("tr", { "data-model": m.name },
        el("td", {}, el("b", {}, m.name), m.architecture !== m.name ? el("div", { class: "muted" }, m.architecture) : null),
        el("td", {}, m.kinds.join(", "), m.task ? ` (${m.task})` : ""),
        el("td", {}, el("span", { class: `badge ${m.state}` }, m.state), m.load_seconds ? ` ${m.load_seconds.toFixed(1)} s` : ""),
        el("td", {}, m.weights ? el("span", { class: `badge weights-${m.weights}` }, m.weights) : "–"),
        el("td", { class: "details" }, m.message || "", m.fix ? el("div", {}, el("code", {}, m.fix)) : null),
        el("td", {}, button, admin ? null : el("div", { class: "muted small" }, "admin key needed")),
      ); // prettier-ignore
    }),
  );
  onChange(models);
  return models;
}
