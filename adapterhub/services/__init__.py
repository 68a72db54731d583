"""Operations over a `Library`: plain functions that `Hub` composes, one module per capability.

- `adapters`: add, export, load;
- `bases`: register base checkpoints, validate adapters against them and each other;
- `compute`: merge into a base, combine, resize, extract (derived adapters land through the Library's ingest);
- `recipes`: composition recipes, step by step, all outputs or none.

They never import `adapterhub.hub`; the Hub imports them.
"""
