// Shell: hash routing (#/search, #/upload, #/browse/3, #/image/42), header, settings dialog.
import { getApiKey, setApiKey, status } from "./api.js";
import { clear, errorBox, spinner } from "./dom.js";

const routes = [
  { pattern: /^\/search$/, view: "search", load: () => import("./views/search.js") },
  { pattern: /^\/similar\/(\d+)$/, view: "search", load: () => import("./views/search.js"), key: "similar" },
  { pattern: /^\/upload$/, view: "upload", load: () => import("./views/upload.js") },
  { pattern: /^\/browse$/, view: "browse", load: () => import("./views/browse.js") },
  { pattern: /^\/browse\/(all|\d+)$/, view: "browse", load: () => import("./views/category.js"), key: "category" },
  { pattern: /^\/image\/(\d+)$/, view: "image", load: () => import("./views/image.js"), key: "id" },
];

const main = document.getElementById("main");
let cleanup = null;
let navigations = 0;
let current = null;

export function parseHash(hash = location.hash) {
  const raw = hash.replace(/^#/, "") || "/search";
  const [path, qs = ""] = raw.split("?");
  return { path: path || "/search", params: new URLSearchParams(qs) };
}

/** Change the URL's query without re-rendering (views keep their state in the hash so it is linkable). */
export function replaceParams(params) {
  const { path } = parseHash();
  const qs = params.toString();
  history.replaceState(null, "", `#${path}${qs ? `?${qs}` : ""}`);
  current = location.hash;
}

async function route() {
  if (location.hash === current) return;
  current = location.hash;
  const { path, params } = parseHash();
  const match = routes.map((r) => ({ r, m: path.match(r.pattern) })).find((x) => x.m);
  if (!match) {
    location.replace("#/search");
    return;
  }
  const { r, m } = match;
  if (cleanup) { try { cleanup(); } catch { /* a view's cleanup must not block the next view */ } }
  cleanup = null;
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === r.view) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  closeMenu();
  clear(main).append(spinner());
  const token = ++navigations;
  try {
    const mod = await r.load();
    if (token !== navigations) return;
    const args = { params, path };
    if (r.key) args[r.key] = m[1];
    clear(main);
    cleanup = (await mod.render(main, args)) || null;
  } catch (err) {
    if (token !== navigations) return;
    clear(main).append(errorBox(err));
  }
  if (token !== navigations) return;
  // Move focus to the new view's heading on navigation (not on first load), so keyboard and screen
  // reader users land at the start of the new content.
  if (navigations > 1) {
    const heading = main.querySelector("h1");
    if (heading) { heading.tabIndex = -1; heading.focus({ preventScroll: false }); }
  }
}

// ---- header -------------------------------------------------------------------------------------------
const toggle = document.querySelector("[data-menu-toggle]");
const nav = document.getElementById("nav");
function closeMenu() {
  toggle.setAttribute("aria-expanded", "false");
  nav.classList.remove("open");
}
toggle.addEventListener("click", () => {
  const open = toggle.getAttribute("aria-expanded") !== "true";
  toggle.setAttribute("aria-expanded", String(open));
  nav.classList.toggle("open", open);
  if (open) nav.querySelector("a, button")?.focus();
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && nav.classList.contains("open")) {
    closeMenu();
    toggle.focus();
  }
});

document.querySelector("[data-skip]").addEventListener("click", (e) => {
  e.preventDefault();
  main.focus();
});

export async function refreshModelPill() {
  const pill = document.querySelector("[data-model-pill]");
  try {
    const s = await status({ refresh: true });
    const model = s.search_model?.name || "no model";
    const n = s.counts?.images ?? 0;
    pill.textContent = `${n} image${n === 1 ? "" : "s"} · ${model}`;
    pill.title = s.text_search ? "text search available" : "image search only";
  } catch {
    pill.textContent = "server unreachable";
  }
}

// ---- settings dialog ----------------------------------------------------------------------------------
const dialog = document.querySelector("[data-settings-dialog]");
const form = document.querySelector("[data-settings-form]");
function openSettings(reason = "") {
  form.elements.key.value = getApiKey();
  document.querySelector("[data-settings-reason]").textContent = reason;
  dialog.showModal();
  form.elements.key.focus();
}
document.querySelector("[data-open-settings]").addEventListener("click", () => openSettings());
dialog.querySelector("[data-close]").addEventListener("click", () => dialog.close());
form.addEventListener("submit", () => setApiKey(form.elements.key.value.trim()));
window.addEventListener("imsrc:unauthorized", (e) => {
  if (!dialog.open) openSettings(`The server needs an API key for that: ${e.detail.message}`);
});
if (getApiKey()) setApiKey(getApiKey()); // keep the read cookie in step with local storage

window.addEventListener("hashchange", route);
refreshModelPill();
route();
