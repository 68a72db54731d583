"""registered base models (tensor layout from headers), a record of merges, and the adapter facts
validation needs from the catalog alone (modules_to_save shapes, lora_bias)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("adapters") as batch:
        batch.add_column(sa.Column("replacements", sa.JSON))
    with op.batch_alter_table("adapter_modules") as batch:
        batch.add_column(sa.Column("lora_bias", sa.Boolean))
    op.create_table(
        "base_models",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(300), nullable=False),
        sa.Column("path", sa.Text),
        sa.Column("model_type", sa.String(100)),
        sa.Column("architectures", sa.JSON),
        sa.Column("num_params", sa.BigInteger, nullable=False),
        sa.Column("num_tensors", sa.Integer, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("dtype", sa.String(16)),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("config", sa.JSON),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("name", name="uq_base_models_name"),
    )
    op.create_index("ix_base_models_fingerprint", "base_models", ["fingerprint"])
    op.create_table(
        "base_tensors",
        sa.Column(
            "base_id", sa.Integer, sa.ForeignKey("base_models.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("name", sa.String(500), primary_key=True),
        sa.Column("shape", sa.JSON, nullable=False),
        sa.Column("dtype", sa.String(16), nullable=False),
    )
    op.create_table(
        "merges",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("base", sa.Text, nullable=False),
        sa.Column("out_path", sa.Text, nullable=False),
        sa.Column("unmerge", sa.Boolean, nullable=False),
        sa.Column("dtype", sa.String(16)),
        sa.Column("device", sa.String(32)),
        sa.Column("tensors_changed", sa.Integer, nullable=False),
        sa.Column("bytes_written", sa.BigInteger, nullable=False),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "merge_adapters",
        sa.Column("merge_id", sa.Integer, sa.ForeignKey("merges.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("adapter_name", sa.String(200), primary_key=True),
        sa.Column("weight", sa.Float, nullable=False),
    )
    op.create_index("ix_merge_adapters_adapter_name", "merge_adapters", ["adapter_name"])


def downgrade() -> None:
    for table in ("merge_adapters", "merges", "base_tensors", "base_models"):
        op.drop_table(table)
    with op.batch_alter_table("adapter_modules") as batch:
        batch.drop_column("lora_bias")
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("replacements")
