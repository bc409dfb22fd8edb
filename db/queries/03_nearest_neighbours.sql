-- The 10 nearest neighbours of one image under the active model, by cosine distance (<=>).
-- Change the image id in the `query` CTE.
WITH query AS (
    SELECT e.embedding, e.model
      FROM catalog_embeddings e
     WHERE e.active_model AND e.image_id = (SELECT min(id) FROM catalog_images)
)
SELECT n.image_id, i.original_name, i.category, n.embedding <=> q.embedding AS cosine_distance
  FROM query q
  JOIN catalog_embeddings n ON n.model = q.model
  JOIN catalog_images i ON i.id = n.image_id
 ORDER BY cosine_distance, n.image_id
 LIMIT 10;
