"""``torchlrp.store``: the Zarr store that :func:`torchlrp.dataset.explain_dataset` writes, and reading it back.

Layout (a Zarr v3 group; ``N`` samples, input shape ``S``, ``K`` classes), every array chunked by the run's batch
(chunk ``k`` of each array holds samples ``k * batch_size ...``):

========================  ===================  ===============================================================
array                     shape, dtype         holds
========================  ===================  ===============================================================
``relevance``             ``(N, *S)``, dtype   the relevance, divided by ``scale`` (read it with
                                               :func:`open_relevances`, which multiplies it back)
``scale``                 ``(N,)``, float32    per sample: a power of two (float16 stores: the sample's
                                               largest absolute relevance rounded up, so float16's narrow
                                               range keeps 11 bits relative to each heatmap's peak), else 1
``logits``                ``(N, K)``, float32  the model's scores
``prediction``            ``(N,)``, int64      the top class
``target``                ``(N,)``, int64      the class explained
``label``                 ``(N,)``, int64      the dataset's label (-1 where the dataset gives none)
``index``                 ``(N,)``, int64      the sample's index in the dataset
``fingerprint``           ``(chunks, 32)``,    per chunk: the SHA-256 of its input samples and labels (a resume
                          uint8                checks the chunks it skips against the data it is given)
``done``                  ``(chunks,)``, bool  chunk written (written last)
========================  ===================  ===============================================================

The run's settings (model, its architecture's and parameters' SHA-256, rule and the SHA-256 of its exact
definition, target, dtype, torchlrp version, ...) are the group's attribute ``"torchlrp"``, written before any array;
a store is only ever continued with the same settings.

Integrity: every chunk is compressed by zstd with its content checksum, so a damaged chunk fails to decode; a chunk
that is missing reads as the fill value (NaN for the float arrays, -2 for the integer ones), which a written chunk
never holds. Reading (:class:`Relevances`) and resuming raise :class:`StoreDamagedError` naming the chunk;
:func:`verify_store` (``torchlrp verify-store``) checks every chunk and, with ``repair=True``, marks the damaged ones
to be explained again by the next run.
"""
from torchlrp.data.store.hashing import architecture_sha256, data_fingerprint, definition_sha256, parameters_sha256
from torchlrp.data.store.reading import Relevances, open_relevances
from torchlrp.data.store.schema import (ARRAY_FILLS, CONCEPT_STATISTICS, MATCHING_SETTINGS, MISSING_INDEX,
                                        READABLE_FORMATS, STORE_DTYPES, STORE_FORMAT, StoreDamagedError,
                                        check_layout, concept_array, fill_value, read_done, require_zarr, run_settings,
                                        store_dtype, store_name)
from torchlrp.data.store.verification import StoreHealth, verify_store
from torchlrp.data.store.writing import create_or_check, scaled_for_storage, write_chunk

__all__ = ["ARRAY_FILLS", "CONCEPT_STATISTICS", "MATCHING_SETTINGS", "MISSING_INDEX", "READABLE_FORMATS", "Relevances",
           "STORE_DTYPES", "STORE_FORMAT", "StoreDamagedError", "StoreHealth", "architecture_sha256", "check_layout",
           "concept_array", "create_or_check", "data_fingerprint", "definition_sha256", "fill_value", "open_relevances",
           "parameters_sha256", "read_done", "require_zarr", "run_settings", "scaled_for_storage", "store_dtype",
           "store_name", "verify_store", "write_chunk"]
