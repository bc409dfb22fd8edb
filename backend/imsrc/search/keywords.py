"""Keyword search over captions: the SQL helpers of migration 0009, which imsrc.search_text uses as well, so
the API, the CLI and SQL rank by the same statements (keywords alone, keywords filter, keywords boost)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.errors import InvalidInputError

Hit = tuple[int, float]
MAX_KEYWORDS_CHARS = 1000


def check_keywords(keywords: str) -> str:
    """Refused here with a 4xx before PostgreSQL sees it (imsrc._keywords RAISEs the same for SQL users)."""
    if "\x00" in keywords:
        raise InvalidInputError("keywords: contains a NUL byte")
    if not keywords.isascii():
        try:  # a lone surrogate (argv bytes that are not UTF-8) fails in the driver otherwise
            keywords.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInputError(f"keywords: not valid Unicode (a lone surrogate at {exc.start})") from exc
    cleaned = keywords.strip()
    if not cleaned:
        raise InvalidInputError("keywords: empty")
    if len(cleaned) > MAX_KEYWORDS_CHARS:
        raise InvalidInputError(f"keywords: {len(cleaned)} characters, at most {MAX_KEYWORDS_CHARS}")
    return cleaned


class KeywordRepository:
    def __init__(self, session: Session) -> None:
        self.session = session
        self._parsed: dict[str, str] = {}

    def _tsquery(self, keywords: str) -> str:
        """The keywords as a tsquery (text form), or a 422 saying none of them is searchable. The same parse
        and the same check as imsrc._keywords, in one round trip that cannot fail (websearch_to_tsquery
        accepts any text), so the request's transaction stays usable; parsed once per repository."""
        keywords = check_keywords(keywords)
        if keywords not in self._parsed:
            parsed, nodes = self.session.execute(
                text("SELECT q::text, numnode(q) FROM websearch_to_tsquery('english'::regconfig, :k) q"),
                {"k": keywords},
            ).one()
            if not nodes:
                raise InvalidInputError(
                    f"the keywords {keywords!r} have no searchable words (only stop words or punctuation)"
                )
            self._parsed[keywords] = str(parsed)
        return self._parsed[keywords]

    def ranked(self, keywords: str, k: int, categories: Sequence[int] | None, include_duplicates: bool) -> list[Hit]:
        """Keywords alone: matching images by ts_rank_cd, then id."""
        rows = self.session.execute(
            text("SELECT image_id, score FROM imsrc._keyword_rank(CAST(:q AS tsquery), :k, CAST(:c AS bigint[]), :d)"),
            {"q": self._tsquery(keywords), "k": k, "c": _ids(categories), "d": include_duplicates},
        )
        return [(int(r[0]), float(r[1])) for r in rows]

    def matching(
        self,
        model_id: int,
        vector: str,
        keywords: str,
        k: int,
        categories: Sequence[int] | None,
        include_duplicates: bool,
        exclude: int | None,
    ) -> list[Hit]:
        """Keywords filter, vectors rank: the k matching images nearest the vector (exact cosine)."""
        rows = self.session.execute(
            text(
                "SELECT image_id, score FROM imsrc._keyword_hits(:m, CAST(:v AS vector), CAST(:q AS tsquery), :k,"
                " CAST(:c AS bigint[]), :d, :x)"
            ),
            {
                "m": model_id,
                "v": vector,
                "q": self._tsquery(keywords),
                "k": k,
                "c": _ids(categories),
                "d": include_duplicates,
                "x": exclude,
            },
        )
        return [(int(r[0]), float(r[1])) for r in rows]

    def boosted(self, candidates: Sequence[Hit], keywords: str, boost: float, k: int) -> list[tuple[int, float, bool]]:
        """Vectors rank, keywords boost: candidates by cosine (6 digits) + boost where the caption matches."""
        if not candidates:
            return []
        rows = self.session.execute(
            text(
                "SELECT image_id, score, keyword_match FROM imsrc._boosted(CAST(:i AS bigint[]),"
                " CAST(:s AS double precision[]), CAST(:q AS tsquery), :b, :k)"
            ),
            {
                "i": [c[0] for c in candidates],
                "s": [c[1] for c in candidates],
                "q": self._tsquery(keywords),
                "b": boost,
                "k": k,
            },
        )
        return [(int(r[0]), float(r[1]), bool(r[2])) for r in rows]


def _ids(categories: Sequence[int] | None) -> list[int] | None:
    return None if categories is None else sorted(set(categories))
