"""The catalog's tables (SQLAlchemy Core). Created and changed only by the Alembic migrations in
``migrations/``; a test checks that these definitions and the migrated schema agree."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
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
    Column("replacements", JSON),  # 0003: modules_to_save / saved base layers, key -> shape
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
    Column("lora_bias", Boolean),  # 0003
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

# ---------------------------------------------------------------- sharing (migration 0002)
# The Hub-compatible server's repos, commits (full file listing per commit), branches and hashed
# tokens, and the client's record of where each adapter was pushed.

hub_repos = Table(
    "hub_repos",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("namespace", String(100), nullable=False),
    Column("name", String(100), nullable=False),
    Column("private", Boolean, nullable=False, default=False),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    UniqueConstraint("namespace", "name", name="uq_hub_repos_id"),
)

hub_commits = Table(
    "hub_commits",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("repo_id", Integer, ForeignKey("hub_repos.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("oid", String(40), nullable=False),
    Column("parent_oid", String(40)),
    Column("title", Text, nullable=False),
    Column("message", Text, nullable=False),
    Column("author", String(100)),
    Column("card", JSON),
    Column("created_at", DateTime, nullable=False),
    UniqueConstraint("repo_id", "oid", name="uq_hub_commits_oid"),
)

hub_commit_files = Table(
    "hub_commit_files",
    metadata,
    Column("commit_id", Integer, ForeignKey("hub_commits.id", ondelete="CASCADE"), primary_key=True),
    Column("path", String(1000), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("blob_oid", String(40), nullable=False),
    Column("sha256", String(64), nullable=False, index=True),
    Column("lfs", Boolean, nullable=False),
)

hub_refs = Table(
    "hub_refs",
    metadata,
    Column("repo_id", Integer, ForeignKey("hub_repos.id", ondelete="CASCADE"), primary_key=True),
    Column("name", String(200), primary_key=True),
    Column("commit_id", Integer, ForeignKey("hub_commits.id", ondelete="CASCADE"), nullable=False),
)

hub_tokens = Table(
    "hub_tokens",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("user", String(100), nullable=False, index=True),
    Column("token_hash", String(64), nullable=False),
    Column("write", Boolean, nullable=False, default=False),
    Column("created_at", DateTime, nullable=False),
    Column("last_used_at", DateTime),
    UniqueConstraint("token_hash", name="uq_hub_tokens_hash"),
)

remote_pushes = Table(
    "remote_pushes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("adapter_id", Integer, ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("endpoint", String(300), nullable=False),
    Column("repo_id", String(200), nullable=False),
    Column("revision", String(200), nullable=False),
    Column("commit_oid", String(40), nullable=False),
    Column("commit_url", Text),
    Column("pushed_at", DateTime, nullable=False),
)

# ---------------------------------------------------------------- base models and merges (migration 0003)
# Registered base checkpoints with their tensor layout read from headers, so validation and
# `list --compatible-with` answer from the catalog alone; and a record of every merge.

base_models = Table(
    "base_models",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(300), nullable=False),
    Column("path", Text),
    Column("model_type", String(100)),
    Column("architectures", JSON),
    Column("num_params", BigInteger, nullable=False),
    Column("num_tensors", Integer, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("dtype", String(16)),
    Column("fingerprint", String(64), nullable=False, index=True),
    Column("config", JSON),
    Column("created_at", DateTime, nullable=False),
    Column("hub_id", String(300)),  # its real id (a Hub repo id, a GGUF's name), for exports
    UniqueConstraint("name", name="uq_base_models_name"),
)

base_tensors = Table(
    "base_tensors",
    metadata,
    Column("base_id", Integer, ForeignKey("base_models.id", ondelete="CASCADE"), primary_key=True),
    Column("name", String(500), primary_key=True),
    Column("shape", JSON, nullable=False),
    Column("dtype", String(16), nullable=False),
)

merges = Table(
    "merges",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("base", Text, nullable=False),
    Column("out_path", Text, nullable=False),
    Column("unmerge", Boolean, nullable=False, default=False),
    Column("dtype", String(16)),
    Column("device", String(32)),
    Column("tensors_changed", Integer, nullable=False),
    Column("bytes_written", BigInteger, nullable=False),
    Column("seconds", Float, nullable=False),
    Column("created_at", DateTime, nullable=False),
)

merge_adapters = Table(
    "merge_adapters",
    metadata,
    Column("merge_id", Integer, ForeignKey("merges.id", ondelete="CASCADE"), primary_key=True),
    Column("adapter_name", String(200), primary_key=True),
    Column("weight", Float, nullable=False),
    Index("ix_merge_adapters_adapter_name", "adapter_name"),
)

# ---------------------------------------------------------------- the server's other state (migration 0005)
# Gating, access requests, upload proofs and Xet xorb records, old repo names, likes, discussions (with
# their events), collections (with their items), webhooks and the key that signs upload URLs: everything
# `adapterhub serve` keeps, so that replicas on one database agree. Rows of a repo go with it (ON DELETE CASCADE).

hub_gates = Table(
    "hub_gates",
    metadata,
    Column("repo_id", Integer, ForeignKey("hub_repos.id", ondelete="CASCADE"), primary_key=True),
    Column("mode", String(16), nullable=False),
)

hub_access_requests = Table(
    "hub_access_requests",
    metadata,
    Column("repo_id", Integer, ForeignKey("hub_repos.id", ondelete="CASCADE"), primary_key=True),
    Column("user", String(100), primary_key=True),
    Column("request_id", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", Text),
    Column("updated_at", DateTime, nullable=False),
)

hub_upload_proofs = Table(
    "hub_upload_proofs",
    metadata,
    Column("repo_id", Integer, ForeignKey("hub_repos.id", ondelete="CASCADE"), primary_key=True),
    Column("user", String(100), primary_key=True),  # "" for the owner's (or a user-less) proof
    Column("sha256", String(64), primary_key=True),
)

hub_repo_xorbs = Table(
    "hub_repo_xorbs",
    metadata,
    Column("repo_id", Integer, ForeignKey("hub_repos.id", ondelete="CASCADE"), primary_key=True),
    Column("xorb", String(64), primary_key=True),
    Column("sha256", String(64), nullable=False),
)

hub_user_xorbs = Table(
    "hub_user_xorbs",
    metadata,
    Column("user", String(100), primary_key=True),
    Column("xorb", String(64), primary_key=True),
    Column("sha256", String(64), nullable=False),
)

hub_renames = Table(
    "hub_renames",
    metadata,
    Column("old_id", String(201), primary_key=True),  # lower-cased namespace/name
    Column("repo_id", Integer, ForeignKey("hub_repos.id", ondelete="CASCADE"), nullable=False, index=True),
)

hub_likes = Table(
    "hub_likes",
    metadata,
    Column("user", String(100), primary_key=True),
    Column("repo_id", Integer, ForeignKey("hub_repos.id", ondelete="CASCADE"), primary_key=True),
    Column("created_at", DateTime, nullable=False),
    Index("ix_hub_likes_repo_id", "repo_id"),
)

hub_discussions = Table(
    "hub_discussions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("repo_id", Integer, ForeignKey("hub_repos.id", ondelete="CASCADE"), nullable=False),
    Column("num", Integer, nullable=False),
    Column("title", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("is_pull_request", Boolean, nullable=False),
    Column("author", String(100), nullable=False),
    Column("pinned", Boolean, nullable=False),
    Column("base", String(300)),  # a pull request's base branch, its start and its merge commit
    Column("base_oid", String(40)),
    Column("merge_oid", String(40)),
    Column("created_at", DateTime, nullable=False),
    UniqueConstraint("repo_id", "num", name="uq_hub_discussions_num"),
)

hub_discussion_events = Table(
    "hub_discussion_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "discussion_id",
        Integer,
        ForeignKey("hub_discussions.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("event_id", String(32), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("author", String(100), nullable=False),
    Column("data", JSON, nullable=False),
    Column("created_at", DateTime, nullable=False),
)

hub_collections = Table(
    "hub_collections",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("owner", String(100), nullable=False, index=True),
    Column("title", String(200), nullable=False),
    Column("description", Text),
    Column("private", Boolean, nullable=False),
    Column("theme", String(40), nullable=False),
    Column("position", Integer, nullable=False),
    Column("updated_at", DateTime, nullable=False),
)

hub_collection_items = Table(
    "hub_collection_items",
    metadata,
    Column(
        "collection_id", String(32), ForeignKey("hub_collections.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("item_id", String(32), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("ref", String(300), nullable=False),
    Column("note", Text),
)

hub_webhooks = Table(
    "hub_webhooks",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("user", String(100), nullable=False, index=True),
    Column("url", Text, nullable=False),
    Column("watched", JSON, nullable=False),
    Column("domains", JSON, nullable=False),
    Column("secret", Text),
    Column("disabled", Boolean, nullable=False),
    Column("created_at", DateTime, nullable=False),
)

hub_settings = Table(
    "hub_settings",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("value", Text, nullable=False),
)


# ---------------------------------------------------------------- evaluation records (migration 0004)
# One row per (subject, metric) of an evaluation run: the adapter by content (sha256; its name as it was
# then), or a combination of adapters, or the base alone (adapter_sha256 NULL); never updated in place,
# so reruns stay visible side by side.

evaluations = Table(
    "evaluations",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run", String(32), nullable=False, index=True),  # one id per evaluation run
    Column("subject", String(500), nullable=False),  # "base", an adapter name, or "a:0.7+b:0.3"
    Column("adapter_sha256", String(64), index=True),
    Column("combination", JSON),  # {name: weight} for a combination
    Column("base", String(300), nullable=False),
    Column("base_fingerprint", String(64)),
    Column("dataset", String(300), nullable=False, index=True),
    Column("dataset_sha256", String(64), nullable=False),
    Column("metric", String(200), nullable=False),
    Column("value", Float),
    Column("rows", Integer, nullable=False),
    Column("seed", Integer),
    Column("version", String(40), nullable=False),  # adapterhub version
    Column("source", String(300), nullable=False),  # eval, train, mix or a pull's repo@commit
    Column("params", JSON),  # max_tokens, device, dtype, seconds, ...
    Column("created_at", DateTime, nullable=False),
)
