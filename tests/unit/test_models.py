"""Models from local files only: HF folders, the models cache, and the bundled SmolLM2."""

import os

import pytest
import torch

from fsl_edge.errors import ConfigError
from fsl_edge.models import ModelSettings, list_cached, load, pull, resolve
from fsl_edge.split import check_parity, discover
from fsl_edge.tiny import tiny_model, tiny_tokenizer


def save_tiny(folder, family: str = "llama"):
    """A tiny model and its tokenizer as a normal HF folder, as `pull` writes one."""
    model = tiny_model(family)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


def ids_and_mask():
    ids = torch.tensor([[5, 70, 200, 31, 9, 1], [44, 3, 256, 257, 257, 257]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_saved_folder_loads_with_identical_logits(tmp_path, family):
    original = save_tiny(tmp_path / "m", family)
    loaded = load(str(tmp_path / "m"), settings=ModelSettings(models_dir=tmp_path / "cache"))

    assert loaded.source.kind == "folder" and loaded.source.path == tmp_path / "m"
    assert type(loaded.model) is type(original)
    assert not loaded.model.training
    ids, mask = ids_and_mask()
    with torch.no_grad():
        expected = original(input_ids=ids, attention_mask=mask).logits
        got = loaded.model(input_ids=ids, attention_mask=mask).logits
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)
    assert loaded.tokenizer("hello")["input_ids"] == tiny_tokenizer()("hello")["input_ids"]


def test_a_folder_loads_in_the_dtype_asked_for(tmp_path):
    save_tiny(tmp_path / "m")
    loaded = load(str(tmp_path / "m"), dtype="bfloat16",
                  settings=ModelSettings(models_dir=tmp_path / "cache"))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_list_cached_shows_model_folders_and_hides_half_written_pulls(tmp_path):
    cache = tmp_path / "models"
    save_tiny(cache / "my-llama", "llama")
    save_tiny(cache / "my-gpt2", "gpt2")
    save_tiny(cache / ".smollm2-k2j3h4")  # a pull interrupted before its rename
    (cache / "empty-folder").mkdir()
    (cache / "stray.txt").write_text("not a model")

    cached = list_cached(ModelSettings(models_dir=cache))

    assert [m.name for m in cached] == ["my-gpt2", "my-llama"]
    by_name = {m.name: m for m in cached}
    assert by_name["my-llama"].architecture == "LlamaForCausalLM"
    assert by_name["my-gpt2"].architecture == "GPT2LMHeadModel"
    assert by_name["my-llama"].path == cache / "my-llama"
    assert by_name["my-llama"].dtype == "float32"
    weights = (cache / "my-llama" / "model.safetensors").stat().st_size
    assert by_name["my-llama"].size_bytes > weights > 0


def test_list_cached_of_a_cache_that_does_not_exist_is_empty(tmp_path):
    assert list_cached(ModelSettings(models_dir=tmp_path / "never-made")) == []


def test_the_models_cache_is_set_by_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FSL_MODELS_DIR", str(tmp_path / "from-env"))
    assert ModelSettings().models_dir == tmp_path / "from-env"


def test_resolve_prefers_a_pulled_folder_over_the_bundled_gguf(tmp_path):
    settings = ModelSettings(models_dir=tmp_path)
    before = resolve("smollm2", settings)
    assert before.kind == "gguf" and before.path.name.endswith(".gguf") and before.path.is_file()

    save_tiny(tmp_path / "smollm2")  # stands in for a pulled SmolLM2: only the layout matters
    after = resolve("smollm2", settings)
    assert (after.kind, after.path) == ("folder", tmp_path / "smollm2")
    assert "folder" in after.describe() and str(tmp_path / "smollm2") in after.describe()


def test_resolve_ignores_a_half_written_cached_folder(tmp_path):
    (tmp_path / "smollm2").mkdir()  # no config.json: not a complete model
    assert resolve("smollm2", ModelSettings(models_dir=tmp_path)).kind == "gguf"


def test_any_model_in_the_cache_resolves_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so the name is not also a folder under the working directory
    cache = tmp_path / "cache"
    save_tiny(cache / "my-model")
    source = resolve("my-model", ModelSettings(models_dir=cache))
    assert (source.kind, source.path) == ("folder", cache / "my-model")


def test_pull_does_nothing_when_the_model_is_cached(tmp_path):
    settings = ModelSettings(models_dir=tmp_path)
    save_tiny(tmp_path / "smollm2")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "smollm2").iterdir()}
    assert pull("smollm2", settings=settings) == tmp_path / "smollm2"
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "smollm2").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]


def test_pull_of_an_unknown_name(tmp_path):
    with pytest.raises(ConfigError, match="unknown bundled model 'llama3'; choose one of smollm2"):
        pull("llama3", settings=ModelSettings(models_dir=tmp_path))


@pytest.mark.slow
def test_pull_smollm2_materialises_a_loadable_splittable_folder(tmp_path):
    """The real thing: dequantise the bundled GGUF once into an HF folder (~30 s)."""
    settings = ModelSettings(models_dir=tmp_path)
    folder = pull("smollm2", settings=settings)

    assert folder == tmp_path / "smollm2"
    assert (folder / "config.json").is_file() and (folder / "fsl-edge.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]  # no temp folder left
    assert [m.name for m in list_cached(settings)] == ["smollm2"]

    loaded = load("smollm2", settings=settings)
    assert loaded.source.kind == "folder"
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert not getattr(loaded.model, "is_quantized", False)
    parts = discover(loaded.model)
    assert parts.n_blocks == 30
    assert parts.hidden_size == 576
    assert check_parity(parts, (2, 29)) <= 1e-3
    assert loaded.tokenizer.eos_token_id is not None

    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    folder_mtime = os.stat(folder).st_mtime_ns
    assert pull("smollm2", settings=settings) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    assert os.stat(folder).st_mtime_ns == folder_mtime
