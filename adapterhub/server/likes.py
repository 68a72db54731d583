"""Who likes which repo: rows of the catalog (`adapterhub.catalog.hubsocial`), so that a like follows its
repo through a move and goes with it when it is deleted."""

from __future__ import annotations

from ..catalog.hubsocial import LikeRows
from .records import Repo
from .storage import Repos


class Likes:
    def __init__(self, rows: LikeRows, repos: Repos) -> None:
        self.rows = rows
        self.repos = repos

    def like(self, user: str, repo: Repo) -> None:
        self.rows.like(user, repo)

    def unlike(self, user: str, repo: Repo) -> None:
        self.rows.unlike(user, repo)

    def liked(self, user: str, viewer: str | None) -> list[tuple[Repo, str]]:
        """The repos ``user`` likes that ``viewer`` may see, newest like first, with when."""
        seen = {r.id: r for r, _ in self.repos.visible_repos(viewer)}
        return [(seen[rid], at) for rid, at in self.rows.liked(user) if rid in seen]

    def likers(self, repo: Repo) -> list[str]:
        return self.rows.likers(repo)
