"""sharing: the Hub-compatible server's repos, commits, commit files, refs and hashed tokens; push records

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hub_repos",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("namespace", sa.String(100), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("private", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("namespace", "name", name="uq_hub_repos_id"),
    )
    op.create_table(
        "hub_commits",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("repo_id", sa.Integer, sa.ForeignKey("hub_repos.id", ondelete="CASCADE"), nullable=False),
        sa.Column("oid", sa.String(40), nullable=False),
        sa.Column("parent_oid", sa.String(40)),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("author", sa.String(100)),
        sa.Column("card", sa.JSON),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("repo_id", "oid", name="uq_hub_commits_oid"),
    )
    op.create_index("ix_hub_commits_repo_id", "hub_commits", ["repo_id"])
    op.create_table(
        "hub_commit_files",
        sa.Column(
            "commit_id", sa.Integer, sa.ForeignKey("hub_commits.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("path", sa.String(1000), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("blob_oid", sa.String(40), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("lfs", sa.Boolean, nullable=False),
    )
    op.create_index("ix_hub_commit_files_sha256", "hub_commit_files", ["sha256"])
    op.create_table(
        "hub_refs",
        sa.Column("repo_id", sa.Integer, sa.ForeignKey("hub_repos.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column(
            "commit_id", sa.Integer, sa.ForeignKey("hub_commits.id", ondelete="CASCADE"), nullable=False
        ),
    )
    op.create_table(
        "hub_tokens",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user", sa.String(100), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("write", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("last_used_at", sa.DateTime),
        sa.UniqueConstraint("token_hash", name="uq_hub_tokens_hash"),
    )
    op.create_index("ix_hub_tokens_user", "hub_tokens", ["user"])
    op.create_table(
        "remote_pushes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("adapter_id", sa.Integer, sa.ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False),
        sa.Column("endpoint", sa.String(300), nullable=False),
        sa.Column("repo_id", sa.String(200), nullable=False),
        sa.Column("revision", sa.String(200), nullable=False),
        sa.Column("commit_oid", sa.String(40), nullable=False),
        sa.Column("commit_url", sa.Text),
        sa.Column("pushed_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_remote_pushes_adapter_id", "remote_pushes", ["adapter_id"])


def downgrade() -> None:
    for table in ("remote_pushes", "hub_tokens", "hub_refs", "hub_commit_files", "hub_commits", "hub_repos"):
        op.drop_table(table)
