// Server: readiness, the embedding cache tiers and the encoder queues, refreshed live.

import { api, can, needs } from "./api.js";
import { $, bytes, el, errorText } from "./ui.js";

function tierRow(name, tier) {
  if (!tier) return el("tr", {}, el("th", {}, name), el("td", { colspan: 5, class: "muted" }, "not configured"));
  const lookups = (tier.hits || 0) + (tier.misses || 0);
  const rate = lookups ? `${((100 * tier.hits) / lookups).toFixed(0)} %` : "–";
  const fill = tier.max_bytes ? ` of ${bytes(tier.max_bytes)}` : "";
  return el("tr", { "data-tier": name },
    el("th", {}, name),
    el("td", {}, String(tier.entries ?? "–")),
    el("td", {}, `${bytes(tier.bytes)}${fill}`),
    el("td", {}, `${tier.hits ?? "–"} / ${tier.misses ?? "–"}`),
    el("td", {}, rate),
    el("td", {}, String(tier.evictions ?? "–")),
  ); // prettier-ignore
}

export async function refreshStats() {
  const root = $("#stats");
  if (!can("interactive", "admin")) {
    root.replaceChildren(el("p", { class: "notice" }, needs("interactive", "admin")));
    return;
  }
  const [cache, ready] = await Promise.all([api("GET", "/v1/cache/stats"), api("GET", "/readyz")]);
  if (!cache.ok) return root.replaceChildren(el("p", { class: "error" }, errorText(cache.error)));
  const data = cache.data;
  const encoders = Object.entries(data.encoders || {});
  root.replaceChildren(
    el("p", {}, ready.ok ? "Ready: every enabled model finished loading." : "Not ready: models are loading."),
    el("h3", {}, "Embedding cache"),
    el("table", { class: "grid" },
      el("tr", {}, ["tier", "entries", "bytes", "hits / misses", "hit rate", "evictions"].map((h) => el("th", {}, h))),
      tierRow("L1 (in process)", data.embeddings),
      tierRow(`L2 (${data.l2 ? data.l2.tier || "shared" : "none"})`, data.l2),
      tierRow("refinement", data.refinement)),
    el("h3", {}, "Encoder queues"),
    encoders.length
      ? el("table", { class: "grid" },
          el("tr", {}, el("th", {}, "model"), el("th", {}, "state")),
          encoders.map(([model, queue]) => el("tr", { "data-encoder": model }, el("th", {}, model),
            el("td", {}, Object.entries(queue).map(([k, v]) => `${k}: ${typeof v === "number" ? +v.toFixed(2) : JSON.stringify(v)}`).join(", ")))))
      : el("p", { class: "muted" }, "No encoder has run yet."),
  ); // prettier-ignore
}

