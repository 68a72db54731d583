"""evaluation records: one row per subject and metric of every evaluation run (never updated in place)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run", sa.String(32), nullable=False),
        sa.Column("subject", sa.String(500), nullable=False),
        sa.Column("adapter_sha256", sa.String(64)),
        sa.Column("combination", sa.JSON),
        sa.Column("base", sa.String(300), nullable=False),
        sa.Column("base_fingerprint", sa.String(64)),
        sa.Column("dataset", sa.String(300), nullable=False),
        sa.Column("dataset_sha256", sa.String(64), nullable=False),
        sa.Column("metric", sa.String(200), nullable=False),
        sa.Column("value", sa.Float),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("seed", sa.Integer),
        sa.Column("version", sa.String(40), nullable=False),
        sa.Column("source", sa.String(300), nullable=False),
        sa.Column("params", sa.JSON),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_evaluations_run", "evaluations", ["run"])
    op.create_index("ix_evaluations_adapter_sha256", "evaluations", ["adapter_sha256"])
    op.create_index("ix_evaluations_dataset", "evaluations", ["dataset"])


def downgrade() -> None:
    op.drop_table("evaluations")
