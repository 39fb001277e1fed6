"""Verifying a store chunk by chunk, and marking damaged chunks to be explained again."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from torchlrp.data.store.reading import chunk_error, open_relevances
from torchlrp.data.store.schema import array_layout, require_zarr, store_name


@dataclass(frozen=True)
class StoreHealth:
    """What :func:`verify_store` found.

    Attributes
    ----------
    store : str
        The store.
    chunks : int
        Chunks in the store.
    done : int
        Chunks marked done (before any repair).
    damaged : dict of int to str
        Done chunks that are missing or damaged, with the array and the reason.
    repaired : bool
        Whether the damaged chunks were marked undone (the next run with the same call explains them again).
    """

    store: str
    chunks: int
    done: int
    damaged: dict[int, str]
    repaired: bool

    @property
    def healthy(self) -> bool:
        """Whether every done chunk reads back intact."""
        return not self.damaged

    def __str__(self) -> str:
        if self.healthy:
            return f"{self.store}: healthy ({self.done} of {self.chunks} chunks done, every one intact)"
        listed = "; ".join(f"chunk {chunk}: {reason}" for chunk, reason in list(self.damaged.items())[:10])
        more = f"; and {len(self.damaged) - 10} more" if len(self.damaged) > 10 else ""
        action = ("marked undone: run the same explain_dataset call again to explain them anew" if self.repaired
                  else "repair with verify_store(..., repair=True) (torchlrp verify-store --repair), then run the "
                       "same explain_dataset call again")
        return (f"{self.store}: {len(self.damaged)} of {self.done} done chunks damaged or missing ({listed}{more}); "
                f"{action}")


def verify_store(store: Any, repair: bool = False, storage_options: dict | None = None) -> StoreHealth:
    """Check every done chunk of a store: that each of its arrays decodes (zstd checksum), is not missing, and holds
    its own samples' indices.

    Parameters
    ----------
    store : str, os.PathLike or zarr store
        The store.
    repair : bool
        Mark the damaged chunks undone (their ``done`` flags only; nothing else is changed), so that the next
        :func:`explain_dataset` call with the same settings and data explains them again.
    storage_options : dict, optional
        Passed to fsspec for URL stores.

    Returns
    -------
    StoreHealth
        What was found (``str()`` of it is a one-paragraph report).

    Raises
    ------
    FileNotFoundError, ValueError, StoreDamagedError
        As :func:`open_relevances`, for a path that holds no torchlrp store or one whose layout is damaged.
    """
    relevances = open_relevances(store, storage_options)
    group, settings, name = relevances.group, relevances.settings, store_name(store)
    done = np.flatnonzero(relevances.done)
    arrays = [array for array in array_layout(settings) if array != "done" and array in group]
    damaged: dict[int, str] = {}
    for chunk in done:
        for array in arrays:
            reason = chunk_error(group, array, int(chunk), settings)
            if reason is not None:
                damaged[int(chunk)] = f"{array}: {reason}"
                break
    if repair and damaged:
        writable = require_zarr().open_group(store, mode="r+", storage_options=storage_options)
        for chunk in damaged:
            writable["done"][chunk] = False
    return StoreHealth(name, len(relevances.done), len(done), damaged, bool(repair and damaged))
