// Search: by image (drop, pick, paste), by image URL, by text, or "more like this" (#/similar/42).
// Options and text/URL queries live in the hash (#/search?q=red+car&k=24) so every search is linkable.
// Caption keywords filter or boost any of these; alone they search captions only (no model). "Which
// categories?" runs stage 1 alone. An empty search page offers a few catalog images to start from.
import { api, categories, query, status } from "../api.js";
import { replaceParams } from "../app.js";
import { grid, emptyState } from "../components.js";
import { clear, dropTarget, errorBox, formatMs, formatScore, h, spinner, thumb } from "../dom.js";

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
  const whichBtn = h("button.btn.ghost#which-categories", {
    type: "button", title: "Stage 1 alone: which categories is the query image like, with scores",
    onclick: () => whichCategories() }, "Which categories?");
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
    keywords: h("input#opt-keywords", { type: "search", autocomplete: "off", maxlength: 1000,
                                        placeholder: "words in captions", value: params.get("keywords") || "" }),
    kwmode: h("select#opt-kwmode", {},
      [["filter", "Only matching captions"], ["boost", "Boost matching captions"]].map(
        ([value, label]) => h("option", { value, selected: value === (params.get("keyword_mode") || "filter") },
                              label))),
    minScore: h("input#opt-min-score", { type: "number", min: -1, max: 1, step: 0.05, inputmode: "decimal",
                                         placeholder: "any", value: params.get("min_score") || "" }),
  };
  const syncOptionState = () => {
    // The number of stage-1 categories only matters when stage 1 runs.
    opt.categories.disabled = !opt.prototypes.checked || Boolean(opt.category.value);
    opt.kwmode.disabled = !opt.keywords.value.trim();
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
        opt.partial, " Find parts of images (region search)"),
      h("label.field", { for: "opt-keywords", title: "Alone: search captions only. With a query: filter or boost" },
        h("span", {}, "Caption keywords"), opt.keywords),
      h("label.field", { for: "opt-kwmode" }, h("span", {}, "Keywords"), opt.kwmode),
      h("label.field", { for: "opt-min-score", title: "Hide results scoring below this" },
        h("span", {}, "Minimum score"), opt.minScore)));

  const zone = h("section.search-panel", { "aria-label": "Query" },
    form,
    h("div.search-alt", {}, pickBtn, fileInput, h("span.muted", {}, "or drop / paste an image"), whichBtn),
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
    const words = opt.keywords.value.trim();
    if (words) { out.keywords = words; out.keyword_mode = opt.kwmode.value; }
    const min = parseFloat(opt.minScore.value);
    if (Number.isFinite(min)) out.min_score = min;
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
    } else if (o.keywords) { // keywords alone: captions only, ranked by how well they match
      const kw = { q: o.keywords, k: o.k, category: o.category, include_duplicates: o.include_duplicates,
                   min_score: o.min_score };
      request = (signal) => api(`/api/search/keywords${query(kw)}`, { signal });
      described = `captions matching “${o.keywords}”`;
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

  // ---- stage 1 alone ---------------------------------------------------------------------------------
  async function queryImageForm() {
    const fd = new FormData();
    if (imageFile) {
      fd.append("file", imageFile, imageFile.name || "pasted.png");
      return { body: fd };
    }
    const text = input.value.trim();
    if (text && isUrl(text)) return { json: { url: text } };
    if (similar) { // the indexed image's own bytes
      const response = await fetch(`/api/images/${similar}/file`, { credentials: "same-origin" });
      if (!response.ok) throw new Error(`image ${similar} could not be read (${response.status})`);
      fd.append("file", await response.blob(), `image-${similar}`);
      return { body: fd };
    }
    return null;
  }

  async function whichCategories() {
    if (controller) controller.abort();
    controller = new AbortController();
    const { signal } = controller;
    let form;
    try {
      form = await queryImageForm();
    } catch (err) {
      clear(results).append(errorBox(err));
      return;
    }
    if (!form) {
      clear(results).append(h("div.notice", { role: "alert" },
        "Choose, drop or paste an image, or paste an image URL, then ask which categories it is like."));
      return;
    }
    results.setAttribute("aria-busy", "true");
    clear(results).append(spinner("Comparing with the category prototypes…"));
    try {
      const body = await api(`/api/search/categories${query({ samples: 4, limit: 12 })}`,
                             { method: "POST", signal, ...form });
      showCategories(body);
    } catch (err) {
      if (err.name === "AbortError") return;
      clear(results).append(errorBox(err));
    } finally {
      if (!signal.aborted) results.setAttribute("aria-busy", "false");
    }
  }

  function showCategories(body) {
    clear(results);
    const t = body.timings_ms || {};
    results.append(h("div.results-head", {},
      h("h2", {}, "Categories this is like"),
      h("p.timings.muted.small", {}, `embed ${formatMs(t.embed)} · stage 1 ${formatMs(t.stage1)} · `,
        h("strong", {}, `total ${formatMs(t.total)}`), ` · ${body.model || ""} · stage 1 only`)));
    if (!body.categories.length) {
      results.append(emptyState("No categories yet", "Categories get prototypes once they hold images."));
      return;
    }
    results.append(h("ol.category-list", { "aria-label": "Categories by score" }, body.categories.map((c) =>
      h("li.category-row", { dataset: { categoryId: c.category_id } },
        h("div", {},
          h("button.linklike.category-name", {
            type: "button", title: `search only in ${c.category}`,
            onclick: () => { opt.category.value = c.category; syncOptionState(); run(); },
          }, c.category),
          h("div.muted.small.category-score", {}, `score ${formatScore(c.score)}`)),
        h("meter", { min: -1, max: 1, value: c.score, "aria-label": `score ${formatScore(c.score)}` }),
        h("a.category-samples", { href: `#/browse/${c.category_id}`, "aria-label": `Browse ${c.category}` },
          (c.sample_thumbnail_urls || []).map((u) => thumb(u, "")))))));
  }

  async function showSamples() {
    // An empty page: a few catalog images to start from (each opens "more like this").
    let page;
    try {
      page = await api(`/api/images${query({ duplicates: "exclude", page_size: 6 })}`);
    } catch {
      return;
    }
    if (!page.items.length || results.childElementCount) return; // a search started meanwhile
    results.append(h("section.samples", { "aria-label": "Sample queries" },
      h("h2", {}, "Try one of these"),
      h("p.muted.small", {}, "Images from the catalog: pick one to find more like it."),
      h("ul.grid", { role: "list" }, page.items.map((item) => h("li.card", {},
        h("a.card-link.sample-query", { href: `#/similar/${item.id}`,
                                        "aria-label": `More like ${item.original_name || `image ${item.id}`}`,
                                        dataset: { imageId: item.id } },
          h("span.card-thumb", {}, thumb(item.thumbnail_url, ""))))))));
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
      if (imageFile || input.value.trim() || similar || opt.keywords.value.trim()) run();
    });
  }
  opt.keywords.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); syncOptionState(); run(); }
  });
  const onPaste = (e) => {
    const file = [...(e.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
    if (file) { e.preventDefault(); useFile(file); }
  };
  document.addEventListener("paste", onPaste);

  if (similar || params.get("q") || params.get("url") || params.get("keywords")) run();
  else if (!empty) { input.focus(); showSamples(); }

  return () => {
    document.removeEventListener("paste", onPaste);
    if (controller) controller.abort();
  };
}

function clamp(v, lo, hi) {
  return Math.min(hi, Math.max(lo, v));
}
