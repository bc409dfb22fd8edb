-- Duplicate groups: each canonical image with the copies that point to it.
SELECT canonical.id AS canonical_id, canonical.original_name,
       array_agg(copy.id ORDER BY copy.id) AS duplicate_ids, count(*) AS copies
  FROM catalog_images copy
  JOIN catalog_images canonical ON canonical.id = copy.canonical_id
 GROUP BY canonical.id, canonical.original_name
 ORDER BY copies DESC, canonical.id;
