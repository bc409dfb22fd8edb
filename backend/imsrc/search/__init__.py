"""Two-stage search: category prototypes (stage 1), then nearest neighbours inside the chosen categories
(stage 2, on pgvector, FAISS or an exact scan). See service.SearchService for the entry point."""
