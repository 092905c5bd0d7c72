// An image shown scaled to fit the screen, with what is drawn over it in image pixels: a mask canvas of the
// image's own size (CSS scales it with the image), and an SVG whose viewBox is the image, for boxes, points,
// keypoints and labels. Pointer positions are converted to image pixels (pixel-edge: 0..W x 0..H).

const SVG = "http://www.w3.org/2000/svg";
export const MASK_ALPHA = 120; // every mask pixel of the overlay has this alpha; others have 0
const PALETTE = [
  [255, 64, 129], [0, 200, 255], [255, 193, 7], [124, 77, 255], [0, 230, 118],
  [255, 87, 34], [41, 121, 255], [233, 30, 99], [139, 195, 74], [0, 188, 212],
];

export function colour(index) {
  return PALETTE[index % PALETTE.length];
}

export function svgElement(name, attributes = {}, parent = null) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (parent) parent.append(element);
  return element;
}

// CVAT RLE: background-first alternating run lengths over the inclusive box [xtl, ytl, xbr, ybr], row by row.
export function decodeCvatRle(encoded) {
  const runs = encoded.slice(0, -4);
  const [xtl, ytl, xbr, ybr] = encoded.slice(-4);
  const width = xbr - xtl + 1;
  const height = ybr - ytl + 1;
  const bits = new Uint8Array(Math.max(width * height, 0));
  let at = 0;
  for (let i = 0; i < runs.length; i++) {
    if (i % 2 === 1) bits.fill(1, at, at + runs[i]);
    at += runs[i];
  }
  return { bits, x: xtl, y: ytl, width, height, empty: runs.length <= 1 };
}

export class Stage {
  constructor(root) {
    this.root = root;
    root.classList.add("stage");
    this.img = document.createElement("img");
    this.img.alt = "";
    this.img.draggable = false;
    this.canvas = document.createElement("canvas");
    this.canvas.className = "mask-layer";
    this.svg = svgElement("svg", { class: "shape-layer" });
    root.replaceChildren(this.img, this.canvas, this.svg);
    this.width = 0;
    this.height = 0;
    this.onResize = () => this.rescale();
    new ResizeObserver(this.onResize).observe(this.img);
  }

  // Shows `src` (a URL or blob: URL); resolves with its size once loaded.
  show(src) {
    return new Promise((resolve, reject) => {
      this.img.onload = () => {
        this.width = this.img.naturalWidth;
        this.height = this.img.naturalHeight;
        this.canvas.width = this.width;
        this.canvas.height = this.height;
        this.svg.setAttribute("viewBox", `0 0 ${this.width} ${this.height}`);
        this.clear();
        this.rescale();
        resolve({ width: this.width, height: this.height });
      };
      this.img.onerror = () => reject(new Error("the browser could not show this image"));
      this.img.src = src;
    });
  }

  // Image pixels per screen pixel: strokes and labels stay the same size on screen at any image size.
  get unit() {
    const shown = this.img.getBoundingClientRect().width;
    return shown > 0 && this.width ? this.width / shown : 1;
  }

  rescale() {
    this.svg.style.setProperty("--unit", String(this.unit));
    for (const element of this.svg.querySelectorAll("[data-r]")) {
      element.setAttribute("r", String(Number(element.dataset.r) * this.unit));
    }
    for (const element of this.svg.querySelectorAll("[data-font]")) {
      element.setAttribute("font-size", String(Number(element.dataset.font) * this.unit));
    }
    for (const element of this.svg.querySelectorAll("[data-stroke]")) {
      element.setAttribute("stroke-width", String(Number(element.dataset.stroke) * this.unit));
    }
  }

  // The pointer event's position in image pixels, clamped to the image.
  toImage(event) {
    const rect = this.img.getBoundingClientRect();
    const x = ((event.clientX - rect.left) / rect.width) * this.width;
    const y = ((event.clientY - rect.top) / rect.height) * this.height;
    const round = (v) => Math.round(v * 10) / 10;
    return [round(Math.min(Math.max(x, 0), this.width)), round(Math.min(Math.max(y, 0), this.height))];
  }

  clear() {
    this.clearMasks();
    this.svg.replaceChildren();
  }

  clearMasks() {
    this.canvas.getContext("2d").clearRect(0, 0, this.canvas.width, this.canvas.height);
  }

  // Paints a CVAT-RLE mask (as the API returns it) in image pixels.
  paintMask(encoded, rgb) {
    const mask = decodeCvatRle(encoded);
    if (mask.empty || mask.width <= 0 || mask.height <= 0) return 0;
    const context = this.canvas.getContext("2d");
    const image = context.getImageData(mask.x, mask.y, mask.width, mask.height);
    const pixels = image.data;
    let count = 0;
    for (let i = 0; i < mask.bits.length; i++) {
      if (!mask.bits[i]) continue;
      const p = i * 4;
      pixels[p] = rgb[0];
      pixels[p + 1] = rgb[1];
      pixels[p + 2] = rgb[2];
      pixels[p + 3] = MASK_ALPHA;
      count++;
    }
    context.putImageData(image, mask.x, mask.y);
    return count;
  }

  group(className) {
    return svgElement("g", { class: className }, this.svg);
  }

  point(parent, x, y, positive) {
    return svgElement("circle", { cx: x, cy: y, "data-r": 6, r: 6 * this.unit,
      class: positive ? "prompt-point positive" : "prompt-point negative",
      "data-stroke": 2, "stroke-width": 2 * this.unit }, parent); // prettier-ignore
  }

  box(parent, [x1, y1, x2, y2], className, rgb = null, rotation = 0) {
    const attributes = { x: x1, y: y1, width: Math.max(x2 - x1, 0), height: Math.max(y2 - y1, 0),
      class: className, "data-stroke": 2, "stroke-width": 2 * this.unit }; // prettier-ignore
    if (rgb) attributes.stroke = `rgb(${rgb.join(",")})`;
    if (rotation) attributes.transform = `rotate(${rotation} ${(x1 + x2) / 2} ${(y1 + y2) / 2})`;
    return svgElement("rect", attributes, parent);
  }

  label(parent, x, y, text, rgb) {
    const element = svgElement("text", { x, y, class: "shape-label", "data-font": 12,
      "font-size": 12 * this.unit, fill: `rgb(${rgb.join(",")})` }, parent); // prettier-ignore
    element.textContent = text;
    return element;
  }

  keypoint(parent, x, y, rgb, title) {
    const element = svgElement("circle", { cx: x, cy: y, "data-r": 3, r: 3 * this.unit, class: "keypoint",
      fill: `rgb(${rgb.join(",")})` }, parent); // prettier-ignore
    svgElement("title", {}, element).textContent = title;
    return element;
  }
}
