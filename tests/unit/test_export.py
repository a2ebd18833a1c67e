"""`fsl-edge export`: each format, loaded the way a user loads it, gives the logits of the
federation's own split forward, on tiny Llama and GPT-2 runs; bad input is one clear error."""

import json

import pytest
import torch

from fsl_edge.cli.app import main
from fsl_edge.config import (LearningSettings, LoraSettings, PrefixSettings, SplitMode,
                             SplitSettings, TrainSettings)
from fsl_edge.errors import ConfigError, ModelError
from fsl_edge.evaluate import load_result, split_logits, split_parts
from fsl_edge.export import FORMATS, MANIFEST, export
from fsl_edge.icd10_data import build_icd10
from fsl_edge.runs import run_simulation
from fsl_edge.tiny import tiny_model, tiny_tokenizer

SETTINGS = LearningSettings(lora=LoraSettings(rank=2, alpha=4),
                            train=TrainSettings(lr=1e-2, batch_size=4, max_len=32, rounds=1,
                                                steps=3, seed=0))
# fp32: the same computation in another order or with merged weights, not another model
ATOL = 1e-4
# peft calls a transformers API that transformers 5 deprecates when it loads an adapter
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    build_icd10(folder, per_site=16, heldout=4)
    return folder


def trained_run(folder, data, family, settings=SETTINGS):
    run_simulation(f"tiny-random-{family}", data, folder, settings)
    return folder


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def exported(request, tmp_path_factory, data):
    """A short simulate run of one family, exported in every format."""
    family = request.param
    run = trained_run(tmp_path_factory.mktemp(f"run-{family}"), data, family)
    out = tmp_path_factory.mktemp(f"export-{family}") / "out"
    outcome = export(run, out)
    return family, run, out, outcome


def inputs(vocab: int = 256):
    """Real text of two lengths, right-padded, plus a third row: another shape than the probe."""
    tok = tiny_tokenizer()
    texts = ["ICD-10-CM I21.4: Non-ST elevation myocardial infarction", "ICD-10-CM C50:",
             "a third, longer row of text to make the batch three rows wide and 40+ long"]
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def reference(family, run, ids, mask, settings=SETTINGS):
    site, server = split_parts(tiny_model(family), settings, *load_result(run))
    return split_logits(site, server, ids, mask)


def close(a, b, mask):
    diff = (a - b).abs()[mask.bool()].max().item()
    assert diff <= ATOL, diff
    return diff


def test_the_adapter_changes_the_model(exported):
    """Otherwise every equivalence below would hold for an empty export too."""
    family, run, _, _ = exported
    ids, mask = inputs()
    with torch.no_grad():
        base = tiny_model(family)(input_ids=ids, attention_mask=mask).logits
    assert (reference(family, run, ids, mask) - base).abs()[mask.bool()].max() > 1e-3


def test_the_peft_adapter_loads_on_the_base_model_and_gives_the_split_logits(exported):
    from peft import PeftModel

    family, run, out, _ = exported
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == f"tiny-random-{family}"
    assert (out / "peft" / "adapter_model.safetensors").is_file()
    lm = PeftModel.from_pretrained(tiny_model(family), out / "peft").eval()
    ids, mask = inputs()
    with torch.no_grad():
        close(lm(input_ids=ids, attention_mask=mask).logits, reference(family, run, ids, mask), mask)


def test_the_merged_model_is_a_plain_hugging_face_folder_with_the_split_logits(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family, run, out, _ = exported
    assert (out / "merged" / "model.safetensors").is_file()
    lm = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert not any("lora" in name for name, _ in lm.named_parameters())
    assert AutoTokenizer.from_pretrained(out / "merged").eos_token == tiny_tokenizer().eos_token
    ids, mask = inputs()
    with torch.no_grad():
        close(lm(input_ids=ids, attention_mask=mask).logits, reference(family, run, ids, mask), mask)


def test_the_onnx_model_runs_in_onnx_runtime_with_the_split_logits(exported):
    import onnxruntime as ort

    family, run, out, _ = exported
    session = ort.InferenceSession(str(out / "onnx" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert (out / "onnx" / "tokenizer.json").is_file()
    ids, mask = inputs()  # batch 3 and a length the export never saw: both axes are dynamic
    (logits,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    close(torch.from_numpy(logits), reference(family, run, ids, mask), mask)


def test_the_manifest_records_the_checks(exported):
    _, run, out, outcome = exported
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["checkpoint"] == str(run)
    assert set(manifest["check"]["max_abs_diff"]) == set(FORMATS) == set(outcome.max_diff)
    assert manifest["formats"] == {f: f for f in FORMATS}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_one_format_is_written_as_the_folder_itself(tmp_path, data):
    from peft import PeftModel

    run = trained_run(tmp_path / "run", data, "llama")
    outcome = export(run, tmp_path / "adapter", ("peft",))
    assert outcome.folders == {"peft": tmp_path / "adapter"}
    PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter")


@pytest.mark.parametrize("variant", [
    {"split": SplitSettings(mode=SplitMode.VANILLA)},  # the server holds [a, L) and the head
    {"split": SplitSettings(front=2), "prefix": PrefixSettings(frozen=1)},  # block 0 has no LoRA
])
def test_other_splits_export_the_blocks_their_parties_trained(tmp_path, data, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    settings = SETTINGS.model_copy(update=variant)
    run = trained_run(tmp_path / "run", data, "llama", settings)
    export(run, tmp_path / "out", ("peft", "merged"))
    ids, mask = inputs()
    want = reference("llama", run, ids, mask, settings)
    with torch.no_grad():
        peft = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "out" / "peft").eval()
        close(peft(input_ids=ids, attention_mask=mask).logits, want, mask)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged").eval()
        close(merged(input_ids=ids, attention_mask=mask).logits, want, mask)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, data):
    return trained_run(tmp_path_factory.mktemp("run"), data, "llama")


def test_a_missing_checkpoint_is_a_config_error(tmp_path, capsys):
    code = main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == ConfigError.exit_code
    assert err.startswith("error: no checkpoint at ") and "Traceback" not in err


def test_a_folder_that_is_not_a_checkpoint_says_what_it_expected(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["export", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert code == ConfigError.exit_code
    assert "is not a checkpoint: expected LATEST" in capsys.readouterr().err


def test_a_base_model_that_is_not_here_is_a_model_error(tmp_path, run_folder, capsys):
    code = main(["export", str(run_folder), "--out", str(tmp_path / "out"),
                 "--model", str(tmp_path / "elsewhere")])
    err = capsys.readouterr().err
    assert code == ModelError.exit_code
    assert "base model" in err and "is not available here" in err and "--model" in err
    assert not (tmp_path / "out").exists()


def test_a_non_empty_out_is_kept_unless_forced(tmp_path, run_folder, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["export", str(run_folder), "--out", str(out), "--format", "peft"])
    assert code == ConfigError.exit_code and "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["export", str(run_folder), "--out", str(out), "--format", "peft", "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "adapter_config.json").is_file()
    assert "max |logit diff|" in capsys.readouterr().out


def test_an_unknown_format_is_a_config_error(tmp_path, run_folder, capsys):
    code = main(["export", str(run_folder), "--out", str(tmp_path / "o"), "--format", "gguf"])
    assert code == ConfigError.exit_code and "peft, merged, onnx or all" in capsys.readouterr().err


def test_an_export_that_fails_its_check_leaves_nothing(tmp_path, run_folder, monkeypatch):
    from fsl_edge import export as export_module

    monkeypatch.setitem(export_module.TOLERANCE, "merged", -1.0)
    with pytest.raises(ModelError, match="merged export differs"):
        export(run_folder, tmp_path / "out", ("merged",))
    assert list(tmp_path.iterdir()) == []
