"""Alembic environment for the adapterhub catalog.

adapterhub runs migrations itself when a catalog is opened (and on `adapterhub db upgrade`), handing
its own connection in through ``config.attributes["connection"]``. Developers can also run plain
``alembic -c migrations/alembic.ini upgrade head`` with ``-x url=sqlite:///path/catalog.db``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from adapterhub.catalog.tables import metadata

config = context.config


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("give the catalog URL: alembic -x url=sqlite:///path/to/catalog.db upgrade head")
    engine = create_engine(url)
    with engine.begin() as conn:
        _run(conn)
