"""Data: image sources, the embedded default dataset, preprocessing, level-bucketed grain pipelines."""

from cat_jax.data.embedded import KINDS, EmbeddedSource
from cat_jax.data.level_map import load_levels, resolve_levels
from cat_jax.data.pipeline import (make_eval_dataset, make_eval_iterator, make_global_batch,
                                   make_train_dataset, make_train_iterator)
from cat_jax.data.preprocess import (BadImageError, PreprocessConfig, decode_image,
                                     from_model_range, preprocess, to_model_range)
from cat_jax.data.sources import (ChartQASource, FolderSource, Source, Subset, TfdsSource, get_source,
                                  source_ids, source_labels)
