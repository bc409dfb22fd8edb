// Pieces shared by several views: image cards, grids, pagers, category chips.
import { formatBytes, formatScore, h, thumb } from "./dom.js";

/** A result or catalog image as a link card. item: {id, thumbnail_url, score?, category?, duplicates?...} */
export function imageCard(item, { showScore = true } = {}) {
  const category = typeof item.category === "string" ? item.category : item.category?.name;
  // search hits carry a count in `duplicates`; catalog listings call it duplicate_count
  const dupCount = (Array.isArray(item.duplicates) ? item.duplicates.length : item.duplicates)
    ?? item.duplicate_count ?? 0;
  const label = [
    item.original_name || `Image ${item.id}`,
    category ? `category ${category}` : null,
    showScore && item.score != null ? `score ${formatScore(item.score)}` : null,
    item.rerank_score != null ? `re-rank score ${formatScore(item.rerank_score)}` : null,
    dupCount ? `${dupCount} duplicate${dupCount === 1 ? "" : "s"}` : null,
    item.match_type === "duplicate" ? "near-duplicate of the query" : null,
  ].filter(Boolean).join(", ");
  // on hover: which file this is (search hits and catalog listings both carry name, dimensions and size)
  const details = [
    item.original_name || `Image ${item.id}`,
    item.width && item.height ? `${item.width}×${item.height}` : null,
    item.byte_size != null ? formatBytes(item.byte_size) : null,
  ].filter(Boolean).join(" · ");
  return h("li.card", {},
    h("a.card-link", { href: `#/image/${item.id}`, "aria-label": label, title: details,
                       dataset: { imageId: item.id } },
      h("span.card-thumb", {}, thumb(item.thumbnail_url, "")),
      dupCount ? h("span.badge", { title: `${dupCount} near-duplicate${dupCount === 1 ? "" : "s"}` },
                   `+${dupCount} dup`) : null,
      // search hits whose perceptual hash is within the duplicate threshold of the query's (ranked first)
      item.match_type === "duplicate" ? h("span.badge.match", {
        title: `near-duplicate of the query (pHash distance ${item.phash_distance ?? 0})` }, "duplicate") : null,
      item.canonical_id ? h("span.badge.alt", { title: `a near-duplicate of image ${item.canonical_id}` }, "dup") : null,
      h("span.card-meta", {},
        showScore && item.score != null ? h("span.score", {}, formatScore(item.score)) : null,
        h("span.card-cat", {}, category || "uncategorised"))));
}

export function grid(items, opts) {
  return h("ul.grid", { role: "list" }, items.map((it) => imageCard(it, opts)));
}

/** Previous / page x of y / next, as links so every page is linkable. */
export function pager(page, pages, hrefFor) {
  if (pages <= 1) return null;
  return h("nav.pager", { "aria-label": "Pages" },
    page > 1 ? h("a.btn.ghost", { href: hrefFor(page - 1), rel: "prev" }, "← Previous") :
      h("span.btn.ghost.disabled", { "aria-disabled": "true" }, "← Previous"),
    h("span.muted", {}, `Page ${page} of ${pages}`),
    page < pages ? h("a.btn.ghost", { href: hrefFor(page + 1), rel: "next" }, "Next →") :
      h("span.btn.ghost.disabled", { "aria-disabled": "true" }, "Next →"));
}

export function emptyState(title, text, action) {
  return h("div.empty", {}, h("h2", {}, title), h("p.muted", {}, text), action || null);
}
