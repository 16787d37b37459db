"""``moesaic generate --checkpoint X`` says what is wrong with X (issue 21): a folder that does not exist, a
file, or a folder holding no checkpoint, each as one line naming it, before any model is built."""

from moesaic.train.cli import main


def _generate(path, capsys):
    code = main(["generate", "--checkpoint", str(path), "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    return err


def test_a_missing_folder_is_said_to_not_exist(tmp_path, capsys):
    err = _generate(tmp_path / "runs" / "nope", capsys)
    assert f"--checkpoint {tmp_path / 'runs' / 'nope'}: the folder does not exist" in err
    assert "latest" not in err


def test_a_file_and_a_folder_without_checkpoint_are_named(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    assert f"--checkpoint {tmp_path / 'file.txt'}: not a folder" in _generate(tmp_path / "file.txt", capsys)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    err = _generate(tmp_path / "empty", capsys)
    assert f"--checkpoint {tmp_path / 'empty'}: no checkpoint in it (no {tmp_path / 'empty' / 'checkpoints' / 'latest'}" \
           in err
