"""The study machinery behind ``experiments/``: one row end to end (``experiment``), recipe
grids (``search``), the paper-format tables (``tables``)."""
