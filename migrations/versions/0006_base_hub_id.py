"""a registered base's real id (a Hub repo id, or the GGUF's own name), which exports and pushes write
as an adapter's base_model_name_or_path instead of the base's local name

Revision ID: 0006
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("base_models") as batch:
        batch.add_column(sa.Column("hub_id", sa.String(300)))


def downgrade() -> None:
    with op.batch_alter_table("base_models") as batch:
        batch.drop_column("hub_id")
