-- Keyword search over captions, ranked as GET /api/search/keywords?q= ranks it: web-search syntax
-- ("a phrase", or, -word), English stemming (shoes finds shoe), best ts_rank_cd first, near-duplicates hidden.
-- Change the words; add k, category_ids => ARRAY[...] or include_duplicates => true as needed.
SELECT s.rank, s.image_id, i.original_name, s.category, s.caption, round(s.score::numeric, 4) AS score
  FROM imsrc.search_text('red shoes', 10) s
  JOIN catalog_images i ON i.id = s.image_id
 ORDER BY s.rank;
