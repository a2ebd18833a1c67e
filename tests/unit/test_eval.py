"""`fsl-edge eval`: a trained result scores a lower held-out loss than its base model, per site
and over all; exact match follows its stated rule; a coordinator's checkpoint folder is read
safely while it is being written."""

import copy
import json
import threading

import pytest
import torch

from fsl_edge.cli.app import main
from fsl_edge.config import LearningSettings, LoraSettings, TrainSettings
from fsl_edge.coordinator import checkpoint
from fsl_edge.data import Sample
from fsl_edge.errors import ConfigError
from fsl_edge.exact_match import exact_matches, is_exact_match
from fsl_edge.icd10_data import DEFAULT_CHAPTERS, build_icd10
from fsl_edge.quality import evaluate_result, greedy
from fsl_edge.result import read_result
from fsl_edge.runs import run_simulation
from fsl_edge.step import ServerPart
from fsl_edge.tiny import tiny_model, tiny_tokenizer

MODEL = "tiny-random-llama"
SETTINGS = LearningSettings(lora=LoraSettings(rank=4, alpha=8),
                            train=TrainSettings(lr=1e-2, batch_size=4, max_len=48, rounds=2,
                                                steps=6, seed=0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short simulate run on real ICD-10 files: (run folder, data folder)."""
    data = tmp_path_factory.mktemp("data")
    build_icd10(data, per_site=40, heldout=6)
    run = tmp_path_factory.mktemp("run")
    run_simulation(MODEL, data, run, SETTINGS)
    return run, data


def test_the_trained_model_has_a_lower_held_out_loss_than_the_base(trained):
    run, _ = trained
    scored = evaluate_result(read_result(run), exact_match=False)  # data: what the run recorded
    assert [s.name for s in scored.sites] == sorted(DEFAULT_CHAPTERS)
    for row in [*scored.sites, scored.overall]:
        assert row.tuned.loss < row.base.loss - 0.05, row.name
        assert row.tuned.perplexity == pytest.approx(torch.tensor(row.tuned.loss).exp().item())
        assert row.base.exact_match is None  # not asked for
    assert scored.overall.samples == 3 * 6
    assert scored.overall.tokens == sum(s.tokens for s in scored.sites)
    # over all is token-weighted, so it lies between the sites' losses
    losses = [s.tuned.loss for s in scored.sites]
    assert min(losses) <= scored.overall.tuned.loss <= max(losses)


class Tokenizer:
    """Whitespace tokens; decode joins them with spaces: enough to state the rule on."""

    def __init__(self):
        self.vocab: list[str] = []

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        ids = []
        for word in text.split():
            if word not in self.vocab:
                self.vocab.append(word)
            ids.append(self.vocab.index(word))
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=True):
        return " " + " ".join(self.vocab[i] for i in ids) + " \n"  # whitespace at both ends


def test_exact_match_is_equality_after_stripping_whitespace():
    assert is_exact_match("  Acute bronchitis \n", " Acute bronchitis")
    assert not is_exact_match("Acute bronchitis, unspecified", " Acute bronchitis")
    assert not is_exact_match("acute bronchitis", "Acute bronchitis")
    assert not is_exact_match("Acute  bronchitis", "Acute bronchitis")  # inner spaces count


def test_exact_match_on_a_hand_made_case():
    tok = Tokenizer()
    samples = [Sample("Q1:", " red apple"), Sample("Q2:", " green"), Sample("Q3:", " blue sky"),
               Sample("", "plain text is not a prompt/completion sample")]
    answers = {"Q1:": "red apple", "Q2:": "green tea", "Q3:": "blue"}
    asked = []

    def generate(prompt, max_new):
        asked.append((tok.vocab[prompt[0]], max_new))
        return tok(answers[tok.vocab[prompt[0]]], add_special_tokens=False)["input_ids"]

    assert exact_matches(generate, tok, samples) == (1, 3)  # Q1 only; the plain one is skipped
    assert asked == [("Q1:", 3), ("Q2:", 2), ("Q3:", 3)]  # the reference's tokens + 1


def test_greedy_decoding_is_what_generate_gives_without_sampling():
    lm = tiny_model("gpt2")
    prompt = tiny_tokenizer()("xyz", add_special_tokens=False)["input_ids"]
    mine = greedy(lm, eos_id=None)(prompt, 12)
    ids = torch.tensor([prompt])
    theirs = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                         min_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(prompt):]
    assert mine == theirs.tolist()
    # the random model repeats itself; its first new token past the start plays the eos
    stop = next(i for i, t in enumerate(mine) if t != mine[0])
    assert greedy(lm, eos_id=mine[stop])(prompt, 12) == mine[:stop]  # stops before the eos


def test_the_cli_prints_a_table_and_json_with_exact_match(trained, capsys):
    run, data = trained
    assert main(["eval", str(run), "--data", str(data), "--samples", "2",
                 "--sites", "injury,neoplasms", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in doc["sites"]] == ["injury", "neoplasms"]
    assert doc["overall"]["samples"] == 4 and "greedily" in doc["exact_match_rule"]
    for row in [*doc["sites"], doc["overall"]]:
        for which in ("base", "tuned"):
            assert 0.0 <= row[which]["exact_match"] <= 1.0
    assert main(["eval", str(run), "--samples", "2", "--no-exact-match"]) == 0
    out = capsys.readouterr().out
    assert "circulatory" in out and "all" in out and "EM" not in out


class Coordinator:
    """Writes checkpoints as a coordinator does after each round, from a simulate run's adapters
    shifted by the round number, so a reader can tell which round each tensor came from."""

    def __init__(self, folder, run):
        self.folder, self.result = folder, read_result(run)
        self.trunk = ServerPart(tiny_model("llama"), SETTINGS.split.cut(6), SETTINGS.lora,
                                SETTINGS.train.lr)

    def save(self, round_):
        self.trunk.load_adapter({k: v + round_ for k, v in self.result.server_adapter.items()})
        checkpoint.save(self.folder, round_,
                        {k: v + round_ for k, v in self.result.site_adapter.items()}, self.trunk,
                        {"fingerprint": {"model": MODEL, "training": SETTINGS.model_dump(mode="json")}})


def test_a_checkpoint_folder_is_read_whole_while_a_coordinator_writes_it(trained, tmp_path):
    run, _ = trained
    original = read_result(run)
    folder = tmp_path / "checkpoints"
    writer = Coordinator(folder, run)
    writer.save(1)
    stop, written = threading.Event(), [1]

    def coordinator():  # a new round every few ms; older round folders are pruned
        while not stop.is_set():
            writer.save(written[-1] + 1)
            written.append(written[-1] + 1)

    thread = threading.Thread(target=coordinator)
    thread.start()
    seen = set()
    try:
        while len(seen) < 10 or written[-1] < 20:
            result = read_result(folder)
            seen.add(result.round)
            # the site and trunk adapters and the state all come from the same round
            for got, want in ((result.site_adapter, original.site_adapter),
                              (result.server_adapter, original.server_adapter)):
                key = next(iter(want))
                assert torch.equal(got[key], want[key] + result.round), result.round
            assert result.model == MODEL and result.settings == SETTINGS
    finally:
        stop.set()
        thread.join()


def test_a_checkpoint_without_a_data_folder_asks_for_one(trained, tmp_path, capsys):
    run, data = trained
    Coordinator(tmp_path / "ck", run).save(1)
    assert main(["eval", str(tmp_path / "ck")]) == ConfigError.exit_code
    assert "pass --data" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "ck"), "--data", str(data), "--samples", "1",
                 "--no-exact-match", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["round"] == 1
    assert read_result(tmp_path / "ck" / "round-000001").round == 1  # a round folder alone


def test_eval_needs_exactly_one_source(tmp_path, capsys):
    assert main(["eval"]) == ConfigError.exit_code
    assert main(["eval", str(tmp_path), "--url", "http://127.0.0.1:9"]) == ConfigError.exit_code
    assert "one of them" in capsys.readouterr().err


@pytest.mark.integration
def test_eval_reads_a_running_coordinators_latest_checkpoint_through_its_status_api(
        trained, tmp_path, capsys):
    from fsl_edge.coordinator.status_http import StatusServer
    from fsl_edge.status import Status

    run, data = trained
    folder = tmp_path / "checkpoints"
    status = Status(run="r", state="training", round=3)
    with StatusServer(lambda: copy.deepcopy(status), lambda: True) as server:
        assert main(["eval", "--url", server.url, "--data", str(data)]) == ConfigError.exit_code
        assert "no checkpoint yet" in capsys.readouterr().err
        Coordinator(folder, run).save(2)
        status.checkpoint = str(folder)
        assert main(["eval", "--url", server.url, "--data", str(data), "--samples", "1",
                     "--no-exact-match", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["round"] == 2
