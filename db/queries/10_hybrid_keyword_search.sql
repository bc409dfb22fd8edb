-- Hybrid search: captions filter, vectors rank. Images whose caption matches the keywords, nearest first to a
-- query vector (here the first embedded image's, active model), as /api/search/...?keywords=shoe does.
-- keyword_mode => 'boost' instead ranks the two-stage search's hits and the best matches together by
-- cosine + boost (default 0.1) where the caption matches; keyword_match says which captions matched.
SELECT s.rank, s.image_id, i.original_name, s.category, s.caption, s.keyword_match,
       round(s.score::numeric, 4) AS score
  FROM imsrc.search_text('shoe', 10,
                         (SELECT embedding FROM catalog_embeddings WHERE active_model ORDER BY image_id LIMIT 1)) s
  JOIN catalog_images i ON i.id = s.image_id
 ORDER BY s.rank;
