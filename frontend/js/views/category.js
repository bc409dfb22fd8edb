// One category (or all images), page by page: #/browse/12?page=2&duplicates=exclude
import { api, categories, query } from "../api.js";
import { emptyState, grid, pager } from "../components.js";
import { formatDate, h, toast } from "../dom.js";

const PAGE_SIZE = 48;

export async function render(root, { category, params }) {
  const page = Math.max(1, parseInt(params.get("page"), 10) || 1);
  const duplicates = params.get("duplicates") === "exclude" ? "exclude" : "include";
  const all = category === "all";
  const [info, list] = await Promise.all([
    all ? null : api(`/api/categories/${category}`),
    api(`/api/images${query({ category_id: all ? null : category, page, page_size: PAGE_SIZE, duplicates })}`),
  ]);
  const hrefFor = (p, dups = duplicates) =>
    `#/browse/${category}${query({ page: p > 1 ? p : null, duplicates: dups === "exclude" ? "exclude" : null })}`;

  const title = h("h1.page-title", {}, all ? "All images" : info.name);
  const head = h("div.page-head", {},
    h("p.crumbs.small", {}, h("a", { href: "#/browse" }, "← Browse")),
    title,
    h("p.muted", {}, `${list.total} image${list.total === 1 ? "" : "s"}`,
      info?.description ? ` — ${info.description}` : "",
      info?.is_automatic ? " · found by clustering" : ""));
  const actions = h("div.toolbar", {},
    h("label.check", {},
      h("input", { type: "checkbox", checked: duplicates === "exclude",
                   onchange: (e) => { location.hash = hrefFor(1, e.target.checked ? "exclude" : "include"); } }),
      " Hide near-duplicates"),
    all ? null : h("a.btn.ghost", { href: `#/search${query({ category: info.name })}` }, "Search in this category"),
    all ? null : h("button.btn.ghost", { type: "button", onclick: () => editDialog(info, title) }, "Rename…"));
  root.append(head, actions);

  if (!all && info.prototypes?.length) {
    root.append(h("p.muted.small.protos", {}, "Prototypes: ",
      info.prototypes.map((p) => `${p.model} ${p.kind} ×${p.count} (${p.member_count} images, ${formatDate(p.updated_at)})`)
        .join(" · ")));
  }
  if (!list.items.length) {
    root.append(emptyState("No images", page > 1 ? "This page is past the end." : "Nothing in this category yet."));
    return;
  }
  root.append(grid(list.items, { showScore: false }));
  const nav = pager(list.page, list.pages, (p) => hrefFor(p));
  if (nav) root.append(nav);
}

function editDialog(info, title) {
  const name = h("input#edit-name", { type: "text", value: info.name, required: true, maxlength: 200 });
  const description = h("textarea#edit-desc", { rows: 3, maxlength: 2000 }, info.description || "");
  const error = h("p.form-error", { role: "alert" });
  const dialog = h("dialog.dialog", { "aria-labelledby": "edit-title" },
    h("form.dialog-body", { method: "dialog" },
      h("h2#edit-title", {}, "Rename category"),
      info.is_automatic ? h("p.muted.small", {}, "Naming an automatic category makes it a real one.") : null,
      h("label", { for: "edit-name" }, "Name"), name,
      h("label", { for: "edit-desc" }, "Description"), description,
      error,
      h("div.dialog-actions", {},
        h("button.btn.ghost", { type: "button", onclick: () => dialog.close() }, "Cancel"),
        h("button.btn.primary", { type: "submit" }, "Save"))));
  dialog.querySelector("form").addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const body = await api(`/api/categories/${info.id}`, {
        method: "PATCH", json: { name: name.value, description: description.value.trim() || null },
      });
      Object.assign(info, body);
      title.textContent = body.name;
      categories({ refresh: true }).catch(() => {});
      dialog.close();
      toast(`Saved “${body.name}”`);
    } catch (err) {
      error.textContent = err.message;
    }
  });
  dialog.addEventListener("close", () => dialog.remove());
  document.body.append(dialog);
  dialog.showModal();
  name.select();
}
