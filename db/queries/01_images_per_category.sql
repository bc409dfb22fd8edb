-- Images per category, largest first (duplicates counted separately).
SELECT name AS category, image_count, unique_image_count, pg_size_pretty(total_bytes) AS size
  FROM catalog_categories
 ORDER BY image_count DESC, name;
