"""The per-epoch record of a run: a small table that prints, plots and saves."""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Iterable, Mapping


class History:
    """One row per epoch, with the same columns in every row.

    ``history["val_loss"]`` returns a column as a list of floats, ready for
    ``plt.plot``; ``print(history)`` shows the table; ``history.to_csv(path)``
    saves it. The rows are plain dicts of numbers, so a history stored in a
    checkpoint loads with ``weights_only=True``.
    """

    def __init__(self, rows: Iterable[Mapping[str, Any]] = ()) -> None:
        self.rows: list[dict[str, Any]] = []
        for row in rows:
            self.append(row)

    def append(self, row: Mapping[str, Any]) -> None:
        row = dict(row)
        if self.rows and list(row) != self.columns:
            raise ValueError(
                f"history row has columns {list(row)}, expected {self.columns}"
            )
        self.rows.append(row)

    @property
    def columns(self) -> list[str]:
        return list(self.rows[0]) if self.rows else []

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, key: str | int):
        if isinstance(key, int):
            return self.rows[key]
        if self.rows and key not in self.rows[0]:
            raise KeyError(f"no column {key!r}; the columns are {self.columns}")
        return [row[key] for row in self.rows]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, History) and self.rows == other.rows

    def state_dict(self) -> list[dict[str, Any]]:
        return [dict(row) for row in self.rows]

    @classmethod
    def from_state_dict(cls, rows: Iterable[Mapping[str, Any]]) -> "History":
        return cls(rows)

    def to_csv(self, path=None) -> str:
        """Return the table as CSV text, and write it to `path` if given."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        text = buffer.getvalue()
        if path is not None:
            from .checkpoint import write_text_atomic

            write_text_atomic(text, path)
        return text

    @classmethod
    def read_csv(cls, path) -> "History":
        """Read a table written by `to_csv`, converting numbers back."""
        with open(path, newline="", encoding="utf-8") as f:
            return cls({key: _parse_number(value) for key, value in row.items()}
                       for row in csv.DictReader(f))

    def __str__(self) -> str:
        if not self.rows:
            return "History (no epochs yet)"
        cells = [[_format_cell(row[col]) for col in self.columns] for row in self.rows]
        widths = [
            max(len(col), *(len(line[i]) for line in cells))
            for i, col in enumerate(self.columns)
        ]
        lines = ["  ".join(col.rjust(w) for col, w in zip(self.columns, widths))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"History({len(self.rows)} epochs, columns={self.columns})"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(str(self))


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.4f}"
    return str(value)


def _parse_number(text: str):
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text
