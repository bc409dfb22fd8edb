// Search: by image (drop, pick, paste), by image URL, by text, or "more like this" (#/similar/42).
// Options and text/URL queries live in the hash (#/search?q=red+car&k=24) so every search is linkable.
import { api, categories, query, status } from "../api.js";
import { replaceParams } from "../app.js";
import { grid, emptyState } from "../components.js";
import { clear, dropTarget, errorBox, formatMs, formatScore, h, spinner } from "../dom.js";

const DEFAULTS = { k: 12, categories: 3 };
const isUrl = (s) => /^https?:\/\/\S+$/i.test(s.trim());

export async function render(root, { params, similar }) {
  const [st, cats] = await Promise.all([status().catch(() => null), categories().catch(() => [])]);
  const activeModel = st?.search_model || null;
  const textOk = st ? Boolean(st.text_search) : true; // if status failed, let the server say no
  const empty = st && (st.counts?.images ?? 0) === 0;

  let imageFile = null; // the query image (not linkable: it only lives in this page)
  let controller = null;

  // ---- query form -----------------------------------------------------------------------------------
  const input = h("input#q", {
    type: "search", name: "q", autocomplete: "off", spellcheck: "false",
    placeholder: textOk ? "Describe what you are looking for, or paste an image URL" : "Paste an image URL",
    "aria-describedby": "q-help", value: params.get("q") || params.get("url") || "",
  });
  const fileInput = h("input.visually-hidden#search-file", { type: "file", accept: "image/*", tabindex: "-1" });
  const pickBtn = h("button.btn", { type: "button", onclick: () => fileInput.click() }, "Choose image…");
  const help = h("p.muted.small#q-help", {},
    textOk
      ? "Text search works because the active model reads text. Or drop an image anywhere here, pick one, or paste one."
      : null);
  if (!textOk) {
    help.append(
      h("strong", {}, "Text search is off: "),
      `the active model${activeModel ? ` (${activeModel.name})` : ""} understands images only. `,
      "Search with an image or an image URL, or switch to a CLIP model (imsrc models use clip-vit-b-32).");
  }

  const opt = {
    prototypes: h("input#opt-proto", { type: "checkbox", checked: (params.get("mode") || "two_stage") === "two_stage" }),
    k: h("input#opt-k", { type: "number", min: 1, max: 100, value: params.get("k") || DEFAULTS.k, inputmode: "numeric" }),
    categories: h("input#opt-cats", { type: "number", min: 1, max: 50,
                                      value: params.get("categories") || DEFAULTS.categories, inputmode: "numeric" }),
    category: h("select#opt-category", {},
      h("option", { value: "" }, "Any category"),
      cats.map((c) => h("option", { value: c.name, selected: c.name === params.get("category") },
                        `${c.name} (${c.image_count})`))),
    dups: h("input#opt-dups", { type: "checkbox", checked: params.get("include_duplicates") === "true" }),
    // region search: compare with windows of each image too (needs `imsrc embed --regions`)
    partial: h("input#opt-partial", { type: "checkbox", checked: params.get("match") === "partial" }),
    // image queries only: re-score the first candidates by a classic comparator on their thumbnails
    rerank: h("select#opt-rerank", {},
      [["", "Off"], ["orb", "ORB keypoints (edited copies)"], ["sift", "SIFT keypoints (edited copies)"],
       ["ssim", "SSIM (structure)"], ["histogram", "Colour histogram"], ["pixel", "Pixels"]].map(
        ([value, label]) => h("option", { value, selected: value === (params.get("rerank") || "") }, label))),
  };
  const syncOptionState = () => {
    // The number of stage-1 categories only matters when stage 1 runs.
    opt.categories.disabled = !opt.prototypes.checked || Boolean(opt.category.value);
  };
  syncOptionState();

  const preview = h("div.query-preview", { hidden: true });
  const form = h("form.searchbar", { role: "search", "aria-label": "Search the catalog" },
    h("label.visually-hidden", { for: "q" }, "Search text or image URL"),
    h("span.searchbar-icon", { "aria-hidden": "true" }, "⌕"),
    input,
    h("button.btn.primary", { type: "submit" }, "Search"));

  const options = h("details.options", { open: window.innerWidth > 720 },
    h("summary", {}, "Search options"),
    h("div.options-grid", {},
      h("label.check", { for: "opt-proto", title: "Compare with category prototypes first, then search only the best categories" },
        opt.prototypes, " Prototype filtering (two-stage)"),
      h("label.field", { for: "opt-k" }, h("span", {}, "Results (k)"), opt.k),
      h("label.field", { for: "opt-cats" }, h("span", {}, "Categories to search"), opt.categories),
      h("label.field", { for: "opt-category" }, h("span", {}, "Only in category"), opt.category),
      h("label.field", { for: "opt-rerank", title: "Image queries: re-rank the first 50 candidates by this comparator" },
        h("span", {}, "Re-rank (image queries)"), opt.rerank),
      h("label.check", { for: "opt-dups" }, opt.dups, " Include near-duplicates"),
      h("label.check", { for: "opt-partial", title: "Find images that contain the query (a crop, a logo): compares "
                         + "with windows of each image; the matched part is outlined" },
        opt.partial, " Find parts of images (region search)")));

  const zone = h("section.search-panel", { "aria-label": "Query" },
    form,
    h("div.search-alt", {}, pickBtn, fileInput, h("span.muted", {}, "or drop / paste an image")),
    help, preview, options);
  const results = h("section.results", { "aria-live": "polite", "aria-busy": "false" });

  root.append(
    h("h1.page-title", {}, similar ? `More like image ${similar}` : "Search"),
    zone, results);

  if (empty) {
    results.append(emptyState("The catalog is empty",
      "Upload some images first; then search by image, URL or text here.",
      h("a.btn.primary", { href: "#/upload" }, "Upload images")));
  }

  // ---- running a search -----------------------------------------------------------------------------
  function options_() {
    const k = clamp(parseInt(opt.k.value, 10) || DEFAULTS.k, 1, 100);
    const n = clamp(parseInt(opt.categories.value, 10) || DEFAULTS.categories, 1, 50);
    const out = { k, mode: opt.prototypes.checked ? "two_stage" : "ann", include_duplicates: opt.dups.checked };
    if (opt.prototypes.checked && !opt.category.value) out.categories = n;
    if (opt.category.value) out.category = opt.category.value;
    if (opt.rerank.value) out.rerank = opt.rerank.value;
    if (opt.partial.checked) out.match = "partial";
    return out;
  }

  function remember(extra) {
    const p = new URLSearchParams();
    for (const [key, v] of Object.entries({ ...extra, ...options_() })) {
      if (v !== undefined && v !== null && v !== "" && v !== false) p.set(key, String(v));
    }
    replaceParams(p);
  }

  async function run() {
    const text = input.value.trim();
    const o = options_();
    let request;
    let described;
    if (imageFile) {
      const fd = new FormData();
      fd.append("file", imageFile, imageFile.name || "pasted.png");
      request = (signal) => api(`/api/search/image${query(o)}`, { method: "POST", body: fd, signal });
      described = `the image ${imageFile.name || "you pasted"}`;
      remember({});
    } else if (text && isUrl(text)) {
      request = (signal) => api(`/api/search/image${query(o)}`, { method: "POST", json: { url: text }, signal });
      described = text;
      remember({ url: text });
    } else if (text) {
      if (!textOk) {
        clear(results).append(h("div.notice", { role: "alert" },
          "Text search needs a model that reads text; the active model understands images only. ",
          "Paste an image URL, or drop or pick an image instead."));
        return;
      }
      const { rerank: _unused, ...textOptions } = o; // comparators compare images; a text query has none
      request = (signal) => api(`/api/search/text${query({ q: text, ...textOptions })}`, { signal });
      described = `“${text}”`;
      remember({ q: text });
    } else if (similar) {
      request = (signal) => api(`/api/search/similar/${similar}${query(o)}`, { signal });
      described = `image ${similar}`;
      remember({});
    } else {
      input.focus();
      return;
    }
    if (controller) controller.abort();
    controller = new AbortController();
    const { signal } = controller;
    results.setAttribute("aria-busy", "true");
    clear(results).append(spinner("Searching…"));
    try {
      const body = await request(signal);
      showResults(body, described);
    } catch (err) {
      if (err.name === "AbortError") return;
      clear(results).append(errorBox(err));
    } finally {
      if (!signal.aborted) results.setAttribute("aria-busy", "false");
    }
  }

  function showResults(body, described) {
    clear(results);
    const t = body.timings_ms || {};
    const stage1 = body.stage1 || [];
    results.append(h("div.results-head", {},
      h("h2", {}, `${body.results.length} result${body.results.length === 1 ? "" : "s"} for ${described}`),
      h("p.timings.muted.small", {},
        `embed ${formatMs(t.embed)} · stage 1 ${formatMs(t.stage1)} · stage 2 ${formatMs(t.stage2)} · `,
        h("strong", {}, `total ${formatMs(t.total)}`), ` · ${body.model || ""} · ${body.mode || ""}`,
        body.match === "partial" ? " · region search" : "",
        body.rerank ? ` · re-ranked by ${body.rerank}` : "")));
    if (stage1.length) {
      results.append(h("p.looks-like", {}, h("span.muted", {}, "This looks like: "),
        stage1.map((s) => h("button.chip", {
          type: "button", title: `search only in ${s.category}`,
          onclick: () => { opt.category.value = s.category; syncOptionState(); run(); },
        }, s.category, h("span.chip-score", {}, formatScore(s.score))))));
    }
    if (!body.results.length) {
      results.append(emptyState("Nothing found", "Try more categories, turn prototype filtering off, or include duplicates."));
      return;
    }
    results.append(grid(body.results));
  }

  function useFile(file) {
    if (!file || !file.type.startsWith("image/")) {
      clear(results).append(h("div.notice.error", { role: "alert" }, `${file?.name || "That"} is not an image.`));
      return;
    }
    imageFile = file;
    input.value = "";
    const url = URL.createObjectURL(file);
    clear(preview).append(
      h("img", { src: url, alt: "", width: 56, height: 56 }),
      h("span", {}, "Searching with ", h("strong", {}, file.name || "pasted image")),
      h("button.btn.ghost.small", { type: "button", onclick: clearFile, "aria-label": "Remove the query image" }, "✕ Clear"));
    preview.hidden = false;
    run();
  }
  function clearFile() {
    imageFile = null;
    preview.hidden = true;
    clear(preview);
    input.focus();
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (input.value.trim()) { imageFile = null; preview.hidden = true; }
    run();
  });
  fileInput.addEventListener("change", () => useFile(fileInput.files[0]));
  dropTarget(zone, (files) => useFile(files[0]));
  for (const el of Object.values(opt)) {
    el.addEventListener("change", () => {
      syncOptionState();
      if (imageFile || input.value.trim() || similar) run();
    });
  }
  const onPaste = (e) => {
    const file = [...(e.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
    if (file) { e.preventDefault(); useFile(file); }
  };
  document.addEventListener("paste", onPaste);

  if (similar || params.get("q") || params.get("url")) run();
  else if (!empty) input.focus();

  return () => {
    document.removeEventListener("paste", onPaste);
    if (controller) controller.abort();
  };
}

function clamp(v, lo, hi) {
  return Math.min(hi, Math.max(lo, v));
}
