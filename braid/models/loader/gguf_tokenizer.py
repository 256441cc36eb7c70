"""A GGUF file's tokenizer: converted by transformers once, then kept on disk.

transformers builds a fast tokenizer from GGUF metadata by re-reading the file
and converting the vocabulary and merges: ~7.5 s for SmolLM2 on a 2-core host,
paid by every process that opens the model (the server, each CLI run). The
converted tokenizer is saved with save_pretrained under
BRAID_CACHE_ROOT (default $XDG_CACHE_HOME/braid, else ~/.cache/braid), keyed by
the file's identity (path, inode, size, times) and the transformers and
tokenizers versions, and later processes load it from there (~0.3 s). A cache
that cannot be written or read is skipped: the tokenizer is then converted as
before. One known difference: save_pretrained drops the add_bos_token /
add_eos_token attributes (the saved post-processor still adds the tokens, so
encodings are equal); braid reads neither.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when what is saved changes


def cache_root() -> str | None:
    """BRAID_CACHE_ROOT, else $XDG_CACHE_HOME/braid, else ~/.cache/braid; None when no absolute
    folder can be named (a relative XDG_CACHE_HOME is ignored, as the XDG spec says)."""
    root = os.environ.get("BRAID_CACHE_ROOT")
    if root:
        return os.path.abspath(os.path.expanduser(root))
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "braid")
    home = os.path.expanduser("~")
    return os.path.join(home, ".cache", "braid") if os.path.isabs(home) else None


def tokenizer_cache_dir(path: str) -> str | None:
    """The cache entry for this file, or None when there is no cache root. The key changes when
    the file is replaced (inode, size, times) or the converting libraries change."""
    import tokenizers
    import transformers

    root = cache_root()
    if root is None:
        return None
    st = os.stat(path)
    key = (f"{os.path.abspath(path)}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|"
           f"{transformers.__version__}|{tokenizers.__version__}|{CACHE_FORMAT}")
    return os.path.join(root, "gguf-tokenizers", hashlib.sha256(key.encode()).hexdigest()[:32])


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
    if cached is not None and os.path.isdir(cached):
        try:
            return AutoTokenizer.from_pretrained(cached, local_files_only=True)
        except PermissionError as e:  # another user's entry: leave it, convert for ourselves
            logger.debug("cannot read the cached tokenizer in %s: %s", cached, e)
            return convert_gguf_tokenizer(path)
        except Exception as e:  # a damaged entry: convert again and replace it
            logger.warning("ignoring the cached tokenizer in %s (%s); converting %s again", cached, e, path)
            shutil.rmtree(cached, ignore_errors=True)
    tokenizer = convert_gguf_tokenizer(path)
    if cached is not None:
        _save(tokenizer, cached)
    return tokenizer


def _save(tokenizer, cached: str) -> None:
    """Write into a fresh folder, then rename it into place: a reader never sees half an entry,
    and when two processes convert at once the first rename wins and the other is dropped.
    The cache only saves time, so a failure to write it is logged, never raised."""
    parent = os.path.dirname(cached)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".staging-", dir=parent)
    except OSError as e:
        logger.debug("tokenizer cache %s not writable: %s", parent, e)
        return
    try:
        tokenizer.save_pretrained(staging)
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would keep the entry from other users
        os.rename(staging, cached)
    except Exception as e:  # noqa: BLE001 - incl. a rename that lost the race
        logger.debug("tokenizer cache entry %s not written: %s", cached, e)
        shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
