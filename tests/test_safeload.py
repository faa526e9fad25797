"""Files given as weights, or found in a checkpoint, are read as tensors only. What is wrong with one is said
in one line and in the user's terms, with none of torch's warnings around it and never torch's advice to load
the file unsafely."""

import pickle
import warnings

import pytest
import torch

from cardinal import build_model
from cardinal.cli import CardinalError
from cardinal.export import load_state_dict_file, script_model
from cardinal.safeload import UnreadableTensors, load_tensors

from conftest import CodeTrap, cli


@pytest.mark.parametrize("content, reason", [
    (b"", "the file is empty"),
    (b'{"epoch": 1, "global_step": 10}', "not a file written by torch.save"),
    (b"PK\x03\x04" + b"\x00" * 40, "damaged, or was not written by torch.save"),
])
def test_a_file_torch_did_not_write_says_what_it_is(tmp_path, content, reason):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(UnreadableTensors, match=reason):
        load_tensors(path)


def test_a_cut_short_torch_file_is_named_as_such(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UnreadableTensors, match="damaged, or was not written by torch.save"):
        load_tensors(path)


def test_a_torchscript_model_is_named(tmp_path):
    path = tmp_path / "model.ts"
    script_model(build_model("tiny_resnet").eval()).save(str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UnreadableTensors, match="TorchScript model, not a state_dict"):
            load_tensors(path)
    assert caught == []


@pytest.mark.parametrize("protocol, reason", [
    (2, "Python objects besides tensors"),  # read as far as the object, then refused
    (4, "was not written by torch.save"),  # framed pickles, which torch.save never writes, stop earlier
    (pickle.HIGHEST_PROTOCOL, "was not written by torch.save"),
])
def test_a_pickle_of_other_objects_is_refused_quietly_and_never_runs(tmp_path, protocol, reason):
    marker = tmp_path / "code-ran"
    path = tmp_path / "weights.pt"
    path.write_bytes(pickle.dumps({"w": CodeTrap(marker)}, protocol=protocol))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UnreadableTensors, match=reason) as error:
            load_tensors(path)
    assert caught == [] and not marker.exists()
    assert "weights_only" not in str(error.value)


def test_a_torch_export_program_is_named(tmp_path):
    path = tmp_path / "model.pt2"
    model = torch.nn.Linear(2, 2)
    torch.export.save(torch.export.export(model, (torch.zeros(1, 2),)), str(path))
    with pytest.raises(UnreadableTensors, match="torch.export program, not a state_dict"):
        load_tensors(path)


def test_tensors_in_plain_containers_load(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"w": torch.ones(2), "steps": [1, 2], "name": "x"}, path)
    state = load_tensors(path)
    assert torch.equal(state["w"], torch.ones(2)) and state["steps"] == [1, 2]


@pytest.mark.parametrize("state", [{5: torch.zeros(1)}, {"fc.weight": "not a tensor"}, [torch.zeros(1)]])
def test_a_state_dict_maps_parameter_names_to_tensors(tmp_path, state):
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    with pytest.raises(CardinalError, match="does not hold a state_dict"):
        load_state_dict_file(path)


@pytest.mark.slow
def test_the_command_line_says_it_in_one_line_with_python_warnings_shown(tmp_path):
    """A real interpreter with warnings on, as a user's is: torch warns about old pickles unless told not to."""
    path = tmp_path / "weights.pt"
    path.write_bytes(pickle.dumps({"w": CodeTrap(tmp_path / "code-ran")}, protocol=4))
    done = cli("cardinal.export", ["--arch", "tiny_resnet", "--weights", path, "--output-dir", tmp_path / "out"],
               env={"PYTHONWARNINGS": "default"})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "was not written by torch.save" in done.stderr and not (tmp_path / "code-ran").exists()
