-- Images that the active model has not embedded yet (replace the subquery with a model name to pick another).
SELECT i.id, i.original_name, i.source_path
  FROM catalog_images i
 WHERE NOT ((SELECT name FROM catalog_models WHERE is_active) = ANY (i.embedded_models))
 ORDER BY i.id;
