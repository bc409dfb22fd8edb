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
    item.match_type === "partial" && item.box ? `part of it matched (${describeBox(item.box)})` : null,
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
      partialBox(item) ? h("span.card-thumb.boxed", {}, boxedThumb(item)) : h("span.card-thumb", {}, thumb(item.thumbnail_url, "")),
      dupCount ? h("span.badge", { title: `${dupCount} near-duplicate${dupCount === 1 ? "" : "s"}` },
                   `+${dupCount} dup`) : null,
      // search hits whose perceptual hash is within the duplicate threshold of the query's (ranked first)
      item.match_type === "duplicate" ? h("span.badge.match", {
        title: `near-duplicate of the query (pHash distance ${item.phash_distance ?? 0})` }, "duplicate") : null,
      // match=partial: found by one of its windows, drawn on the thumbnail
      item.match_type === "partial" ? h("span.badge.match", { title: `the query matched this part: ${describeBox(item.box)}` },
        "partial") : null,
      item.canonical_id ? h("span.badge.alt", { title: `a near-duplicate of image ${item.canonical_id}` }, "dup") : null,
      h("span.card-meta", {},
        showScore && item.score != null ? h("span.score", {}, formatScore(item.score)) : null,
        h("span.card-cat", {}, category || "uncategorised")),
      // the caption under the result (search hits carry it); a caption that matched the keywords is marked
      item.caption ? h("span.card-caption", { title: item.caption, class: item.keyword_match ? "matched" : null },
                       item.caption) : null));
}

/** A region hit's box, unless it is the whole image. box: [x0, y0, x1, y1] as fractions of width and height. */
function partialBox(item) {
  const b = item.box;
  return Array.isArray(b) && b.length === 4 && !(b[0] === 0 && b[1] === 0 && b[2] === 1 && b[3] === 1) ? b : null;
}

function describeBox(b) {
  if (!b) return "";
  const pct = (v) => `${Math.round(v * 100)}%`;
  return `from ${pct(b[0])}, ${pct(b[1])} to ${pct(b[2])}, ${pct(b[3])} of the image`;
}

/** The whole thumbnail (not cropped to the square, so fractions map onto it) with the matched box over it.
 *  Sizes go through CSSOM (element.style), which the page's CSP (style-src 'self') allows, unlike style="". */
function boxedThumb(item) {
  const [x0, y0, x1, y1] = item.box;
  const mark = h("span.match-box", { "aria-hidden": "true" });
  Object.assign(mark.style, { left: `${x0 * 100}%`, top: `${y0 * 100}%`, width: `${(x1 - x0) * 100}%`,
                              height: `${(y1 - y0) * 100}%` });
  const frame = h("span.thumb-frame", {}, thumb(item.thumbnail_url, ""), mark);
  const w = item.width || 1;
  const ht = item.height || 1;
  frame.style.aspectRatio = `${w} / ${ht}`;
  if (w >= ht) frame.style.width = "100%"; else frame.style.height = "100%";
  return frame;
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
