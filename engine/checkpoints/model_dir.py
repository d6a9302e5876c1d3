"""Official LLaMA-Omni2 model directories, read unchanged (`ModelDir`).

A model directory (MODEL_SPEC §1.1) holds config.json, optional generation_config.json, sharded safetensors with
`model.safetensors.index.json` (or one model.safetensors), the LLM tokenizer and `tts_tokenizer/`. One checkpoint
holds every component; stages pick theirs by key prefix (`PREFIX_*` below) with `ModelDir.load_module`.

The official code constructs the Whisper encoder from `config.speech_encoder` (an openai-whisper `large-v3.pt`) and
then overwrites all of its weights with the checkpoint's `model.speech_encoder.*` tensors. We never read that .pt:
the encoder's width comes from `speech_encoder_hidden_size`, its depth from the `blocks.{i}` tensors present.
The vocoder lives in a separate `cosy2_decoder/` directory (vocoder_dir.py). The random writer (model_writer.py)
holds every tensor's name and shape and the presets.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from omni2.engine.checkpoints.vocab import TTS_TOKENIZER_DIR, SpecialIds
from omni2.engine.config import CheckpointError, ConfigError, ModelConfig

log = logging.getLogger("omni2.checkpoints")

# Key prefixes of the components inside the one official checkpoint (MODEL_SPEC §1.3).
PREFIX_THINKER = ""
PREFIX_ENCODER = "model.speech_encoder."
PREFIX_PROJECTOR = "model.speech_projector."
PREFIX_GENERATOR = "speech_generator."  # input_proj + gate; load with exclude=GENERATOR_EXCLUDE
PREFIX_TTS_LM = "speech_generator.model."
THINKER_EXCLUDE = (PREFIX_ENCODER, PREFIX_PROJECTOR, PREFIX_GENERATOR)
GENERATOR_EXCLUDE = (PREFIX_TTS_LM,)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_HEAD, _EMBED = "lm_head.weight", "model.embed_tokens.weight"
_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_BIG_LOAD = (200, 1 << 30)  # show a progress bar beyond this many tensors or bytes


class ModelDir:
    """An official LLaMA-Omni2 model directory, opened without reading any tensor data (headers only)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"no model directory at {self.path}")
        self.raw_config = self._read_json(self.path / "config.json", required=True)
        self.generation_config: dict[str, Any] | None = self._read_json(self.path / "generation_config.json")
        self.files: dict[str, Path] = {}  # tensor name -> the safetensors file holding it
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}  # safetensors dtype names ("BF16", "F32", ...)
        self._read_headers()
        blocks = {int(m.group(1)) for k in self.shapes if (m := re.match(r"model\.speech_encoder\.blocks\.(\d+)\.", k))}
        try:
            self.config = ModelConfig.from_dict(self.raw_config, encoder_layers=len(blocks) or None)
        except ConfigError as e:
            raise ConfigError(f"{self.path / 'config.json'}: {e}") from e
        self._tokenizers: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r}, {len(self.shapes)} tensors)"

    def ignored_generation_settings(self) -> dict[str, Any]:
        """What generation_config.json asks of the thinker's decoding that this engine does not do. transformers'
        `generate` applies a repetition penalty even to greedy decoding (run_llama_omni2.py), and the official
        sampling server takes top_k from this file: replies then differ from the official ones."""
        gen = self.generation_config or {}
        ignored = {k: gen[k] for k in ("repetition_penalty", "no_repeat_ngram_size", "encoder_repetition_penalty")
                   if gen.get(k) not in (None, 0, 1, 1.0)}
        if gen.get("top_k") not in (None, 0):
            ignored["top_k"] = gen["top_k"]
        return ignored

    @staticmethod
    def _read_json(path: Path, required: bool = False) -> dict[str, Any] | None:
        if not path.is_file():
            if required:
                raise CheckpointError(f"no {path.name} in {path.parent}")
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from e

    def _read_headers(self) -> None:
        index = self._read_json(self.path / INDEX_FILE)
        if index is not None:
            if not isinstance(index.get("weight_map"), dict):
                raise CheckpointError(f"{self.path / INDEX_FILE} has no weight_map")
            listed: dict[str, list[str]] = {}
            for name, fname in index["weight_map"].items():
                listed.setdefault(fname, []).append(name)
            for fname, names in listed.items():
                if not (self.path / fname).is_file():
                    raise CheckpointError(f"{INDEX_FILE} names shard {fname} (holding e.g. {names[0]}), "
                                          f"which is missing from {self.path}")
        elif (self.path / SINGLE_FILE).is_file():
            listed = {SINGLE_FILE: []}
        else:
            raise CheckpointError(f"no {INDEX_FILE} or {SINGLE_FILE} in {self.path}")
        for fname, names in sorted(listed.items()):
            # HF loads whole shard files, so a shard's tensors count even when the index forgets one.
            with _open_safetensors(self.path / fname) as sf:
                for k in sf.keys():
                    if k in self.files:
                        raise CheckpointError(f"tensor {k} is stored twice: {self.files[k].name} and {fname}")
                    sl = sf.get_slice(k)
                    self.files[k] = self.path / fname
                    self.shapes[k], self.dtypes[k] = tuple(sl.get_shape()), sl.get_dtype()
            lost = [n for n in names if self.files.get(n) != self.path / fname]
            if lost:
                raise CheckpointError(f"{INDEX_FILE} puts {lost[0]} in {fname}, which does not hold it")

    # -- tokenizers and ids --------------------------------------------------------------------------------
    def _load_tokenizer(self, sub: str) -> Any:
        if sub not in self._tokenizers:
            d = self.path / sub if sub else self.path
            if not ((d / "tokenizer.json").is_file() or (d / "vocab.json").is_file()):
                raise CheckpointError(f"no tokenizer files in {d}")
            from transformers import AutoTokenizer, PretrainedConfig

            # A blank config stops transformers from parsing our config.json (an unregistered model_type, which
            # it warns about); the tokenizer class comes from tokenizer_config.json either way.
            self._tokenizers[sub] = AutoTokenizer.from_pretrained(str(d), config=PretrainedConfig(),
                                                                  local_files_only=True)
        return self._tokenizers[sub]

    def tokenizer(self) -> Any:
        """The LLM (thinker) tokenizer, with the chat template and `<speech>`."""
        return self._load_tokenizer("")

    def tts_tokenizer(self) -> Any:
        """The TTS tokenizer of `tts_tokenizer/`: the text vocab + `<sep>` + the 6561 unit tokens."""
        return self._load_tokenizer(TTS_TOKENIZER_DIR)

    @cached_property
    def _special_ids(self) -> SpecialIds:
        return SpecialIds.from_tokenizers(self.tokenizer(), self.tts_tokenizer(), self.raw_config,
                                          self.generation_config)

    def special_ids(self) -> SpecialIds:
        """`<speech>`, `<sep>`, unit 0, eos/pad of both LMs, read from the tokenizers and configs."""
        return self._special_ids

    # -- tensors ---------------------------------------------------------------------------------------------
    def keys(self, prefix: str = "", exclude: Sequence[str] = ()) -> list[str]:
        """Names of the stored tensors under `prefix`, minus those under any `exclude` prefix."""
        return [k for k in self.shapes if k.startswith(prefix) and not k.startswith(tuple(exclude))]

    def get_tensor(self, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                   ) -> torch.Tensor:
        """One tensor, cast to `dtype` (floating tensors only) and moved to `device`."""
        if name not in self.files:
            raise CheckpointError(f"no tensor {name} in {self.path}")
        with _open_safetensors(self.files[name]) as sf:
            return _convert(sf.get_tensor(name), device, dtype)

    def _tied(self, prefix: str) -> bool:
        if prefix == PREFIX_THINKER:
            return self.config.thinker.tie_word_embeddings
        if prefix == PREFIX_TTS_LM:
            return self.config.generator.lm.tie_word_embeddings
        return False

    def load_module(self, module: nn.Module, prefix: str, *, exclude: Sequence[str] = (),
                    device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    tied: bool | None = None) -> nn.Module:
        """Load every tensor under `prefix` (prefix stripped) into `module`, strictly, one tensor at a time.

        `module` may live on the meta device: tensors are assigned (as `load_state_dict(assign=True)` does), so a
        checkpoint never needs twice its size in memory. `dtype=None` keeps the checkpoint's dtype. A missing,
        unexpected or misshaped tensor raises CheckpointError. Tied heads: when the module has both `lm_head.weight`
        and `model.embed_tokens.weight` but the checkpoint stores one, they share one tensor if the head is the
        absent one or `tied` (default: the config's tie_word_embeddings for the thinker / TTS LM prefixes).
        Afterwards every submodule's `init_non_persistent(device)` runs, and nothing may be left on meta.
        """
        local = {k[len(prefix):]: k for k in self.keys(prefix, exclude)}
        expected = module.state_dict(keep_vars=True)
        tied = self._tied(prefix) if tied is None else tied
        alias: tuple[str, str] | None = None  # (target, source): target shares source's tensor
        if _HEAD in expected and _EMBED in expected:
            if _EMBED in local and _HEAD not in local:
                alias = (_HEAD, _EMBED)
                if not tied:  # transformers would start this head at random; a tied head is the likelier intent
                    log.warning("%s: no %s%s although tie_word_embeddings is false: the head reads the input "
                                "embeddings (a checkpoint that lost its head would answer wrongly)", self.path,
                                prefix, _HEAD)
            elif _HEAD in local and _EMBED not in local and tied:
                alias = (_EMBED, _HEAD)
        missing = [k for k in expected if k not in local and (alias is None or k != alias[0])]
        unexpected = [k for k in local if k not in expected]
        problems = [f"missing tensor {prefix}{k} {tuple(expected[k].shape)}" for k in missing]
        problems += [f"unexpected tensor {local[k]} {self.shapes[local[k]]}" for k in unexpected]
        targets = {k: k for k in local if k in expected}
        if alias is not None:
            targets[alias[0]] = alias[1]
        for dst, src in targets.items():
            want, have = tuple(expected[dst].shape), self.shapes[local[src]]
            if want != have:
                problems.append(f"tensor {local[src]} has shape {have}, the module expects {want}"
                                + (f" for {prefix}{dst}" if dst != src else ""))
        if problems:
            more = f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""
            raise CheckpointError(f"{self.path} does not fit {type(module).__name__} at prefix {prefix!r}: "
                                  + "; ".join(problems[:8]) + more)

        names = [local[k] for k in local]
        n_bytes = sum(math.prod(self.shapes[n]) * _ITEMSIZE.get(self.dtypes[n], 4) for n in names)
        big = len(names) > _BIG_LOAD[0] or n_bytes > _BIG_LOAD[1]
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        with tqdm(total=len(names), desc=f"load {prefix or 'thinker'}", unit="t", disable=None if big else True) as bar:
            for path, file_names in by_file.items():
                with _open_safetensors(path) as sf:
                    for n in file_names:
                        _assign(module, n[len(prefix):], _convert(sf.get_tensor(n), device, dtype))
                        bar.update(1)
        if alias is not None:
            _share(module, *alias)

        loaded = set(targets)
        for m in module.modules():
            if hasattr(m, "init_non_persistent"):
                m.init_non_persistent(device)
        for name, buf in module.named_buffers():
            if name not in loaded and not buf.is_meta and buf.device != torch.device(device):
                _assign(module, name, buf.to(device))
        on_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if on_meta:
            raise CheckpointError(f"{on_meta[:5]} of {type(module).__name__} are still on the meta device after "
                                  f"loading {prefix!r}: not in the checkpoint and not set by init_non_persistent")
        return module


def _convert(t: torch.Tensor, device: str | torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device=device)


def _assign(module: nn.Module, name: str, t: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if attr in owner._parameters:
        old = owner._parameters[attr]
        grad = old is not None and old.requires_grad and t.is_floating_point()
        owner._parameters[attr] = nn.Parameter(t, requires_grad=grad)
    else:
        owner._buffers[attr] = t


def _share(module: nn.Module, target: str, source: str) -> None:
    src_owner, _, src_attr = source.rpartition(".")
    dst_owner, _, dst_attr = target.rpartition(".")
    module.get_submodule(dst_owner)._parameters[dst_attr] = module.get_submodule(src_owner)._parameters[src_attr]


def _open_safetensors(path: Path):
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:  # cut short (an interrupted download), empty, or not safetensors
        raise CheckpointError(f"cannot read {path}: {e} (a download cut short? fetch this file again)") from e
