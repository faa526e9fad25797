"""A write that fails (a full disk, a read-only folder) is one line naming the file, and what was there before
stays whole: trackers, plots, profiler traces, the reference runner's records, the study's record, the data
download and the checkpoint files."""

import errno
import os
import threading
import urllib.error
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from cardinal import checkpoint_writer, profile, reference_run, study, tracking
from cardinal.cli import CardinalError, run
from cardinal.data import _cannot_write_here
from cardinal.plotting import pyplot, save_figure


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FullTracker:
    """What accelerate's Accelerator.log does when TensorBoard's writer thread died of a full disk."""

    def log(self, metrics, step):
        _no_space()


def test_a_tracker_that_cannot_write_is_one_line_saying_what_is_kept(tmp_path):
    with pytest.raises(CardinalError) as error:
        tracking.log_epoch(_FullTracker(), ["tensorboard"], {"epoch": 5, "test_acc": 50.0}, 5, tmp_path / "r")
    assert str(error.value) == ("tracking with tensorboard failed: No space left on device; the records of epoch 5 "
                                f"are kept; free space or mend the folder, then --resume {tmp_path / 'r'}")


def _printed_by_a_dying_thread(thread_class, exception, capsys) -> str:
    def die():
        raise exception

    tracking._quiet_writer_threads()
    thread = thread_class(die)
    thread.start()
    thread.join()
    return capsys.readouterr().err


def test_the_event_writer_threads_full_disk_is_left_to_the_one_line(capsys, monkeypatch):
    writer = pytest.importorskip("tensorboard.summary.writer.event_file_writer")

    class EventWriterThread(writer._AsyncWriterThread):  # TensorBoard's own class, running ``die``
        def __init__(self, die):
            threading.Thread.__init__(self, target=die)

        def run(self):
            threading.Thread.run(self)

    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    assert _printed_by_a_dying_thread(EventWriterThread, OSError(errno.ENOSPC, "full"), capsys) == ""
    # any other thread's error, and any other error of that thread, is printed as before
    assert "ValueError: bug" in _printed_by_a_dying_thread(EventWriterThread, ValueError("bug"), capsys)
    other = lambda die: threading.Thread(target=die)  # noqa: E731
    assert "No space" in _printed_by_a_dying_thread(other, OSError(errno.ENOSPC, "No space"), capsys)


def test_a_plot_that_cannot_be_written_keeps_the_earlier_one(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    plt = pyplot()
    path = tmp_path / "summary.png"
    save_figure(plt.figure(), path)
    before = path.read_bytes()
    figure = plt.figure()

    def half_written(target, **kwargs):
        Path(target).write_bytes(before[:100])
        _no_space()

    monkeypatch.setattr(figure, "savefig", half_written)
    with pytest.raises(CardinalError, match=f"cannot write {path}: No space left on device"):
        save_figure(figure, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["summary.png"]


class _Profiler:
    """Writes as torch's native trace writer does: into ``<path>.tmp``, renamed when the write succeeded."""

    def __init__(self, room: bool):
        self.room = room

    def export_chrome_trace(self, path):
        staged = Path(f"{path}.tmp")
        staged.write_text('{"traceEvents": [')
        if self.room:
            staged.write_text('{"traceEvents": []}')
            staged.rename(path)


def test_a_trace_the_native_writer_could_not_finish_is_one_line_and_keeps_the_earlier_one(tmp_path):
    path = tmp_path / "tiny_resnet.pt.trace.json"
    profile.write_trace(_Profiler(room=True), path)
    assert path.read_text() == '{"traceEvents": []}'
    with pytest.raises(CardinalError, match="the trace writer failed"):
        profile.write_trace(_Profiler(room=False), path)
    assert path.read_text() == '{"traceEvents": []}' and os.listdir(tmp_path) == [path.name]


def test_the_reference_runners_failed_records_write_says_it_does_not_resume(tmp_path, monkeypatch, capsys):
    import cardinal.records

    monkeypatch.setattr(cardinal.records, "write_csv", _no_space)
    argv = ["--arch", "tiny_resnet", "--dataset", "synthetic", "--synthetic-train", "64", "--synthetic-test", "32",
            "--epochs", "1", "--limit-batches", "1", "--workers", "0", "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        run(reference_run.main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "epochs.csv: No space left on device; its earlier rows are kept; this runner does not resume" in err


def test_a_reference_run_that_cannot_write_its_config_leaves_no_folder(tmp_path, monkeypatch, capsys):
    import cardinal.fileio

    monkeypatch.setattr(cardinal.fileio, "_write_synced", _no_space)
    argv = ["--arch", "tiny_resnet", "--dataset", "synthetic", "--epochs", "1", "--workers", "0",
            "--output-dir", str(tmp_path / "runs")]
    with pytest.raises(SystemExit) as exit_info:
        run(reference_run.main, argv)
    assert exit_info.value.code == 2 and "No space left" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_study_record_that_cannot_be_written_is_one_error_and_no_partial_file(tmp_path, monkeypatch):
    import cardinal.fileio

    args = Namespace(output_dir=tmp_path, archs=["tiny_resnet"], seeds=[0], epochs=[1], recipes=["seed"],
                     dataset="synthetic", launcher=None)
    planned = study.PlannedRun("tiny_resnet", "seed", 1, 0, "r", "tiny_resnet (seed 0)")
    study.write_study_record(args, [planned], ["--no-export"])
    before = (tmp_path / "study.json").read_text()
    monkeypatch.setattr(cardinal.fileio, "_write_synced", _no_space)
    with pytest.raises(CardinalError, match=f"cannot write {tmp_path / 'study.json'}: No space left on device"):
        study.write_study_record(args, [planned, planned], [])
    assert (tmp_path / "study.json").read_text() == before and os.listdir(tmp_path) == ["study.json"]


@pytest.mark.parametrize("error, local", [
    (OSError(errno.EROFS, "Read-only file system"), True),
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.ECONNREFUSED, "Connection refused"), False),
    (urllib.error.URLError(OSError(errno.EACCES, "Permission denied")), False),
    (ValueError("checksum"), False),
])
def test_a_download_that_cannot_write_is_told_from_one_that_cannot_fetch(error, local):
    assert _cannot_write_here(error) == local


def test_a_checkpoint_file_reads_back_as_torch_save_wrote_it(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 7}
    checkpoint_writer.save_file(state, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 7


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_checkpoint_file_on_a_full_disk_is_an_os_error_that_says_so():
    """torch's own file writer says 'unexpected pos'; through a Python file the system's reason comes out."""
    with pytest.raises(OSError) as error:
        checkpoint_writer.save_file({"w": torch.zeros(100_000)}, Path("/dev/full"))
    assert error.value.errno == errno.ENOSPC


def test_short_writes_are_continued_and_a_full_disk_is_the_os_error_not_torchs_position_error(tmp_path,
                                                                                               monkeypatch):
    """A filling disk takes part of a write, then none. torch ignores what a write returns: a short write not
    continued would leave a damaged file without an error; and torch alone would say 'unexpected pos'."""
    real, writes = os.write, []

    def half_at_a_time(fd, data):
        writes.append(len(data))
        return real(fd, bytes(data)[: max(1, len(data) // 2)])

    monkeypatch.setattr(checkpoint_writer._WholeWrites, "os_write", staticmethod(half_at_a_time))
    state = {"w": torch.randn(100_000, generator=torch.Generator().manual_seed(0)), "b": torch.ones(3)}
    checkpoint_writer.save_file(state, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])

    def full_after_three(fd, data):
        writes.append(len(data))
        if len(writes) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, bytes(data)[: max(1, len(data) // 2)])

    writes.clear()
    monkeypatch.setattr(checkpoint_writer._WholeWrites, "os_write", staticmethod(full_after_three))
    with pytest.raises(OSError) as error:
        checkpoint_writer.save_file(state, tmp_path / "model.pt")
    assert error.value.errno == errno.ENOSPC


def test_an_output_that_cannot_be_written_leaves_no_folder_made_for_it(tmp_path, monkeypatch):
    import cardinal.fileio
    from cardinal.fileio import probe_writable, write_text_atomic

    probe_writable(tmp_path / "checked" / "early" / "summary.csv")  # checked before the work: nothing kept
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(cardinal.fileio, "_write_synced", _no_space)
    with pytest.raises(OSError):
        write_text_atomic(tmp_path / "new" / "folder" / "summary.txt", "table")
    (tmp_path / "kept").mkdir()
    with pytest.raises(OSError):
        write_text_atomic(tmp_path / "kept" / "summary.txt", "table")
    assert os.listdir(tmp_path) == ["kept"] and os.listdir(tmp_path / "kept") == []
