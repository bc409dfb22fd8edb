-- Embedding models in this catalog and how far each has got.
SELECT m.name, m.dimension, m.is_active, m.embedded_images,
       (SELECT count(*) FROM catalog_images) AS images
  FROM catalog_models m
 ORDER BY m.is_active DESC, m.name;
