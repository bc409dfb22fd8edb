// Upload: pick or drop many images, optional category, a progress bar and a result per file.
// One request per file so each file gets its own progress bar; two at a time keeps the server busy
// without making the last file wait behind everything else.
import { categories, status, uploadWithProgress } from "../api.js";
import { refreshModelPill } from "../app.js";
import { clear, dropTarget, formatBytes, h } from "../dom.js";

const PARALLEL = 2;

export async function render(root) {
  const [cats, st] = await Promise.all([categories().catch(() => []), status().catch(() => null)]);
  const limit = st?.max_upload_bytes ?? Infinity;
  const fileInput = h("input.visually-hidden#upload-files", { type: "file", accept: "image/*", multiple: true,
                                                             tabindex: "-1" });
  const category = h("input#upload-category", { type: "text", list: "upload-category-list", autocomplete: "off",
                                                maxlength: 200, placeholder: "none" });
  // one caption for every file of this drop (searchable by keywords); images that already have one keep theirs
  const caption = h("input#upload-caption", { type: "text", autocomplete: "off", maxlength: 2000,
                                              placeholder: "none" });
  const list = h("ol.upload-list", { "aria-label": "Files", "aria-live": "polite" });
  const summary = h("p.upload-summary", { role: "status" });
  const after = h("div.toolbar");
  const pick = h("button.btn.primary", { type: "button", onclick: () => fileInput.click() }, "Choose images…");
  const zone = h("div.dropzone", {},
    h("p.dropzone-title", {}, "Drop images here"),
    h("p.muted", {}, "JPEG, PNG, WebP, GIF, BMP or TIFF — as many as you like."),
    pick, fileInput);

  root.append(
    h("h1.page-title", {}, "Upload"),
    h("section.panel", { "aria-label": "Upload images" },
      h("div.field-row", {},
        h("label.field", { for: "upload-category" },
          h("span", {}, "Category (optional)"), category,
          h("datalist#upload-category-list", {}, cats.map((c) => h("option", { value: c.name })))),
        h("label.field", { for: "upload-caption" }, h("span", {}, "Caption (optional, searchable)"), caption)),
      zone),
    summary, list, after);

  let queue = [];
  let running = 0;
  const counts = { new: 0, duplicate: 0, failed: 0, total: 0 };

  function updateSummary() {
    const done = counts.new + counts.duplicate + counts.failed;
    summary.textContent = counts.total
      ? `${done} of ${counts.total} done: ${counts.new} new, ${counts.duplicate} duplicate, ${counts.failed} failed`
      : "";
  }

  function addFiles(files) {
    const cat = category.value.trim();
    const text = caption.value.trim();
    for (const file of files) {
      const bar = h("progress", { max: 100, value: 0, "aria-label": `Upload progress for ${file.name}` });
      const state = h("span.upload-state", {}, "waiting");
      const preview = file.type.startsWith("image/") ? h("img", { src: URL.createObjectURL(file), alt: "",
                                                                   width: 48, height: 48 }) : h("span.noimg");
      const row = h("li.upload-row", {},
        preview,
        h("div.upload-info", {}, h("span.upload-name", {}, file.name), h("span.muted.small", {}, formatBytes(file.size)),
          bar),
        state);
      list.append(row);
      queue.push({ file, cat, text, bar, state, row, preview });
      counts.total += 1;
    }
    updateSummary();
    pump();
  }

  function pump() {
    while (running < PARALLEL && queue.length) {
      const job = queue.shift();
      running += 1;
      send(job).finally(() => {
        running -= 1;
        updateSummary();
        if (!queue.length && !running) done();
        pump();
      });
    }
  }

  async function send({ file, cat, text, bar, state, row, preview }) {
    if (file.size > limit) { // refuse before sending: no point pushing megabytes the server will reject
      row.classList.add("failed");
      clear(state).append(h("span.tag.bad", {}, "failed"),
                          ` larger than the server's upload limit of ${formatBytes(limit)}`);
      counts.failed += 1;
      return;
    }
    state.textContent = "uploading";
    const fd = new FormData();
    fd.append("file", file, file.name);
    if (cat) fd.append("category", cat);
    if (text) fd.append("caption", text);
    try {
      const body = await uploadWithProgress("/api/images", fd, (f) => {
        bar.value = Math.round(f * 100);
        if (f >= 1) state.textContent = "indexing…";
      });
      const r = body.results[0];
      if (preview.src) URL.revokeObjectURL(preview.src);
      showResult(r, state, row);
      counts[r.status] += 1;
    } catch (err) {
      row.classList.add("failed");
      // A request whose only file failed comes back as an error naming the file: show just the reason.
      const reason = err.message.replace(/^no image was stored: /, "").replace(`${file.name}: `, "");
      clear(state).append(h("span.tag.bad", {}, "failed"), " ", reason);
      counts.failed += 1;
    }
  }

  function showResult(r, state, row) {
    row.classList.add(r.status);
    clear(state);
    if (r.status === "new") {
      state.append(h("span.tag.good", {}, "new"), " ", h("a", { href: `#/image/${r.id}` }, `image ${r.id}`),
                   r.category ? ` in ${r.category.name}` : "");
    } else if (r.status === "duplicate") {
      state.append(h("span.tag.warn", {}, r.exact ? "already here" : "near-duplicate"), " of ",
                   h("a", { href: `#/image/${r.duplicate_of}` }, `image ${r.duplicate_of}`));
      if (r.id && r.id !== r.duplicate_of) {
        state.append(" (kept as ", h("a", { href: `#/image/${r.id}` }, `image ${r.id}`), ")");
      }
    } else {
      state.append(h("span.tag.bad", {}, "failed"), " ", r.reason || "unknown reason");
    }
  }

  function done() {
    const last = category.value.trim();
    clear(after);
    after.append(h("a.btn", { href: "#/browse/all" }, "See all images"));
    categories({ refresh: true }).then((cs) => {
      const c = last && cs.find((x) => x.name.toLowerCase() === last.toLowerCase());
      if (c) after.prepend(h("a.btn", { href: `#/browse/${c.id}` }, `Open “${c.name}”`));
    }).catch(() => {});
    status({ refresh: true }).catch(() => {});
    refreshModelPill();
  }

  fileInput.addEventListener("change", () => {
    addFiles([...fileInput.files]);
    fileInput.value = "";
  });
  dropTarget(zone, addFiles);
  pick.focus();
  return () => { queue = []; };
}
