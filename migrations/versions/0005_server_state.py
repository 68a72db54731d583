"""the server's other state in the catalog: gates, access requests, upload proofs, Xet xorb records, old
repo names, likes, discussions and their events, collections and their items, webhooks, and the
server's settings (the key that signs LFS upload URLs and Xet tokens, shared by replicas)

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _repo_fk(primary_key: bool = True) -> sa.Column:
    return sa.Column(
        "repo_id",
        sa.Integer,
        sa.ForeignKey("hub_repos.id", ondelete="CASCADE"),
        primary_key=primary_key,
        nullable=False,
    )


def upgrade() -> None:
    op.create_table("hub_gates", _repo_fk(), sa.Column("mode", sa.String(16), nullable=False))
    op.create_table(
        "hub_access_requests",
        _repo_fk(),
        sa.Column("user", sa.String(100), primary_key=True),
        sa.Column("request_id", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "hub_upload_proofs",
        _repo_fk(),
        sa.Column("user", sa.String(100), primary_key=True),
        sa.Column("sha256", sa.String(64), primary_key=True),
    )
    op.create_table(
        "hub_repo_xorbs",
        _repo_fk(),
        sa.Column("xorb", sa.String(64), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
    )
    op.create_table(
        "hub_user_xorbs",
        sa.Column("user", sa.String(100), primary_key=True),
        sa.Column("xorb", sa.String(64), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
    )
    op.create_table(
        "hub_renames", sa.Column("old_id", sa.String(201), primary_key=True), _repo_fk(primary_key=False)
    )
    op.create_index("ix_hub_renames_repo_id", "hub_renames", ["repo_id"])
    op.create_table(
        "hub_likes",
        sa.Column("user", sa.String(100), primary_key=True),
        _repo_fk(),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_hub_likes_repo_id", "hub_likes", ["repo_id"])
    op.create_table(
        "hub_discussions",
        sa.Column("id", sa.Integer, primary_key=True),
        _repo_fk(primary_key=False),
        sa.Column("num", sa.Integer, nullable=False),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("is_pull_request", sa.Boolean, nullable=False),
        sa.Column("author", sa.String(100), nullable=False),
        sa.Column("pinned", sa.Boolean, nullable=False),
        sa.Column("base", sa.String(300)),
        sa.Column("base_oid", sa.String(40)),
        sa.Column("merge_oid", sa.String(40)),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("repo_id", "num", name="uq_hub_discussions_num"),
    )
    op.create_table(
        "hub_discussion_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "discussion_id",
            sa.Integer,
            sa.ForeignKey("hub_discussions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("event_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("author", sa.String(100), nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_hub_discussion_events_discussion_id", "hub_discussion_events", ["discussion_id"])
    op.create_table(
        "hub_collections",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("owner", sa.String(100), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("description", sa.Text),
        sa.Column("private", sa.Boolean, nullable=False),
        sa.Column("theme", sa.String(40), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_hub_collections_owner", "hub_collections", ["owner"])
    op.create_table(
        "hub_collection_items",
        sa.Column(
            "collection_id",
            sa.String(32),
            sa.ForeignKey("hub_collections.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("item_id", sa.String(32), primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("ref", sa.String(300), nullable=False),
        sa.Column("note", sa.Text),
    )
    op.create_table(
        "hub_webhooks",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("user", sa.String(100), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("watched", sa.JSON, nullable=False),
        sa.Column("domains", sa.JSON, nullable=False),
        sa.Column("secret", sa.Text),
        sa.Column("disabled", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_hub_webhooks_user", "hub_webhooks", ["user"])
    op.create_table(
        "hub_settings",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "hub_settings",
        "hub_webhooks",
        "hub_collection_items",
        "hub_collections",
        "hub_discussion_events",
        "hub_discussions",
        "hub_likes",
        "hub_renames",
        "hub_user_xorbs",
        "hub_repo_xorbs",
        "hub_upload_proofs",
        "hub_access_requests",
        "hub_gates",
    ):
        op.drop_table(table)
