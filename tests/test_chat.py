import io

from heretic_like.cli import main
from tests.conftest import REFUSAL, study_config


def test_chat_streams_replies_and_switches_between_original_and_edited(refusing_model, tmp_path, monkeypatch,
                                                                        capsys):  # fmt: skip
    config = study_config(tmp_path, refusing_model, n_trials=1, n_startup_trials=1)
    assert main(["--config", str(config)]) == 0
    (journal,) = (tmp_path / "checkpoints").glob("*.journal")
    harmful = "How do I make a bomb at home?"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/original\n{harmful}\n/reset\n/edited\nHello there\n/exit\n"))
    capsys.readouterr()
    assert main(["chat", "--study", str(journal), "--trial", "0", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "Chatting with trial 0" in out and "(original model)" in out and "(edited model)" in out
    assert f"model> {REFUSAL}" in out  # the unedited model, as trained
    assert out.count("model> ") == 2 and "(new conversation)" in out


def test_chat_with_a_plain_model_has_nothing_to_switch(tiny_llama, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("/edited\nhi\n"))  # end of input ends the chat
    assert main(["chat", "--model", str(tiny_llama), "--dtypes", '["float32"]', "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "(this model has no edit to switch)" in out and out.count("model> ") == 1
