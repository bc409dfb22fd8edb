-- More like one image, ranked as GET /api/search/similar/{id} ranks it with the pgvector backend: stage 1
-- against the category prototypes, stage 2 through the per-category indexes, near-duplicates hidden.
-- Change the image id; add k, categories, mode ('two_stage', 'ann', 'exact') or model => 'name' as needed.
SELECT s.rank, s.image_id, i.original_name, s.category, round(s.score::numeric, 4) AS score
  FROM imsrc.similar((SELECT min(image_id) FROM catalog_embeddings WHERE active_model), 10) s
  JOIN catalog_images i ON i.id = s.image_id
 ORDER BY s.rank;
