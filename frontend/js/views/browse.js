// Browse: the catalog's status, then every category with its count and a few sample thumbnails.
import { categories, status } from "../api.js";
import { emptyState } from "../components.js";
import { formatBytes, h, thumb } from "../dom.js";

export async function render(root) {
  const [st, cats] = await Promise.all([status({ refresh: true }), categories({ refresh: true })]);
  root.append(h("h1.page-title", {}, "Browse"), statusPanel(st));

  const total = st.counts?.images ?? 0;
  if (!total && !cats.length) {
    root.append(emptyState("Nothing here yet", "Upload images, or index a folder with `imsrc index PATH`.",
                           h("a.btn.primary", { href: "#/upload" }, "Upload images")));
    return;
  }
  root.append(
    h("h2.section-title", {}, "Categories"),
    h("ul.cat-grid", { role: "list" },
      h("li", {}, categoryCard({ id: "all", name: "All images", image_count: total,
                                 sample_thumbnail_urls: cats.flatMap((c) => c.sample_thumbnail_urls.slice(0, 1)).slice(0, 4) })),
      cats.map((c) => h("li", {}, categoryCard(c)))));
}

function categoryCard(c) {
  const samples = c.sample_thumbnail_urls || [];
  return h("a.cat-card", { href: `#/browse/${c.id}` },
    h("span.mosaic", { "aria-hidden": "true", dataset: { n: String(Math.min(samples.length, 4)) } },
      samples.length ? samples.slice(0, 4).map((u) => thumb(u, "")) : h("span.mosaic-empty", {}, c.id === "all" ? "▦" : "∅")),
    h("span.cat-name", {}, c.name, c.is_automatic ? h("span.tag", { title: "found by clustering; rename it to make it a real category" }, "auto") : null),
    h("span.muted.small", {}, `${c.image_count} image${c.image_count === 1 ? "" : "s"}`,
      c.unique_image_count != null && c.unique_image_count !== c.image_count ? ` · ${c.unique_image_count} unique` : ""));
}

function statusPanel(st) {
  const active = st.models?.find((m) => m.is_active);
  const c = st.counts || {};
  const rows = [
    ["Images", `${c.images ?? 0}${c.duplicates ? ` (${c.duplicates} near-duplicates)` : ""}`],
    ["Categories", c.categories ?? 0],
    ["Active model", active ? `${active.name} · ${active.dimension}-d · ${active.supports_text ? "image + text" : "image only"}`
                            : "none yet (the first upload picks one)"],
    ["Vectors", c.embeddings ?? 0],
    ["Index", indexText(st.index)],
    ["Stored originals", `${c.stored_originals ?? 0} · ${formatBytes(c.image_bytes)}`],
    ["Database", `${formatBytes(c.database_bytes)} · schema ${st.schema_revision || "?"}${st.database?.embedded ? " · embedded" : ""}`],
  ];
  if (st.jobs?.length) rows.push(["Jobs", st.jobs.map((j) => `#${j.id} ${j.kind} ${j.status} (${j.new} new, ${j.failed} failed)`).join(", ")]);
  return h("section.panel.status", { "aria-label": "Catalog status" },
    h("dl.stats", {}, rows.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, String(v))))));
}

function indexText(index) {
  if (!index) return "none yet";
  const parts = [index.backend, `${index.vectors} vectors`, index.hnsw ? "HNSW" : "no HNSW"];
  if (index.category_indexes) parts.push(`${index.category_indexes} per-category`);
  return parts.join(" · ");
}
