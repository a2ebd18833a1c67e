"""Bad input gets one clear error naming the problem, of the taxonomy's type (never a traceback
from deep inside torch or transformers)."""

import re
import struct

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BertConfig,
    T5Config,
)

from fsl_edge.config import LoraSettings, RuntimeSettings, SplitMode, SplitSettings
from fsl_edge.errors import ConfigError, DataError, ModelError, SplitError, UnsupportedModelError
from fsl_edge.lora import check_quantize
from fsl_edge.models import ModelSettings, load, resolve
from fsl_edge.sites import load_sites, site_files
from fsl_edge.split import check_parity, discover
from fsl_edge.tiny import tiny_model, tiny_tokenizer


def named(path) -> str:
    """A regex matching `path` literally: the message must name the exact file."""
    return re.escape(str(path))


@pytest.fixture
def settings(tmp_path) -> ModelSettings:
    """An empty models cache, so nothing on this machine can satisfy a lookup by accident."""
    return ModelSettings(models_dir=tmp_path / "models")


# --- models the split cannot cut ---------------------------------------------------------------

def test_a_plain_torch_module_is_not_supported():
    with pytest.raises(UnsupportedModelError, match=r"Sequential is not supported: .*decoder-only "
                                                    r"causal LM with a Hugging Face config"):
        discover(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10)))


def test_an_encoder_decoder_is_not_supported():
    t5 = AutoModelForSeq2SeqLM.from_config(
        T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2))
    with pytest.raises(UnsupportedModelError, match="T5ForConditionalGeneration is not supported: "
                                                    "the split needs a decoder-only"):
        discover(t5)


def test_a_causal_lm_whose_decoder_has_no_block_list_is_not_supported():
    # BERT as a causal LM keeps its blocks one level down (bert.encoder.layer)
    bert = AutoModelForCausalLM.from_config(BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, is_decoder=True))
    with pytest.raises(UnsupportedModelError, match=r"BertLMHeadModel is not supported: no "
                       r"recognisable block list \(expected one ModuleList of 2 blocks in "
                       r"BertModel, found 0\)"):
        discover(bert)


def test_a_block_list_of_the_wrong_length_is_not_taken_for_the_blocks():
    model = tiny_model("llama")
    model.config.num_hidden_layers = 5  # the config no longer describes the model
    with pytest.raises(UnsupportedModelError,
                       match="no recognisable block list.*5 blocks in LlamaModel"):
        discover(model)


def test_a_decoder_with_parts_the_split_cannot_place_is_not_supported():
    opt = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "opt", vocab_size=64, hidden_size=32, ffn_dim=64, word_embed_proj_dim=16,
        num_hidden_layers=2, num_attention_heads=4))
    with pytest.raises(UnsupportedModelError, match="OPTForCausalLM is not supported: the split "
                                                    "does not know where to run project_out"):
        discover(opt)


def _falcon():
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "falcon", vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4)).eval()


def _gemma3():
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gemma3_text", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)).eval()


@pytest.mark.parametrize("build", [_falcon, _gemma3], ids=["falcon", "gemma3"])
def test_an_architecture_whose_blocks_take_other_arguments_is_not_supported(build):
    with pytest.raises(UnsupportedModelError, match="is not supported"):
        check_parity(discover(build()), (1, 3))


# --- cuts that do not fit ----------------------------------------------------------------------

@pytest.mark.parametrize("split, match", [
    (SplitSettings(front=7), r"cut \(7, 5\) is outside a model of 6 blocks"),
    (SplitSettings(mode=SplitMode.VANILLA, front=9), r"cut \(9, 6\) is outside a model of 6"),
    (SplitSettings(front=3, back=3), r"cut \(3, 3\) leaves the server no blocks \(the model has 6"),
    (SplitSettings(front=4, back=3), r"cut \(4, 3\) leaves the server no blocks"),
    (SplitSettings(front=6, back=1), r"cut \(6, 5\) leaves the server no blocks"),
    (SplitSettings(mode=SplitMode.VANILLA, front=6), r"cut \(6, 6\) leaves the server no blocks"),
    (SplitSettings(back=0), r"u-shape cut b=6 leaves the site no back block \(the model has 6\)"),
    (SplitSettings(front=0), r"cut a=0 leaves the site no front block.*reveal the token ids"),
    (SplitSettings(mode=SplitMode.VANILLA, front=0), r"cut a=0 leaves the site no front block"),
    (SplitSettings(mode=SplitMode.VANILLA, back=1), "vanilla mode has no site-side back blocks"),
])
def test_a_cut_that_does_not_fit_the_model_is_refused(split, match):
    with pytest.raises(SplitError, match=match):
        split.cut(6)


def test_the_default_cut_of_a_one_block_model_is_refused():
    with pytest.raises(SplitError, match="leaves the server no blocks"):
        SplitSettings().cut(1)


def test_a_split_error_is_a_model_error():
    """The CLI maps the taxonomy to exit codes: a cut that does not fit is about the model."""
    with pytest.raises(ModelError):
        SplitSettings(front=0).cut(6)


# --- models that are not there -----------------------------------------------------------------

def test_a_gguf_file_that_does_not_exist(settings, tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(ModelError, match=f"GGUF file not found: {named(missing)}"):
        resolve(str(missing), settings)
    with pytest.raises(ModelError, match="GGUF file not found"):
        load(str(missing), settings=settings)


def test_a_folder_that_does_not_exist(settings, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match=f"model not found: '{named(missing)}' is not a bundled"):
        load(str(missing), settings=settings)


def test_a_folder_without_config_json(settings, tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match=f"{named(folder)} is a folder but not a Hugging Face "
                                         "model: it has no config.json"):
        load(str(folder), settings=settings)


def test_a_folder_with_a_broken_config_json(settings, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=f"could not load {named(folder)}.*not a valid JSON"):
        load(str(folder), settings=settings)


def test_a_file_that_is_not_gguf(settings, tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_text("this is plain text, not a GGUF model file, padded to be long enough")
    with pytest.raises(ModelError, match="could not load .*fake.gguf.*GGUF magic"):
        load(str(fake), settings=settings)


def test_a_truncated_gguf_file(settings, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\0" * 4)  # header cut mid-field
    with pytest.raises(ModelError, match="could not load"):
        load(str(truncated), settings=settings)


def test_an_unknown_tiny_model(settings):
    with pytest.raises(ModelError, match=r"unknown tiny model 'tiny-random-bert'; choose one of "
                                         r"tiny-random-llama, .*tiny-random-gpt2"):
        load("tiny-random-bert", settings=settings)


def test_an_unknown_dtype(settings):
    with pytest.raises(ConfigError, match="unknown dtype 'float8'; choose one of float32"):
        load("tiny-random-llama", dtype="float8", settings=settings)


# --- QLoRA without CUDA ------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: QLoRA is allowed here")
def test_qlora_without_cuda():
    with pytest.raises(ConfigError, match=r"QLoRA \(quantize='4bit'\) needs a CUDA GPU and none "
                                          r"is visible here"):
        check_quantize(LoraSettings(quantize="4bit"))


def test_full_precision_lora_needs_no_cuda():
    check_quantize(LoraSettings())  # must not raise


def test_an_unknown_quantisation_is_refused_by_the_settings():
    with pytest.raises(ValueError, match="quantize must be '4bit' or unset, not '8bit'"):
        LoraSettings(quantize="8bit")


@pytest.mark.parametrize("field", ["resend_s", "heartbeat_s"])
def test_timing_that_cannot_beat_the_offline_grace_is_refused(field):
    # resent only after the coordinator gave up: every lost packet would cost a round
    with pytest.raises(ValueError, match=f"{field} \\(8.0\\) must be shorter than offline_after_s \\(8.0\\)"):
        RuntimeSettings(offline_after_s=8.0, **{field: 8.0})


# --- data folders ------------------------------------------------------------------------------

def test_a_data_folder_without_site_files(tmp_path):
    (tmp_path / "heldout-a.jsonl").write_text('{"text": "x"}\n')  # held-out alone is no site
    (tmp_path / "site-b.csv").write_text("x\n")  # nor an unsupported format
    with pytest.raises(DataError, match=f"{named(tmp_path)} has no site files: expected site-"):
        site_files(tmp_path)


def test_a_data_folder_that_does_not_exist(tmp_path):
    with pytest.raises(DataError, match=f"data folder not found: {named(tmp_path / 'nope')}"):
        site_files(tmp_path / "nope")


def test_an_empty_site_file_names_the_file(tmp_path):
    (tmp_path / "site-a.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=f"{named(tmp_path / 'site-a.jsonl')}: empty"):
        load_sites(tmp_path, tiny_tokenizer(), max_len=16)


def test_a_malformed_site_file_names_the_file_and_line(tmp_path):
    (tmp_path / "site-a.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=f"{named(tmp_path / 'site-a.jsonl')}:2: malformed JSON"):
        load_sites(tmp_path, tiny_tokenizer(), max_len=16)


def test_an_unknown_site_name(tmp_path):
    (tmp_path / "site-a.jsonl").write_text('{"text": "fine"}\n')
    with pytest.raises(DataError, match="no site 'b' in .*; it has a"):
        load_sites(tmp_path, tiny_tokenizer(), max_len=16, names=["b"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_or_qlora_without_a_gpu(settings):
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        load("tiny-random-llama", settings=settings, device="cuda")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        load("smollm2", settings=settings, quantize="4bit")


def test_an_unknown_device(settings):
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        load("tiny-random-llama", settings=settings, device="tpu")


def test_broker_urls_and_logins_are_checked(tmp_path):
    from fsl_edge.transport import BrokerLogin, parse_broker_url

    assert parse_broker_url("mqtt://h") == ("h", 1883)
    assert parse_broker_url("mqtts://h") == ("h", 8883)
    assert parse_broker_url("mqtts://h:9000") == ("h", 9000)
    for bad in ("http://h:1883", "mqtt://", "mqtt://h:99999"):
        with pytest.raises(ConfigError, match="broker URL"):
            parse_broker_url(bad)
    with pytest.raises(ConfigError, match="FSL_MQTT_USERNAME is not"):
        BrokerLogin.from_env({"FSL_MQTT_PASSWORD": "x"})
    with pytest.raises(ConfigError, match="is not a file"):
        BrokerLogin.from_env({"FSL_MQTT_CA_FILE": str(tmp_path / "none.crt")})
    login = BrokerLogin.from_env({"FSL_MQTT_USERNAME": "a", "FSL_MQTT_PASSWORD": "secret"})
    assert login.username == "a" and "secret" not in repr(login)
    (tmp_path / "c.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="go together"):
        BrokerLogin.from_env({"FSL_MQTT_CERT_FILE": str(tmp_path / "c.pem")})
    with pytest.raises(ConfigError, match="FSL_MQTT_KEY_FILE .* is not a file"):
        BrokerLogin.from_env({"FSL_MQTT_CERT_FILE": str(tmp_path / "c.pem"),
                              "FSL_MQTT_KEY_FILE": str(tmp_path / "none.key")})
    pair = BrokerLogin.from_env({"FSL_MQTT_CERT_FILE": str(tmp_path / "c.pem"),
                                 "FSL_MQTT_KEY_FILE": str(tmp_path / "c.pem")})
    from fsl_edge.transport import MqttLink

    with pytest.raises(ConfigError, match="needs TLS"):
        MqttLink("mqtt://127.0.0.1:1883", "x", [], login=pair)
    with pytest.raises(ConfigError, match="cannot load the TLS files"):
        MqttLink("mqtts://127.0.0.1:8883", "x", [], login=pair)
