-- Files the most recent indexing job could not ingest, and why.
SELECT f.path, f.reason
  FROM ingest_files f
 WHERE f.outcome = 'failed'
   AND f.job_id = (SELECT max(id) FROM catalog_jobs WHERE kind = 'index')
 ORDER BY f.path;
