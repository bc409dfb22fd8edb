// Tiny DOM helpers. Text always goes in through textContent, never innerHTML, so catalog data cannot inject markup.

/** h("a#id.card", {href: "#/x", onclick}, child, "text", [more]) -> element */
export function h(spec, attrs = {}, ...children) {
  // "tag#id.class1.class2" (id and classes optional, in any order after the tag)
  const [, tag, rest = ""] = spec.match(/^([a-z0-9-]*)(.*)$/i);
  const el = document.createElement(tag || "div");
  for (const part of rest.match(/[.#][^.#]+/g) || []) {
    if (part[0] === "#") el.id = part.slice(1);
    else el.classList.add(part.slice(1));
  }
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "class") el.className += (el.className ? " " : "") + value;
    else if (key === "text") el.textContent = value;
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

export function formatBytes(n) {
  if (n == null) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v >= 10 || i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
}

export function formatScore(s) {
  return s == null ? "" : Number(s).toFixed(3);
}

export function formatMs(ms) {
  if (ms == null) return "–";
  return ms < 10 ? `${Number(ms).toFixed(1)} ms` : `${Math.round(ms)} ms`;
}

export function formatDate(iso) {
  try { return new Date(iso).toLocaleString(); } catch { return iso; }
}

/** A thumbnail <img> that reserves its box (no layout shift) and loads lazily. */
export function thumb(url, alt, { eager = false } = {}) {
  const img = h("img", { src: url, alt: alt || "", loading: eager ? "eager" : "lazy", decoding: "async",
                         width: 256, height: 256 });
  img.addEventListener("error", () => img.classList.add("broken"), { once: true });
  return img;
}

let toastTimer;
export function toast(message, kind = "info") {
  const el = document.querySelector("[data-toast]");
  el.textContent = message;
  el.dataset.kind = kind;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.hidden = true; }, 4000);
}

export function errorBox(err) {
  return h("div.notice.error", { role: "alert" }, h("strong", {}, "Something went wrong: "), err.message || String(err));
}

export function spinner(label = "Loading…") {
  return h("p.loading", { role: "status" }, h("span.spin", { "aria-hidden": "true" }), label);
}

/** Turn an element into a drop target for image files; calls onFiles(File[]). */
export function dropTarget(el, onFiles) {
  let depth = 0;
  el.addEventListener("dragenter", (e) => { e.preventDefault(); depth += 1; el.classList.add("dragging"); });
  el.addEventListener("dragover", (e) => { e.preventDefault(); e.dataTransfer.dropEffect = "copy"; });
  el.addEventListener("dragleave", () => { depth -= 1; if (depth <= 0) { depth = 0; el.classList.remove("dragging"); } });
  el.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    el.classList.remove("dragging");
    const files = [...(e.dataTransfer?.files || [])];
    if (files.length) onFiles(files);
  });
}
