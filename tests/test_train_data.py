"""Issue 27.4: training data is checked before the model loads, and a folder of plain-text files without an
extension (licence texts: LICENSE, Apache-2.0, GPL-3.0-only) is read."""
import pytest

from hashattention.cli import main as cli
from hashattention.training.corpus import data_files, load_documents


def _licences(folder):
    folder.mkdir()
    (folder / "Apache-2.0").write_text("Apache License\nVersion 2.0, January 2004\n")
    (folder / "GPL-3.0-only").write_text("GNU GENERAL PUBLIC LICENSE\nVersion 3, 29 June 2007\n")
    (folder / "LICENSE").write_text("MIT License\n\nPermission is hereby granted, free of charge ... \u00e9\n")
    (folder / "notes.md").write_text("# notes\n")
    (folder / "blob").write_bytes(b"\x7fELF\x00\x01\x02" * 100)  # binary, no extension: skipped
    (folder / "logo.png").write_bytes(b"\x89PNG...")  # another extension: skipped
    (folder / ".hidden").write_text("not this")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return folder


def test_folder_of_files_without_extension_is_read(tmp_path):
    folder = _licences(tmp_path / "licences")
    assert [f.name for f in data_files(str(folder))] == ["Apache-2.0", "GPL-3.0-only", "LICENSE", "notes.md"]
    docs, desc = load_documents(str(folder))
    assert len(docs) == 4 and any("GNU GENERAL" in d for d in docs) and "4 files" in desc
    single, _ = load_documents(str(folder / "LICENSE"))
    assert single[0].startswith("MIT License")


def test_train_checks_its_data_before_loading_the_model(tmp_path, monkeypatch, capsys):
    import hashattention.models as models

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")
    monkeypatch.setattr(models, "load_model", no_model)
    empty = tmp_path / "binaries"
    empty.mkdir()
    (empty / "blob").write_bytes(b"\x00\x01" * 64)
    (empty / "x.bin").write_bytes(b"abc")
    for data, msg in ((empty, "holds no text files"), (tmp_path / "missing", "does not exist")):
        assert cli.main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "README").write_text("  \n")
    assert cli.main(["train", "--data", str(blank), "--out", str(tmp_path / "m"), "--quiet"]) == 2
    assert "is empty" in capsys.readouterr().err
    # good data gets as far as loading the model
    with pytest.raises(AssertionError, match="model was loaded"):
        cli.main(["train", "--data", str(_licences(tmp_path / "licences")), "--out", str(tmp_path / "m"), "--quiet"])
