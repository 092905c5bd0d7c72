// The bucket browser: the storage profiles' roots (GET /v1/storage), then one bounded page of a prefix at a
// time (GET /v1/storage/list), folders first; choosing an image opens it in Try.

import { api } from "./api.js";
import { el, errorText } from "./ui.js";

const IMAGE = /\.(jpe?g|png|webp|bmp|tiff?|gif|heic|heif)$/i;
const PAGE = 100;

export class Browser {
  constructor(root, onPick) {
    this.root = root;
    this.onPick = onPick;
    this.root.hidden = true;
  }

  toggle() {
    this.root.hidden = !this.root.hidden;
    if (!this.root.hidden) this.roots();
  }

  message(text, isError = false) {
    this.root.replaceChildren(el("p", { class: isError ? "error" : "muted" }, text));
  }

  async roots() {
    const reply = await api("GET", "/v1/storage");
    if (!reply.ok) return this.message(errorText(reply.error), true);
    if (!reply.data.roots.length) {
      return this.message("This server has no storage profiles (LABELSERVE_STORAGE_PROFILES): nothing to browse.");
    }
    this.root.replaceChildren(
      el("p", { class: "muted" }, "Buckets on this server's allow-list:"),
      el("ul", { class: "listing" }, reply.data.roots.map((r) =>
        el("li", {}, el("button", { class: "link", onclick: () => this.list(r.url) }, `${r.url} (${r.profile})`)),
      )),
    ); // prettier-ignore
  }

  async list(url, cursor = null, pages = []) {
    const query = `url=${encodeURIComponent(url)}&limit=${PAGE}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`;
    this.message(`listing ${url}…`);
    const reply = await api("GET", `/v1/storage/list?${query}`);
    if (!reply.ok) return this.message(errorText(reply.error), true);
    const page = reply.data;
    const parent = url.replace(/[^/]*\/?$/, "");
    const rows = [
      ...page.folders.map((folder) =>
        el("li", {}, el("button", { class: "link", onclick: () => this.list(folder) }, `📁 ${folder.slice(url.length)}`)),
      ),
      ...page.objects.map((object) =>
        el("li", {}, IMAGE.test(object.name)
          ? el("button", { class: "link", onclick: () => this.onPick(object.url) }, object.name)
          : el("span", { class: "muted" }, object.name), ` ${(object.size / 1024).toFixed(0)} KiB`),
      ),
    ]; // prettier-ignore
    this.root.replaceChildren(
      el("div", { class: "browse-head" },
        el("button", { onclick: () => this.roots() }, "Buckets"),
        parent.length > "s3://".length && el("button", { onclick: () => this.list(parent) }, "Up"),
        el("code", {}, url)),
      el("ul", { class: "listing" }, rows.length ? rows : [el("li", { class: "muted" }, "(empty)")]),
      el("div", { class: "browse-pages" },
        pages.length > 0 && el("button", { onclick: () => this.list(url, pages.at(-1), pages.slice(0, -1)) }, "Previous page"),
        page.next && el("button", { onclick: () => this.list(url, page.next, [...pages, cursor]) }, "Next page")),
    ); // prettier-ignore
  }
}
