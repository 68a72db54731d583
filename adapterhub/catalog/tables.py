"""The catalog's tables (SQLAlchemy Core). Created and changed only by the Alembic migrations in
``migrations/``; a test checks that these definitions and the migrated schema agree."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

adapters = Table(
    "adapters",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("sha256", String(64), nullable=False, index=True),
    Column("format", String(16), nullable=False),
    Column("peft_type", String(32)),
    Column("base_model", String(300), index=True),
    Column("base_revision", String(100)),
    Column("rank", Integer, nullable=False),
    Column("alpha", Float),
    Column("use_rslora", Boolean, nullable=False, default=False),
    Column("use_dora", Boolean, nullable=False, default=False),
    Column("rank_pattern", JSON),
    Column("alpha_pattern", JSON),
    Column("task_type", String(64)),
    Column("dtype", String(16)),
    Column("num_params", Integer, nullable=False),
    Column("size_bytes", Integer, nullable=False),
    Column("num_modules", Integer, nullable=False),
    Column("target_modules", JSON, nullable=False),
    Column("description", Text),
    Column("source", Text),
    Column("config", JSON),
    Column("extra", JSON),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    UniqueConstraint("name", name="uq_adapters_name"),
)

adapter_files = Table(
    "adapter_files",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("adapter_id", Integer, ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False),
    Column("filename", String(300), nullable=False),
    Column("role", String(16), nullable=False),
    Column("sha256", String(64), nullable=False, index=True),
    Column("size_bytes", Integer, nullable=False),
    UniqueConstraint("adapter_id", "filename", name="uq_adapter_files_name"),
)

adapter_modules = Table(
    "adapter_modules",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("adapter_id", Integer, ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("module", String(500), nullable=False),
    Column("short_name", String(200), nullable=False, index=True),
    Column("kind", String(16), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("alpha", Float, nullable=False),
    Column("scale", Float, nullable=False),
    Column("in_features", Integer, nullable=False),
    Column("out_features", Integer, nullable=False),
    Column("kernel_size", JSON),
    Column("dora", Boolean, nullable=False, default=False),
    Column("dtype", String(16)),
)

tags = Table(
    "tags",
    metadata,
    Column("adapter_id", Integer, ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True),
    Column("tag", String(100), primary_key=True),
    Index("ix_tags_tag", "tag"),
)

lineage = Table(
    "lineage",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("child_id", Integer, ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("parent_id", Integer, ForeignKey("adapters.id", ondelete="SET NULL"), index=True),
    Column("parent_name", String(200), nullable=False),
    Column("weight", Float),
    Column("method", String(64), nullable=False),
    Column("params", JSON),
)
