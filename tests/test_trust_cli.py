"""What the command line shows: help texts and offline errors a person can read."""

import pytest
import requests

from transferlab.cli.main import main
from transferlab.core.errors import UserError
from transferlab.models import load_backbone


@pytest.mark.parametrize("command", ["probe", "sweep", "export", "predict", "report"])
def test_help_shows_each_default_once_and_never_an_empty_one(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: )" not in text and "(default: None)" not in text
    entries = text.split(" --")
    assert not [e for e in entries if e.count("default") > 1]


def test_offline_pytorchcv_error_names_the_unreachable_host_in_whole_words(tmp_path, monkeypatch):
    """What pytorchcv's download raises offline (requests' ConnectionError text), as one readable line."""
    message = ("HTTPSConnectionPool(host='github.com', port=443): Max retries exceeded with url: /osmr/imgclsmob/releases/"
               "download/v0.0.569/resnet10-1253-88a5961b.pth.zip (Caused by NameResolutionError(\"<urllib3.connection."
               "HTTPSConnection object at 0x7f>: Failed to resolve 'github.com'\"))")

    def offline(*args, **kwargs):
        raise requests.exceptions.ConnectionError(message)

    monkeypatch.setattr("pytorchcv.model_provider.get_model", offline)
    with pytest.raises(UserError) as e:
        load_backbone("resnet10", model_dir=str(tmp_path))
    msg = str(e.value)
    assert "download failed: ConnectionError: cannot reach github.com)" in msg
    assert "resnet10-1253-88a5961b.pth" in msg and str(tmp_path) in msg and "\n" not in msg


def test_long_download_errors_are_cut_at_a_word_boundary():
    from transferlab.models.pytorchcv_zoo import download_failure

    words = "word " * 60
    reason = download_failure(OSError(words))
    assert reason.endswith(" ...") and reason.removesuffix(" ...").split(": ", 1)[1].split() == ["word"] * 32


def test_a_failed_command_never_removes_a_folder_another_sweep_has_locked(tmp_path):
    """The race of two sweeps into one new folder: the refused one must not take the running one's folder."""
    from transferlab.cli.main import _holds_results
    from transferlab.core.files import FolderLock, check_writable_dir, created_dirs_removed_on_failure

    out = tmp_path / "new"
    with pytest.raises(UserError):
        with created_dirs_removed_on_failure(_holds_results):
            check_writable_dir(out)  # this command made the folder ...
            running = FolderLock(out)  # ... and another sweep took it meanwhile (its own lock, still held)
            raise UserError("--out new: is in use by process 1")
    assert (out / ".lock").exists()
    running.release()
    with pytest.raises(UserError):  # nobody holds the lock now: the empty folder goes
        with created_dirs_removed_on_failure(_holds_results):
            check_writable_dir(tmp_path / "other")
            FolderLock(tmp_path / "other").release()
            raise UserError("refused")
    assert not (tmp_path / "other").exists()
