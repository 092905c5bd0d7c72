// The console's entry point: the API key, the tabs, and the live refresh of what each tab shows.

import { checkKey, onAuthChange, setKey, storedKey, who } from "./api.js";
import * as jobs from "./jobs.js";
import * as models from "./models.js";
import * as stats from "./stats.js";
import * as track from "./track.js";
import * as tryPanel from "./try.js";
import { $ } from "./ui.js";

const TABS = ["try", "jobs", "models", "server", "track"];
const REFRESH_MS = { jobs: 1000, models: 3000, server: 2000 };

function showTab(name) {
  for (const tab of TABS) {
    $(`#tab-${tab}`).hidden = tab !== name;
    $(`#tab-button-${tab}`).classList.toggle("active", tab === name);
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  refresh(name);
}

function current() {
  return TABS.find((tab) => !$(`#tab-${tab}`).hidden) || "try";
}

async function refresh(tab) {
  if (!who.checked || (who.auth && !who.id)) return;
  if (tab === "jobs") await Promise.all([jobs.refreshJobs(), jobs.refreshPrefetch()]);
  else if (tab === "models") await models.refreshModels();
  else if (tab === "server") await stats.refreshStats();
  else if (tab === "track") await track.refreshTrackers();
}

function keyBar() {
  const bar = $("#key-bar");
  const needKey = who.auth && !who.id;
  bar.hidden = !who.auth;
  $("#key-form").hidden = !needKey;
  $("#key-who").hidden = needKey;
  $("#key-who-text").textContent = who.id ? `key '${who.id}': ${who.scopes.join(", ")}` : "";
  $("#key-error").textContent = needKey && storedKey() && who.error ? who.error.detail : "";
  $("#locked").hidden = !needKey;
  document.body.classList.toggle("locked", Boolean(needKey));
  $("#server-mode").textContent = who.auth === false ? "no API keys on this server" : "";
}

onAuthChange(async () => {
  keyBar();
  tryPanel.accessChanged();
  jobs.accessChanged();
  if (who.auth && !who.id) return;
  await models.refreshModels();
  refresh(current());
});

function init() {
  models.initModels((list) => {
    tryPanel.setModels(list);
    jobs.setDetectors(list);
  });
  tryPanel.initTry();
  jobs.initJobs();
  track.initTrack();
  for (const tab of TABS) $(`#tab-button-${tab}`).addEventListener("click", () => showTab(tab));
  $("#models-all").addEventListener("change", () => models.refreshModels());
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setKey($("#key-input").value.trim());
    $("#key-input").value = "";
  });
  $("#key-forget").addEventListener("click", () => setKey(""));
  const first = TABS.includes(location.hash.slice(1)) ? location.hash.slice(1) : "try";
  showTab(first);
  checkKey();
  let ticks = 0;
  let busy = false; // a slow reply is not overtaken by the next refresh
  setInterval(async () => {
    ticks++;
    const tab = current();
    const every = REFRESH_MS[tab] / 1000;
    if (!every || busy || document.hidden || ticks % every !== 0) return;
    busy = true;
    try {
      await refresh(tab);
    } finally {
      busy = false;
    }
  }, 1000);
}

init();
