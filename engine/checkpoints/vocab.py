"""Tokenizers of a LLaMA-Omni2 model directory, built locally, and the special ids the engine reads from them.

No tokenizer can be downloaded here, so random checkpoints carry tokenizers we build with the `tokenizers` library in
the Qwen2.5 on-disk format (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json with a ChatML template):
a byte-level BPE trained on a small embedded English text, filler tokens up to `text_vocab_size`, then Qwen2.5's 22
special tokens. With `text_vocab_size=151643` every id coincides with the real Qwen2.5 / LLaMA-Omni2 vocabularies
(MODEL_SPEC §1.4): `<|endoftext|>` 151643, `<|im_end|>` 151645, `<speech>`/`<sep>` 151665, unit u at 151666+u.

The engine never hard-codes those ids: `SpecialIds.from_tokenizers` reads them from whatever tokenizers a model
directory holds, real or random.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from omni2.engine.config import CheckpointError

SPEECH_TOKEN = "<speech>"  # the LLM's placeholder for one user turn's speech embeddings
SEP_TOKEN = "<sep>"  # appended once after the last text token of a reply in the TTS LM's input
N_UNITS = 6561  # CosyVoice2 S3 tokens: 3^8 FSQ codes
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TTS_TOKENIZER_DIR = "tts_tokenizer"

# Qwen2.5's added tokens in id order (151643..151664), with their `special` flag: the tool-call and FIM markers are
# ordinary added tokens there, so decode(skip_special_tokens=True) keeps them.
QWEN_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True), (IM_START, True), (IM_END, True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)
N_QWEN_SPECIAL = len(QWEN_SPECIAL_TOKENS)  # 22

# Qwen2.5-Instruct behaviour without the tools branch: a default system prompt unless the first message is one.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

N_MERGES = 300
# Training text for the BPE. No digits on purpose: the only digit-bearing tokens should be fillers and units.
_CORPUS = """\
The speech engine listens while you talk and starts to answer before you have finished thinking about what you said.
A voice assistant should feel like a patient friend on the other end of a telephone line: it hears the question,
it thinks for a moment, and then it speaks in short, clear sentences that are easy to follow.
When the room is quiet the model waits. When someone speaks, the encoder turns the sound into a sequence of vectors,
the language model reads those vectors together with the conversation so far, and the speech generator writes
small pieces of audio as soon as a few words of the reply are known.
Good morning! What would you like to hear about today? I can tell you the weather, read a story, explain how a
train finds its way across the country, or simply keep you company while you cook dinner.
There is a great difference between a system that waits for the whole answer and one that streams it. The first one
makes people stare at a silent screen; the second one lets them hear the beginning of the reply while the rest is
still being written. Latency is measured from the end of the user's speech to the first sound that reaches the ear.
The children walked along the river in the afternoon, throwing small stones into the water and counting the rings
that spread across the surface. Their grandmother told them about the summers of her youth, when the bridge was
made of wood and the mill still turned its heavy wheel beside the old stone house.
Please speak slowly and clearly. If the answer is not what you expected, you can interrupt at any time and ask
another question; the assistant will stop talking, forget the unfinished sentence, and listen again.
Thank you for your patience. The weather will be warm and sunny in the morning, with clouds coming in from the west
in the evening and a light rain during the night. Remember to take an umbrella if you are going out late.
"""


def unit_token(u: int) -> str:
    """Text form of unit `u` in the TTS vocabulary: its digits are the unit index, as the official regex expects."""
    return f"<|speech_{u}|>"


def _filler_token(i: int) -> str:
    # Named by its own id so that no run of fillers can look like the unit run (digit u at id unit0 + u).
    return f"<|filler_{i}|>"


def _base_tokenizer(text_vocab_size: int) -> Tokenizer:
    """Byte-level BPE + fillers: exactly `text_vocab_size` regular tokens, no added tokens yet."""
    # Qwen2's pre-tokenizer split pattern, taken from transformers (imported here: transformers is slow to import).
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    if text_vocab_size < 256 + 16:
        raise ValueError(f"text_vocab_size {text_vocab_size} cannot hold the 256 byte tokens and some merges")
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.NFC()
    trainer_tok.pre_tokenizer = pre
    n_merges = min(N_MERGES, text_vocab_size - 256)
    trainer = trainers.BpeTrainer(vocab_size=256 + n_merges, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    trainer_tok.train_from_iterator([_CORPUS], trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab: dict[str, int] = dict(trained["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    for i in range(len(vocab), text_vocab_size):
        vocab[_filler_token(i)] = i

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                               byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    for content, special in QWEN_SPECIAL_TOKENS:
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
    return tok


def _tokenizer_config(tok: Tokenizer, eos: str, chat_template: str | None) -> dict[str, Any]:
    added = json.loads(tok.to_str())["added_tokens"]
    cfg: dict[str, Any] = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for a in added
        },
        "additional_special_tokens": [a["content"] for a in added if a["special"] and a["content"] not in
                                      (ENDOFTEXT, eos)],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    return cfg


def _save(tok: Tokenizer, out_dir: Path, config: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    tok.model.save(str(out_dir))  # vocab.json + merges.txt, the files a slow Qwen2Tokenizer reads
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def build_tokenizers(out_model_dir: str | Path, text_vocab_size: int) -> None:
    """Write the LLM tokenizer into `out_model_dir` and the TTS tokenizer into `out_model_dir/tts_tokenizer/`.

    Ids: regular tokens 0..text_vocab_size-1, Qwen2.5's 22 specials next, then `<speech>` (LLM) or `<sep>` followed by
    the 6561 unit tokens `<|speech_u|>` (TTS). Deterministic: the same arguments always write the same files.
    """
    out = Path(out_model_dir)
    llm = _base_tokenizer(text_vocab_size)
    llm.add_tokens([AddedToken(SPEECH_TOKEN, special=True, normalized=False)])
    _save(llm, out, _tokenizer_config(llm, IM_END, CHAT_TEMPLATE))

    tts = _base_tokenizer(text_vocab_size)
    tts.add_tokens([AddedToken(SEP_TOKEN, special=True, normalized=False)])
    # Units are non-special so decode(skip_special_tokens=True) keeps their text for the official digit regex.
    tts.add_tokens([AddedToken(unit_token(u), special=False, normalized=False) for u in range(N_UNITS)])
    _save(tts, out / TTS_TOKENIZER_DIR, _tokenizer_config(tts, ENDOFTEXT, None))


def find_unit_run(tokenizer: Any, n_units: int = N_UNITS) -> int:
    """Id of unit 0: the start of `n_units` consecutive tokens whose text holds one digit group equal to u."""
    digits: dict[int, int] = {}
    for text, i in tokenizer.get_vocab().items():
        groups = re.findall(r"\d+", text)
        if len(groups) == 1 and int(groups[0]) < n_units:
            digits[i] = int(groups[0])
    for start in sorted(i for i, u in digits.items() if u == 0):
        if all(digits.get(start + u) == u for u in range(n_units)):
            return start
    raise CheckpointError(f"TTS tokenizer has no run of {n_units} consecutive unit tokens (digits 0..{n_units - 1})")


def _token_id(tok: Any, token: str, which: str) -> int:
    i = tok.convert_tokens_to_ids(token)
    # An unknown token maps to the unk id (None for Qwen tokenizers); check the round trip to be sure.
    if i is None or tok.convert_ids_to_tokens(i) != token:
        raise CheckpointError(f"{which} tokenizer has no {token} token")
    return int(i)


def _eos_list(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


@dataclass(frozen=True)
class SpecialIds:
    """Every id the engine treats specially, read from a model directory's tokenizers and configs."""

    speech_token_id: int  # LLM `<speech>`
    im_end_id: int
    thinker_eos_ids: tuple[int, ...]  # generation stops on any of these; always holds `<|im_end|>`
    pad_id: int
    sep_id: int  # TTS `<sep>`
    tts_eos_id: int
    tts_pad_id: int
    unit0: int  # TTS id of unit 0; unit u is unit0 + u
    n_units: int = N_UNITS

    def is_unit(self, tts_id: int) -> bool:
        return self.unit0 <= tts_id < self.unit0 + self.n_units

    @classmethod
    def from_tokenizers(cls, llm_tok: Any, tts_tok: Any, config: dict[str, Any],
                        generation_config: dict[str, Any] | None = None) -> SpecialIds:
        """Read the ids. `config` is config.json; `generation_config` (when the file exists) wins for thinker eos."""
        speech = _token_id(llm_tok, SPEECH_TOKEN, "LLM")
        im_end = _token_id(llm_tok, IM_END, "LLM")
        eos = _eos_list((generation_config or {}).get("eos_token_id")) or _eos_list(config.get("eos_token_id"))
        thinker_eos = tuple(dict.fromkeys([*eos, im_end]))
        pad = llm_tok.pad_token_id
        if pad is None:
            raise CheckpointError("LLM tokenizer has no pad token")
        sep = _token_id(tts_tok, SEP_TOKEN, "TTS")
        tts_eos = tts_tok.eos_token_id
        if tts_eos is None:
            raise CheckpointError("TTS tokenizer has no eos token")
        # HF generate falls back to eos when pad is unset; do the same.
        tts_pad = tts_tok.pad_token_id if tts_tok.pad_token_id is not None else tts_eos
        unit0 = find_unit_run(tts_tok)
        tts_vocab = config.get("speech_generator", {}).get("vocab_size")
        if tts_vocab is not None and unit0 + N_UNITS > tts_vocab:
            raise CheckpointError(f"unit tokens {unit0}..{unit0 + N_UNITS - 1} run past the TTS vocab ({tts_vocab})")
        return cls(speech, im_end, thinker_eos, int(pad), sep, int(tts_eos), int(tts_pad), unit0)
