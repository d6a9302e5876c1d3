import filecmp
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from omni2.engine.checkpoints.model_dir import ModelDir
from omni2.engine.checkpoints.vocab import (
    DEFAULT_SYSTEM_PROMPT,
    N_UNITS,
    SpecialIds,
    build_tokenizers,
    find_unit_run,
    unit_token,
)
from omni2.engine.config import CheckpointError, ConfigError, Placement, StreamParams

V0 = 512  # the tiny preset's text_vocab_size


def _ids(out):
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x returned a list.
    return out["input_ids"] if hasattr(out, "keys") else out


def test_tiny_special_ids(tiny_ckpt: Path):
    ids = ModelDir(tiny_ckpt).special_ids()
    assert ids == SpecialIds(speech_token_id=V0 + 22, im_end_id=V0 + 2, thinker_eos_ids=(V0 + 2, V0), pad_id=V0,
                             sep_id=V0 + 22, tts_eos_id=V0, tts_pad_id=V0, unit0=V0 + 23, n_units=N_UNITS)
    assert ids.is_unit(V0 + 23) and ids.is_unit(V0 + 23 + 6560) and not ids.is_unit(V0 + 22)


def test_real_size_ids(tmp_path: Path):
    build_tokenizers(tmp_path, 151643)
    llm, tts = AutoTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path / "tts_tokenizer")
    assert llm.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|file_sep|>", "<speech>"]) == \
        [151643, 151644, 151645, 151664, 151665]
    assert len(llm) == 151666 and len(tts) == 158227
    ids = SpecialIds.from_tokenizers(llm, tts, {"eos_token_id": 151645, "speech_generator": {"vocab_size": 158227}})
    assert (ids.sep_id, ids.unit0, ids.tts_eos_id, ids.thinker_eos_ids) == (151665, 151666, 151643, (151645,))


def test_chat_template_keeps_speech(tiny_ckpt: Path):
    tok = ModelDir(tiny_ckpt).tokenizer()
    speech = tok.convert_tokens_to_ids("<speech>")
    ids = _ids(tok.apply_chat_template([{"role": "user", "content": "<speech>"}], add_generation_prompt=True))
    assert ids.count(speech) == 1
    text = tok.decode(ids)
    assert text == (f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<speech><|im_end|>\n"
                    "<|im_start|>assistant\n")
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<speech>"},
             {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "<speech>"}]
    text = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert DEFAULT_SYSTEM_PROMPT not in text and text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert _ids(tok.apply_chat_template(turns, add_generation_prompt=True)).count(speech) == 2


def test_text_round_trip(tiny_ckpt: Path):
    tok = ModelDir(tiny_ckpt).tokenizer()
    s = "Good morning! How is the weather by the river? Ünïcode, 42 and 😀."
    ids = tok(s)["input_ids"]
    assert tok.decode(ids) == s
    assert len(ids) < len(s.encode())  # the merges do something
    assert max(ids) < V0


def test_units_survive_decode(tiny_ckpt: Path):
    md = ModelDir(tiny_ckpt)
    tts, ids = md.tts_tokenizer(), md.special_ids()
    units = [0, 17, 6560, 3]
    seq = [ids.unit0 + u for u in units] + [ids.sep_id, ids.tts_eos_id]
    text = tts.decode(seq, skip_special_tokens=True)
    assert [int(d) for d in re.findall(r"\d+", text)] == units  # the official process_units recovery
    assert tts.convert_ids_to_tokens(ids.unit0 + 17) == unit_token(17)


def test_find_unit_run(tiny_ckpt: Path):
    md = ModelDir(tiny_ckpt)
    assert find_unit_run(md.tts_tokenizer()) == V0 + 23
    with pytest.raises(CheckpointError, match="6561 consecutive unit tokens"):
        find_unit_run(md.tokenizer())


def test_special_ids_eos_sources_and_errors(tiny_ckpt: Path):
    md = ModelDir(tiny_ckpt)
    llm, tts = md.tokenizer(), md.tts_tokenizer()
    cfg = {"eos_token_id": V0 + 2}
    assert SpecialIds.from_tokenizers(llm, tts, cfg, None).thinker_eos_ids == (V0 + 2,)
    assert SpecialIds.from_tokenizers(llm, tts, cfg, {"eos_token_id": V0}).thinker_eos_ids == (V0, V0 + 2)
    assert SpecialIds.from_tokenizers(llm, tts, {}, {"eos_token_id": [V0 + 2, V0]}).thinker_eos_ids == (V0 + 2, V0)
    with pytest.raises(CheckpointError, match="<speech>"):
        SpecialIds.from_tokenizers(tts, tts, cfg)
    with pytest.raises(CheckpointError, match="<sep>"):
        SpecialIds.from_tokenizers(llm, llm, cfg)
    with pytest.raises(CheckpointError, match="TTS vocab"):
        SpecialIds.from_tokenizers(llm, tts, {"speech_generator": {"vocab_size": 7000}})


def test_build_is_deterministic_and_loads_slow_flag(tmp_path: Path):
    build_tokenizers(tmp_path / "a", V0)
    build_tokenizers(tmp_path / "b", V0)
    for f in ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "tts_tokenizer/tokenizer.json"]:
        assert filecmp.cmp(tmp_path / "a" / f, tmp_path / "b" / f, shallow=False), f
    # The official loader passes use_fast=False; transformers 5 ignores it and still loads the tokenizer.
    tok = AutoTokenizer.from_pretrained(tmp_path / "a", use_fast=False)
    assert tok.convert_tokens_to_ids("<speech>") == V0 + 22


@pytest.mark.parametrize("s,want", [("(3,10)", (3, 10)), (" ( 1 , 1 ) ", (1, 1)), ("3,10", (3, 10)),
                                    ([2, 5], (2, 5)), ((4, 8), (4, 8)), (None, (1, 1))])
def test_stream_params_parse(s, want):
    p = StreamParams.parse(s)
    assert (p.read, p.write) == want
    assert StreamParams.parse(p.to_str()) == p


@pytest.mark.parametrize("s", ["(3)", "(a,b)", "(0,10)", "(3,10,2)", "3;10", [1], "(-1,2)"])
def test_stream_params_reject(s):
    with pytest.raises(ConfigError):
        StreamParams.parse(s)


def test_placement_parse():
    assert set(Placement.parse("cpu").devices.values()) == {"cpu"}
    assert set(Placement.parse("cuda").devices.values()) == {"cuda:0"}
    p = Placement.parse("asr=0, llm=1, tts=cuda:1, vocoder=cpu")
    assert p.devices == {"asr": "cuda:0", "llm": "cuda:1", "tts": "cuda:1", "vocoder": "cpu"}
    for bad, msg in [("asr=0,llm=1,tts=1", "missing"), ("asr=0,llm=1,tts=1,vocoder=1,foo=1", "unknown stage"),
                     ("asr=gpu,llm=1,tts=1,vocoder=1", "bad device")]:
        with pytest.raises(ConfigError, match=msg):
            Placement.parse(bad)
