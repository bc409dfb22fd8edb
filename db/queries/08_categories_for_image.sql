-- Which categories is an image like? Stage 1 alone: every category scored by its best prototype
-- (catalog_prototypes), best first, with how many prototypes and members stand behind each score.
WITH q AS (
    SELECT embedding FROM catalog_embeddings WHERE active_model ORDER BY image_id LIMIT 1
), p AS (
    SELECT category_id, count(*) AS prototypes, max(member_count) AS members
      FROM catalog_prototypes
     WHERE active_model AND kind IN ('mean', 'cluster')
     GROUP BY category_id
)
SELECT c.rank, c.category, round(c.score::numeric, 4) AS score, p.prototypes, p.members
  FROM q
 CROSS JOIN LATERAL imsrc.categories_for(q.embedding, 5) c
  LEFT JOIN p ON p.category_id = c.category_id
 ORDER BY c.rank;
