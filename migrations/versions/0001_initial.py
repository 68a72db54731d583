"""initial catalog: adapters, their files, modules, tags and lineage

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("peft_type", sa.String(32)),
        sa.Column("base_model", sa.String(300)),
        sa.Column("base_revision", sa.String(100)),
        sa.Column("rank", sa.Integer, nullable=False),
        sa.Column("alpha", sa.Float),
        sa.Column("use_rslora", sa.Boolean, nullable=False),
        sa.Column("use_dora", sa.Boolean, nullable=False),
        sa.Column("rank_pattern", sa.JSON),
        sa.Column("alpha_pattern", sa.JSON),
        sa.Column("task_type", sa.String(64)),
        sa.Column("dtype", sa.String(16)),
        sa.Column("num_params", sa.Integer, nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("num_modules", sa.Integer, nullable=False),
        sa.Column("target_modules", sa.JSON, nullable=False),
        sa.Column("description", sa.Text),
        sa.Column("source", sa.Text),
        sa.Column("config", sa.JSON),
        sa.Column("extra", sa.JSON),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("name", name="uq_adapters_name"),
    )
    op.create_index("ix_adapters_sha256", "adapters", ["sha256"])
    op.create_index("ix_adapters_base_model", "adapters", ["base_model"])
    op.create_table(
        "adapter_files",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("adapter_id", sa.Integer, sa.ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False),
        sa.Column("filename", sa.String(300), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.UniqueConstraint("adapter_id", "filename", name="uq_adapter_files_name"),
    )
    op.create_index("ix_adapter_files_sha256", "adapter_files", ["sha256"])
    op.create_table(
        "adapter_modules",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("adapter_id", sa.Integer, sa.ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False),
        sa.Column("module", sa.String(500), nullable=False),
        sa.Column("short_name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("rank", sa.Integer, nullable=False),
        sa.Column("alpha", sa.Float, nullable=False),
        sa.Column("scale", sa.Float, nullable=False),
        sa.Column("in_features", sa.Integer, nullable=False),
        sa.Column("out_features", sa.Integer, nullable=False),
        sa.Column("kernel_size", sa.JSON),
        sa.Column("dora", sa.Boolean, nullable=False),
        sa.Column("dtype", sa.String(16)),
    )
    op.create_index("ix_adapter_modules_adapter_id", "adapter_modules", ["adapter_id"])
    op.create_index("ix_adapter_modules_short_name", "adapter_modules", ["short_name"])
    op.create_table(
        "tags",
        sa.Column(
            "adapter_id", sa.Integer, sa.ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("tag", sa.String(100), primary_key=True),
    )
    op.create_index("ix_tags_tag", "tags", ["tag"])
    op.create_table(
        "lineage",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("child_id", sa.Integer, sa.ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False),
        sa.Column("parent_id", sa.Integer, sa.ForeignKey("adapters.id", ondelete="SET NULL")),
        sa.Column("parent_name", sa.String(200), nullable=False),
        sa.Column("weight", sa.Float),
        sa.Column("method", sa.String(64), nullable=False),
        sa.Column("params", sa.JSON),
    )
    op.create_index("ix_lineage_child_id", "lineage", ["child_id"])
    op.create_index("ix_lineage_parent_id", "lineage", ["parent_id"])


def downgrade() -> None:
    for table in ("lineage", "tags", "adapter_modules", "adapter_files", "adapters"):
        op.drop_table(table)
