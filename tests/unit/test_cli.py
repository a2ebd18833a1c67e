"""The `fsl-edge` command through its entry point: output, and errors as one line + exit code."""

import pytest

from fsl_edge.cli.app import main
from fsl_edge.errors import ConfigError, DataError, ModelError


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """An empty models cache and a plain 80-column, non-terminal console, whatever the shell."""
    monkeypatch.setenv("FSL_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.chdir(tmp_path)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_models_list_with_an_empty_cache_says_how_to_fill_it(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "no models cached yet" in out and "fsl-edge models pull smollm2" in out


def test_models_list_shows_a_cached_model(tmp_path, capsys):
    from fsl_edge.tiny import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "models" / "my-llama")
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "my-llama" in out and "LlamaForCausalLM" in out and "no models cached" not in out


def test_simulate_a_tiny_model_end_to_end(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code = main(["simulate", "--model", "tiny-random-llama", "--rounds", "1", "--steps", "2",
                 "--out", str(out_dir)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "held-out loss" in captured.out
    assert "round 1: held-out loss" in captured.out
    assert (out_dir / "metrics.json").is_file()
    assert (out_dir / "site_adapter.safetensors").is_file()
    assert (out_dir / "data" / "manifest.json").is_file()  # the demo data it built


def test_a_missing_data_folder_is_one_error_naming_it(tmp_path, capsys):
    missing = tmp_path / "no-data"
    code = main(["simulate", "--model", "tiny-random-llama", "--data", str(missing),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == DataError.exit_code == 4
    assert err.startswith("error: ")
    assert str(missing) in err.replace("\n", "")
    assert "Traceback" not in err


def test_a_long_error_stays_on_one_line(tmp_path, capsys):
    missing = tmp_path / ("a-data-folder-with-a-long-name-" * 3)
    main(["simulate", "--model", "tiny-random-llama", "--data", str(missing),
          "--out", str(tmp_path / "run")])
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]


def test_an_error_prints_brackets_in_a_path_verbatim(tmp_path, capsys):
    missing = tmp_path / "[x]data"
    main(["simulate", "--model", "tiny-random-llama", "--data", str(missing),
          "--out", str(tmp_path / "run")])
    assert str(missing) in capsys.readouterr().err.replace("\n", "")


def test_a_gguf_that_does_not_exist_exits_with_the_model_error_code(tmp_path, capsys):
    code = main(["simulate", "--model", "/nonexistent.gguf", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == ModelError.exit_code == 3
    assert error_lines(err) == ["error: GGUF file not found: /nonexistent.gguf"]


def test_an_unknown_chapter_exits_with_the_config_error_code(tmp_path, capsys):
    code = main(["data", "icd10", "--chapters", "nope", "--out", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert code == ConfigError.exit_code == 2
    assert err.startswith("error: unknown ICD-10-CM chapter(s) 'nope'")
    assert not (tmp_path / "data" / "manifest.json").exists()


def test_a_cut_that_does_not_fit_exits_with_the_model_error_code(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["data", "icd10", "--chapters", "circulatory", "--per-site", "8", "--heldout", "2",
                 "--out", str(data)]) == 0
    assert (data / "site-circulatory.jsonl").is_file()
    capsys.readouterr()
    code = main(["simulate", "--model", "tiny-random-llama", "--front", "9", "--data", str(data),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == ModelError.exit_code == 3
    assert error_lines(err) == ["error: cut (9, 5) is outside a model of 6 blocks"]


def test_an_out_of_range_option_exits_with_the_config_error_code(tmp_path, capsys):
    try:
        code = main(["simulate", "--model", "tiny-random-llama", "--rank", "0",
                     "--out", str(tmp_path / "run")])
    except Exception as e:  # what it does now: the exception escapes main()
        pytest.fail(f"main() raised {type(e).__name__}")
    assert code == ConfigError.exit_code
    assert capsys.readouterr().err.startswith("error: ")


def test_an_unknown_option_is_a_usage_error(capsys):
    assert main(["simulate", "--no-such-option"]) == 2
    assert "No such option" in capsys.readouterr().err


def test_simulate_with_a_cached_prefix_keys_and_layer_selection(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code = main(["simulate", "--model", "tiny-random-llama", "--rounds", "2", "--steps", "2",
                 "--frozen-prefix", "2", "--send-keys", "--layers", "topk-gradnorm",
                 "--out", str(out_dir)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert list((out_dir / "cache").glob("*/*/*.act")), "the sites' prefix caches are under the run"


@pytest.mark.parametrize("argv, code, message", [
    (["--frozen-prefix", "3"], ModelError.exit_code,
     "error: prefix.frozen=3 is more than the site's 2 front blocks (the cut a)"),
    (["--frozen-prefix", "1", "--send-keys"], ModelError.exit_code,
     "error: prefix.send_keys needs prefix.frozen = the cut a (2)"),
    (["--send-keys"], ConfigError.exit_code, "send_keys needs a frozen prefix"),
    (["--layers", "biggest"], 2, "biggest"),
])
def test_bad_prefix_and_layer_options_are_one_clear_error(tmp_path, capsys, argv, code, message):
    got = main(["simulate", "--model", "tiny-random-llama", "--rounds", "1", "--steps", "1",
                "--out", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert got == code
    assert message in err and len(error_lines(err)) <= 3, err
