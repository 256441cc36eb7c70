"""A GGUF file's tokenizer: converted by transformers once, then kept on disk.

transformers builds a fast tokenizer from GGUF metadata by re-reading the file
and converting the vocabulary and merges: ~7.5 s for SmolLM2 on a 2-core host,
paid by every process that opens the model (the server, each CLI run). The
converted tokenizer is saved with save_pretrained under
BRAID_CACHE_ROOT (default $XDG_CACHE_HOME/braid, else ~/.cache/braid), keyed by
the file's path, size and modification time and by the transformers version,
and later processes load it from there (~0.3 s). A cache that cannot be
written or read is skipped: the tokenizer is then converted as before.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when what is saved changes


def cache_root() -> str:
    root = os.environ.get("BRAID_CACHE_ROOT")
    if root:
        return os.path.expanduser(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "braid")


def tokenizer_cache_dir(path: str) -> str:
    import transformers

    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{CACHE_FORMAT}"
    return os.path.join(cache_root(), "gguf-tokenizers", hashlib.sha256(key.encode()).hexdigest()[:32])


def convert_gguf_tokenizer(path: str):
    """transformers' tokenizer for the GGUF file, with its chat template from the metadata if
    transformers left it out."""
    from transformers import AutoTokenizer

    directory, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        from braid.models.loader.gguf_loader import get_reader, metadata_value

        template = metadata_value(get_reader(path), "tokenizer.chat_template")
        if template:
            tokenizer.chat_template = template
    return tokenizer


def load_gguf_tokenizer(path: str):
    """The GGUF file's tokenizer, from the disk cache when it holds this file's."""
    from transformers import AutoTokenizer

    cached = tokenizer_cache_dir(path)
    if os.path.isdir(cached):
        try:
            return AutoTokenizer.from_pretrained(cached, local_files_only=True)
        except Exception as e:  # a damaged entry: convert again and replace it
            logger.warning("ignoring the cached tokenizer in %s (%s); converting %s again", cached, e, path)
            shutil.rmtree(cached, ignore_errors=True)
    tokenizer = convert_gguf_tokenizer(path)
    _save(tokenizer, cached)
    return tokenizer


def _save(tokenizer, cached: str) -> None:
    """Write into a fresh folder, then rename it into place: a reader never sees half an entry,
    and when two processes convert at once the first rename wins and the other is dropped."""
    parent = os.path.dirname(cached)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".staging-", dir=parent)
    except OSError as e:
        logger.debug("tokenizer cache %s not writable: %s", parent, e)
        return
    try:
        tokenizer.save_pretrained(staging)
        os.rename(staging, cached)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
