"""Content-complexity scores (caption + LLM, JPEG bits per pixel, reconstruction MSE) and score -> level;
``LevelAssigner``, the one object that decides levels (``Tokenizer.encode(levels=...)``, the command lines).

Score manifests are read for training by the one reader, ``cat_jax.data.load_levels``.
"""

from cat_jax.complexity.thresholds import (DEFAULT_LLM_THRESHOLDS, budget_thresholds, default_thresholds,
                                           levels_for_scores, quantile_thresholds)
from cat_jax.complexity.assign import AutoLevels, LevelAssigner
from cat_jax.complexity.llm import ChatClient, EndpointError, LLMError
from cat_jax.complexity.manifest import ManifestWriter, read_manifest
from cat_jax.complexity.prompts import ParseError, parse_perception, parse_score
from cat_jax.complexity.runner import RunSummary, TooManyFailures, score_source
from cat_jax.complexity.scorers import (CaptionLLMScorer, JpegScorer, MseScorer, TextOnlyScorer, jpeg_bpp,
                                        lowpass_reconstruct, prepare_image)
