"""Getting images into the catalog: folder indexing (parallel, resumable) and uploads share one write path.

- run_index_job(...)  folders -> worker processes -> batched embedding -> batched writes (pipeline.py)
- ingest_bytes(...)   uploaded files, in-process, for the API (service.py)
Neither commits: the CLI command or request that calls them owns the transaction boundary (for folder jobs,
the pipeline's writer commits once per batch, which is what makes a job resumable).
"""
