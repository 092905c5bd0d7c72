// Small DOM helpers shared by the panels.

export const $ = (selector, root = document) => root.querySelector(selector);

export function el(name, attributes = {}, ...children) {
  const element = document.createElement(name);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    if (key.startsWith("on")) element.addEventListener(key.slice(2), value);
    else element.setAttribute(key, value === true ? "" : value);
  }
  element.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return element;
}

export function errorText(error) {
  if (!error) return "";
  if (error.code === "insufficient_scope") return `Not allowed with this key: ${error.detail}`;
  if (error.code === "missing_api_key" || error.code === "invalid_api_key") return `API key: ${error.detail}`;
  return `${error.status || ""} ${error.code}: ${error.detail}`.trim();
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${seconds.toFixed(0)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

// Server-Timing stages as one bar, each stage's width its share of the time, with a legend.
export function timingBar(root, stages) {
  const shown = stages.filter(([name, ms]) => ms > 0 && name !== "embedding");
  const total = shown.reduce((sum, [, ms]) => sum + ms, 0);
  const bar = el("div", { class: "timing-bar" });
  const legend = el("div", { class: "timing-legend" });
  shown.forEach(([name, ms], i) => {
    const part = el("span", { class: `stage-${i % 8}`, title: `${name}: ${ms.toFixed(1)} ms`, "data-stage": name });
    part.style.width = `${(100 * ms) / total}%`;
    bar.append(part);
    legend.append(el("span", { class: `key stage-${i % 8}` }), `${name} ${ms < 10 ? ms.toFixed(1) : ms.toFixed(0)} ms `);
  });
  root.replaceChildren(
    ...(shown.length ? [el("div", { class: "timing-total" }, `server ${total.toFixed(0)} ms`), bar, legend] : []),
  );
}
