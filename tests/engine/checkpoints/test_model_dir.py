import filecmp
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from omni2.engine.checkpoints.model_dir import (
    GENERATOR_EXCLUDE,
    INDEX_FILE,
    PREFIX_ENCODER,
    PREFIX_GENERATOR,
    PREFIX_PROJECTOR,
    PREFIX_TTS_LM,
    THINKER_EXCLUDE,
    ModelDir,
)
from omni2.engine.checkpoints.model_writer import PRESETS, whisper_sinusoids, write_checkpoint
from omni2.engine.cli.main import main
from omni2.engine.config import CheckpointError, ConfigError

CHECK_LAYOUT = Path(__file__).parents[3].parent / "shared/checks/check_layout.py"
COMPONENTS = [("", THINKER_EXCLUDE), (PREFIX_ENCODER, ()), (PREFIX_PROJECTOR, ()),
              (PREFIX_GENERATOR, GENERATOR_EXCLUDE), (PREFIX_TTS_LM, ())]


def _container(shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """A bare module tree on meta with exactly these parameter names (positional_embedding as a buffer)."""
    root = nn.Module()
    for name, shape in shapes.items():
        *path, attr = name.split(".")
        m = root
        for part in path:
            if part not in m._modules:
                m.add_module(part, nn.Module())
            m = m._modules[part]
        t = torch.empty(shape, device="meta")
        if attr == "positional_embedding":
            m.register_buffer(attr, t)
        else:
            m.register_parameter(attr, nn.Parameter(t))
    return root


def _component(md: ModelDir, prefix: str, exclude=()) -> nn.Module:
    return _container({k[len(prefix):]: md.shapes[k] for k in md.keys(prefix, exclude)})


def _stored(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _edit(model_dir: Path, fn) -> None:
    """Rewrite every shard through fn(dict of tensors) and keep the index in step."""
    index = json.loads((model_dir / INDEX_FILE).read_text())
    weight_map = {}
    for f in sorted(model_dir.glob("model-*.safetensors")):
        tensors = load_file(f)
        fn(tensors, f.name)
        save_file(tensors, f, metadata={"format": "pt"})
        weight_map.update({k: f.name for k in tensors})
    index["weight_map"] = weight_map
    (model_dir / INDEX_FILE).write_text(json.dumps(index))


def _edit_config(model_dir: Path, fn) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    fn(cfg)
    (model_dir / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def ckpt_copy(tiny_ckpt: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "omni2-tiny"))


def test_check_layout_accepts_tiny(tiny_ckpt: Path):
    if not CHECK_LAYOUT.is_file():
        pytest.skip(f"{CHECK_LAYOUT} not found (the shared checks live beside the repo)")
    r = subprocess.run([sys.executable, str(CHECK_LAYOUT), str(tiny_ckpt.parent)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "layout ok" in r.stdout


def test_model_dir_reads_config_and_headers(tiny_ckpt: Path):
    md = ModelDir(tiny_ckpt)
    p = PRESETS["tiny"]
    assert md.config.thinker == p.thinker and md.config.generator.lm == p.tts
    assert md.config.encoder.n_layer == 2 and md.config.encoder.n_state == 128
    assert md.config.generator.stream.read == 3 and md.config.generator.stream.write == 10
    assert not md.config.thinker.tie_word_embeddings and not md.config.generator.lm.tie_word_embeddings
    assert len({f.name for f in md.files.values()}) >= 2  # always sharded
    assert md.shapes["model.speech_projector.linear1.weight"] == (2048, 128 * 5)
    assert "model.speech_encoder.blocks.0.attn.key.bias" not in md.shapes
    # Every tensor belongs to exactly one component.
    owned = [k for prefix, ex in COMPONENTS for k in md.keys(prefix, ex)]
    assert sorted(owned) == sorted(md.shapes)


def test_load_module_is_bit_exact(tiny_ckpt: Path):
    md = ModelDir(tiny_ckpt)
    stored = _stored(tiny_ckpt)
    for prefix, exclude in COMPONENTS:
        module = md.load_module(_component(md, prefix, exclude), prefix, exclude=exclude)
        state = module.state_dict()
        assert state, prefix
        for k, t in state.items():
            ref = stored[prefix + k]
            assert t.dtype == ref.dtype and torch.equal(t, ref), prefix + k
    pos = stored[PREFIX_ENCODER + "positional_embedding"]
    assert torch.equal(pos, whisper_sinusoids(1500, 128))


def test_load_module_casts_dtype(tiny_ckpt: Path):
    md = ModelDir(tiny_ckpt)
    m = md.load_module(_component(md, PREFIX_PROJECTOR), PREFIX_PROJECTOR, dtype=torch.bfloat16)
    assert m.linear1.weight.dtype == torch.bfloat16
    assert torch.equal(m.linear1.weight, md.get_tensor(PREFIX_PROJECTOR + "linear1.weight").bfloat16())


def test_random_heads(tiny_ckpt: Path):
    md, stored = ModelDir(tiny_ckpt), _stored(tiny_ckpt)
    ids = md.special_ids()
    head = stored[PREFIX_TTS_LM + "lm_head.weight"]
    live = head.abs().sum(1) > 0
    assert live[ids.unit0:ids.unit0 + ids.n_units].all() and live[ids.tts_eos_id]
    assert live.sum() == ids.n_units + 1  # every other text/special row is zero
    assert (stored[PREFIX_TTS_LM + "model.embed_tokens.weight"].abs().sum(1) > 0).all()
    assert not torch.equal(stored["lm_head.weight"], stored["model.embed_tokens.weight"])


def test_same_seed_same_bytes_other_seed_differs(tiny_ckpt: Path, tmp_path: Path, capsys):
    again = write_checkpoint(tmp_path / "a", "tiny", seed=0)
    names = sorted(p.relative_to(tiny_ckpt) for p in tiny_ckpt.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for n in names:
        assert filecmp.cmp(tiny_ckpt / n, again / n, shallow=False), n

    assert main(["make-checkpoint", "--preset", "tiny", "--out", str(tmp_path / "b"), "--seed", "1"]) == 0
    other = Path(capsys.readouterr().out.split()[0])  # then the cosy2_decoder/ path
    assert other == tmp_path / "b" / "omni2-tiny"
    a, b = _stored(tiny_ckpt), _stored(other)
    assert a.keys() == b.keys()
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(a[PREFIX_ENCODER + "positional_embedding"], b[PREFIX_ENCODER + "positional_embedding"])
    assert (tiny_ckpt / "config.json").read_text() == (other / "config.json").read_text()


def _hf_qwen2(cfg):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                     num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps,
                     rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings)
    return Qwen2ForCausalLM(hf).eval()


@pytest.mark.parametrize("prefix", ["", PREFIX_TTS_LM])
def test_qwen2_parts_load_into_transformers(tiny_ckpt: Path, prefix: str):
    md = ModelDir(tiny_ckpt)
    cfg = md.config.thinker if prefix == "" else md.config.generator.lm
    model = md.load_module(_hf_qwen2(cfg), prefix, exclude=THINKER_EXCLUDE if prefix == "" else ())
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight,
                       md.get_tensor(prefix + "model.layers.1.mlp.down_proj.weight"))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 200, 17]])).logits
    assert logits.shape == (1, 4, cfg.vocab_size) and torch.isfinite(logits).all()


def test_missing_extra_misshaped_tensors(ckpt_copy: Path):
    md = ModelDir(ckpt_copy)
    make = lambda: _component(md, "", THINKER_EXCLUDE)  # noqa: E731 - the original thinker's names and shapes

    def corrupt(tensors, fname):
        tensors.pop("model.layers.1.mlp.up_proj.weight", None)
        if "model.norm.weight" in tensors:
            tensors["model.norm.weight"] = torch.ones(65)
            tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(3, 3)

    _edit(ckpt_copy, corrupt)
    with pytest.raises(CheckpointError) as e:
        ModelDir(ckpt_copy).load_module(make(), "", exclude=THINKER_EXCLUDE)
    msg = str(e.value)
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected tensor model.layers.0.mlp.extra_proj.weight" in msg
    assert "model.norm.weight has shape (65,)" in msg and "(64,)" in msg
    # Other components are untouched and still load.
    fresh = ModelDir(ckpt_copy)
    fresh.load_module(_component(fresh, PREFIX_PROJECTOR), PREFIX_PROJECTOR)


def test_missing_shard_and_index(ckpt_copy: Path):
    (ckpt_copy / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        ModelDir(ckpt_copy)
    (ckpt_copy / INDEX_FILE).unlink()
    with pytest.raises(CheckpointError, match=INDEX_FILE):
        ModelDir(ckpt_copy)
    with pytest.raises(CheckpointError, match="no model directory"):
        ModelDir(ckpt_copy / "nope")


def test_index_naming_a_tensor_its_shard_lacks(ckpt_copy: Path):
    index = json.loads((ckpt_copy / INDEX_FILE).read_text())
    index["weight_map"]["model.ghost.weight"] = "model-00001-of-00003.safetensors"
    (ckpt_copy / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.ghost.weight"):
        ModelDir(ckpt_copy)


@pytest.mark.parametrize("key", ["hidden_size", "speech_generator", "speech_encoder_hidden_size"])
def test_missing_config_key(ckpt_copy: Path, key: str):
    _edit_config(ckpt_copy, lambda c: c.pop(key))
    with pytest.raises(ConfigError, match=key):
        ModelDir(ckpt_copy)


def test_missing_config_file(ckpt_copy: Path):
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        ModelDir(ckpt_copy)


def _drop(name: str):
    return lambda tensors, fname: tensors.pop(name, None)


def _set_tie(prefix: str, value: bool):
    def fn(cfg):
        (cfg if prefix == "" else cfg["speech_generator"])["tie_word_embeddings"] = value
    return fn


@pytest.mark.parametrize("prefix", ["", PREFIX_TTS_LM])
@pytest.mark.parametrize("drop,tie,ok", [("lm_head.weight", True, True), ("lm_head.weight", False, True),
                                         ("model.embed_tokens.weight", True, True),
                                         ("model.embed_tokens.weight", False, False)])
def test_tied_head_aliasing(ckpt_copy: Path, prefix: str, drop: str, tie: bool, ok: bool, caplog):
    exclude = THINKER_EXCLUDE if prefix == "" else ()
    module = _component(ModelDir(ckpt_copy), prefix, exclude)
    kept = "model.embed_tokens.weight" if drop == "lm_head.weight" else "lm_head.weight"
    _edit(ckpt_copy, _drop(prefix + drop))
    _edit_config(ckpt_copy, _set_tie(prefix, tie))
    md = ModelDir(ckpt_copy)
    if not ok:
        with pytest.raises(CheckpointError, match=f"missing tensor {prefix}{drop}"):
            md.load_module(module, prefix, exclude=exclude)
        return
    with caplog.at_level(logging.WARNING, logger="omni2.checkpoints"):
        md.load_module(module, prefix, exclude=exclude)
    assert module.lm_head.weight is module.model.embed_tokens.weight
    assert torch.equal(module.lm_head.weight, md.get_tensor(prefix + kept))
    # The config says untied and the head is gone: transformers would start it at random; loaded tied, with a word.
    warned = f"no {prefix}lm_head.weight although tie_word_embeddings is false" in caplog.text
    assert warned == (drop == "lm_head.weight" and not tie)


class _Projector(nn.Module):
    """The projector's tensors plus a non-persistent buffer, as a rotary table would be."""

    def __init__(self, recompute: bool):
        super().__init__()
        with torch.device("meta"):
            self.linear1 = nn.Linear(640, 2048)
            self.linear2 = nn.Linear(2048, 64)
        self.register_buffer("inv_freq", torch.empty(4, device="meta"), persistent=False)
        self.recompute = recompute

    def init_non_persistent(self, device):
        if self.recompute:
            self.inv_freq = torch.arange(4.0, device=device)


def test_non_persistent_buffers(tiny_ckpt: Path):
    md = ModelDir(tiny_ckpt)
    m = md.load_module(_Projector(recompute=True), PREFIX_PROJECTOR)
    assert torch.equal(m.inv_freq, torch.arange(4.0))
    assert not m.linear1.weight.is_meta
    with pytest.raises(CheckpointError, match="inv_freq"):
        md.load_module(_Projector(recompute=False), PREFIX_PROJECTOR)


@pytest.mark.parametrize("cut", [0, 5, "half"])
def test_a_shard_cut_short_is_named(ckpt_copy: Path, cut):
    """An interrupted download: empty, a few bytes, or half a shard. One CheckpointError naming the file."""
    shard = sorted(ckpt_copy.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 if cut == "half" else cut])
    with pytest.raises(CheckpointError, match=f"cannot read {shard}: .*fetch this file again"):
        ModelDir(ckpt_copy)


def test_generation_settings_the_engine_does_not_apply_are_named(ckpt_copy: Path):
    """Qwen2.5-Instruct's generation_config.json asks for a repetition penalty (applied by transformers even to
    greedy decoding) and top_k 20 (the official sampling server's): the thinker stage warns that it does neither."""
    assert ModelDir(ckpt_copy).ignored_generation_settings() == {}
    gen = json.loads((ckpt_copy / "generation_config.json").read_text())
    gen.update(repetition_penalty=1.05, top_k=20, top_p=0.8, temperature=0.7, do_sample=True)
    (ckpt_copy / "generation_config.json").write_text(json.dumps(gen))
    assert ModelDir(ckpt_copy).ignored_generation_settings() == {"repetition_penalty": 1.05, "top_k": 20}
