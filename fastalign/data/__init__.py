"""Training data: loading, format detection (TRL 1.x formats), tokenization, packing and collators.

Flow: :func:`load_training_dataset` → :func:`require_format` → :func:`tokenize_dataset` (or the per-example
``tokenize_*`` functions with ``Dataset.map``) → optionally :func:`pack_sequences` → a collator.
"""

from fastalign.data.collate import (
    IGNORE_INDEX,
    PreferenceCollator,
    RewardCollator,
    SFTCollator,
    pack_sequences,
)
from fastalign.data.formats import (
    CONVERSATIONAL_LM,
    FORMAT_COLUMNS,
    FORMATS,
    LANGUAGE_MODELING,
    PREFERENCE,
    PROMPT_COMPLETION,
    PROMPT_ONLY,
    TRAINER_FORMATS,
    detect_format,
    extract_prompt,
    is_conversational,
    maybe_extract_prompt,
    require_format,
)
from fastalign.data.load import load_training_dataset
from fastalign.data.tokenization import tokenize_dataset, tokenize_preference, tokenize_prompt, tokenize_sft

__all__ = [
    "CONVERSATIONAL_LM",
    "FORMATS",
    "FORMAT_COLUMNS",
    "IGNORE_INDEX",
    "LANGUAGE_MODELING",
    "PREFERENCE",
    "PROMPT_COMPLETION",
    "PROMPT_ONLY",
    "TRAINER_FORMATS",
    "PreferenceCollator",
    "RewardCollator",
    "SFTCollator",
    "detect_format",
    "extract_prompt",
    "is_conversational",
    "load_training_dataset",
    "maybe_extract_prompt",
    "pack_sequences",
    "require_format",
    "tokenize_dataset",
    "tokenize_preference",
    "tokenize_prompt",
    "tokenize_sft",
]
