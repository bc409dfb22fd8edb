// One image: the picture, its metadata, category and prediction, duplicates, and "more like this".
import { api, query, status } from "../api.js";
import { refreshModelPill } from "../app.js";
import { grid } from "../components.js";
import { clear, errorBox, formatBytes, formatDate, formatScore, h, spinner, thumb, toast } from "../dom.js";

const SIMILAR_K = 12;

export async function render(root, { id }) {
  const img = await api(`/api/images/${id}`);
  const name = img.original_name || `Image ${img.id}`;

  const full = h("img.full", { src: img.file_url, alt: name, width: img.width, height: img.height });
  const zoom = h("button.image-button", { type: "button", "aria-label": `View ${name} full size`,
                                          onclick: () => lightbox(img, name) }, full);

  const meta = [
    ["Category", img.category ? h("a", { href: `#/browse/${img.category.id}` }, img.category.name) : "none"],
    ["Predicted", img.predicted_category
      ? [h("a", { href: `#/browse/${img.predicted_category.id}` }, img.predicted_category.name),
         img.predicted_score != null ? ` (${formatScore(img.predicted_score)})` : ""]
      : "–"],
    ["Size", `${img.width} × ${img.height} px · ${img.format} · ${formatBytes(img.byte_size)}`],
    ["Stored", img.stored_in_database ? "in the database" : (img.source_path || "by reference")],
    ["Models", img.models.length ? img.models.join(", ") : "not embedded yet"],
    ["Added", formatDate(img.created_at)],
    ["SHA-256", h("code.hash", { title: img.sha256 }, img.sha256.slice(0, 16) + "…")],
  ];
  meta.splice(2, 0, ["Caption", captionEditor(img)]);

  const dupSection = h("section.dups", { "aria-labelledby": "dups-title" });
  if (img.canonical) {
    dupSection.append(h("h2#dups-title", {}, "A near-duplicate of"), smallThumbs([img.canonical]));
  } else if (img.duplicates.length) {
    dupSection.append(h("h2#dups-title", {}, `${img.duplicates.length} near-duplicate${img.duplicates.length === 1 ? "" : "s"}`),
                      smallThumbs(img.duplicates));
  }

  const similar = h("section.similar", { "aria-labelledby": "similar-title", "aria-live": "polite" },
    h("div.results-head", {}, h("h2#similar-title", {}, "More like this"),
      h("a.btn.ghost.small", { href: `#/similar/${img.id}` }, "Open as a search")),
    spinner("Finding similar images…"));

  root.append(
    h("p.crumbs.small", {}, h("a", { href: "#/browse" }, "Browse"), " / ",
      img.category ? h("a", { href: `#/browse/${img.category.id}` }, img.category.name) : "uncategorised"),
    h("div.detail", {},
      h("figure.detail-image", {}, zoom, h("figcaption.muted.small", {}, "Select the image to view it full size")),
      h("div.detail-info", {},
        h("h1.page-title.break", {}, name),
        h("dl.meta", {}, meta.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v)))),
        h("div.toolbar", {},
          h("a.btn", { href: img.file_url, download: name }, "Download original"),
          h("button.btn.danger", { type: "button", onclick: () => confirmDelete(img, name) }, "Delete…")),
        dupSection)),
    similar);

  loadSimilar(img, similar);
}

// The caption, with an editor (PATCH /api/images/{id}); captions are what keyword search finds.
function captionEditor(img) {
  const text = h("span.caption-text", {}, img.caption || "none");
  const box = h("textarea#caption-edit", { rows: 3, "aria-label": "Caption" });
  const error = h("p.form-error", { role: "alert" });
  const form = h("form.caption-form", { hidden: true },
    box, error,
    h("div.toolbar", {},
      h("button.btn.primary.small", { type: "submit" }, "Save caption"),
      h("button.btn.ghost.small", { type: "button", onclick: () => { form.hidden = true; edit.hidden = false; } },
        "Cancel")));
  const edit = h("button.linklike.small#caption-edit-button", { type: "button", onclick: () => {
    box.value = img.caption || "";
    clear(error);
    form.hidden = false;
    edit.hidden = true;
    box.focus();
  } }, img.caption ? "Edit" : "Add a caption");
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const updated = await api(`/api/images/${img.id}`, { method: "PATCH", json: { caption: box.value } });
      img.caption = updated.caption;
      text.textContent = img.caption || "none";
      edit.textContent = img.caption ? "Edit" : "Add a caption";
      form.hidden = true;
      edit.hidden = false;
      toast("Caption saved");
    } catch (err) {
      clear(error).append(err.message);
    }
  });
  return [text, " ", edit, form];
}

async function loadSimilar(img, section) {
  const remove = () => section.querySelector(".loading, .notice")?.remove();
  try {
    const body = await api(`/api/search/similar/${img.id}${query({ k: SIMILAR_K })}`);
    remove();
    const items = body.results.filter((r) => r.id !== img.id);
    section.append(items.length ? grid(items) : h("p.muted", {}, "No other images yet."));
  } catch (err) {
    remove();
    section.append(err.status === 404 && err.code === "not_found" && /embedd|vector/i.test(err.message)
      ? h("p.muted", {}, "This image has no vector for the active model yet.")
      : errorBox(err));
  }
}

function smallThumbs(items) {
  return h("ul.mini-grid", { role: "list" }, items.map((d) => h("li", {},
    h("a", { href: `#/image/${d.id}`, "aria-label": d.original_name || `Image ${d.id}` }, thumb(d.thumbnail_url, "")))));
}

function lightbox(img, name) {
  const dialog = h("dialog.lightbox", { "aria-label": name },
    h("form", { method: "dialog" },
      h("button.btn.ghost.close", { type: "submit", "aria-label": "Close" }, "✕")),
    h("img", { src: img.file_url, alt: name }));
  dialog.addEventListener("click", (e) => { if (e.target === dialog) dialog.close(); });
  dialog.addEventListener("close", () => dialog.remove());
  document.body.append(dialog);
  dialog.showModal();
}

function confirmDelete(img, name) {
  const error = h("p.form-error", { role: "alert" });
  const dialog = h("dialog.dialog", { "aria-labelledby": "del-title" },
    h("form.dialog-body", { method: "dialog" },
      h("h2#del-title", {}, "Delete this image?"),
      h("p", {}, `“${name}” will be removed with its thumbnail, vectors and stored bytes.`,
        img.duplicates.length ? ` Its ${img.duplicates.length} near-duplicate(s) stay; the oldest becomes the original.` : ""),
      error,
      h("div.dialog-actions", {},
        h("button.btn.ghost", { type: "submit", autofocus: true }, "Cancel"),
        h("button.btn.danger", { type: "button", onclick: doDelete }, "Delete"))));
  async function doDelete() {
    try {
      await api(`/api/images/${img.id}`, { method: "DELETE" });
      dialog.close();
      toast(`Deleted ${name}`);
      status({ refresh: true }).catch(() => {});
      refreshModelPill();
      location.hash = img.category ? `#/browse/${img.category.id}` : "#/browse";
    } catch (err) {
      clear(error).append(err.message);
    }
  }
  dialog.addEventListener("close", () => dialog.remove());
  document.body.append(dialog);
  dialog.showModal();
}
